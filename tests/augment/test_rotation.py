"""The per-image rotation of a view (ViewConfig.rotation_prob / rotation_degrees, used by the digits quickstart):
its rate against the probability, angle 0 as the identity, and known rotations against NumPy / SciPy references."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from bt_keras import augment
from bt_keras.augment import ops
from bt_keras.views import ViewConfig
from tests.helpers import OFF, RAW, assert_rate


SIZE = 16


def pattern(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Random grey-level images [n, size, size, 3] in [0, 1]: no rotation maps one onto itself."""
    rng = np.random.default_rng(seed)
    return np.repeat(rng.uniform(size=(n, size, size, 1)).astype(np.float32), 3, axis=-1)


def view(**fields) -> ViewConfig:
    """Rotation only: no crop (full frame, square), no flip, colour or blur; raw [0, 1] output."""
    return ViewConfig(SIZE, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **{**OFF, **RAW, **fields})


@pytest.mark.parametrize("field, value", [("rotation_prob", 1.5), ("rotation_prob", -0.1),
                                          ("rotation_degrees", (-200.0, 0.0)), ("rotation_degrees", (10.0, 5.0))])
def test_view_config_rejects_bad_rotation(field, value):
    with pytest.raises(ValueError, match=field):
        view(**{field: value})


def test_angle_zero_is_the_identity():
    images = pattern(4)
    out = augment.rotate(tf.constant(images), tf.zeros([4])).numpy()
    np.testing.assert_array_equal(out, images)


def test_quarter_turn_equals_numpy_rot90():
    images = pattern(3)
    out = augment.rotate(tf.constant(images), tf.constant([90.0, -90.0, 180.0])).numpy()
    # np.rot90 with axes (0, 1) on [H, W, C] turns counter-clockwise as displayed (row 0 on top).
    expected = [np.rot90(images[0], 1), np.rot90(images[1], -1), np.rot90(images[2], 2)]
    np.testing.assert_allclose(out, np.stack(expected), atol=1e-5)


def test_thirty_degrees_equals_scipy_bilinear_inside_the_frame():
    image = pattern(1)[0, :, :, 0].astype(np.float64)
    out = augment.rotate(tf.constant(pattern(1)), tf.constant([30.0])).numpy()[0, :, :, 0]
    # scipy.ndimage.rotate turns counter-clockwise as displayed for positive angles, about the centre (n - 1) / 2.
    expected = ndimage.rotate(image, 30.0, reshape=False, order=1, mode="constant", cval=0.0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    inside = (yy - (SIZE - 1) / 2) ** 2 + (xx - (SIZE - 1) / 2) ** 2 < ((SIZE - 1) / 2 - 1.5) ** 2
    assert inside.sum() > 100
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-5)
    assert np.abs(out - image).max() > 0.3  # it did turn


def test_rotation_rate_and_angles_from_output():
    n, p = 1000, 0.3
    images = pattern(n)
    out = augment.augment_batch(tf.constant(images), view(rotation_prob=p, rotation_degrees=(10.0, 20.0)), 7).numpy()
    kept = np.abs(out - images).max(axis=(1, 2, 3)) < 1e-6
    assert_rate(~kept, n, p)
    angles = augment.rotation_angles(view(rotation_prob=1.0, rotation_degrees=(10.0, 20.0)), 20000,
                                     tf.constant([3, 4], tf.int64)).numpy()
    assert angles.min() >= 10.0 and angles.max() <= 20.0
    assert abs(angles.mean() - 15.0) < 0.05 and abs(angles.std() - 10 / np.sqrt(12)) < 0.05  # U[10, 20]


def test_rotation_off_draws_the_same_views_as_before(monkeypatch):
    """"Before": the views with the rotation stage removed from the pipeline (both the one-call `augment_batch` and
    the host stage `geometric_batch`). Rotation off (p = 0), or on with only angle 0, must give exactly those views;
    on with real angles, other views (so the comparison can fail)."""
    images = (pattern(8) * 255).astype(np.uint8)
    base = augment.cifar_views(SIZE)[0]
    seed = tf.constant([3, 0], tf.int64)

    def views(config):
        return augment.augment_batch(images, config, seed).numpy(), augment.geometric_batch(images, config, seed).numpy()

    off = views(dataclasses.replace(base, rotation_prob=0.0, rotation_degrees=(-45.0, 45.0)))
    angle_zero = views(dataclasses.replace(base, rotation_prob=1.0, rotation_degrees=(0.0, 0.0)))
    turned = views(dataclasses.replace(base, rotation_prob=1.0, rotation_degrees=(10.0, 45.0)))
    with monkeypatch.context() as m:
        m.setattr(ops, "rotate_batch", lambda images, config, seed: images)  # the pipeline without the stage
        before = views(dataclasses.replace(base, rotation_prob=1.0, rotation_degrees=(10.0, 45.0)))
    for got in (off, angle_zero):
        for a, b in zip(got, before):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(turned, before):  # every image turned by >= 10 degrees differs
        assert (np.abs(a.astype(np.float64) - b).max(axis=(1, 2, 3)) > 0).all()
