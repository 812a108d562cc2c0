"""The BatchNorm every network here uses: `BatchNormalization`, a Keras layer whose training step runs TensorFlow's
fused kernel on one replica and `normalize` (below) across replicas.

Synchronised BatchNorm in training mode, statistics over the global batch: one all-reduce each way, passes as the fused
kernel.

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

Replica convention (`bt_keras.method.model.BarlowTwins`): the upstream dy each replica receives is the true gradient of
the global loss with respect to its outputs (the loss's collectives route it), so dx above, with sums over the global
batch, is the true gradient with respect to its inputs, and the per-replica dgamma/dbeta summed by the optimizer are
exact. tests/nets/test_batch_norm.py holds all of it to Keras's layer and to one device, in float64.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from bt_keras import fast_paths, kernels
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


# ------------------------------------------------------------------------------------- the layer


def _values_per_channel(inputs) -> int | None:
    """How many values each channel's batch statistics average over (static shapes), or None if unknown."""
    count = 1
    for dim in inputs.shape[:-1]:
        if dim is None:
            return None
        count *= int(dim)
    return count


@keras.saving.register_keras_serializable(package="bt_keras")
class BatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` whose training step runs TensorFlow's fused kernel when that is exact.

    Same maths, variables, config and moving-statistics update (biased batch variance, as Keras) as the Keras layer.
    Keras 3 computes training-mode BatchNorm from separate ops (and, with `synchronized=True`, from sums of x and
    x^2 plus a tensor of ones), about ten passes over each activation forward and backward; the fused kernel
    (oneDNN on CPU, cuDNN on GPU) makes two each way. It is used when the batch statistics are those of the local
    batch anyway: one replica in sync (or `synchronized=False`), float32/float16/bfloat16, the channel axis last,
    rank 2 or 4, no mask, no renorm. With several replicas and synchronized statistics, `normalize` (above)
    runs instead (one all-reduce each way, as many passes as the fused kernel; float64 too). Otherwise (a mask,
    renorm, another axis, or `BT_KERAS_FAST=0`) the Keras computation runs unchanged.
    """

    def _synchronizable(self, inputs, mask) -> bool:
        """True when the global-batch statistics of several replicas can run as `normalize`."""
        if not (self.synchronized and fast_paths.enabled()) or mask is not None or self.renorm:
            return False
        if keras.backend.backend() != "tensorflow":
            return False
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return False
        rank = inputs.shape.rank
        if rank is None or rank < 2 or self.axis not in (-1, rank - 1):
            return False
        return inputs.dtype in (tf.float16, tf.bfloat16, tf.float32, tf.float64)

    def _synchronized_call(self, inputs):
        dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32  # Keras's compute dtype for the statistics
        x = tf.cast(inputs, dtype)
        channels = x.shape[-1]
        gamma = tf.cast(self.gamma, dtype) if self.scale else tf.ones([channels], dtype)
        beta = tf.cast(self.beta, dtype) if self.center else tf.zeros([channels], dtype)
        moving_mean = tf.cast(self.moving_mean, dtype)
        y, mean, variance = normalize(x, gamma, beta, shift=moving_mean, epsilon=self.epsilon)
        momentum = self.momentum  # as Keras: moving = moving * momentum + batch * (1 - momentum)
        self.moving_mean.assign(moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(tf.cast(self.moving_variance, dtype) * momentum + variance * (1.0 - momentum))
        return tf.cast(y, self.compute_dtype)

    def _fusable(self, inputs, mask) -> bool:
        if not fast_paths.enabled() or mask is not None or self.renorm or keras.backend.backend() != "tensorflow":
            return False
        rank = inputs.shape.rank
        if rank not in (2, 4) or self.axis not in (-1, rank - 1):
            return False
        if inputs.dtype not in (tf.float32, tf.float16, tf.bfloat16):
            return False
        context = tf.distribute.get_replica_context()
        if self.synchronized and context is not None and context.num_replicas_in_sync > 1:
            return False
        count = _values_per_channel(inputs)
        return count is not None and count > 1  # the unbiased -> biased variance conversion below needs n > 1

    def call(self, inputs, training=None, mask=None):
        if training and self.trainable and self._synchronizable(inputs, mask):
            return self._synchronized_call(inputs)
        if not (training and self.trainable and self._fusable(inputs, mask)):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)  # statistics in float32, as the Keras layer
        channels = x.shape[-1]
        rank = x.shape.rank
        if rank == 2:
            x = tf.reshape(x, [-1, 1, 1, channels])
        count = _values_per_channel(inputs)
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
        empty = tf.zeros([0], tf.float32)
        y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=self.epsilon,
            exponential_avg_factor=1.0, data_format="NHWC", is_training=True,
        )
        # The kernel returns the unbiased (Bessel-corrected) variance; Keras's moving average uses the biased one.
        variance = variance * ((count - 1) / count)
        momentum = self.momentum
        self.moving_mean.assign(tf.cast(self.moving_mean, tf.float32) * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(
            tf.cast(self.moving_variance, tf.float32) * momentum + variance * (1.0 - momentum)
        )
        if rank == 2:
            y = tf.reshape(y, [-1, channels])
        return tf.cast(y, self.compute_dtype)


# ------------------------------------------------------------------ Keras's layer <-> this one, in a whole network


def _with_batch_norm(model: keras.Model, replace) -> keras.Model:
    """A clone of the functional (or Sequential) `model`, nested models included, in which every BatchNormalization
    layer (Keras's or this module's) is `replace(layer)`, every other layer rebuilt from its config; same weights."""

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return replace(layer)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def has_bt_keras_batch_norm(model: keras.Model) -> bool:
    """True when `model` holds at least one of this module's layers (the ones a plain Keras file cannot name)."""
    return any(isinstance(layer, BatchNormalization) for layer in model._flatten_layers(include_self=False))


def as_keras_batch_norm(model: keras.Model) -> keras.Model:
    """`model` with each of this module's layers replaced by `keras.layers.BatchNormalization` of the same config and
    weights (gamma, beta, moving mean and variance): what encoder files hold, so that `keras.saving.load_model` opens
    them without bt_keras, under any Keras 3 backend. Inference is the same maths (the fast paths above are training
    paths only); `synchronized` becomes False, which changes nothing at inference and which Keras refuses outside
    its TensorFlow backend. `model` itself when it holds none of this module's layers."""
    if not has_bt_keras_batch_norm(model):
        return model

    def keras_layer(layer):
        config = {**layer.get_config(), "synchronized": False}
        return keras.layers.BatchNormalization.from_config(config)

    return _with_batch_norm(model, keras_layer)


def as_bt_keras_batch_norm(model: keras.Model, synchronized: bool) -> keras.Model:
    """`model` (any functional Keras network, e.g. a `keras.applications` one) with each BatchNormalization replaced
    by this module's layer, same config and weights, `synchronized` as given.

    Why: Keras's own layer computes per-replica statistics under MirroredStrategy unless built with
    `synchronized=True`, and even then it runs about ten passes and six collectives per layer; with this layer and
    `synchronized=True` N replicas train exactly as one device on the same global batch, with the fused kernel on
    one replica. `model` itself when it holds no BatchNormalization."""
    if not any(isinstance(layer, keras.layers.BatchNormalization)
               for layer in model._flatten_layers(include_self=False)):
        return model

    def ours(layer):
        return BatchNormalization.from_config({**layer.get_config(), "synchronized": bool(synchronized)})

    return _with_batch_norm(model, ours)
