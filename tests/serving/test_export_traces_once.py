"""The SavedModel export runs the network through one function that all three signatures call: an export traces the
encoder once and saved_model.pb holds its graph once (it used to trace it in each signature, twice over, and store
three copies: 2-3x the export's CPU time and a larger saved_model.pb for a real backbone)."""

import keras
import pytest
from tensorflow.core.protobuf import saved_model_pb2

from bt_keras.serving import savedmodel

pytestmark = pytest.mark.slow

SIZE = 8


class CountedIdentity(keras.layers.Layer):
    """Passes its input through and counts how often its `call` runs: once per trace of a graph holding it."""

    calls = 0

    def call(self, inputs):
        CountedIdentity.calls += 1
        return inputs


def library_ops(version, op_type: str) -> int:
    """How many `op_type` nodes the functions of the SavedModel's function library hold together."""
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((version / "saved_model.pb").read_bytes())
    library = proto.meta_graphs[0].graph_def.library
    return sum(node.op == op_type for function in library.function for node in function.node_def)


def test_export_traces_the_network_once_and_stores_it_once(tmp_path):
    """An encoder with one convolution and a projector with one Dense layer: the export calls the encoder's layers
    once (one trace), and the saved function library holds one Conv2D and one MatMul. (That the signatures serve the
    encoder's outputs is test_savedmodel.py's test_fresh_process_signatures_equal_the_keras_encoder.)"""
    keras.utils.set_random_seed(0)
    images = keras.Input((SIZE, SIZE, 3))
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(CountedIdentity()(images)))
    encoder = keras.Model(images, features)
    projector = keras.Sequential([keras.layers.Dense(5)])
    projector.build(encoder.output_shape)

    before = CountedIdentity.calls
    version = savedmodel.export_encoder(encoder, {"image_size": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3},
                                        tmp_path / "models", projector=projector, warmup_batch_sizes=(1,))
    assert CountedIdentity.calls - before == 1
    assert library_ops(version, "Conv2D") == 1
    assert library_ops(version, "MatMul") == 1
