"""Artefacts written before the subpackage layout still load and serve (tests/fixtures/pre_layout, MANIFEST.json says
how they were made): the Keras files name their classes by registered name (`bt_keras>BarlowTwins`, ...), a checkpoint
is read with its run's config.json, and an export's metadata names `bt_keras.augment.eval_transform`."""

import importlib
import json

import numpy as np
import pytest
import tensorflow as tf

from bt_keras.assembly import artifacts
from bt_keras.augment.eval_transforms import eval_transform
from tests.helpers import REPO

FIXTURE = REPO / "tests" / "fixtures" / "pre_layout"


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)


def test_every_encoder_form_of_the_old_run_opens_and_agrees(images):
    run = FIXTURE / "run"
    keras_file = artifacts.open_encoder(run)
    checkpoint = artifacts.open_encoder(run / "checkpoints" / "ckpt-2")
    export = artifacts.open_encoder(FIXTURE / "export")
    assert (keras_file.kind, checkpoint.kind, export.kind) == ("keras", "keras", "savedmodel")
    reference = np.asarray(keras_file.model(images, training=False))
    assert reference.shape == (3, 16) and np.isfinite(reference).all()
    np.testing.assert_array_equal(np.asarray(checkpoint.model(images, training=False)), reference)
    np.testing.assert_allclose(np.asarray(export.model(images, training=False)), reference, atol=1e-5)
    assert checkpoint.metadata["mean"] == keras_file.metadata["mean"]  # the digits' statistics, without the data
    encoder, projector, _ = artifacts.load_with_projector(run / "barlow_twins.keras")
    np.testing.assert_allclose(encoder(images).numpy(), reference, atol=1e-6)
    assert projector(encoder(images)).shape == (3, 64)


def test_the_old_export_serves_and_its_transform_name_resolves():
    loaded = tf.saved_model.load(str(FIXTURE / "export" / "1"))
    image = tf.io.encode_png(tf.cast(tf.random.uniform([40, 50, 3], 0, 255, seed=1), tf.uint8))
    outputs = loaded.signatures["serving_default"](images=tf.stack([image, image]))
    assert outputs["embedding"].shape == (2, 16) and np.isfinite(outputs["embedding"].numpy()).all()
    metadata = json.loads((FIXTURE / "export" / "1" / "assets.extra" / "bt_keras.json").read_text())
    module, _, name = metadata["preprocessing"]["transform"].rpartition(".")
    assert (module, name) == ("bt_keras.augment", "eval_transform")
    assert getattr(importlib.import_module(module), name) is eval_transform
