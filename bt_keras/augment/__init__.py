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
import inspect

_HOMES = ("bt_keras.augment.ops", "bt_keras.augment.eval_transforms", "bt_keras.views")


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
    raise AttributeError(f"module 'bt_keras.augment' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {name for home in _HOMES for name in _public(importlib.import_module(home))})
