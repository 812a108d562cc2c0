"""Exports a Barlow Twins encoder as a versioned SavedModel that TF Serving loads as is.

    python -m export.savedmodel --checkpoint=runs/cifar10 --export_dir=models/bt_keras [--version=N]
        [--l2_normalize] [--include_projector] [--batch_warmup_sizes=1,8] [--model_name=bt_keras]

writes `<export_dir>/<version>/` (version: the next integer after the versions already there), the layout TF
Serving's `--model_base_path` expects:

    <version>/saved_model.pb, variables/      the SavedModel, with the signatures below
    <version>/assets.extra/tf_serving_warmup_requests   TFRecord of PredictionLog: run by TF Serving at load time
    <version>/assets.extra/bt_keras.json      what was exported from where, how inputs are preprocessed, signatures

Signatures (every output is float32; `embedding` is L2-normalised when exported with --l2_normalize):

    serving_default   images: string [batch], encoded JPEG / PNG / GIF / BMP / WebP bytes of any size
                      -> embedding [batch, D] (and projection [batch, P] with --include_projector)
    embed_pixels      pixels: uint8 [batch, H, W, 3] RGB, any H and W (all images of a batch share them)
                      -> the same outputs
    embed_normalized  normalized: float32 [batch, S, S, 3], already preprocessed (S = image_size)
                      -> the same outputs

`serving_default` and `embed_pixels` preprocess in the graph with `bt_keras.augment.eval_transform`, the very
function evaluation uses (resize the shorter side to round(S / crop_fraction), centre-crop S x S, normalise with the
encoder's mean / std; an S x S image is only normalised), so a served embedding equals an evaluated one. Bad input
(an empty string, bytes that are not an image, a zero-sized or too large image) fails the request with an
InvalidArgumentError naming the image and the problem; it never takes the server down.

The warm-up records are written with a small protobuf encoder of our own (`prediction_log_record`), so exporting
needs no tensorflow-serving-api; tests check the bytes against that package's protos when it is installed.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from bt_keras.augment import eval_transform
from bt_keras.checkpoints import ENCODER_FILE, ENCODER_METADATA, atomic_write_json

SIGNATURE_BYTES = "serving_default"
SIGNATURE_PIXELS = "embed_pixels"
SIGNATURE_NORMALIZED = "embed_normalized"
INPUT_KEYS = {SIGNATURE_BYTES: "images", SIGNATURE_PIXELS: "pixels", SIGNATURE_NORMALIZED: "normalized"}
ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
METADATA_FILE = "bt_keras.json"
FULL_MODEL_FILE = "barlow_twins.keras"  # written by the trainer beside encoder.keras; holds the projector too
DEFAULT_MODEL_NAME = "bt_keras"
DEFAULT_WARMUP_BATCH_SIZES = (1, 8)
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # 50 MP: any camera photo; stops a decompression bomb before the resize
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit
DEFAULT_CROP_FRACTION = inspect.signature(eval_transform).parameters["crop_fraction"].default


# ------------------------------------------------------------------------------------------ preprocessing contract


def preprocessing_from_metadata(metadata: dict, encoder: keras.Model) -> dict:
    """The preprocessing evaluation uses for this encoder: `{image_size, mean, std, crop_fraction}`, validated.

    `metadata` is what `bt_keras.checkpoints.load_encoder` returns (the `encoder.json` written by training).
    Raises ValueError naming what is missing or inconsistent, and how to fix it.
    """
    missing = [key for key in ("image_size", "mean", "std") if key not in metadata]
    if missing:
        raise ValueError(
            f"The encoder's metadata lacks {missing}: export must preprocess images exactly as evaluation does. "
            f"Export a training workdir (its {ENCODER_METADATA} has them), or write them beside the model with "
            "bt_keras.checkpoints.save_encoder(encoder, directory, {'image_size': ..., 'mean': [...], 'std': [...]})."
        )
    size = int(metadata["image_size"])
    mean, std = [float(v) for v in metadata["mean"]], [float(v) for v in metadata["std"]]
    if size < 1 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"Bad preprocessing metadata: image_size={size}, mean={mean}, std={std} "
                         "(want a positive size and 3 per-channel values, std > 0).")
    input_shape = tuple(encoder.input_shape)
    if len(input_shape) != 4 or input_shape[3] not in (3, None):
        raise ValueError(f"The encoder takes inputs of shape {input_shape}; export needs an NHWC RGB image encoder.")
    if any(dim is not None and dim != size for dim in input_shape[1:3]):
        raise ValueError(f"The encoder takes {input_shape[1]}x{input_shape[2]} images but its metadata says "
                         f"image_size={size}; fix image_size in {ENCODER_METADATA}.")
    crop_fraction = float(metadata.get("crop_fraction", DEFAULT_CROP_FRACTION))
    return {"image_size": size, "mean": mean, "std": std, "crop_fraction": crop_fraction}


# ---------------------------------------------------------------------------------------------- serving functions


class _Servable:
    """Builds the three signature functions around one encoder (and optional projector)."""

    def __init__(self, encoder, projector, preprocessing: dict, l2_normalize: bool, max_image_pixels: int):
        self.encoder, self.projector = encoder, projector
        self.size = preprocessing["image_size"]
        self.prep = preprocessing
        self.l2_normalize = l2_normalize
        self.max_image_pixels = int(max_image_pixels)
        self.feature_dim = int(encoder.output_shape[-1])
        self.projection_dim = None
        if projector is not None:
            if not projector.built:
                projector.build(encoder.output_shape)
            self.projection_dim = int(projector.compute_output_shape(encoder.output_shape)[-1])

    def _transform(self, image):
        p = self.prep
        return eval_transform(image, p["image_size"], p["mean"], p["std"], crop_fraction=p["crop_fraction"])

    def _size_checks(self, height, width, what):
        """Asserts that 1 <= height, width and height * width <= max_image_pixels (int64 scalars)."""
        return [
            tf.debugging.assert_positive(
                tf.minimum(height, width), message=f"{what} has zero height or width; send a non-empty image"),
            tf.debugging.assert_less_equal(
                height * width, tf.constant(self.max_image_pixels, tf.int64),
                message=f"{what} has more than {self.max_image_pixels} pixels (the export's max_image_pixels); "
                        "downscale it before sending"),
        ]

    def _outputs(self, normalized):
        """The encoder (inference mode) on a preprocessed batch -> the output dict.

        An empty batch gets one zero image appended and its outputs dropped again: TF's CPU convolutions fail on a
        zero batch, and this keeps the graph free of control flow around the network (a batch of n >= 1 is run
        as is; the padding is then empty)."""
        n = tf.shape(normalized)[0]
        pad = tf.zeros(tf.stack([tf.cast(tf.equal(n, 0), tf.int32), self.size, self.size, 3]), normalized.dtype)
        features = tf.cast(self.encoder(tf.concat([normalized, pad], axis=0), training=False), tf.float32)
        outputs = {"embedding": tf.math.l2_normalize(features, axis=-1) if self.l2_normalize else features}
        if self.projector is not None:
            outputs["projection"] = tf.cast(self.projector(features, training=False), tf.float32)
        return {name: value[:n] for name, value in outputs.items()}

    def _map(self, fn, elems):
        spec = tf.TensorSpec([self.size, self.size, 3], tf.float32)
        return tf.map_fn(fn, elems, fn_output_signature=spec)

    def from_bytes(self, images):
        """serving_default: encoded image bytes [batch] -> outputs."""

        def one(args):
            index, data = args
            empty = tf.debugging.Assert(tf.strings.length(data) > 0, [
                "serving_default: an element of `images` is an empty string; send the encoded JPEG/PNG/GIF/BMP/WebP "
                "bytes of the image. Its index in the batch:", index])
            with tf.control_dependencies([empty]):
                image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
            shape = tf.shape(image, out_type=tf.int64)
            with tf.control_dependencies(self._size_checks(shape[0], shape[1], "serving_default: a decoded image")):
                image = tf.identity(image)
            return self._transform(image)

        indices = tf.range(tf.shape(images, out_type=tf.int64)[0])
        return self._outputs(self._map(one, (indices, images)))

    def from_pixels(self, pixels):
        """embed_pixels: uint8 [batch, H, W, 3] -> outputs."""
        shape = tf.shape(pixels, out_type=tf.int64)
        with tf.control_dependencies(self._size_checks(shape[1], shape[2], "embed_pixels: `pixels`")):
            pixels = tf.identity(pixels)
        return self._outputs(self._map(self._transform, pixels))

    def from_normalized(self, normalized):
        """embed_normalized: float32 [batch, S, S, 3], already preprocessed -> outputs."""
        return self._outputs(normalized)


# ---------------------------------------------------------------------------------------------------- warm-up file


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


# ---------------------------------------------------------------------------------------------------------- export


def existing_versions(export_dir) -> list[int]:
    """The version numbers under `export_dir` (sub-folders named by an integer, as TF Serving reads them)."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        return []
    return sorted(int(p.name) for p in export_dir.iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name))


def _signature_table(preprocessing: dict, feature_dim: int, projection_dim: int | None, l2_normalize: bool) -> dict:
    size = preprocessing["image_size"]
    outputs = {"embedding": {"dtype": "float32", "shape": [-1, feature_dim],
                             "l2_normalized": l2_normalize}}
    if projection_dim is not None:
        outputs["projection"] = {"dtype": "float32", "shape": [-1, projection_dim]}
    return {
        SIGNATURE_BYTES: {"inputs": {"images": {"dtype": "string", "shape": [-1]}}, "outputs": outputs,
                          "contract": "encoded JPEG/PNG/GIF/BMP/WebP bytes of any size, decoded to RGB, then "
                                      "preprocessed as evaluation does (bt_keras.augment.eval_transform)"},
        SIGNATURE_PIXELS: {"inputs": {"pixels": {"dtype": "uint8", "shape": [-1, -1, -1, 3]}}, "outputs": outputs,
                           "contract": "decoded RGB pixels 0..255, any height/width shared by the batch, then "
                                       "preprocessed as evaluation does"},
        SIGNATURE_NORMALIZED: {"inputs": {"normalized": {"dtype": "float32", "shape": [-1, size, size, 3]}},
                               "outputs": outputs,
                               "contract": "already preprocessed: (pixels / 255 - mean) / std at image_size, "
                                           "fed to the encoder as is"},
    }


def export_encoder(
    encoder: keras.Model,
    metadata: dict,
    export_dir,
    version: int | None = None,
    l2_normalize: bool = False,
    projector: keras.Model | None = None,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    warmup_batch_sizes=DEFAULT_WARMUP_BATCH_SIZES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    source: str | None = None,
) -> Path:
    """Writes `<export_dir>/<version>/`: the SavedModel with the three signatures, warm-up requests and metadata.

    Args:
      encoder: the Keras encoder (images normalised NHWC -> [batch, D] features).
      metadata: its `encoder.json` (`load_encoder`'s second result): image_size, mean, std are required.
      export_dir: the model's base path for TF Serving (`--model_base_path`).
      version: the version folder; default the next integer after those present. An existing one is an error.
      l2_normalize: serve unit-length embeddings (cosine similarity = dot product).
      projector: also serve `projection` = projector(raw features), e.g. `BarlowTwins.projector`.
      model_name: the model name written into the warm-up requests and metadata (TF Serving's --model_name).
      warmup_batch_sizes: one serving_default warm-up request per batch size.
      max_image_pixels: larger images are refused with InvalidArgumentError instead of being resized.
      source: where the encoder came from, recorded in the metadata.

    Returns the version folder. The version is written under a temporary name and renamed into place, so TF
    Serving, polling export_dir, never sees a half-written version.
    """
    preprocessing = preprocessing_from_metadata(metadata, encoder)
    batch_sizes = tuple(int(n) for n in warmup_batch_sizes)
    if any(n < 1 for n in batch_sizes):
        raise ValueError(f"warm-up batch sizes must be positive integers, got {list(warmup_batch_sizes)}")
    export_dir = Path(export_dir)
    if version is None:
        version = (existing_versions(export_dir) or [0])[-1] + 1
    if int(version) < 0:
        raise ValueError(f"version must be a non-negative integer, got {version}")
    final = export_dir / str(int(version))
    if final.exists():
        raise FileExistsError(f"{final} exists already; pick another --version or omit it to use the next one "
                              f"({(existing_versions(export_dir) or [0])[-1] + 1}).")

    size = preprocessing["image_size"]
    servable = _Servable(encoder, projector, preprocessing, l2_normalize, max_image_pixels)
    archive = keras.export.ExportArchive()
    archive.track(encoder)
    if projector is not None:
        archive.track(projector)
    # The first endpoint also becomes serving_default when none is named so; ours is named explicitly.
    archive.add_endpoint(SIGNATURE_BYTES, servable.from_bytes, [tf.TensorSpec([None], tf.string, name="images")])
    archive.add_endpoint(SIGNATURE_PIXELS, servable.from_pixels,
                         [tf.TensorSpec([None, None, None, 3], tf.uint8, name="pixels")])
    archive.add_endpoint(SIGNATURE_NORMALIZED, servable.from_normalized,
                         [tf.TensorSpec([None, size, size, 3], tf.float32, name="normalized")])

    export_dir.mkdir(parents=True, exist_ok=True)
    # Not a number, so TF Serving skips it until the rename below.
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{int(version)}-", dir=export_dir))
    try:
        archive.write_out(str(staging), verbose=False)
        extra = staging / ASSETS_EXTRA
        records = write_warmup_requests(extra / WARMUP_FILE, model_name, size, batch_sizes)
        feature_dim, projection_dim = servable.feature_dim, servable.projection_dim
        atomic_write_json(extra / METADATA_FILE, {
            "format": "bt_keras SavedModel export, version 1",
            "model_name": model_name,
            "version": int(version),
            "source_checkpoint": source,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "preprocessing": {**preprocessing, "transform": "bt_keras.augment.eval_transform",
                              "max_image_pixels": int(max_image_pixels)},
            "embedding_dim": feature_dim,
            "projection_dim": projection_dim,
            "l2_normalize": bool(l2_normalize),
            "signatures": _signature_table(preprocessing, feature_dim, projection_dim, l2_normalize),
            "warmup": {"file": f"{ASSETS_EXTRA}/{WARMUP_FILE}", "records": records,
                       "serving_default_batch_sizes": list(batch_sizes)},
            "encoder_metadata": metadata,
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "bt_keras": _bt_keras_version()},
        })
        os.rename(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _bt_keras_version() -> str:
    import bt_keras

    return getattr(bt_keras, "__version__", "unknown")


# ------------------------------------------------------------------------------------------------- checkpoints, CLI


def load_for_export(checkpoint, include_projector: bool = False):
    """`(encoder, projector or None, metadata)` from a training workdir, an encoder.keras or a BarlowTwins .keras.

    The projector lives only in a full BarlowTwins model: the `.keras` file given, or `barlow_twins.keras` beside
    `encoder.keras` in a workdir. Raises FileNotFoundError / ValueError naming what is missing and the fix.
    """
    from bt_keras.checkpoints import load_encoder
    from bt_keras.model import BarlowTwins

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path} does not exist. Pass a training workdir (holding {ENCODER_FILE} "
                                f"and {ENCODER_METADATA}), an {ENCODER_FILE} file or a BarlowTwins .keras file.")
    if not include_projector:
        encoder, metadata = load_encoder(path)
        return encoder, None, metadata
    full = path / FULL_MODEL_FILE if path.is_dir() else path
    if path.is_file() and path.name == ENCODER_FILE:
        full = path.parent / FULL_MODEL_FILE
    if not full.is_file():
        raise FileNotFoundError(f"--include_projector needs the full BarlowTwins model, and there is no {full}. "
                                f"Pass a BarlowTwins .keras file (model.save(...)) or a workdir holding "
                                f"{FULL_MODEL_FILE}, or export without --include_projector.")
    try:
        model = keras.models.load_model(full, compile=False)
    except Exception as error:  # keras raises many types for corrupt / foreign files
        raise ValueError(f"Could not load a Keras model from {full}: {error}") from error
    if not isinstance(model, BarlowTwins):
        raise ValueError(f"{full} holds a {type(model).__name__}, not a BarlowTwins model: it has no projector. "
                         "Export without --include_projector.")
    metadata_path = full.parent / ENCODER_METADATA
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    return model.encoder, model.projector, metadata


def _define_flags():
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "Training workdir, encoder.keras or BarlowTwins .keras file.")
    flags.DEFINE_string("export_dir", None, "TF Serving's model base path; the version folder goes inside.")
    flags.DEFINE_integer("version", None, "Version folder (default: the next integer after those present).")
    flags.DEFINE_bool("l2_normalize", False, "Serve L2-normalised embeddings.")
    flags.DEFINE_bool("include_projector", False, "Also serve the projector's output as `projection`.")
    flags.DEFINE_list("batch_warmup_sizes", [str(n) for n in DEFAULT_WARMUP_BATCH_SIZES],
                      "Batch sizes of the serving_default warm-up requests.")
    flags.DEFINE_string("model_name", DEFAULT_MODEL_NAME, "Model name for TF Serving (--model_name).")
    flags.DEFINE_integer("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS, "Refuse images with more pixels than this.")
    flags.mark_flags_as_required(["checkpoint", "export_dir"])


def main(argv) -> None:
    import sys

    from absl import flags, logging

    if len(argv) > 1:
        sys.exit(f"export: unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # TF's INFO lines about tracing and assets are noise here
    try:
        if not all(re.fullmatch(r"\d+", n.strip()) for n in f.batch_warmup_sizes):
            raise ValueError(f"--batch_warmup_sizes must be comma-separated positive integers, e.g. 1,8; "
                             f"got {','.join(f.batch_warmup_sizes)!r}")
        sizes = [int(n) for n in f.batch_warmup_sizes]
        encoder, projector, metadata = load_for_export(f.checkpoint, f.include_projector)
        path = export_encoder(encoder, metadata, f.export_dir, version=f.version, l2_normalize=f.l2_normalize,
                              projector=projector, model_name=f.model_name, warmup_batch_sizes=sizes,
                              max_image_pixels=f.max_image_pixels, source=str(Path(f.checkpoint).resolve()))
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        sys.exit(f"export: {error}")
    base = Path(f.export_dir).resolve()
    print(f"Exported {f.checkpoint} to {path}\n"
          f"Serve it: tensorflow_model_server --port=8500 --rest_api_port=8501 "
          f"--model_name={f.model_name} --model_base_path={base}")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
