"""File writes that never leave half a file: every artefact of a run or an export is written through here.

`atomic_write(path, write_fn)` lets `write_fn` fill a temporary file in the same folder and renames it into place, so a
run killed at any moment leaves either the old file or the new one. The temporary file gets the mode a plain open()
gives (0666 minus the umask), not mkstemp's private 0600, so a serving container or a colleague running as another
user can read what lands at `path`.

`share_tree(folder)` does the same for a folder made by `tempfile.mkdtemp` (0700) before it is renamed into place:
every folder 0777 and every file 0666 less the umask, as if created in place (the SavedModel export's version
folder, which a TF Serving container running as another user must read).
"""

from __future__ import annotations

import json
import os
import re
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

def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc/self/status, kernel >= 4.7);
    elsewhere set and restored at once (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^Umask:\s*([0-7]+)", f.read(), re.MULTILINE)
        if match:
            return int(match.group(1), 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_tree(top) -> None:
    """chmod `top` and everything under it (symlinks are left alone): folders 0777 & ~umask, files 0666 & ~umask."""
    mask = current_umask()
    folder_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    os.chmod(top, folder_mode)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, folder_mode)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)
