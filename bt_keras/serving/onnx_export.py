"""Exports an encoder as an ONNX model (for ONNX Runtime and the runtimes that read ONNX), beside the SavedModel.

The graph is Keras 3's own ONNX export (`model.export(path, format="onnx")`, which converts the traced inference
function with tf2onnx; both maintained, and `pip install -e ".[onnx]"` installs them), then given the names and
contract of the SavedModel's `embed_normalized` signature:

    input   normalized  float32 [batch, S, S, 3]   already preprocessed: (pixels / 255 - mean) / std, S = image_size
    output  embedding   float32 [batch, D]         the encoder's features in inference mode (L2-normalised with
                                                   l2_normalize=True)

Decoding and resizing stay outside the ONNX graph (the caller's image library does them), as for any ONNX vision
model; the preprocessing is recorded in the model's metadata_props (`bt_keras.image_size`, `bt_keras.mean`,
`bt_keras.std`, `bt_keras.crop_fraction`, ...), so a consumer reads it from the file itself.

    >>> encoder, metadata = bt_keras.assembly.artifacts.load_encoder("runs/cifar10")
    >>> export_onnx(encoder, metadata, "models/encoder.onnx")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import tensorflow as tf

from bt_keras.files import atomic_write
from bt_keras.method import precision

INPUT_NAME = "normalized"
OUTPUT_NAME = "embedding"
METADATA_PREFIX = "bt_keras."
INSTALL_HINT = 'ONNX export needs tf2onnx and onnx: pip install -e ".[onnx]"'


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from None


def _image_size(metadata: dict, encoder: keras.Model) -> int:
    if "image_size" not in metadata:
        raise ValueError("The encoder's metadata has no image_size: export a training workdir or a folder written "
                         "by `python -m bt_keras.convert` (their encoder.json has it).")
    size = int(metadata["image_size"])
    shape = tuple(encoder.input_shape)
    if len(shape) != 4 or shape[3] not in (3, None) or len(encoder.output_shape) != 2:
        raise ValueError(f"The model maps {shape} to {encoder.output_shape}; ONNX export needs an image encoder "
                         "[batch, H, W, 3] -> [batch, D].")
    if any(dim is not None and dim != size for dim in shape[1:3]):
        raise ValueError(f"The encoder takes {shape[1]}x{shape[2]} images but its metadata says image_size={size}.")
    return size


def _rename(graph, old: str, new: str) -> None:
    """Renames a value of an ONNX graph everywhere it appears (graph inputs/outputs, node inputs/outputs)."""
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def export_onnx(encoder: keras.Model, metadata: dict, path: str | os.PathLike, *, l2_normalize: bool = False,
                opset: int | None = None, source: str | None = None) -> Path:
    """Writes `encoder` (inference mode) as an ONNX model at `path` (atomically) and returns the path.

    Args:
      encoder: an image encoder, normalised NHWC float images -> features [batch, D].
      metadata: its `encoder.json` (`load_encoder`'s second result); image_size is required, mean/std recorded.
      path: the .onnx file to write.
      l2_normalize: output unit-length embeddings, as the SavedModel export's --l2_normalize.
      opset: the ONNX opset (default: tf2onnx's).
      source: where the encoder came from, recorded in the metadata.
    """
    _require_onnx()
    import onnx

    size = _image_size(metadata, encoder)
    model = precision.float32_copy(encoder)  # Keras's ONNX export needs the float32 policy
    if l2_normalize:
        images = keras.Input(shape=(size, size, 3), name=INPUT_NAME)
        features = model(images, training=False)
        model = keras.Model(images, keras.layers.UnitNormalization(axis=-1)(features), name=f"{model.name}_l2")
    signature = [tf.TensorSpec([None, size, size, 3], tf.float32, name=INPUT_NAME)]
    path = Path(path)

    def write(tmp):
        model.export(tmp, format="onnx", input_signature=signature, opset_version=opset, verbose=False)
        proto = onnx.load(tmp)
        graph = proto.graph
        if len(graph.input) != 1 or len(graph.output) != 1:
            raise ValueError(f"The ONNX graph has {len(graph.input)} inputs and {len(graph.output)} outputs; "
                             "want one of each.")
        _rename(graph, graph.input[0].name, INPUT_NAME)
        _rename(graph, graph.output[0].name, OUTPUT_NAME)
        for value in (graph.input[0], graph.output[0]):  # tf2onnx names the free batch dimension unk__N
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
        props = {"image_size": size, "mean": metadata.get("mean"), "std": metadata.get("std"),
                 "crop_fraction": metadata.get("crop_fraction", 0.875), "l2_normalize": bool(l2_normalize),
                 "feature_dim": int(encoder.output_shape[-1]), "backbone": metadata.get("backbone"),
                 "source": source, "input": f"{INPUT_NAME}: float32 [batch, {size}, {size}, 3], (pixels / 255 - "
                                            "mean) / std", "output": f"{OUTPUT_NAME}: float32 [batch, D]",
                 "keras": keras.__version__, "tensorflow": tf.__version__}
        del proto.metadata_props[:]
        for key, value in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = METADATA_PREFIX + key, json.dumps(value)
        proto.producer_name = "bt_keras (keras.export + tf2onnx)"
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)

    atomic_write(path, write, suffix=".onnx")
    return path


def onnx_metadata(path: str | os.PathLike) -> dict:
    """The `bt_keras.*` metadata_props of an exported ONNX file, decoded (image_size, mean, std, ...)."""
    _require_onnx()
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key[len(METADATA_PREFIX):]: json.loads(p.value) for p in proto.metadata_props
            if p.key.startswith(METADATA_PREFIX)}
