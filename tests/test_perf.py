"""The fast paths of issue 7 compute the same maths as the plain Keras code they replace.

* `backbones.BatchNormalization` (TensorFlow's fused kernel on one replica) against `keras.layers.BatchNormalization`:
  outputs, input and parameter gradients, moving statistics, for rank-2 and rank-4 inputs.
* `heads.project_views` (each Dense layer once on both views stacked) against two projector calls.
* `host.configure_host` in a fresh process (threads can only be set before TensorFlow starts).

The hand-written loss gradient is checked in test_losses.py, the fused LARS update in test_optim.py, and all of them
together under 1, 2 and 4 replicas in test_distributed.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from bt_keras.nets import heads
from bt_keras.nets.backbones import BatchNormalization
from bt_keras.train import host

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 3, 6)])
def test_fused_batchnorm_equals_the_keras_layer(shape):
    rng = np.random.default_rng(len(shape))
    x = tf.constant(rng.normal(size=shape) * 3.0 + 1.5, tf.float32)
    upstream = tf.constant(rng.normal(size=shape), tf.float32)
    layers = [
        cls(momentum=0.9, epsilon=1e-5, synchronized=True, gamma_initializer="random_normal")
        for cls in (BatchNormalization, keras.layers.BatchNormalization)
    ]
    layers[0].build(shape)
    layers[1].build(shape)
    layers[1].set_weights(layers[0].get_weights())
    results = []
    for layer in layers:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            objective = tf.reduce_sum(y * upstream)
        grads = tape.gradient(objective, [x, layer.gamma, layer.beta])
        results.append([y.numpy()] + [g.numpy() for g in grads] + [w.numpy() for w in layer.non_trainable_weights])
    for ours, reference in zip(*results):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)
    # Inference mode uses the moving statistics: the same in both.
    np.testing.assert_allclose(layers[0](x, training=False), layers[1](x, training=False), rtol=1e-5, atol=1e-5)


def test_project_views_equals_two_projector_calls():
    projector = heads.projector("24-24-16")
    reference = heads.projector("24-24-16")
    projector.build((None, 12))
    reference.build((None, 12))
    reference.set_weights(projector.get_weights())
    rng = np.random.default_rng(0)
    f1, f2 = (tf.constant(rng.normal(size=(10, 12)), tf.float32) for _ in range(2))
    with tf.GradientTape(persistent=True) as tape:
        z1, z2 = heads.project_views(projector, f1, f2, training=True)
        ours = tf.reduce_sum(z1 * tf.sin(z2))
        r1, r2 = reference(f1, training=True), reference(f2, training=True)
        theirs = tf.reduce_sum(r1 * tf.sin(r2))
    np.testing.assert_allclose(z1, r1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z2, r2, rtol=1e-5, atol=1e-5)
    for g, h in zip(tape.gradient(ours, projector.trainable_weights), tape.gradient(theirs, reference.trainable_weights)):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)
    # Per-view BN statistics, updated view 1 then view 2, as two calls do.
    for ours, theirs in zip(projector.non_trainable_weights, reference.non_trainable_weights):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_configure_host_in_a_fresh_process():
    code = "import json; from bt_keras.train import host; print(json.dumps(host.configure_host()))"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["applied"] is True
    assert report["intra_op"] == host.usable_cores()
    assert report["system_allocator"] is False  # the default keeps TensorFlow's pool


def test_configure_host_after_tensorflow_started_says_so_and_rejects_bad_allocators():
    tf.constant(1.0)  # this process's runtime is up (conftest configured its devices)
    assert host.configure_threads(1)["applied"] is False
    with pytest.raises(ValueError, match="allocator must be"):
        host.configure_host(allocator="tcmalloc")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tune_malloc_applies_on_glibc():
    assert host.tune_malloc() is True
