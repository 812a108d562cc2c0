"""The pre-training loop behind `python -m bt_keras.train`: one code path for every strategy.

Why a loop of our own rather than `model.fit`: Keras 3.15's `fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585), and resuming bit-exactly after a kill needs control of where the input stream restarts.
The loop drives the very same `BarlowTwins.train_step` inside `strategy.run`, so the maths is
the one `model.fit` users get; Keras callbacks (kNN monitor, pictures, logs) are called at the usual hooks.

Checkpoints (`tf.train.Checkpoint`: model, and optimizer with its step counter) are written by
`tf.train.CheckpointManager`, which writes data files first and the `checkpoint` index last, so a kill at any
moment leaves the previous checkpoint intact. A run started again in the same workdir resumes from the newest
complete checkpoint (`bt_keras.train.resume`: a missing or garbage index, a corrupt latest checkpoint, a changed config
and leftovers of a kill are handled there, in the log, never by starting over), restoring every variable or failing
(`bt_keras.checkpoints`). The chief holds `workdir/train.lock` while it runs (`bt_keras.train.workdir_lock`), and the
config is checked before anything is built or written (`bt_keras.train.preflight`).
The input stream is a pure function of (seed, step) (`pretrain_dataset(start_batch=...)`), so a resumed run
sees exactly the batches the uninterrupted run would have: resuming is bit-exact on a deterministic device.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from bt_keras import checkpoints, fast_paths, files, paths
from bt_keras.assembly import artifacts, builders
from bt_keras.config import complete
from bt_keras.data import pretrain
from bt_keras.distribute import check_global_batch, is_chief
from bt_keras.method import precision
from bt_keras.train import callbacks, preflight, resume, step as step_lib
from bt_keras.train.workdir_lock import WorkdirLock


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without overwriting the last good checkpoint."""


class DiskFullError(RuntimeError):
    """The disk (or quota) holding the workdir filled up; the last complete checkpoint is kept."""


def _check_workdir(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        # A per-process name: the workers of a multi-worker run share the workdir and check it at the same time.
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test."):
            pass
    except OSError as error:
        raise ValueError(f"--workdir={workdir} is not writable ({error.strerror}); choose a folder you can write to.") \
            from error


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


class Trainer:
    """Builds everything from a config and runs pre-training in `workdir`, resuming if a checkpoint is there.

    `allow_config_change`: resume even though the config changes fields the checkpoint depends on (model,
    optimisation, data stream; see `bt_keras.train.resume`); the checkpoint must still restore every variable.
    The chief holds the workdir's lock from construction until `run()` returns or `close()` is called.
    """

    def __init__(self, config, workdir: str | os.PathLike, strategy: tf.distribute.Strategy, *,
                 allow_config_change: bool = False):
        self.config = config = complete(config)  # every field present: no default is restated below
        self.workdir = Path(workdir)
        self.strategy = strategy
        self.chief = is_chief(strategy)
        preflight.check_config(config)  # before anything is built or written
        check_global_batch(config.batch_size, strategy.num_replicas_in_sync)  # before anything is built
        if config.data_service:  # an unreachable dispatcher: a clear error now, not a hang at the first step
            from bt_keras.data import service as data_service

            data_service.check_reachable(config.data_service)
        created = not self.workdir.exists()
        _check_workdir(self.workdir)
        # Only the chief locks the workdir: the workers of a multi-worker run share it.
        self._lock = WorkdirLock(self.workdir / paths.LOCK_FILE).acquire() if self.chief else None
        if self._lock is not None:
            weakref.finalize(self, self._lock.release)
        try:
            self._setup(allow_config_change)
        except BaseException:
            self.close()
            if created:
                _remove_if_empty(self.workdir)  # a failed first start leaves no empty workdir behind
            raise

    def close(self) -> None:
        """Releases the workdir lock (`run()` does this when it returns or fails)."""
        if self._lock is not None:
            self._lock.release()

    def _setup(self, allow_config_change: bool) -> None:
        config, strategy = self.config, self.strategy
        # Non-chief workers must take part in saving (it is collective) but write to a scratch folder.
        self.output_dir = self.workdir if self.chief else self.workdir / ".scratch" / f"task{self._task_id()}"
        checkpoint_dir = self.output_dir / paths.CHECKPOINT_DIR
        plan = resume.plan_resume(checkpoint_dir)  # reads only; raises rather than restart at step 0
        self.config_changes = resume.check_config(self.workdir, config, resuming_from=plan.checkpoint,
                                                  allow_change=allow_config_change)
        resume.apply_plan(plan)  # temp folders, unusable files, the index: after the config was accepted
        self.resume_from = plan.checkpoint
        self.run_data = builders.run_data(config)  # the dataset's facts, once: passed to whatever needs them
        self.steps_per_epoch = self.run_data.steps_per_epoch
        self.total_steps = config.epochs * self.steps_per_epoch
        self.views = self.run_data.views
        preflight.check_data(config, self.run_data)

        if not config.fast_paths:
            fast_paths.set_enabled(False)
        keras.utils.set_random_seed(config.seed)
        with strategy.scope():
            self.model = builders.build_training_model(config, self.run_data)

        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(checkpoint_dir),
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
        dataset = pretrain.pretrain_dataset(
            c.dataset, global_batch_size=c.batch_size, views=self.views, data_dir=c.data_dir, download=c.download,
            split=c.split, shuffle_buffer=c.shuffle_buffer, seed=c.seed, input_context=input_context,
            start_batch=self.start_step * replicas_per_pipeline,
            labels=self.model.online_probe is not None,  # (view1, view2, labels) for the online probe
            augment_on=c.augment_on, dct_scaling=c.dct_scaling,
            epoch_keyed=bool(c.data_service),  # workers count batches from 0 each: seeds fold in the epoch
        )
        if c.data_service:  # run the pipeline on a tf.data service's workers (bt_keras.data.service)
            from bt_keras.data import service as data_service

            dataset = data_service.distribute(dataset, c.data_service)
            self.served_key = dataset.served_key  # data_service.served(key): batches per worker
        return dataset

    def _make_step_fn(self):
        """One training step under the strategy: returns replica 0's metrics, the learning rate and (with loss
        scaling) `loss_scale` and `skipped_steps`, as tensors. With `config.jit_compile` (`--xla`) each replica's
        step is one XLA computation (`bt_keras.train.step`); the iterator and the NaN bookkeeping stay outside it."""
        model, strategy, first_bad = self.model, self.strategy, self._first_bad_step
        replica_step = step_lib.replica_step(model, strategy, bool(self.config.jit_compile), self.dataset.element_spec)
        self.xla_compiled = step_lib.is_compiled(replica_step)

        def step(iterator):
            outputs = strategy.run(replica_step, args=(next(iterator),))
            logs = {name: strategy.experimental_local_results(value)[0] for name, value in outputs.items()}
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(value)) for value in logs.values()])
            logs.update(precision.optimizer_logs(model.optimizer))
            if "loss_scale" in logs:  # every step skipped until the scale fell below 1: nothing trains any more
                finite = tf.logical_and(finite, logs["loss_scale"] >= precision.MIN_LOSS_SCALE)
            iterations = tf.cast(model.optimizer.iterations, tf.int64)
            first_bad.assign(tf.where(tf.logical_or(finite, first_bad >= 0), first_bad, iterations))
            logs["lr"] = tf.cast(model.optimizer.learning_rate, tf.float32)
            return logs

        return tf.function(step)

    @property
    def step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def restore(self) -> int:
        """Restores the checkpoint `bt_keras.train.resume` chose (every variable, or an error naming what differs);
        returns the step it resumes from."""
        latest = self.resume_from
        if latest is not None:
            parts = {("model", "encoder"): len(self.model.encoder.variables),
                     ("model", "projector"): len(self.model.projector.variables)}
            checkpoints.restore_exactly(
                self.checkpoint, latest, parts,
                fix=f"The config builds another model than the one that wrote it; resume with the run's own config "
                    f"({self.workdir / paths.CONFIG_FILE}), or start a new --workdir.")
            logging.info("Resumed from %s at step %d.", latest, self.step)
        return self.step

    def _check_finite(self, logs: dict) -> None:
        """Raises NonFiniteLossError if any step so far gave a NaN or infinite metric (one host read)."""
        bad_step = int(self._first_bad_step.numpy())
        if bad_step < 0:
            return
        if logs.get("loss_scale", precision.MIN_LOSS_SCALE) < precision.MIN_LOSS_SCALE:
            cause = (f"The gradients were not finite at every step until mixed_float16's loss scale fell to "
                     f"{logs['loss_scale']:g} (step {bad_step}; {int(logs.get('skipped_steps', 0))} steps skipped, "
                     "none of them trained)")
            advice = "Try float32 or mixed_bfloat16 (--config.precision) or a lower learning rate."
        else:
            cause = f"The loss became {logs.get('loss', 'non-finite')} at step {bad_step}"
            advice = ("Try a lower learning rate (config.optimizer.lr_weights), a longer warm-up, or float32 instead of "
                      "mixed precision.")
        raise NonFiniteLossError(f"{cause}. Training stopped; the last good checkpoint "
                                 f"({self.manager.latest_checkpoint or 'none yet'}) is kept. {advice}")

    def save(self, logs: dict | None = None) -> None:
        """Writes a checkpoint at the current step, after checking that no step since the last one went non-finite.
        A save that fails (a full disk) leaves none of its files behind: the previous checkpoint stays the latest."""
        self._check_finite(logs or {})
        step = self.step
        try:
            self.manager.save(checkpoint_number=step)
        except BaseException:
            folder = self.output_dir / paths.CHECKPOINT_DIR
            for partial in folder.glob(f"ckpt-{step}_temp*"):
                shutil.rmtree(partial, ignore_errors=True)
            if not any(Path(p).name == f"ckpt-{step}" for p in self.manager.checkpoints):
                for partial in folder.glob(f"ckpt-{step}.*"):
                    partial.unlink(missing_ok=True)
            raise

    def _disk_full_message(self, error: BaseException) -> str:
        return (f"No space left on the disk of --workdir={self.workdir} ({checkpoints.one_line(error, 160)}). The last "
                f"complete checkpoint, {self.manager.latest_checkpoint or 'none yet'}, is intact. Free space there "
                "(or move the workdir to a larger disk) and run the same command again to resume.")

    def run(self, extra_callbacks=()) -> dict:
        """Trains to `config.epochs` (or until a callback sets `model.stop_training`); returns the last logs.

        Releases the workdir lock when it returns or fails; a full disk is a DiskFullError naming the workdir.
        """
        if self._lock is not None and not self._lock.held:
            self._lock.acquire()
        try:
            return self._run(extra_callbacks)
        except Exception as error:
            if files.is_disk_full(error):
                raise DiskFullError(self._disk_full_message(error)) from error
            raise
        finally:
            self.close()

    def _run(self, extra_callbacks=()) -> dict:
        """The loop of `run`.

        Keras' callback protocol is honoured: `on_train_batch_begin` / `on_train_batch_end` every step (batch = the
        index within the epoch, `logs["step"]` the global step), `on_epoch_*`, and `model.stop_training`, so
        `keras.callbacks.EarlyStopping` and `TerminateOnNaN` work as they do under `fit`. Metrics are tensors in
        batch logs and are read back from the device only every `config.log_every_steps` steps (and at epoch ends),
        where the progress line (bt_keras.train.progress, a callback) and the NaN check use them.
        """
        c = self.config
        start = self.start_step
        # Trace the step before the first file is written, so a config that cannot train leaves no ckpt-0 behind.
        self._step_fn.get_concrete_function(self.iterator)
        if self.chief:
            resume.record_config(self.workdir, c, self.config_changes, start)
        if start == 0 and not self.manager.latest_checkpoint:
            self.save()  # ckpt-0: the random initialisation, the baseline every evaluation is compared with
        cbs = keras.callbacks.CallbackList(
            callbacks.default_callbacks(c, self.workdir, self.run_data, enabled=self.chief) + list(extra_callbacks),
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
        tic, tic_step, logs = time.perf_counter(), step, {"step": step}
        while step < end and not self.model.stop_training:
            cbs.on_train_batch_begin(step - first)
            logs = self._step_fn(self.iterator)
            step += 1
            if step % c.log_every_steps == 0 or step == end:  # read this step's values back from the device
                logs = {name: float(value) for name, value in logs.items()}
                self._check_finite(logs)
                logs["images/s"] = (step - tic_step) * c.batch_size / max(time.perf_counter() - tic, 1e-9)
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
        # A mixed-precision run saves a float32 encoder: it loads and runs in float32 anywhere (same weights).
        artifacts.save_encoder(precision.float32_copy(self.model.encoder), self.output_dir, {
            "backbone": c.backbone, "image_size": c.image_size, "mean": list(view.mean), "std": list(view.std),
            "dataset": c.dataset, "step": self.step, "epochs": c.epochs, "projector": c.projector,
            "recipe": c.name,
        })
        # The projector too, for exports that serve the projection (a BarlowTwins .keras holds both).
        artifacts.save_model(self.model, self.output_dir)


def summary(logs: dict) -> str:
    return json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in logs.items()
                       if isinstance(v, (int, float, np.floating))})
