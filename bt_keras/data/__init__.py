"""Data, layer 4: datasets by name and the tf.data streams built on them.

  `sources`      `tfds:NAME`, `folder:PATH` and `digits` opened as (image, label) streams; `dataset_info`
  `folder_walk`  a walk of an image folder that meets each real file once
  `pretrain`     `pretrain_dataset` / `pair_batches`: seeded, shardable, resumable (view1, view2) batches
  `labelled`     `labelled_dataset`: normalised (image, label) batches for the probes
  `service`      the pre-training pipeline on tf.data service workers (`--data_service=grpc://HOST:PORT`)

Public names (`bt_keras.data.pretrain_dataset`, `.dataset_info`, ...) resolve from these modules on first use.
"""

import importlib

_HOMES = ("sources", "pretrain", "labelled")


def __getattr__(name):
    for home in _HOMES:
        module = importlib.import_module(f"bt_keras.data.{home}")
        if not name.startswith("_") and hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'bt_keras.data' has no attribute {name!r}")
