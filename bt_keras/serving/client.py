"""Client for a bt_keras model served by TF Serving: REST with the standard library alone, gRPC optionally.

The command line over it is `bt_keras.cli.client` (`python -m export.client`, `bt-keras-client`). In Python:

    from bt_keras.serving import client
    outputs = client.predict_rest("http://localhost:8501", "bt_keras", [open("cat.jpg", "rb").read()])
    outputs["embedding"]          # list of D floats per image

REST request (`rest_request_body`): `POST /v1/models/NAME[/versions/N]:predict` with
`{"signature_name": "serving_default", "instances": [{"b64": "<base64 of the file's bytes>"}, ...]}`. In TF
Serving's row format each instance is the value of the signature's single input (`images`), and a `{"b64": ...}`
object is how JSON carries binary strings; the instances are stacked into the batch. For `embed_pixels` /
`embed_normalized` the instances are the nested lists of one image's pixels.

Responses: TF Serving answers `{"predictions": [...]}`, a list of vectors when the signature has one output, a list
of `{"embedding": [...], "projection": [...]}` objects when it has several; `parse_rest_response` turns both into
`{"embedding": [[...], ...], ...}`. Errors (a bad image, an unknown model) raise `ServingError` with TF Serving's
message; an unreachable server raises `ConnectionError`.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_SIGNATURE = "serving_default"
SINGLE_OUTPUT_NAME = "embedding"  # TF Serving omits the name of a signature's only output


class ServingError(RuntimeError):
    """TF Serving answered with an error (HTTP status and its message, or a gRPC status)."""


def _instance(item):
    if isinstance(item, (bytes, bytearray, memoryview)):
        return {"b64": base64.b64encode(bytes(item)).decode("ascii")}
    if hasattr(item, "tolist"):  # a numpy array of pixels
        return item.tolist()
    return item


def rest_request_body(images, signature_name: str = DEFAULT_SIGNATURE) -> str:
    """The JSON text to POST to `:predict`: encoded image bytes become `{"b64": ...}` instances; arrays (or nested
    lists) of pixels for `embed_pixels` / `embed_normalized` become nested lists."""
    images = list(images)
    if not images:
        raise ValueError("rest_request_body: no images given; TF Serving rejects an empty `instances` list.")
    return json.dumps({"signature_name": signature_name, "instances": [_instance(item) for item in images]})


def parse_rest_response(payload: dict) -> dict:
    """`{"predictions": ...}` (row format) or `{"outputs": ...}` (columnar) -> `{output_name: [per-image value]}`."""
    if "error" in payload:
        raise ServingError(payload["error"])
    if "predictions" in payload:
        rows = payload["predictions"]
        if rows and isinstance(rows[0], dict):
            return {name: [row[name] for row in rows] for name in rows[0]}
        return {SINGLE_OUTPUT_NAME: rows}
    if "outputs" in payload:
        outputs = payload["outputs"]
        return outputs if isinstance(outputs, dict) else {SINGLE_OUTPUT_NAME: outputs}
    raise ServingError(f"unexpected TF Serving response, with neither 'predictions' nor 'outputs': {list(payload)}")


def predict_url(server: str, model_name: str, version: int | None = None) -> str:
    """`http://host:8501` + model (+ version) -> the `:predict` URL."""
    version_part = f"/versions/{int(version)}" if version is not None else ""
    return f"{server.rstrip('/')}/v1/models/{model_name}{version_part}:predict"


def predict_rest(server: str, model_name: str, images, signature_name: str = DEFAULT_SIGNATURE,
                 version: int | None = None, timeout: float = 30.0) -> dict:
    """POSTs `images` (encoded bytes, or pixel arrays for the pixel signatures) to TF Serving's REST API and returns
    `{"embedding": [[...], ...], ...}`, one row per image. `server` is e.g. `http://localhost:8501`."""
    url = predict_url(server, model_name, version)
    body = rest_request_body(images, signature_name).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        detail = error.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise ServingError(f"TF Serving at {url} answered HTTP {error.code}: {detail}") from error
    except urllib.error.URLError as error:
        raise ConnectionError(f"Could not reach TF Serving at {url}: {error.reason}. Is tensorflow_model_server "
                              "running with --rest_api_port, and the model name right?") from error
    except (TimeoutError, OSError) as error:  # a timeout or reset while reading the answer
        raise ConnectionError(f"No answer from TF Serving at {url}: {error}. Is the server overloaded? Raise the "
                              "timeout (--timeout) or send fewer images per request.") from error
    except ValueError as error:  # not JSON: something else answers at that address
        raise ServingError(f"The server at {url} did not answer JSON ({error}); is --rest the address of "
                           "tensorflow_model_server's REST port?") from error
    return parse_rest_response(payload)


def _serving_api():
    """Imports grpc and tensorflow_serving.apis lazily, with the fix in the message when they are missing."""
    try:
        import grpc
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError as error:
        raise ImportError(
            f"gRPC needs the tensorflow-serving-api package ({error}). Install it with "
            "`pip install tensorflow-serving-api` (or `pip install -e \".[serving]\"`), or use predict_rest."
        ) from error
    return grpc, predict_pb2, prediction_service_pb2_grpc


def grpc_predict_request(model_name: str, images, signature_name: str = DEFAULT_SIGNATURE,
                         version: int | None = None):
    """A `tensorflow.serving.PredictRequest`: encoded bytes -> a string tensor [batch] named `images`; an array for
    `embed_pixels` (uint8) / `embed_normalized` (float32) -> that tensor under `pixels` / `normalized`."""
    import numpy as np
    import tensorflow as tf

    _, predict_pb2, _ = _serving_api()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    if signature_name == DEFAULT_SIGNATURE:
        images = [bytes(item) for item in images]
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string, shape=[len(images)]))
    else:
        key, dtype = {"embed_pixels": ("pixels", np.uint8), "embed_normalized": ("normalized", np.float32)}.get(
            signature_name, (None, None))
        if key is None:
            raise ValueError(f"unknown signature {signature_name!r}; use serving_default, embed_pixels or "
                             "embed_normalized.")
        request.inputs[key].CopyFrom(tf.make_tensor_proto(np.asarray(images, dtype=dtype)))
    return request


def predict_grpc(target: str, model_name: str, images, signature_name: str = DEFAULT_SIGNATURE,
                 version: int | None = None, timeout: float = 30.0) -> dict:
    """Calls PredictionService/Predict at `target` (e.g. `localhost:8500`) and returns `{output_name: ndarray}`.
    Needs tensorflow-serving-api (and so TensorFlow)."""
    import tensorflow as tf

    grpc, _, prediction_service_pb2_grpc = _serving_api()
    request = grpc_predict_request(model_name, images, signature_name, version)
    # TF Serving accepts messages far above gRPC's 4 MB default; let large batches of images through.
    options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout=timeout)
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ConnectionError(f"Could not reach TF Serving at {target} ({error.code().name}: "
                                      f"{error.details()}). Is tensorflow_model_server running with --port, and "
                                      "is the address right?") from error
            raise ServingError(f"TF Serving at {target} answered {error.code().name}: {error.details()}") from error
    return {name: tf.make_ndarray(tensor) for name, tensor in response.outputs.items()}
