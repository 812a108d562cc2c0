"""Data, layer 4: datasets by name and the tf.data streams built on them.

  `sources`      `tfds:NAME`, `folder:PATH` and `digits` opened as (image, label) streams; `dataset_info`
  `folder_walk`  a walk of an image folder that meets each real file once
  `pretrain`     `pretrain_dataset` / `pair_batches`: seeded, shardable, resumable (view1, view2) batches
  `labelled`     `labelled_dataset`: normalised (image, label) batches for the probes
  `service`      the pre-training pipeline on tf.data service workers (`--data_service=grpc://HOST:PORT`)

Public names (`bt_keras.data.pretrain_dataset`, `.dataset_info`, ...) resolve from these modules on first use.
"""

import importlib
import inspect

_HOMES = ("bt_keras.data.sources", "bt_keras.data.pretrain", "bt_keras.data.labelled")


def _public(module) -> dict:
    """The public names `module` defines (not what it imports: modules, other modules' classes and functions)."""
    return {name: value for name, value in vars(module).items()
            if not name.startswith("_") and not inspect.ismodule(value)
            and getattr(value, "__module__", module.__name__) == module.__name__}


def __getattr__(name):
    for home in _HOMES:
        public = _public(importlib.import_module(home))
        if name in public:
            return public[name]
    raise AttributeError(f"module 'bt_keras.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {name for home in _HOMES for name in _public(importlib.import_module(home))})
