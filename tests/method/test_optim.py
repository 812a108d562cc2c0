"""LARS against a NumPy reference of the official update rule (native kernel and TensorFlow ops), the warm-up +
cosine schedule's values."""

import math
import os
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from bt_keras.method.optim import LARS, WarmupCosine
from tests.helpers import SUBPROCESS_SCRIPTS, needs_native_kernels, numpy_lars


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native_kernels), False],
                         ids=["native-kernel", "tensorflow-ops"])
def test_lars_matches_numpy_reference_with_exclusions_and_zero_norms(native):
    rng = np.random.default_rng(0)
    initial = [
        rng.normal(size=(4, 3)),  # an ordinary kernel
        np.zeros((3, 2)),  # zero weight norm: trust ratio 1
        np.zeros((2, 2)),  # zero weight AND zero gradient: update norm 0, ratio 1, stays 0
        rng.normal(size=(3,)),  # a bias: no weight decay, no trust ratio, own learning rate
    ]
    grads = [
        [rng.normal(size=w.shape) for w in initial[:2]] + [np.zeros((2, 2)), rng.normal(size=(3,))] for _ in range(3)
    ]
    hyper = dict(lr=0.5, momentum=0.9, eta=0.02, wd=1e-2, bias_lr_scale=0.024)
    expected = numpy_lars(initial, grads, **hyper)

    variables = [keras.Variable(w.astype("float32")) for w in initial]
    opt = LARS(hyper["lr"], momentum=hyper["momentum"], eta=hyper["eta"], weight_decay=hyper["wd"],
               bias_lr_scale=hyper["bias_lr_scale"], native=native)
    for step_grads in grads:
        opt.apply_gradients([(tf.constant(g, tf.float32), v) for g, v in zip(step_grads, variables)])
    for got, want in zip(variables, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert np.all(variables[2].numpy() == 0)


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native_kernels), False],
                         ids=["native-kernel", "tensorflow-ops"])
def test_lars_without_exclusions_treats_biases_as_weights(native):
    w, g = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    var = keras.Variable(w.astype("float32"))
    LARS(1.0, momentum=0.0, eta=0.1, weight_decay=0.0, exclude_1d=False, native=native).apply_gradients(
        [(tf.constant(g, tf.float32), var)])
    ratio = 0.1 * np.linalg.norm(w) / np.linalg.norm(g)
    np.testing.assert_allclose(var.numpy(), w - ratio * g, rtol=1e-6)


def _lars_steps(native, initial, grads, **hyper):
    variables = [keras.Variable(w) for w in initial]
    opt = LARS(0.7, momentum=0.9, eta=0.02, weight_decay=1e-3, native=native, **hyper)
    step = tf.function(lambda gs: opt.apply_gradients(zip(gs, variables)))  # as in fit: inside a tf.function
    for step_grads in grads:
        step([tf.constant(g) for g in step_grads])
    return [v.numpy() for v in variables] + [m.numpy() for m in opt.momentums]


@needs_native_kernels
def test_native_kernel_equals_tensorflow_ops_in_float64_on_large_odd_sized_variables():
    """Both paths agree to float64 round-off on sizes that cross the kernel's 65536-element blocks unevenly."""
    rng = np.random.default_rng(1)
    shapes = [(300, 517), (3, 3, 64, 129), (1000,)]
    initial = [rng.normal(size=s) for s in shapes]
    grads = [[rng.normal(size=s) * 10.0 ** -k for s in shapes] for k in range(4)]
    native, reference = _lars_steps(True, initial, grads), _lars_steps(False, initial, grads)
    for got, want in zip(native, reference):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert not np.allclose(native[0], initial[0])  # it did move


@needs_native_kernels
def test_native_kernel_does_not_change_a_value_read_before_the_update():
    """TensorFlow reads alias the variable's buffer; the in-place kernel must copy first, as TF's own ops do."""
    var = keras.Variable(np.ones((64, 64), np.float32))
    before = var.value.read_value()  # holds the variable's buffer
    LARS(0.5, native=True).apply_gradients([(tf.ones((64, 64)), var)])
    assert np.all(before.numpy() == 1.0)
    assert np.all(var.numpy() < 1.0)


@needs_native_kernels
def test_xla_steps_use_tensorflow_ops_and_native_true_says_why_not():
    var = keras.Variable(np.ones((8, 8), np.float32))
    automatic = LARS(0.5)
    tf.function(lambda g: automatic.apply_gradients([(g, var)]), jit_compile=True)(tf.ones((8, 8)))
    assert np.all(var.numpy() < 1.0)
    forced = LARS(0.5, native=True)
    with pytest.raises(RuntimeError, match="XLA"):
        tf.function(lambda g: forced.apply_gradients([(g, var)]), jit_compile=True)(tf.ones((8, 8)))


@pytest.mark.slow
def test_without_the_native_kernel_lars_falls_back_and_native_true_says_why(tmp_path):
    """One fresh process (tests/subprocess_scripts/lars_fallback.py) runs two cases one after the other: native
    kernels turned off (BT_KERAS_NATIVE=0), and a fresh cache with a compiler that fails (CXX=false). In each LARS
    falls back to TensorFlow ops and native=True refuses, saying why; the failed build warns and leaves no partial
    library behind. Both settings are read at the first use of the kernel, not at import, so one interpreter
    serves both (the turned-off case caches nothing)."""
    child_env = {key: value for key, value in os.environ.items() if key not in ("BT_KERAS_NATIVE", "CXX")}
    child_env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, str(SUBPROCESS_SCRIPTS / "lars_fallback.py"), str(tmp_path / "cache")],
                         env=child_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    stdout = dict(zip(["turned-off", "compiler-fails"], out.stdout.split("CASE ")[1:]))
    stderr = dict(zip(["turned-off", "compiler-fails"], out.stderr.split("CASE ")[1:]))
    for case, reason in [("turned-off", "BT_KERAS_NATIVE=0"), ("compiler-fails", "compiler failed")]:
        assert stdout[case].startswith(case) and stderr[case].startswith(case), (out.stdout, out.stderr[-3000:])
        assert "REFUSED LARS(native=True) cannot use the native kernel" in stdout[case] and reason in stdout[case]
    assert "native LARS kernel is unavailable" in stderr["compiler-fails"]  # the warning users see
    assert "native LARS kernel is unavailable" not in stderr["turned-off"]  # turned off: nothing to warn of
    left = [p.name for p in (tmp_path / "cache" / "compiler-fails").glob("*") if not p.name.endswith(".lock")]
    assert not left, left  # no partial library left behind (the build's lock file aside)


def test_processes_building_a_kernel_at_once_compile_it_once(tmp_path, monkeypatch):
    """Several first uses at once (the workers of one host, test workers) take turns on the build's lock file: one
    compiles, the others load its library. Threads stand in for the processes (each opens the lock file itself, and
    flock excludes between open files, as between processes); the compiler is a stand-in that takes 0.2 s."""
    from bt_keras import kernels

    monkeypatch.setenv("BT_KERAS_CACHE_DIR", str(tmp_path))
    compiled = []

    def slow_compile(tf_module, compiler, source, path):
        compiled.append(path)
        time.sleep(0.2)
        path.write_bytes(b"library")
        return path

    monkeypatch.setattr(kernels, "_compile", slow_compile)
    monkeypatch.setattr(kernels, "_compiler", lambda: "c++")
    paths = []
    builders = [threading.Thread(target=lambda: paths.append(kernels._build(tf))) for _ in range(3)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join(30)
    assert len(paths) == 3 and len(set(paths)) == 1 and paths[0].read_bytes() == b"library"
    assert len(compiled) == 1, compiled  # without the lock: three compilations of the same library


def test_lars_config_round_trip():
    schedule = WarmupCosine(1.6, warmup_steps=10, total_steps=100)
    opt = LARS(schedule, momentum=0.8, eta=0.02, weight_decay=1e-4, bias_lr_scale=0.5)
    clone = LARS.from_config(opt.get_config())
    assert clone.get_config() == opt.get_config()
    assert clone.lars_weight_decay == 1e-4 and clone.eta == 0.02
    assert isinstance(clone._learning_rate, WarmupCosine)


@pytest.mark.parametrize("bad", [dict(momentum=1.0), dict(eta=-1.0), dict(weight_decay=float("nan"))])
def test_lars_rejects_bad_hyperparameters(bad):
    with pytest.raises(ValueError, match="LARS"):
        LARS(0.1, **bad)


def test_lars_rejects_a_bad_native_setting():
    with pytest.raises(ValueError, match="native"):
        LARS(0.1, native="yes")


def test_warmup_cosine_values():
    base, warmup, total, floor = 2.0, 10, 110, 0.001
    schedule = WarmupCosine(base, warmup, total, end_scale=floor)
    value = lambda step: float(schedule(step))  # noqa: E731
    assert value(0) == 0.0
    assert value(5) == pytest.approx(base * 5 / warmup)
    assert value(warmup) == pytest.approx(base)  # end of warm-up: the peak
    assert value(warmup + 50) == pytest.approx(base * (floor + (1 - floor) * 0.5))  # midway through the cosine
    assert value(total) == pytest.approx(base * floor)  # end: the floor
    assert value(total + 1000) == pytest.approx(base * floor)
    q = 0.5 * (1 + math.cos(math.pi * 0.25))  # the official formula at a quarter of the decay
    assert value(warmup + 25) == pytest.approx(base * q + base * floor * (1 - q), rel=1e-6)
    assert WarmupCosine.from_config(schedule.get_config()).get_config() == schedule.get_config()


def test_warmup_cosine_rejects_bad_lengths():
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(1.0, warmup_steps=20, total_steps=10)


def _ancestors(op):
    """Every op `op` depends on, through data inputs and control inputs (in its graph)."""
    seen, pending = set(), [op]
    while pending:
        current = pending.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent not in seen:
                seen.add(parent)
                pending.append(parent)
    return seen


@pytest.mark.parametrize("replicas", [1, 2])
def test_updates_wait_for_every_summed_gradient_but_the_sums_do_not(replicas):
    """The in-place updates must not start before the last gradient (the backward pass still reads the weights);
    under replicas each gradient's sum must start as soon as that gradient exists (no barrier before it)."""
    from bt_keras import distribute

    strategy = distribute.mirrored(["/cpu:0", "/cpu:1"]) if replicas == 2 else tf.distribute.get_strategy()
    with strategy.scope():
        variables = [keras.Variable(np.ones(shape, np.float32)) for shape in ((3, 4), (4,), (4, 2))]
        optimizer = LARS(0.1)
        optimizer.build(variables)

    def step(*grads):
        optimizer.apply([tf.identity(g) for g in grads], variables)  # on the replica's device

    specs = [tf.TensorSpec(v.shape, tf.float32) for v in variables]
    graph = tf.function(lambda *g: strategy.run(step, args=g)).get_concrete_function(*specs).graph
    gradients = [op for op in graph.get_operations() if op.type == "Placeholder" and op.outputs[0].dtype == tf.float32]
    assert len(gradients) == len(variables)
    updates = [op for op in graph.get_operations() if op.type in ("ResourceApplyMomentum", "BtKerasLarsUpdate")]
    assert len(updates) == len(variables) * replicas
    for update in updates:
        assert set(gradients) <= _ancestors(update)
    sums = [op for op in graph.get_operations() if op.type == "AddN"]
    assert len(sums) == (len(variables) if replicas == 2 else 0)
    for add in sums:
        assert len(set(gradients) & _ancestors(add)) == 1  # its own gradient only
