"""Encoder files are plain Keras (bt_keras.assembly.artifacts.save_encoder, bt_keras.nets.batch_norm.as_keras_batch_norm):
in a fresh Python where bt_keras cannot be imported, `keras.saving.load_model(encoder.keras)` gives the embeddings of
`artifacts.load_encoder` (1e-6), for a trained workdir and for a converted torchvision ResNet-50, under TensorFlow and
under Keras's NumPy and JAX backends where those import; and `import bt_keras` alone lets Keras load the full model
(`barlow_twins.keras`), whose classes are bt_keras's, without loading TensorFlow before Keras does."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from bt_keras import paths
from bt_keras.assembly import artifacts
from tests.helpers import REPO, TORCHVISION_FIXTURE, trainer

# A Python where `import bt_keras` fails: loads the encoder with Keras alone and writes its embeddings.
PLAIN_KERAS = """
import sys
sys.modules["bt_keras"] = None  # any import of bt_keras or its modules now raises ImportError
import numpy as np, keras
model = keras.saving.load_model(sys.argv[1])
np.save(sys.argv[3], np.asarray(model(np.load(sys.argv[2]), training=False)))
print(keras.backend.backend(), type(model).__name__)
"""


def plain_keras_embeddings(encoder_file, images, tmp_path, backend="tensorflow"):
    inputs, outputs = tmp_path / "images.npy", tmp_path / f"embeddings_{backend}.npy"
    np.save(inputs, images)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", PLAIN_KERAS, str(encoder_file), str(inputs), str(outputs)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == backend
    return np.load(outputs)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny finished run (two epochs of three steps): its encoder.keras, written by the trainer."""
    run = tmp_path_factory.mktemp("plain_keras_run")
    trainer(run).run()
    return run


def _images(size, n=4):
    return np.random.default_rng(27).normal(size=(n, size, size, 3)).astype(np.float32)


@pytest.mark.slow
def test_a_trained_encoder_loads_in_keras_without_bt_keras(workdir, tmp_path):
    encoder, metadata = artifacts.load_encoder(workdir)
    images = _images(metadata["image_size"])
    reference = np.asarray(encoder(images, training=False))
    plain = plain_keras_embeddings(workdir / paths.ENCODER_FILE, images, tmp_path)
    print(f"trained encoder: plain Keras vs load_encoder max |diff| {np.abs(plain - reference).max():.1e}")
    np.testing.assert_allclose(plain, reference, rtol=0, atol=1e-6)
    # The file names Keras's layers only.
    import keras
    assert not artifacts.bt_keras_objects(keras.saving.serialize_keras_object(encoder))


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_the_encoder_runs_under_another_keras_backend(workdir, tmp_path, backend):
    # Keras's NumPy backend imports JAX (keras/src/backend/numpy/math.py); neither is a dependency of bt_keras.
    if importlib.util.find_spec("jax") is None:
        pytest.skip(f"Keras's {backend} backend needs jax, which is not installed (pip install jax for CPU)")
    encoder, metadata = artifacts.load_encoder(workdir)
    images = _images(metadata["image_size"])
    reference = np.asarray(encoder(images, training=False))
    other = plain_keras_embeddings(workdir / paths.ENCODER_FILE, images, tmp_path, backend=backend)
    print(f"{backend} backend vs TensorFlow: max |diff| {np.abs(other - reference).max():.1e}")
    np.testing.assert_allclose(other, reference, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not (TORCHVISION_FIXTURE / "MANIFEST.json").is_file(), reason=f"no {TORCHVISION_FIXTURE}")
def test_a_converted_torchvision_resnet50_loads_in_keras_without_bt_keras(converted_resnet50, tmp_path):
    path = converted_resnet50 / paths.ENCODER_FILE
    encoder, _ = artifacts.load_encoder(converted_resnet50)
    images = _images(64, n=2)  # any size: the network pools globally
    reference = np.asarray(encoder(images, training=False))
    plain = plain_keras_embeddings(path, images, tmp_path)
    print(f"converted ResNet-50: plain Keras vs load_encoder max |diff| {np.abs(plain - reference).max():.1e}")
    np.testing.assert_allclose(plain, reference, rtol=0, atol=1e-6 * max(1.0, float(np.abs(reference).max())))


@pytest.mark.slow
def test_import_bt_keras_lets_keras_load_the_full_model(workdir, tmp_path):
    """barlow_twins.keras keeps bt_keras's classes; a bare `import bt_keras` registers them once Keras is imported.
    encoder.keras loads as well after `import bt_keras`."""
    code = ("import sys, bt_keras; assert 'tensorflow' not in sys.modules; import keras; "
            f"full = keras.saving.load_model({str(workdir / paths.MODEL_FILE)!r}); "
            f"encoder = keras.saving.load_model({str(workdir / paths.ENCODER_FILE)!r}); "
            "print(type(full).__name__, type(full.encoder.layers[2]).__module__, encoder.output_shape)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[:2] == ["BarlowTwins", "bt_keras.nets.batch_norm"], result.stdout
