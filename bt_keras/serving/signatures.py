"""The serving functions of an export: encoded bytes, pixels or preprocessed floats in, embeddings out.

    serving_default   images: string [batch], encoded JPEG / PNG / GIF / BMP / WebP bytes of any size
                      -> embedding [batch, D] (and projection [batch, P] with a projector)
    embed_pixels      pixels: uint8 [batch, H, W, 3] RGB, any H and W (all images of a batch share them)
    embed_normalized  normalized: float32 [batch, S, S, 3], already preprocessed (S = image_size)

`serving_default` and `embed_pixels` preprocess in the graph with `bt_keras.augment.eval_transform`, the very function
evaluation uses, so a served embedding equals an evaluated one. Bad input (an empty string, bytes that are not an
image, a zero-sized or too large image) fails the request with an InvalidArgumentError naming the image and the
problem; it never takes the server down.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np
import tensorflow as tf

from bt_keras.augment.eval_transforms import eval_transform
from bt_keras.paths import ENCODER_METADATA, SIGNATURE_BYTES, SIGNATURE_NORMALIZED, SIGNATURE_PIXELS
from bt_keras.serving.image_header import check_encoded_images, resized_too_large

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # 50 MP: any camera photo; stops a decompression bomb before the resize


def check_max_image_pixels(value) -> int:
    """`value` as a positive int, or ValueError: 0 or a negative limit would export a model refusing every image."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"max_image_pixels must be a positive integer (the most pixels serving_default decodes, "
                         f"default {DEFAULT_MAX_IMAGE_PIXELS}), got {value!r}")
    return int(value)
DEFAULT_CROP_FRACTION = inspect.signature(eval_transform).parameters["crop_fraction"].default


def preprocessing_from_metadata(metadata: dict, encoder: keras.Model) -> dict:
    """The preprocessing evaluation uses for this encoder: `{image_size, mean, std, crop_fraction}`, validated.

    `metadata` is what `bt_keras.assembly.artifacts.load_encoder` returns (the `encoder.json` written by training).
    Raises ValueError naming what is missing or inconsistent, and how to fix it.
    """
    missing = [key for key in ("image_size", "mean", "std") if key not in metadata]
    if missing:
        raise ValueError(
            f"The encoder's metadata lacks {missing}: export must preprocess images exactly as evaluation does. "
            f"Export a training workdir (its {ENCODER_METADATA} has them), or write them beside the model with "
            "bt_keras.assembly.artifacts.save_encoder(encoder, directory, "
            "{'image_size': ..., 'mean': [...], 'std': [...]})."
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


class Servable:
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
        # The network as one concrete function, traced here once, which every signature calls: the SavedModel's
        # function library holds its graph once, and an export traces it once (traced inside each signature, it was
        # three copies, and six traces: tf.saved_model.save traces the signatures again in its save context). Serving
        # runs the same ops: bit-identical outputs, as fast.
        self.network = tf.function(
            self._network, autograph=False,
            input_signature=[tf.TensorSpec([None, self.size, self.size, 3], tf.float32, name="normalized")],
        ).get_concrete_function()

    def _network(self, normalized):
        """The encoder (inference mode) on a preprocessed float32 batch of n >= 1 -> {"features": float32 [n, D]}
        (and "projection": float32 [n, P], the projector on those features, with a projector). A mixed-precision
        encoder's float16 / bfloat16 features are cast to float32 before the projector, as evaluation reads them."""
        features = tf.cast(self.encoder(normalized, training=False), tf.float32)
        outputs = {"features": features}
        if self.projector is not None:
            outputs["projection"] = tf.cast(self.projector(features, training=False), tf.float32)
        return outputs

    def _transform(self, image):
        p = self.prep
        return eval_transform(image, p["image_size"], p["mean"], p["std"], crop_fraction=p["crop_fraction"])

    @property
    def resized_short_side(self) -> int:
        """The shorter side an image is resized to before the centre crop (`eval_transform`)."""
        return int(round(self.size / self.prep["crop_fraction"]))

    def _size_checks(self, height, width, what):
        """Asserts that 1 <= height, width and height * width <= max_image_pixels (int64), and that the image
        resized for the model stays within max_image_pixels too (`image_header.resized_too_large`)."""
        too_large = resized_too_large(height, width, self.resized_short_side, self.max_image_pixels)
        return [
            tf.debugging.assert_positive(
                tf.minimum(height, width), message=f"{what} has zero height or width; send a non-empty image"),
            tf.debugging.assert_less_equal(
                height * width, tf.constant(self.max_image_pixels, tf.int64),
                message=f"{what} has more than {self.max_image_pixels} pixels (the export's max_image_pixels); "
                        "downscale it before sending"),
            tf.debugging.Assert(
                ~tf.reduce_any(too_large),
                [f"{what}: resized to a shorter side of {self.resized_short_side} px for the model it would hold more "
                 f"than {self.max_image_pixels} pixels (max_image_pixels), an extreme aspect ratio; crop it closer to "
                 "square before sending"]),
        ]

    def _outputs(self, normalized):
        """The network (`self.network`: the encoder in inference mode, and the projector) on a preprocessed batch ->
        the output dict.

        An empty batch gets one zero image appended and its outputs dropped again: TF's CPU convolutions fail on a
        zero batch, and this keeps the graph free of control flow around the network (a batch of n >= 1 is run
        as is; the padding is then empty).

        A row with a non-finite input value gets NaN outputs: TensorFlow's CPU ReLU turns NaN into 0, so such a row
        would otherwise come out as a plausible unit vector (and differ from the ONNX export, where NaN propagates)."""
        n = tf.shape(normalized)[0]
        pad = tf.zeros(tf.stack([tf.cast(tf.equal(n, 0), tf.int32), self.size, self.size, 3]), normalized.dtype)
        network = self.network(tf.concat([normalized, pad], axis=0))
        features = network["features"]
        outputs = {"embedding": tf.math.l2_normalize(features, axis=-1) if self.l2_normalize else features}
        if self.projector is not None:
            outputs["projection"] = network["projection"]
        finite = tf.reduce_all(tf.math.is_finite(normalized), axis=[1, 2, 3])[:, None]
        return {name: tf.where(finite, value[:n], tf.constant(float("nan"), value.dtype))
                for name, value in outputs.items()}

    def _map(self, fn, elems):
        spec = tf.TensorSpec([self.size, self.size, 3], tf.float32)
        return tf.map_fn(fn, elems, fn_output_signature=spec)

    def from_bytes(self, images):
        """serving_default: encoded image bytes [batch] -> outputs.

        Every image's header is read first (`image_header.check_encoded_images`) and the batch is refused, naming
        the image's index, unless each promises 1 ..= max_image_pixels pixels: nothing is decoded before that, so a
        small file promising a huge image costs microseconds, not gigabytes. Decoding then runs in a tf.data map
        whose failures are dropped and noticed (`ignore_errors`), so a corrupt image is also reported by its index."""
        with tf.control_dependencies([check_encoded_images(images, self.max_image_pixels, SIGNATURE_BYTES,
                                                           self.resized_short_side)]):
            images = tf.identity(images)
        n = tf.shape(images, out_type=tf.int64)[0]

        def one(index, data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
            return index, self._transform(image), tf.shape(image, out_type=tf.int64)[:2]

        size = self.size
        decoded = (tf.data.Dataset.from_tensor_slices((tf.range(n), images))
                   .map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                   .ignore_errors()
                   # One sentinel element, so the single batch below exists for an empty request too.
                   .concatenate(tf.data.Dataset.from_tensors(
                       (tf.constant(-1, tf.int64), tf.zeros([size, size, 3]), tf.ones([2], tf.int64))))
                   .batch(n + 1))
        indices, normalized, sizes = decoded.get_single_element()
        indices, normalized = indices[:-1], normalized[:-1]
        # The header check above already bounded these; checked again on what was decoded, in case it ever errs.
        checks = self._size_checks(sizes[:, 0], sizes[:, 1], "serving_default: a decoded image")
        survived = tf.size(indices, out_type=tf.int64)
        # Order is kept, so the first image that failed is where the surviving indices first skip one.
        failed = tf.argmax(tf.cast(tf.not_equal(tf.concat([indices, [-1]], 0), tf.range(survived + 1)), tf.int32),
                           output_type=tf.int64)
        decodable = tf.debugging.Assert(tf.equal(survived, n), [tf.strings.join([
            "serving_default: image ", tf.strings.as_string(failed), " of the batch could not be decoded: its data "
            "is corrupt or truncated (the header was readable), or a variant TensorFlow cannot decode to RGB such as an "
            "animated WebP; send a valid still JPEG / PNG / GIF / BMP / WebP file"])])
        with tf.control_dependencies([decodable, *checks]):
            return self._outputs(tf.identity(normalized))

    def from_pixels(self, pixels):
        """embed_pixels: uint8 [batch, H, W, 3] -> outputs."""
        shape = tf.shape(pixels, out_type=tf.int64)
        with tf.control_dependencies(self._size_checks(shape[1], shape[2], "embed_pixels: `pixels`")):
            pixels = tf.identity(pixels)
        return self._outputs(self._map(self._transform, pixels))

    def from_normalized(self, normalized):
        """embed_normalized: float32 [batch, S, S, 3], already preprocessed -> outputs."""
        return self._outputs(normalized)


def signature_table(preprocessing: dict, feature_dim: int, projection_dim: int | None, l2_normalize: bool) -> dict:
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
