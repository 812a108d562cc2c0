"""Listing the files under a folder that may hold symlinks, each real directory entered once, each file listed once.

`os.walk(top, followlinks=True)` follows a link to an ancestor for ever: a class folder holding `loop -> .` makes a
scan grow without end, and a link to itself that the OS stops resolving after ~40 levels (ELOOP) still lists every
image dozens of times. Here a directory is entered only if its identity (st_dev, st_ino of the resolved
directory) is new, and a file is listed only if the identity of what it resolves to is new, so symlinked folders and
files (and hard links) count once, in the first place the sorted walk meets them.

    seen = FolderWalk()
    for name in ("cat", "dog"):
        files = seen.files(root / name)    # sorted walk; paths as reached (through the links)
    seen.skipped                           # files / directories left out because they were already seen
"""

from __future__ import annotations

import os


class FolderWalk:
    """Remembers the real directories and files met so far, across several `files` calls."""

    def __init__(self):
        self._dirs: set[tuple[int, int]] = set()
        self._files: set[tuple[int, int]] = set()
        self.skipped = 0

    @staticmethod
    def _identity(path: str):
        try:
            st = os.stat(path)  # follows symlinks
        except OSError:
            return None  # a dangling link or an unreadable entry: listed as is, its reader reports it
        return st.st_dev, st.st_ino

    def _new(self, seen: set, path: str) -> bool:
        identity = self._identity(path)
        if identity is None:
            return True
        if identity in seen:
            self.skipped += 1
            return False
        seen.add(identity)
        return True

    def files(self, top) -> list[str]:
        """Paths of the files under `top` (following symlinks), in sorted order, leaving out what was seen."""
        top = os.fspath(top)
        if not self._new(self._dirs, top):
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            dirnames[:] = [d for d in sorted(dirnames) if self._new(self._dirs, os.path.join(dirpath, d))]
            found += [path for path in (os.path.join(dirpath, f) for f in sorted(filenames))
                      if self._new(self._files, path)]
        return found
