"""Every file a run or an export writes, by name: a module that loads nothing but the standard library, so code
that only needs a file name (the report, resume planning, export metadata, the serving client) never loads TensorFlow
or Keras. `bt_keras.assembly.artifacts` writes and reads these files; it re-exports every name here.

A training workdir (written by `bt_keras.cli.train`):

    workdir/
      config.json              the recipe the run used (the ml_collections config, as JSON)
      checkpoints/             tf.train.Checkpoint of model, optimizer and step; the N latest and ckpt-0 kept
        ckpt-STEP.config.json  the config that wrote each one (evaluating it compares config.json with it)
      encoder.keras            the final encoder alone, for evaluation and export
      encoder.json             its metadata: backbone, image_size, mean, std, dataset, step, feature_dim
      barlow_twins.keras       encoder + projector (for exports that serve the projection)
      metrics.jsonl, tensorboard/, cross_correlation.png
      config_changes.jsonl     what changed in the config between starts of the run (bt_keras.train.resume)
      train.lock               while a trainer runs: its host and pid (bt_keras.train.workdir_lock)
      checkpoints/unusable/    corrupt or orphan checkpoint files moved aside on resume (never deleted)
      cross_correlation.npy/.json  the C drawn in that picture (its top-left block for wide projectors), step, size
      baselines.json           kNN / linear probe of random init, raw pixels, the trained encoder (knn.baselines)
      report.png               the training report (bt_keras.train.figures; `python -m bt_keras.report WORKDIR`)

A SavedModel export (written by `bt_keras.serving.savedmodel`): `<export_dir>/<version>/saved_model.pb`, `variables/`
and `assets.extra/` (`bt_keras.json`: what was exported and how inputs are preprocessed; the warm-up requests).
"""

from __future__ import annotations

import re
from pathlib import Path

# A training workdir.
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
ENCODER_FILE = "encoder.keras"
ENCODER_METADATA = "encoder.json"
MODEL_FILE = "barlow_twins.keras"  # encoder + projector
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CORRELATION_PICTURE = "cross_correlation.png"
CONFIG_CHANGES_FILE = "config_changes.jsonl"
LOCK_FILE = "train.lock"
UNUSABLE_CHECKPOINTS = "unusable"  # inside checkpoints/
CORRELATION_DATA = "cross_correlation.npy"  # the C drawn in CORRELATION_PICTURE
CORRELATION_INFO = "cross_correlation.json"  # its step and full size
BASELINES_FILE = "baselines.json"
REPORT_PICTURE = "report.png"

# A SavedModel export version folder.
ASSETS_EXTRA = "assets.extra"
EXPORT_METADATA = "bt_keras.json"  # inside assets.extra/
WARMUP_FILE = "tf_serving_warmup_requests"  # inside assets.extra/ (TF Serving's name)
SIGNATURE_BYTES = "serving_default"
SIGNATURE_PIXELS = "embed_pixels"
SIGNATURE_NORMALIZED = "embed_normalized"
INPUT_KEYS = {SIGNATURE_BYTES: "images", SIGNATURE_PIXELS: "pixels", SIGNATURE_NORMALIZED: "normalized"}
EMBEDDING_OUTPUT = "embedding"

ENCODER_FORMS = (f"a training workdir (holding {ENCODER_FILE}), an {ENCODER_FILE} or BarlowTwins .keras file, a "
                 f"training checkpoint workdir/{CHECKPOINT_DIR}/ckpt-STEP, or a SavedModel export (export_dir or "
                 "export_dir/VERSION)")


def is_checkpoint(path) -> bool:
    """True for a tf.train checkpoint prefix (`.../ckpt-STEP`, whose `.index` file exists)."""
    return Path(f"{path}.index").is_file()


def checkpoint_config(prefix) -> Path:
    """`ckpt-STEP.config.json` beside checkpoint `prefix`: the config of the run when it wrote that checkpoint
    (`bt_keras.checkpoints.write_config_record`). Checkpoints written before it existed have none."""
    return Path(f"{prefix}.config.json")


def latest_checkpoints(workdir) -> list[Path]:
    """The checkpoint prefixes in `workdir/checkpoints`, oldest first (by step)."""
    folder = Path(workdir) / CHECKPOINT_DIR
    prefixes = [p.with_suffix("") for p in folder.glob("ckpt-*.index") if re.fullmatch(r"ckpt-\d+", p.stem)]
    return sorted(prefixes, key=lambda p: int(p.name.rsplit("-", 1)[1]))
