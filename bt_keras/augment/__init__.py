"""Augmentation, layer 3: the two views of the paper, per image, as batched TensorFlow ops.

  `ops`              the view ops applying a `ViewConfig` (crop, flip, rotation, colour, blur, solarise, normalise)
  `host_crop`        JPEGs decoded straight to the crop window (the host's half of `augment_on`)
  `device`           `augment_on="accelerator"`: uint8 crops + per-image draws from the host, colour steps on device
  `eval_transforms`  the deterministic centre crop the probes and the SavedModel export share

Public names (`bt_keras.augment.augment_batch`, `.eval_transform`, and `bt_keras.views`' `.ViewConfig`, ...) resolve
from these modules on first use: `bt_keras.augment.eval_transform`, the name exports record in their metadata, keeps
resolving.
"""

from bt_keras.lazy_names import folder_names

# Where the public names live, searched in this order.
HOMES = ("bt_keras.augment.ops", "bt_keras.augment.eval_transforms", "bt_keras.views")
__getattr__, __dir__ = folder_names(__name__, HOMES, lambda: globals())
