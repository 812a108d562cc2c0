"""Mixed precision that a run can rely on: the policy of a run, loss scaling whose step counter counts batches, and
float32 copies of what is saved.

`config.precision` is "float32" (default), "mixed_float16" (GPUs: float16 compute with dynamic loss scaling) or
"mixed_bfloat16" (TPUs, recent GPUs and CPUs with AVX512-BF16: no loss scaling needed). Under both mixed policies
the variables stay float32, and so does everything whose range or digits matter: the loss and C
(`bt_keras.method.losses` casts the embeddings up), the BatchNorm statistics
(`bt_keras.nets.batch_norm.BatchNormalization` computes them in float32) and LARS's norms and updates (they run in
the variables' dtype).

Why a LossScaleOptimizer of our own. Keras's dynamic loss scaling skips a step whose scaled gradients overflowed
(the first ~10 steps of a run, while the scale comes down from 2^15) and does not advance `optimizer.iterations`
then. The trainer counts its steps, epochs, schedule, resume point and "this run is finished" in
`optimizer.iterations`, so a skipped step silently made every run longer than its schedule and each rerun of a
finished run trained again. Here a skipped step still counts as a step (the batch was consumed, as PyTorch's
GradScaler with a per-batch scheduler does), the learning-rate schedule moves on with it, and `skipped_steps`
counts the steps whose update was dropped. Keras also decides "finite" from replica 0's own gradients, before
they are summed; here every replica decides from all replicas' gradients (one all-reduce of a scalar), so replicas
never disagree on whether to apply the step.
"""

from __future__ import annotations

import contextlib

import keras

from bt_keras.distribute import global_sum

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")  # what config.precision may be (bt_keras.train.preflight)
# Below this loss scale even unscaled gradients overflow float16: every step is skipped and nothing trains, so the
# trainer stops the run (as it does for a non-finite loss) instead of "finishing" it.
MIN_LOSS_SCALE = 1.0


def mixed_policy_for(strategy) -> str:
    """The mixed policy `--mixed_precision` means on this strategy's devices: bfloat16 on TPUs, float16 elsewhere."""
    import tensorflow as tf

    return "mixed_bfloat16" if isinstance(strategy, tf.distribute.TPUStrategy) else "mixed_float16"


@contextlib.contextmanager
def policy_scope(name: str):
    """Sets Keras's global dtype policy to `name` (any Keras policy: a run's `config.precision`, checked by
    `preflight`, or float64 for exactness references) while building a model, then restores the previous one, so
    the layers built inside keep that precision and nothing else in the process changes."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@keras.saving.register_keras_serializable(package="bt_keras")
class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras's dynamic loss scaling, where a skipped step still counts (see the module docstring).

    `iterations` advances on every step, applied or skipped, so the schedule and the trainer count the batches the
    run consumed; `skipped_steps` counts the steps whose update was dropped because the scaled gradients were not
    finite on some replica; `dynamic_scale` is the current loss scale.
    """

    def build(self, var_list):
        super().build(var_list)
        with keras.name_scope(self.name, caller=self):
            self.skipped_steps = self.add_variable(shape=(), dtype="int", initializer=keras.initializers.Zeros(),
                                                   aggregation="none", name="skipped_steps")

    def check_finite(self, grads):
        """Whether the gradients of EVERY replica are finite (an all-reduce of one number under replicas)."""
        import tensorflow as tf

        non_finite = global_sum(tf.cast(tf.logical_not(super().check_finite(grads)), tf.float32))
        return tf.equal(non_finite, 0.0)

    def _stateful_handle_non_finite_grads(self):
        super()._stateful_handle_non_finite_grads()  # halve the scale, drop the update
        self.skipped_steps.assign_add(1)
        self.inner_optimizer.iterations.assign_add(1)  # the batch was consumed: the step and the schedule move on


def wrap_optimizer(optimizer, policy: str):
    """`optimizer` wrapped in bt_keras's `LossScaleOptimizer` under mixed_float16 (float16 gradients underflow
    without loss scaling), else unchanged; bfloat16 has float32's range and needs no scaling."""
    if policy == "mixed_float16" and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return LossScaleOptimizer(optimizer, name="loss_scale_optimizer")
    return optimizer


def optimizer_logs(optimizer) -> dict:
    """`loss_scale` and `skipped_steps` (as tensors) when `optimizer` scales the loss, else {}: what the trainer adds
    to each step's logs, and so to metrics.jsonl and the report."""
    import tensorflow as tf

    if not isinstance(optimizer, LossScaleOptimizer):
        return {}
    return {"loss_scale": tf.cast(optimizer.dynamic_scale, tf.float32),
            "skipped_steps": tf.cast(optimizer.skipped_steps, tf.float32)}


def float32_copy(model: keras.Model) -> keras.Model:
    """`model` itself when every layer computes in float32, else a float32 copy with the same weights: what is saved
    of a mixed-precision run (encoders load and run in float32 everywhere; ONNX export needs it too)."""
    if all(layer.dtype_policy.name == "float32" for layer in model._flatten_layers(include_self=False)):
        return model

    def as_float32(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    try:
        copy = keras.models.clone_model(model, clone_function=as_float32, recursive=True)
    except (TypeError, ValueError):  # a nested model whose layers cannot be rebuilt from their own configs (KerasHub
        # 0.32's ViTPatchingAndEmbedding): rebuild each nested model whole, from its constructor arguments
        copy = keras.models.clone_model(model, clone_function=as_float32, recursive=False)
    copy.set_weights(model.get_weights())
    return copy
