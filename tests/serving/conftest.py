"""A small export both tests/serving/test_image_header.py and test_savedmodel.py read (built once per session)."""

import os

import keras
import pytest

from bt_keras.nets import backbones
from bt_keras.serving import savedmodel

EXPORTED_SIZE = 16


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A tiny encoder taking 16 x 16 images, exported with the default max_image_pixels, under umask 022."""
    keras.utils.set_random_seed(0)
    size = EXPORTED_SIZE
    encoder = backbones.resnet18(input_shape=(size, size, 3), stem="cifar", width_multiplier=1 / 16, blocks=(1, 1))
    previous = os.umask(0o022)
    try:
        version = savedmodel.export_encoder(encoder, {"image_size": size, "mean": [0.5] * 3, "std": [0.25] * 3},
                                            tmp_path_factory.mktemp("models") / "m", warmup_batch_sizes=(1,))
    finally:
        os.umask(previous)
    return version
