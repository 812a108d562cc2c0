"""The serving client (bt_keras.serving.client, `python -m export.client`) on its own: the REST body and URL it builds,
no TensorFlow on import, what it says without tensorflow-serving-api, and one-line errors with exit status 2 for
missing files, bad URLs and a server that is not there. Against a served model: tests/serving/test_savedmodel.py."""

import base64
import io
import json
import os
import socket
import subprocess
import sys

import pytest
from PIL import Image

from bt_keras.serving import client
from tests.helpers import REPO


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _png(width, height) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_rest_body_format():
    body = json.loads(client.rest_request_body([b"\x89PNG...", b"\xff\xd8\xff"]))
    assert body == {"signature_name": "serving_default",
                    "instances": [{"b64": base64.b64encode(b"\x89PNG...").decode()},
                                  {"b64": base64.b64encode(b"\xff\xd8\xff").decode()}]}
    assert client.predict_url("http://h:8501/", "m", 3) == "http://h:8501/v1/models/m/versions/3:predict"
    assert client.parse_rest_response({"predictions": [[1.0, 2.0]]}) == {"embedding": [[1.0, 2.0]]}
    assert client.parse_rest_response({"predictions": [{"embedding": [1.0], "projection": [2.0]}]}) == {
        "embedding": [[1.0]], "projection": [[2.0]]}
    with pytest.raises(ValueError, match="no images"):
        client.rest_request_body([])


# TF Serving's own REST documentation (tensorflow/serving, tensorflow_serving/g3doc/api_rest.md at 00e459f): its
# literal examples, the reference this client is read against that is not our own reading of the format. Its binary
# values example encodes b"image bytes" and b"awesome image bytes"; its predict example is half_plus_three's answer to
# three instances; its error example is a 404 for an unknown model; its "JSON conformance" section allows NaN and
# +-Infinity tokens in responses.
DOCUMENTED_B64 = {b"image bytes": "aW1hZ2UgYnl0ZXM=", b"awesome image bytes": "YXdlc29tZSBpbWFnZSBieXRlcw=="}
DOCUMENTED_PREDICTION = '{\n    "predictions": [3.5, 4.0, 5.5]\n}'
DOCUMENTED_ERROR = '{ "error": "Servable not found for request: Latest(half)" }'


def _canned_server(status: int, body: str):
    """A local HTTP server that answers every POST with `status` and `body`, as TF Serving's docs show it; returns
    (server, url, requests received)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            payload = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", received


def test_rest_requests_and_answers_are_those_of_tf_servings_documentation():
    body = json.loads(client.rest_request_body(list(DOCUMENTED_B64)))
    assert body["instances"] == [{"b64": encoded} for encoded in DOCUMENTED_B64.values()]

    server, url, received = _canned_server(200, DOCUMENTED_PREDICTION)
    try:
        # One named output: TF Serving omits its name, and the rows are the values themselves.
        assert client.predict_rest(url, "half_plus_three", [b"image bytes"]) == {"embedding": [3.5, 4.0, 5.5]}
        assert received[0][0] == "/v1/models/half_plus_three:predict"  # the documented predict URL
    finally:
        server.shutdown()
        server.server_close()

    server, url, _ = _canned_server(404, DOCUMENTED_ERROR)
    try:
        with pytest.raises(client.ServingError, match=r"HTTP 404: Servable not found for request: Latest\(half\)"):
            client.predict_rest(url, "half", [b"image bytes"])
    finally:
        server.shutdown()
        server.server_close()

    server, url, _ = _canned_server(200, '{"predictions": [[1.0, NaN, Infinity, -Infinity]]}')
    try:
        got = client.predict_rest(url, "m", [b"image bytes"])["embedding"][0]
        assert got[0] == 1.0 and got[1] != got[1] and got[2:] == [float("inf"), float("-inf")]
    finally:
        server.shutdown()
        server.server_close()
    # The columnar answer: an object of named outputs, or the value alone for one output.
    assert client.parse_rest_response({"outputs": {"embedding": [[1.0]], "projection": [[2.0]]}}) == {
        "embedding": [[1.0]], "projection": [[2.0]]}
    assert client.parse_rest_response({"outputs": [[1.0, 2.0]]}) == {"embedding": [[1.0, 2.0]]}


def test_client_imports_no_tensorflow():
    code = "import sys, export.client; assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_grpc_without_tensorflow_serving_api_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_serving", None)
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)
    with pytest.raises(ImportError, match="pip install tensorflow-serving-api"):
        client.predict_grpc("127.0.0.1:1", "bt_test", [b"x"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.hostile
def test_client_failures_are_one_line_errors_with_exit_code_2(tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(_png(4, 4))
    refused = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    cases = {
        "missing file": ([f"--rest={refused}", str(tmp_path / "nope.jpg")], ["nope.jpg", "does not exist"]),
        "a directory": ([f"--rest={refused}", str(tmp_path)], ["is a directory", "pass the image files in it"]),
        "no scheme": (["--rest=localhost:8501", str(image)], ["'localhost:8501'", "--rest=http://localhost:8501"]),
        "bad port": (["--rest=http://127.0.0.1:port", str(image)], ["not a valid URL", "--rest=http://"]),
        "refused": ([f"--rest={refused}", str(image)], [refused, "Connection refused", "tensorflow_model_server"]),
    }
    for what, (args, expected) in cases.items():
        result = subprocess.run([sys.executable, "-m", "export.client", *args], cwd=REPO, env=_env(),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (what, result.stderr)
        assert result.stdout == "" and len(result.stderr.splitlines()) == 1, (what, result.stderr)
        assert result.stderr.startswith("ERROR: ") and "Traceback" not in result.stderr, (what, result.stderr)
        assert all(part in result.stderr for part in expected), (what, result.stderr)
