"""The loss against an independent NumPy float64 implementation of the paper's formula, plus edge cases."""

import numpy as np
import pytest
import tensorflow as tf

from bt_keras.method.losses import barlow_twins_loss, cross_correlation, embedding_std
from tests.helpers import numpy_loss


@pytest.mark.parametrize("batch", [2, 7, 64])
@pytest.mark.parametrize("width", [3, 128])
def test_loss_matches_float64_reference(batch, width):
    rng = np.random.default_rng(batch * 1000 + width)
    z1 = rng.normal(size=(batch, width)) * rng.uniform(0.5, 3, size=width) + rng.normal(size=width)
    z2 = 0.7 * z1 + rng.normal(size=(batch, width))
    c_ref, on_ref, off_ref, loss_ref = numpy_loss(z1, z2, 0.0051)
    terms = barlow_twins_loss(tf.constant(z1, tf.float32), tf.constant(z2, tf.float32), lambd=0.0051)
    np.testing.assert_allclose(terms["cross_correlation"].numpy(), c_ref, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(terms["on_diagonal"].numpy(), on_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(terms["off_diagonal"].numpy(), off_ref, rtol=1e-5)
    np.testing.assert_allclose(terms["loss"].numpy(), loss_ref, rtol=1e-5)


def test_matched_decorrelated_views_give_zero_loss():
    # Columns of a Hadamard matrix (minus the constant one): zero mean, unit variance, mutually orthogonal.
    h = np.array([[1.0]])
    for _ in range(4):
        h = np.block([[h, h], [h, -h]])
    z = tf.constant(h[:, 1:9], tf.float32)  # 16 x 8
    terms = barlow_twins_loss(z, z)
    np.testing.assert_allclose(terms["cross_correlation"].numpy(), np.eye(8), atol=2e-5)
    assert terms["loss"].numpy() < 1e-8


def test_collapsed_embedding_is_finite_and_large():
    z = tf.ones([16, 32])
    terms = barlow_twins_loss(z, z)
    assert np.isfinite(terms["loss"].numpy())
    assert terms["loss"].numpy() == pytest.approx(32.0)  # C = 0: every diagonal term is (1 - 0)^2.
    assert embedding_std(z).numpy() == pytest.approx(0.0, abs=1e-6)


def test_loss_is_float32_under_mixed_precision_inputs():
    z = tf.random.normal([8, 4], dtype=tf.float16)
    assert barlow_twins_loss(z, z)["loss"].dtype == tf.float32


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    z1 = tf.Variable(rng.normal(size=(6, 3)))
    z2 = tf.constant(rng.normal(size=(6, 3)))
    with tf.GradientTape() as tape:
        loss = barlow_twins_loss(tf.cast(z1, tf.float32), tf.cast(z2, tf.float32))["loss"]
    grad = tape.gradient(loss, z1).numpy()
    h = 1e-5
    for index in [(0, 0), (3, 2), (5, 1)]:
        delta = np.zeros((6, 3))
        delta[index] = h
        up = numpy_loss(z1.numpy() + delta, z2.numpy(), 0.0051)[3]
        down = numpy_loss(z1.numpy() - delta, z2.numpy(), 0.0051)[3]
        assert grad[index] == pytest.approx((up - down) / (2 * h), rel=1e-3, abs=1e-4)


def _autodiff_reference_terms(z1, z2, lambd, eps=1e-5):
    """The formula written plainly in TensorFlow (one device), differentiated by autodiff."""
    n = tf.cast(tf.shape(z1)[0], z1.dtype)
    z1n = (z1 - tf.reduce_mean(z1, 0)) / tf.sqrt(tf.math.reduce_variance(z1, 0) + eps)
    z2n = (z2 - tf.reduce_mean(z2, 0)) / tf.sqrt(tf.math.reduce_variance(z2, 0) + eps)
    c = tf.matmul(z1n, z2n, transpose_a=True) / n
    on = tf.reduce_sum(tf.square(1.0 - tf.linalg.diag_part(c)))
    off = tf.reduce_sum(tf.square(c)) - tf.reduce_sum(tf.square(tf.linalg.diag_part(c)))
    return {"loss": on + lambd * off, "on_diagonal": on, "off_diagonal": off}


# (6, 3): batch > width, the backward pass reads C; (5, 16): batch <= width, the Gram-matrix backward pass.
@pytest.mark.parametrize("shape", [(6, 3), (5, 16)])
@pytest.mark.parametrize("term", ["loss", "on_diagonal", "off_diagonal"])
def test_hand_written_gradient_equals_autodiff_of_the_formula(shape, term):
    rng = np.random.default_rng(shape[1])
    z1 = tf.constant(rng.normal(size=shape) * 2.0 + 1.0)
    z2 = tf.constant(0.5 * z1.numpy() + rng.normal(size=shape))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([z1, z2])
        ours = barlow_twins_loss(z1, z2, lambd=0.03)[term]
        reference = _autodiff_reference_terms(z1, z2, 0.03)[term]
    np.testing.assert_allclose(float(ours), float(reference), rtol=1e-12)
    for z in (z1, z2):
        np.testing.assert_allclose(
            tape.gradient(ours, z).numpy(), tape.gradient(reference, z).numpy(), rtol=1e-9, atol=1e-12
        )


@pytest.mark.parametrize(
    "z1, z2, message",
    [
        (tf.zeros([4, 3]), tf.zeros([4, 5]), "differ in shape"),
        (tf.zeros([1, 3]), tf.zeros([1, 3]), "at least 2"),
        (tf.zeros([4, 3], tf.int32), tf.zeros([4, 3], tf.int32), "floating point"),
        (tf.zeros([4, 3, 2]), tf.zeros([4, 3, 2]), "batch, dim"),
    ],
)
def test_bad_inputs_raise_clear_errors(z1, z2, message):
    with pytest.raises(ValueError, match=message):
        cross_correlation(z1, z2)
