"""The trainer's input sharding and gradient scaling under `--strategy=mirrored` and `--strategy=multi_worker`, as
users run them: every step of the distributed run equals one device training on the joined per-replica batches.

How: the distributed run's global batch of step s is the concatenation of what each replica read: with one input
pipeline for 2 replicas (mirrored), pipeline batches 2s and 2s + 1; with one pipeline per worker (multi-worker), batch
s of each worker's shard. The test rebuilds those batches with the trainer's own `_dataset_fn` and a
`tf.distribute.InputContext` of the same shape, joins them, and trains an in-process trainer on ONE device on exactly
those batches. Its logged losses (running means, as the distributed run logs them) must equal the distributed run's,
step by step, and its final weights the run's final weights. A replica reading the wrong shard or the wrong batch
(e.g. a resume that starts at `start_step` instead of `start_step * replicas_per_pipeline`), or gradients summed or
averaged once too often, changes the losses from the second step on by far more than the float32 round-off allowed
here (the sums run in another order on 2 replicas).
"""

import json
import math
import os
import re
import signal
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf

from bt_keras import paths
from bt_keras.train.trainer import Trainer
from tests.helpers import (REPO, finish_local_workers, last_error_line, run_cli, start_local_workers, tiny_config,
                           train_command, train_lines, trainer, wait_for_logged_step)

pytestmark = pytest.mark.slow  # a distributed run in subprocesses, and its one-device replay

# The float32 round-off of 2 replicas (sums in another order) grows over the steps, most after the learning rate's
# warm-up: measured 7e-6 at step 1, 7e-5 by step 6, 3.5e-3 by step 9. The bugs this test is for change the losses by
# far more (measured): the resumed pipeline at batch 6 instead of 12, 9-21% from step 7; a second input shard in
# place of the one pipeline, 3-17% from step 1; the replicas' gradients summed without dividing by 2, 6-7% from
# step 4.
RELATIVE = 1e-2
FIRST_STEP = 1e-4  # before any update only the summation order differs


def joined_batches(workdir, pipelines: int, replicas: int, steps: int) -> list:
    """The global batch of each of `steps` steps when `pipelines` input pipelines feed `replicas` replicas, built with
    the trainer's own dataset function (tiny_config, as `train_command` runs it) and joined in replica order."""
    reader = trainer(workdir)
    try:
        streams = [iter(reader._dataset_fn(tf.distribute.InputContext(pipelines, index, replicas)))
                   for index in range(pipelines)]
        per_pipeline = replicas // pipelines
        batches = []
        for _ in range(steps):
            parts = [next(stream) for stream in streams for _ in range(per_pipeline)]
            batches.append(tf.nest.map_structure(lambda *xs: tf.concat(xs, axis=0), *parts))
        return batches
    finally:
        reader.close()


def one_device_replay(workdir, batches, epochs: int, warmup_epochs=None, **overrides):
    """An in-process one-device trainer of tiny_config(epochs, **overrides) trained on `batches` (one per step); its
    workdir."""
    config = tiny_config(epochs=epochs, log_every_steps=1, **overrides)
    if warmup_epochs is not None:
        config.optimizer.warmup_epochs = warmup_epochs
    replay = Trainer(config, workdir, tf.distribute.get_strategy())
    assert len(batches) == replay.total_steps
    stacked = tf.nest.map_structure(lambda *xs: tf.stack(xs), *batches)
    replay.iterator = iter(tf.data.Dataset.from_tensor_slices(stacked))
    replay.run()
    return workdir


def assert_same_steps(distributed, replay, kinds=("train", "epoch")):
    """Equal logged losses step by step (one train line per step; the epoch lines of `kinds` too) and equal final
    weights, to float32 round-off."""
    ran, replayed = ([line for line in train_lines(d) if line["kind"] in kinds] for d in (distributed, replay))
    # A step logged again after a kill counts once, as the resumed run logged it.
    ran = list({(line["kind"], line["step"]): line for line in ran}.values())
    assert [(line["kind"], line["step"]) for line in ran] == [(line["kind"], line["step"]) for line in replayed]
    losses = np.array([line["loss"] for line in ran]), np.array([line["loss"] for line in replayed])
    worst = float(np.max(np.abs(losses[0] - losses[1]) / np.abs(losses[1])))
    print(f"losses per step {np.round(losses[1], 4).tolist()}; worst relative difference {worst:.1e}")
    np.testing.assert_allclose(losses[0][0], losses[1][0], rtol=FIRST_STEP)
    np.testing.assert_allclose(losses[0], losses[1], rtol=RELATIVE)
    assert np.ptp(losses[1]) > 10 * RELATIVE * np.abs(losses[1]).max()  # the steps moved the loss: not vacuous
    ours = keras.models.load_model(distributed / "encoder.keras").get_weights()
    theirs = keras.models.load_model(replay / "encoder.keras").get_weights()
    assert json.loads((distributed / "encoder.json").read_text())["step"] == ran[-1]["step"]
    # Over all variables at once: a near-zero BatchNorm beta (norm 3e-3) drifts by 12% of itself, 3e-4 in all.
    drift = math.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(ours, theirs)) /
                      sum(float(np.sum(b ** 2)) for b in theirs))
    print(f"final encoder weights: relative difference {drift:.1e}")
    assert drift < RELATIVE


STEP_BY_STEP = ("--config.log_every_steps=1",)
SLOW_STEPS = "--callbacks=tests.subprocess_scripts.slow_steps:make"  # 0.25 s a step: time to kill between two
SLOWER_STEPS = "--callbacks=tests.subprocess_scripts.slow_steps:make_half_second"  # 0.5 s: to stop twice in 9 steps


def test_mirrored_run_killed_and_resumed_takes_the_steps_of_one_device(tmp_path):
    """Two replicas from one input pipeline, SIGKILLed after step 4 and resumed by the same command from its last
    checkpoint: the 9 steps equal one device's on the joined batches (the resume must start the pipeline at batch
    2 x the checkpoint's step), the steps the kill cut short logged again by the resumed run."""
    run = tmp_path / "mirrored"
    command = train_command(run, "--strategy=mirrored", "--cpu_devices=2", *STEP_BY_STEP, SLOW_STEPS, epochs=3)
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_logged_step(run, 4, [process])
    finally:
        process.send_signal(signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "encoder.keras").exists()

    result = run_cli(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with 2 replica(s)" in result.stderr + result.stdout
    resumed = re.search(r"^Resuming from .*ckpt-(\d+) at step (\d+)\.$", result.stdout, re.M)
    assert resumed and resumed.group(1) == resumed.group(2) and 3 <= int(resumed.group(1)) < 9, result.stdout
    assert "Finished at step 9" in result.stdout
    batches = joined_batches(tmp_path / "reader", pipelines=1, replicas=2, steps=9)
    assert_same_steps(run, one_device_replay(tmp_path / "replay", batches, epochs=3))


def test_multi_worker_run_preempted_then_a_worker_killed_resumes_each_time_as_one_device(tmp_path):
    """Two local workers, one input pipeline each, through both ways a multi-worker run stops early, then to the end:

    1. SIGTERM to worker 1 alone (a scheduler preempting one machine): both stop after the same step with exit 143,
       one line each, the chief's checkpoint of that step written.
    2. The same command resumes both; SIGKILL to worker 1 a few steps later (a crash, a lost machine): the chief stops
       within the coordination service's heartbeat timeout with exit code 5 and one line naming the lost task and the
       intact checkpoint, not a traceback.
    3. The same command resumes both again and finishes. The 9 steps, across both stops, equal one device's on the
       joined shards, and worker 1 ends with the chief's weights.

    (One step per epoch, so each logged running mean is one step's loss on both sides of a resume. One run through
    both stops instead of one run each: the same checks, one multi-worker start and one replay less.)"""
    run = tmp_path / "workers"
    # One step per epoch, the learning rate warming up over all 9 (over 2, the float32 round-off of 2 workers grows
    # to 1.7% by step 8, measured: too near the 3-20% of the bugs this test is for). SLOWER_STEPS leaves time to stop
    # the run between two steps, twice before step 9, on a loaded machine too (2.5 s from the SIGTERM to step 7).
    shape = dict(extra=(*STEP_BY_STEP, "--config.optimizer.warmup_epochs=9"), epochs=9, steps=1)
    slow = {**shape, "extra": (*shape["extra"], SLOWER_STEPS)}

    processes = start_local_workers(run, **slow)
    assert wait_for_logged_step(run, 2, processes), "the run ended before it could be preempted"
    processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=180) for p in processes]
    said = []
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 143 and "Traceback" not in err, err[-3000:]
        said += [line for line in (out + err).splitlines() if line.startswith("Interrupted")]
    assert len(said) == 2 and "on another worker" in said[0] and "on another worker" not in said[1], said
    steps = {int(re.search(r"at step (\d+)", line).group(1)) for line in said}
    assert len(steps) == 1, said  # the same step on both workers
    stopped = steps.pop()
    assert 2 <= stopped < 7 and paths.latest_checkpoints(run)[-1].name == f"ckpt-{stopped}", (stopped, said)
    assert not (run / "encoder.keras").exists()

    processes = start_local_workers(run, **slow)
    try:
        assert wait_for_logged_step(run, stopped + 2, processes), "the run ended before a worker could be killed"
        processes[1].send_signal(signal.SIGKILL)
        _, err = processes[0].communicate(timeout=180)
    finally:
        for p in processes:
            p.kill()
    assert processes[0].returncode == 5 and "Traceback" not in err, err[-3000:]
    line = last_error_line(err)
    kept = paths.latest_checkpoints(run)[-1].name
    assert "another worker of this multi-worker run stopped (/job:worker/task:1" in line, line
    assert f"the last checkpoint, {kept}, is intact" in line and "Run the same command on every worker" in line, line
    assert stopped < int(kept.removeprefix("ckpt-")) < 9 and not (run / "encoder.keras").exists(), (stopped, kept)

    finish_local_workers(start_local_workers(run, **shape), final_step=9)
    batches = joined_batches(tmp_path / "reader", pipelines=2, replicas=2, steps=9)
    # Train lines only: a stop between a step and its epoch's end writes no epoch line for that epoch.
    replay = one_device_replay(tmp_path / "replay", batches, epochs=9, warmup_epochs=9, steps_per_epoch=1)
    assert_same_steps(run, replay, kinds=("train",))
    chief = keras.models.load_model(run / "barlow_twins.keras").get_weights()
    other = keras.models.load_model(run / ".scratch" / "task1" / "barlow_twins.keras").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(chief, other))


def test_the_joined_batches_are_what_one_pipeline_would_not_give(tmp_path):
    """The replay is not vacuous: the two workers' shards differ from each other and from one pipeline's batches."""
    two = joined_batches(tmp_path / "a", pipelines=2, replicas=2, steps=1)[0]
    one = joined_batches(tmp_path / "b", pipelines=1, replicas=2, steps=1)[0]
    view = lambda batch: np.asarray(tf.nest.flatten(batch)[0])  # noqa: E731
    half = view(two).shape[0] // 2
    assert not np.array_equal(view(two)[:half], view(two)[half:])
    assert not np.array_equal(view(two), view(one))
    assert tiny_config().batch_size == view(two).shape[0]
