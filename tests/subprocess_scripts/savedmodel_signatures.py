"""Probe run by tests/serving/test_savedmodel.py in a fresh process: loads an export as TF Serving would (no Keras
objects), runs every signature, the warm-up records and the REST bodies, and writes the results for the test to
compare. Last, `saved_model_cli show --all` on the export: the entry point of TensorFlow's installed `saved_model_cli`
script (tensorflow.python.tools.saved_model_cli.main), run here instead of in a process of its own; its listing goes to
OUT.cli.txt and its exit status to the report's "cli_status"."""

import base64
import json
import sys

import numpy as np
import tensorflow as tf

version_dir, inputs_path, images_path, bodies_path, out_path = sys.argv[1:6]
model = tf.saved_model.load(version_dir)
sig = model.signatures
data = np.load(inputs_path, allow_pickle=False)
images = [base64.b64decode(x) for x in json.load(open(images_path))]
arrays, report = {}, {"signatures": sorted(sig.keys())}

def put(prefix, outputs):
    for name, value in outputs.items():
        arrays[f"{prefix}/{name}"] = value.numpy()

put("bytes17", sig["serving_default"](images=tf.constant(images)))
put("bytes1", sig["serving_default"](images=tf.constant(images[:1])))
put("pixels17", sig["embed_pixels"](pixels=tf.constant(data["pixels"])))
put("pixels1", sig["embed_pixels"](pixels=tf.constant(data["pixels_square"])))
put("normalized17", sig["embed_normalized"](normalized=tf.constant(data["normalized"])))

# The REST bodies, decoded as TF Serving's row format does: each instance is the single input's value for one
# example, {"b64": s} is base64-decoded to bytes, and the instances are stacked into the batch.
dtypes = {"serving_default": object, "embed_pixels": np.uint8, "embed_normalized": np.float32}
keys = {"serving_default": "images", "embed_pixels": "pixels", "embed_normalized": "normalized"}
for i, body in enumerate(json.load(open(bodies_path))):
    request = json.loads(body)
    name = request.get("signature_name", "serving_default")
    instances = [base64.b64decode(x["b64"]) if isinstance(x, dict) else x for x in request["instances"]]
    batch = tf.constant(instances) if dtypes[name] is object else tf.constant(np.array(instances, dtypes[name]))
    put(f"rest{i}", sig[name](**{keys[name]: batch}))

# Warm-up records: parse each as a PredictionLog, rebuild its inputs with tf.make_ndarray, run its signature.
try:
    from tensorflow_serving.apis import prediction_log_pb2
except ImportError:
    prediction_log_pb2 = None

def fields(buffer):
    # the length-delimited fields of a protobuf message (all our warm-up messages use only those)
    out, i = {}, 0
    while i < len(buffer):
        key, shift = 0, 0
        while True:
            b = buffer[i]; i += 1; key |= (b & 0x7F) << shift; shift += 7
            if b < 0x80: break
        assert key & 7 == 2, f"unexpected wire type {key & 7}"
        length, shift = 0, 0
        while True:
            b = buffer[i]; i += 1; length |= (b & 0x7F) << shift; shift += 7
            if b < 0x80: break
        out.setdefault(key >> 3, []).append(buffer[i:i + length]); i += length
    return out

from tensorflow.core.framework import tensor_pb2
warmup = []
for record in tf.data.TFRecordDataset(f"{version_dir}/assets.extra/tf_serving_warmup_requests"):
    raw = record.numpy()
    if prediction_log_pb2 is not None:
        request = prediction_log_pb2.PredictionLog.FromString(raw).predict_log.request
        spec = {"name": request.model_spec.name, "signature": request.model_spec.signature_name}
        tensors = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
    else:
        request = fields(fields(fields(raw)[6][0])[1][0])
        spec_fields = fields(request[1][0])
        spec = {"name": spec_fields[1][0].decode(), "signature": spec_fields[3][0].decode()}
        tensors = {}
        for entry in request[2]:
            entry = fields(entry)
            tensors[entry[1][0].decode()] = tf.make_ndarray(tensor_pb2.TensorProto.FromString(entry[2][0]))
    outputs = sig[spec["signature"]](**{k: tf.constant(v) for k, v in tensors.items()})
    warmup.append({**spec, "inputs": {k: [str(v.dtype), list(v.shape)] for k, v in tensors.items()},
                   "outputs": {k: list(v.shape) for k, v in outputs.items()},
                   "finite": bool(all(np.isfinite(v.numpy()).all() for v in outputs.values()))})
report["warmup"] = warmup
report["parsed_with"] = "tensorflow_serving" if prediction_log_pb2 is not None else "wire decoder"

# Bad input: each must end in InvalidArgumentError with a clear message, or in a correct result; never a crash.
def bad_jpeg(height, width):
    return tf.io.encode_jpeg(tf.zeros([height, width, 3], tf.uint8) + 128).numpy()

one_pixel_png = tf.io.encode_png(tf.fill([1, 1, 3], tf.constant(200, tf.uint8))).numpy()
cases = {
    "empty string": ("serving_default", {"images": tf.constant([b""])}),
    "empty string in a batch": ("serving_default", {"images": tf.constant([images[0], b"", images[1]])}),
    "not an image": ("serving_default", {"images": tf.constant([b"this is not an image"])}),
    "truncated jpeg": ("serving_default", {"images": tf.constant([images[1][:60]])}),
    "1x1 png": ("serving_default", {"images": tf.constant([one_pixel_png])}),
    "4000x3000 jpeg": ("serving_default", {"images": tf.constant([bad_jpeg(3000, 4000)])}),
    "4001x3000 jpeg": ("serving_default", {"images": tf.constant([bad_jpeg(3000, 4001)])}),
    "empty batch": ("serving_default", {"images": tf.zeros([0], tf.string)}),
    "zero-width pixels": ("embed_pixels", {"pixels": tf.zeros([2, 5, 0, 3], tf.uint8)}),
    "too many pixels": ("embed_pixels", {"pixels": tf.zeros([1, 3000, 4001, 3], tf.uint8)}),
}
bad = {}
for name, (signature, kwargs) in cases.items():
    try:
        outputs = sig[signature](**kwargs)
        bad[name] = {"ok": True, "shapes": {k: list(v.shape) for k, v in outputs.items()},
                     "finite": bool(all(np.isfinite(v.numpy()).all() for v in outputs.values()))}
        if name == "1x1 png":
            arrays["one_pixel/embedding"] = outputs["embedding"].numpy()
    except tf.errors.InvalidArgumentError as error:
        bad[name] = {"ok": False, "error": "InvalidArgumentError", "message": error.message}
report["bad"] = bad

# saved_model_cli show: what a user runs to see the signatures; it reads the SavedModel's files, not this process's
# loaded model. main() ends through absl's app.run, with SystemExit.
import contextlib
import io
from tensorflow.python.tools import saved_model_cli

listing = io.StringIO()
sys.argv = ["saved_model_cli", "show", "--dir", version_dir, "--tag_set", "serve", "--all"]
with contextlib.redirect_stdout(listing):
    try:
        status = saved_model_cli.main()
    except SystemExit as stop:
        status = stop.code
report["cli_status"] = status or 0
open(out_path + ".cli.txt", "w").write(listing.getvalue())

np.savez(out_path + ".npz", **arrays)
json.dump(report, open(out_path + ".json", "w"))
print("PROBE DONE")
