"""LARS's solo-learn form against a NumPy float64 port of solo-learn's `solo/utils/lars.py`, and the official form's
published-hyperparameter conversion (`reference_hyperparameters`) against the official 1/R-gradient step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from bt_keras.method.optim import LARS, reference_hyperparameters, WarmupCosine
from tests.helpers import numpy_lars, numpy_solo_lars


class StepValues(keras.optimizers.schedules.LearningRateSchedule):
    """A learning rate per step from a list (values exact in float32, so the NumPy reference sees the same ones)."""

    def __init__(self, values):
        self.values = [float(v) for v in values]

    def __call__(self, step):
        return tf.gather(tf.constant(self.values, tf.float32), tf.cast(step, tf.int32))


def _run(optimizer, initial, grads_per_step, compiled=True):
    variables = [keras.Variable(np.asarray(w, np.float64)) for w in initial]
    apply = lambda gs: optimizer.apply_gradients(zip(gs, variables))  # noqa: E731
    apply = tf.function(apply) if compiled else apply
    for grads in grads_per_step:
        apply([tf.constant(g, tf.float64) for g in grads])
    return [v.numpy() for v in variables]


@pytest.mark.parametrize("compiled", [True, False], ids=["tf.function", "eager"])
def test_solo_learn_form_equals_a_float64_port_of_solo_learn_lars(compiled):
    rng = np.random.default_rng(0)
    initial = [
        rng.normal(size=(3, 3, 4, 5)),  # a conv kernel, large gradients: lars_lr / lr < 1, scaled
        rng.normal(size=(6, 4)),  # a dense kernel, tiny gradients: lars_lr / lr > 1, clipped to 1
        np.zeros((4, 3)),  # zero weight: no ratio, no decay (d = g)
        rng.normal(size=(5, 2)),  # zero gradient: d = g = 0
        rng.normal(size=(5,)),  # a bias / BN parameter: excluded, d = g at the full learning rate
    ]
    scales = [10.0, 1e-3, 1.0, 0.0, 1.0]
    grads = [[s * rng.normal(size=w.shape) for s, w in zip(scales, initial)] for _ in range(4)]
    lrs = [0.5, 0.25, 0.0625, 0.125]  # exact in float32
    hyper = dict(momentum=0.9, eta=0.02, wd=1e-4, eps=1e-8)
    want, branches = numpy_solo_lars(initial, grads, lrs, clip_lr=True, exclude_bias_n_norm=True, **hyper)
    # Every case of solo-learn's rule is exercised, on the first step (buf = d) and on later ones.
    assert branches[0] == ["scaled", "clipped", "zero-norm", "zero-norm", "excluded"], branches
    for step in branches[1:]:  # the zero weight has moved after step 1
        assert step[:2] == ["scaled", "clipped"] and step[2] != "zero-norm" and step[3:] == ["zero-norm", "excluded"]

    opt = LARS(StepValues(lrs), momentum=hyper["momentum"], eta=hyper["eta"], weight_decay=hyper["wd"],
               epsilon=hyper["eps"], bias_lr_scale=1.0, trust_ratio="solo_learn", clip_lr=True)
    got = _run(opt, initial, grads, compiled)
    for g, w, w0 in zip(got, want, initial):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-10)
    assert not np.allclose(got[0], initial[0]) and not np.allclose(got[1], initial[1])


def test_solo_learn_form_after_one_step_and_without_clipping():
    """The first step alone (buf = d), and the unclipped ratio (clip_lr=False) where the clipped one would be 1."""
    rng = np.random.default_rng(1)
    initial = [rng.normal(size=(6, 4)), rng.normal(size=(4,))]
    grads = [[1e-3 * rng.normal(size=(6, 4)), rng.normal(size=(4,))]]
    hyper = dict(momentum=0.9, eta=0.02, wd=1e-4, eps=1e-8)
    for clip in (True, False):
        want, branches = numpy_solo_lars(initial, grads, [0.5], clip_lr=clip, exclude_bias_n_norm=True, **hyper)
        assert branches[0][0] == ("clipped" if clip else "scaled")
        opt = LARS(0.5, momentum=0.9, eta=0.02, weight_decay=1e-4, bias_lr_scale=1.0, trust_ratio="solo_learn",
                   clip_lr=clip)
        for g, w in zip(_run(opt, initial, grads), want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-10)


def test_solo_learn_form_without_exclusions_scales_biases_too():
    rng = np.random.default_rng(2)
    initial, grads = [rng.normal(size=(5,))], [[rng.normal(size=(5,))] for _ in range(2)]
    want, branches = numpy_solo_lars(initial, grads, [0.5, 0.5], momentum=0.9, eta=0.02, wd=1e-4, eps=1e-8,
                                     clip_lr=True, exclude_bias_n_norm=False)
    assert branches[0] == ["scaled"]
    opt = LARS(0.5, eta=0.02, weight_decay=1e-4, trust_ratio="solo_learn", clip_lr=True, exclude_1d=False)
    np.testing.assert_allclose(_run(opt, initial, grads)[0], want[0], rtol=0, atol=1e-10)


def test_solo_learn_form_with_a_zero_learning_rate_makes_no_step_and_no_nan():
    """clip_lr divides by lr; at lr = 0 (the end of a cosine to 0) the step must be 0, not nan."""
    w = np.ones((3, 3))
    opt = LARS(0.0, eta=0.02, weight_decay=1e-4, trust_ratio="solo_learn", clip_lr=True)
    got = _run(opt, [w], [[np.full((3, 3), 0.1)]])[0]
    np.testing.assert_array_equal(got, w)
    assert np.all(np.isfinite(opt.momentums[0].numpy()))


def test_clipped_official_ratio_equals_its_numpy_form():
    rng = np.random.default_rng(3)
    w, g = rng.normal(size=(4, 4)), 1e-3 * rng.normal(size=(4, 4))
    lr, eta, wd = 0.5, 0.02, 1e-4
    d = g + wd * w
    ratio = min(eta * np.linalg.norm(w) / np.linalg.norm(d) / lr, 1.0)
    opt = LARS(lr, momentum=0.9, eta=eta, weight_decay=wd, clip_lr=True)
    np.testing.assert_allclose(_run(opt, [w], [[g]])[0], w - lr * ratio * d, rtol=0, atol=1e-12)


def test_solo_learn_form_is_refused_by_the_native_kernel_and_round_trips_its_config():
    with pytest.raises(ValueError, match="official form only"):
        LARS(0.3, trust_ratio="solo_learn", native=True)
    with pytest.raises(ValueError, match="trust_ratio"):
        LARS(0.3, trust_ratio="paper")
    opt = LARS(WarmupCosine(0.3, 10, 100, end_scale=0.0, warmup_start_lr=3e-5, inclusive_warmup=True),
               trust_ratio="solo_learn", clip_lr=True, epsilon=1e-7, bias_lr_scale=1.0)
    clone = LARS.from_config(opt.get_config())
    assert clone.get_config() == opt.get_config()
    assert (clone.trust_ratio, clone.clip_lr, clone.epsilon) == ("solo_learn", True, 1e-7)


def test_solo_learn_schedule_warms_up_from_its_start_and_decays_to_zero():
    """solo/utils/lr_scheduler.py's closed form: start + k (base - start) / (W - 1) for k < W, then cosine to 0."""
    base, start, warmup, total = 0.3, 3e-5, 10, 110
    schedule = WarmupCosine(base, warmup, total, end_scale=0.0, warmup_start_lr=start, inclusive_warmup=True)
    for k in range(total + 5):
        if k < warmup:
            want = start + k * (base - start) / (warmup - 1)
        else:
            want = 0.5 * base * (1 + np.cos(np.pi * min(k - warmup, total - warmup) / (total - warmup)))
        assert float(schedule(k)) == pytest.approx(want, rel=1e-6, abs=1e-7), k  # float32 schedule
    assert float(schedule(0)) == pytest.approx(start) and float(schedule(warmup - 1)) == pytest.approx(base)
    assert float(schedule(total)) == 0.0


def test_official_schedule_is_unchanged_by_the_new_options():
    """Defaults give the official warm-up bit for bit: base * step / W in float32."""
    official = WarmupCosine(2.0, 10, 110)
    explicit = WarmupCosine(2.0, 10, 110, warmup_start_lr=0.0, inclusive_warmup=False)
    for k in range(0, 120, 3):
        assert float(official(k)) == float(explicit(k))
    for k in range(10):
        assert float(official(k)) == float(np.float32(2.0) * np.float32(k) / np.float32(10.0))


# ------------------------------------------------------------------ the published hyperparameters under 1/R gradients


def _variable_kinds(rng):
    """A conv kernel, a dense kernel, a bias, BN gamma and beta: every kind of variable the networks have."""
    return [rng.normal(size=(3, 3, 4, 6)), rng.normal(size=(8, 5)), 0.1 * rng.normal(size=(5,)),
            1.0 + 0.1 * rng.normal(size=(6,)), 0.1 * rng.normal(size=(6,))]


@pytest.mark.parametrize("native", [True, False], ids=["native-kernel", "tensorflow-ops"])
@pytest.mark.parametrize("replicas", [16, 32])
def test_converted_hyperparameters_take_the_official_replica_step(native, replicas):
    rng = np.random.default_rng(replicas)
    initial = _variable_kinds(rng)
    grads = [[rng.normal(size=w.shape) for w in initial] for _ in range(4)]  # true gradients g
    lr_w, lr_b, wd, eta = 0.5, 0.0048 * 8, 1.5e-6 * 1e3, 0.001  # a larger wd, so that it matters at 1e-12
    official = numpy_lars(initial, [[g / replicas for g in gs] for gs in grads], lr=lr_w, momentum=0.9, eta=eta,
                          wd=wd, bias_lr_scale=lr_b / lr_w)  # the official step: gradient g / R, published (wd, lr_b)
    wd_r, lr_b_r = reference_hyperparameters(wd, lr_b, replicas)
    assert wd_r == pytest.approx(replicas * wd) and lr_b_r == pytest.approx(lr_b / replicas)
    ours = _run(LARS(lr_w, momentum=0.9, eta=eta, weight_decay=wd_r, bias_lr_scale=lr_b_r / lr_w, native=native),
                initial, grads)  # ours: the true gradient g, converted (R wd, lr_b / R)
    for got, want, start in zip(ours, official, initial):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        assert np.max(np.abs(want - start)) > 1e-6  # every kind moved
    # And the published values used as they are with the true gradient would not be the official step.
    naive = _run(LARS(lr_w, momentum=0.9, eta=eta, weight_decay=wd, bias_lr_scale=lr_b / lr_w, native=native),
                 initial, grads)
    assert max(np.max(np.abs(a - b)) for a, b in zip(naive, official)) > 1e-6


def test_reference_hyperparameters_rejects_a_bad_replica_count():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="reference_replicas"):
            reference_hyperparameters(1e-6, 0.0048, bad)
