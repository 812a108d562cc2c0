"""The evaluation transforms of one image: the centre crop the probes and the SavedModel export share, and the
linear probe's training crop. Exports name `bt_keras.augment.eval_transform` in their metadata (the package
resolves it here)."""

from __future__ import annotations

import tensorflow as tf

from bt_keras.augment.ops import as_seed, normalize, random_resized_crop


def eval_transform(image, image_size: int, mean, std, crop_fraction: float = 0.875) -> tf.Tensor:
    """Deterministic evaluation transform of ONE decoded uint8 image [H, W, 3] -> float32 [S, S, 3].

    If the image is already image_size x image_size (e.g. CIFAR at 32 px) it is only normalised.
    Otherwise its shorter side is resized to round(image_size / crop_fraction) (bilinear,
    antialiased, the longer side scaled by the same factor and truncated, as torchvision.Resize;
    no intermediate uint8 rounding), the central image_size x image_size square is cut (offsets
    rounded half to even, as torchvision.CenterCrop), and the result is normalised with mean/std.
    Used by the linear probe and the SavedModel export, so both see identical pixels.
    """
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must lie in (0, 1], got {crop_fraction}")
    image = tf.convert_to_tensor(image)
    image.shape.assert_has_rank(3)
    short_target = float(round(image_size / crop_fraction))

    def resize_and_crop():
        hw = tf.cast(tf.shape(image)[:2], tf.float32)
        new_hw = tf.cast(tf.floor(hw * short_target / tf.reduce_min(hw)), tf.int32)
        new_hw = tf.maximum(new_hw, int(short_target))  # the shorter side is exact
        resized = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
        top, left = (tf.cast(tf.round(tf.cast(new_hw - image_size, tf.float32) / 2.0), tf.int32)[i] for i in (0, 1))
        return resized[top:top + image_size, left:left + image_size]

    same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], image_size))
    out = tf.cond(same_size, lambda: tf.cast(image, tf.float32), resize_and_crop)
    out = tf.ensure_shape(out, [image_size, image_size, 3])
    return normalize(out / 255.0 if image.dtype == tf.uint8 else out, mean, std)


def train_eval_transform(image, image_size: int, mean, std, seed=None) -> tf.Tensor:
    """Linear-probe training transform of ONE uint8 image [H, W, 3] -> float32 [S, S, 3]: random
    resized crop (scale 0.08-1, ratio 3/4-4/3, bilinear) + horizontal flip p=0.5, normalised, as
    the official evaluate.py (torchvision RandomResizedCrop + RandomHorizontalFlip)."""
    seed = as_seed(seed)
    crop = random_resized_crop(image, image_size, (0.08, 1.0), (3 / 4, 4 / 3), seed, flip_prob=0.5, method="bilinear")
    return normalize(crop, mean, std)
