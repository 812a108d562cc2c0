"""Finding the files of an image folder that do not decode, once, before a run, and naming each one.

A file with a JPEG/PNG signature can still be broken: cut short by a failed copy, or with garbage in its middle. In
the training stream such a file was dropped by `ignore_errors`, which shifted every later batch (a resumed run then
differed from the uninterrupted one), was counted in the steps per epoch, and decoded or failed depending on the
crop window (the crops decode only the window's rows). So every file is decoded fully, once, up front, and the bad
ones are left out of the file list that the seeded pipeline shuffles: the stream stays a pure function of
(seed, step).

How a bad file is recognised (`check_files`), and why:
  * no JPEG/PNG signature in its first bytes, or empty or unreadable: not an image;
  * TensorFlow's `decode_image` raises: the decoder training uses, so "decodes here" means "decodes in training".
    It raises on truncated JPEGs (TensorFlow refuses the "Premature end of JPEG data" that libjpeg would pad) and on
    corrupt or truncated PNGs (libpng's CRC and zlib checks);
  * the decode returns an image but libjpeg warned "Corrupt JPEG data: ..." or "Premature end of JPEG data": garbage
    in the middle of a JPEG's compressed data that holds no marker byte decodes to garbage pixels without an error.
    libjpeg prints these warnings straight to file descriptor 2 (no Python or TensorFlow API reports them), so the
    check points fd 2 at a temporary file while it decodes a chunk of files in threads; when the chunk's text holds
    such a warning, its files are decoded again one at a time to tell which one warned. Other lines caught there
    are written to the real stderr afterwards.
    What no decoder can see: JPEG has no checksum, and garbage after which the Huffman decoder falls back into step
    with the real data at the same block (about 3 in 10 random 200-byte overwrites of a small JPEG, in tests/data/
    test_bad_images.py's case) decodes silently to a band of wrong pixels; it is not found.
Pillow was not used: it raises on truncated files but passes the mid-file garbage silently (it discards libjpeg's
warnings), and it accepts some PNGs with a cut IEND that TensorFlow rejects.

A check is keyed by its file list: the paths with their sizes and modification times (and TensorFlow's version). It
is kept in memory for the process, and `record` keeps it in a workdir (`image_checks/KEY.json`, read back by
`check_files(..., cache_folder=)`), so a resumed or repeated run does not decode everything again; it also writes
`bad_images.txt` there: one line per bad file, `PATH<TAB>REASON`. `python -m bt_keras.data_check FOLDER` runs the
same check from the command line.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import tensorflow as tf

from bt_keras import files

BAD_IMAGES_FILE = "bad_images.txt"  # in a workdir: PATH<TAB>REASON per bad file
CHECKS_DIR = "image_checks"  # in a workdir: one KEY.json per checked file list
CHUNK = 64  # files decoded together while fd 2 is captured
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG
_CORRUPT = re.compile(r"(Corrupt JPEG data[^\n]*|Premature end of JPEG data[^\n]*)")
# What the decoders print around a decode (libjpeg's raw lines, TensorFlow's op errors): not passed on.
_DECODER_LINE = re.compile(r"JPEG|jpeg|PNG|png|Huffman|marker|local_rendezvous|Op:Decode|Uncompress")
_MEMORY: dict[str, "Check"] = {}  # key -> check, for this process
_MEMORY_SIZE = 64


@dataclasses.dataclass(frozen=True)
class Check:
    """The result for one file list: how many files, the bad ones (path -> reason), the good ones' bytes."""

    key: str
    files: int
    bad: dict[str, str]
    good_bytes: int


def _stat(path: str) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file, or None where it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def file_list_key(paths, stats) -> str:
    """A key for a file list: its paths, sizes and modification times, and TensorFlow's version (its decoder is
    the judge), so that any change to a file or to the list asks for a new check."""
    digest = hashlib.sha256(f"bt_keras image check 1, tensorflow {tf.__version__}\n".encode())
    for path, stat in zip(paths, stats):
        digest.update(f"{path}\0{stat}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def _one_line(text: str) -> str:
    """TensorFlow's op error as one short line: without its `{{function_node ...}}` and `[Op:...]` wrapping."""
    text = re.sub(r"\{\{[^}]*\}\}", "", text)
    text = re.sub(r"\[Op:\w+\]", "", text)
    return " ".join(text.split())


def _decode_error(data: bytes) -> str | None:
    """None if TensorFlow decodes the bytes fully (as training does), else its error in one line."""
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, tf.errors.ResourceExhaustedError) as error:
        return _one_line(error.message) or type(error).__name__
    return None


def _truncated(data: bytes) -> str | None:
    """'truncated JPEG/PNG' when the file lacks its format's end marker (a cut copy), else None."""
    if data.startswith(_MAGIC[0]) and b"\xff\xd9" not in data[-64:]:
        return "truncated JPEG (no end-of-image marker)"
    if data.startswith(_MAGIC[1]) and b"IEND" not in data[-64:]:
        return "truncated PNG (no IEND chunk)"
    return None


def _problem(path: str) -> tuple[bytes | None, str | None]:
    """(the file's bytes when it decoded, or None; the reason it is bad, or None), warnings aside (`_problems`)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        return None, f"cannot be read: {error.strerror or error}"
    if not data:
        return None, "empty file"
    if not data.startswith(_MAGIC):
        return None, "not a JPEG or PNG image (no JPEG/PNG signature in its first bytes)"
    error = _decode_error(data)
    if error is None:
        return data, None
    cut = _truncated(data)
    return None, f"{cut}: {error}" if cut else f"does not decode: {error}"


@contextlib.contextmanager
def _stderr_into(sink):
    """Points file descriptor 2 at `sink` (a file) for the block: where libjpeg prints its warnings."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _take(sink) -> str:
    """What `sink` caught since the last call; it is emptied."""
    sink.flush()
    sink.seek(0)
    text = sink.read().decode("utf-8", "replace")
    sink.seek(0)
    sink.truncate()
    return text


def _pass_on(text: str) -> None:
    """Writes the caught lines that are not the decoders' own to the real stderr (another thread's log line)."""
    other = [line for line in text.splitlines() if line.strip() and not _DECODER_LINE.search(line)]
    if other:
        sys.stderr.write("\n".join(other) + "\n")
        sys.stderr.flush()


def _one_by_one(paths, sink) -> dict[str, str]:
    """Decodes `paths` one at a time with fd 2 caught: which ones libjpeg warned about, or failed, and why."""
    bad = {}
    for path in paths:
        with _stderr_into(sink):
            _, reason = _problem(path)
        warning = _CORRUPT.search(_take(sink))
        if reason is None and warning:
            reason = f"decodes with errors (garbage pixels): {warning.group(1).strip()}"
        elif reason is not None and warning and "truncated" not in reason:
            reason = f"does not decode: {warning.group(1).strip()}"
        if reason is not None:
            bad[path] = reason
    return bad


def _check_chunk(paths, pool, sink) -> dict[str, str]:
    """The bad files of one chunk: decoded in the thread pool, then one by one if libjpeg warned while it ran."""
    with _stderr_into(sink):
        results = list(pool.map(_problem, paths))
    text = _take(sink)
    if _CORRUPT.search(text):
        return _one_by_one(paths, sink)
    _pass_on(text)
    return {path: reason for path, (_, reason) in zip(paths, results) if reason is not None}


class _Progress:
    """'checking images: 1,234/5,678 (950/s)' on stderr: redrawn in place on a terminal, a line every 30 s if not."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.start = self.last = time.monotonic()
        self.tty = enabled and sys.stderr.isatty()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or not final and now - self.last < (0.5 if self.tty else 30.0):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        line = f"checking images in {self.label}: {done:,}/{self.total:,} ({rate:,.0f}/s)"
        sys.stderr.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        sys.stderr.flush()


def scan(paths, *, threads: int | None = None, progress: bool | None = None, label: str = "") -> dict[str, str]:
    """Decodes every file fully (`threads` at a time, default one per CPU) and returns {path: reason} of the bad
    ones. `progress`: a progress line on stderr (None: for 2,000 files or more)."""
    paths = list(paths)
    threads = threads or os.cpu_count() or 1
    meter = _Progress(len(paths), label or "folder", len(paths) >= 2000 if progress is None else progress)
    bad = {}
    with concurrent.futures.ThreadPoolExecutor(threads) as pool, tempfile.TemporaryFile() as sink:
        for start in range(0, len(paths), CHUNK):
            bad.update(_check_chunk(paths[start:start + CHUNK], pool, sink))
            meter.update(min(start + CHUNK, len(paths)))
    meter.update(len(paths), final=True)
    return bad


def _cache_file(folder, key: str) -> Path:
    return Path(folder) / CHECKS_DIR / f"{key}.json"


def _read_cache(folder, key: str) -> Check | None:
    """The check kept in `folder` for this key, or None (none, or unreadable: then it is done again)."""
    try:
        kept = json.loads(_cache_file(folder, key).read_text())
        return Check(key, int(kept["files"]), dict(kept["bad"]), int(kept["good_bytes"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remember(check: Check) -> Check:
    if len(_MEMORY) >= _MEMORY_SIZE:
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[check.key] = check
    return check


def check_files(paths, *, cache_folder=None, threads: int | None = None, progress: bool | None = None,
                label: str = "") -> Check:
    """The bad files among `paths` (see the module's docstring): from this process's memory or `cache_folder`'s
    kept check when the file list (paths, sizes, times) is unchanged, else decoded now (`scan`)."""
    paths = list(paths)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # a network file system answers stats in parallel
        stats = list(pool.map(_stat, paths))
    key = file_list_key(paths, stats)
    check = _MEMORY.get(key) or (cache_folder is not None and _read_cache(cache_folder, key)) or None
    if check is None:
        bad = scan(paths, threads=threads, progress=progress, label=label)
        good_bytes = sum(stat[0] for path, stat in zip(paths, stats) if stat is not None and path not in bad)
        check = Check(key, len(paths), bad, good_bytes)
    return _remember(check)


def record(folder, checks) -> Path | None:
    """Keeps `checks` in `folder` (a workdir) for the next start, and lists their bad files in
    `folder/bad_images.txt` (removed when there are none); returns the list's path, or None."""
    folder = Path(folder)
    for check in checks:
        target = _cache_file(folder, check.key)
        if not target.exists():
            files.atomic_write_json(target, {"files": check.files, "good_bytes": check.good_bytes, "bad": check.bad})
    bad = {path: reason for check in checks for path, reason in check.bad.items()}
    listing = folder / BAD_IMAGES_FILE
    if not bad:
        listing.unlink(missing_ok=True)
        return None
    text = "".join(f"{path}\t{reason}\n" for path, reason in sorted(bad.items()))
    files.atomic_write(listing, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape"))
    return listing
