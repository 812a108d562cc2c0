"""The training loop (bt_keras.train.trainer) and `python -m bt_keras.train` as users run it: checkpoints, resume after
SIGKILL, strategies, clear errors, the Keras callback protocol, and a full disk.

Most runs use a tiny network on the embedded digits data so each takes seconds; the full quickstart (the README's
main job) runs once, in tests/test_quickstart.py. A fresh `python -m bt_keras.train` process is started where the
point is one (a signal, SIGKILL, the exit status of a poisoned update, the installed script, a full disk); the
command's other behaviours run its entry point in-process (tests/in_process.py), without a TensorFlow import each.
The tiny runs draw no figures (tests.helpers.TINY); the uninterrupted run, which checks them, asks for them.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import bt_keras  # noqa: F401  (registers the classes saved models need)
from bt_keras import checkpoints, distribute, paths
from bt_keras.train import resume
from bt_keras.train.trainer import DiskFullError, NonFiniteLossError, Trainer
from tests.helpers import (PICTURES, REPO, installed_script, last_error_line, resumed_step, run_cli, tiny_config,
                           train_command, trainer, wait_for_logged_step)
from tests.in_process import train_in_process

def weights(path):
    return keras.models.load_model(path).get_weights()


def max_difference(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    # The installed bt-keras-train script (the other runs here use `python -m bt_keras.train`): one real use of it.
    result = run_cli([installed_script("bt-keras-train"), *train_command(workdir, *PICTURES, epochs=4, steps=6)[3:]])
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_training_writes_checkpoints_logs_and_events_then_resumes(uninterrupted, tmp_path):
    workdir = uninterrupted
    for name in ("encoder.keras", "encoder.json", "barlow_twins.keras", "config.json", "metrics.jsonl",
                 "cross_correlation.png", "report.png", "checkpoints/checkpoint"):
        assert (workdir / name).exists(), name
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "epoch"} <= {line["kind"] for line in lines}
    assert all(np.isfinite(line["loss"]) for line in lines if line["kind"] in ("train", "epoch"))
    assert json.loads((workdir / "encoder.json").read_text())["step"] == 24
    assert tf.train.latest_checkpoint(str(workdir / "checkpoints")).endswith("ckpt-24")

    # Running again with a longer schedule continues from step 24 instead of starting over (the command in-process).
    rerun = tmp_path / "rerun"
    shutil.copytree(workdir, rerun)
    result = train_in_process(train_command(rerun, epochs=5, steps=6)[3:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Finished at step 30" in result.stdout
    assert json.loads((rerun / "encoder.json").read_text())["step"] == 30


def _resume_to_the_end_and_compare(workdir, uninterrupted, label: str):
    """Runs the 4 x 6-step command again in `workdir` and checks it ends equal to the uninterrupted run, bit for bit;
    returns the resumed run's result."""
    result = run_cli(train_command(workdir, epochs=4, steps=6))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Finished at step 24" in result.stdout
    difference = max_difference(weights(uninterrupted / "barlow_twins.keras"), weights(workdir / "barlow_twins.keras"))
    print(f"{label}; max |w_resumed - w_uninterrupted| = {difference}")
    assert difference == 0.0
    return result


def test_a_run_with_the_picture_and_the_report_off_draws_neither(finished_run):
    """config.picture_every_epochs=0 and config.report=False (the tiny runs' settings): no picture of C, none of its
    data, no report; the run itself is whole."""
    for name in (paths.CORRELATION_PICTURE, paths.CORRELATION_DATA, paths.CORRELATION_INFO, paths.REPORT_PICTURE):
        assert not (finished_run / name).exists(), name
    assert (finished_run / "encoder.keras").exists()


def test_unknown_strategy_is_a_clear_flag_error(tmp_path):
    result = train_in_process(train_command(tmp_path, "--strategy=horovod")[3:])
    assert result.returncode != 0
    assert "--strategy" in result.stderr and "mirrored" in result.stderr


def test_tpu_requested_where_none_exists(tmp_path):
    with pytest.raises(RuntimeError, match="no TPU found"):
        distribute.make_strategy("tpu")


def test_batch_not_divisible_by_replicas_fails_before_building(tmp_path):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1", "/cpu:2"])
    with pytest.raises(ValueError, match="not divisible by the number of replicas \\(3\\)"):
        Trainer(tiny_config(batch_size=32), tmp_path, strategy)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_keep_checkpoints_keeps_ckpt_0_the_initialisation(tmp_path):
    """keep_checkpoints counts the newest checkpoints; ckpt-0 (the random-initialisation baseline) is kept besides
    them, on disk and in the index, and the run still resumes from its newest."""
    trainer(tmp_path, epochs=3, keep_checkpoints=1).run()
    assert [p.name for p in paths.latest_checkpoints(tmp_path)] == ["ckpt-0", "ckpt-9"]
    state = tf.train.get_checkpoint_state(str(tmp_path / "checkpoints"))
    assert [Path(p).name for p in state.all_model_checkpoint_paths] == ["ckpt-0", "ckpt-9"]
    assert Path(state.model_checkpoint_path).name == "ckpt-9"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(("ckpt-3", "ckpt-6"))]
    assert resumed_step(tmp_path, epochs=4, keep_checkpoints=1) == 9

@pytest.mark.hostile
def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="not writable"):
        Trainer(tiny_config(), blocker / "run", tf.distribute.get_strategy())


@pytest.mark.slow
def test_a_non_finite_stop_keeps_the_last_good_checkpoint_and_puts_its_recipe_back(run_copy):
    """A resumed start with changed values (here a learning rate that diverges) that goes non-finite before saving
    anything stops with NonFiniteLossError naming the last good checkpoint, which stays the latest and readable; and,
    under allow_config_change, config.json is put back as the config of that checkpoint, so the original recipe
    resumes it (not refused as a changed config). (One diverging run checks both; they were two tests of the same
    scenario, each training its own first epoch instead of reading conftest.py's finished run.)"""
    good = tf.train.latest_checkpoint(str(run_copy / "checkpoints"))
    before = (run_copy / "config.json").read_bytes()
    diverging = tiny_config(epochs=3)
    diverging.optimizer.lr_weights = diverging.optimizer.lr_biases = 1e30
    with pytest.raises(NonFiniteLossError, match="last good checkpoint") as raised:
        Trainer(diverging, run_copy, tf.distribute.get_strategy(), allow_config_change=True).run()
    assert good.endswith("ckpt-6") and tf.train.latest_checkpoint(str(run_copy / "checkpoints")) == good
    tf.train.Checkpoint().read(good).expect_partial()  # still readable
    assert resumed_step(run_copy) == 6  # the original recipe (finished_run's), no --allow_config_change
    assert "is again the config that wrote ckpt-6" in str(raised.value) and "\n" not in str(raised.value)
    assert (run_copy / "config.json").read_bytes() == before
    recorded, reverted = [json.loads(line) for line in (run_copy / "config_changes.jsonl").read_text().splitlines()]
    assert reverted["changes"]["optimizer.lr_weights"] == {"old": 1e30, "new": recorded["changes"][
        "optimizer.lr_weights"]["old"]} and "ckpt-6" in reverted["reverted"]


STOP_WHEN_BAD = """import keras, numpy as np


class StopWhenBad(keras.callbacks.Callback):
    \"\"\"Stops the run at the first step whose update left a non-finite weight (what EarlyStopping may do there).\"\"\"

    def on_train_batch_end(self, batch, logs=None):
        if not all(np.all(np.isfinite(np.asarray(v))) for v in self.model.trainable_variables):
            print("StopWhenBad: stopping at step", int(logs["step"]), flush=True)
            self.model.stop_training = True


def callback():
    return StopWhenBad()
"""


def all_finite_checkpoint(path) -> bool:
    reader = tf.train.load_checkpoint(path)
    return all(np.all(np.isfinite(reader.get_tensor(name))) for name, dtype in reader.get_variable_to_dtype_map().items()
               if dtype.is_floating)


@pytest.mark.slow
@pytest.mark.hostile
def test_an_update_that_poisons_the_weights_right_before_a_save_is_never_saved(run_copy, tmp_path):
    """The loss of a step is computed before its update: checking the losses alone lets the step whose update turns
    the weights to NaN through when a save follows it at once (here a callback stops the run there; the end of an
    epoch or of the run does the same). The weights' own all-finite check stops it: exit 3, one line, nothing written."""
    (tmp_path / "stop_when_bad.py").write_text(STOP_WHEN_BAD)
    before = {name: (run_copy / name).read_bytes() for name in ("encoder.keras", "encoder.json", "barlow_twins.keras")}
    # No logging step reads the flag before the save: only the save's own check stands in the way.
    result = run_cli(train_command(run_copy, "--config.optimizer.eta=1e8", "--allow_config_change",
                                   "--config.log_every_steps=1000", "--callbacks=stop_when_bad:callback",
                                   epochs=6, steps=3),
                     env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-3000:]
    line = last_error_line(result.stderr)
    bad_step = int(re.search(r"The update of step (\d+) made the weights non-finite", line).group(1))
    stopped = re.search(r"StopWhenBad: stopping at step (\d+)", result.stdout)
    assert bad_step % 3 == 0 or int(stopped.group(1)) == bad_step, result.stdout  # an epoch's end, or the callback
    assert (result.stdout + result.stderr).count("made the weights non-finite") == 1  # said once
    # Nothing non-finite was written, the previous artefacts are byte for byte what they were, and the checkpoint the
    # line names is the latest, from before the bad step, and where the next start resumes.
    state = tf.train.get_checkpoint_state(str(run_copy / "checkpoints"))
    good = state.model_checkpoint_path
    good_step = int(good.rsplit("-", 1)[1])
    assert "kernel" in line and f"checkpoint ({good})" in line and 6 <= good_step < bad_step, line
    assert not list((run_copy / "checkpoints").glob(f"ckpt-{bad_step}*"))
    assert all(all_finite_checkpoint(path) for path in state.all_model_checkpoint_paths)
    assert {name: (run_copy / name).read_bytes() for name in before} == before
    assert resumed_step(run_copy, allow_config_change=True) == good_step


@pytest.mark.slow
def test_a_non_finite_loss_is_named_as_the_loss(tmp_path):
    config = tiny_config(epochs=1, steps_per_epoch=4, log_every_steps=1)
    config.optimizer.lr_weights = config.optimizer.lr_biases = 1e30
    with pytest.raises(NonFiniteLossError) as error:
        Trainer(config, tmp_path, tf.distribute.get_strategy()).run()
    message = str(error.value)
    assert re.search(r"The (loss became non-finite|update of step \d+ made the weights non-finite)", message), message
    assert "ckpt-0" in message and "\n" not in message


# ---------------------------------------------------------------------------------------- SIGTERM and SIGINT


# 0.25 s a step (a callback; the training is the same): a signal sent after step 8 lands before step 18, and a kill
# after a checkpoint of the resumed run lands before its end, on a loaded machine too.
QUARTER_SECOND_STEPS = "--callbacks=tests.subprocess_scripts.slow_steps:make"


def start_training(workdir, *extra, epochs=4, steps=6, env=None):
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.Popen(train_command(workdir, *extra, epochs=epochs, steps=steps), cwd=REPO,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def latest_checkpoint_step(workdir) -> int:
    latest = tf.train.latest_checkpoint(str(Path(workdir) / "checkpoints"))
    return int(latest.rsplit("-", 1)[1]) if latest else -1


def _assert_complete_checkpoints(workdir):
    """Every checkpoint the index names is complete (data + index files), whatever moment a kill hit."""
    state = tf.train.get_checkpoint_state(str(workdir / "checkpoints"))
    for path in state.all_model_checkpoint_paths:
        assert Path(path + ".index").exists() and list(Path(path).parent.glob(Path(path).name + ".data-*"))


@pytest.mark.slow
@pytest.mark.hostile
def test_sigterm_then_sigkill_then_resume_ends_bit_exactly_as_the_uninterrupted_run(uninterrupted, tmp_path):
    """One 4 x 6-step run, stopped twice: a SIGTERM (exit 143: the step in flight finishes, its checkpoint is saved,
    one line says so), then its resumed run is SIGKILLed after it wrote a checkpoint of its own (every checkpoint
    left complete), then resumed to the end: the weights equal the uninterrupted run's bit for bit, which only holds
    if both resumes were exact. (These were two runs of the uninterrupted schedule, each interrupted once and resumed;
    one chain makes the same checks with one process less.)"""
    workdir = tmp_path / "preempted"
    process = start_training(workdir, QUARTER_SECOND_STEPS)
    # Past the epoch-end checkpoint ckpt-6.
    assert wait_for_logged_step(workdir, 8, [process]), "the run ended before it could be signalled"
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    said = [line for line in (out + err).splitlines() if "Interrupted" in line]
    assert len(said) == 1, out + err
    step = int(re.search(r"Interrupted \(SIGTERM\) at step (\d+): checkpoint ckpt-\1 saved; run the same command "
                         r"to resume\.", said[0]).group(1))
    assert latest_checkpoint_step(workdir) == step and 8 <= step < 18  # an epoch-end checkpoint is left to reach
    assert not (workdir / "encoder.keras").exists()  # the run is not over

    # Resumed, then killed once it has saved a checkpoint of its own (ckpt-0 of the first start is long written).
    process = start_training(workdir, QUARTER_SECOND_STEPS)
    deadline = time.time() + 180
    while latest_checkpoint_step(workdir) <= step and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert f"Resuming from {workdir / 'checkpoints' / f'ckpt-{step}'} at step {step}." in out
    assert not (workdir / "encoder.keras").exists()
    _assert_complete_checkpoints(workdir)
    killed_at = latest_checkpoint_step(workdir)
    assert step < killed_at < 24

    result = _resume_to_the_end_and_compare(workdir, uninterrupted, f"SIGTERM after step {step}, SIGKILL after "
                                                                    f"step {killed_at}")
    assert f"Resuming from {workdir / 'checkpoints' / f'ckpt-{killed_at}'} at step {killed_at}." in result.stdout


@pytest.mark.slow
@pytest.mark.hostile
def test_sigint_saves_the_step_and_exits_130_without_a_traceback(tmp_path):
    process = start_training(tmp_path, epochs=2, steps=40)
    assert wait_for_logged_step(tmp_path, 4, [process]), "the run ended before it could be signalled"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    step = int(re.search(r"Interrupted \(SIGINT\) at step (\d+): checkpoint ckpt-\1 saved", err).group(1))
    assert latest_checkpoint_step(tmp_path) == step >= 4
    assert all_finite_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "checkpoints")))


SLOW_STEPS = """import time, keras


class SlowSteps(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if int(logs["step"]) >= 2:
            time.sleep(2)


def callback():
    return SlowSteps()
"""


@pytest.mark.slow
@pytest.mark.hostile
def test_a_second_sigint_exits_at_once_without_saving(tmp_path):
    (tmp_path / "slow_steps.py").write_text(SLOW_STEPS)
    workdir = tmp_path / "run"
    process = start_training(workdir, "--callbacks=slow_steps:callback", epochs=2, steps=40,
                             env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert wait_for_logged_step(workdir, 2, [process]), "the run ended early"  # now in a 2 s batch end
    process.send_signal(signal.SIGINT)
    notice = ""
    while "Ctrl-C again" not in notice and process.poll() is None:  # the first one is being handled
        notice = process.stderr.readline()
    assert "Ctrl-C again" in notice, "no notice of the first SIGINT"
    process.send_signal(signal.SIGINT)
    sent = time.time()
    out, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGINT and time.time() - sent < 1.5, (process.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert latest_checkpoint_step(workdir) == 0  # only the initialisation: nothing of the interrupted step
    assert not list((workdir / "checkpoints").glob("*temp*")) and not (workdir / "encoder.keras").exists()


# ------------------------------------------------------------------------------------ the Keras callback protocol


class StepCounter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.begins, self.ends, self.steps = 0, 0, []

    def on_train_batch_begin(self, batch, logs=None):
        self.begins += 1

    def on_train_batch_end(self, batch, logs=None):
        self.ends += 1
        self.steps.append(int(logs["step"]))


@pytest.mark.slow
def test_batch_hooks_run_every_step_and_logs_record_every_metric(tmp_path):
    counter = StepCounter()
    Trainer(tiny_config(log_every_steps=2), tmp_path,
            tf.distribute.get_strategy()).run([counter])
    assert counter.begins == counter.ends == 6 and counter.steps == [1, 2, 3, 4, 5, 6]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["kind"] == "train"]
    assert [line["step"] for line in train] == [2, 4, 6]  # every log_every_steps
    assert {"loss", "on_diagonal", "off_diagonal", "embedding_std", "lr", "images/s"} <= set(train[0])


@pytest.mark.slow
def test_terminate_on_nan_stops_at_the_first_bad_step(tmp_path):
    """Without it the loop notices a NaN on the next logging step; with it, at once (model.stop_training)."""
    def nan_config():
        config = tiny_config(epochs=1, steps_per_epoch=8, log_every_steps=1000)
        config.optimizer.lr_weights = config.optimizer.lr_biases = 1e30
        return config

    late, early = StepCounter(), StepCounter()
    with pytest.raises(NonFiniteLossError) as late_error:
        Trainer(nan_config(), tmp_path / "late", tf.distribute.get_strategy()).run([late])
    with pytest.raises(NonFiniteLossError) as early_error:
        Trainer(nan_config(), tmp_path / "early", tf.distribute.get_strategy()).run(
            [early, keras.callbacks.TerminateOnNaN()])
    bad_step = int(re.search(r"at step (\d+)", str(early_error.value)).group(1))
    assert str(late_error.value).count(f"at step {bad_step}") == 1  # the same first bad step, found later
    # Without it: found at the epoch's end (its last step raises before its batch end); with it: at the bad step.
    assert late.ends == 7 and early.ends == bad_step < 7, (late.ends, early.ends, bad_step)


@pytest.mark.slow
def test_early_stopping_passed_on_the_command_line_stops_training(tmp_path, monkeypatch):
    """The command (in-process) loads a callback module from the path and the loop obeys its stop."""
    (tmp_path / "my_callbacks.py").write_text(
        "import keras\n\n\ndef early_stopping():\n"
        "    return keras.callbacks.EarlyStopping(monitor='loss', patience=0, min_delta=1e9)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # what PYTHONPATH does for the command
    workdir = tmp_path / "run"
    result = train_in_process(train_command(workdir, "--callbacks=my_callbacks:early_stopping", epochs=5,
                                            steps=2)[3:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Finished at step 4" in result.stdout  # epoch 2 of 5: no improvement of 1e9 -> stop
    assert json.loads((workdir / "encoder.json").read_text())["step"] == 4
    assert tf.train.latest_checkpoint(str(workdir / "checkpoints")).endswith("ckpt-4")
    bad = train_in_process(train_command(tmp_path / "bad", "--callbacks=no_such_module:thing")[3:])
    assert bad.returncode == 2 and "--callbacks='no_such_module:thing'" in bad.stderr


# ----------------------------------------------------------------------------------------------- a full disk


@pytest.mark.slow
@pytest.mark.hostile
def test_disk_full_on_save_keeps_the_previous_checkpoint(run_copy, monkeypatch):
    """In-process: the checkpoint save fails as TensorFlow fails on a full disk, after leaving its temp folder."""
    folder = run_copy / "checkpoints"
    t = trainer(run_copy, epochs=3)

    def full_disk_save(checkpoint_number=None, **kwargs):
        (folder / f"ckpt-{checkpoint_number}_temp").mkdir()
        (folder / f"ckpt-{checkpoint_number}.data-00000-of-00001").write_bytes(b"partial")
        raise tf.errors.ResourceExhaustedError(None, None, f"{folder}/ckpt-9_temp/part-00000: No space left on device")

    monkeypatch.setattr(t.manager, "save", full_disk_save)
    with pytest.raises(DiskFullError) as raised:
        t.run()
    message = str(raised.value)
    assert f"--workdir={run_copy}" in message and "ckpt-6, is intact" in message and "\n" not in message
    assert not list(folder.glob("ckpt-9*"))  # no half-written checkpoint left
    assert tf.train.latest_checkpoint(str(folder)).endswith("ckpt-6")
    checkpoints.verify(folder / "ckpt-6")
    assert not (run_copy / paths.LOCK_FILE).exists()


@pytest.mark.hostile
def test_disk_full_on_config_json_is_a_disk_full_error(run_copy, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    t = trainer(run_copy, epochs=3)
    monkeypatch.setattr(resume.files, "atomic_write_json", full)
    with pytest.raises(DiskFullError, match="No space left on the disk of --workdir"):
        t.run()


@pytest.mark.slow
@pytest.mark.hostile
def test_cli_on_a_really_full_disk_is_one_line_exit_2_and_resumes_after(finished_run, tmp_path):
    """On a real full file system, a 2 MiB tmpfs in a user+mount namespace (no root needed; see
    tests/subprocess_scripts/full_disk.py): the run fails saving ckpt-9, says so in one line, leaves ckpt-6 intact and
    nothing half-written, and resumes from ckpt-6 once space is freed."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to mount a small file system without root")
    mount, out = tmp_path / "small_disk", tmp_path / "states"
    mount.mkdir()
    workdir = mount / "run"
    namespace = ["unshare", "--user", "--map-root-user", "--mount"]
    probe = subprocess.run([*namespace, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                           capture_output=True, text=True)
    if probe.returncode != 0:  # user namespaces, or mounting in them, turned off by the kernel or a container
        pytest.skip(f"cannot mount a tmpfs in a user+mount namespace here: {probe.stderr.strip()}")
    script = [sys.executable, str(REPO / "tests" / "subprocess_scripts" / "full_disk.py"), str(finished_run),
              str(mount), str(out), "--", *train_command(workdir, epochs=3)]
    process = subprocess.Popen([*namespace, *script], cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the training runs inside too
            process.wait()
    assert process.returncode == 0, stderr[-3000:]
    failed, resumed = json.loads((out / "results.json").read_text())

    assert failed["returncode"] == 2, failed["stderr"][-3000:]
    line = last_error_line(failed["stderr"])
    assert f"--workdir={workdir}" in line and "No space left" in line and "ckpt-6, is intact" in line
    after = out / "after_failure"
    assert [p.name for p in paths.latest_checkpoints(after)][-1] == "ckpt-6"
    state = tf.train.get_checkpoint_state(str(after / "checkpoints"))  # the index resume reads, whole
    assert state.model_checkpoint_path.endswith("ckpt-6"), state
    assert not list((after / "checkpoints").glob("ckpt-9*")), sorted(p.name for p in (after / "checkpoints").iterdir())
    checkpoints.verify(after / "checkpoints" / "ckpt-6")
    assert not list(after.glob(".*.tmp*"))  # no half-written artefact either

    assert resumed["returncode"] == 0, resumed["stderr"][-3000:]
    assert re.search(r"^Resuming from .*ckpt-6 at step 6\.$", resumed["stdout"], re.M), resumed["stdout"]
    assert "Finished at step 9" in resumed["stdout"]
    assert [p.name for p in paths.latest_checkpoints(out / "after_resume")][-1] == "ckpt-9"
