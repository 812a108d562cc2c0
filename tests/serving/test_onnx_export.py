"""ONNX export (bt_keras.serving.onnx_export, export/onnx.py): the ONNX file run by onnxruntime gives the Keras encoder's
embeddings, for the converted official-layout ResNet-50 fixture in fresh processes, and for small encoders here."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from bt_keras.assembly import artifacts
from bt_keras.nets import backbones

ort = pytest.importorskip("onnxruntime", reason='onnxruntime is in the "test" extra')
pytest.importorskip("tf2onnx", reason='tf2onnx is in the "onnx" extra')
from bt_keras.serving import onnx_export  # noqa: E402
from tests.helpers import REPO, TORCHVISION_FIXTURE, installed_script

TOLERANCE = 1e-4  # max abs difference / max abs value

# Run in a fresh process: onnxruntime and NumPy only (no TensorFlow, no Keras, no bt_keras).
ONNXRUNTIME_CHECK = r"""
import json, sys
import numpy as np, onnxruntime as ort
model, inputs, expected, tolerance = sys.argv[1], sys.argv[2:-2], sys.argv[-2], float(sys.argv[-1])
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
(given,), (out,) = session.get_inputs(), session.get_outputs()
assert (given.name, given.type, out.name) == ("normalized", "tensor(float)", "embedding"), (given, out)
errors = []
for x_path, y_path in zip(inputs, expected.split(",")):
    x, y = np.load(x_path), np.load(y_path)
    got = session.run(["embedding"], {"normalized": x})[0]
    assert got.shape == y.shape and got.dtype == np.float32, (got.shape, got.dtype)
    errors.append(float(np.abs(got.astype(np.float64) - y).max() / np.abs(y).max()))
print(json.dumps({"errors": errors, "input_shape": given.shape, "output_shape": out.shape}))
assert max(errors) < tolerance, errors
"""


def relative_error(actual, expected) -> float:
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


def onnxruntime_run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"normalized": np.asarray(x, np.float32)})[0]


def tiny_encoder(image_size=16, seed=0):
    keras.utils.set_random_seed(seed)
    return backbones.resnet18(input_shape=(image_size, image_size, 3), stem="cifar", width_multiplier=1 / 16,
                              blocks=(1, 1))


def randomise_bn(encoder, seed=1):
    """Non-trivial BN statistics, so that a wrong inference-mode BatchNorm shows in the outputs."""
    rng = np.random.default_rng(seed)
    for layer in encoder.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c), rng.normal(0, 0.2, c),
                               rng.uniform(0.5, 2.0, c)])
    return encoder


METADATA = {"image_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "backbone": "resnet18"}


@pytest.mark.skipif(not (TORCHVISION_FIXTURE / "MANIFEST.json").is_file(),
                    reason=f"no fixture at {TORCHVISION_FIXTURE}")
@pytest.mark.slow
def test_converted_resnet50_in_onnxruntime_in_a_fresh_process(converted_resnet50, tmp_path):
    workdir = converted_resnet50
    encoder, _ = artifacts.load_encoder(workdir)
    fixture_inputs = np.ascontiguousarray(np.load(TORCHVISION_FIXTURE / "inputs.npy").transpose(0, 2, 3, 1), np.float32)
    rng = np.random.default_rng(0)
    batches = {"b1": fixture_inputs[:1], "b17": rng.normal(size=(17, 64, 64, 3)).astype(np.float32),
               "fixture": fixture_inputs}
    x_paths, y_paths = [], []
    for name, x in batches.items():
        np.save(tmp_path / f"{name}_x.npy", x)
        y = np.load(TORCHVISION_FIXTURE / "features.npy") if name == "fixture" else encoder.predict(x, verbose=0)
        np.save(tmp_path / f"{name}_y.npy", y)  # Keras's embeddings, and for the fixture torch's own features
        x_paths.append(str(tmp_path / f"{name}_x.npy"))
        y_paths.append(str(tmp_path / f"{name}_y.npy"))

    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    model = tmp_path / "r50.onnx"
    done = subprocess.run([installed_script("bt-keras-export-onnx"), f"--checkpoint={workdir}", f"--output={model}"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)  # as installed
    assert done.returncode == 0, done.stderr[-3000:]
    assert "output `embedding` [batch, 2048]" in done.stdout
    check = subprocess.run([sys.executable, "-c", ONNXRUNTIME_CHECK, str(model), *x_paths, ",".join(y_paths),
                            str(TOLERANCE)], capture_output=True, text=True, env=env, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    result = json.loads(check.stdout.strip().splitlines()[-1])
    assert result["input_shape"] == ["batch", 64, 64, 3] and result["output_shape"] == ["batch", 2048]
    assert len(result["errors"]) == 3 and max(result["errors"]) < TOLERANCE
    props = onnx_export.onnx_metadata(model)
    assert props["image_size"] == 64 and props["mean"] == [0.485, 0.456, 0.406] and props["feature_dim"] == 2048


def test_l2_normalised_export_of_a_small_encoder(tmp_path):
    encoder = randomise_bn(tiny_encoder())
    path = onnx_export.export_onnx(encoder, METADATA, tmp_path / "tiny.onnx", l2_normalize=True)
    x = np.random.default_rng(2).normal(size=(5, 16, 16, 3)).astype(np.float32)
    features = encoder.predict(x, verbose=0).astype(np.float64)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    got = onnxruntime_run(path, x)
    assert relative_error(got, unit) < TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    props = onnx_export.onnx_metadata(path)
    assert props["l2_normalize"] is True and props["image_size"] == 16 and props["std"] == [0.25, 0.25, 0.25]
    assert [p for p in tmp_path.iterdir()] == [path]  # no temporary file left behind


def test_a_mixed_precision_encoder_is_exported_in_float32(tmp_path):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = randomise_bn(tiny_encoder(seed=3))
    finally:
        keras.config.set_dtype_policy(previous)
    reference = tiny_encoder(seed=4)  # float32, built independently; the mixed encoder's weights copied in
    reference.set_weights(mixed.get_weights())
    path = onnx_export.export_onnx(mixed, METADATA, tmp_path / "mixed.onnx")
    x = np.random.default_rng(5).normal(size=(3, 16, 16, 3)).astype(np.float32)
    assert relative_error(onnxruntime_run(path, x), reference.predict(x, verbose=0)) < TOLERANCE
    assert mixed.layers[1].dtype_policy.name == "mixed_float16"  # the caller's encoder is left as it was


def test_bad_input_is_refused_with_the_fix(tmp_path, monkeypatch):
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match="no image_size"):
        onnx_export.export_onnx(encoder, {"mean": [0, 0, 0]}, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="takes 16x16 images but its metadata says image_size=32"):
        onnx_export.export_onnx(encoder, {**METADATA, "image_size": 32}, tmp_path / "x.onnx")
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[onnx\]"'):
        onnx_export.export_onnx(encoder, METADATA, tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())
