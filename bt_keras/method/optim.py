"""LARS and the warm-up + cosine learning-rate schedule, as the official Barlow Twins code uses them.

LARS (You et al., 2017) in the official code's form, for every variable `w` with gradient `g`:

    d  = g + weight_decay * w                              (weights only)
    d *= eta * ||w|| / ||d||   (1 when either norm is 0)   (weights only: the trust ratio)
    mu = momentum * mu + d
    w -= lr * mu

"Weights" are variables of rank >= 2 (kernels); 1-D variables (biases, BatchNorm gamma/beta) get neither weight decay
nor the trust ratio, and their own learning rate `lr * bias_lr_scale`: the official 0.2 / 0.0048 split is
`bias_lr_scale = 0.0048 / 0.2 = 0.024`.

Speed: on CPU the whole rule runs as one native op per variable (`bt_keras.kernels`, compiled on first use): two passes
over memory instead of TensorFlow's ~14, which halves LARS's time on the 8192 x 8192 projector kernels. Elsewhere (GPU,
TPU, XLA-compiled steps, or no C++ compiler) it runs as TensorFlow ops, with the same results.

Note that weight decay enters BEFORE the trust ratio, so a global scale s of the gradient changes the effective weight
decay (x 1/s) and the biases' step (x s). `BarlowTwins.train_step` hands LARS the true gradient of the global loss;
`reference_hyperparameters` converts hyperparameters published for the official code's 1/R gradient (R GPUs) into
the ones that take exactly the same step here.

solo-learn's form (`trust_ratio="solo_learn"`, its `solo/utils/lars.py`, from PyTorch Lightning Bolts), for weights
with ||w|| > 0 and ||g|| > 0 (otherwise d = g, without weight decay):

    r  = eta * ||w|| / (||g|| + weight_decay * ||w|| + epsilon)
    r  = min(r / lr, 1)                                    (clip_lr=True)
    d  = (g + weight_decay * w) * r
    mu = momentum * mu + d;  w -= lr * mu

and 1-D variables take d = g at the full learning rate (`bias_lr_scale=1`). This form runs as TensorFlow ops (the
native kernel implements the official form only); so does `clip_lr` with the official form.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from absl import logging

from bt_keras import fast_paths, kernels

TRUST_RATIOS = ("official", "solo_learn")


def _in_xla_compilation() -> bool:
    """True while tracing a function that XLA will compile (e.g. `model.compile(jit_compile=True)`)."""
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # private API moved: assume XLA is possible and use TensorFlow ops
        return True
    return control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph())


def _constant(value: float, dtype):
    """A Python hyperparameter as a scalar of the variable's dtype, rounded once: `ops.cast(0.02, "float64")` would
    round it to float32 first (0.019999999552965164). Identical to the cast for float32 variables."""
    import tensorflow as tf

    return tf.constant(value, dtype)


def _tf_variable(variable):
    """The `tf.Variable` (per-device component inside `tf.distribute` updates) behind a Keras variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable


@keras.saving.register_keras_serializable(package="bt_keras")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling, with the official Barlow Twins exclusions for 1-D variables.

    Args:
      learning_rate: float or `LearningRateSchedule` for weights (rank >= 2 variables).
      momentum: heavy-ball momentum (0.9 in the paper).
      eta: trust coefficient (0.001 in the paper; 0.02 in the CIFAR recipe).
      weight_decay: L2 coefficient added to the gradient before the trust ratio (1.5e-6 in the paper).
      bias_lr_scale: 1-D variables use `learning_rate * bias_lr_scale` (0.0048 / 0.2 = 0.024 officially).
      exclude_1d: exempt 1-D variables from weight decay and the trust ratio (True officially).
      trust_ratio: "official" (eta ||w|| / ||g + wd w||, 1 when a norm is 0; facebookresearch/barlowtwins main.py) or
        "solo_learn" (eta ||w|| / (||g|| + wd ||w|| + epsilon), no scaling and no weight decay when ||w|| or ||g|| is
        0; solo-learn's solo/utils/lars.py). See the module docstring.
      clip_lr: use min(ratio / lr, 1) instead of the ratio (solo-learn's `clip_lr`; lr is the weights' current
        learning rate; 1 when lr is 0). Not for the official code.
      epsilon: added to the denominator of the "solo_learn" trust ratio (1e-8 there).
      native: None (default) runs each update as the native CPU kernel where it applies (official form, CPU
        float32/float64 variables, not inside an XLA-compiled step, kernel available) and as TensorFlow ops
        elsewhere; True requires the kernel (an error says why it cannot be used); False always uses TensorFlow ops.
        Same results either way.
      name, **kwargs: as `keras.optimizers.Optimizer` (clipnorm, loss_scale_factor, ...). Keras's own decoupled
        `weight_decay` mechanism is not used.

    Example:
      >>> opt = LARS(WarmupCosine(0.2 * 2048 / 256, warmup_steps=10 * 625, total_steps=1000 * 625))
      >>> solo = LARS(0.3, eta=0.02, weight_decay=1e-4, bias_lr_scale=1.0, trust_ratio="solo_learn", clip_lr=True)
    """

    def __init__(
        self,
        learning_rate=0.2,
        momentum: float = 0.9,
        eta: float = 0.001,
        weight_decay: float = 1.5e-6,
        bias_lr_scale: float = 0.0048 / 0.2,
        exclude_1d: bool = True,
        native: bool | None = None,
        name: str = "lars",
        trust_ratio: str = "official",
        clip_lr: bool = False,
        epsilon: float = 1e-8,
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, weight_decay=None, **kwargs)
        for arg, value in (("momentum", momentum), ("eta", eta), ("weight_decay", weight_decay),
                           ("bias_lr_scale", bias_lr_scale)):
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"LARS: {arg} must be a finite number >= 0, got {value!r}.")
        if momentum >= 1:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}.")
        self.momentum = float(momentum)
        self.eta = float(eta)
        self.lars_weight_decay = float(weight_decay)
        self.bias_lr_scale = float(bias_lr_scale)
        self.exclude_1d = bool(exclude_1d)
        if native not in (None, True, False):
            raise ValueError(f"LARS: native must be None (automatic), True or False, got {native!r}.")
        if trust_ratio not in TRUST_RATIOS:
            raise ValueError(f"LARS: trust_ratio must be one of {TRUST_RATIOS}, got {trust_ratio!r}.")
        if not (isinstance(epsilon, (int, float)) and epsilon >= 0 and math.isfinite(epsilon)):
            raise ValueError(f"LARS: epsilon must be a finite number >= 0, got {epsilon!r}.")
        self.trust_ratio = trust_ratio
        self.clip_lr = bool(clip_lr)
        self.epsilon = float(epsilon)
        self.native = native
        if not self._official_form:
            if native:
                raise ValueError("LARS(native=True): the native kernel implements the official form only "
                                 f"(trust_ratio='official', clip_lr=False), got trust_ratio={trust_ratio!r}, "
                                 f"clip_lr={clip_lr}. Use native=None or False.")
            if native is None:
                logging.info("LARS(trust_ratio=%r, clip_lr=%s) runs as TensorFlow ops: the native kernel implements "
                             "the official form only.", trust_ratio, self.clip_lr)

    @property
    def _official_form(self) -> bool:
        return self.trust_ratio == "official" and not self.clip_lr

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def _is_excluded(self, variable) -> bool:
        return self.exclude_1d and len(variable.shape) <= 1

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """Keras's (TensorFlow backend): sums the replicas' gradients, then updates; in a graph the updates start only
        once every summed gradient exists.

        Both update paths write variables in place. Started as soon as its own gradient exists, the update of a
        weight W can run while the backward pass still reads W (dX = dY W^T beside dW = X^T dY), and then it must
        copy W first (TensorFlow's in-place ops and the native kernel alike): 256 MiB per projector kernel, in time
        and in peak memory. After the last gradient nothing reads the weights any more. The sums themselves are not
        held back: each gradient's all-reduce starts when it exists, overlapping the rest of the backward pass, and
        frees the replica's own gradient early (two replicas at `imagenet_small`: peak RSS 6.85 -> 6.36 GiB).
        """
        import tensorflow as tf

        if tf.executing_eagerly():
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        variables = [v.value if isinstance(v, keras.Variable) else v for v in trainable_variables]
        grads_and_vars = self._all_reduce_sum_gradients(list(zip(grads, variables)))
        computed = [g for g, _ in grads_and_vars if g is not None]
        with tf.control_dependencies(computed):
            grads_and_vars = [(None if g is None else tf.identity(g), v) for g, v in grads_and_vars]
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_tf_update_step, self._distribution_strategy, grads_and_vars, learning_rate)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        """Sums the replicas' gradients with one all-reduce per gradient (Keras's hook, TensorFlow backend).

        Keras all-reduces the list with tf.distribute's default `bytes_per_pack=0`, which concatenates EVERY gradient
        into one flat buffer, all-reduces it and splits it again: a copy of all the gradients per replica per step
        (700 MiB for ResNet-50 + the paper's projector: ~0.1 s of copying on CPU and 0.7 GiB more peak memory per
        replica), and no all-reduce can start before the last gradient exists. `bytes_per_pack=1` makes each gradient
        its own pack (a pack closes once it holds more than one byte), so nothing is copied and the all-reduce
        writes the sum into the gradient's own buffer (`ReductionToOneDevice`, what
        `bt_keras.distribute.mirrored` uses on CPU devices, sums each gradient on its own anyway). Same sums. With
        `BT_KERAS_FAST=0`, Keras's own path.
        """
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1 or not fast_paths.enabled():
            return super()._all_reduce_sum_gradients(grads_and_vars)
        pairs = list(grads_and_vars)
        present = [i for i, (g, _) in enumerate(pairs) if g is not None]
        if not present:
            return pairs
        options = tf.distribute.experimental.CommunicationOptions(bytes_per_pack=1)
        reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [pairs[i][0] for i in present], options=options)
        for i, g in zip(present, reduced):
            pairs[i] = (g, pairs[i][1])
        return pairs

    def _native_update(self, var):
        """The native kernel's op for this variable, or None to use TensorFlow ops (see `native`)."""
        if self.native is False or (self.native is None and not fast_paths.enabled()):
            return None
        op = kernels.lars_update()
        device = (var.device or "").upper()
        if op is None:
            reason = kernels.unavailable_reason()
        elif var.dtype.name not in ("float32", "float64"):
            reason = f"the variable is {var.dtype.name} (the kernel takes float32 and float64)"
        elif "GPU" in device or "TPU" in device:
            reason = f"the variable is on {var.device} (the kernel is for CPU)"
        elif _in_xla_compilation():
            reason = "the step is compiled with XLA (jit_compile=True), which fuses TensorFlow ops itself"
        else:
            return op
        if self.native:
            raise RuntimeError(f"LARS(native=True) cannot use the native kernel: {reason}. Use native=None or False.")
        return None

    def update_step(self, gradient, variable, learning_rate):
        """One LARS update of `variable` (called per variable, inside `tf.distribute` updates).

        Memory-bound for large kernels (the 8192 x 8192 projector), so it makes as few passes over the variable as
        it can. The native kernel does the whole rule in two passes (norms; then momentum and weight, in place). The
        TensorFlow-ops path: d = g + wd w, the two norms as `l2_loss` (one read each, nothing written), and the
        momentum and weight update as TensorFlow's fused, in-place `ResourceApplyMomentum` (accum = momentum * accum +
        grad; var -= lr * accum: exactly the official `mu = momentum * mu + d; w -= lr * mu`).
        """
        import tensorflow as tf

        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        update = ops.cast(gradient, dtype)
        var = _tf_variable(variable)
        momentum = _tf_variable(self.momentums[self._get_variable_index(variable)])
        excluded = self._is_excluded(variable)
        if not self._official_form:  # solo-learn's form or a clipped ratio: TensorFlow ops (see the docstring)
            if not excluded:
                update = self._scaled_direction(update, var.read_value(), lr)
            else:
                lr = lr * _constant(self.bias_lr_scale, dtype)
            tf.raw_ops.ResourceApplyMomentum(var=var.handle, accum=momentum.handle, lr=lr, grad=update,
                                             momentum=_constant(self.momentum, dtype), use_locking=False,
                                             use_nesterov=False)
            return
        if excluded:
            lr = lr * _constant(self.bias_lr_scale, dtype)
        native_update = self._native_update(var)
        if native_update is not None:
            native_update(var=var.handle, accum=momentum.handle, grad=update, lr=lr,
                          momentum=_constant(self.momentum, dtype), eta=_constant(self.eta, dtype),
                          weight_decay=_constant(self.lars_weight_decay, dtype), trust_ratio=not excluded)
            return
        if not excluded:
            weights = var.read_value()
            if self.lars_weight_decay:
                update = update + _constant(self.lars_weight_decay, dtype) * weights
            weight_norm = tf.sqrt(2.0 * tf.nn.l2_loss(weights))
            update_norm = tf.sqrt(2.0 * tf.nn.l2_loss(update))
            ratio = tf.where(
                tf.logical_and(weight_norm > 0, update_norm > 0),
                _constant(self.eta, dtype) * weight_norm / tf.maximum(update_norm, 1e-30),
                tf.ones_like(weight_norm),
            )
            update = update * ratio
        tf.raw_ops.ResourceApplyMomentum(
            var=var.handle,
            accum=momentum.handle,
            lr=lr,
            grad=update,
            momentum=_constant(self.momentum, dtype),
            use_locking=False,
            use_nesterov=False,
        )

    def _scaled_direction(self, gradient, weights, lr):
        """d of a weight for the non-official settings (`trust_ratio="solo_learn"` or `clip_lr`), TensorFlow ops."""
        import tensorflow as tf

        dtype = weights.dtype
        eta = _constant(self.eta, dtype)
        decay = _constant(self.lars_weight_decay, dtype)
        weight_norm = tf.sqrt(2.0 * tf.nn.l2_loss(weights))
        if self.trust_ratio == "solo_learn":  # solo/utils/lars.py: the norm of g alone; wd * ||w|| added to it
            grad_norm = tf.sqrt(2.0 * tf.nn.l2_loss(gradient))
            ratio = eta * weight_norm / (grad_norm + decay * weight_norm + _constant(self.epsilon, dtype))
            scaled = tf.logical_and(weight_norm > 0, grad_norm > 0)  # else d = g: no decay, no ratio
            unscaled_decay = tf.zeros_like(decay)
        else:  # the official ratio (eta ||w|| / ||g + wd w||), with clip_lr
            update_norm = tf.sqrt(2.0 * tf.nn.l2_loss(gradient + decay * weights))
            ratio = eta * weight_norm / tf.maximum(update_norm, 1e-30)
            scaled = tf.logical_and(weight_norm > 0, update_norm > 0)  # else ratio 1, decay kept
            unscaled_decay = decay
        if self.clip_lr:  # min(ratio / lr, 1); lr = 0 makes no step, and ratio / 0 would be inf (or nan)
            ratio = tf.where(lr > 0, tf.minimum(ratio / tf.where(lr > 0, lr, tf.ones_like(lr)), 1.0),
                             tf.ones_like(ratio))
        gradient_scale = tf.where(scaled, ratio, tf.ones_like(ratio))
        weight_scale = tf.where(scaled, ratio * decay, unscaled_decay)
        return gradient * gradient_scale + weights * weight_scale

    def get_config(self):
        config = super().get_config()
        config.update(
            momentum=self.momentum,
            eta=self.eta,
            weight_decay=self.lars_weight_decay,
            bias_lr_scale=self.bias_lr_scale,
            exclude_1d=self.exclude_1d,
            native=self.native,
            trust_ratio=self.trust_ratio,
            clip_lr=self.clip_lr,
            epsilon=self.epsilon,
        )
        return config


def reference_hyperparameters(weight_decay: float, bias_lr: float, replicas: int) -> tuple[float, float]:
    """(weight decay, bias/BN learning rate) that make our true-gradient LARS step equal the official R-GPU step.

    The official code (facebookresearch/barlowtwins main.py) all-reduces C without a gradient and lets DDP average
    the replicas' gradients, so each update sees g / R, where g is the true gradient of the global loss. Its LARS
    step with (weight_decay, bias_lr) and g / R is exactly ours with (R * weight_decay, bias_lr / R) and g:

    * weights: d = g / R + wd w = (g + R wd w) / R, and the trust ratio eta ||w|| / ||d|| times d depends only on
      d's direction: eta ||w|| d / ||d||, the same for both. The momentum buffers are then equal too.
    * 1-D variables (no decay, no ratio): lr_b * (g / R) = (lr_b / R) * g; our momentum buffer is R times the
      official one and our learning rate 1/R of it, so every later step is equal as well.

    Exact except where the official rule sets the ratio to 1 (a weight with ||w|| = 0, which no initialiser gives):
    there the official step is g / R. The learning rate of the weights is unchanged. Only the official form
    (`trust_ratio="official"`, no `clip_lr`) converts: with solo-learn's `||g|| + wd ||w|| + eps` denominator and the
    clipping at 1 the two runs cannot be made equal by hyperparameters.

    Example:
      >>> reference_hyperparameters(1.5e-6, 0.0048, 16)   # the released model: batch 2048 on 16 V100s
      (2.4e-05, 0.0003)
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"reference_replicas must be an int >= 1 (the GPUs of the published run), got {replicas!r}.")
    return weight_decay * replicas, bias_lr / replicas


@keras.saving.register_keras_serializable(package="bt_keras")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from `warmup_start_lr` (0) to `base_lr` over `warmup_steps`, then cosine decay to
    `base_lr * end_scale`.

    As the official code's `adjust_learning_rate`, evaluated per step:
      step < warmup:  warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
      after:          base_lr * (end_scale + (1 - end_scale) * 0.5 * (1 + cos(pi * t))),
                      t = (step - warmup_steps) / (total_steps - warmup_steps), clipped to [0, 1].
    With `inclusive_warmup=True` the warm-up divides by `warmup_steps - 1`, so its last step is already at base_lr:
    solo-learn's `LinearWarmupCosineAnnealingLR` (solo/utils/lr_scheduler.py; warm-up from 3e-5, `end_scale=0`).

    Args:
      base_lr: peak learning rate (the paper: 0.2 * batch_size / 256 for weights).
      warmup_steps: length of the linear warm-up (10 epochs' steps in the paper).
      total_steps: total training steps; the schedule stays at the floor afterwards.
      end_scale: the floor as a fraction of base_lr (0.001 officially, 0 in solo-learn).
      warmup_start_lr: the learning rate of step 0 (0 officially, 3e-5 in solo-learn).
      inclusive_warmup: reach base_lr at step warmup_steps - 1 (solo-learn) instead of warmup_steps (official).
    """

    def __init__(self, base_lr: float, warmup_steps: int, total_steps: int, end_scale: float = 0.001,
                 warmup_start_lr: float = 0.0, inclusive_warmup: bool = False):
        if base_lr < 0:
            raise ValueError(f"WarmupCosine: base_lr must be >= 0, got {base_lr}.")
        if not 0 <= warmup_steps <= total_steps or total_steps <= 0:
            raise ValueError(
                f"WarmupCosine: need 0 <= warmup_steps <= total_steps and total_steps > 0, "
                f"got warmup_steps={warmup_steps}, total_steps={total_steps}."
            )
        if not 0 <= end_scale <= 1:
            raise ValueError(f"WarmupCosine: end_scale must be in [0, 1], got {end_scale}.")
        if not (0 <= warmup_start_lr and math.isfinite(warmup_start_lr)):
            raise ValueError(f"WarmupCosine: warmup_start_lr must be a finite number >= 0, got {warmup_start_lr}.")
        self.base_lr = float(base_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.end_scale = float(end_scale)
        self.warmup_start_lr = float(warmup_start_lr)
        self.inclusive_warmup = bool(inclusive_warmup)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = float(max(self.warmup_steps - 1 if self.inclusive_warmup else self.warmup_steps, 1))
        if self.warmup_start_lr:
            warm = self.warmup_start_lr + (self.base_lr - self.warmup_start_lr) * step / warmup
        else:  # the official schedule, computed exactly as before
            warm = self.base_lr * step / warmup
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        t = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = self.base_lr * (self.end_scale + (1.0 - self.end_scale) * 0.5 * (1.0 + ops.cos(math.pi * t)))
        return ops.where(step < self.warmup_steps, warm, cosine)

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "end_scale": self.end_scale,
            "warmup_start_lr": self.warmup_start_lr,
            "inclusive_warmup": self.inclusive_warmup,
        }
