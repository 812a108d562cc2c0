"""A training command on a really full file system, run by tests/train/test_trainer.py inside a user+mount namespace
(`unshare --user --map-root-user --mount`), where mounting a small tmpfs needs no root on the host.

    full_disk.py RUN MOUNT OUT -- COMMAND...

Mounts a 2 MiB tmpfs on MOUNT, copies the finished run RUN to MOUNT/run and fills the disk to 40 KiB of free space
(a checkpoint needs ~95), runs COMMAND, copies the run out to OUT/after_failure, frees the space, runs COMMAND again
and copies the run to OUT/after_resume. OUT/results.json holds both runs' exit codes and output. The mount ends with
the namespace, so the test reads only what is copied out.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

FREE_LEFT = 40 * 1024


def main() -> None:
    run, mount, out = (Path(arg) for arg in sys.argv[1:4])
    assert sys.argv[4] == "--", sys.argv
    command = sys.argv[5:]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    workdir = mount / "run"
    shutil.copytree(run, workdir)
    (mount / "filler").write_bytes(b"\0" * (shutil.disk_usage(mount).free - FREE_LEFT))
    results = []
    for state in ("after_failure", "after_resume"):
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
        results.append({"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr})
        shutil.copytree(workdir, out / state)
        (mount / "filler").unlink(missing_ok=True)
    (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
