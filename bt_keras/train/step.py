"""The training step as the trainer (and `benchmarks/accelerator.py`) runs it: `BarlowTwins.train_step` on every
replica, compiled with XLA when asked and possible.

What `--xla` compiles: the replica's whole step (both forward passes, the loss, the gradients and the optimizer
update) as one XLA computation, the way `model.fit` does after
`compile(jit_compile=True)`: `strategy.run` of a `tf.function(jit_compile=True)`. The batch is read from the
iterator outside it (iterators cannot be compiled). The replicas' all-reduces are compiled with the step where
TensorFlow lets XLA take them: on GPUs (MirroredStrategy turns off `merge_call` under XLA there, and XLA lowers the
sums to NCCL) and on TPUs (TPUStrategy compiles every step with XLA anyway).

What is not compiled, said once in the log:
* the native CPU kernels (`bt_keras.kernels`: LARS, synchronised BatchNorm) step aside inside a compiled step, and
  TensorFlow ops that XLA fuses run instead (same results);
* several replicas on CPU devices: TensorFlow cannot run an XLA-compiled replica function there (measured with
  TensorFlow 2.21: the replicas' sums need `merge_call`, which a nested compiled function cannot make, and a step
  compiled across the replicas is placed on CPU:0 and cannot read the other devices' variables), so the step runs
  uncompiled;
* the device-side augmentation (augment_on="accelerator"): it runs before the compiled step (its blur of a random
  subset of the batch has a data-dependent shape);
* a step XLA cannot compile on one device (an op without an XLA kernel): the compiler's reason is logged and the
  step runs uncompiled.
"""

from __future__ import annotations

import tensorflow as tf
from absl import logging


def _devices(strategy) -> list[str]:
    extended = strategy.extended
    return list(getattr(extended, "worker_devices", None) or [])


def xla_obstacle(strategy) -> str | None:
    """Why XLA cannot compile the replica step under `strategy`, or None when it can."""
    if strategy.num_replicas_in_sync == 1 or isinstance(strategy, tf.distribute.TPUStrategy):
        return None
    devices = _devices(strategy)
    if devices and all("GPU" in d.upper() for d in devices):
        return None
    return (f"{strategy.num_replicas_in_sync} replicas on CPU devices: TensorFlow compiles a replica step with its "
            "all-reduces for GPUs and TPUs only")


def compiled(function, strategy, jit_compile: bool):
    """`function` (a replica's step) as `strategy.run` should call it: a `tf.function(jit_compile=True)` when XLA is
    asked for and possible, else `function` itself, with the reason logged once."""
    if not jit_compile or isinstance(strategy, tf.distribute.TPUStrategy):
        return function  # (on TPUs strategy.run compiles the whole step with XLA anyway)
    obstacle = xla_obstacle(strategy)
    if obstacle is not None:
        logging.warning("XLA: the training step runs uncompiled (%s).", obstacle)
        return function
    logging.info("XLA: the training step is compiled (forward, loss, gradients and update); bt_keras's native CPU "
                 "kernels step aside inside it (XLA fuses TensorFlow ops itself).")
    return tf.function(function, jit_compile=True, reduce_retracing=True, autograph=False)  # as the Trainer's step


STATE_FINITE = "state_finite"  # the key `replica_step(check_state=True)` adds to the step's outputs


def state_variables(model) -> list:
    """The floating-point variables a training step updates and a checkpoint saves with the model: the trainable
    weights and the non-trainable statistics (BatchNorm's moving means and variances); not the seed generators'
    integer states."""
    return [v for v in model.trainable_variables + model.non_trainable_variables
            if tf.as_dtype(v.dtype).is_floating]


def all_finite(variables) -> tf.Tensor:
    """A scalar bool: every element of every variable is finite. One `is_finite` + `reduce_all` per variable and
    one over their results; under XLA they fuse with the step. (Not a sum of `x * 0`, which TensorFlow's constant
    folding may rewrite to 0, losing the NaN; not a sum of squares, which overflows for large finite weights.)"""
    checks = [tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v))) for v in variables]
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def with_state_check(train_step, variables):
    """`train_step` whose outputs also hold `STATE_FINITE`: whether `variables` are all finite after its update.

    Why after the update: the loss a step returns was computed before its update, so a check of the outputs alone
    misses the step whose update poisons the weights, and a checkpoint written right after it (the end of an epoch
    or of the run, a callback stopping the run) would hold NaNs while every logged loss was finite."""
    def checked(data):
        outputs = dict(train_step(data))
        outputs[STATE_FINITE] = all_finite(variables)
        return outputs

    # Named after the step it checks: XLA's dumps and `xla_calls` find the compiled step by that name.
    checked.__name__ = checked.__qualname__ = f"{getattr(train_step, '__name__', 'train_step')}_checked"
    return checked


def replica_step(model, strategy, jit_compile: bool, element_spec=None, check_state: bool = False):
    """`model.train_step` as the trainer's `strategy.run` calls it, compiled by XLA when asked and possible (see
    `compiled`). On one device, given the batches' `element_spec`, XLA compiles it first (without running it) and,
    if it cannot, the reason is logged and the step runs uncompiled. The device-side augmentation
    (augment_on="accelerator") runs before the compiled step, uncompiled: its blur of a random subset of the batch
    has a data-dependent shape, which XLA cannot compile.

    `check_state`: the outputs also hold `STATE_FINITE` (`with_state_check`), computed on each replica's own copy of
    the variables inside the (compiled) step, so it costs no host round trip and no copy of the weights."""
    train_step, train_step_on_views = model.train_step, getattr(model, "train_step_on_views", None)
    if check_state:
        variables = state_variables(model)
        train_step = with_state_check(train_step, variables)
        if train_step_on_views is not None:
            train_step_on_views = with_state_check(train_step_on_views, variables)
    if getattr(model, "device_augment", None) is None:
        step = compiled(train_step, strategy, jit_compile)
        if is_compiled(step) and element_spec is not None and strategy.num_replicas_in_sync == 1:
            reason = check_compiles(step, element_spec)
            if reason is not None:
                logging.warning("XLA: the training step runs uncompiled: XLA cannot compile it (%s).", reason)
                return train_step
        return step
    train = compiled(train_step_on_views, strategy, jit_compile)
    if not is_compiled(train):
        return train_step
    logging.info("XLA: the device-side augmentation runs before the compiled step, uncompiled (its blur of a random "
                 "subset of the batch has a data-dependent shape).")

    def augmented_then_compiled(batch):
        return train(model.augment_on_device(batch))

    augmented_then_compiled.compiled = train
    return augmented_then_compiled


def check_compiles(step, element_spec) -> str | None:
    """Compiles `step` (a `tf.function(jit_compile=True)`) for batches of `element_spec` without running it;
    returns XLA's reason when it cannot, else None."""
    if any(dim is None for spec in tf.nest.flatten(element_spec) for dim in spec.shape):
        return None  # an unknown batch size: XLA compiles at the first step (and says there what it cannot)
    batch = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), element_spec)
    try:
        step.experimental_get_compiler_ir(batch)(stage="hlo")
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, ValueError, TypeError) as error:
        return " ".join(str(error).split())[:300]
    return None


def is_compiled(step) -> bool:
    """Whether `step` (as returned by `compiled`) is an XLA-compiled function."""
    step = getattr(step, "compiled", step)  # replica_step's augmentation wrapper: its compiled part
    return isinstance(step, tf.types.experimental.PolymorphicFunction) and bool(
        getattr(step, "_jit_compile", False))


def xla_calls(graph, name: str = "train_step") -> int:
    """How many calls in `graph` (a traced step) run a function named like `name` that XLA must compile
    (`_XlaMustCompile`): what a step really runs compiled, whatever was asked for. (The host-side colour steps of
    `bt_keras.augment` are small compiled functions of their own; `name` tells them apart.)"""
    count = 0
    for op in graph.get_operations():
        try:
            must_compile, function = op.get_attr("_XlaMustCompile"), op.get_attr("f").name
        except ValueError:  # not a call of a compiled function
            continue
        count += bool(must_compile) and name in function
    return count
