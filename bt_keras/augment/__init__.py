"""Augmentation, layer 3: the two views of the paper, per image, as batched TensorFlow ops.

  `ops`              the view ops applying a `ViewConfig` (crop, flip, rotation, colour, blur, solarise, normalise)
  `host_crop`        JPEGs decoded straight to the crop window (the host's half of `augment_on`)
  `device`           `augment_on="accelerator"`: uint8 crops + per-image draws from the host, colour steps on device
  `eval_transforms`  the deterministic centre crop the probes and the SavedModel export share

Public names (`bt_keras.augment.augment_batch`, `.eval_transform`, and `bt_keras.views`' `.ViewConfig`, ...) resolve
from these modules on first use: `bt_keras.augment.eval_transform`, the name exports record in their metadata, keeps
resolving.
"""

import importlib

_HOMES = ("bt_keras.augment.ops", "bt_keras.augment.eval_transforms", "bt_keras.views")


def __getattr__(name):
    for home in _HOMES:
        module = importlib.import_module(home)
        if not name.startswith("_") and hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'bt_keras.augment' has no attribute {name!r}")
