"""Running `python -m bt_keras.train` again on a finished run (the README: "Run it again and it trains nothing more: it
prints the finished run's last logged metrics"): it restores, checks and prints, and writes nothing; a finished run
whose end was cut short (killed after its last checkpoint) still gets its encoder, baseline table and report.

One tiny finished run (tests.helpers.TINY) with what a run writes at its end switched on: the report and the baseline
table, the kNN monitor on small splits so the table's linear probes take a second, measured every 3 epochs so the
last (second) epoch does not measure it and the final kNN accuracy is the baseline table's. The commands run
in-process (tests/in_process.py): what is tested is what the trainer does, not a fresh process (the quickstart's
rerun, tests/test_quickstart.py, is one).
"""

import json
import os
import re
import shutil

import keras
import pytest
import tensorflow as tf

from bt_keras import paths
from bt_keras.train import baselines
from bt_keras.train.trainer import Trainer
from tests.helpers import tiny_config, train_command
from tests.in_process import train_in_process

pytestmark = pytest.mark.slow  # a training run each

END_OF_RUN = ("--config.report=True", "--config.knn.every_epochs=3", "--config.knn.baselines=True",
              "--config.knn.train_examples=256", "--config.knn.test_examples=128")
# What the run's end writes (Trainer.save_encoder, the baseline table's trained row, the report).
END_FILES = (paths.ENCODER_FILE, paths.ENCODER_METADATA, paths.MODEL_FILE, paths.BASELINES_FILE, paths.REPORT_PICTURE)


def command(workdir) -> list[str]:
    """The tiny run's arguments (after TINY: the end-of-run files on), two epochs of three steps."""
    return train_command(workdir, *END_OF_RUN)[3:]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The finished tiny run (read only: tests work on a `copy`)."""
    workdir = tmp_path_factory.mktemp("rerun") / "run"
    result = train_in_process(command(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert baselines.read(workdir)["rows"][-1]["name"] == "Barlow Twins"
    assert (workdir / paths.REPORT_PICTURE).is_file()
    return workdir


def copy(finished, tmp_path):
    """A copy of the finished run with the same file times (shutil.copy2)."""
    return shutil.copytree(finished, tmp_path / "run")


def files_and_times(folder) -> dict:
    """{relative path: (bytes, modification time in ns)} of every file under `folder`."""
    return {str(p.relative_to(folder)): (p.read_bytes(), os.stat(p).st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def finished_line(stdout: str) -> str:
    return re.search(r"^Finished at step \d+: .*$", stdout, re.M).group(0)


def test_a_finished_runs_rerun_writes_nothing_traces_nothing_and_prints_its_final_metrics(finished, tmp_path,
                                                                                           monkeypatch):
    """The rerun leaves every file as it was (bytes and modification times: no config.json, encoder, baseline table,
    report, metrics line or TensorBoard event written again) and never traces the training step; it prints the last
    epoch's metrics with the kNN accuracy of the final encoder (the baseline table's, which the last epoch did not
    measure), not the one logged at the start of the run."""
    workdir = copy(finished, tmp_path)
    before = files_and_times(workdir)
    traced = []
    trace = Trainer._trace_step
    monkeypatch.setattr(Trainer, "_trace_step", lambda self: traced.append(1) or trace(self))

    result = train_in_process(command(workdir))

    assert result.returncode == 0, result.stderr[-3000:]
    assert not traced
    assert files_and_times(workdir) == before
    line = json.loads(finished_line(result.stdout).split(": ", 1)[1])
    trained = baselines.read(workdir)["rows"][-1]
    assert line["step"] == 6 and "loss" in line
    assert (line["knn_top1"], line["knn_top5"]) == (round(trained["knn_top1"], 5), round(trained["knn_top5"], 5))
    assert f"Resuming from {workdir / 'checkpoints' / 'ckpt-6'} at step 6." in result.stdout


def test_a_finished_run_killed_before_its_end_was_written_writes_it_on_the_rerun(finished, tmp_path):
    """A kill after the last checkpoint, while the baseline table measured the trained encoder: no trained row, no
    report, no encoder. The rerun writes them (the loop's end runs), and its Finished line is the one the rerun of
    the intact run prints: the skipped loop reports what the loop reports."""
    intact = train_in_process(command(copy(finished, tmp_path / "intact")))
    workdir = copy(finished, tmp_path)
    saved = baselines.read(workdir)
    (workdir / paths.BASELINES_FILE).write_text(json.dumps({"step": 0, "rows": saved["rows"][:2]}))
    for name in (paths.ENCODER_FILE, paths.ENCODER_METADATA, paths.MODEL_FILE, paths.REPORT_PICTURE):
        (workdir / name).unlink()

    result = train_in_process(command(workdir))

    assert result.returncode == 0, result.stderr[-3000:]
    assert baselines.read(workdir) == saved  # the same trained row again, at step 6
    assert (workdir / paths.REPORT_PICTURE).is_file() and (workdir / paths.MODEL_FILE).is_file()
    assert json.loads((workdir / paths.ENCODER_METADATA).read_text())["step"] == 6
    assert finished_line(result.stdout) == finished_line(intact.stdout)


def older_than_the_config(workdir, name):
    """Sets `name`'s modification time a second before config.json's."""
    written = (workdir / paths.CONFIG_FILE).stat().st_mtime_ns
    os.utime(workdir / name, ns=(written - 10**9, written - 10**9))


def test_each_missing_end_of_run_file_alone_makes_the_rerun_run_the_loop(finished, tmp_path):
    """What `Trainer._finished_logs` requires, one missing piece at a time (each would be left unwritten if the
    rerun skipped the loop): the encoder of the last step (encoder.json names it; encoder.keras and
    barlow_twins.keras), the report, the baseline table's trained row of the last step, config.json, and end files
    newer than config.json. Extra callbacks keep the loop too (they expect on_train_begin and on_train_end), also
    when they come as a generator, which the check must not use up before the loop gets them."""
    workdir = copy(finished, tmp_path)
    metadata = json.loads((workdir / paths.ENCODER_METADATA).read_text())
    table = baselines.read(workdir)
    damages = {
        "encoder.json of an earlier step": lambda: (workdir / paths.ENCODER_METADATA).write_text(
            json.dumps({**metadata, "step": 3})),
        "no encoder.keras": lambda: (workdir / paths.ENCODER_FILE).unlink(),
        "no barlow_twins.keras": lambda: (workdir / paths.MODEL_FILE).unlink(),
        "no report.png": lambda: (workdir / paths.REPORT_PICTURE).unlink(),
        "no trained row": lambda: (workdir / paths.BASELINES_FILE).write_text(
            json.dumps({**table, "rows": table["rows"][:2]})),
        "a table of an earlier step": lambda: (workdir / paths.BASELINES_FILE).write_text(
            json.dumps({**table, "step": 3})),
        # A later start rewrote config.json (a harmless change) and was killed before its end was written again.
        **{f"{name} older than config.json": (lambda name=name: older_than_the_config(workdir, name))
           for name in (paths.ENCODER_METADATA, paths.REPORT_PICTURE, paths.BASELINES_FILE)},
        "no config.json": lambda: (workdir / paths.CONFIG_FILE).unlink(),
    }
    config = tiny_config(report=True, log_every_steps=2)  # what command() asks for, as a config
    config.knn.update(every_epochs=3, baselines=True, train_examples=256, test_examples=128)
    t = Trainer(config, workdir, tf.distribute.get_strategy())
    try:
        assert t.config_changes == [] and t._finished_logs() is not None  # the intact run: the rerun skips the loop
        assert t._finished_logs([keras.callbacks.TerminateOnNaN()]) is None
        for name, damage in damages.items():
            damage()
            assert t._finished_logs() is None, name
            for end_file in (*END_FILES, paths.CONFIG_FILE):  # the intact files again, for the next one
                shutil.copy2(finished / end_file, workdir / end_file)
        seen = []
        recorder = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: seen.append("begin"),
                                                  on_train_end=lambda logs: seen.append("end"))
        t.run(callback for callback in [recorder])
        assert seen == ["begin", "end"]
    finally:
        t.close()
