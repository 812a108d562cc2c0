"""What the three evaluation protocols share: opening an encoder, choosing its preprocessing, labelled batches,
feature extraction, top-k accuracy, and the result (JSON file + one-row table).

Encoders come in two kinds, both seen as `model(images, training=False) -> features [batch, D]` on normalised
images:

* Keras (`kind="keras"`): a training workdir (its `encoder.keras` + `encoder.json`), an `encoder.keras` file, a
  BarlowTwins `.keras` file, or a training checkpoint `workdir/checkpoints/ckpt-STEP`, all read by
  `bt_keras.checkpoints.load_encoder`. Usable by every protocol.
* SavedModel (`kind="savedmodel"`): an export of `export/savedmodel.py`, given as its base directory (the highest
  version is taken) or as one version directory `<export_dir>/<version>/`. Inference only (kNN, linear probe).
  It is called through its `embed_normalized` signature on images preprocessed here with the export's own
  image_size / mean / std (from `assets.extra/bt_keras.json`); `embed_pixels` would run the very same
  `bt_keras.augment.eval_transform` inside the graph, so the features are the same.

`open_encoder` is the one place that knows these formats; add new ones there.

Preprocessing (`resolve_preprocessing`): image size, mean and std come from the encoder's metadata unless overridden
(`--image_size`, `--mean`, `--std`); `bt_keras.data.labelled_dataset` normalises with the dataset's statistics, and
`labelled_batches` re-normalises its output to the encoder's when they differ (an exact per-channel affine map).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from bt_keras import checkpoints, data

# Written by export/savedmodel.py (names repeated here so that evaluation does not import the export package).
SAVEDMODEL_METADATA = Path("assets.extra") / "bt_keras.json"
SAVEDMODEL_SIGNATURE = "embed_normalized"
SAVEDMODEL_INPUT, SAVEDMODEL_OUTPUT = "normalized", "embedding"

ENCODER_FORMS = ("a training workdir (holding encoder.keras), an encoder.keras or BarlowTwins .keras file, a "
                 "training checkpoint workdir/checkpoints/ckpt-STEP, or a SavedModel export (export_dir or "
                 "export_dir/VERSION)")


# ------------------------------------------------------------------------------------------------ opening encoders


class SavedModelEncoder:
    """An exported SavedModel as an inference-only encoder: `encoder(normalised images) -> embedding`."""

    def __init__(self, directory: Path, metadata: dict):
        self.directory = directory
        self.loaded = tf.saved_model.load(str(directory))
        if SAVEDMODEL_SIGNATURE not in self.loaded.signatures:
            raise ValueError(f"SavedModel {directory} has no {SAVEDMODEL_SIGNATURE!r} signature (it has "
                             f"{sorted(self.loaded.signatures)}); export it with `python -m export.savedmodel`.")
        self.signature = self.loaded.signatures[SAVEDMODEL_SIGNATURE]
        size = int(metadata["image_size"])
        self.input_shape = (None, size, size, 3)
        self.output_shape = tuple(self.signature.structured_outputs[SAVEDMODEL_OUTPUT].shape.as_list())

    def __call__(self, images, training=False):
        if training:
            raise ValueError("A SavedModel export is inference-only; fine-tune the Keras encoder (the training "
                             "workdir or its encoder.keras) instead.")
        return self.signature(**{SAVEDMODEL_INPUT: tf.cast(images, tf.float32)})[SAVEDMODEL_OUTPUT]


@dataclasses.dataclass
class Encoder:
    """An encoder to evaluate. `model(images, training=False)` maps normalised NHWC images to features [batch, D]."""

    model: Any  # keras.Model or SavedModelEncoder
    metadata: dict
    path: Path
    kind: str  # "keras" or "savedmodel"

    @property
    def input_shape(self) -> tuple:
        return tuple(self.model.input_shape)

    @property
    def feature_dim(self) -> int:
        return int(self.model.output_shape[-1])

    def describe(self) -> dict:
        """What a result file records about the encoder."""
        keep = ("backbone", "dataset", "step", "image_size", "feature_dim", "checkpoint", "export_version")
        return {"path": str(self.path), "kind": self.kind, **{k: self.metadata[k] for k in keep if k in self.metadata}}


def _savedmodel_version_dir(path: Path) -> Path | None:
    """`path` itself if it is a SavedModel directory, the highest numbered version inside it, or None."""
    if (path / "saved_model.pb").is_file():
        return path
    if path.is_dir():
        versions = sorted((int(p.name), p) for p in path.iterdir()
                          if p.is_dir() and re.fullmatch(r"\d+", p.name) and (p / "saved_model.pb").is_file())
        if versions:
            return versions[-1][1]
    return None


def _open_savedmodel(directory: Path) -> Encoder:
    meta_path = directory / SAVEDMODEL_METADATA
    if not meta_path.is_file():
        raise ValueError(f"SavedModel {directory} has no {SAVEDMODEL_METADATA}: it is not a bt_keras export, so its "
                         "preprocessing is unknown. Export encoders with `python -m export.savedmodel`.")
    exported = json.loads(meta_path.read_text())
    prep = exported.get("preprocessing", {})
    metadata = {**exported.get("encoder_metadata", {}), **{k: prep[k] for k in ("image_size", "mean", "std")
                                                             if k in prep}}
    metadata["export_version"] = exported.get("version")
    if exported.get("l2_normalize"):
        metadata["l2_normalized_embedding"] = True
    model = SavedModelEncoder(directory, metadata)
    metadata["feature_dim"] = int(model.output_shape[-1])
    return Encoder(model, metadata, directory, "savedmodel")


def _check_image_encoder(model, path) -> None:
    """Refuses models that do not map NHWC RGB images to feature vectors (e.g. a classifier head or a projector)."""
    try:
        input_shape, output_shape = tuple(model.input_shape), tuple(model.output_shape)
    except (AttributeError, ValueError) as error:  # subclassed, unbuilt or multi-input models
        raise ValueError(f"{path} does not hold an encoder with one image input and one feature output: {error}") \
            from None
    if len(input_shape) != 4 or input_shape[-1] not in (3, None) or len(output_shape) != 2:
        raise ValueError(f"{path} holds a model of another architecture: it maps inputs of shape {input_shape} to "
                         f"{output_shape}, and evaluation needs an image encoder, NHWC RGB images [batch, H, W, 3] "
                         "-> features [batch, D]. Pass the encoder of a Barlow Twins run (" + ENCODER_FORMS + ").")


def open_encoder(path) -> Encoder:
    """Opens any encoder this package writes (see the module docstring). Raises FileNotFoundError for a path that
    holds none, ValueError for a file that is not an image encoder."""
    path = Path(path).expanduser()
    if Path(f"{path}.index").is_file():  # a training checkpoint prefix
        model, metadata = checkpoints.load_encoder(path)
        _check_image_encoder(model, path)
        return Encoder(model, metadata, path, "keras")
    if not path.exists():
        raise FileNotFoundError(f"--encoder {path} does not exist. Pass {ENCODER_FORMS}.")
    savedmodel = _savedmodel_version_dir(path)
    if savedmodel is not None:
        return _open_savedmodel(savedmodel)
    try:
        model, metadata = checkpoints.load_encoder(path)
    except FileNotFoundError as error:
        ckpts = sorted((path / "checkpoints").glob("ckpt-*.index"), key=lambda p: int(p.stem.split("-")[-1])) \
            if path.is_dir() else []
        hint = f" Training may still be running; evaluate its latest checkpoint with --encoder=" \
               f"{ckpts[-1].with_suffix('')}." if ckpts else ""
        raise FileNotFoundError(f"{error}{hint}") from None
    _check_image_encoder(model, path)
    return Encoder(model, metadata, path, "keras")


# ----------------------------------------------------------------------------------------------- preprocessing


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


def resolve_preprocessing(encoder: Encoder, info: data.DatasetInfo, image_size: int | None = None,
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
                         f"describes. Fix image_size in {checkpoints.ENCODER_METADATA} beside it.")
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


# ----------------------------------------------------------------------------------------------------- datasets


def check_labelled(info: data.DatasetInfo) -> None:
    """kNN, linear probes and fine-tuning all need class labels."""
    if not info.num_classes:
        raise ValueError(f"{info.name} has no labels (no 'label' feature): kNN, linear and fine-tuning evaluation "
                         "need a labelled dataset, e.g. tfds:cifar10, tfds:imagenet2012, a folder:PATH of class "
                         "sub-folders, or digits. Pre-train on unlabelled data, then evaluate on a labelled one.")


def check_split(info: data.DatasetInfo, split: str) -> None:
    if split not in info.splits:
        raise ValueError(f"{info.name} has no split {split!r}; its splits are {sorted(info.splits)}.")


def default_test_split(info: data.DatasetInfo) -> str:
    """`test` when the dataset has one, else `validation` / `val` (ImageNet's held-out split)."""
    for split in ("test", "validation", "val"):
        if split in info.splits:
            return split
    raise ValueError(f"{info.name} has no test/validation split (splits: {sorted(info.splits)}); pass --test_split.")


def parse_subset(text):
    """`--subset` as data.labelled_dataset takes it: '0.01' -> a fraction of each class, '5' -> 5 per class."""
    if text in (None, "", "none", "None"):
        return None
    if isinstance(text, (int, float)):
        return text
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--subset must be a fraction such as 0.01 or a per-class count such as 5, got "
                             f"{text!r}") from None


def check_subset(subset, info: data.DatasetInfo, split: str) -> None:
    """Refuses a fraction so small that an average class of `split` would keep round(fraction x size) = 0 examples.

    (`data.labelled_dataset` would quietly keep one example per class instead, which is not what was asked.)
    """
    if subset is None:
        return
    if isinstance(subset, bool) or not (isinstance(subset, int) and subset >= 1 or
                                        isinstance(subset, float) and 0.0 < subset <= 1.0):
        raise ValueError(f"--subset must be a fraction in (0, 1] (0.01 = 1% of each class) or a per-class count "
                         f">= 1, got {subset!r}.")
    if isinstance(subset, float):
        per_class = info.splits[split] / max(1, info.num_classes)
        if subset * per_class < 0.5:
            smallest = 0.5 / per_class
            raise ValueError(
                f"--subset={subset} keeps {subset} x ~{per_class:.0f} = {subset * per_class:.2g} examples of an "
                f"average class of {info.name} {split!r} ({info.splits[split]} examples, {info.num_classes} "
                f"classes): classes would be empty. Use --subset >= {_round_up(smallest)} (at least one example "
                "per class), or a per-class count such as --subset=1.")


def _round_up(x: float) -> str:
    digits = max(0, -math.floor(math.log10(x)) + 1)
    return f"{math.ceil(x * 10 ** digits) / 10 ** digits:g}"


def _renormalize(ds: tf.data.Dataset, source: tuple, target: Preprocessing) -> tf.data.Dataset:
    """Maps images normalised with the dataset's (mean, std) to the encoder's: x' = x * s/s' + (m - m')/s'."""
    mean, std = (np.asarray(v, np.float32) for v in source)
    if np.allclose(mean, target.mean) and np.allclose(std, target.std):
        return ds
    scale = tf.constant(std / np.asarray(target.std, np.float32))
    shift = tf.constant((mean - np.asarray(target.mean, np.float32)) / np.asarray(target.std, np.float32))
    return ds.map(lambda x, y: (x * scale + shift, y), num_parallel_calls=tf.data.AUTOTUNE)


def labelled_batches(name: str, split: str, prep: Preprocessing, info: data.DatasetInfo, *, batch_size: int,
                     data_dir=None, download: bool = False, train: bool = False, shuffle: bool | None = None,
                     subset=None, limit: int | None = None, seed: int | None = 0) -> tf.data.Dataset:
    """(images normalised for the encoder, int32 labels) batches of `split`, through `data.labelled_dataset`.

    `train=False`: the eval transform (resize to image_size / 0.875 + center crop; identity for image_size
    images), in the split's stored order. `train=True`: random resized crop + flip. `subset`: a seeded
    class-balanced fraction or per-class count (data.labelled_dataset). `limit`: only the first `limit` examples
    (in the split's stored order unless shuffled), for quick runs.
    """
    ds = data.labelled_dataset(name, split=split, batch_size=batch_size, image_size=prep.image_size, train=train,
                               data_dir=data_dir, download=download, shuffle=shuffle, seed=seed, subset=subset,
                               cache=False if limit else "auto")
    if limit:
        ds = ds.unbatch().take(limit).batch(batch_size)
    return _renormalize(ds, (info.mean, info.std), prep)


def training_batches(name: str, split: str, prep: Preprocessing, info: data.DatasetInfo, *, batch_size: int,
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


def _num_batches(dataset) -> int | None:
    try:
        n = int(dataset.cardinality())
    except (AttributeError, TypeError):
        return None
    return n if n >= 0 else None


# ----------------------------------------------------------------------------------------------------- features


def as_callable(encoder) -> Callable:
    """The `model(images, training=False)` of an Encoder, a Keras model or any such callable."""
    return encoder.model if isinstance(encoder, Encoder) else encoder


_INFERENCE_FUNCTIONS = weakref.WeakKeyDictionary()


def inference_function(model) -> Callable:
    """`tf.function(images -> model(images, training=False))`, made once per model (tracing a ResNet takes seconds;
    the trainer's kNN monitor extracts features every few epochs). Holds the model weakly."""
    try:
        return _INFERENCE_FUNCTIONS[model]
    except (KeyError, TypeError):
        pass
    ref = weakref.ref(model)
    function = tf.function(lambda images: ref()(images, training=False), reduce_retracing=True)
    _INFERENCE_FUNCTIONS[model] = function
    return function


def extract_features(encoder, dataset, *, verbose: int = 0, description: str = "features",
                     steps: int | None = None):
    """Runs the encoder in inference mode over `dataset` of (images, labels) batches.

    Returns `(features float32 [N, D], labels int64 [N])` as NumPy arrays, in the dataset's order. `encoder` is an
    `Encoder`, a Keras model, or any callable `f(images, training=False)` (e.g. encoder + classifier head).
    `steps`: the number of batches, if known, for the progress bar (shown when `verbose`).
    """
    forward = inference_function(as_callable(encoder))
    progbar = None
    if verbose:
        print(f"Extracting {description}")
        progbar = keras.utils.Progbar(steps or _num_batches(dataset), unit_name="batch", verbose=verbose)
    features, labels, step = [], [], 0
    for step, (images, batch_labels) in enumerate(dataset, start=1):
        features.append(tf.cast(forward(images), tf.float32).numpy())
        labels.append(np.asarray(batch_labels, np.int64).reshape(-1))
        if progbar:
            progbar.update(step)
    if progbar and progbar.target is None:  # a known target finalises itself
        progbar.update(step, finalize=True)
    if not features:
        raise ValueError(f"No examples to extract {description} from: the dataset is empty.")
    return np.concatenate(features), np.concatenate(labels)


def check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    """Refuses unlabelled examples (TFDS marks them -1, e.g. STL-10's `unlabelled` split) and unknown classes."""
    if labels.size and labels.min() < 0:
        raise ValueError(f"{what} holds unlabelled examples (label {labels.min()}): evaluate on a labelled split, "
                         "e.g. --train_split=train.")
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"{what} has label {labels.max()} but the dataset has {num_classes} classes.")


def topk_accuracy(scores, labels, ks=(1, 5)) -> tuple[float, ...]:
    """Fraction of rows whose label is among the k highest scores, for each k (capped at the number of classes).

    Ties are broken towards the lower class index (tf.math.top_k's order), so a tie never counts twice.
    """
    scores = tf.convert_to_tensor(scores)
    labels = tf.reshape(tf.cast(tf.convert_to_tensor(labels), tf.int64), [-1, 1])
    if int(tf.shape(labels)[0]) == 0:
        raise ValueError("topk_accuracy: no examples.")
    k_max = min(max(ks), int(scores.shape[-1]))
    top = tf.cast(tf.math.top_k(scores, k=k_max).indices, tf.int64)
    hits = tf.equal(top, labels).numpy()
    return tuple(int(hits[:, :min(k, k_max)].sum()) / len(hits) for k in ks)  # exact counts / N


# ------------------------------------------------------------------------------------------------- flags, set-up


def define_common_flags(fv) -> None:
    """The flags every evaluation CLI takes (defined into the absl FlagValues `fv`)."""
    from absl import flags

    flags.DEFINE_string("encoder", None, f"What to evaluate: {ENCODER_FORMS}.", flag_values=fv)
    flags.DEFINE_string("dataset", None, "Labelled dataset: tfds:NAME[/CONFIG], folder:PATH or digits (default: the "
                        "dataset the encoder was trained on, from its metadata).", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data directory.", flag_values=fv)
    flags.DEFINE_bool("download", False, "Let TFDS download the dataset (off: never a hanging download).",
                      flag_values=fv)
    flags.DEFINE_string("train_split", "train", "Split the classifier / kNN memory is built from.", flag_values=fv)
    flags.DEFINE_string("test_split", None, "Split accuracy is reported on (default: test, else validation).",
                        flag_values=fv)
    flags.DEFINE_integer("image_size", None, "Override the encoder's image size.", flag_values=fv)
    flags.DEFINE_list("mean", None, "Override the encoder's per-channel normalisation mean (3 values).",
                      flag_values=fv)
    flags.DEFINE_list("std", None, "Override the encoder's per-channel normalisation std (3 values).",
                      flag_values=fv)
    flags.DEFINE_integer("batch_size", 256, "Batch size.", flag_values=fv)
    flags.DEFINE_integer("limit_train", 0, "Use only this many training examples (0: all), for quick runs.",
                         flag_values=fv)
    flags.DEFINE_integer("limit_test", 0, "Use only this many test examples (0: all), for quick runs.",
                         flag_values=fv)
    flags.DEFINE_string("subset", None, "Class-balanced seeded subset of the training split: a fraction of each "
                        "class (0.01 = 1%) or a per-class count (5).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of subsets, shuffling, augmentation and initialisation.", flag_values=fv)
    flags.DEFINE_string("output", None, "Result JSON (default: eval_<protocol>_<dataset>.json beside the encoder, "
                        "or in the current directory for a SavedModel).", flag_values=fv)
    flags.DEFINE_integer("verbose", 1, "0: quiet; 1: progress bars.", flag_values=fv)
    flags.mark_flag_as_required("encoder", flag_values=fv)


@dataclasses.dataclass
class Setup:
    """Everything a protocol needs, checked: the encoder, the dataset and how to feed one to the other."""

    encoder: Encoder
    dataset: str
    info: data.DatasetInfo
    prep: Preprocessing
    train_split: str
    test_split: str
    batch_size: int
    data_dir: str | None
    download: bool
    subset: Any
    limit_train: int
    limit_test: int
    seed: int
    output: str | None
    verbose: int
    started: float

    def eval_batches(self, split: str, limit: int | None = None, subset=None) -> tf.data.Dataset:
        return labelled_batches(self.dataset, split, self.prep, self.info, batch_size=self.batch_size,
                                data_dir=self.data_dir, download=self.download, subset=subset, limit=limit,
                                seed=self.seed)

    def steps(self, split: str, limit: int = 0, subset=None) -> int | None:
        """Batches in a pass over `split` (None when a subset makes it unknown in advance)."""
        if subset is not None:
            return None
        examples = min(limit, self.info.splits[split]) if limit else self.info.splits[split]
        return max(1, math.ceil(examples / self.batch_size))

    def train_features(self):
        ds = self.eval_batches(self.train_split, self.limit_train, self.subset)
        x, y = extract_features(self.encoder, ds, verbose=self.verbose, description=f"{self.train_split} features",
                                steps=self.steps(self.train_split, self.limit_train, self.subset))
        check_labels(y, self.info.num_classes, f"{self.dataset} {self.train_split!r}")
        return x, y

    def test_features(self):
        ds = self.eval_batches(self.test_split, self.limit_test)
        x, y = extract_features(self.encoder, ds, verbose=self.verbose, description=f"{self.test_split} features",
                                steps=self.steps(self.test_split, self.limit_test))
        check_labels(y, self.info.num_classes, f"{self.dataset} {self.test_split!r}")
        return x, y

    def train_batches(self):
        return training_batches(self.dataset, self.train_split, self.prep, self.info, batch_size=self.batch_size,
                                data_dir=self.data_dir, download=self.download, subset=self.subset,
                                limit=self.limit_train, seed=self.seed)


def setup(encoder_path, *, dataset=None, data_dir=None, download=False, train_split="train", test_split=None,
          image_size=None, mean=None, std=None, batch_size=256, limit_train=0, limit_test=0, subset=None, seed=0,
          output=None, verbose=1) -> Setup:
    """Opens the encoder and the dataset and checks that they fit together (clear errors otherwise)."""
    started = time.time()
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    for name, value in (("limit_train", limit_train), ("limit_test", limit_test)):
        if value is not None and value < 0:
            raise ValueError(f"--{name} must be >= 0 (0: no limit), got {value}")
    encoder = open_encoder(encoder_path)
    dataset = dataset or encoder.metadata.get("dataset")
    if not dataset:
        raise ValueError(f"The encoder's metadata does not name its dataset; pass --dataset ({data.NAME_FORMS}).")
    info = data.dataset_info(dataset, data_dir, download)
    check_labelled(info)
    test_split = test_split or default_test_split(info)
    for split in (train_split, test_split):
        check_split(info, split)
    subset = parse_subset(subset)
    check_subset(subset, info, train_split)
    prep = resolve_preprocessing(encoder, info, image_size, mean, std)
    return Setup(encoder, dataset, info, prep, train_split, test_split, batch_size, data_dir, download, subset,
                 limit_train or 0, limit_test or 0, seed, output, verbose, started)


def setup_from_flags(fv) -> Setup:
    return setup(fv.encoder, dataset=fv.dataset, data_dir=fv.data_dir, download=fv.download,
                 train_split=fv.train_split, test_split=fv.test_split, image_size=fv.image_size, mean=fv.mean,
                 std=fv.std, batch_size=fv.batch_size, limit_train=fv.limit_train, limit_test=fv.limit_test,
                 subset=fv.subset, seed=fv.seed, output=fv.output, verbose=fv.verbose)


# ------------------------------------------------------------------------------------------------------- results

# The paper's ImageNet numbers (Zbontar et al. 2021, Tables 1 and 2; ResNet-50), shown next to ImageNet results.
PAPER_IMAGENET = {"linear": (73.2, 91.0), "finetune_1pct": (55.0, 79.2), "finetune_10pct": (69.7, 89.3)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def default_output_path(encoder: Encoder, protocol: str, dataset: str) -> Path:
    """`eval_<protocol>_<dataset>.json` beside the encoder (the workdir, the .keras file's folder, or the workdir of
    a checkpoint, with `_step<N>` added), or in the current directory for a SavedModel or an unwritable folder."""
    name = f"eval_{_slug(protocol)}_{_slug(dataset)}"
    path = encoder.path
    if encoder.kind == "savedmodel":
        folder = Path.cwd()
    elif Path(f"{path}.index").is_file():  # workdir/checkpoints/ckpt-N
        folder, name = path.parent.parent, f"{name}_step{path.name.rsplit('-', 1)[-1]}"
    else:
        folder = path if path.is_dir() else path.parent
    if not _writable(folder):
        logging.warning("%s is not writable; writing the result to the current directory.", folder)
        folder = Path.cwd()
    return folder / f"{name}.json"


def _writable(folder: Path) -> bool:
    import os

    return folder.is_dir() and os.access(folder, os.W_OK)


def finish(s: Setup, protocol: str, settings: dict, metrics: dict, num_train: int, num_test: int,
           title: str) -> dict:
    """Builds the result record, writes it as JSON (atomically), prints its one-row table, and returns it."""
    import bt_keras

    record = {
        "protocol": protocol,
        "dataset": s.dataset,
        "split": s.test_split,
        "train_split": s.train_split,
        "encoder": s.encoder.describe(),
        "preprocessing": s.prep.to_dict(),
        "settings": {**settings, "batch_size": s.batch_size, "subset": s.subset, "limit_train": s.limit_train,
                     "limit_test": s.limit_test, "seed": s.seed},
        "num_classes": s.info.num_classes,
        "num_train_examples": int(num_train),
        "num_test_examples": int(num_test),
        **metrics,
        "time_seconds": round(time.time() - s.started, 2),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "bt_keras": bt_keras.__version__},
    }
    name = protocol if s.subset is None else f"{protocol}_subset{s.subset}"
    output = Path(s.output) if s.output else default_output_path(s.encoder, name, s.dataset)
    checkpoints.atomic_write_json(output, record)
    record["output"] = str(output)
    print(format_table(record, title))
    print(f"Wrote {output}")
    return record


def format_table(record: dict, title: str) -> str:
    """A one-row Markdown table of a result (pastes into RESULTS.md); accuracies in percent."""
    encoder = record["encoder"]
    step = f" (step {encoder['step']})" if encoder.get("step") is not None else ""
    header = ["protocol", "encoder", "dataset", "train", "test", "top-1 %", "top-5 %", "time"]
    row = [title, f"{encoder['path']}{step}", f"{record['dataset']} {record['train_split']}->{record['split']}",
           str(record["num_train_examples"]), str(record["num_test_examples"]), f"{100 * record['top1']:.2f}",
           f"{100 * record['top5']:.2f}", f"{record['time_seconds']:.0f} s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |"]
    paper = record.get("paper_imagenet_resnet50")
    if paper:
        lines.append(f"(paper, ImageNet ResNet-50: top-1 {paper[0]} %, top-5 {paper[1]} %)")
    return "\n".join(lines)


def cli_main(run: Callable, program: str) -> Callable:
    """An absl `main(argv)` that runs `run(FLAGS)` and turns the expected errors into a one-line message, exit 1."""

    def main(argv):
        import sys

        from absl import flags

        if len(argv) > 1:
            sys.exit(f"{program}: unexpected arguments {argv[1:]}")
        try:
            run(flags.FLAGS)
        except (FileNotFoundError, ValueError) as error:
            sys.exit(f"{program}: error: {error}")

    return main
