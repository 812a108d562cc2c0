"""The host's share of a view from an encoded image: decode straight to the random crop window, flip, resize, uint8.

`decode_random_resized_crop(data, view, seed)` gives exactly the pixels of
`ops.random_resized_crop(decode(data), ...)` (same stateless draws, same bicubic antialiased resize, same
rounding; tested) but decodes less:

* JPEG: the crop box is sampled from the header's size (`tf.image.extract_jpeg_shape`, no decode) and only the
  window, plus a 16-pixel margin, is decoded (`tf.io.decode_and_crop_jpeg`). libjpeg skips the rows above and below
  it and the MCU columns outside it; the pixels equal the full decode's (tested; without the margin the chroma
  upsampling at the window's edge differs). Scale-(0.08, 1) crops cover 54% of the
  image on average, so this saves about half of the decode.
* Both views of an image (`decode_random_resized_crop_pair`): one decode of the union of their windows.
* Anything else (PNG, gray/RGBA PNG, ...): the full decode, then the crop.

`dct_scaling=True` (off by default, because it CHANGES PIXELS): when the crop is at least 2x / 4x / 8x the output
side in both directions, libjpeg decodes it at 1/2, 1/4 or 1/8 scale in the DCT domain (`ratio=`), which is much
cheaper than decoding at full size and then downsampling. The DCT downscale is a different filter from the
antialiased bicubic one, and the window is rounded out to the scaled pixel grid (at most r - 1 source pixels per
side), so views differ slightly from the default (32-px crops of 300-400 px images, which decode at 1/4-1/8: a mean
absolute difference of 4.1 grey levels, 8 at most per image; checked in tests/augment/test_device.py); both augment modes still agree with each other, since the host runs this either way.

No float image is kept: the crop is resized as float (TensorFlow's resize kernels are float) and rounded back to
uint8 at once, as PIL does.
"""

from __future__ import annotations

import tensorflow as tf

from bt_keras.augment import ops
from bt_keras.views import ViewConfig

DCT_RATIOS = (1, 2, 4, 8)  # the scales libjpeg decodes at (tf.io.decode_jpeg's `ratio`)
_MARGIN = 16  # one MCU of 4:2:0 JPEG: context for the chroma upsampling at the window's border


def _resize_uint8(crop: tf.Tensor, size: int) -> tf.Tensor:
    """Antialiased bicubic resize of a uint8 crop, rounded to uint8: the pixels of `tf.image.resize(crop, method=
    "bicubic", antialias=True)` (the same kernel, ScaleAndTranslate), without casting the crop to float first."""
    hw = tf.cast(tf.shape(crop)[:2], tf.float32)
    resized = tf.raw_ops.ScaleAndTranslate(images=crop[None], size=tf.constant([size, size], tf.int32),
                                           scale=size / hw, translation=tf.zeros([2]), kernel_type="keyscubic",
                                           antialias=True)[0]
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def _exact_window(data, top, left, h, w, full_hw) -> tf.Tensor:
    """The box's pixels exactly as a full decode gives them. libjpeg's cropped decode upsamples the chroma planes
    with edge replication at the window's border instead of the neighbouring pixels, so a window cut at the box
    differs from the full decode in its last rows/columns (up to 4 grey levels, measured); decoding `_MARGIN` more
    pixels on each side (clipped to the image) and slicing them off gives identical pixels (tested)."""
    y0, x0 = tf.maximum(top - _MARGIN, 0), tf.maximum(left - _MARGIN, 0)
    y1, x1 = tf.minimum(top + h + _MARGIN, full_hw[0]), tf.minimum(left + w + _MARGIN, full_hw[1])
    window = tf.io.decode_and_crop_jpeg(data, tf.stack([y0, x0, y1 - y0, x1 - x0]), channels=3)
    return window[top - y0:top - y0 + h, left - x0:left - x0 + w]


def _jpeg_window(data, top, left, h, w, full_hw, size: int, dct_scaling: bool) -> tf.Tensor:
    """The crop box of a JPEG, decoded (at 1/r scale when `dct_scaling` and the box is >= r x the output side)."""
    if not dct_scaling:
        return _exact_window(data, top, left, h, w, full_hw)
    shortest = tf.minimum(h, w)
    index = tf.reduce_sum(tf.cast(shortest >= size * tf.constant(DCT_RATIOS[1:]), tf.int32))

    def scaled(r):
        def decode():
            if r == 1:
                return _exact_window(data, top, left, h, w, full_hw)
            limit = (full_hw + r - 1) // r  # libjpeg's output size at 1/r: ceil
            y0, x0 = top // r, left // r
            y1, x1 = tf.minimum((top + h + r - 1) // r, limit[0]), tf.minimum((left + w + r - 1) // r, limit[1])
            return tf.io.decode_and_crop_jpeg(data, tf.stack([y0, x0, y1 - y0, x1 - x0]), channels=3, ratio=r)
        return decode

    return tf.switch_case(index, [scaled(r) for r in DCT_RATIOS])


def decode_random_resized_crop(data, view: ViewConfig, seed, *, dct_scaling: bool = False) -> tf.Tensor:
    """Encoded image bytes (any size) -> uint8 [S, S, 3]: `view`'s random resized crop + flip, decoding as little
    as possible. Same result as `ops.random_resized_crop(decode(data), S, scale, ratio, seed, flip_prob)`
    unless `dct_scaling` (see the module docstring)."""
    size = view.crop_size
    s_box, s_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

    def jpeg():
        full_hw = tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int32)
        top, left, h, w = (v[0] for v in ops.sample_crop_boxes(full_hw[:1], full_hw[1:], view.crop_scale,
                                                                   view.crop_ratio, s_box))
        crop = _jpeg_window(data, top, left, h, w, full_hw, size, dct_scaling)
        flip = tf.random.stateless_uniform([], s_flip) < view.flip_prob
        crop = tf.cond(flip, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
        return _resize_uint8(crop, size)

    def other():
        image = tf.ensure_shape(tf.io.decode_image(data, channels=3, expand_animations=False), [None, None, 3])
        return ops.random_resized_crop(image, size, view.crop_scale, view.crop_ratio, seed, view.flip_prob)

    return tf.ensure_shape(tf.cond(tf.io.is_jpeg(data), jpeg, other), [size, size, 3])


def decode_random_resized_crop_pair(data, views, seeds, *, dct_scaling: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """Both views' crops of one encoded image, `decode_random_resized_crop(data, views[i], seeds[i])` each (same
    pixels), decoding a JPEG once: the union of the two crop windows (plus the margin). With `dct_scaling` each view
    is decoded on its own (at its own scale)."""
    if dct_scaling:
        return tuple(decode_random_resized_crop(data, v, s, dct_scaling=True) for v, s in zip(views, seeds))
    splits = [tf.unstack(tf.random.experimental.stateless_split(seed, 2)) for seed in seeds]

    def jpeg():
        full_hw = tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int32)
        boxes = [[v[0] for v in ops.sample_crop_boxes(full_hw[:1], full_hw[1:], view.crop_scale, view.crop_ratio,
                                                          s_box)] for view, (s_box, _) in zip(views, splits)]
        y0 = tf.maximum(tf.minimum(boxes[0][0], boxes[1][0]) - _MARGIN, 0)
        x0 = tf.maximum(tf.minimum(boxes[0][1], boxes[1][1]) - _MARGIN, 0)
        y1 = tf.minimum(tf.maximum(boxes[0][0] + boxes[0][2], boxes[1][0] + boxes[1][2]) + _MARGIN, full_hw[0])
        x1 = tf.minimum(tf.maximum(boxes[0][1] + boxes[0][3], boxes[1][1] + boxes[1][3]) + _MARGIN, full_hw[1])
        window = tf.io.decode_and_crop_jpeg(data, tf.stack([y0, x0, y1 - y0, x1 - x0]), channels=3)
        crops = []
        for view, (top, left, h, w), (_, s_flip) in zip(views, boxes, splits):
            crop = window[top - y0:top - y0 + h, left - x0:left - x0 + w]
            flip = tf.random.stateless_uniform([], s_flip) < view.flip_prob
            crop = tf.cond(flip, lambda c=crop: tf.reverse(c, axis=[1]), lambda c=crop: c)
            crops.append(_resize_uint8(crop, view.crop_size))
        return tuple(crops)

    def other():
        image = tf.ensure_shape(tf.io.decode_image(data, channels=3, expand_animations=False), [None, None, 3])
        return tuple(ops.random_resized_crop(image, v.crop_size, v.crop_scale, v.crop_ratio, s, v.flip_prob)
                     for v, s in zip(views, seeds))

    crops = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    return tuple(tf.ensure_shape(c, [v.crop_size, v.crop_size, 3]) for c, v in zip(crops, views))
