"""Barlow Twins augmentations as batched TensorFlow ops with per-image randomness.

The two views follow the paper (Zbontar et al. 2021, Sec. 3 and Appendix) and the official code
(facebookresearch/barlowtwins, ``main.py: Transform``): random resized crop, horizontal flip p=0.5,
colour jitter p=0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, torchvision meaning),
grayscale p=0.2, Gaussian blur p=1.0 / 0.1 with sigma ~ U[0.1, 2.0], solarisation p=0.0 / 0.2,
then mean/std normalisation. Every random decision is drawn per image, also inside a batch.

Order of operations: crop -> flip -> colour jitter -> grayscale -> blur -> solarise -> normalise,
as in the official code. An optional per-image rotation (off by default, not in the paper; for data such as
handwritten digits, where flips and colour changes make no sense) runs right after crop and flip. Colour jitter applies its four adjustments in a random order per image,
like ``torchvision.transforms.ColorJitter``; each adjustment clamps to [0, 1].

Randomness is stateless: ``augment_batch(images, config, seed)`` with an int or an int tensor of
shape [2] as seed is a pure function of its inputs (reproducible); ``seed=None`` draws a fresh
seed. The tf.data pipelines in ``bt_keras.data`` derive one seed per batch (and per image for the
per-image crops) from a base seed and the element index, so results do not depend on threading.

Two crop implementations, both with torchvision's ``RandomResizedCrop`` sampling rule:
``augment_batch`` crops equal-size images with ``tf.image.crop_and_resize`` (one box per image,
fast; bilinear without antialiasing, which matters only when a crop is shrunk, never for images at
their native size such as CIFAR at 32 px); ``random_resized_crop`` crops one image of any size with
antialiased bicubic resizing as in the paper, for datasets whose images differ in size.

Two stages (issue 17, ``bt_keras.augment.device``): ``geometric_batch`` (crop + flip to uint8, on the host) and
``photometric_batch`` (colour, grayscale, blur, solarise, normalise; on the host or in the model's train_step), drawn
from the same batch seed as ``augment_batch``; the pipelines call the two, so ``augment_on`` does not change the views.

Speed: the colour steps (jitter, grayscale, solarise, normalise) are fused with XLA
(``jit_compile``; compiled once per batch shape, about a second), blur with p < 1 runs only on the
selected images. See benchmarks/input_pipeline.py for measured throughput.
"""

from __future__ import annotations

import math
import numbers

import tensorflow as tf

from bt_keras.views import ViewConfig

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale (ITU-R 601-2 luma)
SOLARIZE_THRESHOLD = 128.0 / 255.0  # PIL ImageOps.solarize(threshold=128): values >= 128 invert
_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params


# ----------------------------------------------------------------------------------- helpers


def _to_unit_float(images) -> tf.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; floats are taken to be in [0, 1] already."""
    images = tf.convert_to_tensor(images)
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 255.0
    if not images.dtype.is_floating:
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype.name}")
    return tf.cast(images, tf.float32)


def normalize(images, mean, std) -> tf.Tensor:
    """(x / 255 - mean) / std for uint8, (x - mean) / std for float [0, 1]; any leading shape."""
    return (_to_unit_float(images) - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def as_seed(seed) -> tf.Tensor:
    """None -> a fresh random seed; int n -> [n, 0]; else an int tensor of shape [2] as is."""
    if seed is None:
        return tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
    if isinstance(seed, numbers.Integral):
        return tf.constant([int(seed), 0], tf.int64)
    return seed


def _bernoulli(seed, n, p: float) -> tf.Tensor:
    return tf.random.stateless_uniform([n], seed) < p


def sample_crop_boxes(height, width, scale, ratio, seed):
    """Per-image crop boxes by torchvision's ``RandomResizedCrop.get_params`` rule.

    ``height``/``width``: int tensors [B]. Tries 10 (area fraction ~ U[scale], log aspect ratio ~
    U[log ratio]) candidates per image and keeps the first that fits; otherwise falls back to the
    largest central crop with the ratio clamped into range. Returns int32 (top, left, h, w), each [B].
    """
    height, width = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    n = tf.shape(height)[0]
    s_area, s_ratio, s_top, s_left = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    area = (height * width)[:, None] * tf.random.stateless_uniform([n, _CROP_ATTEMPTS], s_area, *scale)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(tf.random.stateless_uniform([n, _CROP_ATTEMPTS], s_ratio, log_lo, log_hi))
    w = tf.round(tf.sqrt(area * aspect))
    h = tf.round(tf.sqrt(area / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    w, h = tf.gather(w, first, batch_dims=1), tf.gather(h, first, batch_dims=1)
    found = tf.reduce_any(fits, axis=1)
    # Fallback: central crop of the whole image with its aspect ratio clamped into `ratio`.
    in_ratio = width / height
    fb_w = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
    fb_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
    h, w = tf.where(found, h, fb_h), tf.where(found, w, fb_w)
    u_top = tf.random.stateless_uniform([n], s_top)
    u_left = tf.random.stateless_uniform([n], s_left)
    top = tf.where(found, tf.floor(u_top * (height - h + 1)), tf.floor((height - h) / 2))
    left = tf.where(found, tf.floor(u_left * (width - w + 1)), tf.floor((width - w) / 2))
    return tuple(tf.cast(v, tf.int32) for v in (top, left, h, w))


def _crop_and_flip_batch(x: tf.Tensor, config: ViewConfig, seed) -> tf.Tensor:
    """Per-image random resized crop + horizontal flip of an equal-size float batch, in one
    ``crop_and_resize`` call: a flipped image gets its box with x1 > x2 (mirrored sampling).

    Boxes are set so the sample points are the pixel centres of a half-pixel-aligned resize
    (torchvision/PIL convention); a 1-pixel edge pad makes border samples clamp, not go black.
    """
    shape = tf.shape(x)
    n, height, width, size = shape[0], shape[1], shape[2], config.crop_size
    s_box, s_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    top, left, h, w = sample_crop_boxes(tf.fill([n], height), tf.fill([n], width),
                                        config.crop_scale, config.crop_ratio, s_box)
    padded = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")

    def span(start, extent, full):  # normalised first/last sample coordinate in the padded image
        start, extent = tf.cast(start, tf.float32) + 1.0, tf.cast(extent, tf.float32)
        step, denom = extent / size, tf.cast(full + 1, tf.float32)
        return (start + 0.5 * step - 0.5) / denom, (start + extent - 0.5 * step - 0.5) / denom

    y1, y2 = span(top, h, height)
    x1, x2 = span(left, w, width)
    flip = _bernoulli(s_flip, n, config.flip_prob)
    x1, x2 = tf.where(flip, x2, x1), tf.where(flip, x1, x2)
    boxes = tf.stack([y1, x1, y2, x2], axis=1)
    return tf.image.crop_and_resize(padded, boxes, tf.range(n), [size, size], method="bilinear")


def _on_subset(x: tf.Tensor, mask: tf.Tensor, fn) -> tf.Tensor:
    """Apply ``fn(images, indices)`` only to the images where ``mask`` is True (gather/scatter),
    so a costly step with probability p costs about p of a full-batch step."""

    def apply():
        indices = tf.where(mask)
        return tf.tensor_scatter_nd_update(x, indices, fn(tf.gather_nd(x, indices), indices[:, 0]))

    return tf.cond(tf.reduce_any(mask), apply, lambda: x)


def _images(mask: tf.Tensor) -> tf.Tensor:
    """[B] -> [B, 1, 1, 1], to broadcast a per-image value over an image batch."""
    return tf.reshape(mask, [-1, 1, 1, 1])


def _shift_hue(x: tf.Tensor, shift: tf.Tensor) -> tf.Tensor:
    """torchvision adjust_hue: rotate H in HSV by ``shift`` (fraction of the circle) per image."""
    hsv = tf.image.rgb_to_hsv(x)
    hue = tf.math.floormod(hsv[..., :1] + _images(shift), 1.0)
    return tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], axis=-1)), 0.0, 1.0)


@tf.function(jit_compile=True, reduce_retracing=True)
def _color_pixels(x, factors, order, hue, shift_hue, to_gray):
    """Colour jitter then grayscale on x [B, S, S, 3] in [0, 1], fused by XLA (2-4x faster on CPU
    than op by op; compiled once per batch shape; the parameters are per-image tensors).

    ``factors`` [B, 3]: brightness b, contrast c, saturation s, applied in the per-image ``order``
    [B, 4] (op 0, 1, 2 = those, 3 = hue) as torchvision's blends ``f * x + (1 - f) * target`` with
    target black, the image's mean gray level and the per-pixel gray image: one 3x3 colour matrix
    plus bias per image and step, clamped to [0, 1]. Hue rotates H in HSV by ``hue`` [B] where
    ``shift_hue`` [B]. ``to_gray`` [B]: replace by the 3-channel gray image. Factor 1 and no hue
    shift leave an image exactly unchanged.
    """
    weights = tf.constant(GRAY_WEIGHTS, tf.float32)
    eye, gray = tf.eye(3), tf.tile(weights[:, None], [1, 3])  # x @ gray = gray level, 3 channels
    factors = tf.concat([factors, tf.ones_like(factors[:, :1])], axis=1)  # the hue step blends nothing
    for step in range(4):
        op = order[:, step]
        f = tf.gather(factors, op, batch_dims=1)[:, None, None]
        matrices = tf.where((op == 2)[:, None, None], f * eye + (1.0 - f) * gray, f * eye)
        mean_gray = tf.reduce_sum(tf.reduce_mean(x, axis=[1, 2]) * weights, axis=1)
        bias = tf.where(op == 1, (1.0 - factors[:, 1]) * mean_gray, 0.0)
        x = tf.clip_by_value(tf.einsum("bhwc,bcd->bhwd", x, matrices) + _images(bias), 0.0, 1.0)
        x = tf.where(_images((op == 3) & shift_hue), _shift_hue(x, hue), x)
    return tf.where(_images(to_gray), tf.einsum("bhwc,cd->bhwd", x, gray), x)


@tf.function(jit_compile=True, reduce_retracing=True)
def _solarize_and_normalize(x, solarize, mean, std):
    """Invert values >= 128/255 of the images where ``solarize`` [B], then (x - mean) / std (XLA)."""
    x = tf.where(_images(solarize) & (x >= SOLARIZE_THRESHOLD), 1.0 - x, x)
    return (x - mean) / std


def _jitter_params(config: ViewConfig, n, seed):
    """Per-image ColorJitter draws: (factors [n, 3], order [n, 4], hue [n], shift_hue [n]).
    Factors ~ U[max(0, 1 - v), 1 + v], hue ~ U[-hue, hue], order a random permutation; images
    without jitter (probability 1 - jitter_prob) get factors 1 and no hue shift."""
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
    apply = _bernoulli(seeds[0], n, config.jitter_prob)
    factors = tf.stack([tf.random.stateless_uniform([n], s, max(0.0, 1.0 - v), 1.0 + v) for s, v in
                        zip(seeds[1:4], (config.brightness, config.contrast, config.saturation))], axis=1)
    factors = tf.where(apply[:, None], factors, 1.0)
    hue = tf.random.stateless_uniform([n], seeds[4], -config.hue, config.hue)
    order = tf.argsort(tf.random.stateless_uniform([n, 4], seeds[5]), axis=1)
    return factors, order, hue, apply & (config.hue > 0)


def _blur(images: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Separable Gaussian blur, sigma [B] per image: one depthwise conv over (batch x channel)
    planes, reflect padding as torchvision's GaussianBlur."""
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-tf.square(taps) / (2.0 * tf.square(sigma[:, None])))
    kernel = kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)
    kernel = tf.transpose(tf.repeat(kernel, 3, axis=0))  # [K, B*3]: one kernel per image channel
    shape = tf.shape(images)
    planes = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, shape[1], shape[2], shape[0] * 3])
    planes = tf.pad(planes, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    planes = tf.nn.depthwise_conv2d(planes, kernel[None, :, :, None], [1, 1, 1, 1], "VALID")
    planes = tf.nn.depthwise_conv2d(planes, kernel[:, None, :, None], [1, 1, 1, 1], "VALID")
    return tf.transpose(tf.reshape(planes, [shape[1], shape[2], shape[0], 3]), [2, 0, 1, 3])


def rotation_angles(config: ViewConfig, n, seed) -> tf.Tensor:
    """Per-image rotation angles in degrees [n]: U[rotation_degrees] with probability rotation_prob, else 0."""
    s_apply, s_angle = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    angles = tf.random.stateless_uniform([n], s_angle, *config.rotation_degrees)
    return tf.where(_bernoulli(s_apply, n, config.rotation_prob), angles, 0.0)


def rotate(images: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    """Rotates each image of a float batch [B, H, W, C] about its centre by its own angle ``degrees`` [B]
    (counter-clockwise on screen for positive angles), bilinear, filling with 0 where the source lies outside.

    Output pixel p (x = column, y = row) samples the input at R(angle) (p - c) + c, c the centre
    ((W - 1) / 2, (H - 1) / 2); an angle of 0 returns the image unchanged.
    """
    shape = tf.shape(images)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    theta = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    zeros = tf.zeros_like(theta)
    # ImageProjectiveTransformV3 maps output (x, y) to input ((a0 x + a1 y + a2), (b0 x + b1 y + b2)) for c0 = c1 = 0.
    transforms = tf.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, zeros, zeros],
                          axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")


def augment_batch(images, config: ViewConfig, seed=None, *, geometric: bool = True) -> tf.Tensor:
    """One augmented view of a batch: uint8 (or float [0, 1]) [B, H, W, 3] -> float32 [B, S, S, 3].

    ``seed``: None (fresh random draw), an int, or an int tensor [2] (stateless; reproducible).
    ``geometric=False`` skips crop and flip, for batches that ``random_resized_crop`` already
    cropped (and flipped) image by image to S x S (the variable-size pipeline).
    Colour steps run fused under XLA (compiled once per batch shape); blur with p < 1 runs only
    on the selected images; steps with probability 0 are skipped.
    """
    x = _to_unit_float(images)
    if x.shape.rank != 4 or x.shape[-1] not in (3, None):
        raise ValueError(f"images must be a batch [B, H, W, 3], got shape {x.shape}")
    seed = as_seed(seed)
    if geometric:
        x = _crop_and_flip_batch(x, config, _stage_seeds(seed)[0])
    return photometric_batch(rotate_batch(x, config, seed), config, seed)


def rotate_batch(images, config: ViewConfig, seed) -> tf.Tensor:
    """The optional small rotation (``rotation_prob``, off by default), right after crop and flip, from its own
    seed folded from the batch seed (so recipes without it draw exactly as before). uint8 in, uint8 out (rounded:
    the host stage of both augment modes); float in, float out. Identity when rotation_prob is 0."""
    if config.rotation_prob <= 0:
        return images
    images = tf.convert_to_tensor(images)
    n = tf.shape(images)[0]
    angles = rotation_angles(config, n, tf.random.experimental.stateless_fold_in(as_seed(seed), 1))
    x = tf.cast(images, tf.float32) if images.dtype == tf.uint8 else images
    x = _on_subset(x, tf.not_equal(angles, 0.0), lambda batch, idx: rotate(batch, tf.gather(angles, idx)))
    return _to_uint8(x) if images.dtype == tf.uint8 else x


# ------------------------------------------- the two stages: geometric (host) / photometric (either)
# `augment_on="host" | "accelerator"` (bt_keras.augment.device): both modes run `geometric_batch` (or the per-image
# crop) on the host to uint8 and `photometric_batch` with the same batch seed, on the host or in the model's
# train_step, so the two modes give the same views.


def _stage_seeds(seed) -> list[tf.Tensor]:
    """The five per-step seeds of a batch seed: [crop+flip, jitter, grayscale, blur, solarise]."""
    return tf.unstack(tf.random.experimental.stateless_split(as_seed(seed), 5))


def geometric_batch(images, config: ViewConfig, seed) -> tf.Tensor:
    """The geometric part of ``augment_batch``: per-image random resized crop + flip (+ the optional rotation) of an
    equal-size uint8 batch [B, H, W, 3] -> uint8 [B, S, S, 3] (rounded, as PIL does), with the same draws as
    ``augment_batch(images, config, seed)``. No float image leaves this function."""
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8 or images.shape.rank != 4:
        raise ValueError(f"geometric_batch takes a uint8 batch [B, H, W, 3], got {images.dtype.name} {images.shape}")
    cropped = _crop_and_flip_batch(tf.cast(images, tf.float32), config, _stage_seeds(seed)[0])
    return _to_uint8(rotate_batch(cropped, config, seed))


@tf.function(jit_compile=True, reduce_retracing=True)
def _to_uint8(x):
    """float [0, 255] -> uint8, rounded (one fused pass)."""
    return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 255.0)), tf.uint8)


@tf.function(jit_compile=True, reduce_retracing=True)
def _color_pixels_uint8(images, factors, order, hue, shift_hue, to_gray):
    """`_color_pixels` of a uint8 batch, the conversion to [0, 1] fused into it."""
    return _color_pixels(tf.cast(images, tf.float32) / 255.0, factors, order, hue, shift_hue, to_gray)


def photometric_params(config: ViewConfig, n, seed) -> dict:
    """The per-image draws of the photometric stage for n images from a batch seed (stage seeds 1-4; stage 0 is the
    crop's), as small tensors with the image axis first: factors [n, 3], order [n, 4], hue, shift_hue, to_gray,
    sigma, blur, solarize [n]. Drawn on the host in both modes; batched per image, so a batch split over replicas
    splits its parameters with it."""
    seeds = _stage_seeds(seed)
    factors, order, hue, shift_hue = _jitter_params(config, n, seeds[1])
    s_apply, s_sigma = tf.unstack(tf.random.experimental.stateless_split(seeds[3], 2))
    return {"factors": factors, "order": order, "hue": hue, "shift_hue": shift_hue,
            "to_gray": _bernoulli(seeds[2], n, config.grayscale_prob),
            "sigma": tf.random.stateless_uniform([n], s_sigma, *config.blur_sigma),
            "blur": _bernoulli(s_apply, n, config.blur_prob) if config.blur_prob < 1.0 else tf.fill([n], True),
            "solarize": _bernoulli(seeds[4], n, config.solarize_prob)}


def apply_photometric(images, config: ViewConfig, params: dict) -> tf.Tensor:
    """Colour jitter, grayscale, blur, solarisation and normalisation of an S x S batch (uint8 or float [0, 1]) with
    the draws `params` (``photometric_params``) -> float32 normalised. Steps with probability 0 are skipped."""
    images = tf.ensure_shape(tf.convert_to_tensor(images), [None, config.crop_size, config.crop_size, 3])
    if config.jitter_prob > 0 or config.grayscale_prob > 0:
        color = _color_pixels_uint8 if images.dtype == tf.uint8 else _color_pixels
        x = color(images if images.dtype == tf.uint8 else _to_unit_float(images), params["factors"],
                  params["order"], params["hue"], params["shift_hue"], params["to_gray"])
    else:
        x = _to_unit_float(images)
    if config.blur_prob > 0:
        radius = max(1, config.crop_size // 20)
        sigma = params["sigma"]
        if config.blur_prob == 1.0:
            x = _blur(x, sigma, radius)
        else:
            x = _on_subset(x, params["blur"], lambda images, idx: _blur(images, tf.gather(sigma, idx), radius))
    return _solarize_and_normalize(x, params["solarize"], tf.constant(config.mean), tf.constant(config.std))


def photometric_batch(images, config: ViewConfig, seed) -> tf.Tensor:
    """The per-pixel part of ``augment_batch`` on an S x S batch (uint8 or float [0, 1]) -> float32
    normalised: colour jitter, grayscale, blur, solarisation, normalisation, drawn from ``seed``'s
    stage seeds 1-4 (stage 0 is the crop's), so host and accelerator modes draw the same."""
    images = tf.convert_to_tensor(images)
    return apply_photometric(images, config, photometric_params(config, tf.shape(images)[0], seed))


# --------------------------------------------------------------------- end of the two stages


# ------------------------------------------------------------------------ single-image transforms


def random_resized_crop(image, size: int, scale, ratio, seed, flip_prob: float = 0.0,
                        method: str = "bicubic") -> tf.Tensor:
    """Random resized crop (+ horizontal flip with ``flip_prob``) of ONE uint8 image [H, W, 3] of
    any size -> uint8 [size, size, 3], for datasets whose images differ in size.

    Same sampling rule as the batched crop; antialiased resize (bicubic for pretraining as in
    the paper, bilinear for the linear probe as torchvision's default), rounded back to uint8
    as PIL does, so batches of crops stay small.
    """
    image = tf.convert_to_tensor(image)
    s_box, s_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    hw = tf.shape(image)[:2]
    top, left, h, w = (v[0] for v in sample_crop_boxes(hw[:1], hw[1:], scale, ratio, s_box))
    crop = image[top:top + h, left:left + w]
    flip = tf.random.stateless_uniform([], s_flip) < flip_prob
    crop = tf.cond(flip, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
    resized = tf.image.resize(crop, [size, size], method=method, antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)
