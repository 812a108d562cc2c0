"""`python -m bt_keras.train` as users run it: checkpoints, resume after SIGKILL, strategies, clear errors.

Most runs use a tiny network on the embedded digits data so each takes seconds; the full quickstart (the README's
main job) runs once, in tests/test_quickstart.py.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import bt_keras  # noqa: F401  (registers the classes saved models need)
from bt_keras import distribute
from bt_keras.train.trainer import NonFiniteLossError, Trainer

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "experiments" / "quickstart.py")
TINY = ["--config.backbone=resnet18", "--config.width_multiplier=0.125", "--config.blocks=(1,1)",
        "--config.projector=64-64", "--config.batch_size=32", "--config.knn.every_epochs=0", "--config.log_every_steps=2"]


def train_command(workdir, *extra, epochs=2, steps=3):
    return [sys.executable, "-m", "bt_keras.train", f"--config={QUICKSTART}", f"--workdir={workdir}",
            f"--config.epochs={epochs}", f"--config.steps_per_epoch={steps}", *TINY, *extra]


def run_cli(args, env=None, timeout=240):
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run(args, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)


def weights(path):
    return keras.models.load_model(path).get_weights()


def max_difference(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def tiny_config(**overrides):
    sys.path.insert(0, str(REPO / "experiments"))
    import quickstart

    config = quickstart.get_config()
    config.update(dict(backbone="resnet18", width_multiplier=0.125, blocks=(1, 1), projector="64-64", batch_size=32,
                       epochs=2, steps_per_epoch=3))
    config.knn.every_epochs = 0
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(train_command(workdir, epochs=4, steps=6))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_training_writes_checkpoints_logs_and_events_then_resumes(uninterrupted, tmp_path):
    workdir = uninterrupted
    for name in ("encoder.keras", "encoder.json", "barlow_twins.keras", "config.json", "metrics.jsonl",
                 "cross_correlation.png", "checkpoints/checkpoint"):
        assert (workdir / name).exists(), name
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "epoch"} <= {line["kind"] for line in lines}
    assert all(np.isfinite(line["loss"]) for line in lines if line["kind"] in ("train", "epoch"))
    assert json.loads((workdir / "encoder.json").read_text())["step"] == 24
    assert tf.train.latest_checkpoint(str(workdir / "checkpoints")).endswith("ckpt-24")

    # Running again with a longer schedule continues from step 24 instead of starting over.
    rerun = tmp_path / "rerun"
    subprocess.run(["cp", "-r", str(workdir), str(rerun)], check=True)
    result = run_cli(train_command(rerun, epochs=5, steps=6))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Finished at step 30" in result.stdout
    assert json.loads((rerun / "encoder.json").read_text())["step"] == 30


@pytest.mark.slow
def test_sigkill_mid_training_resumes_bit_exactly(uninterrupted, tmp_path):
    workdir = tmp_path / "killed"
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(train_command(workdir, epochs=4, steps=6), cwd=REPO, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def latest_step():  # ckpt-0 (the initialisation) is written first; wait for one written by training
        latest = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
        return int(latest.rsplit("-", 1)[1]) if latest else -1

    deadline = time.time() + 180
    while latest_step() < 6 and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (workdir / "encoder.keras").exists()
    # Every checkpoint the index names is complete (data + index files), whatever moment the kill hit.
    state = tf.train.get_checkpoint_state(str(workdir / "checkpoints"))
    for path in state.all_model_checkpoint_paths:
        assert Path(path + ".index").exists() and list(Path(path).parent.glob(Path(path).name + ".data-*"))
    killed_at = int(state.model_checkpoint_path.rsplit("-", 1)[1])
    assert 6 <= killed_at < 24

    result = run_cli(train_command(workdir, epochs=4, steps=6))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Finished at step 24" in result.stdout
    difference = max_difference(weights(uninterrupted / "barlow_twins.keras"), weights(workdir / "barlow_twins.keras"))
    print(f"killed after step {killed_at}; max |w_resumed - w_uninterrupted| = {difference}")
    assert difference == 0.0


@pytest.mark.slow
def test_mirrored_strategy_through_the_cli(tmp_path):
    result = run_cli(train_command(tmp_path, "--strategy=mirrored", "--cpu_devices=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with 2 replica(s)" in result.stderr + result.stdout
    assert "Finished at step 6" in result.stdout


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_local_workers(workdir, count=2, **train_args) -> list[subprocess.Popen]:
    """`count` trainers of one multi-worker run on 127.0.0.1 (TF_CONFIG per task), all writing to `workdir`."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(count)]
    processes = []
    for index in range(count):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": tf_config}
        processes.append(subprocess.Popen(train_command(workdir, "--strategy=multi_worker", **train_args), cwd=REPO,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


@pytest.mark.slow
def test_multi_worker_with_two_local_workers(tmp_path):
    processes = start_local_workers(tmp_path)
    try:
        outputs = [p.communicate(timeout=300) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "Finished at step 6" in out
    chief = weights(tmp_path / "barlow_twins.keras")
    other = weights(tmp_path / ".scratch" / "task1" / "barlow_twins.keras")
    assert max_difference(chief, other) == 0.0


def test_unknown_strategy_is_a_clear_flag_error(tmp_path):
    result = run_cli(train_command(tmp_path, "--strategy=horovod"), timeout=120)
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


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="not writable"):
        Trainer(tiny_config(), blocker / "run", tf.distribute.get_strategy())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    Trainer(tiny_config(epochs=1), tmp_path, tf.distribute.get_strategy()).run()
    good = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    config = tiny_config(epochs=3)
    config.optimizer.lr_weights = 1e30
    config.optimizer.lr_biases = 1e30
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):  # a deliberate change of the resumed run
        Trainer(config, tmp_path, tf.distribute.get_strategy(), allow_config_change=True).run()
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")) == good
    tf.train.Checkpoint().read(good).expect_partial()  # still readable


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


def test_batch_hooks_run_every_step_and_logs_record_every_metric(tmp_path):
    counter = StepCounter()
    Trainer(tiny_config(log_every_steps=2), tmp_path, tf.distribute.get_strategy()).run([counter])
    assert counter.begins == counter.ends == 6 and counter.steps == [1, 2, 3, 4, 5, 6]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["kind"] == "train"]
    assert [line["step"] for line in train] == [2, 4, 6]  # every log_every_steps
    assert {"loss", "on_diagonal", "off_diagonal", "embedding_std", "lr", "images/s"} <= set(train[0])


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
def test_early_stopping_passed_on_the_command_line_stops_training(tmp_path):
    (tmp_path / "my_callbacks.py").write_text(
        "import keras\n\n\ndef early_stopping():\n"
        "    return keras.callbacks.EarlyStopping(monitor='loss', patience=0, min_delta=1e9)\n")
    workdir = tmp_path / "run"
    result = run_cli(train_command(workdir, "--callbacks=my_callbacks:early_stopping", epochs=5, steps=2),
                     env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Finished at step 4" in result.stdout  # epoch 2 of 5: no improvement of 1e9 -> stop
    assert json.loads((workdir / "encoder.json").read_text())["step"] == 4
    assert tf.train.latest_checkpoint(str(workdir / "checkpoints")).endswith("ckpt-4")
    bad = run_cli(train_command(tmp_path / "bad", "--callbacks=no_such_module:thing"))
    assert bad.returncode == 2 and "--callbacks='no_such_module:thing'" in bad.stderr
