"""The workdir lock (bt_keras.train.workdir_lock, issue 15): a second trainer on a workdir stops at once naming the
holder, a lock left by a killed trainer is taken over, planted symlinks and folders are refused, and the workers of
one multi-worker run share their workdir while other trainers stay out.

A trainer that is refused runs the `python -m bt_keras.train` entry point in-process (tests/in_process.py); the
two trainers started together are real processes, and the loser's status 2 is what a shell gets."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bt_keras import paths
from bt_keras.train import workdir_lock
from bt_keras.train.trainer import Trainer
from bt_keras.train.workdir_lock import WorkdirLock, WorkdirLockedError
from tests.helpers import (REPO, SUBPROCESS_SCRIPTS, finish_local_workers, last_error_line, resumed_step,
                           start_local_workers, train_command, trainer)
from tests.in_process import train_in_process

pytestmark = pytest.mark.hostile


def _hold_lock(workdir):
    script = SUBPROCESS_SCRIPTS / "hold_workdir_lock.py"
    process = subprocess.Popen([sys.executable, str(script), str(workdir)], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


@pytest.mark.slow
def test_a_second_trainer_stops_at_once_naming_the_holder(tmp_path, monkeypatch):
    holder = _hold_lock(tmp_path)
    try:
        # "At once": before anything is built or read, checked as such rather than timed (the refusal took 0.18 s
        # and building the tiny run 1.4 s here, too close for a time bound on a loaded machine).
        def built(self, allow_config_change):
            raise AssertionError("the trainer went on to build the run before refusing the locked workdir")

        monkeypatch.setattr(Trainer, "_setup", built)
        with pytest.raises(WorkdirLockedError) as raised:
            trainer(tmp_path)
        message = str(raised.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert str(tmp_path / paths.LOCK_FILE) in message and "another --workdir" in message
        assert not (tmp_path / "checkpoints").exists()

        result = train_in_process(train_command(tmp_path)[3:])
        assert result.returncode == 2
        assert f"pid {holder.pid}" in last_error_line(result.stderr)
    finally:
        holder.communicate(input="", timeout=30)  # closes its stdin: it releases and exits
    assert not (tmp_path / paths.LOCK_FILE).exists()


def test_a_planted_lock_symlink_or_folder_is_refused_and_nothing_is_overwritten(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("precious")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / paths.LOCK_FILE).symlink_to(victim)
    with pytest.raises(WorkdirLockedError, match="is a symlink"):
        WorkdirLock(tmp_path / "a" / paths.LOCK_FILE).acquire()
    assert victim.read_text() == "precious"
    (tmp_path / "b" / paths.LOCK_FILE).mkdir(parents=True)
    with pytest.raises(WorkdirLockedError, match="is a folder"):
        WorkdirLock(tmp_path / "b" / paths.LOCK_FILE).acquire()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_trainer_is_taken_over(tmp_path, caplog):
    holder = _hold_lock(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    lock = tmp_path / paths.LOCK_FILE
    assert json.loads(lock.read_text())["pid"] == holder.pid  # the dead trainer's lock file is still there
    t = trainer(tmp_path, epochs=1, steps_per_epoch=1)
    assert f"Taking over the lock {lock} left by pid {holder.pid}" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    t.run()
    assert not lock.exists()  # released when the run ends


def test_two_trainers_in_one_process_conflict_until_the_first_is_closed(tmp_path):
    first = trainer(tmp_path)
    with pytest.raises(WorkdirLockedError, match="already being trained by this process"):
        trainer(tmp_path)
    first.close()
    assert resumed_step(tmp_path) == 0


def test_without_flock_a_dead_holder_is_stale_and_a_live_one_is_not(tmp_path, monkeypatch, caplog):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(workdir_lock.fcntl, "flock", no_flock)
    path = tmp_path / paths.LOCK_FILE
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}))
    with WorkdirLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"Taking over the stale lock {path} left by pid {dead.pid}" in caplog.text
    assert not path.exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid}))
        with pytest.raises(WorkdirLockedError, match=f"pid {live.pid}"):
            WorkdirLock(path).acquire()
        path.write_text(json.dumps({"host": "another-host", "pid": dead.pid}))  # cannot be told: not taken
        with pytest.raises(WorkdirLockedError, match="another-host"):
            WorkdirLock(path).acquire()
    finally:
        live.kill()
        live.wait()


def _wait_for_holder(path, timeout=120):
    """The lock file's JSON once the chief has written it (it creates the file, locks it, then writes)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.1)
    raise AssertionError(f"no holder was written to {path} in {timeout} s")


@pytest.mark.slow
def test_multi_worker_run_shares_its_workdir_and_still_keeps_others_out(tmp_path):
    """Two workers of one run share the workdir (only the chief locks it); a third trainer is kept out."""
    processes = start_local_workers(tmp_path, epochs=1, steps=4)
    try:
        holder = _wait_for_holder(tmp_path / paths.LOCK_FILE)
        intruder = train_in_process(train_command(tmp_path)[3:])  # a fraction of a second: the run is still on
    finally:
        finish_local_workers(processes, final_step=4)
    assert holder["pid"] == processes[0].pid  # the chief (worker 0) holds the lock, worker 1 does not need it
    assert intruder.returncode == 2 and f"pid {processes[0].pid}" in last_error_line(intruder.stderr)
    assert not (tmp_path / paths.LOCK_FILE).exists()


@pytest.mark.slow
def test_two_trainers_started_together_one_runs_one_stops(tmp_path):
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    processes = [subprocess.Popen(train_command(tmp_path, epochs=1, steps=2), cwd=REPO, env=environment,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in processes]
    codes = sorted(p.returncode for p in processes)
    assert codes == [0, 2], [err[-2000:] for _, err in outputs]
    loser = next(err for p, (_, err) in zip(processes, outputs) if p.returncode == 2)
    assert "is in use by another training run" in last_error_line(loser)
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("start") == 1  # one run's log, not two interleaved
