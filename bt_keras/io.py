"""File writes that never leave half a file: every artefact of a run or an export is written through here.

`atomic_write(path, write_fn)` lets `write_fn` fill a temporary file in the same folder and renames it into place, so a
run killed at any moment leaves either the old file or the new one. The temporary file gets the mode a plain open()
gives (0666 minus the umask), not mkstemp's private 0600, so a serving container or a colleague running as another
user can read what lands at `path`.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


def atomic_write(path: str | os.PathLike, write_fn, suffix: str = "") -> None:
    """Calls `write_fn(temporary_path)` and renames the result to `path` (atomic on POSIX file systems)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp{suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write_fn(str(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str | os.PathLike, data) -> None:
    """`data` as indented, key-sorted JSON at `path`, written atomically."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")

    atomic_write(path, write)


def read_json(path: str | os.PathLike, what: str = "file"):
    """The JSON at `path`; a ValueError naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{what} {path} is not valid JSON ({error}); restore it or remove it.") from None


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says the disk or quota is full: OSError ENOSPC/EDQUOT, or a TensorFlow
    error whose message carries the OS's words (TF reports a full disk on save as ResourceExhaustedError, a name
    it also uses for running out of memory, so the type alone does not tell)."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(error) for words in ("No space left on device", "Disk quota exceeded")):
            return True
        error = error.__cause__ or error.__context__
    return False
