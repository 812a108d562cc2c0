"""Evaluating a checkpoint with its run's config.json (bt_keras.assembly.artifacts.open_encoder): a config that
disagrees with the checkpoint, or a corrupt checkpoint, is an error naming it; a config that disagrees only outside the
encoder still gives every encoder variable. On a copy of conftest.py's `finished_run`."""

import json

import keras
import numpy as np
import pytest

import bt_keras  # noqa: F401  (registers the classes saved models need)
from bt_keras import checkpoints
from bt_keras.assembly import artifacts
from tests.helpers import flip_a_byte

pytestmark = pytest.mark.hostile


def _edit_config(workdir, **fields):
    path = workdir / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("fields, expected", [
    (dict(blocks=[1]), "the checkpoint's encoder has 30 variables, the model's"),  # fewer layers: no shape error
    (dict(width_multiplier=0.25), "incompatible tensor with shape"),
])
def test_evaluating_a_checkpoint_with_a_disagreeing_config_fails(run_copy, fields, expected):
    _edit_config(run_copy, **fields)
    with pytest.raises(checkpoints.CheckpointMismatchError) as raised:
        artifacts.open_encoder(run_copy / "checkpoints" / "ckpt-6")
    assert expected in str(raised.value) and "config.json" in str(raised.value)


def test_evaluating_a_corrupt_checkpoint_names_it(run_copy):
    flip_a_byte(run_copy / "checkpoints")
    with pytest.raises(checkpoints.CorruptCheckpointError, match="ckpt-6 could not be read.*Checksum does not match"):
        artifacts.open_encoder(run_copy / "checkpoints" / "ckpt-6")


def test_evaluating_a_checkpoint_restores_every_encoder_variable(run_copy):
    # The projector is not part of the encoder: a config.json that disagrees only there still gives the encoder,
    # with exactly the weights the run saved at step 6 (its encoder.keras, written by Keras, is the reference).
    _edit_config(run_copy, projector="64-64-64")
    encoder = artifacts.open_encoder(run_copy / "checkpoints" / "ckpt-6").model
    reference = keras.models.load_model(run_copy / "encoder.keras").get_weights()
    restored = encoder.get_weights()
    assert len(restored) == len(reference) == 30
    assert all(np.array_equal(a, b) for a, b in zip(restored, reference))
