"""Synchronised BatchNorm (bt_keras.nets.batch_norm) against NumPy, Keras's own synchronized layer and one device.

float64 separates the maths from round-off: outputs, input gradients, gamma/beta gradients (summed over replicas, as
the optimizer does) and the moving statistics must agree to 1e-10. Both implementations (native CPU kernels and
TensorFlow ops) are checked, and the layer must use one all-reduce per direction. On one replica the layer runs
TensorFlow's fused kernel, held equal to `keras.layers.BatchNormalization` (a fast path of issue 7).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from benchmarks import collectives
from bt_keras.nets import backbones, batch_norm as sync_batch_norm
from tests.helpers import cpu_strategy, needs_native_kernels


def numpy_batch_norm(x, gamma, beta, upstream, eps):
    """Training-mode BatchNorm over all rows of x ([..., C]) and its gradients, in float64, written out."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    dy = np.asarray(upstream, np.float64).reshape(x.shape)
    n = x.shape[0]
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    xhat = (x - mean) / np.sqrt(var + eps)
    y = gamma * xhat + beta
    d_gamma = (dy * xhat).sum(0)
    d_beta = dy.sum(0)
    dx = gamma / np.sqrt(var + eps) / n * (n * dy - d_beta - xhat * d_gamma)
    return y, dx, d_gamma, d_beta, mean, var


def _data(shape, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    x = rng.normal(size=shape) * rng.uniform(0.5, 2.0, size=channels) + rng.normal(size=channels) + offset
    upstream = rng.normal(size=shape)
    gamma = rng.uniform(0.5, 1.5, size=channels)
    beta = rng.normal(size=channels)
    return x, upstream, gamma, beta


def _run_normalize(strategy, x, upstream, gamma, beta, shift, native, eps=1e-5):
    """sync_batch_norm.normalize under `strategy`, with loss sum(y * upstream): y, dx (batch order), dgamma, dbeta
    summed over replicas, mean, variance."""

    def replica_fn(xs, us):
        g = tf.constant(gamma, xs.dtype)
        b = tf.constant(beta, xs.dtype)
        with tf.GradientTape() as tape:
            tape.watch([xs, g, b])
            y, mean, variance = sync_batch_norm.normalize(xs, g, b, shift=tf.constant(shift, xs.dtype),
                                                          epsilon=eps, native=native)
            loss = tf.reduce_sum(y * us)
        dx, dg, db = tape.gradient(loss, [xs, g, b])
        return y, dx, dg, db, mean, variance

    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((x, upstream)))
    xs, us = next(iter(dataset))
    out = tf.function(lambda a, b: strategy.run(replica_fn, args=(a, b)))(xs, us)
    local = [[t.numpy() for t in strategy.experimental_local_results(v)] for v in out]
    return (np.concatenate(local[0]), np.concatenate(local[1]), sum(local[2]), sum(local[3]), local[4][0],
            local[5][0])


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native_kernels), False],
                         ids=["native-kernels", "tensorflow-ops"])
@pytest.mark.parametrize("replicas", [1, 2, 4])
@pytest.mark.parametrize("shape", [(8, 3, 3, 5), (8, 6)], ids=["rank4", "rank2"])
def test_normalize_equals_numpy_in_float64(native, replicas, shape):
    x, upstream, gamma, beta = _data(shape, seed=replicas)
    shift = np.full(shape[-1], 0.3)  # any shift: the same maths
    strategy = tf.distribute.get_strategy() if replicas == 1 else cpu_strategy(replicas)
    got = _run_normalize(strategy, x, upstream, gamma, beta, shift, native)
    want = numpy_batch_norm(x, gamma, beta, upstream, 1e-5)
    for name, g, w in zip(("y", "dx", "dgamma", "dbeta", "mean", "variance"), got, want):
        np.testing.assert_allclose(g.reshape(w.shape), w, rtol=0, atol=1e-10, err_msg=name)


@needs_native_kernels
def test_normalize_in_float32_keeps_its_digits_when_the_mean_is_far_from_the_shift():
    x, upstream, gamma, beta = _data((16, 4, 4, 8), seed=3, offset=20.0)  # |mean| ~ 20 std, shift 0
    want = numpy_batch_norm(x, gamma, beta, upstream, 1e-5)
    got = _run_normalize(cpu_strategy(2), x.astype(np.float32), upstream.astype(np.float32), gamma, beta,
                         np.zeros(8), native=True)
    for name, g, w in zip(("y", "dx", "dgamma", "dbeta", "mean", "variance"), got, want):
        np.testing.assert_allclose(g.reshape(w.shape), w, rtol=2e-5, atol=2e-5 * np.abs(w).max(), err_msg=name)


def test_native_true_says_why_it_cannot_run():
    with pytest.raises(RuntimeError, match="XLA"):
        tf.function(lambda x: sync_batch_norm.normalize(x, tf.ones([3]), tf.zeros([3]), tf.zeros([3]), 1e-5,
                                                        native=True)[0], jit_compile=True)(tf.ones([4, 3]))


def _layer_step(strategy, layer_class, x, upstream, momentum=0.9):
    """One training call of a fresh synchronized BN layer under `strategy`: y, dx, dgamma, dbeta (summed), moving
    mean and variance after the call."""
    with strategy.scope():
        layer = layer_class(momentum=momentum, epsilon=1e-5, synchronized=True, dtype="float64")
        layer.build(x.shape)
        rng = np.random.default_rng(7)  # non-trivial parameters and moving statistics
        layer.gamma.assign(rng.uniform(0.5, 1.5, size=x.shape[-1]))
        layer.beta.assign(rng.normal(size=x.shape[-1]))
        layer.moving_mean.assign(rng.normal(size=x.shape[-1]))
        layer.moving_variance.assign(rng.uniform(0.5, 2, size=x.shape[-1]))

    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((x, upstream)))
    xs, us = next(iter(dataset))

    @tf.function
    def step(xs, us):
        def fn(a, b):
            with tf.GradientTape() as tape:
                tape.watch(a)
                y = layer(a, training=True)
                loss = tf.reduce_sum(y * b)
            dx, dg, db = tape.gradient(loss, [a, layer.gamma, layer.beta])
            return y, dx, dg, db
        return strategy.run(fn, args=(xs, us))

    out = step(xs, us)
    local = [[t.numpy() for t in strategy.experimental_local_results(v)] for v in out]
    return (np.concatenate(local[0]), np.concatenate(local[1]), sum(local[2]), sum(local[3]),
            layer.moving_mean.numpy(), layer.moving_variance.numpy(), step.get_concrete_function(xs, us).graph)


@needs_native_kernels
@pytest.mark.parametrize("replicas", [2, 4])
@pytest.mark.parametrize("shape", [(8, 3, 3, 5), (8, 6)], ids=["rank4", "rank2"])
def test_layer_equals_keras_synchronized_layer_and_one_device_in_float64(replicas, shape):
    x, upstream, _, _ = _data(shape, seed=10 + replicas)
    ours = _layer_step(cpu_strategy(replicas), backbones.BatchNormalization, x, upstream)
    keras_layer = _layer_step(cpu_strategy(replicas), keras.layers.BatchNormalization, x, upstream)
    one_device = _layer_step(tf.distribute.get_strategy(), keras.layers.BatchNormalization, x, upstream)
    for name, a, b, c in zip(("y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"), ours, keras_layer,
                             one_device):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10, err_msg=f"{name} vs Keras, {replicas} replicas")
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-10, err_msg=f"{name} vs one device")
    # One all-reduce each way per layer (Keras's layer: sum, sum of squares and count forward, and their gradients).
    ours_ops = [op for op in collectives.collective_ops(ours[-1]) if op.replica == 0]
    keras_ops = [op for op in collectives.collective_ops(keras_layer[-1]) if op.replica == 0]
    assert [op.elements for op in ours_ops] == [2 * shape[-1] + 1, 2 * shape[-1]]
    assert len(keras_ops) >= 5
    types = {op.type for op in ours[-1].get_operations()}
    assert "BtKerasChannelMoments" in types and "BtKerasChannelAffine2" in types  # the native kernels ran


@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 3, 6)])
def test_fused_batchnorm_equals_the_keras_layer(shape):
    rng = np.random.default_rng(len(shape))
    x = tf.constant(rng.normal(size=shape) * 3.0 + 1.5, tf.float32)
    upstream = tf.constant(rng.normal(size=shape), tf.float32)
    layers = [
        cls(momentum=0.9, epsilon=1e-5, synchronized=True, gamma_initializer="random_normal")
        for cls in (backbones.BatchNormalization, keras.layers.BatchNormalization)
    ]
    layers[0].build(shape)
    layers[1].build(shape)
    layers[1].set_weights(layers[0].get_weights())
    results = []
    for layer in layers:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            objective = tf.reduce_sum(y * upstream)
        grads = tape.gradient(objective, [x, layer.gamma, layer.beta])
        results.append([y.numpy()] + [g.numpy() for g in grads] + [w.numpy() for w in layer.non_trainable_weights])
    for ours, reference in zip(*results):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)
    # Inference mode uses the moving statistics: the same in both.
    np.testing.assert_allclose(layers[0](x, training=False), layers[1](x, training=False), rtol=1e-5, atol=1e-5)
