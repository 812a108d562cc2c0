"""How images are fed to an encoder, and the labelled batches the protocols read.

Image size, mean and std come from the encoder's metadata unless overridden (`--image_size`, `--mean`, `--std`);
`bt_keras.data.labelled_dataset` normalises with the dataset's statistics, and `labelled_batches` re-normalises its
output to the encoder's when they differ (an exact per-channel affine map).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from bt_keras.assembly.artifacts import Encoder
from bt_keras.data import labelled
from bt_keras.data.sources import DatasetInfo
from bt_keras.paths import ENCODER_METADATA


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images are fed to the encoder: resized / center-cropped to image_size, then (x / 255 - mean) / std."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


def _triple(values, name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3 or (name == "std" and min(values) <= 0):
        raise ValueError(f"{name} must be 3 per-channel values{' (all > 0)' if name == 'std' else ''}, got {values}")
    return values


def resolve_preprocessing(encoder: Encoder, info: DatasetInfo, image_size: int | None = None,
                          mean=None, std=None) -> Preprocessing:
    """The encoder's preprocessing: overrides, else its metadata, else what its input shape or the dataset implies.

    The image size must suit the encoder: an encoder built for a fixed input size (e.g. 224 x 224) cannot be fed
    other sizes, and its metadata must agree with it. A mismatch means a checkpoint of another architecture than
    the one the metadata (or --image_size) describes, and is refused with a ValueError saying what to change.
    Dataset images of another size are fine: the eval transform resizes and center-crops them (and the training
    transform random-resized-crops them) to image_size, as the paper's protocols do for ImageNet.
    """
    shape = encoder.input_shape
    fixed = shape[1:3] if None not in shape[1:3] else None
    meta_size = encoder.metadata.get("image_size")
    if fixed and fixed[0] != fixed[1]:
        raise ValueError(f"The encoder {encoder.path} takes non-square {fixed[0]}x{fixed[1]} images; evaluation "
                         "feeds square center crops.")
    if fixed and meta_size is not None and int(meta_size) != fixed[0]:
        raise ValueError(f"The encoder {encoder.path} takes {fixed[0]}x{fixed[1]} images but its metadata says "
                         f"image_size={meta_size}: the checkpoint is of another architecture than its metadata "
                         f"describes. Fix image_size in {ENCODER_METADATA} beside it.")
    size = image_size or meta_size or (fixed[0] if fixed else None) or (info.image_shape[0] if info.image_shape
                                                                          else None)
    if not size:
        raise ValueError(f"Cannot tell which image size to feed {encoder.path}: its metadata has no image_size, it "
                         f"accepts any size, and {info.name} has images of mixed sizes. Pass --image_size.")
    size = int(size)
    if fixed and size != fixed[0]:
        raise ValueError(f"The encoder {encoder.path} was built for {fixed[0]}x{fixed[1]} inputs, but evaluation "
                         f"would feed {size}x{size} images (--image_size={image_size}). Omit --image_size to use "
                         f"{fixed[0]}, or evaluate an encoder built for {size}-pixel images.")
    if info.image_shape and info.image_shape[0] != size:
        logging.info("%s images are %dx%d; they are resized and center-cropped to %d for the encoder.",
                     info.name, info.image_shape[0], info.image_shape[1], size)
    stats = {}
    for name, override, fallback in (("mean", mean, info.mean), ("std", std, info.std)):
        value = override if override else encoder.metadata.get(name)
        if value is None:
            logging.warning("The encoder's metadata has no %s; using %s's: %s.", name, info.name, fallback)
            value = fallback
        stats[name] = _triple(value, name)
    return Preprocessing(size, stats["mean"], stats["std"])


def _renormalize(ds: tf.data.Dataset, source: tuple, target: Preprocessing) -> tf.data.Dataset:
    """Maps images normalised with the dataset's (mean, std) to the encoder's: x' = x * s/s' + (m - m')/s'."""
    mean, std = (np.asarray(v, np.float32) for v in source)
    if np.allclose(mean, target.mean) and np.allclose(std, target.std):
        return ds
    scale = tf.constant(std / np.asarray(target.std, np.float32))
    shift = tf.constant((mean - np.asarray(target.mean, np.float32)) / np.asarray(target.std, np.float32))
    return ds.map(lambda x, y: (x * scale + shift, y), num_parallel_calls=tf.data.AUTOTUNE)


def labelled_batches(name: str, split: str, prep: Preprocessing, info: DatasetInfo, *, batch_size: int,
                     data_dir=None, download: bool = False, train: bool = False, shuffle: bool | None = None,
                     subset=None, limit: int | None = None, seed: int | None = 0) -> tf.data.Dataset:
    """(images normalised for the encoder, int32 labels) batches of `split`, through `data.labelled_dataset`.

    `train=False`: the eval transform (resize to image_size / 0.875 + center crop; identity for image_size
    images), in the split's stored order. `train=True`: random resized crop + flip. `subset`: a seeded
    class-balanced fraction or per-class count (data.labelled_dataset). `limit`: only the first `limit` examples
    (in the split's stored order unless shuffled), for quick runs.
    """
    ds = labelled.labelled_dataset(name, split=split, batch_size=batch_size, image_size=prep.image_size, train=train,
                               data_dir=data_dir, download=download, shuffle=shuffle, seed=seed, subset=subset,
                               cache=False if limit else "auto")
    if limit:
        ds = ds.unbatch().take(limit).batch(batch_size)
    return _renormalize(ds, (info.mean, info.std), prep)


def training_batches(name: str, split: str, prep: Preprocessing, info: DatasetInfo, *, batch_size: int,
                     data_dir=None, download: bool = False, subset=None, limit: int | None = None,
                     seed: int = 0) -> tf.data.Dataset | Callable[[int], tf.data.Dataset]:
    """The augmented training data of the SGD protocols, iterated once per epoch.

    Without `limit`: one dataset, reshuffled every time it is iterated (seeded), so every epoch sees the images
    in a new order and with new crops. With `limit`: a function epoch -> dataset of the same first `limit`
    examples, with crops and order drawn from (seed, epoch). `limit` and `subset` both pick the training set, so
    they cannot be combined (a per-class count, e.g. subset=2, makes a small quick set).
    """
    if limit and subset is not None:
        raise ValueError("--limit_train and --subset both choose the training examples; use one of them (for a "
                         "small class-balanced set pass a per-class count, e.g. --subset=2).")
    common = dict(batch_size=batch_size, data_dir=data_dir, download=download, train=True)
    if not limit:
        return labelled_batches(name, split, prep, info, shuffle=True, subset=subset, seed=seed, **common)

    def epoch(index: int) -> tf.data.Dataset:
        epoch_seed = (seed * 1_000_003 + index) % 2**31
        ds = labelled_batches(name, split, prep, info, shuffle=False, seed=epoch_seed, **common)
        return ds.unbatch().take(limit).shuffle(limit, seed=epoch_seed).batch(batch_size)

    return epoch
