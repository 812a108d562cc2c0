"""Hostile encoded images built byte by byte, cheaply: tiny files that promise (or hold) huge pixel arrays.

Used by tests/serving/test_image_header.py, which also sends them to the fresh-process probe
tests/subprocess_scripts/serving_probe.py. Each builder also makes small instances of the same construction, which
the tests decode with Pillow and TensorFlow to show the bytes are valid.

- `constant_gif(width, height, ...)`: a valid GIF of one colour, LZW-coded by hand. Coding a constant image, greedy
  LZW emits codes for runs of 1, 2, 3, ... pixels; with a clear code every `RUNS_PER_TABLE` codes, 40000 x 40000
  pixels take ~1.2 MB (the issue's 1.18 MB file).
- `constant_jpeg(width, height)`: a valid baseline greyscale JPEG of mid grey: one-symbol Huffman tables give every
  8 x 8 block the 1-bit codes "DC difference 0" and "end of block", 2 bits per block (20000 x 20000: 1.6 MB).
- `jpeg_with_size(data, width, height)`: a real JPEG with its SOF0 dimensions patched (the 2.5 KB "12000 x 12000").
"""

from __future__ import annotations

import struct

RUNS_PER_TABLE = 4000  # codes between clear codes; entries reach 5 + 4000 < 4096, the 12-bit table's limit
_MIN_CODE_SIZE = 2  # colours 0..3; clear = 4, end of information = 5, first free entry = 6
_CLEAR, _END = 4, 5


def _code_width(k: int) -> int:
    """Bits of the k-th code after a clear code (k >= 1), as a GIF decoder reads it: it widens the code when the
    next free table entry (4 + k before reading code k) reaches 2**width, up to 12 bits."""
    width = _MIN_CODE_SIZE + 1
    while (1 << width) <= 4 + k and width < 12:
        width += 1
    return width


def _run_code(length: int) -> int:
    """The code for a run of `length` pixels of colour 0: code 0 for one pixel; the k-th code emitted after a clear
    adds the entry 5 + k = a run of k + 1 pixels, so a run of L >= 2 pixels is entry 4 + L."""
    return 0 if length == 1 else 4 + length


class _Bits:
    """An LSB-first bit stream (GIF's order), kept as one Python integer."""

    def __init__(self):
        self.value, self.length = 0, 0

    def put(self, code: int, width: int):
        self.value |= code << self.length
        self.length += width

    def append(self, other: "_Bits"):
        self.value |= other.value << self.length
        self.length += other.length

    def bytes(self) -> bytes:
        return self.value.to_bytes((self.length + 7) // 8, "little")


def _lzw_constant(pixels: int) -> bytes:
    """LZW data for `pixels` pixels of colour 0 (after the code-size byte, before sub-block framing)."""
    table = _Bits()  # one full table: runs 1 .. RUNS_PER_TABLE, then a clear code
    for k in range(1, RUNS_PER_TABLE + 1):
        table.put(_run_code(k), _code_width(k))
    table.put(_CLEAR, _code_width(RUNS_PER_TABLE + 1))
    per_table = RUNS_PER_TABLE * (RUNS_PER_TABLE + 1) // 2
    bits = _Bits()
    bits.put(_CLEAR, _MIN_CODE_SIZE + 1)
    full, rest = divmod(pixels, per_table)
    chunk = table  # append `full` copies by doubling: O(log full) big-integer shifts
    while full:
        if full & 1:
            bits.append(chunk)
        full >>= 1
        if full:
            doubled = _Bits()
            doubled.append(chunk)
            doubled.append(chunk)
            chunk = doubled
    k = 0
    while rest:
        k += 1
        run = min(k, rest)  # the last run may be shorter: any run up to k is in the table already
        bits.put(_run_code(run), _code_width(k))
        rest -= run
    bits.put(_END, _code_width(k + 1))
    return bits.bytes()


def _sub_blocks(data: bytes) -> bytes:
    out = bytearray()
    for start in range(0, len(data), 255):
        piece = data[start:start + 255]
        out += bytes([len(piece)]) + piece
    return bytes(out) + b"\x00"


def gif_frame(width: int, height: int, left: int = 0, top: int = 0) -> bytes:
    """One image descriptor + LZW data of a constant frame (no local colour table)."""
    return (b"\x2c" + struct.pack("<4HB", left, top, width, height, 0) + bytes([_MIN_CODE_SIZE])
            + _sub_blocks(_lzw_constant(width * height)))


def constant_gif(width: int, height: int, frames=None, colour=(10, 20, 30)) -> bytes:
    """A GIF89a with a `width` x `height` logical screen and, by default, one frame filling it with `colour`.
    `frames`: a list of `gif_frame(...)` byte strings to use instead (animated, or frames larger than the screen)."""
    palette = bytes(colour) + bytes(9)  # 4 entries, the first one used
    header = b"GIF89a" + struct.pack("<2HBBB", width, height, 0x80 | 0x01, 0, 0) + palette
    body = b"".join(frames) if frames is not None else gif_frame(width, height)
    return header + body + b"\x3b"


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def constant_jpeg(width: int, height: int) -> bytes:
    """A valid baseline greyscale JPEG, every pixel 128 (see the module docstring)."""
    dqt = _segment(0xDB, b"\x00" + bytes([1]) * 64)
    sof = _segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
    one_symbol = bytes([1]) + bytes(15) + b"\x00"  # one code of length 1 ("0") for symbol 0
    dht = _segment(0xC4, b"\x00" + one_symbol) + _segment(0xC4, b"\x10" + one_symbol)  # DC: category 0; AC: EOB
    sos = _segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
    blocks = -(-width // 8) * -(-height // 8)
    rest = blocks % 4  # blocks in a last, partial byte: 2 bits each, the byte padded with 1-bits
    scan = bytes(blocks // 4) + (bytes([(1 << (8 - 2 * rest)) - 1]) if rest else b"")
    return b"\xff\xd8" + dqt + sof + dht + sos + scan + b"\xff\xd9"


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """`data` (a JPEG) with the height and width of its first SOF0/SOF2 segment replaced."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError("jpeg_with_size: expected a marker; give it a plain JPEG (e.g. Pillow's)")
        marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker in (0xC0, 0xC2):
            return data[:pos + 5] + struct.pack(">HH", height, width) + data[pos + 9:]
        pos += 2 + length
    raise ValueError("jpeg_with_size: no SOF0/SOF2 segment found")
