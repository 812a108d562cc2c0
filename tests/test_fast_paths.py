"""The fast paths are the plain formulation, faster: held equal in float64, and all turned off by one switch."""

import numpy as np
import pytest
import tensorflow as tf

from bt_keras import fast_paths
from bt_keras.method import losses
from bt_keras.method.optim import LARS
from bt_keras.nets import backbones, heads


@pytest.fixture
def fast_off():
    fast_paths.set_enabled(False)
    yield
    fast_paths.set_enabled(None)


def _loss_and_gradients(fn, z1, z2):
    with tf.GradientTape() as tape:
        tape.watch([z1, z2])
        terms = fn(z1, z2, 0.0051)
    return terms, tape.gradient(terms["loss"], [z1, z2])


@pytest.mark.parametrize("batch, dim", [(6, 32), (40, 16)])  # B <= D (Gram form) and B > D (C form)
def test_fast_loss_equals_the_reference_formula_in_float64(batch, dim):
    rng = np.random.default_rng(batch)
    z1 = tf.constant(rng.normal(size=(batch, dim)) * 2 + 1)
    z2 = tf.constant(0.5 * z1.numpy() + rng.normal(size=(batch, dim)))
    fast, fast_grads = _loss_and_gradients(losses.barlow_twins_loss, z1, z2)
    plain, plain_grads = _loss_and_gradients(losses.reference_loss, z1, z2)
    for name in ("loss", "on_diagonal", "off_diagonal", "cross_correlation"):
        np.testing.assert_allclose(fast[name].numpy(), plain[name].numpy(), rtol=1e-12, atol=1e-13)
    for a, b in zip(fast_grads, plain_grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-13)


def test_the_switch_turns_every_fast_path_off(fast_off, monkeypatch):
    assert not fast_paths.enabled()
    calls = []
    monkeypatch.setattr(losses, "reference_loss", lambda *a: calls.append("reference") or {"loss": 0})
    losses.barlow_twins_loss(tf.ones([4, 3]), tf.ones([4, 3]))
    assert calls == ["reference"]
    bn = backbones.BatchNormalization()
    assert not bn._fusable(tf.ones([4, 2, 2, 3]), None)
    assert LARS(0.1)._native_update(tf.Variable(tf.ones([3, 3]))) is None
    projector = heads.projector("8-8")
    projector.build((None, 4))
    seen = []
    monkeypatch.setattr(type(projector), "__call__", lambda self, x, training=None: seen.append(x.shape[0]) or x)
    heads.project_views(projector, tf.ones([5, 4]), tf.ones([5, 4]))
    assert seen == [5, 5]  # each view on its own, not the two stacked


def test_the_environment_variable_and_its_override(monkeypatch):
    monkeypatch.setenv(fast_paths.ENV, "0")
    assert not fast_paths.enabled()
    fast_paths.set_enabled(True)
    try:
        assert fast_paths.enabled()
    finally:
        fast_paths.set_enabled(None)
    monkeypatch.setenv(fast_paths.ENV, "1")
    assert fast_paths.enabled()
    with pytest.raises(ValueError, match="True, False or None"):
        fast_paths.set_enabled("no")


# A whole training step, fast paths on (1 device and 2 / 4 replicas) against all of them off, in float64 to 1e-10:
# tests/train/test_step.py.
