"""Probe for tests/train/test_workdir_lock.py: holds a workdir's training lock like a running trainer would.

    python tests/subprocess_scripts/hold_workdir_lock.py WORKDIR

Takes `WORKDIR/train.lock` with bt_keras.train.workdir_lock, prints "locked" (one line, flushed) and sleeps until it is
killed or its stdin closes, so a test can start a second trainer against a live holder, or SIGKILL it to leave a
stale lock behind.
"""

import sys
from pathlib import Path

from bt_keras import paths
from bt_keras.train.workdir_lock import WorkdirLock


def main() -> None:
    workdir = Path(sys.argv[1])
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir / paths.LOCK_FILE).acquire()
    print("locked", flush=True)
    sys.stdin.read()  # returns when the test closes our stdin
    lock.release()


if __name__ == "__main__":
    main()
