"""The TF Serving export (export/): what a fresh server process would compute equals what evaluation computes.

One module-scoped export, made by the CLI in a subprocess from a small trained-looking workdir, is probed by one
fresh Python process (`PROBE`, which loads it with tf.saved_model.load, runs every signature, the warm-up records,
the client's REST body decoded as TF Serving decodes it, and bad inputs) and compared here with the Keras encoder
fed by `bt_keras.augment.eval_transform`. The client is checked against loopback stand-ins for TF Serving's REST
and gRPC front ends, and against the real tensorflow_model_server when that binary is on PATH. An export is readable by
other users under umask 022 (conftest.py's `exported`), and a bad --max_image_pixels is refused before anything is
written.
"""

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bt_keras.assembly.artifacts import load_encoder, load_with_projector, save_encoder
from bt_keras.augment import eval_transform
from bt_keras.method.model import BarlowTwins
from bt_keras.nets import backbones, heads
from bt_keras.paths import MODEL_FILE, SIGNATURE_NORMALIZED
from bt_keras.serving import client, savedmodel, signatures, warmup
from tests.helpers import REPO, SUBPROCESS_SCRIPTS, run_script

SIZE = 32
METADATA = {"image_size": SIZE, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "backbone": "resnet18",
            "dataset": "test", "step": 7}
MODEL_NAME = "bt_test"
MAX_PIXELS = 12_000_000  # exactly 4000 x 3000: that image passes, one more column is refused
DEFAULT_MAX_PIXELS = 50_000_000  # what an export without --max_image_pixels decodes at most
TOLERANCE = 1e-5

try:
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2, prediction_service_pb2_grpc
except ImportError:
    prediction_log_pb2 = None


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _run(args, timeout=180):
    return subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _encode(pixels, fmt):
    if fmt in ("jpeg", "png"):
        return (tf.io.encode_jpeg(pixels, quality=92) if fmt == "jpeg" else tf.io.encode_png(pixels)).numpy()
    buffer = io.BytesIO()  # bmp, gif, grayscale png via PIL
    image = Image.fromarray(pixels[..., 0], "L") if fmt == "gray" else Image.fromarray(pixels)
    image.save(buffer, format="PNG" if fmt == "gray" else fmt.upper())
    return buffer.getvalue()


def _images(rng):
    """17 encoded images of many sizes and formats, including ones already SIZE x SIZE (normalise only)."""
    shapes = [(32, 32), (48, 40), (20, 70), (37, 33), (32, 32), (64, 64), (33, 90), (100, 36), (31, 31)]
    formats = ["png", "jpeg", "jpeg", "png", "jpeg", "bmp", "gif", "gray", "jpeg"]
    images = []
    for i in range(17):
        h, w = shapes[i % len(shapes)]
        y, x = np.mgrid[0:h, 0:w]
        smooth = np.stack([y * 255 / h, x * 255 / w, np.full_like(y, 40 * i % 256)], -1)
        pixels = np.clip(smooth + rng.normal(0, 30, smooth.shape), 0, 255).astype(np.uint8)
        images.append(_encode(pixels, formats[i % len(formats)]))
    return images


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir as the trainer leaves it: encoder.keras + encoder.json + barlow_twins.keras, with BN
    statistics that are not the identity and live residual branches (so inference mode matters)."""
    keras.utils.set_random_seed(0)
    encoder = backbones.resnet18(input_shape=(SIZE, SIZE, 3), stem="cifar", width_multiplier=1 / 16, blocks=(1, 1),
                                 zero_init_residual=False)
    model = BarlowTwins(encoder, heads.projector("16-12"))
    batch = tf.random.stateless_normal([16, SIZE, SIZE, 3], seed=[1, 2]) * 2.0 + 0.5
    model.projector(encoder(batch, training=True), training=True)  # moves the BN moving statistics
    path = tmp_path_factory.mktemp("workdir")
    save_encoder(encoder, path, METADATA)
    model.save(path / MODEL_FILE)
    return path, encoder, model.projector


@pytest.fixture(scope="module")
def export_dir(workdir, tmp_path_factory):
    """The CLI's export (in a subprocess): L2-normalised embedding, projection, warm-up batches 1 and 3."""
    base = tmp_path_factory.mktemp("models") / MODEL_NAME
    result = _run([sys.executable, "-m", "export.savedmodel", f"--checkpoint={workdir[0]}", f"--export_dir={base}",
                   "--l2_normalize", "--include_projector", "--batch_warmup_sizes=1,3", f"--model_name={MODEL_NAME}",
                   f"--max_image_pixels={MAX_PIXELS}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensorflow_model_server" in result.stdout  # it prints how to serve the export
    return base


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    images = _images(rng)
    return {
        "images": images,
        "pixels": rng.integers(0, 256, [17, 40, 52, 3], dtype=np.uint8),
        "pixels_square": rng.integers(0, 256, [1, SIZE, SIZE, 3], dtype=np.uint8),
        "normalized": rng.normal(size=[17, SIZE, SIZE, 3]).astype(np.float32),
    }


# The fresh process (tests/subprocess_scripts/savedmodel_signatures.py) loads the export as TF Serving would and
# writes results.
PROBE = SUBPROCESS_SCRIPTS / "savedmodel_signatures.py"


def _version_dir(export_dir):
    return export_dir / "1"


@pytest.fixture(scope="module")
def probe(export_dir, inputs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe")
    np.savez(folder / "inputs.npz", pixels=inputs["pixels"], pixels_square=inputs["pixels_square"],
             normalized=inputs["normalized"])
    (folder / "images.json").write_text(json.dumps([base64.b64encode(b).decode() for b in inputs["images"]]))
    bodies = [client.rest_request_body(inputs["images"]),
              client.rest_request_body(inputs["pixels"][:3], signature_name="embed_pixels")]
    (folder / "bodies.json").write_text(json.dumps(bodies))
    result = _run([sys.executable, str(PROBE), str(_version_dir(export_dir)), str(folder / "inputs.npz"),
                   str(folder / "images.json"), str(folder / "bodies.json"), str(folder / "out")])
    assert result.returncode == 0 and "PROBE DONE" in result.stdout, result.stderr[-3000:]
    arrays = dict(np.load(folder / "out.npz"))
    report = json.loads((folder / "out.json").read_text())
    report["cli_listing"] = (folder / "out.cli.txt").read_text()
    return arrays, report


def _reference(encoder, projector, images):
    """What evaluation computes: eval_transform on each decoded image, the encoder in inference mode."""
    x = tf.stack([eval_transform(image, SIZE, METADATA["mean"], METADATA["std"]) for image in images])
    return _head(encoder, projector, x)


def _head(encoder, projector, normalized):
    features = encoder(normalized, training=False)
    return {"embedding": tf.math.l2_normalize(features, axis=-1).numpy(),
            "projection": projector(features, training=False).numpy()}


def _decode(data):
    return tf.io.decode_image(data, channels=3, expand_animations=False)


def _assert_close(actual, expected, what):
    error = float(np.max(np.abs(actual - expected)))
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert error <= TOLERANCE, f"{what}: max abs difference {error:.2e} > {TOLERANCE}"


@pytest.mark.slow
def test_fresh_process_signatures_equal_the_keras_encoder(workdir, inputs, probe):
    _, encoder, projector = workdir
    arrays, report = probe
    assert {"serving_default", "embed_pixels", "embed_normalized"} <= set(report["signatures"])
    expected = {
        "bytes17": _reference(encoder, projector, [_decode(b) for b in inputs["images"]]),
        "pixels17": _reference(encoder, projector, list(inputs["pixels"])),
        "pixels1": _reference(encoder, projector, list(inputs["pixels_square"])),
        "normalized17": _head(encoder, projector, inputs["normalized"]),
    }
    expected["bytes1"] = {k: v[:1] for k, v in expected["bytes17"].items()}
    for prefix, outputs in expected.items():
        for name, value in outputs.items():
            _assert_close(arrays[f"{prefix}/{name}"], value, f"{prefix} {name}")
    np.testing.assert_allclose(np.linalg.norm(arrays["bytes17/embedding"], axis=1), 1.0, atol=1e-5)
    assert arrays["bytes17/embedding"].shape == (17, encoder.output_shape[-1])
    assert arrays["bytes17/projection"].shape == (17, 12)


@pytest.mark.slow
def test_rest_body_decoded_as_tf_serving_does_gives_the_same_embeddings(probe):
    arrays, _ = probe
    _assert_close(arrays["rest0/embedding"], arrays["bytes17/embedding"], "REST bytes body")
    _assert_close(arrays["rest0/projection"], arrays["bytes17/projection"], "REST bytes body")
    _assert_close(arrays["rest1/embedding"], arrays["pixels17/embedding"][:3], "REST pixels body")


@pytest.mark.slow
def test_warmup_records_parse_and_run(probe):
    _, report = probe
    warmup = report["warmup"]
    requests = [(w["signature"], w["inputs"]) for w in warmup]
    assert requests == [
        ("serving_default", {"images": ["object", [1]]}),
        ("serving_default", {"images": ["object", [3]]}),
        ("embed_pixels", {"pixels": ["uint8", [1, 40, 48, 3]]}),
        ("embed_normalized", {"normalized": ["float32", [1, SIZE, SIZE, 3]]}),
    ]
    for record in warmup:
        assert record["name"] == MODEL_NAME and record["finite"], record
        assert record["outputs"]["embedding"][0] == record["outputs"]["projection"][0] >= 1


@pytest.mark.skipif(prediction_log_pb2 is None, reason="tensorflow-serving-api is not installed")
def test_warmup_encoding_equals_the_official_protos():
    tensor = tf.make_tensor_proto([b"abc", b"\x00\xff" * 200], dtype=tf.string, shape=[2])
    ours = warmup.prediction_log_record("name", "serving_default", {"images": tensor})
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "name"
    request.model_spec.signature_name = "serving_default"
    request.inputs["images"].CopyFrom(tensor)
    official = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    assert ours == official.SerializeToString()
    assert prediction_log_pb2.PredictionLog.FromString(ours) == official


@pytest.mark.hostile
@pytest.mark.slow
def test_bad_input_fails_clearly_or_works_and_never_crashes(probe):
    arrays, report = probe  # the probe process exited normally after all of these
    bad = report["bad"]
    errors = {name: case["message"] for name, case in bad.items() if not case["ok"]}
    assert set(errors) == {"empty string", "empty string in a batch", "not an image", "truncated jpeg",
                           "4001x3000 jpeg", "zero-width pixels", "too many pixels"}, bad
    assert "empty string" in errors["empty string"] and "JPEG" in errors["empty string"]
    assert "image 1 of the batch is an empty string" in errors["empty string in a batch"]
    assert "Unknown image file format" in errors["not an image"]
    assert "JPEG" in errors["truncated jpeg"]
    assert f"more than {MAX_PIXELS} pixels" in errors["4001x3000 jpeg"]
    assert f"more than {MAX_PIXELS} pixels" in errors["too many pixels"]
    assert "zero height or width" in errors["zero-width pixels"]
    for name in ("1x1 png", "4000x3000 jpeg"):
        assert bad[name]["finite"] and bad[name]["shapes"]["embedding"][0] == 1, bad[name]
    assert bad["empty batch"]["shapes"] == {"embedding": [0, 8], "projection": [0, 12]}


@pytest.mark.slow
def test_one_pixel_image_matches_evaluation(workdir, probe):
    _, encoder, projector = workdir
    arrays, _ = probe
    one = tf.fill([1, 1, 3], tf.constant(200, tf.uint8))
    _assert_close(arrays["one_pixel/embedding"], _reference(encoder, projector, [one])["embedding"], "1x1 image")


def test_saved_model_cli_lists_the_documented_signatures(probe):
    """`saved_model_cli show --all`, run by the probe's fresh process through the installed script's entry point."""
    _, report = probe
    assert report["cli_status"] == 0, report["cli_listing"][-2000:]
    text = report["cli_listing"]
    blocks = {name: text.split(f"signature_def['{name}']")[1].split("Method name is")[0]
              for name in ("serving_default", "embed_pixels", "embed_normalized")}
    expected_inputs = {"serving_default": ("images", "DT_STRING", "(-1)"),
                       "embed_pixels": ("pixels", "DT_UINT8", "(-1, -1, -1, 3)"),
                       "embed_normalized": ("normalized", "DT_FLOAT", f"(-1, {SIZE}, {SIZE}, 3)")}
    for name, (key, dtype, shape) in expected_inputs.items():
        block = " ".join(blocks[name].split())
        assert f"inputs['{key}'] tensor_info: dtype: {dtype} shape: {shape}" in block, block
        assert "outputs['embedding'] tensor_info: dtype: DT_FLOAT shape: (-1, 8)" in block, block
        assert "outputs['projection'] tensor_info: dtype: DT_FLOAT shape: (-1, 12)" in block, block


def test_metadata_beside_the_model(workdir, export_dir):
    meta = json.loads((_version_dir(export_dir) / "assets.extra" / "bt_keras.json").read_text())
    assert meta["source_checkpoint"] == str(workdir[0].resolve())
    assert meta["model_name"] == MODEL_NAME and meta["version"] == 1
    assert meta["preprocessing"]["image_size"] == SIZE and meta["preprocessing"]["mean"] == METADATA["mean"]
    assert meta["preprocessing"]["std"] == METADATA["std"] and meta["preprocessing"]["crop_fraction"] == 0.875
    assert meta["embedding_dim"] == 8 and meta["projection_dim"] == 12 and meta["l2_normalize"] is True
    assert set(meta["signatures"]) == {"serving_default", "embed_pixels", "embed_normalized"}
    assert meta["encoder_metadata"]["step"] == 7 and meta["warmup"]["records"] == 4
    assert meta["exported_at"].endswith("+00:00")


def test_versions_existing_next_and_refused(workdir, export_dir):
    _, encoder, _ = workdir
    assert savedmodel.existing_versions(export_dir) == [1]  # the staging folder is gone
    assert [p.name for p in export_dir.iterdir()] == ["1"]
    with pytest.raises(FileExistsError, match="pick another --version"):
        savedmodel.export_encoder(encoder, METADATA, export_dir, version=1)


def test_clear_errors_for_bad_checkpoints_and_metadata(workdir, tmp_path):
    path, encoder, _ = workdir
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(tmp_path / "nowhere")
    lone = tmp_path / "lone"
    save_encoder(encoder, lone, METADATA)
    with pytest.raises(FileNotFoundError, match="barlow_twins.keras"):
        load_with_projector(lone)
    with pytest.raises(ValueError, match=r"lacks \['mean'\]"):
        signatures.preprocessing_from_metadata({"image_size": SIZE, "std": [1, 1, 1]}, encoder)
    with pytest.raises(ValueError, match="takes 32x32 images but its metadata says image_size=224"):
        signatures.preprocessing_from_metadata({**METADATA, "image_size": 224}, encoder)


def _export_main(monkeypatch, checkpoint, export_dir, **flag_values) -> SystemExit:
    """Runs the export command's main in this process, its flags given as parsed values (the defaults but for the
    two paths and `flag_values`); returns the SystemExit it ends with. (The command in a fresh process: the
    `export_dir` fixture.)"""
    from absl import flags

    from bt_keras.cli import export as export_cli

    values = dict(checkpoint=str(checkpoint), export_dir=str(export_dir), version=None, l2_normalize=False,
                  include_projector=False, batch_warmup_sizes=["1"], model_name=MODEL_NAME,
                  max_image_pixels=DEFAULT_MAX_PIXELS)
    monkeypatch.setattr(flags, "FLAGS", types.SimpleNamespace(**{**values, **flag_values}))
    with pytest.raises(SystemExit) as exited:
        export_cli.main(["export"])
    return exited.value


def test_cli_names_a_missing_checkpoint(tmp_path, monkeypatch):
    """The export command's main (`_export_main`) exits with the message naming the path (what Python prints on
    stderr, status 1)."""
    message = _export_main(monkeypatch, tmp_path / "missing", tmp_path / "out").code
    assert isinstance(message, str) and message.startswith("export: "), message  # not 0, not a bare status
    assert "does not exist" in message and str(tmp_path / "missing") in message
    assert not (tmp_path / "out").exists()


@pytest.mark.hostile
def test_export_is_world_readable_under_umask_022(exported):
    assert exported.stat().st_mode & 0o777 == 0o755
    for path in exported.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


@pytest.mark.hostile
def test_a_non_finite_input_row_gets_nan_outputs_not_a_plausible_vector(exported):
    """All-NaN pixels came out of embed_normalized as a finite unit vector (TensorFlow's CPU ReLU maps NaN to 0) where
    the ONNX export returns NaN; any non-finite value in a row now makes that row's outputs NaN, the others unchanged."""
    signature = tf.saved_model.load(str(exported)).signatures[SIGNATURE_NORMALIZED]
    batch = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
    clean = signature(normalized=tf.constant(batch))["embedding"].numpy()
    batch[0] = np.nan
    batch[1, 3, 4, 2] = np.inf
    out = signature(normalized=tf.constant(batch))["embedding"].numpy()
    assert np.isnan(out[:2]).all() and np.isfinite(out[2]).all()
    np.testing.assert_array_equal(out[2], clean[2])


@pytest.mark.hostile
def test_max_image_pixels_must_be_positive(tmp_path, monkeypatch, capsys):
    encoder = backbones.resnet18(input_shape=(16, 16, 3), stem="cifar", width_multiplier=1 / 16, blocks=(1, 1))
    for bad in (-5, 0, 2.5, True):
        with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
            savedmodel.export_encoder(encoder, {"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3},
                                      tmp_path / "m", max_image_pixels=bad)
    assert not (tmp_path / "m").exists()  # refused before anything was written
    # The command's main (`_export_main`): a usage error, status 2, one line naming the flag, before the checkpoint
    # is read.
    assert _export_main(monkeypatch, tmp_path, tmp_path / "m", max_image_pixels=-5).code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("export:")]
    assert lines == ["export: --max_image_pixels must be a positive integer (the most pixels serving_default "
                     f"decodes, default {DEFAULT_MAX_PIXELS}), got -5"], lines
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- the client against TF Serving stand-ins


@pytest.fixture(scope="module")
def loaded(export_dir):
    return tf.saved_model.load(str(_version_dir(export_dir)))


class _RestStandIn(BaseHTTPRequestHandler):
    """POST /v1/models/<name>:predict as TF Serving's row format answers it (multi-output rows as objects)."""

    signatures = None
    model_name = None

    def do_POST(self):  # noqa: N802 (http.server's naming)
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != f"/v1/models/{self.model_name}:predict":
            return self._reply(404, {"error": f"Servable not found for request: {self.path}"})
        instances = [base64.b64decode(x["b64"]) for x in request["instances"]]
        try:
            outputs = self.signatures[request.get("signature_name", "serving_default")](images=tf.constant(instances))
        except tf.errors.InvalidArgumentError as error:
            return self._reply(400, {"error": error.message})
        names = sorted(outputs)
        rows = [{name: outputs[name][i].numpy().tolist() for name in names} for i in range(len(instances))]
        self._reply(200, {"predictions": rows})

    def _reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_rest_client_against_a_loopback_stand_in(loaded, inputs, probe, tmp_path):
    arrays, _ = probe
    handler = type("Handler", (_RestStandIn,), {"signatures": loaded.signatures, "model_name": MODEL_NAME})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        outputs = client.predict_rest(url, MODEL_NAME, inputs["images"][:5], timeout=30)
        _assert_close(np.array(outputs["embedding"]), arrays["bytes17/embedding"][:5], "REST client")
        _assert_close(np.array(outputs["projection"]), arrays["bytes17/projection"][:5], "REST client")
        image_file = tmp_path / "image.jpg"
        image_file.write_bytes(inputs["images"][1])
        done = run_script("bt-keras-client", "--rest", url, "--model", MODEL_NAME, str(image_file))  # as installed
        assert done.returncode == 0, done.stderr[-3000:]
        printed = json.loads(done.stdout)
        assert printed["image"] == str(image_file)
        _assert_close(np.array(printed["embedding"]), arrays["bytes17/embedding"][1], "client CLI")
        with pytest.raises(client.ServingError, match="(?s)HTTP 400.*empty string"):
            client.predict_rest(url, MODEL_NAME, [inputs["images"][0], b""], timeout=30)
        with pytest.raises(client.ServingError, match="HTTP 404"):
            client.predict_rest(url, "no_such_model", inputs["images"][:1], timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ConnectionError, match="Could not reach TF Serving"):
        client.predict_rest(url, MODEL_NAME, inputs["images"][:1], timeout=5)


@pytest.mark.skipif(prediction_log_pb2 is None, reason="tensorflow-serving-api is not installed (gRPC is optional)")
@pytest.mark.slow
def test_grpc_client_against_a_loopback_stand_in(loaded, inputs, probe):
    import grpc

    arrays, _ = probe

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 (gRPC's naming)
            assert request.model_spec.name == MODEL_NAME
            kwargs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
            try:
                outputs = loaded.signatures[request.model_spec.signature_name](**kwargs)
            except tf.errors.InvalidArgumentError as error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
            response = predict_pb2.PredictResponse()
            for name, value in outputs.items():
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value.numpy()))
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        outputs = client.predict_grpc(target, MODEL_NAME, inputs["images"], timeout=30)
        _assert_close(outputs["embedding"], arrays["bytes17/embedding"], "gRPC client")
        pixels = client.predict_grpc(target, MODEL_NAME, inputs["pixels"], signature_name="embed_pixels", timeout=30)
        _assert_close(pixels["embedding"], arrays["pixels17/embedding"], "gRPC client, embed_pixels")
        with pytest.raises(client.ServingError, match="(?s)INVALID_ARGUMENT.*Unknown image file format"):
            client.predict_grpc(target, MODEL_NAME, [b"junk"], timeout=30)
    finally:
        server.stop(0)


@pytest.mark.skipif(prediction_log_pb2 is None, reason="tensorflow-serving-api is not installed")
def test_models_config_example_parses():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse((REPO / "export" / "models.config").read_text(),
                               model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == warmup.DEFAULT_MODEL_NAME and model.model_platform == "tensorflow"


# ------------------------------------------------------------------------------------------------ the real TF Serving


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("tensorflow_model_server") is None,
                    reason="the tensorflow_model_server binary is not on PATH (TF Serving is not installed here)")
def test_tensorflow_model_server_answers_like_the_saved_model(export_dir, inputs, probe, tmp_path):
    arrays, _ = probe
    grpc_port, rest_port = _free_port(), _free_port()
    log = tmp_path / "tensorflow_model_server.log"  # a file, not a pipe nobody reads, which could fill and block
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            ["tensorflow_model_server", f"--port={grpc_port}", f"--rest_api_port={rest_port}",
             f"--model_name={MODEL_NAME}", f"--model_base_path={export_dir}"],
            stdout=log_file, stderr=subprocess.STDOUT)
    rest = f"http://127.0.0.1:{rest_port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"tensorflow_model_server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "tensorflow_model_server did not make the model AVAILABLE in 90 s"
            try:
                with urllib.request.urlopen(f"{rest}/v1/models/{MODEL_NAME}", timeout=2) as response:
                    states = [v["state"] for v in json.load(response)["model_version_status"]]
                if "AVAILABLE" in states:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        outputs = client.predict_rest(rest, MODEL_NAME, inputs["images"], timeout=60)
        _assert_close(np.array(outputs["embedding"]), arrays["bytes17/embedding"], "tensorflow_model_server REST")
        _assert_close(np.array(outputs["projection"]), arrays["bytes17/projection"], "tensorflow_model_server REST")
        with pytest.raises(client.ServingError, match="empty string"):
            client.predict_rest(rest, MODEL_NAME, [b""], timeout=60)
        if prediction_log_pb2 is not None:
            grpc_outputs = client.predict_grpc(f"127.0.0.1:{grpc_port}", MODEL_NAME, inputs["images"], timeout=60)
            _assert_close(grpc_outputs["embedding"], arrays["bytes17/embedding"], "tensorflow_model_server gRPC")
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
