"""Saving and finding what training produces: atomic files, the final encoder with its metadata, training state.

A training workdir looks like this (written by `bt_keras.train`):

    workdir/
      config.json              the recipe the run used (the ml_collections config, as JSON)
      checkpoints/             tf.train.Checkpoint of model, optimizer and step; the N latest kept
      encoder.keras            the final encoder alone, for evaluation and export
      encoder.json             its metadata: backbone, image_size, mean, std, dataset, step, feature_dim
      metrics.jsonl, tensorboard/ ...

Every file is written to a temporary name in the same folder and renamed into place, so a run killed at any moment
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import keras

ENCODER_FILE = "encoder.keras"
ENCODER_METADATA = "encoder.json"


def atomic_write(path: str | os.PathLike, write_fn, suffix: str = "") -> None:
    """Calls `write_fn(temporary_path)` and renames the result to `path` (atomic on POSIX file systems).

    The temporary file is created as a plain open() would (mode 0666 minus the umask), not private like mkstemp's
    0600, so a serving container or a colleague running as another user can read what lands at `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp{suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write_fn(str(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str | os.PathLike, data) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")

    atomic_write(path, write)


def save_encoder(encoder: keras.Model, directory: str | os.PathLike, metadata: dict) -> Path:
    """Writes `directory/encoder.keras` and `directory/encoder.json` atomically; returns the model's path.

    `metadata` should say how to feed the encoder: at least `image_size`, `mean` and `std` (evaluation and export
    preprocess with them), plus anything useful for provenance (backbone, dataset, step, recipe).
    """
    for key in ("image_size", "mean", "std"):
        if key not in metadata:
            raise ValueError(f"save_encoder: metadata needs {key!r} (how to preprocess images for this encoder).")
    directory = Path(directory)
    path = directory / ENCODER_FILE
    atomic_write(path, encoder.save, suffix=".keras")
    atomic_write_json(directory / ENCODER_METADATA, {**metadata, "feature_dim": int(encoder.output_shape[-1])})
    return path


def load_encoder(path: str | os.PathLike) -> tuple[keras.Model, dict]:
    """Loads an encoder and its metadata from a training workdir, an `encoder.keras` file, a BarlowTwins `.keras`, or
    a training checkpoint (`workdir/checkpoints/ckpt-STEP`, rebuilt from the run's `config.json`).

    Returns `(encoder, metadata)`; `metadata` is `{}` when no `encoder.json` lies beside the model file.
    Raises FileNotFoundError naming what was looked for, ValueError for a file that is not an encoder.
    """
    import bt_keras.model  # noqa: F401  (registers BarlowTwins, LARS, ... for deserialisation)

    path = Path(path)
    if Path(f"{path}.index").is_file():
        return _encoder_from_training_checkpoint(path)
    if path.is_dir():
        path = path / ENCODER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No encoder at {path}. Pass a training workdir (holding {ENCODER_FILE}, written when training ends), "
            f"an {ENCODER_FILE} file, or a BarlowTwins .keras model file."
        )
    if path.suffix != ".keras":
        raise ValueError(f"{path} is not a Keras model file (.keras); pass a workdir or an {ENCODER_FILE} file.")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # keras raises many types for corrupt / foreign files
        raise ValueError(f"Could not load a Keras model from {path}: {error}") from error
    if isinstance(model, bt_keras.model.BarlowTwins):
        model = model.encoder
    metadata_path = path.parent / ENCODER_METADATA
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    return model, metadata


def _encoder_from_training_checkpoint(prefix: Path) -> tuple[keras.Model, dict]:
    """Rebuilds the run's model from `config.json` beside `checkpoints/` and restores `prefix` into it."""
    import ml_collections
    import tensorflow as tf

    from bt_keras import trainer  # the recipe -> model builder (a late import: trainer imports this module)

    config_path = prefix.parent.parent / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"Checkpoint {prefix} has no config.json two folders up ({config_path}); a training "
                                "checkpoint is read with the recipe of the run that wrote it.")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    model = trainer.build_model(config)
    tf.train.Checkpoint(model=model).read(str(prefix)).expect_partial()
    views = trainer.views_from_config(config)
    step = int(str(prefix).rsplit("-", 1)[-1]) if str(prefix).rsplit("-", 1)[-1].isdigit() else None
    return model.encoder, {"backbone": config.backbone, "image_size": config.image_size, "mean": list(views[0].mean),
                           "std": list(views[0].std), "dataset": config.dataset, "step": step,
                           "feature_dim": int(model.encoder.output_shape[-1]), "checkpoint": str(prefix)}
