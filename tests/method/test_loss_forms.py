"""The loss's two exact forms under replicas (bt_keras.method.loss_forms): costs, the documented choice, and exactness.

Every comparison is in float64 against one device (or NumPy), to 1e-10: an error in the Gram form's gathered rows,
its replica scaling or the on-demand C would be O(1).
"""

import numpy as np
import pytest
import tensorflow as tf
from absl import logging as absl_logging

from benchmarks import collectives
from bt_keras.method import loss_forms
from bt_keras.method.losses import barlow_twins_loss
from tests.helpers import cpu_strategy, loss_step_collectives, numpy_loss


@pytest.fixture(autouse=True)
def _automatic_form():
    loss_forms.set_form(None)
    yield
    loss_forms.set_form(None)


def test_costs_match_the_closed_forms_and_the_papers_setting_meets_the_goal():
    batch, dim, replicas = 2048, 8192, 16
    c = loss_forms.costs(batch, dim, replicas)
    share = (replicas - 1) / replicas
    # Shared by both forms: the batch size, each view's mean and variance, forward and backward.
    statistics = 2 * share * (1 + 8 * dim) * 4
    shapes = 2 * share * 2 * replicas * 4  # tf.distribute's all_gather exchanges each replica's int32 shape first
    assert c["gram"].bytes_sent == pytest.approx(
        statistics + shapes + share * 2 * batch * dim * 4 + 2 * share * (dim + 1) * 4)
    assert c["correlation"].bytes_sent == pytest.approx(statistics + 2 * share * dim * dim * 4)
    assert c["gram"].flops == 8 * (batch / replicas) * batch * dim
    assert c["correlation"].flops == 6 * (batch / replicas) * dim * dim
    assert c["gram"].bytes_sent <= c["correlation"].bytes_sent / 3  # the goal: at most 1/3
    one = loss_forms.costs(batch, dim, 1)
    assert one["gram"].bytes_sent == one["correlation"].bytes_sent == 0


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_choice_is_the_documented_rule(replicas):
    dim = 64
    for batch in range(4, 2 * dim + 1, 4):
        expected = "gram" if (batch <= dim if replicas == 1 else batch * dim + dim + 1 <= dim * dim) else "correlation"
        assert loss_forms.choose(batch, dim, replicas) == expected, (batch, replicas)
    assert loss_forms.choose(None, dim, replicas) == "correlation"
    loss_forms.set_form("gram")
    assert loss_forms.choose(4 * dim, dim, replicas) == "gram"


def test_choice_is_logged_once_per_shape(monkeypatch):
    messages = []
    monkeypatch.setattr(absl_logging, "info", lambda fmt, *args: messages.append(fmt % args))
    monkeypatch.setattr(loss_forms, "logging", absl_logging)
    for _ in range(3):
        loss_forms.choose(12345, 54321, 3)
    assert len(messages) == 1 and "gram form" in messages[0] and "12345" in messages[0]
    with pytest.raises(ValueError, match="set_form takes"):
        loss_forms.set_form("fast")


def _embeddings(batch, dim, seed=0):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(batch, dim)) * rng.uniform(0.5, 3, size=dim) + rng.normal(size=dim)
    z2 = 0.6 * z1 + rng.normal(size=(batch, dim))
    return z1, z2


def _terms_and_gradients(strategy, z1, z2, lambd=0.02):
    """Loss terms, dL/dz1, dL/dz2 (rows in batch order) and C, computed under `strategy` as training does."""
    replicas = strategy.num_replicas_in_sync

    def replica_fn(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            terms = barlow_twins_loss(a, b, lambd)
            objective = terms["loss"] / replicas  # as BarlowTwins.compute_gradients
        grads = tape.gradient(objective, [a, b])
        return terms["loss"], terms["on_diagonal"], terms["off_diagonal"], grads[0], grads[1], \
            terms["cross_correlation"]

    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((z1, z2)))
    a, b = next(iter(dataset))
    result = tf.function(lambda a, b: strategy.run(replica_fn, args=(a, b)))(a, b)
    local = [strategy.experimental_local_results(r) for r in result]
    loss, on, off = (float(values[0]) for values in local[:3])
    for values in local[:3] + [local[5]]:  # every replica holds the same global values
        for v in values:
            np.testing.assert_array_equal(v.numpy(), values[0].numpy())
    grad1 = np.concatenate([g.numpy() for g in local[3]])
    grad2 = np.concatenate([g.numpy() for g in local[4]])
    return (loss, on, off), grad1, grad2, local[5][0].numpy()


@pytest.mark.parametrize("replicas", [2, 4])
@pytest.mark.parametrize("form", ["gram", "correlation"])
def test_both_forms_under_replicas_equal_one_device_in_float64(replicas, form):
    batch, dim = 16, 24  # B < D: the rule picks the Gram form; "correlation" is forced
    z1, z2 = _embeddings(batch, dim)
    assert loss_forms.choose(batch, dim, replicas, itemsize=8) == "gram"
    loss_forms.set_form(None)
    terms_1, g1_1, g2_1, c_1 = _terms_and_gradients(tf.distribute.get_strategy(), z1, z2)
    loss_forms.set_form(form)
    terms_n, g1_n, g2_n, c_n = _terms_and_gradients(cpu_strategy(replicas), z1, z2)
    c_ref, on_ref, off_ref, loss_ref = numpy_loss(z1, z2, 0.02)
    np.testing.assert_allclose(terms_1, [loss_ref, on_ref, off_ref], rtol=1e-12)
    np.testing.assert_allclose(terms_n, terms_1, rtol=0, atol=1e-10)
    scale = max(np.abs(g1_1).max(), np.abs(g2_1).max())
    assert scale > 1e-2  # a zero gradient would make the comparison empty
    np.testing.assert_allclose(g1_n, g1_1, rtol=0, atol=1e-10)
    np.testing.assert_allclose(g2_n, g2_1, rtol=0, atol=1e-10)
    # C on demand: from the Gram form (an all-reduce built only when read) it equals the all-reduce form's C.
    np.testing.assert_allclose(c_n, c_1, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c_n, c_ref, rtol=0, atol=1e-12)


def test_batch_at_or_above_dim_uses_the_correlation_form_under_replicas():
    batch, dim = 16, 8
    assert loss_forms.choose(batch, dim, 2, itemsize=8) == "correlation"
    z1, z2 = _embeddings(batch, dim, seed=1)
    terms_1, g1_1, _, _ = _terms_and_gradients(tf.distribute.get_strategy(), z1, z2)
    terms_n, g1_n, _, _ = _terms_and_gradients(cpu_strategy(2), z1, z2)
    np.testing.assert_allclose(terms_n, terms_1, rtol=0, atol=1e-10)
    np.testing.assert_allclose(g1_n, g1_1, rtol=0, atol=1e-10)


@pytest.mark.parametrize("form", ["gram", "correlation"])
def test_bytes_measured_on_the_op_graph_equal_the_cost_model(form):
    batch, dim, replicas = 8, 32, 2
    loss_forms.set_form(form)
    ops = loss_step_collectives(cpu_strategy(replicas), batch, dim)
    measured = collectives.bytes_sent_per_replica(ops)
    expected = loss_forms.costs(batch, dim, replicas)[form]
    assert measured == pytest.approx(expected.bytes_sent)
    kinds = sorted(op.kind for op in ops if op.replica == 0)
    assert kinds == sorted(c.kind for c in expected.collectives)
    assert all(op.group_size == replicas for op in ops)
    if form == "gram":  # no D x D tensor crosses replicas: the largest input is a replica's B/R x D share
        assert max(op.elements for op in ops) == batch // replicas * dim
    else:
        assert max(op.elements for op in ops) == dim * dim


def test_cross_correlation_is_built_only_when_read():
    ops = loss_step_collectives(cpu_strategy(2), 8, 32)
    assert max(op.elements for op in ops) == 4 * 32
    ops = loss_step_collectives(cpu_strategy(2), 8, 32, read_c=True)
    assert max(op.elements for op in ops) == 32 * 32
