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

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from bt_keras import augment, backbones, callbacks, checkpoints, data, heads, optim
from bt_keras.distribute import check_global_batch, is_chief
from bt_keras.model import BarlowTwins


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without overwriting the last good checkpoint."""


def recipe_views(recipe: str, crop_size: int) -> tuple[dict, dict]:
    """The two views of an augmentation recipe ("cifar" or "imagenet") as config dicts, minus the normalisation
    (taken from the dataset at run time). Config files use this so every field is overridable from the command line,
    e.g. `--config.view2.solarize_prob=0.3`."""
    recipes = {"cifar": augment.cifar_views, "imagenet": augment.imagenet_views}
    if recipe not in recipes:
        raise ValueError(f"Unknown augmentation recipe {recipe!r}; choose one of {sorted(recipes)}.")
    strip = lambda view: {k: v for k, v in view.to_dict().items() if k not in ("mean", "std")}  # noqa: E731
    return tuple(strip(view) for view in recipes[recipe](crop_size))


def views_from_config(config) -> tuple[augment.ViewConfig, augment.ViewConfig]:
    """`config.view1` / `config.view2` as ViewConfigs, normalised with the dataset's mean and std."""
    info = data.dataset_info(config.dataset, config.data_dir, config.download)
    return tuple(
        augment.ViewConfig.from_dict({**config[name], "mean": tuple(info.mean), "std": tuple(info.std)})
        for name in ("view1", "view2")
    )


def build_model(config) -> BarlowTwins:
    """Encoder + projector as the recipe says (call inside the strategy's scope)."""
    encoder = backbones.get_backbone(
        config.backbone,
        input_shape=(config.image_size, config.image_size, 3),
        stem=config.stem,
        width_multiplier=config.width_multiplier,
        blocks=tuple(config.blocks) if config.blocks else None,
        synchronized_bn=config.synchronized_bn,
    )
    return BarlowTwins(encoder, heads.projector(config.projector, synchronized_bn=config.synchronized_bn),
                       lambd=config.lambd)


def build_optimizer(config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """LARS with the warm-up + cosine schedule; learning rates scaled by batch/256 when the recipe says so."""
    o = config.optimizer
    scale = config.batch_size / 256 if o.scale_by_batch else 1.0
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = int(o.warmup_epochs * steps_per_epoch)
    if warmup_steps > total_steps:
        logging.warning("Warm-up (%d steps) is longer than the run (%d steps): shortened to the run.",
                        warmup_steps, total_steps)
        warmup_steps = total_steps
    schedule = optim.WarmupCosine(
        o.lr_weights * scale,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        end_scale=o.end_lr_scale,
    )
    return optim.LARS(schedule, momentum=o.momentum, eta=o.eta, weight_decay=o.weight_decay,
                      bias_lr_scale=o.lr_biases / o.lr_weights)


def steps_per_epoch(config) -> int:
    info = data.dataset_info(config.dataset, config.data_dir, config.download)
    examples = info.splits.get(config.split)
    if not examples:
        raise ValueError(f"Dataset {config.dataset} has no examples in split {config.split!r}; "
                         f"its splits: {info.splits}.")
    steps = examples // config.batch_size
    if steps < 1:
        raise ValueError(f"config.batch_size={config.batch_size} is larger than the {examples} examples of "
                         f"{config.dataset}:{config.split}; lower it.")
    return steps


def _check_workdir(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        # A per-process name: the workers of a multi-worker run share the workdir and check it at the same time.
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test."):
            pass
    except OSError as error:
        raise ValueError(f"--workdir={workdir} is not writable ({error.strerror}); choose a folder you can write to.") \
            from error


def _first_replica(values):
    return {k: float(v.values[0] if hasattr(v, "values") else v) for k, v in values.items()}


class Trainer:
    """Builds everything from a config and runs pre-training in `workdir`, resuming if a checkpoint is there."""

    def __init__(self, config, workdir: str | os.PathLike, strategy: tf.distribute.Strategy):
        self.config = config
        self.workdir = Path(workdir)
        self.strategy = strategy
        self.chief = is_chief(strategy)
        check_global_batch(config.batch_size, strategy.num_replicas_in_sync)  # before anything is built
        _check_workdir(self.workdir)
        self.steps_per_epoch = config.steps_per_epoch or steps_per_epoch(config)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.views = views_from_config(config)

        keras.utils.set_random_seed(config.seed)
        with strategy.scope():
            self.model = build_model(config)
            self.model.compile(optimizer=build_optimizer(config, self.steps_per_epoch),
                               jit_compile=bool(config.jit_compile))
            self.model.optimizer.build(self.model.trainable_variables)

        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer)
        # Non-chief workers must take part in saving (it is collective) but write to a scratch folder.
        self.output_dir = self.workdir if self.chief else self.workdir / ".scratch" / f"task{self._task_id()}"
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.output_dir / "checkpoints"),
                                                  max_to_keep=config.keep_checkpoints)
        self.start_step = self.restore()
        # The input stream is a pure function of (seed, step), so it restarts exactly where the checkpoint left off
        # (tf.distribute's iterators cannot be checkpointed, and re-reading skipped batches would cost an epoch).
        self.dataset = strategy.distribute_datasets_from_function(self._dataset_fn)
        self.iterator = iter(self.dataset)
        self._step_fn = self._make_step_fn()

    def _task_id(self) -> int:
        resolver = getattr(self.strategy, "cluster_resolver", None)
        return int(resolver.task_id or 0) if resolver is not None else 0

    def _dataset_fn(self, input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        c = self.config
        replicas_per_pipeline = input_context.num_replicas_in_sync // input_context.num_input_pipelines
        return data.pretrain_dataset(
            c.dataset, global_batch_size=c.batch_size, views=self.views, data_dir=c.data_dir, download=c.download,
            split=c.split, shuffle_buffer=c.shuffle_buffer, seed=c.seed, input_context=input_context,
            start_batch=self.start_step * replicas_per_pipeline,
        )

    def _make_step_fn(self):
        model, strategy = self.model, self.strategy

        def step(iterator):
            return strategy.run(model.train_step, args=(next(iterator),))

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

    def save(self) -> None:
        self.manager.save(checkpoint_number=self.step)

    def run(self, extra_callbacks=()) -> dict:
        """Trains to `config.epochs`; returns the last epoch's logs."""
        c = self.config
        start = self.start_step
        if self.chief:
            checkpoints.atomic_write_json(self.workdir / "config.json", c.to_dict())
        if start == 0 and not self.manager.latest_checkpoint:
            self.save()  # ckpt-0: the random initialisation, the baseline every evaluation is compared with
        cbs = keras.callbacks.CallbackList(
            list(callbacks.default_callbacks(c, self.workdir, self.views, enabled=self.chief)) + list(extra_callbacks),
            model=self.model,
        )
        cbs.on_train_begin({"step": start})
        logs = {}
        first_epoch = start // self.steps_per_epoch
        for epoch in range(first_epoch, c.epochs):
            cbs.on_epoch_begin(epoch)
            for tracker in self.model.metrics:
                tracker.reset_state()
            progbar = keras.utils.Progbar(self.steps_per_epoch, verbose=1 if self.chief else 0,
                                          stateful_metrics=["lr", "images/s"])
            progbar.update(self.step - epoch * self.steps_per_epoch)
            tic, tic_step = time.perf_counter(), self.step
            while self.step < (epoch + 1) * self.steps_per_epoch:
                logs = _first_replica(self._step_fn(self.iterator))
                if not all(math.isfinite(v) for v in logs.values()):
                    raise NonFiniteLossError(
                        f"The loss became {logs['loss']} at step {self.step} (epoch {epoch}). Training stopped; the "
                        f"last good checkpoint ({self.manager.latest_checkpoint or 'none yet'}) is kept. Try a lower "
                        "learning rate (config.optimizer.lr_weights), a longer warm-up, or float32 instead of "
                        "mixed precision."
                    )
                elapsed = time.perf_counter() - tic
                logs["lr"] = float(self.model.optimizer.learning_rate)
                logs["images/s"] = (self.step - tic_step) * c.batch_size / max(elapsed, 1e-9)
                logs["step"] = self.step
                progbar.update(self.step - epoch * self.steps_per_epoch, [(k, v) for k, v in logs.items()
                                                                          if k != "step"])
                if self.step % c.log_every_steps == 0:
                    cbs.on_train_batch_end(self.step, logs)
            logs["epoch"] = epoch + 1
            cbs.on_epoch_end(epoch, logs)
            if (epoch + 1) % c.checkpoint_every_epochs == 0 or epoch + 1 == c.epochs:
                self.save()
        cbs.on_train_end(logs)
        self.save_encoder()
        return logs

    def save_encoder(self) -> None:
        """Writes `workdir/encoder.keras` + `encoder.json`, the artefact evaluation and export read (other workers
        of a multi-worker run write theirs to their scratch folder, where tests compare them with the chief's)."""
        c = self.config
        view = self.views[0]
        checkpoints.save_encoder(self.model.encoder, self.output_dir, {
            "backbone": c.backbone, "image_size": c.image_size, "mean": list(view.mean), "std": list(view.std),
            "dataset": c.dataset, "step": self.step, "epochs": c.epochs, "projector": c.projector,
            "recipe": c.get("name", ""),
        })
        # The projector too, for exports that serve the projection (a BarlowTwins .keras holds both).
        checkpoints.atomic_write(self.output_dir / "barlow_twins.keras", self.model.save, suffix=".keras")


def summary(logs: dict) -> str:
    return json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in logs.items()
                       if isinstance(v, (int, float, np.floating))})
