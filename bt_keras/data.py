"""tf.data input pipelines: (view1, view2) batches for pretraining, (image, label) batches for probes.

Dataset names:
  ``tfds:NAME[/CONFIG][:VERSION]``  any TFDS image dataset with an ``image`` feature, e.g.
      ``tfds:cifar10``, ``tfds:stl10`` (splits ``unlabelled``/``train``), ``tfds:imagenet2012``,
      ``tfds:imagenet2012_subset/1pct``. Read from ``data_dir`` (TFDS default when None).
  ``folder:PATH``  images in class sub-folders ``PATH/CLASS/**/*.{jpg,jpeg,png}`` (sorted class
      names -> labels 0..C-1). ``split`` picks ``PATH/SPLIT`` when that directory exists (a
      ``train/ val/`` layout; ``dataset_info`` lists train, val, validation and test directories);
      otherwise PATH itself is the ``train`` split. Scans are cached per process.
  ``digits``  scikit-learn's bundled 8x8 handwritten digits (1797 images), pixel values 0..16
      scaled to 0..255, upsampled bilinearly to 32x32 and repeated to RGB; works offline.
      Split ``test`` is every 5th image (index % 5 == 0, 360 images), ``train`` the other 1437.

Normalisation mean/std per dataset (``dataset_info``): CIFAR-10 statistics for cifar10 and
cifar100, the digits ``train`` statistics for digits, ImageNet statistics for everything else.

Offline behaviour: with ``download=False`` nothing is ever downloaded; data that is not prepared
raises ``DatasetNotFoundError`` at once, naming the data_dir searched and how to provide it.

Corrupt files in folders: files with an image extension but no JPEG/PNG signature (first 8 bytes,
checked up front) are skipped with one warning listing them; files whose header is fine but whose
body does not decode (e.g. truncated) are dropped in the pipeline by ``ignore_errors``, which logs
each one. Neither stops a run.

Equal-size datasets (cifar, digits, stl10) are batched as uint8 and augmented a batch at a time
(crop_and_resize with per-image boxes). Variable-size ones (ImageNet, folders) are decoded and
random-resized-cropped image by image (bicubic, as the paper), then batched for the colour steps.

Reproducibility: with ``seed`` set, file order, shuffling and every augmentation are a function of
the seed (augmentation seeds are derived from the element / batch index with stateless ops, so
they do not depend on thread scheduling) and ``options.deterministic`` is on. With ``seed=None``
a random seed is drawn and outputs may be produced out of order for speed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import random
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bt_keras import augment, device_augment, host_crop
from bt_keras.folder_walk import FolderWalk

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DIGITS_MEAN = (0.3052, 0.3052, 0.3052)  # digits `train` split at 32 px, see _digits_arrays
DIGITS_STD = (0.3241, 0.3241, 0.3241)
_DIGITS_SIZE = 32
_AUTO_CACHE_BYTES = 2 * 1024**3  # cache="auto" keeps datasets up to this size in memory
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG
NAME_FORMS = ("'tfds:NAME[/CONFIG]' (e.g. tfds:cifar10, tfds:imagenet2012_subset/1pct), "
              "'folder:PATH' (PATH/CLASS/IMAGE.jpg|.png) or 'digits' (scikit-learn's digits)")

log = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's data is not available locally (and was not to be downloaded)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a pipeline needs to know about a dataset. ``image_shape`` is None for mixed sizes."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int] | None
    splits: dict[str, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class _Source:
    """(image, label int32) examples: uint8 [H, W, 3] if ``image_shape`` is set, else encoded bytes."""

    dataset: tf.data.Dataset
    image_shape: tuple[int, int, int] | None
    nbytes: int  # approximate in-memory size, for cache="auto"


def _parse(name: str) -> tuple[str, str]:
    if name == "digits":
        return "digits", ""
    kind, sep, rest = str(name).partition(":")
    if sep and rest and kind in ("tfds", "folder"):
        return kind, rest
    hint = f" Did you mean 'tfds:{name}'?" if not sep else ""
    raise ValueError(f"unknown dataset name {name!r}; use {NAME_FORMS}.{hint}")


def _stats(name: str) -> tuple[tuple, tuple]:
    kind, rest = _parse(name)
    if kind == "digits":
        return DIGITS_MEAN, DIGITS_STD
    if kind == "tfds" and rest.split("/")[0].split(":")[0] in ("cifar10", "cifar100"):
        return augment.CIFAR10_MEAN, augment.CIFAR10_STD
    return augment.IMAGENET_MEAN, augment.IMAGENET_STD


# ------------------------------------------------------------------------------------------ TFDS


def _tfds_builder(name: str, data_dir, download: bool):
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"TFDS has no dataset {name!r} (see `tfds.list_builders()`); names are {NAME_FORMS}") from None
    if not builder.is_prepared():
        if not download:
            raise DatasetNotFoundError(
                f"TFDS dataset {name!r} is not prepared under data_dir={str(builder.data_dir_root)!r} "
                f"(looked for {builder.data_path}) and download=False. Provide it by running "
                f"`tfds build {name} --data_dir DIR` where there is network access (ImageNet needs its "
                f"archives placed in DIR/downloads/manual first) and passing that DIR as data_dir / "
                f"--data_dir, or set download=True.")
        builder.download_and_prepare()
    if "image" not in builder.info.features:
        raise ValueError(f"TFDS dataset {name!r} has no 'image' feature")
    return builder


def _tfds_source(name, split, data_dir, download, *, shuffle, seed, shard, subset) -> _Source:
    builder = _tfds_builder(name, data_dir, download)
    shape = builder.info.features["image"].shape
    fixed = tuple(shape) if None not in shape else None
    has_label = "label" in builder.info.features
    split_info = builder.info.splits[split]
    if shard[0] > 1:
        split = tfds.even_splits(split, n=shard[0])[shard[1]]

    def read(decode_image: bool, shuffle_files: bool):
        config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False, add_tfds_id=subset is not None)
        decoders = None if decode_image else {"image": tfds.decode.SkipDecoding()}
        return builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=config, decoders=decoders)

    ds = read(fixed is not None, shuffle)
    if subset is not None:
        if not has_label:
            raise ValueError(f"subset needs labels, TFDS dataset {name!r} has none")
        batches = read(False, False).map(lambda e: (e["tfds_id"], e["label"])).batch(8192).as_numpy_iterator()
        ids, labels = (np.concatenate(parts) for parts in zip(*batches))
        keep = ids[_balanced_subset(labels, subset, seed)]
        table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keep, tf.ones(len(keep), tf.int32)), 0)
        ds = ds.filter(lambda e: table.lookup(e["tfds_id"]) == 1)  # by id: independent of read order
        fraction = len(keep) / max(1, len(ids))
    else:
        fraction = 1.0 / shard[0]
    ds = ds.map(lambda e: (e["image"], tf.cast(e["label"] if has_label else -1, tf.int32)), num_parallel_calls=AUTOTUNE)
    total = sum(info.num_examples for info in builder.info.splits.values())
    per_image = int(np.prod(fixed)) if fixed else builder.info.dataset_size / max(1, total)  # encoded bytes
    return _Source(ds, fixed, int(split_info.num_examples * fraction * per_image))


# ------------------------------------------------------------------------------ digits, folders


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 [N, 32, 32, 3] (0..16 -> 0..255, bilinear upsampling) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)[..., None] * (255.0 / 16.0)
    images = tf.image.resize(images, [_DIGITS_SIZE, _DIGITS_SIZE], method="bilinear").numpy()
    images = np.repeat(np.clip(np.round(images), 0, 255).astype(np.uint8), 3, axis=-1)
    return images, digits.target.astype(np.int32)


def _digits_split(split: str) -> np.ndarray:
    if split not in ("train", "test"):
        raise ValueError(f"digits has splits 'train' and 'test', got {split!r}")
    index = np.arange(len(_digits_arrays()[1]))
    return index[(index % 5 == 0) == (split == "test")]


def _folder_root(path: str, split: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"folder dataset: {str(root)!r} does not exist or is not a directory")
    if (root / split).is_dir():
        return root / split
    if split == "train":
        return root
    raise DatasetNotFoundError(f"folder dataset {str(root)!r} has no split directory {str(root / split)!r}")


def _is_image_file(path: str) -> tuple[bool, int]:
    """(starts with a JPEG/PNG signature, size in bytes); unreadable files count as not images."""
    try:
        with open(path, "rb") as f:
            return f.read(8).startswith(_MAGIC), os.fstat(f.fileno()).st_size
    except OSError:
        return False, 0


@functools.lru_cache(maxsize=8)
def _scan_folder(root: Path) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...], int]:
    """(paths, labels, class names, total bytes) of the images under root/CLASS/.

    Every file with a JPEG/PNG extension is checked up front for a JPEG/PNG signature (8 bytes
    read, in threads); files that fail are skipped with one warning giving their count and the
    first few paths. Files with a valid header but a corrupt body are dropped later, in the
    pipeline, by ``ignore_errors`` (TensorFlow logs each one).
    """
    entries = sorted(os.listdir(root)) if root.is_dir() else []
    classes = [d for d in entries if not d.startswith(".") and (root / d).is_dir()]
    if not classes:
        what = "is empty" if not entries else "has no class sub-folders (only files)"
        raise ValueError(f"folder dataset {str(root)!r} {what}; expected images in {root}/CLASS_NAME/*.jpg|.png")
    candidates = []
    walk = FolderWalk()  # follows symlinks, but enters each real directory once and lists each real file once
    for label, name in enumerate(classes):
        candidates += [(path, label) for path in walk.files(root / name) if path.lower().endswith(IMAGE_EXTENSIONS)]
    if walk.skipped:
        log.warning("folder dataset %s: %d symlinked or hard-linked file(s) / folder(s) met a second time were "
                    "counted once (the first place met, in sorted order)", root, walk.skipped)
    if not candidates:
        raise ValueError(f"folder dataset {str(root)!r}: no {'/'.join(IMAGE_EXTENSIONS)} files in its "
                         f"{len(classes)} class sub-folders")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        checks = list(pool.map(_is_image_file, [p for p, _ in candidates]))
    bad = [p for (p, _), (ok, _) in zip(candidates, checks) if not ok]
    if bad:
        log.warning("folder dataset %s: skipping %d file(s) that are not JPEG/PNG images: %s%s",
                    root, len(bad), ", ".join(bad[:5]), " ..." if len(bad) > 5 else "")
    good = [(p, label) for (p, label), (ok, _) in zip(candidates, checks) if ok]
    if not good:
        raise ValueError(f"folder dataset {str(root)!r}: none of its {len(candidates)} image files is a valid JPEG/PNG")
    paths, labels = zip(*good)
    return paths, labels, tuple(classes), sum(size for ok, size in checks if ok)


def check_subset(subset) -> None:
    """A class-balanced subset is a fraction (float in (0, 1]) or a count (int >= 1) of each class."""
    if isinstance(subset, bool) or not (isinstance(subset, int) and subset >= 1
                                        or isinstance(subset, float) and 0.0 < subset <= 1.0):
        raise ValueError(f"subset must be a fraction in (0, 1] (0.01 = 1% of each class) or a per-class count >= 1, "
                         f"got {subset!r}")


def _balanced_subset(labels: np.ndarray, subset, seed) -> np.ndarray:
    """Sorted indices of a seeded class-balanced subset (see `check_subset`), at least one example per class."""
    check_subset(subset)
    rng = np.random.default_rng(0 if seed is None else seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        k = min(len(members), subset if isinstance(subset, int) else max(1, round(subset * len(members))))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def _open(name, split, data_dir, download, *, shuffle=False, seed=None, shard=(1, 0), subset=None) -> _Source:
    kind, rest = _parse(name)
    if kind == "tfds":
        return _tfds_source(rest, split, data_dir, download, shuffle=shuffle, seed=seed, shard=shard, subset=subset)
    if kind == "digits":
        images, labels = _digits_arrays()
        index = _digits_split(split)
    else:
        paths, labels, _, nbytes = _scan_folder(_folder_root(rest, split))
        index = np.arange(len(paths))
    labels = np.asarray(labels, np.int32)
    if subset is not None:
        index = index[_balanced_subset(labels[index], subset, seed)]
    if shuffle:  # a seeded permutation, so that shards and uncached reads mix the classes
        index = np.random.default_rng(seed).permutation(index)
    index = index[shard[1]::shard[0]]
    if kind == "digits":
        return _Source(tf.data.Dataset.from_tensor_slices((images[index], labels[index])),
                       images.shape[1:], images[index].nbytes)
    ds = tf.data.Dataset.from_tensor_slices((np.asarray(paths)[index], labels[index]))
    ds = ds.map(lambda p, label: (tf.io.read_file(p), label), num_parallel_calls=AUTOTUNE)
    return _Source(ds, None, int(nbytes * len(index) / max(1, len(paths))))


def _want_cache(cache, source: _Source) -> bool:
    if cache == "auto":
        return source.nbytes <= _AUTO_CACHE_BYTES
    if not isinstance(cache, bool):
        raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
    return cache


def _fold(key: tf.Tensor, index) -> tf.Tensor:
    """A new stateless seed from ``key`` and an element / batch index."""
    return tf.random.experimental.stateless_fold_in(key, index)


def _split_pair(seed: tf.Tensor) -> list[tf.Tensor]:
    return tf.unstack(tf.random.experimental.stateless_split(seed, 2))


def _decode(data: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG (also gray or RGBA) -> uint8 RGB [H, W, 3]."""
    return tf.ensure_shape(tf.io.decode_image(data, channels=3, expand_animations=False), [None, None, 3])


# ------------------------------------------------------------------------------------ pipelines


def dataset_info(name: str, data_dir=None, download: bool = False) -> DatasetInfo:
    """Classes, fixed image shape (None if sizes vary), split sizes and normalisation stats."""
    mean, std = _stats(name)
    kind, rest = _parse(name)
    if kind == "tfds":
        builder = _tfds_builder(rest, data_dir, download)
        shape = tuple(builder.info.features["image"].shape)
        label = builder.info.features["label"] if "label" in builder.info.features else None
        return DatasetInfo(name, label.num_classes if label else 0, None if None in shape else shape,
                           {k: v.num_examples for k, v in builder.info.splits.items()}, mean, std)
    if kind == "digits":
        return DatasetInfo(name, 10, (_DIGITS_SIZE, _DIGITS_SIZE, 3),
                           {s: len(_digits_split(s)) for s in ("train", "test")}, mean, std)
    base = Path(rest).expanduser()
    splits = [s for s in ("train", "val", "validation", "test") if (base / s).is_dir()] or ["train"]
    scans = {s: _scan_folder(_folder_root(rest, s)) for s in splits}
    classes = scans[splits[0]][2]
    return DatasetInfo(name, len(classes), None, {s: len(scan[0]) for s, scan in scans.items()}, mean, std)


def default_views(name: str, data_dir=None) -> tuple[augment.ViewConfig, augment.ViewConfig]:
    """The CIFAR recipe at the native size for fixed-size images up to 64 px, else the ImageNet
    recipe at 224 px; with the dataset's normalisation statistics."""
    info = dataset_info(name, data_dir)
    if info.image_shape and max(info.image_shape[:2]) <= 64:
        views = augment.cifar_views(info.image_shape[0])
    else:
        views = augment.imagenet_views(224)
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
    ``bt_keras.device_augment``); the model's train_step applies the colour steps from the same seeds, so
    the views equal ``augment_on="host"``'s. Encoded JPEGs are decoded straight to the crop window in both
    modes (``bt_keras.host_crop``; same pixels); ``dct_scaling=True`` also decodes large crops at 1/2-1/8
    scale in libjpeg, which is faster but changes pixels slightly.

    ``epoch_keyed=True`` folds the epoch into every augmentation seed as well (a different stream from the default):
    for the tf.data service, whose workers each take whole epochs but count batches from 0 each, so (epoch, index)
    is what keeps their seeds distinct (``bt_keras.data_service``).
    """
    device_augment.check_augment_on(augment_on)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    view1, view2 = views
    if not (isinstance(view1, augment.ViewConfig) and isinstance(view2, augment.ViewConfig)):
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
    crop_key, batch_key = _fold(key, 0), _fold(key, 1)
    if encoded:  # per-image decode + random resized crop, keyed by the global image index
        def crop_pair(i, data):  # decodes a JPEG once, only the crop windows: same pixels as a full decode + crop
            e, data = data if epoch_keyed else (None, data)
            data, label = data if labels else (data, None)
            image_key = _fold(_fold(crop_key, e), i) if epoch_keyed else _fold(crop_key, i)
            crops = host_crop.decode_random_resized_crop_pair(data, views, _split_pair(image_key),
                                                              dct_scaling=dct_scaling)
            crops = crops if label is None else crops + (label,)
            return (e, crops) if epoch_keyed else crops

        ds = (ds.unbatch().enumerate(start=start_batch * batch_size).map(crop_pair, num_parallel_calls=AUTOTUNE)
              .ignore_errors(log_warning=True).batch(batch_size, drop_remainder=True))

    def augment_pair(i, batch):  # stage 1 (uint8 crops) here; stage 2 here or in the model (device_augment)
        if epoch_keyed:
            epochs, batch = batch
            s1, s2 = _split_pair(_fold(_fold(batch_key, epochs[0]), i))
        else:
            s1, s2 = _split_pair(_fold(batch_key, i))
        batch_labels = None
        if labels:  # encoded: (crops1, crops2, labels); decoded: (images, labels)
            batch, batch_labels = (batch[:2], batch[2]) if encoded else (batch[0], batch[1])
        extra = () if batch_labels is None else (batch_labels,)
        if encoded:
            crops1, crops2 = (augment.rotate_batch(c, v, s) for c, v, s in zip(batch, views, (s1, s2)))
        elif batch.dtype != tf.uint8:  # float images in [0, 1]: no uint8 stage, host mode only
            if augment_on == "accelerator":
                raise ValueError(f"augment_on='accelerator' needs uint8 images, got {batch.dtype.name}")
            return (augment.augment_batch(batch, view1, s1), augment.augment_batch(batch, view2, s2)) + extra
        else:
            crops1, crops2 = augment.geometric_batch(batch, view1, s1), augment.geometric_batch(batch, view2, s2)
        if augment_on == "accelerator":
            return device_augment.host_batch(crops1, crops2, views, s1, s2, labels=batch_labels)
        return (augment.photometric_batch(crops1, view1, s1), augment.photometric_batch(crops2, view2, s2)) + extra

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
    ``epoch_keyed``: see ``pair_batches`` (accelerator mode yields uint8 crops + seeds for ``bt_keras.device_augment``).
    """
    views = default_views(name, data_dir) if views is None else views
    shard, batch_size = (1, 0), global_batch_size
    if input_context is not None:
        shard = (input_context.num_input_pipelines, input_context.input_pipeline_id)
        batch_size = input_context.get_per_replica_batch_size(global_batch_size)
    source = _open(name, split, data_dir, download, shuffle=True, seed=seed, shard=shard)
    images = source.dataset if labels else source.dataset.map(lambda image, label: image)
    return pair_batches(images, batch_size=batch_size, views=views, encoded=source.image_shape is None,
                        seed=None if seed is None else (seed, shard[1]), shuffle_buffer=shuffle_buffer,
                        cache=_want_cache(cache, source), repeat=repeat, start_batch=start_batch, labels=labels,
                        augment_on=augment_on, dct_scaling=dct_scaling, epoch_keyed=epoch_keyed)


def labelled_dataset(name: str, *, split: str, batch_size: int, image_size: int, train: bool = False,
                     data_dir=None, download: bool = False, shuffle: bool | None = None, seed: int | None = None,
                     repeat: bool = False, subset=None, shuffle_buffer: int = 10_000, cache="auto") -> tf.data.Dataset:
    """(images float32 [B, S, S, 3] normalised, labels int32 [B]) batches for linear probes.

    ``train=True``: ``augment.train_eval_transform`` (random resized crop + flip); else
    ``augment.eval_transform`` (resize + center crop, identity for S x S images). ``shuffle``
    defaults to ``train``. ``subset``: class-balanced subset, a fraction (0.01 = 1% of each class)
    or a per-class count, selected with ``seed`` (0 when None); for TFDS this reads the split's
    labels once (for ImageNet use ``tfds:imagenet2012_subset/1pct`` instead). The last batch may
    be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shuffle = train if shuffle is None else shuffle
    mean, std = _stats(name)
    source = _open(name, split, data_dir, download, shuffle=shuffle, seed=seed, subset=subset)
    ds = source.dataset.cache() if _want_cache(cache, source) else source.dataset
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed)
    if repeat:
        ds = ds.repeat()
    encoded = source.image_shape is None

    def decode(image):
        return _decode(image) if encoded else image

    if train:
        key = tf.constant((random.SystemRandom().randrange(2**31) if seed is None else seed, 1), tf.int64)
        ds = ds.enumerate().map(lambda i, ex: (augment.train_eval_transform(
            decode(ex[0]), image_size, mean, std, _fold(key, i)), ex[1]),
            num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(lambda image, label: (augment.eval_transform(decode(image), image_size, mean, std), label),
                    num_parallel_calls=AUTOTUNE)
    if encoded:
        ds = ds.ignore_errors(log_warning=True)
    options = tf.data.Options()
    options.deterministic = seed is not None or not shuffle
    return ds.batch(batch_size).prefetch(AUTOTUNE).with_options(options)
