"""Exports a Barlow Twins encoder as a versioned SavedModel that TF Serving loads as is (the CLI: export/savedmodel.py).

    python -m export.savedmodel --checkpoint=runs/cifar10 --export_dir=models/bt_keras [--version=N]
        [--l2_normalize] [--include_projector] [--batch_warmup_sizes=1,8] [--model_name=bt_keras]

writes `<export_dir>/<version>/` (version: the next integer after the versions already there), the layout TF
Serving's `--model_base_path` expects:

    <version>/saved_model.pb, variables/      the SavedModel, with the signatures below
    <version>/assets.extra/tf_serving_warmup_requests   TFRecord of PredictionLog: run by TF Serving at load time
    <version>/assets.extra/bt_keras.json      what was exported from where, how inputs are preprocessed, signatures

The signatures are described in `bt_keras.serving.signatures`, the warm-up file in `bt_keras.serving.warmup`.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from bt_keras import __version__, files, paths
from bt_keras.paths import SIGNATURE_BYTES, SIGNATURE_NORMALIZED, SIGNATURE_PIXELS
from bt_keras.serving.signatures import (DEFAULT_MAX_IMAGE_PIXELS, Servable, check_max_image_pixels,
                                        preprocessing_from_metadata, signature_table)
from bt_keras.serving.warmup import DEFAULT_MODEL_NAME, DEFAULT_WARMUP_BATCH_SIZES, write_warmup_requests


def existing_versions(export_dir) -> list[int]:
    """The version numbers under `export_dir` (sub-folders named by an integer, as TF Serving reads them)."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        return []
    return sorted(int(p.name) for p in export_dir.iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name))


def export_encoder(
    encoder: keras.Model,
    metadata: dict,
    export_dir,
    version: int | None = None,
    l2_normalize: bool = False,
    projector: keras.Model | None = None,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    warmup_batch_sizes=DEFAULT_WARMUP_BATCH_SIZES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    source: str | None = None,
) -> Path:
    """Writes `<export_dir>/<version>/`: the SavedModel with the three signatures, warm-up requests and metadata.

    Args:
      encoder: the Keras encoder (images normalised NHWC -> [batch, D] features).
      metadata: its `encoder.json` (`load_encoder`'s second result): image_size, mean, std are required.
      export_dir: the model's base path for TF Serving (`--model_base_path`).
      version: the version folder; default the next integer after those present. An existing one is an error.
      l2_normalize: serve unit-length embeddings (cosine similarity = dot product).
      projector: also serve `projection` = projector(raw features), e.g. `BarlowTwins.projector`.
      model_name: the model name written into the warm-up requests and metadata (TF Serving's --model_name).
      warmup_batch_sizes: one serving_default warm-up request per batch size.
      max_image_pixels: larger images are refused with InvalidArgumentError instead of being resized.
      source: where the encoder came from, recorded in the metadata.

    Returns the version folder. The version is written under a temporary name and renamed into place, so TF
    Serving, polling export_dir, never sees a half-written version.
    """
    check_max_image_pixels(max_image_pixels)
    preprocessing = preprocessing_from_metadata(metadata, encoder)
    batch_sizes = tuple(int(n) for n in warmup_batch_sizes)
    if any(n < 1 for n in batch_sizes):
        raise ValueError(f"warm-up batch sizes must be positive integers, got {list(warmup_batch_sizes)}")
    export_dir = Path(export_dir)
    if version is None:
        version = (existing_versions(export_dir) or [0])[-1] + 1
    if int(version) < 0:
        raise ValueError(f"version must be a non-negative integer, got {version}")
    final = export_dir / str(int(version))
    if final.exists():
        raise FileExistsError(f"{final} exists already; pick another --version or omit it to use the next one "
                              f"({(existing_versions(export_dir) or [0])[-1] + 1}).")

    size = preprocessing["image_size"]
    servable = Servable(encoder, projector, preprocessing, l2_normalize, max_image_pixels)
    archive = keras.export.ExportArchive()
    # The loaded object's variables, trainable_variables and non_trainable_variables, as archive.track(model) lists
    # them, without track's search of the models for lookup tables: that traces each model's Keras serving function
    # once more, the encoder's whole network again. An image encoder has none; an untracked one fails the save.
    models = [encoder] + ([projector] if projector is not None else [])
    for kind in ("variables", "trainable_variables", "non_trainable_variables"):
        archive.add_variable_collection(kind, [v for model in models for v in getattr(model, kind)])
    # The first endpoint also becomes serving_default when none is named so; ours is named explicitly.
    archive.add_endpoint(SIGNATURE_BYTES, servable.from_bytes, [tf.TensorSpec([None], tf.string, name="images")])
    archive.add_endpoint(SIGNATURE_PIXELS, servable.from_pixels,
                         [tf.TensorSpec([None, None, None, 3], tf.uint8, name="pixels")])
    archive.add_endpoint(SIGNATURE_NORMALIZED, servable.from_normalized,
                         [tf.TensorSpec([None, size, size, 3], tf.float32, name="normalized")])

    export_dir.mkdir(parents=True, exist_ok=True)
    # Not a number, so TF Serving skips it until the rename below.
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{int(version)}-", dir=export_dir))
    try:
        archive.write_out(str(staging), verbose=False)
        extra = staging / paths.ASSETS_EXTRA
        records = write_warmup_requests(extra / paths.WARMUP_FILE, model_name, size, batch_sizes)
        feature_dim, projection_dim = servable.feature_dim, servable.projection_dim
        files.atomic_write_json(extra / paths.EXPORT_METADATA, {
            "format": "bt_keras SavedModel export, version 1",
            "model_name": model_name,
            "version": int(version),
            "source_checkpoint": source,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "preprocessing": {**preprocessing, "transform": "bt_keras.augment.eval_transform",
                              "max_image_pixels": int(max_image_pixels)},
            "embedding_dim": feature_dim,
            "projection_dim": projection_dim,
            "l2_normalize": bool(l2_normalize),
            "signatures": signature_table(preprocessing, feature_dim, projection_dim, l2_normalize),
            "warmup": {"file": f"{paths.ASSETS_EXTRA}/{paths.WARMUP_FILE}", "records": records,
                       "serving_default_batch_sizes": list(batch_sizes)},
            "encoder_metadata": metadata,
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "bt_keras": __version__},
        })
        files.share_tree(staging)  # mkdtemp made it 0700: give it the modes of a plain mkdir (0755 under umask 022)
        os.rename(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final
