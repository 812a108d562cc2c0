"""A whole training step with the fast paths, on one device and under 2 and 4 replicas, equals the PLAIN formulation
(every fast path off, bt_keras.fast_paths.set_enabled(False), one device) in float64.

The fast paths: the loss's hand-written gradient and Gram form (bt_keras.method.loss_forms; B <= D on one device, the
all-gather Gram form under replicas, B < D), the stacked projector, synchronised BatchNorm with one all-reduce each way
(bt_keras.nets.batch_norm), LARS's native kernel on each replica's copy of the variables, and one all-reduce per
gradient (not one over all of them concatenated). Two steps of `train_step` as `fit` runs them (strategy.run in a
tf.function; the second uses the momentum buffers the first wrote), from identical weights and data: the loss before
and after, first-step gradients and final weights (BatchNorm moving statistics included) must agree to 1e-10
(measured: ~1e-16 to 1e-15). LARS sizes a kernel's update from ||w|| (its trust ratio), so a gradient-scale bug
shows only in the 1-D parameters, which these checks include one by one.
4 replicas are the suite's one whole-step case at a replica count other than 2 (a count written as 2 somewhere would
pass at 2); the other whole-step files (test_distributed, test_accelerator_path, test_probe) run 2 replicas.
The traced step must contain the ops those paths are made of (and the plain one none of them), and no D x D
collective. (The fused BatchNorm kernel is float32-only: tests/nets/test_batch_norm.py holds it to Keras's layer.)
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from benchmarks import collectives
from bt_keras import fast_paths
from bt_keras.method import loss_forms
from bt_keras.method.optim import LARS
from tests.helpers import (assert_same_training, cpu_strategy, loss_step_collectives, needs_native_kernels, tiny_model,
                           view_pair)

pytestmark = needs_native_kernels  # the step under test is made of the native kernels

GLOBAL_BATCH = 8
DIM = 32  # tiny_model's projector "32-32": B = 8 < D = 32, so the Gram form is chosen


def _train(replicas, initial, batches):
    """Two steps under `replicas` with the fast paths as set now (LARS native=None: the kernel where they are on)."""
    strategy = cpu_strategy(replicas) if replicas > 1 else tf.distribute.get_strategy()
    keras.config.set_dtype_policy("float64")
    try:
        with strategy.scope():
            model = tiny_model()
            model.set_weights(initial)
            model.compile(optimizer=LARS(0.5, momentum=0.9, eta=0.02, weight_decay=1e-3))
            model.optimizer.build(model.trainable_variables)
    finally:
        keras.config.set_dtype_policy("float32")
    first = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batches[0]))
    v1, v2 = next(iter(first))

    @tf.function
    def gradients(v1, v2):
        grads, terms = strategy.run(model.compute_gradients, args=(v1, v2))
        loss = strategy.experimental_local_results(terms["loss"])[0]  # the same global loss on every replica
        return [strategy.reduce("SUM", g, axis=None) for g in grads], loss

    grads, first_loss = gradients(v1, v2)
    grads = [g.numpy() for g in grads]
    # The step as `fit` runs it (strategy.run of train_step in a tf.function), traced once: its graph is both the
    # one whose ops are checked and the one that trains.
    train = tf.function(lambda v1, v2: strategy.run(model.train_step, args=((v1, v2),)))
    graph = train.get_concrete_function(v1, v2).graph
    second = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batches[1]))
    second_v1, second_v2 = next(iter(second))
    train(v1, v2)
    train(second_v1, second_v2)
    assert int(model.optimizer.iterations.numpy()) == 2
    _, second_loss = gradients(second_v1, second_v2)  # the loss at the weights after the two steps
    losses = [float(first_loss), float(second_loss)]  # float64 (Keras's loss metric is float32)
    sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    return losses, grads, model.get_weights(), graph, sizes


FAST_OPS = ("BtKerasLarsUpdate", "BtKerasChannelMoments", "BtKerasChannelAffine2", "FusedBatchNormV3")


@pytest.fixture(scope="module")
def plain():
    """The reference: every fast path off, one device (Keras's BatchNorm ops, LARS as TensorFlow ops, the paper's
    loss autodiffed, each view through the projector on its own)."""
    loss_forms.set_form(None)
    initial = [w.astype("float64") for w in tiny_model().get_weights()]
    batches = [tuple(v.astype("float64") for v in view_pair(GLOBAL_BATCH, seed=s)) for s in (0, 1)]
    fast_paths.set_enabled(False)
    try:
        losses, grads, weights, graph, _ = _train(1, initial, batches)
    finally:
        fast_paths.set_enabled(None)
    types = {op.type for op in graph.get_operations()}
    assert not types & set(FAST_OPS), types & set(FAST_OPS)  # the switch did turn them off
    return initial, batches, (losses, grads, weights)


@pytest.mark.slow
def test_two_steps_with_the_fast_paths_on_one_device_equal_the_plain_formulation(plain):
    initial, batches, reference = plain
    fast_paths.set_enabled(True)
    try:
        losses, grads, weights, graph, sizes = _train(1, initial, batches)
    finally:
        fast_paths.set_enabled(None)
    assert_same_training("fast paths, 1 device", initial, reference, (losses, grads, weights))
    assert [op.type for op in graph.get_operations()].count("BtKerasLarsUpdate") == len(sizes)  # native LARS ran


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4: ~20 s
def test_two_steps_under_replicas_equal_the_plain_formulation_to_1e_10(plain, replicas):
    initial, batches, reference = plain
    fast_paths.set_enabled(True)
    try:
        loss_n, grads_n, weights_n, graph, sizes = _train(replicas, initial, batches)
    finally:
        fast_paths.set_enabled(None)
    num_variables = len(sizes)
    assert_same_training(f"fast paths, {replicas} replicas", initial, reference, (loss_n, grads_n, weights_n))

    # The step is made of the fast paths: Gram form, one-pass BatchNorm kernels, native LARS on every replica.
    types = [op.type for op in graph.get_operations()]
    gathers = [op for op in collectives.collective_ops(graph) if op.kind == "all_gather" and op.replica == 0]
    assert sorted(op.shape for op in gathers) == sorted([(1, 2)] * 2 + [(GLOBAL_BATCH // replicas, DIM)] * 2)
    assert types.count("BtKerasLarsUpdate") == replicas * num_variables
    assert types.count("BtKerasChannelMoments") > 0 and types.count("BtKerasChannelAffine2") > 0
    assert "FusedBatchNormV3" not in types  # statistics are global: the local-statistics kernel must not run
    # LARS all-reduces each gradient on its own: no collective over all the gradients concatenated.
    reduced = sorted(op.elements for op in collectives.collective_ops(graph) if op.kind == "all_reduce"
                     and op.replica == 0)
    assert sum(sizes) not in reduced
    for size in set(sizes):
        assert reduced.count(size) >= sizes.count(size)


def test_the_loss_sends_no_d_by_d_tensor_under_replicas():
    """The only collectives as large as D x D would be C's: there is none (the kernels' gradients are 32 x 32 too,
    so the loss is traced on its own here)."""

    ops = loss_step_collectives(cpu_strategy(2), GLOBAL_BATCH, DIM)
    assert {op.type for op in ops} == {"CollectiveReduceV2", "CollectiveGatherV2"}
    assert max(op.elements for op in ops) < DIM * DIM
