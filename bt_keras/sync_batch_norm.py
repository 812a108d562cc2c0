"""BatchNorm in training mode with statistics over the global batch: one all-reduce each way, passes as the fused kernel.

Under R replicas a synchronised BatchNorm needs each channel's mean and variance over all replicas' examples, and its
backward pass needs two per-channel sums over all of them. Keras's `synchronized=True` layer all-reduces the sum, the
sum of squares and a count (formed by summing a tensor of ones) separately, and autodiff adds an all-reduce for the
backward pass of each; in all about ten passes over the activations and six collectives per layer. Here:

  forward:   local [sum(x - k), sum((x - k)^2), count] (k: the moving mean, so the sums stay small), ONE all-reduce of
             that stacked vector (2C + 1 numbers), mean and biased variance from it, y = (x - mean) * gamma / s + beta
             with s = sqrt(var + eps);
  backward:  local [sum dy, sum dy * (x - mean)], ONE all-reduce (2C numbers), then
             dx = gamma / s * (dy - sum dy / N - xhat * sum(dy * xhat) / N),   xhat = (x - mean) / s,
             and this replica's dgamma = sum dy * xhat, dbeta = sum dy over its own examples.

The sums and the two elementwise maps run as native CPU kernels (`bt_keras.kernels`, batch_norm_sums.cc: each reads
its inputs once; sums accumulated, all-reduced and combined in float64, so the variance keeps its digits even when a
channel's mean is far from the moving mean), so a layer makes the fused kernel's passes: forward one read for the
sums and a read and write for y, backward two reads for the sums and two reads and a write for dx. On GPU/TPU, under
XLA, or without the kernels, the same maths runs as TensorFlow ops.

Replica convention (`bt_keras.model.BarlowTwins`): the upstream dy each replica receives is the true gradient of
the global loss with respect to its outputs (the loss's collectives route it), so dx above, with sums over the global
batch, is the true gradient with respect to its inputs, and the per-replica dgamma/dbeta summed by the optimizer are
exact. tests/test_sync_batch_norm.py holds all of it to Keras's layer and to one device, in float64.
"""

from __future__ import annotations

import tensorflow as tf

from bt_keras import kernels
from bt_keras.distribute import global_sum


def _axes(x):
    return list(range(x.shape.rank - 1))


class _TensorFlowOps:
    """The four per-channel primitives as TensorFlow ops (any device, XLA-compatible)."""

    name = "tensorflow-ops"

    @staticmethod
    def moments(x, shift):
        # Local mean first, then sum((x - m)^2): exact in the maths, free of the cancellation of sum(x^2) - ...
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), x.dtype)
        local_mean = tf.reduce_mean(x, axis=_axes(x))
        m2 = tf.reduce_sum(tf.math.squared_difference(x, local_mean), axis=_axes(x))
        d = local_mean - shift
        return tf.stack([count * d, m2 + count * tf.square(d)])

    @staticmethod
    def grad_sums(dy, x, mean):
        return tf.stack([tf.reduce_sum(dy, axis=_axes(x)), tf.reduce_sum(dy * (x - mean), axis=_axes(x))])

    @staticmethod
    def affine(x, shift, scale, offset):
        return (x - shift) * scale + offset

    @staticmethod
    def affine2(a, a_scale, b, b_shift, b_scale, offset):
        return a * a_scale + (b - b_shift) * b_scale + offset


class _NativeOps:
    """The same primitives as the native CPU kernels (one pass over memory each)."""

    name = "native"

    def __init__(self, module):
        self._ops = module

    def moments(self, x, shift):
        return self._ops.bt_keras_channel_moments(x=x, shift=shift)

    def grad_sums(self, dy, x, mean):
        return self._ops.bt_keras_channel_grad_sums(dy=dy, x=x, mean=mean)

    def affine(self, x, shift, scale, offset):
        return self._ops.bt_keras_channel_affine(x=x, shift=shift, scale=scale, offset=offset)

    def affine2(self, a, a_scale, b, b_shift, b_scale, offset):
        return self._ops.bt_keras_channel_affine2(a=a, a_scale=a_scale, b=b, b_shift=b_shift, b_scale=b_scale,
                                                  offset=offset)


def primitives(x, native: bool | None = None):
    """The implementation used for `x`: native kernels when `native` is None (automatic) or True and they can run
    (a CPU tensor, not under XLA, kernels built), else TensorFlow ops. `native=True` raises if they cannot."""
    if native is False:
        return _TensorFlowOps()
    reason = kernels.unusable_reason(x.device)
    module = None
    if reason is None:
        module = kernels.batch_norm_ops()
        reason = None if module is not None else kernels.batch_norm_unavailable_reason()
    if module is not None:
        return _NativeOps(module)
    if native:
        raise RuntimeError(f"sync_batch_norm(native=True) cannot use the native kernels: {reason}.")
    return _TensorFlowOps()


def normalize(x, gamma, beta, shift, epsilon: float, native: bool | None = None):
    """Training-mode BatchNorm of `x` ([..., C], channels last) over the global batch, with its exact gradient.

    Args:
      x: float32 or float64 activations (this replica's share of the batch inside a replica context).
      gamma, beta: `[C]` scale and offset (tensors; their gradients are this replica's shares).
      shift: `[C]` values near the channel means (the moving mean), subtracted before summing so that
        sum((x - k)^2) keeps its digits; any value gives the same maths. No gradient.
      epsilon: added to the variance.
      native: as `primitives`.

    Returns:
      (y, mean, variance): the normalised output and the global batch mean and biased variance (without gradient;
      for the moving averages), all in x's dtype.
    """
    ops = primitives(x, native)
    channels = x.shape[-1]
    shift = tf.stop_gradient(tf.cast(shift, x.dtype))

    @tf.custom_gradient
    def forward(x, gamma, beta):
        local = ops.moments(x, shift)  # [2, C], in the implementation's statistics dtype
        stats = local.dtype  # float64 from the native kernels (the combination below keeps its digits), else x's
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), stats)
        sums = global_sum(tf.concat([tf.reshape(local, [-1]), [count]], axis=0))  # the forward all-reduce
        total = sums[-1]
        centred_mean = sums[:channels] / total  # mean - shift
        mean = tf.cast(shift, stats) + centred_mean
        variance = tf.maximum(sums[channels:2 * channels] / total - tf.square(centred_mean), 0.0)
        inv_std = tf.math.rsqrt(variance + tf.constant(epsilon, stats))  # not tf.cast: that rounds via float32
        gamma_s = tf.cast(gamma, stats)
        mean_x = tf.cast(mean, x.dtype)
        y = ops.affine(x, mean_x, tf.cast(gamma_s * inv_std, x.dtype), beta)

        def grad(dy, _d_mean, _d_variance):  # mean and variance leave without gradient (see below)
            dy = tf.cast(dy, x.dtype)
            local_sums = ops.grad_sums(dy, x, mean_x)  # [2, C]: sum dy, sum dy * (x - mean), this replica's
            global_sums = tf.reshape(global_sum(tf.reshape(local_sums, [-1])), [2, channels])  # the backward one
            d_beta = local_sums[0]
            d_gamma = local_sums[1] * tf.cast(inv_std, local_sums.dtype)
            scale = gamma_s * inv_std
            global_sums = tf.cast(global_sums, stats)
            q = -scale * tf.square(inv_std) * global_sums[1] / total
            r = -scale * global_sums[0] / total
            dx = ops.affine2(dy, tf.cast(scale, x.dtype), x, mean_x, tf.cast(q, x.dtype), tf.cast(r, x.dtype))
            return dx, tf.cast(d_gamma, x.dtype), tf.cast(d_beta, x.dtype)

        return (y, tf.cast(mean, x.dtype), tf.cast(variance, x.dtype)), grad

    y, mean, variance = forward(x, tf.cast(gamma, x.dtype), tf.cast(beta, x.dtype))
    return y, tf.stop_gradient(mean), tf.stop_gradient(variance)
