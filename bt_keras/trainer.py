"""The pre-training loop behind `python -m bt_keras.train`: one code path for every strategy.

Why a loop of our own rather than `model.fit`: Keras 3.15's `fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585), and resuming bit-exactly after a kill needs control of where the input stream restarts.
The loop drives the very same `BarlowTwins.train_step` inside `strategy.run`, so the maths is
the one `model.fit` users get; Keras callbacks (kNN monitor, pictures, logs) are called at the usual hooks.

Checkpoints (`tf.train.Checkpoint`: model, and optimizer with its step counter) are written by
`tf.train.CheckpointManager`, which writes data files first and the `checkpoint` index last, so a kill at any
moment leaves the previous checkpoint intact. A run started again in the same workdir resumes from the latest one.
The input stream is a pure function of (seed, step) (`data.pretrain_dataset(start_batch=...)`), so a resumed run
sees exactly the batches the uninterrupted run would have: resuming is bit-exact on a deterministic device.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from bt_keras import artifacts, builders, callbacks, data, fast_paths, io
from bt_keras.distribute import check_global_batch, is_chief


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without overwriting the last good checkpoint."""


def _check_workdir(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        # A per-process name: the workers of a multi-worker run share the workdir and check it at the same time.
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test."):
            pass
    except OSError as error:
        raise ValueError(f"--workdir={workdir} is not writable ({error.strerror}); choose a folder you can write to.") \
            from error


class Trainer:
    """Builds everything from a config and runs pre-training in `workdir`, resuming if a checkpoint is there."""

    def __init__(self, config, workdir: str | os.PathLike, strategy: tf.distribute.Strategy):
        self.config = config
        self.workdir = Path(workdir)
        self.strategy = strategy
        self.chief = is_chief(strategy)
        check_global_batch(config.batch_size, strategy.num_replicas_in_sync)  # before anything is built
        if config.get("data_service"):  # an unreachable dispatcher: a clear error now, not a hang at the first step
            from bt_keras import data_service

            data_service.check_reachable(config.data_service)
        _check_workdir(self.workdir)
        self.steps_per_epoch = builders.steps_per_epoch(config)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.views = builders.views_from_config(config)

        if not config.get("fast_paths", True):
            fast_paths.set_enabled(False)
        keras.utils.set_random_seed(config.seed)
        with strategy.scope():
            self.model = builders.build_model(config)
            self.model.device_augment = builders.build_device_augment(config, self.views)  # augment_on (issue 17)
            self.model.compile(optimizer=builders.build_optimizer(config, self.steps_per_epoch),
                               jit_compile=bool(config.jit_compile))
            self.model.optimizer.build(self.model.trainable_variables)

        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer)
        # Non-chief workers must take part in saving (it is collective) but write to a scratch folder.
        self.output_dir = self.workdir if self.chief else self.workdir / ".scratch" / f"task{self._task_id()}"
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.output_dir / artifacts.CHECKPOINT_DIR),
                                                  max_to_keep=config.keep_checkpoints)
        self.start_step = self.restore()
        # The input stream is a pure function of (seed, step), so it restarts exactly where the checkpoint left off
        # (tf.distribute's iterators cannot be checkpointed, and re-reading skipped batches would cost an epoch).
        self.dataset = strategy.distribute_datasets_from_function(self._dataset_fn)
        self.iterator = iter(self.dataset)
        # The first step whose outputs were not finite (-1: none), kept on the device and read only on logging steps
        # and before anything is saved, so the NaN check costs no host round trip per step.
        self._first_bad_step = tf.Variable(-1, dtype=tf.int64, trainable=False, name="first_non_finite_step")
        self._step_fn = self._make_step_fn()

    def _task_id(self) -> int:
        resolver = getattr(self.strategy, "cluster_resolver", None)
        return int(resolver.task_id or 0) if resolver is not None else 0

    def _dataset_fn(self, input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        c = self.config
        replicas_per_pipeline = input_context.num_replicas_in_sync // input_context.num_input_pipelines
        dataset = data.pretrain_dataset(
            c.dataset, global_batch_size=c.batch_size, views=self.views, data_dir=c.data_dir, download=c.download,
            split=c.split, shuffle_buffer=c.shuffle_buffer, seed=c.seed, input_context=input_context,
            start_batch=self.start_step * replicas_per_pipeline,
            augment_on=c.get("augment_on", "host"), dct_scaling=c.get("dct_scaling", False),
            epoch_keyed=bool(c.get("data_service")),  # workers count batches from 0 each: seeds fold in the epoch
        )
        if c.get("data_service"):  # run the pipeline on a tf.data service's workers (bt_keras.data_service)
            from bt_keras import data_service

            dataset = data_service.distribute(dataset, c.data_service)
            self.served_key = dataset.served_key  # data_service.served(key): batches per worker
        return dataset

    def _make_step_fn(self):
        """One training step under the strategy: returns replica 0's metrics and the learning rate, as tensors."""
        model, strategy, first_bad = self.model, self.strategy, self._first_bad_step

        def step(iterator):
            outputs = strategy.run(model.train_step, args=(next(iterator),))
            logs = {name: strategy.experimental_local_results(value)[0] for name, value in outputs.items()}
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(value)) for value in logs.values()])
            iterations = tf.cast(model.optimizer.iterations, tf.int64)
            first_bad.assign(tf.where(tf.logical_or(finite, first_bad >= 0), first_bad, iterations))
            logs["lr"] = tf.cast(model.optimizer.learning_rate, tf.float32)
            return logs

        return tf.function(step, jit_compile=False)

    @property
    def step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def restore(self) -> int:
        """Restores the latest checkpoint if there is one; returns the step it resumes from."""
        latest = self.manager.latest_checkpoint
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            logging.info("Resumed from %s at step %d.", latest, self.step)
        return self.step

    def _check_finite(self, logs: dict) -> None:
        """Raises NonFiniteLossError if any step so far gave a NaN or infinite metric (one host read)."""
        bad_step = int(self._first_bad_step.numpy())
        if bad_step >= 0:
            raise NonFiniteLossError(
                f"The loss became {logs.get('loss', 'non-finite')} at step {bad_step}. Training stopped; the last good "
                f"checkpoint ({self.manager.latest_checkpoint or 'none yet'}) is kept. Try a lower learning rate "
                "(config.optimizer.lr_weights), a longer warm-up, or float32 instead of mixed precision.")

    def save(self, logs: dict | None = None) -> None:
        """Writes a checkpoint at the current step, after checking that no step since the last one went non-finite."""
        self._check_finite(logs or {})
        self.manager.save(checkpoint_number=self.step)

    def run(self, extra_callbacks=()) -> dict:
        """Trains to `config.epochs` (or until a callback sets `model.stop_training`); returns the last logs.

        Keras' callback protocol is honoured: `on_train_batch_begin` / `on_train_batch_end` every step (batch = the
        index within the epoch, `logs["step"]` the global step), `on_epoch_*`, and `model.stop_training`, so
        `keras.callbacks.EarlyStopping` and `TerminateOnNaN` work as they do under `fit`. Metrics are tensors in
        batch logs and are read back from the device only every `config.log_every_steps` steps (and at epoch ends),
        where the progress bar and the NaN check use them.
        """
        c = self.config
        start = self.start_step
        if self.chief:
            io.atomic_write_json(self.workdir / artifacts.CONFIG_FILE, c.to_dict())
        if start == 0 and not self.manager.latest_checkpoint:
            self.save()  # ckpt-0: the random initialisation, the baseline every evaluation is compared with
        cbs = keras.callbacks.CallbackList(
            list(callbacks.default_callbacks(c, self.workdir, self.views, enabled=self.chief)) + list(extra_callbacks),
            model=self.model,
        )
        self.model.stop_training = False
        cbs.on_train_begin({"step": start})
        logs, step = {}, start
        for epoch in range(start // self.steps_per_epoch, c.epochs):
            if self.model.stop_training:
                break
            logs = self._run_epoch(epoch, step, cbs)
            step = logs["step"]
            cbs.on_epoch_end(epoch, logs)
            if (epoch + 1) % c.checkpoint_every_epochs == 0 or epoch + 1 == c.epochs or self.model.stop_training:
                self.save(logs)
        cbs.on_train_end(logs)
        self._check_finite(logs)
        self.save_encoder()
        return logs

    def _run_epoch(self, epoch: int, step: int, cbs) -> dict:
        """The steps of one epoch from global step `step`; returns the epoch's logs (Python numbers)."""
        c = self.config
        first, end = epoch * self.steps_per_epoch, (epoch + 1) * self.steps_per_epoch
        cbs.on_epoch_begin(epoch)
        for tracker in self.model.metrics:
            tracker.reset_state()
        progbar = keras.utils.Progbar(self.steps_per_epoch, verbose=1 if self.chief else 0,
                                      stateful_metrics=["lr", "images/s"])
        progbar.update(step - first)
        tic, tic_step, logs = time.perf_counter(), step, {"step": step}
        while step < end and not self.model.stop_training:
            cbs.on_train_batch_begin(step - first)
            logs = self._step_fn(self.iterator)
            step += 1
            if step % c.log_every_steps == 0 or step == end:  # read this step's values back from the device
                logs = {name: float(value) for name, value in logs.items()}
                self._check_finite(logs)
                logs["images/s"] = (step - tic_step) * c.batch_size / max(time.perf_counter() - tic, 1e-9)
                progbar.update(step - first, list(logs.items()))
            else:
                progbar.update(step - first)
            logs["step"] = step
            cbs.on_train_batch_end(step - first - 1, logs)
        logs = {name: value if name == "step" else float(value) for name, value in logs.items()}
        logs["epoch"] = epoch + 1
        return logs

    def save_encoder(self) -> None:
        """Writes `workdir/encoder.keras` + `encoder.json`, the artefact evaluation and export read (other workers
        of a multi-worker run write theirs to their scratch folder, where tests compare them with the chief's)."""
        c = self.config
        view = self.views[0]
        artifacts.save_encoder(self.model.encoder, self.output_dir, {
            "backbone": c.backbone, "image_size": c.image_size, "mean": list(view.mean), "std": list(view.std),
            "dataset": c.dataset, "step": self.step, "epochs": c.epochs, "projector": c.projector,
            "recipe": c.get("name", ""),
        })
        # The projector too, for exports that serve the projection (a BarlowTwins .keras holds both).
        artifacts.save_model(self.model, self.output_dir)


def summary(logs: dict) -> str:
    return json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in logs.items()
                       if isinstance(v, (int, float, np.floating))})
