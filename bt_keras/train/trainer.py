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

import contextlib
import json
import os
import re
import shutil
import signal
import sys
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
from bt_keras.data import pretrain, sources
from bt_keras.distribute import check_global_batch, is_chief
from bt_keras.method import precision
from bt_keras.train import callbacks, figures, preflight, resume, step as step_lib, watchdog
from bt_keras.train.workdir_lock import WorkdirLock


class NonFiniteLossError(RuntimeError):
    """The loss, or the weights after a step's update, became NaN or infinite; training stopped before anything
    non-finite was saved, and the last good checkpoint stays the latest (what the next start resumes from)."""


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run between two steps, after a checkpoint of the last finished step was written.

    `signal_name` ("SIGTERM", "SIGINT"; on a multi-worker run, the signal one of the other workers got),
    `step` and `checkpoint` (its path) say what was kept; `exit_code` is 128 + the signal's number, what a shell
    reports for a process that signal ended."""

    def __init__(self, signal_number: int, step: int, checkpoint: str | None, own: bool = True):
        self.signal_name = signal.Signals(signal_number).name
        self.step, self.checkpoint = step, checkpoint
        self.exit_code = 128 + signal_number
        where = "" if own else " on another worker"
        super().__init__(f"Interrupted ({self.signal_name}{where}) at step {step}: checkpoint "
                         f"{Path(checkpoint).name if checkpoint else 'none'} saved; run the same command to resume.")


# What the first SIGTERM or SIGINT does (signal.signal), and why not TensorFlow's preemption machinery:
# `tf.distribute.experimental.PreemptionCheckpointHandler` works only with a cluster resolver (MultiWorkerMirrored- or
# TPUStrategy), none of which one device or MirroredStrategy has; it adds its own run counter to the checkpoint,
# restores the latest checkpoint itself when built (bypassing bt_keras.train.resume's choice and
# bt_keras.checkpoints' every-variable check) and ends the process itself. So the trainer handles the signals itself,
# in the same way for every strategy: the handler only records the signal; the loop looks at it between steps,
# finishes the step in flight, writes a checkpoint of it and stops. On a multi-worker run the workers agree first
# (the step all-reduces each worker's signal; the saves are collective), so a signal to any one of them stops all
# of them after the same step. A second signal finds the default action restored and ends the process at once,
# without writing anything more (CheckpointManager writes its index last, so the previous checkpoint stays whole).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopSignals:
    """While entered (in the main thread only: Python delivers signals there), records the first SIGTERM or SIGINT
    in `received` and restores the previous handlers on exit."""

    def __init__(self):
        self.received = 0
        self._previous = {}

    def _handle(self, number, frame):
        self.received = number
        for other in _STOP_SIGNALS:  # the next one takes the default action: the process ends at once
            signal.signal(other, signal.SIG_DFL)
        if number == signal.SIGINT:  # someone at a terminal: say what is happening, and how not to wait
            print("Stopping after the step in flight, to save a checkpoint (press Ctrl-C again to quit at once, "
                  "without saving).", file=sys.stderr, flush=True)

    def __enter__(self):
        try:
            self._previous = {number: signal.signal(number, self._handle) for number in _STOP_SIGNALS}
        except ValueError:  # not the main thread: signals keep their current handling
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


# The exit code of a run whose tf.data service dispatcher stopped answering mid-step (bt_keras.train.watchdog).
DISPATCHER_LOST_EXIT_CODE = 4
# The exit code of a multi-worker run that lost one of its workers (WorkerLostError, said by bt_keras.cli.train).
WORKER_LOST_EXIT_CODE = 5


class WorkerLostError(RuntimeError):
    """Another worker of a multi-worker run stopped (killed, crashed, its machine gone): TensorFlow's coordination
    service missed its heartbeats and aborted the collectives. Saving is collective, so nothing was written after the
    last checkpoint; the same command on every worker resumes from it."""


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
        # Every worker resumes from the chief's checkpoints (the shared workdir's): a worker killed during a
        # collective save holds an older one in its scratch folder, and workers resuming from different steps wait
        # on each other's all-reduces until one of them runs out of steps.
        plan = resume.plan_resume(self.workdir / paths.CHECKPOINT_DIR)  # reads only; raises rather than restart at 0
        self.config_changes = resume.check_config(self.workdir, config, resuming_from=plan.checkpoint,
                                                  allow_change=allow_config_change)
        if self.chief:
            resume.apply_plan(plan)  # temp folders, unusable files, the index: after the config was accepted
        else:
            self._tidy_scratch_checkpoints()
        self.resume_from = plan.checkpoint
        # folder: data: every file decoded once (a check this workdir kept is reused), the bad ones left out
        folder_images = sources.check_folder_images(config.dataset, self.output_dir)
        self.run_data = builders.run_data(config)  # the dataset's facts, once: passed to whatever needs them
        self.steps_per_epoch = self.run_data.steps_per_epoch
        self.total_steps = config.epochs * self.steps_per_epoch
        self.views = self.run_data.views
        preflight.check_data(config, self.run_data)
        folder_images.record()  # workdir/bad_images.txt, and the check kept for the next start

        if not config.fast_paths:
            fast_paths.set_enabled(False)
        keras.utils.set_random_seed(config.seed)
        with strategy.scope():
            self.model = builders.build_training_model(config, self.run_data)

        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer)
        self.manager = self._checkpoint_manager()
        self.start_step = self.restore()
        # The input stream is a pure function of (seed, step), so it restarts exactly where the checkpoint left off
        # (tf.distribute's iterators cannot be checkpointed, and re-reading skipped batches would cost an epoch).
        self.dataset = strategy.distribute_datasets_from_function(self._dataset_fn)
        self.iterator = iter(self.dataset)
        # The first step whose outputs or updated weights were not finite (-1: none) and what was not (_BAD_*), kept
        # on the device and read only on logging steps and before anything is saved, so the check costs no host
        # round trip per step.
        self._first_bad_step = tf.Variable(-1, dtype=tf.int64, trainable=False, name="first_non_finite_step")
        self._bad_what = tf.Variable(0, dtype=tf.int32, trainable=False, name="first_non_finite_what")
        self._signals = _StopSignals()
        self._config_before = None  # config.json's bytes before this start rewrote it (chief; None: there was none)
        self._watchdog = (watchdog.DispatcherWatchdog(config.data_service, config.data_service_stall_s,
                                                      self._dispatcher_lost)
                          if config.data_service else contextlib.nullcontext())
        self._stop_signal = 0  # the signal the run stops for (on a multi-worker run: the workers' agreed one)
        self._collective_stop = _workers(strategy) > 1
        self._step_fn = self._make_step_fn()

    def _checkpoint_manager(self) -> tf.train.CheckpointManager:
        """A manager of the checkpoint folder as its index lists it. It deletes nothing (`max_to_keep=None`): the
        trainer prunes after each save (`resume.prune_checkpoints`), keeping ckpt-0 whatever `keep_checkpoints` is."""
        folder = self.output_dir / paths.CHECKPOINT_DIR
        return tf.train.CheckpointManager(self.checkpoint, str(folder), max_to_keep=None)

    def _tidy_scratch_checkpoints(self) -> None:
        """A non-chief worker's own checkpoint folder, written only because saving is collective and never read
        back: the temporary folders of a save a kill cut short are removed, nothing is verified."""
        for partial in resume.find_temp_folders(self.output_dir / paths.CHECKPOINT_DIR):
            shutil.rmtree(partial, ignore_errors=True)

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
        step is one XLA computation (`bt_keras.train.step`), the all-finite check of the updated weights included;
        the iterator and the NaN bookkeeping stay outside it.

        On a multi-worker run the step also takes this worker's stop signal (0: none) and returns the workers' sum
        under `_STOP` (a scalar all-reduce with the step's own), so all of them stop after the same step."""
        model, strategy, first_bad, bad_what = self.model, self.strategy, self._first_bad_step, self._bad_what
        replica_step = step_lib.replica_step(model, strategy, bool(self.config.jit_compile), self.dataset.element_spec,
                                             check_state=True)
        self.xla_compiled = step_lib.is_compiled(replica_step)

        def update_flags(logs):
            state_finite = logs.pop(step_lib.STATE_FINITE)
            outputs_finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(value)) for value in logs.values()])
            logs.update(precision.optimizer_logs(model.optimizer))
            what = tf.where(outputs_finite, _BAD_WEIGHTS, _BAD_OUTPUTS)
            finite = tf.logical_and(outputs_finite, state_finite)
            if "loss_scale" in logs:  # every step skipped until the scale fell below 1: nothing trains any more
                scale_ok = logs["loss_scale"] >= precision.MIN_LOSS_SCALE
                what = tf.where(finite, _BAD_LOSS_SCALE, what)
                finite = tf.logical_and(finite, scale_ok)
            iterations = tf.cast(model.optimizer.iterations, tf.int64)
            first = tf.logical_and(tf.logical_not(finite), first_bad < 0)
            bad_what.assign(tf.where(first, what, bad_what))
            first_bad.assign(tf.where(first, iterations, first_bad))
            logs["lr"] = tf.cast(model.optimizer.learning_rate, tf.float32)
            return logs

        def replica_agreeing_to_stop(batch, stop):
            outputs = dict(replica_step(batch))
            context = tf.distribute.get_replica_context()
            outputs[_STOP] = context.all_reduce(tf.distribute.ReduceOp.SUM, stop / context.num_replicas_in_sync)
            return outputs

        run_on_replicas = replica_agreeing_to_stop if self._collective_stop else replica_step

        def step(iterator, *stop):  # `stop`: this worker's signal, on a multi-worker run only
            outputs = strategy.run(run_on_replicas, args=(next(iterator), *stop))
            return update_flags({name: strategy.experimental_local_results(value)[0]
                                 for name, value in outputs.items()})

        # autograph=False: the step has no tensor-dependent Python control flow, and AutoGraph's rewriting of
        # every function the step calls took 2-3 s of each start (measured on the tiny CLI run: 12.9 -> 9.7 s).
        return tf.function(step, autograph=False)

    def _call_step(self):
        """One step; with a multi-worker run, also updates `_stop_signal` from the workers' agreement (one host read
        of a scalar per step: the price of stopping all workers after the same step)."""
        logs = self._step_fn(self.iterator, *self._stop_args(self._signals.received))
        if not self._collective_stop:
            self._stop_signal = self._signals.received
        elif float(logs.pop(_STOP)) > 0:  # some worker got a signal before this step: every worker stops after it
            self._stop_signal = self._signals.received or signal.SIGTERM
        return logs

    def _stop_args(self, received: int) -> tuple:
        """The step's extra argument: this worker's signal as a float tensor, on a multi-worker run only."""
        return (tf.constant(float(received)),) if self._collective_stop else ()

    def _stop_requested(self) -> bool:
        """Whether to stop now, between two steps. A multi-worker run only acts on the workers' agreement (from the
        last step); one process acts on its own signal at once."""
        return bool(self._stop_signal or (not self._collective_stop and self._signals.received))

    def _trace_step(self):
        self._step_fn.get_concrete_function(self.iterator, *self._stop_args(0))

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

    def _non_finite_variables(self) -> list[str]:
        """The paths of the model's weights and statistics that hold a NaN or an infinity now (host reads)."""
        return [v.path for v in step_lib.state_variables(self.model) if not np.all(np.isfinite(np.asarray(v)))]

    def _check_finite(self, logs: dict) -> None:
        """Raises NonFiniteLossError if any step so far gave a NaN or infinite metric, or left a NaN or an infinity
        in the weights or BatchNorm statistics (one host read while all is well)."""
        bad_step = int(self._first_bad_step.numpy())
        if bad_step < 0:
            return
        what = int(self._bad_what.numpy())
        lr_advice = ("Try a lower learning rate (config.optimizer.lr_weights, lr_biases) or LARS trust coefficient "
                     "(config.optimizer.eta), a longer warm-up (config.optimizer.warmup_epochs), or float32 instead "
                     "of mixed precision.")
        if what == _BAD_LOSS_SCALE or logs.get("loss_scale", precision.MIN_LOSS_SCALE) < precision.MIN_LOSS_SCALE:
            cause = (f"The gradients were not finite at every step until mixed_float16's loss scale fell to "
                     f"{logs.get('loss_scale', 0.0):g} (step {bad_step}; {int(logs.get('skipped_steps', 0))} steps "
                     "skipped, none of them trained)")
            advice = "Try float32 or mixed_bfloat16 (--config.precision) or a lower learning rate."
        elif what == _BAD_WEIGHTS:
            names = self._non_finite_variables()
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            cause = (f"The update of step {bad_step} made the weights non-finite (the loss was still finite; now NaN "
                     f"or infinite: {shown or 'none any more'})")
            advice = lr_advice
        else:
            loss = logs.get("loss")
            cause = f"The loss became non-finite at step {bad_step}" + (
                f" ({loss})" if isinstance(loss, float) and not np.isfinite(loss) else "")
            advice = lr_advice
        raise NonFiniteLossError(f"{cause}. Training stopped and saved nothing from step {bad_step} on; the last good "
                                 f"checkpoint ({self.manager.latest_checkpoint or 'none yet'}) is kept, and the next "
                                 f"start resumes from it. {advice}")

    def save(self, logs: dict | None = None) -> None:
        """Writes a checkpoint at the current step, after checking that no step since the last one went non-finite.
        A save that fails (a full disk) leaves none of its files behind: the previous checkpoint stays the latest.
        Then all but ckpt-0 and the `config.keep_checkpoints` newest are deleted."""
        self._check_finite(logs or {})
        step = self.step
        folder = self.output_dir / paths.CHECKPOINT_DIR
        try:  # the config first: every complete checkpoint has the record its evaluation checks config.json against
            checkpoints.write_config_record(folder / f"ckpt-{step}", self.config.to_dict())
            saved = self.manager.save(checkpoint_number=step)
        except BaseException:
            for partial in folder.glob(f"ckpt-{step}_temp*"):
                shutil.rmtree(partial, ignore_errors=True)
            if not any(Path(p).name == f"ckpt-{step}" for p in self.manager.checkpoints):
                for partial in folder.glob(f"ckpt-{step}.*"):
                    partial.unlink(missing_ok=True)
            raise
        if resume.prune_checkpoints(folder, self.config.keep_checkpoints, saved):
            self.manager = self._checkpoint_manager()  # re-read the pruned index: it manages what is left

    def _undo_config_record(self) -> str:
        """After a stop on non-finite values: when this start changed the config but saved no checkpoint with it, puts
        the previous config.json back (it wrote the latest checkpoint) and returns the sentence saying so; else "".
        """
        latest = self.manager.latest_checkpoint
        if (not self.chief or self._config_before is None or not self.config_changes
                or latest is None or self.resume_from is None or Path(latest).name != self.resume_from.name):
            return ""
        return resume.undo_config_record(self.workdir, self._config_before, self.config_changes, self.start_step,
                                         latest)

    def _step_watched(self, in_flight: bool) -> None:
        """Tells the dispatcher watchdog (a run on a tf.data service) that a step starts or has finished."""
        if isinstance(self._watchdog, watchdog.DispatcherWatchdog):
            self._watchdog.step_started() if in_flight else self._watchdog.step_finished()

    def _dispatcher_lost(self, message: str) -> None:
        """Called by the watchdog's thread while the main thread is stuck inside a step that TensorFlow retries
        forever: prints the one line, releases the workdir lock and ends the process (DISPATCHER_LOST_EXIT_CODE).
        Nothing is being saved then, so the last checkpoint is whole."""
        print(f"ERROR: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        self.close()
        os._exit(DISPATCHER_LOST_EXIT_CODE)

    def _disk_full_message(self, error: BaseException) -> str:
        return (f"No space left on the disk of --workdir={self.workdir} ({checkpoints.one_line(error, 160)}). The last "
                f"complete checkpoint, {self.manager.latest_checkpoint or 'none yet'}, is intact. Free space there "
                "(or move the workdir to a larger disk) and run the same command again to resume.")

    def run(self, extra_callbacks=()) -> dict:
        """Trains to `config.epochs` (or until a callback sets `model.stop_training`); returns the last logs.

        Releases the workdir lock when it returns or fails; a full disk is a DiskFullError naming the workdir, a lost
        worker of a multi-worker run a WorkerLostError naming it.
        """
        if self._lock is not None and not self._lock.held:
            self._lock.acquire()
        try:
            return self._run(extra_callbacks)
        except NonFiniteLossError as error:
            note = self._undo_config_record()
            if note:
                error.args = (f"{error.args[0]} {note}",)
            raise
        except Exception as error:
            if files.is_disk_full(error):
                raise DiskFullError(self._disk_full_message(error)) from error
            if self._collective_stop and isinstance(error, tf.errors.UnavailableError):
                raise WorkerLostError(self._worker_lost_message(error)) from error
            raise
        finally:
            self.close()

    def _worker_lost_message(self, error) -> str:
        tasks = sorted(set(re.findall(r"/job:\w+/task:\d+", str(error))))
        saved = paths.latest_checkpoints(self.output_dir)
        kept = f"the last checkpoint, {saved[-1].name}, is intact" if saved else "no checkpoint was written"
        return (f"another worker of this multi-worker run stopped ({', '.join(tasks) or 'TensorFlow: UNAVAILABLE'}: "
                f"killed, crashed or unreachable), so this one stopped at step {self.step}; {kept}. Run the same "
                "command on every worker to resume.")

    def _run(self, extra_callbacks=()) -> dict:
        """The loop of `run`.

        Keras' callback protocol is honoured: `on_train_batch_begin` / `on_train_batch_end` every step (batch = the
        index within the epoch, `logs["step"]` the global step), `on_epoch_*`, and `model.stop_training`, so
        `keras.callbacks.EarlyStopping` and `TerminateOnNaN` work as they do under `fit`. Metrics are tensors in
        batch logs and are read back from the device only every `config.log_every_steps` steps (and at epoch ends),
        where the progress line (bt_keras.train.progress, a callback) and the NaN check use them.

        A run that finished before and wrote its end-of-run files skips the loop (`_finished_logs`).
        """
        extra_callbacks = list(extra_callbacks)  # read twice below: a generator would be used up by the first
        finished = self._finished_logs(extra_callbacks)
        if finished is not None:
            return finished
        with self._signals, self._watchdog:
            return self._run_with_signals(extra_callbacks)

    def _finished_logs(self, extra_callbacks=()) -> dict | None:
        """What `run` returns when this start has nothing to do, without writing anything; None when the loop must
        run. Nothing to do: it resumed, with the same config, at the last step of the schedule, the run's end already
        wrote all it writes (`_end_written`), and the final kNN accuracy is on record (`callbacks.final_knn`). The
        logs are then the last epoch's logged metrics (`figures.final_metrics`) with that accuracy: the numbers the
        loop's rerun returned (its kNN monitor measured the accuracy again when it started).

        Why: the loop would then train nothing, yet trace the step, rewrite config.json, run the callbacks' begin and
        end (the end-of-run baseline table alone is ~37 CPU-s on the quickstart recipe, for the numbers it wrote
        before) and save the same encoder again. The loop is kept wherever skipping it is not certain to be the same:
        a changed config (recorded, and it may ask for other end-of-run files), extra callbacks (they expect
        on_train_begin and on_train_end), and a multi-worker run (every worker must take the same path, and a
        non-chief worker writes its files to a scratch folder)."""
        if (self.resume_from is None or self.start_step != self.total_steps or self.config_changes or extra_callbacks
                or self._collective_stop or not self.chief or not self._end_written()):
            return None
        records = figures.read_metrics(self.workdir)
        knn = callbacks.final_knn(self.config, records, self.workdir, self.run_data, self.start_step)
        if knn is None:
            return None
        logging.info("%s finished at step %d and holds its encoder and end-of-run files: nothing to train or write.",
                     self.workdir, self.start_step)
        return {**figures.final_metrics(self.workdir, records), **knn}

    def _end_written(self) -> bool:
        """Whether the run's end at this step wrote all it writes, after the last start that ran the loop:
        - `save_encoder` finished: encoder.json, its last file, names this step, and the two models are there (an
          end cut short by a kill leaves no encoder.json of this step);
        - the callbacks' end-of-run files are there (`callbacks.end_of_run_written`);
        - config.json is there, and encoder.json and those files are newer than it. Every start that runs the loop
          rewrites config.json before its end, so an end cut short after a start with a changed (harmless) config,
          or a report that failed to draw, leaves an older file of the same step behind, to be written again. (A
          copy that does not keep file times only makes the rerun run the loop.)"""
        try:
            metadata = json.loads((self.workdir / paths.ENCODER_METADATA).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not (isinstance(metadata, dict) and metadata.get("step") == self.start_step
                and (self.workdir / paths.ENCODER_FILE).is_file() and (self.workdir / paths.MODEL_FILE).is_file()
                and callbacks.end_of_run_written(self.config, self.workdir, self.run_data, self.start_step)):
            return False
        names = [paths.ENCODER_METADATA, *callbacks.end_of_run_files(self.config, self.run_data)]
        try:
            written = (self.workdir / paths.CONFIG_FILE).stat().st_mtime_ns
            return all((self.workdir / name).stat().st_mtime_ns >= written for name in names)
        except OSError:
            return False

    def _run_with_signals(self, extra_callbacks=()) -> dict:
        """`_run` while SIGTERM and SIGINT are recorded (`_StopSignals`): on one, the step in flight finishes, its
        checkpoint is written and `Interrupted` is raised (no epoch end, no report, no encoder: the run is not over)."""
        c = self.config
        start = self.start_step
        # Trace the step before the first file is written, so a config that cannot train leaves no ckpt-0 behind.
        self._trace_step()
        if self.chief:
            config_file = self.workdir / paths.CONFIG_FILE
            self._config_before = config_file.read_bytes() if config_file.is_file() else None
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
            if self._stop_requested():  # e.g. a signal during the last epoch's callbacks or save
                self._interrupted(step, logs)
            logs = self._run_epoch(epoch, step, cbs)
            step = logs["step"]
            if self._stop_requested():
                self._interrupted(step, logs)
            cbs.on_epoch_end(epoch, logs)
            if (epoch + 1) % c.checkpoint_every_epochs == 0 or epoch + 1 == c.epochs or self.model.stop_training:
                self.save(logs)
        self._check_finite(logs)  # before the callbacks' end (reports, baselines) and the encoder are written
        cbs.on_train_end(logs)
        self.save_encoder()
        return logs

    def _interrupted(self, step: int, logs: dict):
        """Writes the checkpoint of `step` (unless the epoch's end just did) after the all-finite check, then raises
        Interrupted."""
        latest = self.manager.latest_checkpoint
        if latest is None or Path(latest).name != f"ckpt-{step}":
            self.save(logs)
        else:
            self._check_finite(logs)
        number = self._signals.received or self._stop_signal or signal.SIGTERM
        raise Interrupted(number, step, self.manager.latest_checkpoint, own=bool(self._signals.received))

    def _run_epoch(self, epoch: int, step: int, cbs) -> dict:
        """The steps of one epoch from global step `step`; returns the epoch's logs (Python numbers)."""
        c = self.config
        first, end = epoch * self.steps_per_epoch, (epoch + 1) * self.steps_per_epoch
        cbs.on_epoch_begin(epoch)
        for tracker in self.model.metrics:
            tracker.reset_state()
        tic, tic_step, logs = time.perf_counter(), step, {"step": step}
        while step < end and not self.model.stop_training and not self._stop_requested():
            cbs.on_train_batch_begin(step - first)
            self._step_watched(True)
            logs = self._call_step()
            self._step_watched(False)
            step += 1
            stopping = self._stop_requested()
            if step % c.log_every_steps == 0 or step == end or stopping:  # read this step's values back
                logs = {name: float(value) for name, value in logs.items()}
                self._check_finite(logs)
                logs["images/s"] = (step - tic_step) * c.batch_size / max(time.perf_counter() - tic, 1e-9)
            logs["step"] = step
            cbs.on_train_batch_end(step - first - 1, logs)
        logs = {name: value if name == "step" else float(value) for name, value in logs.items()}
        logs["epoch"] = epoch + 1
        return logs

    def save_encoder(self) -> None:
        """Writes `workdir/barlow_twins.keras`, then `encoder.keras` + `encoder.json`, the artefact evaluation and
        export read (other workers of a multi-worker run write theirs to their scratch folder, where tests compare
        them with the chief's)."""
        c = self.config
        view = self.views[0]
        # The projector too, for exports that serve the projection (a BarlowTwins .keras holds both). First: the
        # encoder's files come last, so an encoder.json of this step says that the end of the run is all written.
        artifacts.save_model(self.model, self.output_dir)
        # A mixed-precision run saves a float32 encoder: it loads and runs in float32 anywhere (same weights).
        artifacts.save_encoder(precision.float32_copy(self.model.encoder), self.output_dir, {
            "backbone": c.backbone, "image_size": c.image_size, "mean": list(view.mean), "std": list(view.std),
            "dataset": c.dataset, "step": self.step, "epochs": c.epochs, "projector": c.projector,
            "recipe": c.name,
        })


_BAD_OUTPUTS, _BAD_WEIGHTS, _BAD_LOSS_SCALE = 1, 2, 3  # what `_bad_what` records
_STOP = "stop_signal"  # the multi-worker step's output: the sum of the workers' stop signals


def _workers(strategy) -> int:
    """How many processes (workers) run `strategy`'s replicas: more than one only for a multi-worker
    MultiWorkerMirroredStrategy (a TPU pod is driven by one process)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec() if resolver is not None else None
    return max(1, sum(spec.num_tasks(job) for job in spec.jobs if job in ("chief", "worker"))) if spec else 1


def summary(logs: dict) -> str:
    return json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in logs.items()
                       if isinstance(v, (int, float, np.floating))})
