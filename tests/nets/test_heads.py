"""The projector (bt_keras.nets.heads): `project_views`, each Dense layer once on both views stacked (a fast path of
issue 7), computes what two projector calls compute: outputs, gradients and per-view BatchNorm statistics."""

import numpy as np
import tensorflow as tf

from bt_keras.nets import heads


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
