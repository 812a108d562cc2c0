"""The augmentation parameters of the two views, as plain data: `ViewConfig` and the paper's presets.

This module does not load TensorFlow, so recipes (`experiments/*.py`) and configs can use it; the ops that apply a
`ViewConfig` to images live in `bt_keras.augment`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)

BLUR_REFERENCE_SIZE = 224  # the paper's blur sigma range is in pixels of a 224-px crop


def _pair(value, name: str) -> tuple[float, float]:
    value = tuple(float(v) for v in value)
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"ViewConfig.{name} must be a (low, high) pair with low <= high, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """Augmentation parameters of one view. Probabilities are per image; ranges are (low, high).

    ``blur_sigma`` is in pixels of the output crop; the blur kernel spans 10% of the crop side
    (radius ``crop_size // 20``: 23 taps at 224 px, as in SimCLR/BYOL). ``brightness``, ``contrast``
    and ``saturation`` draw a factor from U[max(0, 1 - v), 1 + v], ``hue`` a shift from U[-v, v]
    (fraction of the hue circle), as in torchvision. ``mean``/``std`` normalise the [0, 1] output.
    ``rotation_prob`` (default 0: off, as in the paper) rotates an image about its centre by an angle
    ~ U[rotation_degrees] (counter-clockwise for positive angles, as torchvision's RandomRotation),
    bilinear, the corners that come from outside filled with 0 (black, torchvision's default fill).
    """

    crop_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    rotation_prob: float = 0.0
    rotation_degrees: tuple[float, float] = (-15.0, 15.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if isinstance(self.crop_size, bool) or not isinstance(self.crop_size, int) or self.crop_size < 2:
            raise ValueError(f"ViewConfig.crop_size must be an int >= 2, got {self.crop_size!r}")
        for name in ("crop_scale", "crop_ratio", "blur_sigma", "rotation_degrees"):
            put(name, _pair(getattr(self, name), name))
        if not (0.0 < self.crop_scale[0] and self.crop_scale[1] <= 1.0):
            raise ValueError(f"ViewConfig.crop_scale must lie in (0, 1], got {self.crop_scale}")
        if self.crop_ratio[0] <= 0.0:
            raise ValueError(f"ViewConfig.crop_ratio must be positive, got {self.crop_ratio}")
        if self.blur_sigma[0] <= 0.0:
            raise ValueError(f"ViewConfig.blur_sigma must be positive, got {self.blur_sigma}")
        if not (-180.0 <= self.rotation_degrees[0] and self.rotation_degrees[1] <= 180.0):
            raise ValueError(f"ViewConfig.rotation_degrees must lie in [-180, 180], got {self.rotation_degrees}")
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob", "rotation_prob"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ViewConfig.{name} must be a probability in [0, 1], got {value}")
            put(name, value)
        for name, high in (("brightness", math.inf), ("contrast", math.inf), ("saturation", math.inf), ("hue", 0.5)):
            value = float(getattr(self, name))
            if not 0.0 <= value <= high:
                raise ValueError(f"ViewConfig.{name} must lie in [0, {high}], got {value}")
            put(name, value)
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or (name == "std" and min(value) <= 0.0):
                raise ValueError(f"ViewConfig.{name} must be 3 per-channel values (std > 0), got {value}")
            put(name, value)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of ints, floats and lists (fits ml_collections / JSON)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values) -> "ViewConfig":
        """Inverse of ``to_dict``; accepts any mapping (e.g. a ConfigDict), rejects unknown keys."""
        values = dict(values)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown ViewConfig field(s) {unknown}")
        return cls(**values)


def imagenet_views(crop_size: int = 224) -> tuple[ViewConfig, ViewConfig]:
    """The paper's two views. Blur sigma U[0.1, 2.0] px at 224 px is scaled by crop_size / 224."""
    scale = crop_size / BLUR_REFERENCE_SIZE
    sigma = (0.1 * scale, 2.0 * scale)
    return (ViewConfig(crop_size, blur_prob=1.0, blur_sigma=sigma, solarize_prob=0.0),
            ViewConfig(crop_size, blur_prob=0.1, blur_sigma=sigma, solarize_prob=0.2))


def cifar_views(crop_size: int = 32) -> tuple[ViewConfig, ViewConfig]:
    """Small-image recipe: the paper's views without blur, CIFAR-10 mean/std."""
    common = dict(blur_prob=0.0, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    return ViewConfig(crop_size, solarize_prob=0.0, **common), ViewConfig(crop_size, solarize_prob=0.2, **common)
