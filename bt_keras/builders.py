"""From a recipe (an ml_collections config, `bt_keras.config`) to the objects training needs.

Kept apart from the loop (`bt_keras.trainer`) so that evaluation and export can rebuild a run's model from its
`config.json` without importing the training loop.
"""

from __future__ import annotations

import keras
from absl import logging

from bt_keras import backbones, data, device_augment, heads, optim
from bt_keras.model import BarlowTwins
from bt_keras.views import ViewConfig


def views_from_config(config) -> tuple[ViewConfig, ViewConfig]:
    """`config.view1` / `config.view2` as ViewConfigs, normalised with the dataset's mean and std.

    A view's `crop_size` is `config.image_size` unless the recipe sets it: one number, one source of truth.
    """
    info = data.dataset_info(config.dataset, config.data_dir, config.download)
    views = []
    for name in ("view1", "view2"):
        fields = {k: v for k, v in config[name].items() if v is not None}
        fields.setdefault("crop_size", config.image_size)
        views.append(ViewConfig.from_dict({**fields, "mean": tuple(info.mean), "std": tuple(info.std)}))
    return tuple(views)


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
    """`config.steps_per_epoch`, else the split's examples // the global batch (a clear error when that is 0)."""
    if config.steps_per_epoch:
        return int(config.steps_per_epoch)
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


def build_device_augment(config, views) -> device_augment.DeviceAugment | None:
    """The model's on-device colour steps when `config.augment_on == "accelerator"`, else None
    (`bt_keras.device_augment`)."""
    mode = device_augment.check_augment_on(config.get("augment_on", "host"))
    return device_augment.DeviceAugment(*views) if mode == "accelerator" else None
