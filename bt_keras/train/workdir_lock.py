"""One trainer per workdir: `workdir/train.lock`, holding the holder's host, pid and start time.

Two trainers on one workdir would interleave `metrics.jsonl` and overwrite each other's checkpoints, so the chief
of a run takes this lock before it reads or writes anything there, and a second trainer stops at once naming the
holder. The workers of one multi-worker run share the workdir: only the chief locks it.

The lock is an exclusive `flock` on the file, so the kernel releases it when the holder dies in any way (SIGKILL
included): a lock file left by a dead process is simply taken over, and the log says whose it was. The file's
JSON is for people (and the error message). On file systems without `flock` (some network or FUSE mounts) the
file's existence is the lock, created with O_EXCL, and a lock whose holder ran on this host and is gone (its pid
is dead, or now belongs to a process started later) is taken over; a lock from another host then has to be
removed by hand, as the message says.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from absl import logging

_HELD: set[str] = set()  # lock files held by this process (flock does not conflict with itself across threads)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class WorkdirLockedError(RuntimeError):
    """Another trainer holds the workdir."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process `pid` (field 22 of /proc/PID/stat), to tell a reused pid; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the process a lock file names still runs (True when that cannot be told: another host, no pid)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    started = holder.get("process_start")
    return started is None or _process_start(holder["pid"]) in (None, started)


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process (the lock file is empty or unreadable)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started', '?')}{', command: ' + holder['command'] if holder.get('command') else ''}")


class WorkdirLock:
    """An exclusive lock on a workdir. `acquire()` raises WorkdirLockedError if another live process holds it;
    `release()` removes the file (also safe to call twice). Usable as a context manager."""

    def __init__(self, path):
        self.path = Path(path)
        self._key = str(self.path.resolve())
        self._fd: int | None = None

    def _read(self, fd: int | None = None) -> dict:
        try:
            if fd is not None:
                os.lseek(fd, 0, os.SEEK_SET)
                text = os.read(fd, 65536).decode("utf-8")
            else:
                text = self.path.read_text(encoding="utf-8")
            holder = json.loads(text) if text.strip() else {}
            return holder if isinstance(holder, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}

    def _error(self, holder: dict) -> WorkdirLockedError:
        return WorkdirLockedError(
            f"{self.path.parent} is in use by another training run ({_describe(holder)}; lock file {self.path}). "
            f"Wait for it to finish or stop it, or choose another --workdir; if that run is gone, delete "
            f"{self.path}.")

    def _write(self, fd: int) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode("utf-8"))
        os.fsync(fd)

    def _open(self, flags: int) -> int:
        """Opens the lock file without following a symlink (a planted `train.lock -> ~/precious` must not be
        overwritten) and refuses anything but a regular file, naming it and the fix."""
        try:
            fd = os.open(self.path, flags | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.EISDIR) or self.path.is_symlink() or self.path.is_dir():
                raise WorkdirLockedError(
                    f"The lock file {self.path} is a {'symlink' if self.path.is_symlink() else 'folder'}, not a file "
                    "bt_keras wrote; remove it (nothing it points to is touched) and start again.") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise WorkdirLockedError(f"The lock file {self.path} is not a regular file; remove it and start again.")
        return fd

    def acquire(self) -> "WorkdirLock":
        key = self._key
        if key in _HELD:
            raise WorkdirLockedError(
                f"{self.path.parent} is already being trained by this process (another Trainer holds {self.path}); "
                "finish or close() that Trainer first.")
        for _ in range(10):  # retries only when the previous holder removed the file between our open and lock
            fd = self._open(os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise self._error(holder) from None
            except OSError as error:
                os.close(fd)
                if error.errno in _NO_FLOCK:
                    return self._acquire_without_flock(key)
                raise
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:
                os.close(fd)
                continue
            previous = self._read(fd)
            if previous:
                logging.warning("Taking over the lock %s left by %s, which no longer holds it (it was stopped "
                                "without cleaning up).", self.path, _describe(previous))
            self._write(fd)
            self._fd = fd
            _HELD.add(key)
            return self
        raise WorkdirLockedError(f"Could not lock {self.path}: other processes keep replacing it.")

    def _acquire_without_flock(self, key: str) -> "WorkdirLock":
        for _ in range(2):
            try:
                fd = self._open(os.O_RDWR | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                holder = self._read()
                if _alive(holder):
                    raise self._error(holder) from None
                logging.warning("Taking over the stale lock %s left by %s (that process is gone).", self.path,
                                _describe(holder))
                self.path.unlink(missing_ok=True)
                continue
            self._write(fd)
            self._fd = fd
            _HELD.add(key)
            return self
        raise WorkdirLockedError(f"Could not lock {self.path}: other processes keep replacing it.")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()  # while still locked, so no one locks the file we are removing
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the flock
            _HELD.discard(self._key)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
