"""Checks a training config and its data before anything is built or written, so mistakes are one clear line.

Without these, a bad field fails late and far from its cause: `checkpoint_every_epochs=0` is a ZeroDivisionError
after `ckpt-0` was written, a `view1.crop_size` that differs from `image_size` fails inside the traced train step,
and a `folder:` dataset whose files all fail to decode ends in a bare `StopIteration` from the picture callback
(or, for the repeated training stream, waits forever). Every message names the field (`config.FIELD=value`) and
what to do.

The smallest image size: the ResNets here pad their stride-2 convolutions and the max-pool symmetrically
(torch-style), so each halves a side to ceil(n / 2) and any size >= 1 passes through the network; the binding
limit is the random resized crop of the views (`ViewConfig.crop_size >= 2`). Hence MIN_IMAGE_SIZE = 2.
"""

from __future__ import annotations

import numbers
import os

from bt_keras.data import pretrain
from bt_keras.method import precision
from bt_keras.nets import backbones, heads

MIN_IMAGE_SIZE = 2


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _get(config, field: str):
    """`config.a.b` for field "a.b"; None when a part is missing."""
    value = config
    for part in field.split("."):
        value = value.get(part) if hasattr(value, "get") else None
    return value


def _physical_memory() -> int | None:
    """This machine's memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def config_problems(config) -> list[str]:
    """Every invalid field of a training config (completed: `bt_keras.config.complete`), as 'config.FIELD=value: what
    is wrong' (empty when all is well)."""
    problems = []

    def need(ok: bool, field: str, rule: str) -> None:
        if not ok:
            problems.append(f"config.{field}={_get(config, field)!r} {rule}")

    def integer(field: str, minimum: int, why: str = "") -> None:
        value = _get(config, field)
        need(_is_int(value) and value >= minimum, field, f"must be an integer >= {minimum}{why}")

    integer("image_size", MIN_IMAGE_SIZE, " (the smallest side a random crop accepts; the network takes any size)")
    image_size = config.image_size
    for view in ("view1", "view2"):
        crop = _get(config, f"{view}.crop_size")
        need(crop is None or crop == image_size, f"{view}.crop_size",
             f"differs from config.image_size={image_size!r}: the encoder's input is image_size x image_size, so "
             f"the views must crop to it (remove the override, or change config.image_size)")
    batch = config.batch_size
    if _is_int(image_size) and _is_int(batch) and image_size > 0 and batch > 0:
        views_bytes, memory = 2 * batch * image_size * image_size * 3 * 4, _physical_memory()
        need(memory is None or views_bytes <= memory, "image_size",
             f"with config.batch_size={batch} makes the two float32 views alone {views_bytes / 2**30:.1f} GiB, more "
             f"than this machine's {(memory or 0) / 2**30:.1f} GiB of memory: lower image_size or batch_size")
    integer("epochs", 1)
    steps = config.steps_per_epoch
    need(steps is None or (_is_int(steps) and steps >= 1), "steps_per_epoch",
         "must be an integer >= 1, or None for the split's examples // batch_size")
    integer("keep_checkpoints", 1)
    integer("log_every_steps", 1)
    integer("checkpoint_every_epochs", 1)
    integer("picture_every_epochs", 0, " (0: no picture of C)")
    integer("shuffle_buffer", 0)
    integer("seed", 0)
    if "knn" in config:
        integer("knn.every_epochs", 0, " (0: no kNN monitor)")
    stall = config.data_service_stall_s
    need(isinstance(stall, numbers.Real) and not isinstance(stall, bool) and stall > 0, "data_service_stall_s",
         "must be a positive number of seconds (how long a step may wait while the dispatcher does not answer)")
    lambd = config.lambd
    need(isinstance(lambd, numbers.Real) and not isinstance(lambd, bool) and lambd > 0, "lambd",
         "must be a positive number (the off-diagonal weight; the paper uses 0.0051)")
    need(config.optimizer.name in ("lars", "adamw"), "optimizer.name",
         "must be 'lars' (the paper's) or 'adamw' (Keras's AdamW, solo-learn's ViT recipes)")
    if backbones.is_foreign(config.backbone):
        try:
            backbones.foreign_callable(config.backbone)
        except ValueError as error:  # the module does not import, or has no such callable: one line already
            problems.append(str(error).rstrip("."))
    else:
        need(config.backbone in backbones.BACKBONES, "backbone",
             f"is not one of {sorted(backbones.BACKBONES)} nor MODULE:CALLABLE (e.g. 'keras.applications:ConvNeXtTiny')")
    need(config.stem in backbones.STEMS, "stem",
         "must be 'imagenet' (7x7/2 + max-pool), 'cifar' (3x3/1) or 'cifar_pad2' (3x3/1, padding 2: solo-learn's)")
    width = config.width_multiplier
    need(isinstance(width, numbers.Real) and not isinstance(width, bool) and width > 0, "width_multiplier",
         "must be a positive number")
    blocks = config.blocks
    need(blocks is None or (1 <= len(blocks) <= 4 and all(_is_int(b) and b >= 1 for b in blocks)), "blocks",
         "must list 1 to 4 stages of at least one block each, e.g. (1, 1), or be None")
    try:
        heads.parse_spec(config.projector)
    except (ValueError, TypeError):
        need(False, "projector", "is not a '-'-separated list of positive widths, e.g. '2048-2048-2048'")
    need(config.precision in precision.POLICIES, "precision", f"must be one of {precision.POLICIES}")
    return problems


def check_config(config) -> None:
    """Raises ValueError listing every invalid field of `config` (see `config_problems`)."""
    problems = config_problems(config)
    if problems:
        raise ValueError(f"Invalid config: {'; '.join(problems)}. Fix the recipe or its --config.FIELD=VALUE "
                         "overrides.")


def check_data(config, run) -> None:
    """Raises ValueError unless the config's split holds at least one global batch of images; for `folder:`
    datasets, of images that decode.

    Folder files that do not decode were already found and left out (`bt_keras.data.image_check`, counted in
    `run.info.bad_files`): the message then says how many and where they are listed. The folder check also decodes
    files (in the dataset's seeded order, without shuffling) until one batch is full: a few seconds for a 2048-image
    batch, once per start.
    """
    name, split, batch = config.dataset, config.split, config.batch_size
    examples = run.info.splits.get(split)
    bad = getattr(run.info, "bad_files", {}).get(split, 0)
    listed = (f"; `python -m bt_keras.data_check {name.partition(':')[2]}` names them, and a run that starts lists "
              "them in WORKDIR/bad_images.txt")
    if examples is not None and examples < batch and bad:
        raise ValueError(
            f"config.dataset={name!r} (split {split!r}): fewer than config.batch_size={batch} of its "
            f"{examples + bad} image files decode ({bad} do not{listed}). Replace or remove the broken files, or "
            "lower config.batch_size.")
    if examples is not None and examples < batch:
        raise ValueError(f"config.batch_size={batch} is larger than the {examples} images of config.dataset={name!r} "
                         f"(split {split!r}): lower config.batch_size or add images.")
    if not name.startswith("folder:"):
        return
    stream = pretrain.pretrain_dataset(name, global_batch_size=batch, views=run.views, data_dir=config.data_dir,
                                   download=config.download, split=split, shuffle_buffer=0, seed=config.seed,
                                   cache=False, repeat=False)
    try:
        next(iter(stream))
    except StopIteration:
        raise ValueError(
            f"config.dataset={name!r} (split {split!r}): fewer than config.batch_size={batch} of its "
            f"{examples} image files decode (the others failed after the up-front check{listed}). "
            "Replace or remove the broken files, or lower config.batch_size.") from None
