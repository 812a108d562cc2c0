"""Datasets by name, opened as (image, label) streams: TFDS, image folders, the bundled digits and cluttered digits.

The pipelines built on them: `bt_keras.data.pretrain` (pairs of views) and `bt_keras.data.labelled` (probes).

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
  ``cluttered_digits``  the same digits at random positions, sizes and rotations on noisy 32x32 canvases with
      fragments of other digits (`bt_keras.data.cluttered_digits`, generated in memory, offline): ``train`` 2874
      canvases of 1437 source digits, ``test`` 720 of the other 360.

Normalisation mean/std per dataset (``dataset_info``): CIFAR-10 statistics for cifar10 and
cifar100, each ``train`` split's own statistics for digits and cluttered_digits, ImageNet statistics for everything
else.

Offline behaviour: with ``download=False`` nothing is ever downloaded; data that is not prepared
raises ``DatasetNotFoundError`` at once, naming the data_dir searched and how to provide it.

Corrupt files in folders: every file with an image extension is decoded fully once, up front
(`bt_keras.data.image_check`: not an image, truncated, garbage in the middle), and the bad ones are
left out of the file list before the seeded shuffle, with one warning giving their count, so split
sizes, steps per epoch and the stream (a pure function of seed and step) count only files that
decode. A training run lists them in WORKDIR/bad_images.txt (`check_folder_images`);
``python -m bt_keras.data_check PATH`` lists them before a run. Neither stops a run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bt_keras import views
import bt_keras.data.cluttered_digits as cluttered_digits  # not `from bt_keras.data import`: see image_check
import bt_keras.data.image_check as image_check  # not `from bt_keras.data import`: its lazy names import us
from bt_keras.data.folder_walk import FolderWalk

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DIGITS_MEAN = (0.3052, 0.3052, 0.3052)  # digits `train` split at 32 px, see _digits_arrays
DIGITS_STD = (0.3241, 0.3241, 0.3241)
CLUTTERED_MEAN = (0.1551, 0.1551, 0.1551)  # cluttered_digits `train` split, see bt_keras.data.cluttered_digits
CLUTTERED_STD = (0.2352, 0.2352, 0.2352)
ARRAY_DATASETS = ("digits", "cluttered_digits")  # generated in memory from scikit-learn's digits
_DIGITS_SIZE = 32
_AUTO_CACHE_BYTES = 2 * 1024**3  # cache="auto" keeps datasets up to this size in memory
NAME_FORMS = ("'tfds:NAME[/CONFIG]' (e.g. tfds:cifar10, tfds:imagenet2012_subset/1pct), "
              "'folder:PATH' (PATH/CLASS/IMAGE.jpg|.png), 'digits' (scikit-learn's digits) or 'cluttered_digits' "
              "(those digits moved, scaled and rotated among clutter)")

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
    bad_files: dict[str, int] = dataclasses.field(default_factory=dict)  # folder: per split, left out


@dataclasses.dataclass(frozen=True)
class Source:
    """(image, label int32) examples: uint8 [H, W, 3] if ``image_shape`` is set, else encoded bytes."""

    dataset: tf.data.Dataset
    image_shape: tuple[int, int, int] | None
    nbytes: int  # approximate in-memory size, for cache="auto"


def _parse(name: str) -> tuple[str, str]:
    if name in ARRAY_DATASETS:
        return name, ""
    kind, sep, rest = str(name).partition(":")
    if sep and rest and kind in ("tfds", "folder"):
        return kind, rest
    hint = f" Did you mean 'tfds:{name}'?" if not sep else ""
    raise ValueError(f"unknown dataset name {name!r}; use {NAME_FORMS}.{hint}")


def normalization_stats(name: str) -> tuple[tuple, tuple]:
    kind, rest = _parse(name)
    if kind == "digits":
        return DIGITS_MEAN, DIGITS_STD
    if kind == "cluttered_digits":
        return CLUTTERED_MEAN, CLUTTERED_STD
    if kind == "tfds" and rest.split("/")[0].split(":")[0] in ("cifar10", "cifar100"):
        return views.CIFAR10_MEAN, views.CIFAR10_STD
    return views.IMAGENET_MEAN, views.IMAGENET_STD


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


def _tfds_source(name, split, data_dir, download, *, shuffle, seed, shard, subset) -> Source:
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
    return Source(ds, fixed, int(split_info.num_examples * fraction * per_image))


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


def _array_split(kind: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 32, 32, 3], int32 labels [N]) of an in-memory dataset's split (see ARRAY_DATASETS)."""
    if kind == "digits":
        images, labels = _digits_arrays()
        index = _digits_split(split)
        return images[index], labels[index]
    canvases = cluttered_digits.generate(split)
    return canvases.images, canvases.labels


def _folder_root(path: str, split: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"folder dataset: {str(root)!r} does not exist or is not a directory")
    if (root / split).is_dir():
        return root / split
    if split == "train":
        return root
    raise DatasetNotFoundError(f"folder dataset {str(root)!r} has no split directory {str(root / split)!r}")


@functools.lru_cache(maxsize=8)
def _walk_folder(root: Path) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    """((path, label) of every file with an image extension under root/CLASS/, class names), in sorted order."""
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
    return tuple(candidates), tuple(classes)


def _check_folder(root: Path, candidates=None, **options) -> image_check.Check:
    """Which of the folder's image files do not decode (`bt_keras.data.image_check`: decoded once per file list).
    `candidates`: the folder's `_walk_folder` entries when the caller has walked it already; `options`: check_files'."""
    if candidates is None:
        candidates = _walk_folder(root)[0]
    return image_check.check_files([path for path, _ in candidates], label=str(root), **options)


def _scan_folder(root: Path) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...], int]:
    """(paths, labels, class names, total bytes) of the images that decode under root/CLASS/ (`_scan_folder_checked`)."""
    return _scan_folder_checked(root)[:4]


@functools.lru_cache(maxsize=8)
def _scan_folder_checked(root: Path) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...], int, dict[str, str]]:
    """(paths, labels, class names, total bytes, {bad path: reason}) of the images under root/CLASS/.

    Every file with a JPEG/PNG extension is decoded fully once (`_check_folder`); the ones that are not images or do
    not decode are left out, with one warning giving their count and the first few paths, so that everything after
    (split sizes, steps per epoch, the seeded shuffle) sees only files that decode.
    """
    candidates, classes = _walk_folder(root)
    check = _check_folder(root, candidates)
    if check.bad:
        not_images = {p for p, reason in check.bad.items() if reason.startswith(("not a JPEG", "empty file"))}
        broken = [p for p in check.bad if p not in not_images]
        shown = ", ".join(f"{p} ({check.bad[p]})" for p in list(check.bad)[:5])
        log.warning("folder dataset %s: skipping %d file(s) that are not JPEG/PNG images and %d that do not decode "
                    "(`python -m bt_keras.data_check %s` lists them all): %s%s", root, len(not_images), len(broken),
                    root, shown, " ..." if len(check.bad) > 5 else "")
    good = [(p, label) for p, label in candidates if p not in check.bad]
    paths, labels = zip(*good) if good else ((), ())
    return paths, labels, classes, check.good_bytes, check.bad


def _folder_splits(path: str) -> list[str]:
    """The split directories of a folder dataset (train, val, validation, test), or ["train"] for PATH itself."""
    base = Path(path).expanduser()
    return [s for s in ("train", "val", "validation", "test") if (base / s).is_dir()] or ["train"]


def check_folder_images(name: str, workdir=None, *, threads: int | None = None,
                        progress: bool | None = None) -> "FolderImages":
    """For a `folder:` dataset, each split's files decoded once (`bt_keras.data.image_check`), reusing a check
    `workdir` kept from an earlier start; `.record()` then keeps it there and lists the bad files in
    WORKDIR/bad_images.txt. Other datasets: nothing to check or record."""
    kind, rest = _parse(name)
    if kind != "folder":
        return FolderImages(name, workdir, (), ())
    roots = tuple(_folder_root(rest, s) for s in _folder_splits(rest))
    checks = tuple(_check_folder(root, cache_folder=workdir, threads=threads, progress=progress) for root in roots)
    return FolderImages(name, workdir, roots, checks)


@dataclasses.dataclass(frozen=True)
class FolderImages:
    """The checks of a folder dataset's split folders (`check_folder_images`), to record in a workdir."""

    name: str
    workdir: object
    roots: tuple  # the split folders checked
    checks: tuple  # their image_check.Check, in the same order

    def record(self) -> None:
        """Keeps the checks in the workdir for the next start and lists the bad files (`image_check.record`)."""
        if not self.checks or self.workdir is None:
            return
        listing = image_check.record(self.workdir, self.checks)
        if listing is not None:
            count = sum(len(check.bad) for check in self.checks)
            log.warning("%s: %d file(s) that do not decode are left out; listed in %s", self.name, count, listing)


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


def open_source(name, split, data_dir, download, *, shuffle=False, seed=None, shard=(1, 0), subset=None) -> Source:
    kind, rest = _parse(name)
    if kind == "tfds":
        return _tfds_source(rest, split, data_dir, download, shuffle=shuffle, seed=seed, shard=shard, subset=subset)
    if kind in ARRAY_DATASETS:
        images, labels = _array_split(kind, split)
        index = np.arange(len(labels))
    else:
        root = _folder_root(rest, split)
        paths, labels, _, nbytes, bad = _scan_folder_checked(root)
        if not paths:
            raise ValueError(f"folder dataset {str(root)!r}: none of its {len(bad)} image files decodes; "
                             f"`python -m bt_keras.data_check {root}` lists why")
        index = np.arange(len(paths))
    labels = np.asarray(labels, np.int32)
    if subset is not None:
        index = index[_balanced_subset(labels[index], subset, seed)]
    if shuffle:  # a seeded permutation, so that shards and uncached reads mix the classes
        index = np.random.default_rng(seed).permutation(index)
    index = index[shard[1]::shard[0]]
    if kind in ARRAY_DATASETS:
        return Source(tf.data.Dataset.from_tensor_slices((images[index], labels[index])),
                       images.shape[1:], images[index].nbytes)
    ds = tf.data.Dataset.from_tensor_slices((np.asarray(paths)[index], labels[index]))
    ds = ds.map(lambda p, label: (tf.io.read_file(p), label), num_parallel_calls=AUTOTUNE)
    return Source(ds, None, int(nbytes * len(index) / max(1, len(paths))))


def want_cache(cache, source: Source) -> bool:
    if cache == "auto":
        return source.nbytes <= _AUTO_CACHE_BYTES
    if not isinstance(cache, bool):
        raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
    return cache


def fold_seed(key: tf.Tensor, index) -> tf.Tensor:
    """A new stateless seed from ``key`` and an element / batch index."""
    return tf.random.experimental.stateless_fold_in(key, index)


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG (also gray or RGBA) -> uint8 RGB [H, W, 3]."""
    return tf.ensure_shape(tf.io.decode_image(data, channels=3, expand_animations=False), [None, None, 3])


def dataset_info(name: str, data_dir=None, download: bool = False) -> DatasetInfo:
    """Classes, fixed image shape (None if sizes vary), split sizes and normalisation stats."""
    mean, std = normalization_stats(name)
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
    if kind == "cluttered_digits":
        return DatasetInfo(name, 10, (cluttered_digits.CANVAS, cluttered_digits.CANVAS, 3),
                           cluttered_digits.split_sizes(), mean, std)
    splits = _folder_splits(rest)
    scans = {s: _scan_folder_checked(_folder_root(rest, s)) for s in splits}
    classes = scans[splits[0]][2]
    return DatasetInfo(name, len(classes), None, {s: len(scan[0]) for s, scan in scans.items()}, mean, std,
                       {s: len(scan[4]) for s, scan in scans.items()})
