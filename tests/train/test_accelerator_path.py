"""The accelerator path as a tested tier: whole training steps as GPUs and TPUs run them, exact on every host.

Where variables live on a GPU or TPU, bt_keras's native CPU kernels step aside (bt_keras.kernels) and LARS and the
synchronised BatchNorm run as TensorFlow ops; with `--xla` each replica's step is one XLA computation
(bt_keras.train.step). Here the kernels are turned off in-process (`kernels.set_enabled(False)`, as `BT_KERAS_NATIVE=0`),
so that path runs on this CPU too: two whole training steps (forward, loss, gradients, LARS update, BatchNorm moving
statistics) on 1 device with XLA and at 2 replicas without, and with XLA at 2 and 4 replicas where XLA compiles them
(GPUs), must equal one device without XLA in float64 to 1e-10 (loss before and after, first-step gradients, final
weights). `pytest -m accelerator` selects this tier on a GPU host. (Uncompiled, 4 replicas run the code 2 do: the
TensorFlow-ops BatchNorm at 4 replicas is tests/nets/test_batch_norm.py's, the whole step's tests/train/test_step.py's.)

XLA with several replicas compiles only where TensorFlow lets XLA take the all-reduces (GPUs, TPUs): on CPU devices
those cases skip with the measured reason (bt_keras.train.step.xla_obstacle).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from bt_keras import kernels
from bt_keras.method import precision
from bt_keras.method.optim import LARS
from bt_keras.train import step as step_lib
from tests.helpers import (assert_same_training, cpu_strategy, run_cli, tiny_config, tiny_model, train_command,
                           train_lines, view_pair)

pytestmark = pytest.mark.accelerator

GLOBAL_BATCH = 8


@pytest.fixture(scope="module", autouse=True)
def native_kernels_off():
    kernels.set_enabled(False)
    yield
    kernels.set_enabled(None)


def _train(replicas: int, initial, batches, jit_compile: bool):
    """(losses before and after two steps, first-step gradients, final weights, the step's traced op types)."""
    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    if jit_compile and 1 < replicas <= len(gpus):  # XLA compiles the replicas' step with its all-reduces on GPUs
        strategy = tf.distribute.MirroredStrategy(gpus[:replicas])
    else:
        strategy = cpu_strategy(replicas)
    if jit_compile and step_lib.xla_obstacle(strategy):
        pytest.skip(f"XLA cannot compile a replica step here: {step_lib.xla_obstacle(strategy)}")
    with strategy.scope(), precision.policy_scope("float32"):
        keras.config.set_dtype_policy("float64")
        model = tiny_model()
        model.set_weights(initial)
        model.compile(optimizer=LARS(0.5, momentum=0.9, eta=0.02, weight_decay=1e-3))
        model.optimizer.build(model.trainable_variables)
    train_step = step_lib.compiled(model.train_step, strategy, jit_compile)
    gradient_step = step_lib.compiled(lambda batch: model.compute_gradients(*batch), strategy, jit_compile)
    assert step_lib.is_compiled(train_step) == jit_compile

    @tf.function
    def gradients(batch):
        grads, terms = strategy.run(gradient_step, args=(batch,))
        loss = strategy.experimental_local_results(terms["loss"])[0]  # the same global loss on every replica
        return [strategy.reduce("SUM", g, axis=None) for g in grads], loss

    @tf.function
    def train(batch):
        return strategy.run(train_step, args=(batch,))

    def distributed(batch):
        return next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch))))

    grads, first_loss = gradients(distributed(batches[0]))
    graph = train.get_concrete_function(distributed(batches[0])).graph
    types = {op.type for op in graph.get_operations()}
    assert (step_lib.xla_calls(graph) > 0) == jit_compile  # what the traced step really runs
    for batch in batches:
        train(distributed(batch))
    _, second_loss = gradients(distributed(batches[1]))  # the loss at the weights after the two steps
    return [float(first_loss), float(second_loss)], [g.numpy() for g in grads], model.get_weights(), types


@pytest.fixture(scope="module")
def reference():
    """One device, XLA off, TensorFlow ops: what every other case must equal."""
    initial = [w.astype("float64") for w in tiny_model().get_weights()]
    batches = [tuple(v.astype("float64") for v in view_pair(GLOBAL_BATCH, seed=s)) for s in (0, 1)]
    return initial, batches, _train(1, initial, batches, jit_compile=False)


@pytest.mark.slow
def test_the_reference_runs_tensorflow_ops_only(reference):
    *_, (_, _, _, types) = reference
    assert not any(t.startswith("BtKeras") for t in types), "a native kernel ran with the kernels turned off"
    assert "ResourceApplyMomentum" in types  # LARS's TensorFlow-ops update


@pytest.mark.slow
@pytest.mark.parametrize("replicas, jit_compile", [(1, True), (2, False), (2, True), (4, True)])
def test_whole_steps_equal_one_device_in_float64(reference, replicas, jit_compile):
    initial, batches, (loss_1, grads_1, weights_1, _) = reference
    loss_n, grads_n, weights_n, types = _train(replicas, initial, batches, jit_compile)
    assert not any(t.startswith("BtKeras") for t in types)
    assert_same_training(f"{replicas} replica(s), xla={jit_compile}", initial, (loss_1, grads_1, weights_1),
                         (loss_n, grads_n, weights_n))


def test_the_compiled_step_is_one_xla_computation_with_the_convolutions():
    """XLA's own HLO of the replica step holds the forward and backward convolutions and the LARS update, and no
    native kernel (they cannot be compiled)."""
    model = tiny_model()
    model.compile(optimizer=LARS(0.5, eta=0.02))
    model.optimizer.build(model.trainable_variables)
    train_step = step_lib.compiled(model.train_step, tf.distribute.get_strategy(), True)
    batch = tuple(tf.constant(v) for v in view_pair(GLOBAL_BATCH))
    hlo = train_step.experimental_get_compiler_ir(batch)(stage="hlo")
    convolutions = hlo.count(" convolution(")
    # 3 convolutions in the tiny ResNet, each view forward (2 x 3) and backward (data + filter: 2 x 2 x 3, the stem's
    # data gradient excepted): at least 12.
    assert convolutions >= 12, convolutions
    assert "BtKeras" not in hlo
    assert step_lib.check_compiles(train_step, tf.nest.map_structure(tf.TensorSpec.from_tensor, batch)) is None


def test_xla_under_replicas_on_cpu_devices_runs_uncompiled_and_says_why(caplog):
    strategy = cpu_strategy(2)
    if step_lib.xla_obstacle(strategy) is None:
        pytest.skip("the replicas are GPUs here: XLA compiles their step")
    from absl import logging as absl_logging

    with caplog.at_level("WARNING", logger=absl_logging.get_absl_logger().name):
        function = step_lib.compiled(lambda batch: batch, strategy, True)
    assert not step_lib.is_compiled(function)
    assert "runs uncompiled" in caplog.text and "CPU devices" in caplog.text


@pytest.mark.slow
def test_the_xla_command_compiles_the_step_and_trains_as_the_uncompiled_loop(tmp_path):
    """`python -m bt_keras.train --xla`: XLA's dump holds the training step with its convolutions, and the run's
    per-step losses are those of the same config trained uncompiled (float32: to round-off)."""

    dump = tmp_path / "xla_dump"
    result = run_cli(train_command(tmp_path / "xla", "--xla", "--config.log_every_steps=1", epochs=1, steps=3),
                     env={"XLA_FLAGS": f"--xla_dump_to={dump}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "runs uncompiled" not in result.stderr
    steps = [p for p in dump.glob("*train_step*before_optimizations.txt")]
    assert steps, sorted(p.name for p in dump.iterdir())[:20]
    assert max(p.read_text().count(" convolution(") for p in steps) >= 12  # forward and backward, both views

    from bt_keras.train.trainer import Trainer

    kernels.set_enabled(None)  # the uncompiled loop as users run it on CPU: native kernels on
    try:
        plain = Trainer(tiny_config(epochs=1, steps_per_epoch=3, log_every_steps=1), tmp_path / "plain",
                        tf.distribute.get_strategy())
        plain.run()
    finally:
        kernels.set_enabled(False)
    compiled, uncompiled = train_lines(tmp_path / "xla"), train_lines(tmp_path / "plain")
    assert [line["step"] for line in compiled] == [line["step"] for line in uncompiled] == [1, 2, 3, 3]
    np.testing.assert_allclose([line["loss"] for line in compiled], [line["loss"] for line in uncompiled], rtol=1e-4)


@pytest.mark.slow  # two trainer runs
def test_xla_with_the_augmentation_on_the_device(tmp_path):
    """augment_on="accelerator": `Trainer` wires config.augment_on through to the pipeline (uint8 crops + draws) and
    the model (a DeviceAugment); the device-side augmentation runs before the compiled step (its blur of a random
    subset of the batch cannot be compiled), the rest is compiled, and training gives the uncompiled run's losses."""
    from bt_keras.augment import device as device_augment
    from bt_keras.train.trainer import Trainer

    losses = {}
    for xla in (False, True):
        config = tiny_config(augment_on="accelerator", epochs=1, steps_per_epoch=2, jit_compile=xla)
        trainer = Trainer(config, tmp_path / f"xla_{xla}", tf.distribute.get_strategy())
        assert isinstance(trainer.model.device_augment, device_augment.DeviceAugment)
        assert set(trainer.dataset.element_spec) == device_augment.HOST_KEYS
        graph = trainer._step_fn.get_concrete_function(trainer.iterator).graph
        assert trainer.xla_compiled == xla and (step_lib.xla_calls(graph) > 0) == xla  # the loop's own step
        losses[xla] = trainer.run()["loss"]
        assert trainer.step == 2 and np.isfinite(losses[xla])
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
