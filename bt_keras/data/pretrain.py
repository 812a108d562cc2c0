"""The pre-training stream: seeded, shardable, resumable (view1, view2) batches of a dataset.

Equal-size datasets (cifar, digits, stl10) are batched as uint8 and augmented a batch at a time
(crop_and_resize with per-image boxes). Variable-size ones (ImageNet, folders) are decoded and
random-resized-cropped image by image (bicubic, as the paper), then batched for the colour steps.

Reproducibility: with ``seed`` set, file order, shuffling and every augmentation are a function of
the seed (augmentation seeds are derived from the element / batch index with stateless ops, so
they do not depend on thread scheduling) and ``options.deterministic`` is on. With ``seed=None``
a random seed is drawn and outputs may be produced out of order for speed.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import tensorflow as tf

from bt_keras.augment import device as device_augment, host_crop, ops
from bt_keras.data.sources import AUTOTUNE, dataset_info, fold_seed, open_source, want_cache
from bt_keras.views import cifar_views, imagenet_views, ViewConfig


def _split_pair(seed: tf.Tensor) -> list[tf.Tensor]:
    return tf.unstack(tf.random.experimental.stateless_split(seed, 2))


def default_views(name: str, data_dir=None) -> tuple[ViewConfig, ViewConfig]:
    """The CIFAR recipe at the native size for fixed-size images up to 64 px, else the ImageNet
    recipe at 224 px; with the dataset's normalisation statistics."""
    info = dataset_info(name, data_dir)
    if info.image_shape and max(info.image_shape[:2]) <= 64:
        views = cifar_views(info.image_shape[0])
    else:
        views = imagenet_views(224)
    return tuple(dataclasses.replace(v, mean=info.mean, std=info.std) for v in views)


def pair_batches(images: tf.data.Dataset, *, batch_size: int, views, encoded: bool = False, seed=None,
                 shuffle_buffer: int = 10_000, cache: bool = False, repeat: bool = True,
                 start_batch: int = 0, labels: bool = False, augment_on: str = "host", dct_scaling: bool = False,
                 epoch_keyed: bool = False) -> tf.data.Dataset:
    """(view1, view2) float32 batches from a dataset of single images, drop_remainder=True.

    ``labels=True``: the elements of ``images`` are (image, label) pairs and the batches are
    (view1, view2, labels int32) for the online probe; the views are the same as without labels.

    ``images``: uint8 [H, W, 3] of one size (batched first, then augmented a batch at a time) or,
    with ``encoded=True``, JPEG/PNG bytes of any size (decoded and cropped per image; files that
    fail to decode are skipped). ``seed``: None, an int, or an (int, int) pair, e.g. (seed, worker).

    Seeded, the stream is a pure function of (seed, batch index): epoch e is shuffled with a seed made
    from (seed, e), and batch i is augmented with a seed made from (seed, i). ``start_batch`` starts the
    stream at batch i without augmenting the batches before it (only shuffling and batching the raw
    epoch up to there), which is how a resumed training run sees exactly the batches it would have seen.

    ``augment_on="accelerator"``: yield uint8 crops and the views' batch seeds instead (a dict, see
    ``bt_keras.augment.device``); the model's train_step applies the colour steps from the same seeds, so
    the views equal ``augment_on="host"``'s. Encoded JPEGs are decoded straight to the crop window in both
    modes (``bt_keras.augment.host_crop``; same pixels); ``dct_scaling=True`` also decodes large crops at 1/2-1/8
    scale in libjpeg, which is faster but changes pixels slightly.

    ``epoch_keyed=True`` folds the epoch into every augmentation seed as well (a different stream from the default):
    for the tf.data service, whose workers each take whole epochs but count batches from 0 each, so (epoch, index)
    is what keeps their seeds distinct (``bt_keras.data.service``).
    """
    device_augment.check_augment_on(augment_on)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    view1, view2 = views
    if not (isinstance(view1, ViewConfig) and isinstance(view2, ViewConfig)):
        raise ValueError(f"views must be a pair of ViewConfig, got {views!r}")
    deterministic = seed is not None
    pair = (seed, 0) if isinstance(seed, int) else seed or (random.SystemRandom().randrange(2**31), 0)
    key = tf.constant(pair, tf.int64)
    source = images.cache() if cache else images
    examples = int(source.cardinality())
    if examples < 0:  # unknown (e.g. filtered): count once
        examples = int(source.reduce(np.int64(0), lambda n, _: n + 1))
    batches_per_epoch = examples // batch_size
    if batches_per_epoch < 1:
        raise ValueError(f"batch size {batch_size} is larger than the {examples} images available to this pipeline")
    first_epoch, skip = divmod(start_batch, batches_per_epoch) if repeat else (0, start_batch)

    def epoch(e):  # the raw images of epoch e, shuffled with a seed of (seed, e), in batches
        ds = source
        if shuffle_buffer:
            shuffle_seed = (pair[0] * 1_000_003 + 7919 * pair[1] + e) % (2**62) if deterministic else None
            # This function is traced into its own graph; with tf.random.set_seed(0) in force, TF's get_seed
            # compares our tensor seed in Python ("symbolic Tensor as a bool"). The order must depend on
            # shuffle_seed alone anyway, so the traced graph gets no graph-level seed.
            tf.compat.v1.get_default_graph().seed = None
            ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        ds = ds.batch(batch_size, drop_remainder=True)
        if epoch_keyed:  # each batch carries its epoch, folded into its seeds below
            ds = ds.map(lambda *element: (tf.fill([batch_size], e), element[0] if len(element) == 1 else element))
        return ds

    last_epoch = np.iinfo(np.int64).max if repeat else first_epoch + 1
    ds = tf.data.Dataset.range(first_epoch, last_epoch).flat_map(epoch).skip(skip)
    crop_key, batch_key = fold_seed(key, 0), fold_seed(key, 1)
    if encoded:  # per-image decode + random resized crop, keyed by the global image index
        @tf.autograph.experimental.do_not_convert  # Python flags only: AutoGraph's rewrite cost ~1 s a start
        def crop_pair(i, data):  # decodes a JPEG once, only the crop windows: same pixels as a full decode + crop
            e, data = data if epoch_keyed else (None, data)
            data, label = data if labels else (data, None)
            image_key = fold_seed(fold_seed(crop_key, e), i) if epoch_keyed else fold_seed(crop_key, i)
            crops = host_crop.decode_random_resized_crop_pair(data, views, _split_pair(image_key),
                                                              dct_scaling=dct_scaling)
            crops = crops if label is None else crops + (label,)
            return (e, crops) if epoch_keyed else crops

        ds = (ds.unbatch().enumerate(start=start_batch * batch_size).map(crop_pair, num_parallel_calls=AUTOTUNE)
              .ignore_errors(log_warning=True).batch(batch_size, drop_remainder=True))

    @tf.autograph.experimental.do_not_convert  # as crop_pair
    def augment_pair(i, batch):  # stage 1 (uint8 crops) here; stage 2 here or in the model (device_augment)
        if epoch_keyed:
            epochs, batch = batch
            s1, s2 = _split_pair(fold_seed(fold_seed(batch_key, epochs[0]), i))
        else:
            s1, s2 = _split_pair(fold_seed(batch_key, i))
        batch_labels = None
        if labels:  # encoded: (crops1, crops2, labels); decoded: (images, labels)
            batch, batch_labels = (batch[:2], batch[2]) if encoded else (batch[0], batch[1])
        extra = () if batch_labels is None else (batch_labels,)
        if encoded:
            crops1, crops2 = (ops.rotate_batch(c, v, s) for c, v, s in zip(batch, views, (s1, s2)))
        elif batch.dtype != tf.uint8:  # float images in [0, 1]: no uint8 stage, host mode only
            if augment_on == "accelerator":
                raise ValueError(f"augment_on='accelerator' needs uint8 images, got {batch.dtype.name}")
            return (ops.augment_batch(batch, view1, s1), ops.augment_batch(batch, view2, s2)) + extra
        else:
            crops1, crops2 = ops.geometric_batch(batch, view1, s1), ops.geometric_batch(batch, view2, s2)
        if augment_on == "accelerator":
            return device_augment.host_batch(crops1, crops2, views, s1, s2, labels=batch_labels)
        return (ops.photometric_batch(crops1, view1, s1), ops.photometric_batch(crops2, view2, s2)) + extra

    ds = ds.enumerate(start=start_batch).map(augment_pair, num_parallel_calls=AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.prefetch(AUTOTUNE).with_options(options)


def pretrain_dataset(name: str, *, global_batch_size: int, views=None, data_dir=None, download: bool = False,
                     split: str = "train", shuffle_buffer: int = 10_000, seed: int | None = None,
                     input_context: tf.distribute.InputContext | None = None, cache="auto",
                     repeat: bool = True, start_batch: int = 0, labels: bool = False, augment_on: str = "host",
                     dct_scaling: bool = False, epoch_keyed: bool = False) -> tf.data.Dataset:
    """(view1, view2) float32 batches for Barlow Twins pretraining (labels dropped), or with ``labels=True``
    (view1, view2, labels int32) for the online probe (-1 where the dataset has no label), the same views.

    With ``input_context`` (``strategy.distribute_datasets_from_function``) each input pipeline
    reads its own 1/num_input_pipelines shard and yields per-replica batches. ``views`` defaults to
    ``default_views(name)``. ``cache``: True, False or "auto" (in memory when the decoded - or, for
    variable-size images, encoded - data is under 2 GiB). ``start_batch``: skip to this batch of the
    (seeded) stream cheaply, to resume training exactly; see ``pair_batches``. ``augment_on`` / ``dct_scaling``:
    ``epoch_keyed``: see ``pair_batches`` (accelerator mode yields uint8 crops + seeds for ``bt_keras.augment.device``).
    """
    views = default_views(name, data_dir) if views is None else views
    shard, batch_size = (1, 0), global_batch_size
    if input_context is not None:
        shard = (input_context.num_input_pipelines, input_context.input_pipeline_id)
        batch_size = input_context.get_per_replica_batch_size(global_batch_size)
    source = open_source(name, split, data_dir, download, shuffle=True, seed=seed, shard=shard)
    images = source.dataset if labels else source.dataset.map(lambda image, label: image)
    return pair_batches(images, batch_size=batch_size, views=views, encoded=source.image_shape is None,
                        seed=None if seed is None else (seed, shard[1]), shuffle_buffer=shuffle_buffer,
                        cache=want_cache(cache, source), repeat=repeat, start_batch=start_batch, labels=labels,
                        augment_on=augment_on, dct_scaling=dct_scaling, epoch_keyed=epoch_keyed)
