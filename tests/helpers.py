"""Small networks and data shared by the tests: tiny enough to keep the suite fast, real enough to test the maths."""

import numpy as np
import pytest
import tensorflow as tf

from bt_keras.method.model import BarlowTwins
from bt_keras.nets import backbones, heads


def tiny_model(image_size=8, projector="32-32", lambd=0.0051, seed=0, blocks=(1, 1)):
    """A two-stage, width-1/16 CIFAR ResNet-18 (fast to trace) with a small projector; synchronized BN throughout."""
    import keras

    keras.utils.set_random_seed(seed)
    encoder = backbones.resnet18(
        input_shape=(image_size, image_size, 3), stem="cifar", width_multiplier=1 / 16, blocks=blocks
    )
    return BarlowTwins(encoder, heads.projector(projector), lambd=lambd)


def view_pair(batch, image_size=8, seed=0):
    """Two correlated float32 'views' of random images."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, image_size, image_size, 3)).astype("float32")
    noise = rng.normal(size=images.shape).astype("float32")
    return images, (images + 0.3 * noise).astype("float32")


def _accelerators() -> list:
    return tf.config.list_logical_devices("GPU") + tf.config.list_logical_devices("TPU")


# The native CPU kernels (bt_keras.kernels) run only on variables and tensors on the CPU. Where an accelerator is
# visible, the default strategy puts them there and bt_keras runs the TensorFlow-ops path instead (tested on every
# host by tests/test_accelerator_path.py), so a test that requires the kernels skips, saying why.
needs_native_kernels = pytest.mark.skipif(
    bool(_accelerators()), reason="needs the native CPU kernels, and variables live on an accelerator here "
                                  "(the TensorFlow-ops path these hosts run is tests/test_accelerator_path.py)")


def assert_same_training(label, initial, reference, result, atol=1e-10):
    """Two trainings agree: `reference` and `result` are (losses, gradients, weights); each to `atol`, printed first.
    The reference run must have moved the weights from `initial`, or equality would prove nothing."""
    (loss_1, grads_1, weights_1), (loss_n, grads_n, weights_n) = reference, result
    print(f"{label}: |dloss| {max(abs(a - b) for a, b in zip(loss_1, loss_n)):.1e}, "
          f"|dgrad| {max(np.abs(a - b).max() for a, b in zip(grads_1, grads_n)):.1e}, "
          f"|dweight| {max(np.abs(a - b).max() for a, b in zip(weights_1, weights_n)):.1e}")
    np.testing.assert_allclose(loss_n, loss_1, rtol=0, atol=atol)
    for a, b in zip(grads_n, grads_1):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    for a, b in zip(weights_n, weights_1):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    assert max(np.abs(a - b).max() for a, b in zip(initial, weights_1)) > 1e-3  # the steps moved the weights
