"""Labelled batches for the probes: (normalised images, labels), with the evaluation transforms."""

from __future__ import annotations

import random

import tensorflow as tf

from bt_keras.augment import eval_transforms
from bt_keras.data.sources import AUTOTUNE, decode_image, fold_seed, normalization_stats, open_source, want_cache


def labelled_dataset(name: str, *, split: str, batch_size: int, image_size: int, train: bool = False,
                     data_dir=None, download: bool = False, shuffle: bool | None = None, seed: int | None = None,
                     repeat: bool = False, subset=None, shuffle_buffer: int = 10_000, cache="auto") -> tf.data.Dataset:
    """(images float32 [B, S, S, 3] normalised, labels int32 [B]) batches for linear probes.

    ``train=True``: ``eval_transforms.train_eval_transform`` (random resized crop + flip); else
    ``eval_transforms.eval_transform`` (resize + center crop, identity for S x S images). ``shuffle``
    defaults to ``train``. ``subset``: class-balanced subset, a fraction (0.01 = 1% of each class)
    or a per-class count, selected with ``seed`` (0 when None); for TFDS this reads the split's
    labels once (for ImageNet use ``tfds:imagenet2012_subset/1pct`` instead). The last batch may
    be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shuffle = train if shuffle is None else shuffle
    mean, std = normalization_stats(name)
    source = open_source(name, split, data_dir, download, shuffle=shuffle, seed=seed, subset=subset)
    ds = source.dataset.cache() if want_cache(cache, source) else source.dataset
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed)
    if repeat:
        ds = ds.repeat()
    encoded = source.image_shape is None

    def decode(image):
        return decode_image(image) if encoded else image

    if train:
        key = tf.constant((random.SystemRandom().randrange(2**31) if seed is None else seed, 1), tf.int64)
        ds = ds.enumerate().map(lambda i, ex: (eval_transforms.train_eval_transform(
            decode(ex[0]), image_size, mean, std, fold_seed(key, i)), ex[1]),
            num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(lambda image, label: (eval_transforms.eval_transform(decode(image), image_size, mean, std), label),
                    num_parallel_calls=AUTOTUNE)
    if encoded:
        ds = ds.ignore_errors(log_warning=True)
    options = tf.data.Options()
    options.deterministic = seed is not None or not shuffle
    return ds.batch(batch_size).prefetch(AUTOTUNE).with_options(options)
