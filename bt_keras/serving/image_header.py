"""Image sizes read from encoded headers with TensorFlow graph ops: a pixel limit checked BEFORE decoding.

Why: `tf.io.decode_image` allocates the whole pixel array its header promises before anything can look at the
result. A 1 MB GIF can promise 40000 x 40000 pixels (decoding one took 29 s and 7.2 GB: giflib's 1.6 GB raster,
then 4.8 GB of RGB), and a 2.5 KB JPEG can promise 12000 x 12000. Reading the size from the header costs a few
bytes, so a server can refuse such images in milliseconds. Everything here is plain graph ops (no
`tf.py_function`), so it runs inside a SavedModel under TF Serving, which has no Python.

    header = read_image_header(contents)      # contents: a scalar tf.string of encoded bytes
    header.format                             # int32: an index of FORMATS (0: not one of the five)
    header.height, header.width               # int64: the size decode_image returns; -1 when unreadable
    header.pixels                             # int64: an upper bound of the pixels the decoder holds; -1 likewise

    height, width = encoded_image_size(contents)    # the same two numbers, -1 when unreadable
    headers = read_image_headers(images)      # a [batch] string tensor: the same fields as [batch] vectors
    check_encoded_images(images, max_image_pixels)  # an assert op naming the first bad image by its index

What each format's decoder (as TensorFlow 2.21 builds it) allocates, and what is read here:
- JPEG: libjpeg's first SOFn segment (image height and width, 16 bits each). The marker segments are walked as
  libjpeg's `next_marker` does: bytes before an 0xFF are skipped, runs of 0xFF fill bytes are skipped, FF 00 is not
  a marker, RSTn / TEM / SOI stand alone, every other marker carries a 16-bit length (libjpeg advances by at least
  the 2 length bytes). SOS or EOI before any SOF, or bytes running out, leave the size unknown.
- PNG: the IHDR chunk, which libpng requires first (width, height: big-endian 32 bits at offsets 16, 20).
- GIF: giflib's `DGifSlurp` reads EVERY frame and allocates width x height bytes for each, whatever the logical
  screen says, so the whole block structure is walked (extensions and image data are chains of length-prefixed
  sub-blocks): height / width are the logical screen grown to cover every frame (as Pillow grows it), and
  `pixels` is the larger of height x width and the sum of all frames' areas.
- BMP: TensorFlow's own decoder reads a signed 32-bit width at offset 18 and height at 22 (negative: top-down
  rows), whatever the DIB header's size; so does this.
- WebP: libwebp's `WebPGetFeatures` sizes: the VP8X canvas (24 bits + 1), the VP8L header (14 bits + 1), or the
  VP8 key frame (14 bits; the 2 scaling bits are ignored, as libwebp does).
JPEG XL, which `decode_image` also reads, is not parsed: it reports format 0 (unknown), so a caller refuses it.

Cost: the images of a batch are read together, in vector ops (the cost is the longest walk's, not a sum over the
batch): a fixed 30-byte read for PNG, BMP and WebP; for JPEG one step per marker segment (64-byte windows, at most
4096 steps: more fill / stray bytes or segments before the frame header than that and the size is unknown); for
GIF one strided read per 16 KB of full 255-byte sub-blocks, and anything else walked 4 KB at a time by pointer
doubling, so even a GIF built of 2-byte sub-blocks or 3-byte extensions costs ~0.2-0.3 s per MB on one core.
Measured: the 1.1 MB 40000 x 40000 GIF 7 ms, a JPEG 1 ms, a batch of 64 small JPEGs 1.3 ms.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

FORMATS = ("unknown", "JPEG", "PNG", "GIF", "BMP", "WebP")  # index = ImageHeader.format
UNKNOWN, JPEG, PNG, GIF, BMP, WEBP = range(len(FORMATS))

_JPEG_WINDOW = 64  # bytes searched per step for the next marker (0xFF, fill bytes, the marker code)
_JPEG_MAX_STEPS = 4096  # segments (or windows of stray / fill bytes) walked before giving up: size unknown
_GIF_WINDOW = 4096  # bytes of a GIF walked per while-loop iteration (a power of 2)
_GIF_RUN = 64  # full 255-byte sub-blocks skipped per iteration on the fast path
_GIF_REACH = 780  # the farthest one step goes: image descriptor (10) + local colour table (<= 768) + code size + 1


class ImageHeader(NamedTuple):
    """What the readers return: `format` int32 (an index of FORMATS), the others int64 (-1 when unreadable);
    scalars from `read_image_header`, vectors [batch] from `read_image_headers`."""

    format: tf.Tensor
    height: tf.Tensor
    width: tf.Tensor
    pixels: tf.Tensor


def _i64(value):
    return tf.constant(value, tf.int64)


def _where(condition, a, b):
    """tf.where on int64 values, Python ints allowed on either side."""
    return tf.where(condition, tf.convert_to_tensor(a, tf.int64), tf.convert_to_tensor(b, tf.int64))


def _first(mask):
    """Per row of a [m, k] bool tensor: the column of the first True; k when there is none."""
    sentinel = tf.ones([tf.shape(mask)[0], 1], tf.bool)
    return tf.argmax(tf.cast(tf.concat([mask, sentinel], 1), tf.int32), axis=1, output_type=tf.int64)


def _uint(columns, big_endian: bool):
    """[m, k] bytes -> [m] unsigned integers."""
    shifts = tf.range(columns.shape[1], dtype=tf.int64) * 8
    return tf.reduce_sum(tf.bitwise.left_shift(columns, tf.reverse(shifts, [0]) if big_endian else shifts), 1)


class _Bytes:
    """The bytes of a batch of encoded images laid end to end in one uint8 vector (a 50 MB image beside small ones
    costs 50 MB once, not a padded matrix), read by (row, position) with zeros outside each image.
    `rows(indices)` is a view of some of the images (the JPEGs, the GIFs) over the same bytes."""

    def __init__(self, images=None, *, lengths=None, offsets=None, flat=None, end=None):
        if images is not None:
            lengths = tf.cast(tf.strings.length(images), tf.int64)
            data = tf.io.decode_raw(tf.strings.reduce_join(images), tf.uint8)
            end = tf.size(data, out_type=tf.int64)
            flat = tf.concat([data, [0]], 0)  # index `end` reads 0
            offsets = tf.cumsum(lengths, exclusive=True)
        self.lengths, self.offsets, self.flat, self.end = lengths, offsets, flat, end

    def rows(self, indices):
        return _Bytes(lengths=tf.gather(self.lengths, indices), offsets=tf.gather(self.offsets, indices),
                      flat=self.flat, end=self.end)

    def at(self, positions):
        """[m, k] positions (row r: image r) -> [m, k] int64 bytes, 0 outside the image."""
        inside = (positions >= 0) & (positions < self.lengths[:, None])
        return tf.cast(tf.gather(self.flat, tf.where(inside, self.offsets[:, None] + positions, self.end)), tf.int64)

    def read(self, start, count: int):
        """[m] start positions -> [m, count] bytes."""
        return self.at(start[:, None] + tf.range(count, dtype=tf.int64)[None, :])


def _starts_with(head, lengths, prefix: bytes, offset: int = 0):
    expected = tf.constant(list(prefix), tf.int64)[None, :]
    return (lengths >= offset + len(prefix)) & tf.reduce_all(
        tf.equal(head[:, offset:offset + len(prefix)], expected), 1)


def _run_subset(mask, walk, b: _Bytes, fill):
    """`walk(b.rows(rows))` for the rows where `mask` holds, its [m]-vectors scattered into [n]-vectors of `fill`."""
    rows = tf.where(mask)[:, 0]
    results = walk(b.rows(rows))
    n = tf.shape(mask, out_type=tf.int64)[0]
    return [tf.tensor_scatter_nd_update(tf.fill([n], _i64(fill)), rows[:, None], r) for r in results]


# ----------------------------------------------------------------------------------------------------------- JPEG


def _jpeg_sizes(b: _Bytes):
    """(height, width) per image from its first SOFn segment; -1 when none comes before SOS / EOI / the end (or
    within _JPEG_MAX_STEPS steps). All images step together: one step reads a window at each one's position."""
    searching, found, failed = 0, 1, 2
    window = _JPEG_WINDOW

    def step(pos, status, height, width, steps):
        win = b.read(pos, window + 8)  # the search window, and the 7 bytes after a marker code at its end
        is_ff = tf.equal(win[:, :window], 0xFF)
        i = _first(is_ff)  # the next 0xFF (libjpeg skips anything else before it)
        j = _first(~is_ff & (tf.range(window, dtype=tf.int64)[None, :] > i[:, None]))  # its marker code
        incomplete = j >= window  # no marker code in the window: go on (onto the last 0xFF if a run reaches its end)
        at_end = pos + window >= b.lengths
        moved = pos + _where(i >= window, window, window - 1)
        j = tf.minimum(j, window - 1)
        fields = tf.gather(win, j[:, None] + tf.range(8, dtype=tf.int64)[None, :], batch_dims=1)
        code, mark = fields[:, 0], pos + j
        is_sof = (code >= 0xC0) & (code <= 0xCF) & (code != 0xC4) & (code != 0xC8) & (code != 0xCC)
        alone = (code == 0x00) | (code == 0x01) | ((code >= 0xD0) & (code <= 0xD8))  # FF00 is stuffing, no marker
        stop = (code == 0xD9) | (code == 0xDA)  # EOI, SOS: no frame header came before them
        length = fields[:, 1] * 256 + fields[:, 2]
        after = _where(alone, mark + 1, mark + 1 + tf.maximum(length, 2))  # libjpeg skips at least the 2 length bytes
        sof_complete = mark + 8 <= b.lengths  # marker code, length (2), precision (1), height (2), width (2)
        new_status = _where(
            incomplete, _where(at_end, failed, searching),
            _where(is_sof, _where(sof_complete, found, failed),
                   _where(stop | (~alone & (mark + 3 > b.lengths)), failed, searching)))
        active = tf.equal(status, searching)
        take = active & ~incomplete & is_sof & sof_complete
        return (_where(active, _where(incomplete, moved, after), pos), _where(active, new_status, status),
                _where(take, fields[:, 4] * 256 + fields[:, 5], height),
                _where(take, fields[:, 6] * 256 + fields[:, 7], width), steps + 1)

    m = tf.shape(b.lengths)[0]
    state = (tf.fill([m], _i64(2)), tf.fill([m], _i64(searching)), tf.fill([m], _i64(-1)), tf.fill([m], _i64(-1)),
             _i64(0))  # each walk starts after SOI (FF D8)
    _, status, height, width, _ = tf.while_loop(
        lambda pos, status, h, w, steps: tf.reduce_any(tf.equal(status, searching)) & (steps < _JPEG_MAX_STEPS),
        step, state)
    ok = tf.equal(status, found)
    return _where(ok, height, -1), _where(ok, width, -1)


# ------------------------------------------------------------------------------------------------------------ GIF


def _gif_windows(b: _Bytes, base, phase):
    """Walks each GIF's blocks from byte `base` (phase 0: a block introducer there; 1: a sub-block length byte) to
    the first position at or past base + _GIF_WINDOW, or to its end, in vector ops over one window of bytes.

    Every (position, phase) of the window is a node whose successor is known from its own bytes; pointer doubling
    (12 rounds of gathers for 4096 positions) lists the nodes the walk visits from the start, whatever the sizes of
    its sub-blocks, so the cost per byte is the same for a plain GIF and for one built of 2-byte sub-blocks.
    Returns (next position, next phase, ended, max frame bottom, max frame right, sum of frame areas), each [m]."""
    window, span = _GIF_WINDOW, _GIF_WINDOW + _GIF_REACH
    d = b.read(base, span + 10)
    i = tf.range(span, dtype=tf.int64)[None, :]
    byte = d[:, :span]

    def le16(offset):
        return d[:, offset:offset + span] + 256 * d[:, offset + 1:offset + 1 + span]

    flags = d[:, 9:9 + span]
    local_table = tf.where(flags >= 0x80, 3 * tf.bitwise.left_shift(_i64(2), flags & 7), 0)
    room = b.lengths[:, None] - base[:, None] - i  # bytes left from each position
    is_image = tf.equal(byte, 0x2C) & (room >= 10)
    is_ext = tf.equal(byte, 0x21) & (room >= 2)
    inside = i < window  # nodes past the window absorb: the next window starts there
    # Node 2 i + phase. Block (phase 0): extension -> its label's sub-blocks; image -> its LZW data's sub-blocks;
    # anything else (the trailer, a stray byte, the end) absorbs: the walk ends. Sub-block (phase 1): length 0 ->
    # the next block; else -> the next length byte.
    block_next = tf.where(is_ext, 2 * (i + 2) + 1, tf.where(is_image, 2 * (i + 11 + local_table) + 1, 2 * i))
    chain_next = tf.where(tf.equal(byte, 0), 2 * (i + 1), 2 * (i + 1 + byte) + 1)
    m = tf.shape(d)[0]

    def nodes(block, chain):
        return tf.reshape(tf.stack([block, chain], 2), [m, 2 * span])

    jump = nodes(tf.where(inside, block_next, 2 * i), tf.where(inside, chain_next, 2 * i + 1))
    image = is_image & inside
    zeros = tf.zeros_like(byte)
    area = nodes(tf.where(image, le16(5) * le16(7), 0), zeros)
    right = nodes(tf.where(image, le16(1) + le16(5), 0), zeros)
    bottom = nodes(tf.where(image, le16(3) + le16(7), 0), zeros)

    path = phase[:, None]  # the nodes at distances 0 .. 2^k - 1 from the start (local node 0 + phase)
    for _ in range(window.bit_length() - 1):  # each step advances >= 1 byte: 2^12 steps leave the window
        path = tf.concat([path, tf.gather(jump, path, batch_dims=1)], 1)
        jump = tf.gather(jump, jump, batch_dims=1)
    last = tf.gather(jump, phase[:, None], batch_dims=1)[:, 0]
    position = last // 2
    ended = (position < window) | (base + position >= b.lengths)

    def along_path(values):
        return tf.gather(values, path, batch_dims=1)

    return (base + position, last % 2, ended, tf.reduce_max(along_path(bottom), 1),
            tf.reduce_max(along_path(right), 1), tf.reduce_sum(along_path(area), 1))


def _gif_sizes(b: _Bytes):
    """(height, width, pixels) per GIF: the logical screen grown to cover every frame; pixels = max(h * w, sum of
    the frames' areas), what giflib's DGifSlurp allocates. A walk ends at the trailer, at a byte that starts no
    block (giflib fails there) or at the end of the data (giflib fails there too, after allocating what it saw)."""
    head = b.read(tf.zeros_like(b.lengths), 13)
    screen_w, screen_h = _uint(head[:, 6:8], False), _uint(head[:, 8:10], False)
    flags = head[:, 10]
    table = tf.where(flags >= 0x80, 3 * tf.bitwise.left_shift(_i64(2), flags & 7), 0)  # global colour table

    def step(base, phase, height, width, area, ended):
        # Fast path: encoders write image data in full 255-byte sub-blocks, so from a length byte of 255 hop over
        # the run of them (up to _GIF_RUN at once) with one strided read; anything else takes a window walk.
        run = _first(tf.not_equal(b.at(base[:, None] + 256 * tf.range(_GIF_RUN, dtype=tf.int64)[None, :]), 255))
        fast = tf.equal(phase, 1) & (run > 0) & ~ended
        walk = ~fast & ~ended
        zeros = tf.zeros_like(base)
        w_base, w_phase, w_ended, bottom, right, more = tf.cond(
            tf.reduce_any(walk), lambda: _gif_windows(b, base, phase),
            lambda: (base, phase, ended, zeros, zeros, zeros))
        return (tf.where(fast, base + 256 * run, tf.where(walk, w_base, base)),
                tf.where(walk, w_phase, phase),
                tf.where(walk, tf.maximum(height, bottom), height),
                tf.where(walk, tf.maximum(width, right), width),
                tf.where(walk, area + more, area),
                ended | (walk & w_ended))

    zeros = tf.zeros_like(b.lengths)
    state = (13 + table, zeros, screen_h, screen_w, zeros, tf.zeros_like(zeros, tf.bool))
    _, _, height, width, area, _ = tf.while_loop(lambda *s: tf.reduce_any(~s[-1]), step, state)
    ok = b.lengths >= 13  # header (6) + logical screen descriptor (7)
    return _where(ok, height, -1), _where(ok, width, -1), _where(ok, tf.maximum(height * width, area), -1)


# ------------------------------------------------------------------------------------------------------------ API


def read_image_headers(images) -> ImageHeader:
    """The format and size of each encoded image of a [batch] string tensor, from the headers alone (see the module
    docstring); an ImageHeader of [batch] vectors. All images are read together: the cost is that of the longest
    walk, not a sum over the batch.

    Formats are recognised by the magic bytes `decode_image` uses (JPEG FF D8 FF, PNG's 8-byte signature, "GIF8",
    "BM", "RIFF....WEBP"); anything else is format 0. When the header of a recognised format is cut short or
    malformed (a JPEG without a frame header before its scan, a PNG whose first chunk is no IHDR), the sizes are
    -1: the size of what would be decoded is not known, and a caller should refuse it.
    """
    images = tf.convert_to_tensor(images, tf.string)
    b = _Bytes(images)
    n = b.lengths
    head = b.read(tf.zeros_like(n), 30)

    def starts(prefix, offset=0):
        return _starts_with(head, n, prefix, offset)

    code = _where(starts(b"\xff\xd8\xff"), JPEG,
                  _where(starts(b"\x89PNG\r\n\x1a\n"), PNG,
                         _where(starts(b"GIF8"), GIF,
                                _where(starts(b"BM"), BMP,
                                       _where(starts(b"RIFF") & starts(b"WEBP", 8) & (n > 12), WEBP, UNKNOWN)))))
    # PNG: IHDR first. BMP: TensorFlow's offsets, signed (negative height: rows stored top-down).
    png_ok = (n >= 24) & starts(b"IHDR", 12)
    png_w, png_h = _uint(head[:, 16:20], True), _uint(head[:, 20:24], True)

    def signed32(value):
        return tf.where(value >= 2**31, value - 2**32, value)

    bmp_ok = n >= 26
    bmp_w, bmp_h = signed32(_uint(head[:, 18:22], False)), tf.abs(signed32(_uint(head[:, 22:26], False)))
    # WebP: VP8 key frame (start code 9D 01 2A), VP8L (signature 0x2F), VP8X canvas.
    vp8 = starts(b"VP8 ", 12) & starts(b"\x9d\x01\x2a", 23) & (n >= 30)
    vp8l = starts(b"VP8L", 12) & tf.equal(head[:, 20], 0x2F) & (n >= 25)
    vp8x = starts(b"VP8X", 12) & (n >= 30)
    bits = _uint(head[:, 21:25], False)
    webp_w = tf.where(vp8, _uint(head[:, 26:28], False) & 0x3FFF,
                      tf.where(vp8l, (bits & 0x3FFF) + 1, _uint(head[:, 24:27], False) + 1))
    webp_h = tf.where(vp8, _uint(head[:, 28:30], False) & 0x3FFF,
                      tf.where(vp8l, (tf.bitwise.right_shift(bits, 14) & 0x3FFF) + 1, _uint(head[:, 27:30], False) + 1))
    webp_ok = vp8 | vp8l | vp8x

    jpeg_h, jpeg_w = _run_subset(tf.equal(code, JPEG), _jpeg_sizes, b, -1)
    gif_h, gif_w, gif_pixels = _run_subset(tf.equal(code, GIF), _gif_sizes, b, -1)

    def pick(jpeg, png, gif, bmp, webp):
        return _where(tf.equal(code, JPEG), jpeg, _where(tf.equal(code, PNG), png, _where(
            tf.equal(code, GIF), gif, _where(tf.equal(code, BMP), bmp, _where(tf.equal(code, WEBP), webp, -1)))))

    ok = pick(*(tf.cast(flag, tf.int64) for flag in (jpeg_h >= 0, png_ok, gif_h >= 0, bmp_ok, webp_ok))) > 0
    height = _where(ok, pick(jpeg_h, png_h, gif_h, bmp_h, webp_h), -1)
    width = _where(ok, pick(jpeg_w, png_w, gif_w, bmp_w, webp_w), -1)
    pixels = _where(ok, pick(jpeg_h * jpeg_w, png_h * png_w, gif_pixels, bmp_h * tf.maximum(bmp_w, 0),
                                 webp_h * webp_w), -1)
    return ImageHeader(tf.cast(code, tf.int32), height, width, pixels)


def read_image_header(contents) -> ImageHeader:
    """`read_image_headers` for one image: `contents` a scalar tf.string; an ImageHeader of scalars.

    Example:
      >>> png = tf.io.encode_png(tf.zeros([3, 5, 3], tf.uint8))
      >>> [int(v) for v in read_image_header(png)]
      [2, 3, 5, 15]
    """
    headers = read_image_headers(tf.reshape(tf.convert_to_tensor(contents, tf.string), [1]))
    return ImageHeader(*(value[0] for value in headers))


def encoded_image_size(contents):
    """(height, width) int64 scalars of an encoded image, read from its header; (-1, -1) when the format is not
    JPEG / PNG / GIF / BMP / WebP or the header is cut short. For a GIF: the logical screen grown to cover every
    frame. See `read_image_header` for the decode-time pixel bound, which also counts every GIF frame."""
    header = read_image_header(contents)
    return header.height, header.width


# ------------------------------------------------------------------------------------------ checking a batch


def resized_too_large(height, width, resized_short_side: int | None, max_image_pixels: int):
    """Whether an image of height x width (int64 tensors) holds more than max_image_pixels once its shorter side is
    resized to `resized_short_side` (the evaluation transform's resize; the longer side grows by the same factor).

    A few hundred bytes can promise 200000 x 1 pixels: under any pixel limit, yet resized to a shorter side of 37 it
    is 7.4 million x 37 floats, and at 256 it would be terabytes. So the limit applies to the resized image too."""
    if not resized_short_side:
        return tf.zeros_like(height, tf.bool)
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    target = int(resized_short_side)
    # target * (long * target / short) > limit, in integers (no overflow below 2^63 for any header value here).
    return (short > 0) & (tf.minimum(long, _i64(2**40)) * target * target > _i64(int(max_image_pixels)) * short)


def _problems(images, max_image_pixels: int, resized_short_side: int | None = None):
    """Per image of a [batch] string tensor: (problem code, header). Codes: 0 fine, 1 empty string, 2 unknown
    format, 3 header cut short / malformed, 4 zero (or negative) height or width, 5 over max_image_pixels,
    6 over max_image_pixels once resized (an extreme aspect ratio; see `resized_too_large`)."""
    headers = read_image_headers(images)
    limit = tf.constant(int(max_image_pixels), tf.int64)
    problem = tf.where(tf.equal(tf.strings.length(images), 0), 1,
              tf.where(tf.equal(headers.format, UNKNOWN), 2,
              tf.where(headers.height < 0, 3,
              tf.where(tf.minimum(headers.height, headers.width) <= 0, 4,
              tf.where(headers.pixels > limit, 5,
              tf.where(resized_too_large(headers.height, headers.width, resized_short_side, max_image_pixels),
                       6, 0))))))
    return problem, headers


def check_encoded_images(images, max_image_pixels: int, what: str = "serving_default",
                         resized_short_side: int | None = None):
    """An assert op that fails (InvalidArgumentError) unless every encoded image of `images` (string [batch]) has a
    readable JPEG / PNG / GIF / BMP / WebP header promising 1 ..= max_image_pixels pixels; run it BEFORE decoding.

    The message names the first bad image by its index in the batch, what is wrong and the fix, e.g.
    "serving_default: image 3 of the batch is 40000 x 40000 pixels (width x height), more than 50000000 pixels
    (max_image_pixels=50000000); downscale it before sending". Costs a header read per image, no decoding.
    """
    max_image_pixels = int(max_image_pixels)
    problem, h = _problems(images, max_image_pixels, resized_short_side)
    bad = problem > 0
    index = _first(bad[None, :])[0]  # the batch size when none is bad (then the message below is not used)

    def at(values, fill):
        return tf.gather(tf.concat([values, [fill]], axis=0), index)

    def text(value):
        return tf.strings.as_string(value)

    width, height, pixels = at(h.width, 0), at(h.height, 0), at(h.pixels, 0)
    name = tf.gather(tf.constant(FORMATS), at(h.format, 0))
    size = tf.strings.join([text(width), " x ", text(height), " pixels (width x height)"])
    limit = f"more than {max_image_pixels} pixels (max_image_pixels={max_image_pixels}); downscale it before sending"
    messages = tf.stack([
        tf.constant("no problem"),
        tf.constant("is an empty string; send the encoded JPEG / PNG / GIF / BMP / WebP bytes of the image"),
        tf.constant("is not a JPEG, PNG, GIF, BMP or WebP image (Unknown image file format); send one of those"),
        tf.strings.join(["has a ", name, " header that is cut short or malformed, so its size cannot be read; "
                         "send the whole, valid file"]),
        tf.strings.join(["is ", size, ": zero height or width; send a non-empty image"]),
        tf.where(pixels > width * height,
                 tf.strings.join(["is ", size, " but its GIF frames hold ", text(pixels), " pixels in all, ", limit]),
                 tf.strings.join(["is ", size, ", ", limit])),
        tf.strings.join(["is ", size, ": resized to a shorter side of ", str(resized_short_side), " px for the "
                         f"model it would hold more than {max_image_pixels} pixels (max_image_pixels), an extreme "
                         "aspect ratio; crop it closer to square before sending"]),
    ])
    message = tf.strings.join([f"{what}: image ", text(index), " of the batch ",
                               tf.gather(messages, at(problem, 0))])
    return tf.debugging.Assert(~tf.reduce_any(bad), [message])
