"""Where the per-pixel augmentation runs: `config.augment_on = "host" | "accelerator"`.

A view is made in two stages (`bt_keras.augment`):

1. geometric, always on the host (tf.data): decode, random resized crop, horizontal flip, to uint8 S x S. These are the
   steps that change the image size, so after them every batch has one shape and is 4x smaller than float32.
2. photometric, `augment.photometric_batch`: colour jitter, grayscale, Gaussian blur, solarisation, normalisation,
   per image.

With `augment_on="host"` tf.data runs both and yields float `(view1, view2)`. With `augment_on="accelerator"` tf.data
yields `{"view1": uint8 [B, S, S, 3], "view2": ..., "view1_params": {...}, "view2_params": {...}}`: the crops and
each image's photometric draws (`augment.photometric_params`, a few numbers per image, drawn on the host from the same
stateless seeds), and `BarlowTwins.train_step` applies them on the device (`augment.apply_photometric`). The draws
are batched per image, so `fit` under a MirroredStrategy, which splits every tensor of a batch over the replicas,
splits them with their images. The two modes give the same
views (tests/augment/test_device.py checks it to float tolerance). The host then sends 1 byte per pixel instead of 4 and
spends no time on the colour steps (benchmarks/input_pipeline.py: `--augment_on host accelerator`).

XLA cannot compile this augmentation (the blur of a random subset of the batch has a data-dependent shape), so under
`--xla` it runs on the device before the compiled step (`bt_keras.train.step.replica_step`); `model.fit` after
`compile(jit_compile=True)` compiles the whole `train_step` and cannot be used in accelerator mode.
"""

from __future__ import annotations

import tensorflow as tf

from bt_keras.augment import ops
from bt_keras.views import ViewConfig

AUGMENT_ON = ("host", "accelerator")
# Sorted (as tf.nest flattens dicts) an image comes first, so `fit`'s batch-size check reads view1's batch dimension.
HOST_KEYS = frozenset({"view1", "view2", "view1_params", "view2_params"})


def check_augment_on(value) -> str:
    """The mode, or a one-line error naming the allowed values."""
    if value not in AUGMENT_ON:
        raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {value!r} (config.augment_on / augment_on=).")
    return value


def is_host_batch(data) -> bool:
    """True for a batch from a pipeline in accelerator mode (uint8 crops + seeds, not yet augmented)."""
    return isinstance(data, dict) and set(data) in (HOST_KEYS, HOST_KEYS | {"labels"})


class DeviceAugment:
    """Stage 2 of both views on the device: `{"view1", "view2", "view1_params", "view2_params"}` -> float views.

    Called by `BarlowTwins.train_step` / `test_step` when the model's `device_augment` is set; any other batch (already
    augmented views) passes through unchanged, so one model trains from either mode's pipeline.
    """

    def __init__(self, view1: ViewConfig, view2: ViewConfig):
        if not (isinstance(view1, ViewConfig) and isinstance(view2, ViewConfig)):
            raise ValueError(f"DeviceAugment needs two ViewConfig, got {type(view1).__name__}, {type(view2).__name__}")
        self.views = (view1, view2)

    def get_config(self) -> dict:
        """The two views' fields (JSON-ready): what `BarlowTwins.get_config` saves."""
        return {"view1": self.views[0].to_dict(), "view2": self.views[1].to_dict()}

    @classmethod
    def from_config(cls, config: dict) -> "DeviceAugment":
        return cls(*(ViewConfig.from_dict(config[name]) for name in ("view1", "view2")))

    def __call__(self, data):
        if not is_host_batch(data):
            return data
        views = tuple(ops.apply_photometric(data[f"view{i}"], view, _unpack(data[f"view{i}_params"]))
                      for i, view in enumerate(self.views, start=1))
        return views + ((data["labels"],) if "labels" in data else ())  # the online probe's labels pass through


def host_batch(crops1: tf.Tensor, crops2: tf.Tensor, views, seed1: tf.Tensor, seed2: tf.Tensor,
               labels: tf.Tensor | None = None) -> dict:
    """The element a pipeline yields in accelerator mode: uint8 crops and their photometric draws (from the views'
    batch seeds, as `augment.photometric_batch` draws them), and the labels for the online probe if given."""
    for name, crops in (("view1", crops1), ("view2", crops2)):
        if crops.dtype != tf.uint8:
            raise ValueError(f"accelerator mode sends uint8 crops, {name} is {crops.dtype.name}")
    n = tf.shape(crops1)[0]
    batch = {"view1": crops1, "view2": crops2, "view1_params": _pack(ops.photometric_params(views[0], n, seed1)),
             "view2_params": _pack(ops.photometric_params(views[1], n, seed2))}
    return batch if labels is None else {**batch, "labels": labels}


_MASKS = ("shift_hue", "to_gray", "blur", "solarize")  # bool per image


def _pack(params: dict) -> dict:
    """Masks as int32: tf.distribute's dataset splitting cannot add up bool tensors (AddN has no bool kernel)."""
    return {k: tf.cast(v, tf.int32) if k in _MASKS else v for k, v in params.items()}


def _unpack(params: dict) -> dict:
    return {k: tf.cast(v, tf.bool) if k in _MASKS else v for k, v in params.items()}
