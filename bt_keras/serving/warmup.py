"""TF Serving's warm-up file (`assets.extra/tf_serving_warmup_requests`): requests TF Serving runs at load time, so
the first real request does not pay for tracing and memory allocation.

The records are written with a small protobuf encoder of our own (`prediction_log_record`), so exporting needs no
tensorflow-serving-api; tests check the bytes against that package's protos when it is installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from bt_keras.paths import INPUT_KEYS, SIGNATURE_BYTES, SIGNATURE_NORMALIZED, SIGNATURE_PIXELS

DEFAULT_MODEL_NAME = "bt_keras"
DEFAULT_WARMUP_BATCH_SIZES = (1, 8)
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2): a string, bytes or an embedded message."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def prediction_log_record(model_name: str, signature_name: str, inputs: dict) -> bytes:
    """A serialised `tensorflow.serving.PredictionLog` holding one PredictRequest, as TF Serving's warm-up reads.

    `inputs` maps input keys to `tf.make_tensor_proto` results. The fields used, from tensorflow_serving/apis:
    PredictionLog.predict_log = 6; PredictLog.request = 1; PredictRequest.model_spec = 1, .inputs = 2 (a map:
    entries with key = 1, value = 2); ModelSpec.name = 1, .signature_name = 3. Fields are written in number order,
    as protobuf serialisers do, so the bytes equal `PredictionLog(...).SerializeToString()`.
    """
    spec = (_field(1, model_name.encode()) if model_name else b"") + _field(3, signature_name.encode())
    request = _field(1, spec) + b"".join(
        _field(2, _field(1, key.encode()) + _field(2, inputs[key].SerializeToString())) for key in sorted(inputs))
    return _field(6, _field(1, request))


def sample_images(count: int, image_size: int, seed: int = 0) -> list[bytes]:
    """`count` small valid encoded images (smooth colour ramps with a little noise, alternately JPEG and PNG).

    JPEGs are 5/4 x 3/2 of image_size, so they exercise decode, resize and crop; PNGs are image_size square, the
    path that only normalises. Used for the warm-up requests, and handy for smoke tests.
    """
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        jpeg = i % 2 == 0
        height, width = ((image_size * 5 + 3) // 4, (image_size * 3 + 1) // 2) if jpeg else (image_size, image_size)
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([255 * y / max(height - 1, 1), 255 * x / max(width - 1, 1),
                         np.full_like(y, (i * 37) % 256)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        images.append((tf.io.encode_jpeg(pixels, quality=90) if jpeg else tf.io.encode_png(pixels)).numpy())
    return images


def write_warmup_requests(path, model_name: str, image_size: int, batch_sizes=DEFAULT_WARMUP_BATCH_SIZES) -> int:
    """Writes TF Serving's warm-up file: one serving_default request per batch size (encoded sample images), and
    one batch-1 request for each of embed_pixels and embed_normalized. Returns the number of records."""
    records = []
    for n in batch_sizes:
        images = tf.make_tensor_proto(sample_images(n, image_size, seed=n), dtype=tf.string, shape=[n])
        records.append(prediction_log_record(model_name, SIGNATURE_BYTES, {INPUT_KEYS[SIGNATURE_BYTES]: images}))
    pixels = tf.io.decode_image(sample_images(1, image_size)[0], channels=3)[None].numpy()
    records.append(prediction_log_record(model_name, SIGNATURE_PIXELS,
                                         {INPUT_KEYS[SIGNATURE_PIXELS]: tf.make_tensor_proto(pixels)}))
    normalized = np.zeros([1, image_size, image_size, 3], np.float32)
    records.append(prediction_log_record(model_name, SIGNATURE_NORMALIZED,
                                         {INPUT_KEYS[SIGNATURE_NORMALIZED]: tf.make_tensor_proto(normalized)}))
    if len(records) > MAX_WARMUP_RECORDS:
        raise ValueError(f"{len(records)} warm-up records; TF Serving reads at most {MAX_WARMUP_RECORDS}.")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return len(records)
