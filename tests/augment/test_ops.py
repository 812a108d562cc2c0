"""The training views (bt_keras.augment.ops, bt_keras.views): configs, per-image statistics read off the output
images, the colour steps against torchvision's definitions.

Statistical tests draw N images in one batch and accept a rate within 4.5 binomial standard
deviations of the configured probability (probability 0 or 1 must hold exactly). Each effect is
made detectable from the OUTPUT by the input: colourful images (grayscale), a horizontal ramp
(flip), bright images (solarisation), a 0/1 checkerboard with mean 0 / std 1 (blur), and the
untouched input (jitter).
"""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from bt_keras import augment
from bt_keras.augment import ops, ViewConfig
from tests.helpers import OFF, RAW, assert_rate

N = 2000
SIZE = 16


def only(view: ViewConfig, **keep) -> ViewConfig:
    """The view with every random step off except ``keep``, and raw (un-normalised) output."""
    return dataclasses.replace(view, **{**OFF, **RAW, **keep})


def colourful(n=N, size=SIZE) -> np.ndarray:
    """Saturated colours whose hue runs along x: never gray, asymmetric left/right."""
    hue = np.linspace(0.0, 0.8, size, dtype=np.float32)[None, :, None] * np.ones((size, 1, 1), np.float32)
    hsv = np.concatenate([hue, np.full_like(hue, 0.9), np.full_like(hue, 0.8)], axis=-1)
    return np.repeat(tf.image.hsv_to_rgb(hsv).numpy()[None], n, axis=0)


def run(images, view, seed=0, **kwargs) -> np.ndarray:
    return augment.augment_batch(tf.constant(images), view, seed, **kwargs).numpy()


# ------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("field, value", [
    ("crop_size", 1), ("crop_size", 3.5), ("crop_scale", (0.0, 1.0)), ("crop_scale", (0.5, 1.5)),
    ("crop_scale", (0.9, 0.1)), ("crop_ratio", (-1.0, 1.0)), ("flip_prob", 1.5), ("jitter_prob", -0.1),
    ("brightness", -0.4), ("hue", 0.7), ("blur_sigma", (0.0, 2.0)), ("solarize_prob", 2.0),
    ("mean", (0.5, 0.5)), ("std", (0.2, 0.0, 0.2)),
])
def test_view_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        ViewConfig(**{"crop_size": 32, field: value})


def test_view_config_dict_round_trip():
    view = augment.imagenet_views(96)[1]
    as_dict = json.loads(json.dumps(view.to_dict()))  # lists after JSON
    assert ViewConfig.from_dict(as_dict) == view
    with pytest.raises(ValueError, match="typo"):
        ViewConfig.from_dict({**as_dict, "typo": 1})


def test_recipes():
    v1, v2 = augment.imagenet_views()
    assert (v1.crop_size, v1.blur_prob, v1.solarize_prob, v2.blur_prob, v2.solarize_prob) == (224, 1.0, 0.0, 0.1, 0.2)
    assert v1.blur_sigma == (0.1, 2.0) and v1.mean == augment.IMAGENET_MEAN
    jitter = (v1.jitter_prob, v1.brightness, v1.contrast, v1.saturation, v1.hue, v1.grayscale_prob)
    assert jitter == (0.8, 0.4, 0.4, 0.2, 0.1, 0.2)
    c1, c2 = augment.cifar_views()
    assert (c1.crop_size, c1.blur_prob, c2.blur_prob, c1.solarize_prob, c2.solarize_prob) == (32, 0.0, 0.0, 0.0, 0.2)
    assert c1.mean == augment.CIFAR10_MEAN and c2.std == augment.CIFAR10_STD
    assert augment.imagenet_views(112)[0].blur_sigma == pytest.approx((0.05, 1.0))


# --------------------------------------------------------------------------- output properties


def test_output_shape_dtype_range_and_uint8_float_agree():
    images = np.random.default_rng(0).integers(0, 256, size=(8, 40, 30, 3), dtype=np.uint8)
    for view in augment.imagenet_views(24):
        out = run(images, view, seed=3)
        assert out.shape == (8, 24, 24, 3) and out.dtype == np.float32 and np.isfinite(out).all()
        low = (0 - np.array(view.mean)) / np.array(view.std)
        high = (1 - np.array(view.mean)) / np.array(view.std)
        assert (out >= low - 1e-4).all() and (out <= high + 1e-4).all()
        np.testing.assert_allclose(run(images.astype(np.float32) / 255, view, seed=3), out, atol=1e-4)


def test_seeded_calls_reproduce_and_seeds_differ():
    images = colourful(16)
    view = augment.imagenet_views(SIZE)[1]
    np.testing.assert_array_equal(run(images, view, seed=7), run(images, view, seed=7))
    assert not np.allclose(run(images, view, seed=7), run(images, view, seed=8))
    assert not np.allclose(augment.augment_batch(images, view).numpy(), augment.augment_batch(images, view).numpy())


def test_identical_images_get_different_views():
    out = run(colourful(64), augment.cifar_views(SIZE)[1], seed=1).reshape(64, -1)
    distances = np.abs(out[:, None] - out[None]).max(axis=-1)
    assert (distances[~np.eye(64, dtype=bool)] > 1e-3).all()


# ------------------------------------------------------------------------ per-image statistics


def test_flip_rate_from_output():
    ramp = np.linspace(0, 1, SIZE, dtype=np.float32)[None, None, :, None] * np.ones((N, SIZE, 1, 3), np.float32)
    view = only(augment.cifar_views(SIZE)[0], flip_prob=0.5, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    out = run(ramp, view)
    flipped = np.abs(out - ramp[:, :, ::-1]).max(axis=(1, 2, 3)) < 1e-4
    kept = np.abs(out - ramp).max(axis=(1, 2, 3)) < 1e-4
    assert (flipped ^ kept).all()
    assert_rate(flipped, N, 0.5)


@pytest.mark.parametrize("make_views", [augment.imagenet_views, augment.cifar_views])
def test_grayscale_rate_from_output(make_views):
    view = dataclasses.replace(make_views(SIZE)[0], blur_prob=0.0)  # the full recipe otherwise
    out = run(colourful(), view) * np.array(view.std) + np.array(view.mean)  # un-normalise
    spread = (out.max(axis=-1) - out.min(axis=-1)).max(axis=(1, 2))
    assert ((spread < 1e-5) | (spread > 0.05)).all()  # gray images are exactly gray, others clearly not
    assert_rate(spread < 1e-5, N, view.grayscale_prob)


@pytest.mark.parametrize("view_index", [0, 1])
def test_solarize_rate_from_output(view_index):
    view = augment.imagenet_views(SIZE)[view_index]
    bright = np.random.default_rng(1).uniform(0.55, 0.95, size=(N, SIZE, SIZE, 3)).astype(np.float32)
    out = run(bright, only(view, solarize_prob=view.solarize_prob), geometric=False)
    solarized = out.max(axis=(1, 2, 3)) < 0.5  # every pixel is >= 128/255, so all invert
    np.testing.assert_allclose(out[solarized], 1.0 - bright[solarized], atol=1e-6)
    np.testing.assert_array_equal(out[~solarized], bright[~solarized])
    assert_rate(solarized, N, view.solarize_prob)


@pytest.mark.parametrize("view_index", [0, 1])
def test_blur_rate_from_output(view_index):
    view = augment.imagenet_views(SIZE)[view_index]
    board = np.indices((SIZE, SIZE)).sum(axis=0) % 2
    board = np.broadcast_to(board[None, :, :, None], (N, SIZE, SIZE, 3)).astype(np.float32)
    out = run(board, only(view, blur_prob=view.blur_prob, blur_sigma=(0.1, 2.0)), geometric=False)
    blurred = out[board == 0].reshape(N, -1).max(axis=1) > 0  # any weight leaks into a 0-pixel
    np.testing.assert_array_equal(out[~blurred], board[~blurred])
    assert_rate(blurred, N, view.blur_prob)


def test_jitter_rate_from_output():
    view = augment.cifar_views(SIZE)[0]
    images = colourful()
    out = run(images, only(view, jitter_prob=view.jitter_prob), geometric=False)
    changed = np.abs(out - images).max(axis=(1, 2, 3)) > 1e-4
    np.testing.assert_array_equal(out[~changed], images[~changed])  # no jitter: exactly unchanged
    assert_rate(changed, N, 0.8)
    # Each factor moves the images as torchvision's definition says: brightness alone scales.
    bright = only(view, jitter_prob=1.0, contrast=0.0, saturation=0.0, hue=0.0)
    ratio = run(images * 0.5, bright, geometric=False) / (images * 0.5)
    per_image = ratio.reshape(N, -1)
    assert np.allclose(per_image, per_image[:, :1], atol=1e-4)  # one factor per image
    assert 0.6 - 1e-4 <= per_image.min() < 0.7 and 1.3 < per_image.max() <= 1.4 + 1e-4


def test_crop_boxes_within_bounds():
    for height, width in ((224, 224), (32, 32), (100, 300)):
        top, left, h, w = (v.numpy() for v in augment.sample_crop_boxes(
            tf.fill([N], height), tf.fill([N], width), (0.08, 1.0), (3 / 4, 4 / 3), tf.constant([4, 2])))
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
        area = h * w / (height * width)
        slack = 2.5 / min(h.min(), w.min())  # rounding of w and h to whole pixels
        assert area.min() >= 0.08 * (1 - slack) and area.max() <= 1.0
        assert (w / h >= 3 / 4 * (1 - slack)).all() and (w / h <= 4 / 3 * (1 + slack)).all()
        assert len(set(zip(top, left, h, w))) > N // 4  # genuinely per image
    # A 10 x 200 strip fits no candidate: torchvision's fallback is the central crop at ratio 4/3.
    boxes = augment.sample_crop_boxes(tf.constant([10]), tf.constant([200]), (0.08, 1.0), (3 / 4, 4 / 3), [0, 0])
    assert [int(v[0]) for v in boxes] == [0, 93, 10, 13]


def test_crop_area_and_ratio_from_output():
    """The output of a float ramp image reveals each crop: ramp span -> crop width / height."""
    side, size = 64, SIZE
    ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)
    images = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.float32(0.5)), axis=-1)
    images = np.repeat(images[None], N, axis=0)
    out = run(images, only(augment.cifar_views(size)[0]))
    width = (out[:, 0, -1, 0] - out[:, 0, 0, 0]) * (side - 1) * size / (size - 1)
    height = (out[:, -1, 0, 1] - out[:, 0, 0, 1]) * (side - 1) * size / (size - 1)
    area = width * height / side**2
    assert area.min() > 0.08 * 0.85 and area.max() < 1.0 + 1e-3  # edge clamping: < 1 px error
    assert (width / height > 3 / 4 * 0.85).all() and (width / height < 4 / 3 * 1.15).all()
    assert 0.4 < area.mean() < 0.65  # U(0.08, 1) area fractions, minus rejected candidates


# ------------------------------------------------------------------------------- the colour steps


def test_color_steps_match_torchvision_definitions():
    """The fused colour steps against a NumPy transcription of torchvision's functional ops
    (_blend with clamp; contrast blends with the mean gray level; hue shifts H in HSV)."""
    import colorsys

    rng = np.random.default_rng(5)
    images = rng.uniform(0, 1, size=(4, 6, 6, 3)).astype(np.float32)
    factors = np.array([[1.3, 0.7, 1.2], [0.6, 1.4, 0.8], [1.0, 1.0, 1.0], [1.4, 1.3, 1.2]], np.float32)
    order = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]], np.int32)
    hue = np.array([0.1, -0.05, 0.08, -0.1], np.float32)
    to_gray = np.array([False, False, False, True])
    weights = np.array(augment.GRAY_WEIGHTS, np.float32)

    def reference(image, f, steps, shift, gray):
        for op in steps:
            if op == 3:
                hsv = np.array([colorsys.rgb_to_hsv(*p) for p in image.reshape(-1, 3)])
                hsv[:, 0] = (hsv[:, 0] + shift) % 1.0
                image = np.array([colorsys.hsv_to_rgb(*p) for p in hsv]).reshape(image.shape)
                continue
            luma = image @ weights
            other = [0.0, luma.mean(), luma[..., None]][op]
            image = np.clip(f[op] * image + (1 - f[op]) * other, 0, 1)
        return np.repeat((image @ weights)[..., None], 3, axis=-1) if gray else image

    out = ops._color_pixels(images, factors, order, hue, tf.ones([4], tf.bool), to_gray).numpy()
    for i in range(4):
        np.testing.assert_allclose(out[i], reference(images[i], factors[i], order[i], hue[i], to_gray[i]), atol=2e-5)
