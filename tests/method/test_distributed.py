"""N replicas with global batch B must train exactly as one device on the same B examples.

Runs MirroredStrategy over 2 logical CPU devices (see conftest.py) against the default single-device strategy,
with both kinds of cross-device sums (collective ops, what GPUs and multi-worker training use, and
ReductionToOneDevice, what `bt_keras.distribute.mirrored` picks on CPUs), from identical initial weights and data:
the loss, every gradient, and the weights after one `model.fit` step with LARS (BatchNorm moving statistics included)
must agree to 1e-11 in float64 and to round-off in float32.
"""


import numpy as np
import pytest
import tensorflow as tf

import keras

from bt_keras.method.optim import LARS
from tests.helpers import cpu_strategy, tiny_model, view_pair

GLOBAL_BATCH = 8


def _one_step(replicas, initial_weights, views, dtype="float32", cross_device_ops="collective"):
    """Returns (loss, gradients, weights after one fit step) computed under `replicas` replicas."""
    strategy = cpu_strategy(replicas, cross_device_ops)
    keras.config.set_dtype_policy(dtype)
    try:
        with strategy.scope():
            model = tiny_model()
            model.set_weights(initial_weights)
    finally:
        keras.config.set_dtype_policy("float32")
    views = tuple(v.astype(dtype) for v in views)
    with strategy.scope():
        model.compile(optimizer=LARS(0.5, momentum=0.9, eta=0.02, weight_decay=1e-3))

    @tf.function
    def gradients(v1, v2):
        grads, terms = strategy.run(model.compute_gradients, args=(v1, v2))
        summed = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads]
        return summed, strategy.reduce(tf.distribute.ReduceOp.MEAN, terms["loss"], axis=None)

    dataset = tf.data.Dataset.from_tensors(views)
    v1, v2 = next(iter(strategy.experimental_distribute_dataset(dataset)))
    grads, loss = gradients(v1, v2)
    history = model.fit(dataset, epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    return float(loss), [g.numpy() for g in grads], model.get_weights()


_SINGLE = {}


def _single_device(dtype):
    if dtype not in _SINGLE:
        initial = tiny_model().get_weights()
        views = view_pair(GLOBAL_BATCH)
        _SINGLE[dtype] = initial, views, _one_step(1, [w.astype(dtype) for w in initial], views, dtype)
    return _SINGLE[dtype]


# float64 separates the maths from round-off: any error in the replica scaling or a per-replica statistic would
# show as an O(1) difference. float32 (what users train in) agrees to round-off relative to the gradients' size.
# Each case is its own path: collective all-reduces (GPUs, multi-worker) and ReductionToOneDevice (what
# bt_keras.distribute.mirrored picks on CPUs) in float64, and float32's round-off. 4 replicas run the same code as 2;
# the whole step at 4 replicas is tests/train/test_step.py's (fast paths against the plain formulation, 1e-10).
@pytest.mark.slow
@pytest.mark.parametrize("replicas, dtype, cross_device_ops", [
    (2, "float64", "collective"), (2, "float64", "one_device"), (2, "float32", "collective")])
def test_mirrored_equals_single_device(replicas, dtype, cross_device_ops):
    initial, views, (loss_1, grads_1, weights_1) = _single_device(dtype)
    loss_n, grads_n, weights_n = _one_step(replicas, [w.astype(dtype) for w in initial], views, dtype,
                                           cross_device_ops)
    grad_diff = max(float(np.abs(a - b).max()) for a, b in zip(grads_1, grads_n))
    weight_diff = max(float(np.abs(a - b).max()) for a, b in zip(weights_1, weights_n))
    grad_scale = max(float(np.abs(g).max()) for g in grads_1)
    print(f"replicas={replicas} {dtype} {cross_device_ops}: |dloss|={abs(loss_n - loss_1):.2e} max|dgrad|={grad_diff:.2e} "
          f"(max|grad|={grad_scale:.1f}) max|dweight|={weight_diff:.2e}")
    # float64: measured 1e-15 (loss), 2e-13 (gradients), 1e-15 (weights); the bounds leave room for summation order
    # only, so a scaling bug of even 1e-10 relative fails. float32: round-off relative to the gradients' size.
    exact = dtype == "float64"
    assert abs(loss_n - loss_1) <= (1e-12 if exact else 1e-5) * max(1.0, abs(loss_1))
    assert grad_diff <= (1e-11 if exact else 1e-5) * max(1.0, grad_scale)
    assert weight_diff <= (1e-12 if exact else 1e-5)
    # The step must have moved the weights, or equality would prove nothing.
    assert max(float(np.abs(a - b).max()) for a, b in zip(initial, weights_1)) > 1e-3


@pytest.mark.slow
def test_gradient_without_replica_scaling_would_be_wrong():
    """Sanity check that the test can fail: a per-replica mean-loss gradient (summed) is R times too large."""
    initial, views, (_, grads_1, _) = _single_device("float32")
    strategy = cpu_strategy(2)
    with strategy.scope():
        model = tiny_model()
        model.set_weights(initial)

    def unscaled(v1, v2):
        with tf.GradientTape() as tape:
            loss = model.compute_loss_terms(v1, v2)["loss"]
        return tape.gradient(loss, model.trainable_variables)

    v1, v2 = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(views))))
    grads = tf.function(lambda a, b: [strategy.reduce("SUM", g, axis=None) for g in strategy.run(unscaled, (a, b))])(v1, v2)
    ratios = [np.linalg.norm(g.numpy()) / np.linalg.norm(r) for g, r in zip(grads, grads_1) if np.linalg.norm(r) > 1e-6]
    assert np.median(ratios) == pytest.approx(2.0, rel=1e-3)


def test_global_batch_not_divisible_by_replicas_is_refused():
    strategy = cpu_strategy(4)
    with strategy.scope():
        model = tiny_model()
        model.compile(optimizer=LARS(0.1))
    dataset = tf.data.Dataset.from_tensor_slices(view_pair(12)).batch(6, drop_remainder=True)
    with pytest.raises(ValueError, match="not divisible by the number of replicas"):
        model.fit(dataset, epochs=1, verbose=0)


@pytest.mark.slow
def test_logged_loss_is_the_global_loss_on_data_of_unknown_length():
    """`fit`'s loss at each epoch's end, and `evaluate`'s, are the trackers' total / count (summed over replicas):
    on one device and under 2 replicas they must equal the loss of a one-device run on data of known length. On a
    dataset of unknown length (here a `filter`) `fit` and `evaluate` learn of its end from a last call that fails
    with OutOfRangeError; a scalar `Mean`'s count (+1, reading no data) must not grow in that call. It did before
    `BarlowTwins._update_metrics` made the updates wait for the values: on one device always (loss / 2), under
    replicas on some replicas at random (1/2 or 2/3 of the loss), with the weights right."""
    epochs = 3
    initial = tiny_model().get_weights()
    views = tuple(v.astype("float64") for v in view_pair(GLOBAL_BATCH))
    known = tf.data.Dataset.from_tensors(views)
    unknown = known.filter(lambda *_: True)
    assert int(unknown.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    logged = {}
    for replicas, dataset in ((1, known), (1, unknown), (2, unknown)):
        strategy = cpu_strategy(replicas)
        keras.config.set_dtype_policy("float64")  # exact: the runs agree to round-off, a wrong count is O(1)
        try:
            with strategy.scope():
                model = tiny_model()
                model.set_weights(initial)
                model.compile(optimizer=LARS(0.5, momentum=0.9, eta=0.02, weight_decay=1e-3))
        finally:
            keras.config.set_dtype_policy("float32")
        history = model.fit(dataset, epochs=epochs, verbose=0).history["loss"]
        logged[replicas, dataset is known] = history + [model.evaluate(dataset, verbose=0, return_dict=True)["loss"]]
    reference = logged[1, True]
    assert len(set(reference)) == len(reference)  # every epoch trained: the values differ
    ratios = {key: np.round(np.asarray(values) / reference, 7).tolist() for key, values in logged.items()}
    print("logged / reference, per (replicas, known length):", ratios)
    assert all(np.allclose(r, 1.0, rtol=0, atol=1e-6) for r in ratios.values()), ratios
