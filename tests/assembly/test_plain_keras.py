"""Encoder files are plain Keras (bt_keras.assembly.artifacts.save_encoder, bt_keras.nets.batch_norm.as_keras_batch_norm):
in a fresh Python where bt_keras cannot be imported, `keras.saving.load_model(encoder.keras)` gives the embeddings of
`artifacts.load_encoder` (1e-6), for a trained workdir and for a converted torchvision ResNet-50, under TensorFlow and
under Keras's NumPy and JAX backends where those import; and `import bt_keras` alone lets Keras load the full model
(`barlow_twins.keras`), whose classes are bt_keras's, without loading TensorFlow before Keras does."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bt_keras import paths
from bt_keras.assembly import artifacts
from tests.helpers import REPO, TORCHVISION_FIXTURE

HAVE_FIXTURE = (TORCHVISION_FIXTURE / "MANIFEST.json").is_file()

# A Python where `import bt_keras` fails: loads each encoder file with Keras alone and writes its embeddings of the
# images beside it (arguments: pairs of encoder file and images .npy; out: the images' path with "_out" added).
PLAIN_KERAS = """
import sys
sys.modules["bt_keras"] = None  # any import of bt_keras or its modules now raises ImportError
import numpy as np, keras
for encoder_file, images in zip(sys.argv[1::2], sys.argv[2::2]):
    model = keras.saving.load_model(encoder_file)
    np.save(images.replace(".npy", "_out.npy"), np.asarray(model(np.load(images), training=False)))
print(keras.backend.backend(), type(model).__name__)
"""


def plain_keras_embeddings(cases, tmp_path, backend="tensorflow"):
    """{name: (encoder file, images)} -> {name: embeddings}, all computed in ONE fresh process of `backend`."""
    args = []
    for name, (encoder_file, images) in cases.items():
        np.save(tmp_path / f"{name}_{backend}.npy", images)
        args += [str(encoder_file), str(tmp_path / f"{name}_{backend}.npy")]
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", PLAIN_KERAS, *args], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == backend
    return {name: np.load(tmp_path / f"{name}_{backend}_out.npy") for name in cases}


@pytest.fixture(scope="module")
def workdir(finished_run):
    """conftest.py's tiny finished run (two epochs of three steps, shared with the other files that read one): its
    encoder.keras, written by the trainer. Read only."""
    return finished_run


def _images(size, n=4):
    return np.random.default_rng(27).normal(size=(n, size, size, 3)).astype(np.float32)


def _reference(folder, images):
    encoder, _ = artifacts.load_encoder(folder)
    return encoder, np.asarray(encoder(images, training=False))


@pytest.fixture(scope="module")
def plain_tensorflow(workdir, tmp_path_factory, request):
    """One fresh plain-Keras (TensorFlow backend) process that loads both the trained encoder and, where the torch
    fixture is here, the converted ResNet-50 (conftest.py's `converted_resnet50`): {name: (file, images, its
    embeddings)}. One process instead of one per file: each costs a TensorFlow import."""
    cases = {"trained": (workdir / paths.ENCODER_FILE, _images(json.loads(
        (workdir / paths.ENCODER_METADATA).read_text())["image_size"]))}
    if HAVE_FIXTURE:
        cases["resnet50"] = (request.getfixturevalue("converted_resnet50") / paths.ENCODER_FILE,
                             _images(64, n=2))  # any size: the network pools globally
    plain = plain_keras_embeddings(cases, tmp_path_factory.mktemp("plain_keras"))
    return {name: (*cases[name], plain[name]) for name in cases}


@pytest.mark.slow
def test_a_trained_encoder_loads_in_keras_without_bt_keras(workdir, plain_tensorflow):
    _, images, plain = plain_tensorflow["trained"]
    encoder, reference = _reference(workdir, images)
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
    images = _images(json.loads((workdir / paths.ENCODER_METADATA).read_text())["image_size"])
    _, reference = _reference(workdir, images)
    other = plain_keras_embeddings({"trained": (workdir / paths.ENCODER_FILE, images)}, tmp_path, backend)["trained"]
    print(f"{backend} backend vs TensorFlow: max |diff| {np.abs(other - reference).max():.1e}")
    np.testing.assert_allclose(other, reference, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FIXTURE, reason=f"no {TORCHVISION_FIXTURE}")
def test_a_converted_torchvision_resnet50_loads_in_keras_without_bt_keras(converted_resnet50, plain_tensorflow):
    _, images, plain = plain_tensorflow["resnet50"]
    _, reference = _reference(converted_resnet50, images)
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
