"""The quickstart's backbone (`backbones.small_cnn`): registered, 2048-d at 32 px, the library's BatchNorm, clear
errors for ResNet-only options and variable image sizes."""

import numpy as np
import pytest

from bt_keras.nets import backbones


def test_small_cnn_is_registered_with_pooled_or_flattened_features():
    assert backbones.get_backbone("small_cnn", input_shape=(32, 32, 3)).output_shape == (None, 128)
    model = backbones.get_backbone("small_cnn", input_shape=(32, 32, 3), stem="cifar", pooling="flatten")
    assert model.output_shape == (None, 4 * 4 * 128)
    norms = [layer for layer in model.layers if "bn" in layer.name]
    assert len(norms) == 3 and all(isinstance(layer, backbones.BatchNormalization) for layer in norms)
    half = backbones.small_cnn(input_shape=(32, 32, 3), width_multiplier=0.5, pooling="flatten")
    assert half.output_shape == (None, 4 * 4 * 64)
    features = model(np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32"), training=False)
    assert np.all(np.isfinite(features)) and float(np.min(features)) >= 0.0  # max-pooled ReLUs


def test_small_cnn_builds_from_a_config_as_the_trainer_does():
    """builders.build_model passes the ResNet options (stem, zero_init_residual) and config.backbone_options."""
    import ml_collections

    from bt_keras import config as config_lib
    from bt_keras.assembly import builders

    config = config_lib.base_config()
    config.dataset, config.image_size, config.backbone, config.projector = "digits", 32, "small_cnn", "64-64"
    assert builders.build_model(config).encoder.output_shape == (None, 128)
    config.backbone_options = ml_collections.ConfigDict({"pooling": "flatten"})
    assert builders.build_model(config).encoder.output_shape == (None, 4 * 4 * 128)
    config.backbone = "resnet18"  # an option resnet18 does not take: one line naming it
    with pytest.raises(ValueError, match="takes no option pooling"):
        builders.build_model(config)


@pytest.mark.parametrize("kwargs, message", [(dict(blocks=(1, 1)), "blocks"), (dict(input_shape=(None, None, 3), pooling="flatten"),
                                              "fixed image size"), (dict(width_multiplier=0.0), "width_multiplier"),
                                             (dict(pooling="max"), "pooling")])
def test_small_cnn_rejects_what_it_cannot_build(kwargs, message):
    with pytest.raises(ValueError, match=message):
        backbones.small_cnn(**kwargs)
