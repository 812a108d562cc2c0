"""The one place that reads and writes encoders. (The file names of a workdir and an export: `bt_keras.paths`.)

Encoders come in two kinds, both seen as `model(images, training=False) -> features [batch, D]` on normalised images:

* Keras (`kind="keras"`): a training workdir, an `encoder.keras` file, a BarlowTwins `.keras` file, or a training
  checkpoint `workdir/checkpoints/ckpt-STEP` (rebuilt from the run's `config.json`). Usable by every protocol.
* SavedModel (`kind="savedmodel"`): an export, given as its base directory (the highest version is taken) or one
  version directory. Inference only, called through its `embed_normalized` signature. A SavedModel is a program
  (its graph may read and write files): open only exports you trust.

`open_encoder` reads every format; `save_encoder` writes the Keras one. Add a new format in this module only.

`encoder.keras` is a plain Keras file: `save_encoder` writes Keras's own layers (bt_keras's BatchNormalization, a
training-speed layer, becomes `keras.layers.BatchNormalization` with the same config and weights), so
`keras.saving.load_model` opens it without bt_keras, under any Keras 3 backend, with the same outputs. The full model
(`barlow_twins.keras`) and the checkpoints need bt_keras. Encoder files written before that name
`bt_keras>BatchNormalization`; importing this module registers it, so they still open here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from bt_keras import checkpoints, config as run_config, files
from bt_keras.assembly import builders
from bt_keras.data import sources
from bt_keras.method import precision
from bt_keras.method.model import BarlowTwins
from bt_keras.nets import batch_norm
from bt_keras.paths import (ASSETS_EXTRA, CONFIG_FILE, EMBEDDING_OUTPUT, ENCODER_FILE, ENCODER_FORMS, ENCODER_METADATA,
                            EXPORT_METADATA, INPUT_KEYS, MODEL_FILE, SIGNATURE_NORMALIZED, checkpoint_config,
                            is_checkpoint, latest_checkpoints)


# ------------------------------------------------------------------------------------------------------ writing


def save_encoder(encoder: keras.Model, directory, metadata: dict) -> Path:
    """Writes `directory/encoder.keras` and `directory/encoder.json` atomically; returns the model's path.

    `metadata` must say how to feed the encoder: at least `image_size`, `mean` and `std` (evaluation and export
    preprocess with them), plus anything useful for provenance (backbone, dataset, step, recipe).

    The file holds Keras's own layers only (`batch_norm.as_keras_batch_norm`: same weights, same inference), so it
    loads with `keras.saving.load_model` where bt_keras is not installed; an encoder holding any other bt_keras
    object is refused, naming it, rather than written as a file plain Keras cannot open.
    """
    for key in ("image_size", "mean", "std"):
        if key not in metadata:
            raise ValueError(f"save_encoder: metadata needs {key!r} (how to preprocess images for this encoder).")
    encoder = batch_norm.as_keras_batch_norm(encoder)
    foreign = sorted(bt_keras_objects(keras.saving.serialize_keras_object(encoder)))
    if foreign:
        raise ValueError(f"save_encoder: the encoder holds bt_keras objects {foreign}, which plain Keras cannot load "
                         "from encoder.keras; build it from Keras layers (bt_keras's BatchNormalization is converted).")
    directory = Path(directory)
    path = directory / ENCODER_FILE
    files.atomic_write(path, encoder.save, suffix=".keras")
    files.atomic_write_json(directory / ENCODER_METADATA, {**metadata, "feature_dim": int(encoder.output_shape[-1])})
    return path


def bt_keras_objects(serialized) -> set[str]:
    """The registered names (`bt_keras>NAME`) and classes of bt_keras modules a serialised Keras object refers to."""
    found = set()
    if isinstance(serialized, dict):
        name, module = serialized.get("registered_name"), serialized.get("module")
        if isinstance(name, str) and name.startswith("bt_keras>"):
            found.add(name)
        elif isinstance(module, str) and module.split(".")[0] == "bt_keras":
            found.add(f"{module}.{serialized.get('class_name')}")
        values = serialized.values()
    elif isinstance(serialized, (list, tuple)):
        values = serialized
    else:
        return found
    for value in values:
        found |= bt_keras_objects(value)
    return found


def save_model(model: BarlowTwins, directory) -> Path:
    """Writes the whole BarlowTwins model (encoder + projector) as `directory/barlow_twins.keras`, atomically. It
    keeps bt_keras's classes (`bt_keras>BarlowTwins`, its BatchNormalization, the probe): load it after `import
    bt_keras`, or with `open_encoder` / `load_with_projector`."""
    path = Path(directory) / MODEL_FILE
    files.atomic_write(path, model.save, suffix=".keras")
    return path


# ------------------------------------------------------------------------------------------------------ reading


class SavedModelEncoder:
    """An exported SavedModel as an inference-only encoder: `encoder(normalised images) -> embedding`."""

    def __init__(self, directory: Path, image_size: int):
        self.directory = directory
        self.loaded = tf.saved_model.load(str(directory))
        if SIGNATURE_NORMALIZED not in self.loaded.signatures:
            raise ValueError(f"SavedModel {directory} has no {SIGNATURE_NORMALIZED!r} signature (it has "
                             f"{sorted(self.loaded.signatures)}); export it with `python -m export.savedmodel`.")
        self.signature = self.loaded.signatures[SIGNATURE_NORMALIZED]
        self.input_shape = (None, image_size, image_size, 3)
        self.output_shape = tuple(self.signature.structured_outputs[EMBEDDING_OUTPUT].shape.as_list())

    def __call__(self, images, training=False):
        if training:
            raise ValueError("A SavedModel export is inference-only; fine-tune the Keras encoder (the training "
                             "workdir or its encoder.keras) instead.")
        key = INPUT_KEYS[SIGNATURE_NORMALIZED]
        return self.signature(**{key: tf.cast(images, tf.float32)})[EMBEDDING_OUTPUT]


@dataclasses.dataclass
class Encoder:
    """An opened encoder. `model(images, training=False)` maps normalised NHWC images to features [batch, D]."""

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


def open_encoder(path) -> Encoder:
    """Opens an encoder in any format above. Raises FileNotFoundError for a path that holds none (naming what was
    looked for), ValueError for a file that is not an image encoder."""
    path = Path(path).expanduser()
    if is_checkpoint(path):
        model, metadata = _encoder_from_checkpoint(path)
    else:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist. Pass {ENCODER_FORMS}.")
        version = savedmodel_version_dir(path)
        if version is not None:
            return _open_savedmodel(version)
        model, metadata = _load_keras(path)
    _check_image_encoder(model, path)
    return Encoder(model, metadata, path, "keras")


def load_encoder(path) -> tuple[keras.Model, dict]:
    """`(Keras encoder, metadata)` from a workdir, an `.keras` file or a training checkpoint (not a SavedModel:
    training and export need the Keras model). `metadata` is `{}` when no `encoder.json` lies beside the model."""
    encoder = open_encoder(path)
    if encoder.kind != "keras":
        raise ValueError(f"{path} is a SavedModel export, which is inference-only; pass the training workdir or its "
                         f"{ENCODER_FILE} instead.")
    return encoder.model, encoder.metadata


def load_with_projector(path) -> tuple[keras.Model, keras.Model, dict]:
    """`(encoder, projector, metadata)` from a BarlowTwins `.keras` file or a workdir holding `barlow_twins.keras`
    (the projector exists only in the full model)."""
    path = Path(path).expanduser()
    full = path / MODEL_FILE if path.is_dir() else path
    if path.is_file() and path.name == ENCODER_FILE:
        full = path.parent / MODEL_FILE
    if not full.is_file():
        raise FileNotFoundError(f"The projector is saved only with the full BarlowTwins model, and there is no {full}. "
                                f"Pass a BarlowTwins .keras file (model.save(...)) or a workdir holding {MODEL_FILE}.")
    model = _load_keras_file(full)
    if not isinstance(model, BarlowTwins):
        raise ValueError(f"{full} holds a {type(model).__name__}, not a BarlowTwins model: it has no projector.")
    # A mixed-precision run's full model keeps its mixed layers: serve float32 copies (same weights), as encoder.keras.
    return precision.float32_copy(model.encoder), precision.float32_copy(model.projector), _metadata_beside(full)


def savedmodel_version_dir(path: Path) -> Path | None:
    """`path` itself if it is a SavedModel directory, the highest numbered version inside it, or None."""
    if (path / "saved_model.pb").is_file():
        return path
    if path.is_dir():
        versions = sorted((int(p.name), p) for p in path.iterdir()
                          if p.is_dir() and re.fullmatch(r"\d+", p.name) and (p / "saved_model.pb").is_file())
        if versions:
            return versions[-1][1]
    return None


def _metadata_beside(model_file: Path) -> dict:
    metadata_path = model_file.parent / ENCODER_METADATA
    return files.read_json(metadata_path, "Encoder metadata") if metadata_path.is_file() else {}


def _load_keras_file(path: Path) -> keras.Model:
    if path.suffix != ".keras":
        raise ValueError(f"{path} is not a Keras model file (.keras); pass a workdir or an {ENCODER_FILE} file.")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # keras raises many types for corrupt / foreign files
        raise ValueError(f"Could not load a Keras model from {path}: {error}") from error


def _load_keras(path: Path) -> tuple[keras.Model, dict]:
    file = path / ENCODER_FILE if path.is_dir() else path
    if not file.is_file():
        checkpoints = latest_checkpoints(path) if path.is_dir() else []
        hint = (f" Training may still be running; evaluate its latest checkpoint with --encoder={checkpoints[-1]}."
                if checkpoints else "")
        raise FileNotFoundError(
            f"No encoder at {file}. Pass a training workdir (holding {ENCODER_FILE}, written when training ends), "
            f"an {ENCODER_FILE} file, or a BarlowTwins .keras model file.{hint}")
    model = _load_keras_file(file)
    if isinstance(model, BarlowTwins):
        model = model.encoder
    return model, _metadata_beside(file)


def _encoder_from_checkpoint(prefix: Path) -> tuple[keras.Model, dict]:
    """Builds the run's encoder from `config.json` beside `checkpoints/` and restores `prefix` into it (the encoder
    alone: no dataset, optimizer or probe is needed)."""
    config_path = prefix.parent.parent / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"Checkpoint {prefix} has no {CONFIG_FILE} two folders up ({config_path}); a training "
                                "checkpoint is read with the recipe of the run that wrote it.")
    saved = files.read_json(config_path, "The run's config")
    if not isinstance(saved, dict):
        raise ValueError(f"{config_path} is not a run's config (a JSON object of its fields); restore the file "
                         f"written by the run, or evaluate its {ENCODER_FILE} instead.")
    try:
        config = run_config.complete(saved)
        _check_config_record(prefix, config, config_path)
        encoder, _ = builders.build_networks(config)
    except (checkpoints.CheckpointMismatchError, checkpoints.CorruptCheckpointError):
        raise  # the record's own one-line errors
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"The run's config {config_path} does not build a model ({' '.join(str(error).split())}); "
                         f"restore the file written by the run, or evaluate its {ENCODER_FILE} instead.") from None
    # Every encoder variable must come from the checkpoint (optimizer state and projector are not needed).
    checkpoints.restore_encoder(encoder, prefix, fix=f"{config_path} must be the config of the run that wrote "
                                "this checkpoint; restore it (see config_changes.jsonl beside it) or evaluate the "
                                f"run's {ENCODER_FILE} instead.")
    mean, std = sources.normalization_stats(config.dataset)
    step = prefix.name.rsplit("-", 1)[-1]
    return encoder, {"backbone": config.backbone, "image_size": config.image_size, "mean": list(mean),
                     "std": list(std), "dataset": config.dataset, "step": int(step) if step.isdigit() else None,
                     "feature_dim": int(encoder.output_shape[-1]), "checkpoint": str(prefix)}


def _check_config_record(prefix: Path, config, config_path: Path) -> None:
    """Raises CheckpointMismatchError, naming each field and both values, when `config` (the run's config.json) would
    build or feed another encoder than the one checkpoint `prefix` was written with (the config recorded beside it):
    before anything is built, so the answer is one line rather than wrong numbers or TensorFlow's warnings. A
    checkpoint without a record (written by an older version) is not checked here."""
    recorded = checkpoints.read_config_record(prefix)
    if recorded is None:
        return
    current = config.to_dict()
    differences = checkpoints.config_record_differences(recorded, current)
    if sources.normalization_stats(recorded["dataset"]) != sources.normalization_stats(current["dataset"]):
        differences.append(("dataset", recorded["dataset"], current["dataset"]))  # its normalisation mean and std
    if differences:
        shown = ", ".join(f"{field}={old!r} (config.json has {new!r})" for field, old, new in differences)
        raise checkpoints.CheckpointMismatchError(
            f"Checkpoint {prefix} was written with {shown}: {config_path} no longer describes its encoder. Put those "
            f"values back in {config_path} ({checkpoint_config(prefix).name} beside the checkpoint holds the whole "
            f"config that wrote it), or evaluate the run's {ENCODER_FILE} instead.")


def _open_savedmodel(directory: Path) -> Encoder:
    meta_path = directory / ASSETS_EXTRA / EXPORT_METADATA
    if not meta_path.is_file():
        raise ValueError(f"SavedModel {directory} has no {ASSETS_EXTRA}/{EXPORT_METADATA}: it is not a bt_keras "
                         "export, so its preprocessing is unknown. Export encoders with `python -m export.savedmodel`.")
    exported = files.read_json(meta_path, "Export metadata")
    prep = exported.get("preprocessing", {})
    metadata = {**exported.get("encoder_metadata", {}),
                **{k: prep[k] for k in ("image_size", "mean", "std") if k in prep}}
    metadata["export_version"] = exported.get("version")
    if exported.get("l2_normalize"):
        metadata["l2_normalized_embedding"] = True
    model = SavedModelEncoder(directory, int(metadata["image_size"]))
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
