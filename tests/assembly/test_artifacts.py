"""Evaluating a checkpoint with its run's config.json (bt_keras.assembly.artifacts.open_encoder): a config that
disagrees with the checkpoint, or a corrupt checkpoint, is an error naming it; a config that disagrees only outside the
encoder still gives every encoder variable. On a copy of conftest.py's `finished_run`."""

import json
import sys

import keras
import numpy as np
import pytest

import bt_keras  # noqa: F401  (registers the classes saved models need)
from bt_keras import checkpoints
from bt_keras.assembly import artifacts
from tests.helpers import flip_a_byte, run_cli

pytestmark = pytest.mark.hostile


def _edit_config(workdir, **fields):
    path = workdir / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


def _forget_config_records(workdir):
    """Makes the run's checkpoints look like those of a version that did not record their config."""
    for record in (workdir / "checkpoints").glob("ckpt-*.config.json"):
        record.unlink()


@pytest.mark.parametrize("fields, expected", [
    (dict(blocks=[1]), "the checkpoint's encoder has 30 variables, the model's"),  # fewer layers: no shape error
    (dict(width_multiplier=0.25), "incompatible tensor with shape"),
])
def test_evaluating_an_unrecorded_checkpoint_with_a_disagreeing_config_fails(run_copy, fields, expected):
    _forget_config_records(run_copy)  # no record to compare with: the restore itself finds the mismatch
    _edit_config(run_copy, **fields)
    with pytest.raises(checkpoints.CheckpointMismatchError) as raised:
        artifacts.open_encoder(run_copy / "checkpoints" / "ckpt-6")
    assert expected in str(raised.value) and "config.json" in str(raised.value)


@pytest.mark.parametrize("fields, expected", [
    (dict(image_size=48), "image_size=32 (config.json has 48)"),  # would restore fine and give wrong numbers
    (dict(backbone="resnet34"), "backbone='resnet18' (config.json has 'resnet34')"),
    (dict(width_multiplier=0.25, blocks=[1]), "width_multiplier=0.125 (config.json has 0.25), blocks=[1, 1] "
                                              "(config.json has [1])"),
    (dict(dataset="tfds:cifar10"), "dataset='cluttered_digits' (config.json has 'tfds:cifar10')"),  # other mean and std
])
def test_evaluating_a_checkpoint_whose_config_json_was_edited_names_the_field_before_building(
        run_copy, monkeypatch, fields, expected):
    """Each checkpoint records the config that wrote it; evaluating it with a config.json edited since then is one
    line naming the field, both values and the fix, before any network is built or restored."""
    assert sorted(p.name for p in (run_copy / "checkpoints").glob("*.config.json")) == [
        "ckpt-0.config.json", "ckpt-3.config.json", "ckpt-6.config.json"]
    _edit_config(run_copy, **fields)
    monkeypatch.setattr(artifacts.builders, "build_networks", lambda config: pytest.fail("built a network"))
    with pytest.raises(checkpoints.CheckpointMismatchError) as raised:
        artifacts.open_encoder(run_copy / "checkpoints" / "ckpt-6")
    message = str(raised.value)
    assert expected in message and "ckpt-6" in message and "\n" not in message, message
    assert "Put those values back in" in message and "ckpt-6.config.json" in message


@pytest.mark.slow
def test_evaluate_cli_on_an_edited_config_json_is_one_line_without_tensorflow_warnings(run_copy):
    _edit_config(run_copy, image_size=48)
    result = run_cli([sys.executable, "-m", "bt_keras.evaluate.knn", f"--encoder={run_copy / 'checkpoints' / 'ckpt-6'}",
                      "--dataset=digits", "--limit_train=64", "--limit_test=64", "--verbose=0"], timeout=180)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "image_size=32 (config.json has 48)" in lines[-1], result.stderr[-3000:]
    assert not [line for line in lines if "WARNING" in line or "Traceback" in line], result.stderr[-3000:]


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
