"""ViT-S/16 from KerasHub (bt_keras.nets.vit, experiments/imagenet_vit_small.py): built from a config as a
MODULE:CALLABLE backbone, the class token's features [batch, hidden], ViT-S/16's parameter count, the shipped recipe
training two steps (AdamW) with a tiny ViT and its encoder.keras reloading, and the one-line error without KerasHub.

KerasHub is an optional extra (`pip install -e ".[hub]"`): the tests that build a ViT skip without it."""

import ast
import importlib.util
import sys

import numpy as np
import pytest

from bt_keras import config as run_config
from bt_keras.assembly import builders
from bt_keras.nets import vit
from tests.helpers import REPO, TFDS_DIR, tiny_config

NAME = "bt_keras.nets.vit:vit_small_16"
TINY = {"patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}  # 32 px: 16 patches
NO_HUB = "KerasHub is not installed (the optional extra: pip install -e \".[hub]\")"


def needs_keras_hub():
    return pytest.importorskip("keras_hub", reason=NO_HUB)


def test_keras_hub_is_imported_only_when_a_vit_is_built():
    tree = ast.parse((REPO / "bt_keras" / "nets" / "vit.py").read_text())
    top_level = {alias.name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                 for alias in node.names} | {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert "keras_hub" not in top_level, top_level


def test_without_keras_hub_the_error_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # `import keras_hub` raises ImportError
    with pytest.raises(ImportError) as error:
        vit.vit_small_16(input_shape=(32, 32, 3), **TINY)
    message = str(error.value)
    assert "\n" not in message and 'pip install -e ".[hub]"' in message, message
    with pytest.raises(ValueError) as error:  # through the config: one line naming the field, as the CLI prints it
        builders.build_networks(run_config.complete(tiny_config(backbone=NAME, backbone_options=TINY, image_size=32)))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"config.backbone={NAME!r}: ") and ".[hub]" in message, message


def test_a_tiny_vit_builds_from_a_config_and_gives_the_class_token():
    needs_keras_hub()
    import keras

    config = run_config.complete(tiny_config(backbone=NAME, backbone_options=TINY, image_size=32, projector="32-32"))
    encoder, projector = builders.build_networks(config)
    assert encoder.output_shape == (None, 32)
    assert not any(isinstance(layer, keras.layers.BatchNormalization)  # LayerNorm only: nothing to synchronise
                   for layer in encoder._flatten_layers(include_self=False))
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("float32")
    features = keras.ops.convert_to_numpy(encoder(images))
    tokens = keras.Model(encoder.input, encoder.get_layer("class_token").input)(images)
    assert tokens.shape == (4, 1 + 16, 32)  # the class token, then 4 x 4 patches of 8 px
    np.testing.assert_array_equal(features, keras.ops.convert_to_numpy(tokens)[:, 0])
    assert projector(features).shape == (4, 32)


def test_the_default_is_vit_s16_with_timms_parameter_count():
    needs_keras_hub()
    encoder = vit.vit_small_16()
    assert encoder.input_shape == (None, 224, 224, 3) and encoder.output_shape == (None, 384)
    # timm's vit_small_patch16_224 has 22,050,664 parameters with its 1000-class head (384 x 1000 + 1000 = 385,000):
    # 21,665,664 without it, which is what solo-learn's vit_small (num_classes=0) trains. Patch embedding 295,296,
    # class token 384, positions 197 x 384 = 75,648, 12 blocks x 1,774,464, final LayerNorm 768.
    assert encoder.count_params() == 21_665_664


@pytest.mark.slow
def test_the_shipped_recipe_trains_two_steps_with_a_tiny_vit_and_its_encoder_reloads(tmp_path):
    needs_keras_hub()
    if not (TFDS_DIR / "cifar10").is_dir():
        pytest.skip(f"no CIFAR-10 at {TFDS_DIR}")
    import keras
    import tensorflow as tf

    from bt_keras.assembly import artifacts
    from bt_keras.train.trainer import Trainer

    spec = importlib.util.spec_from_file_location("imagenet_vit_small", REPO / "experiments" / "imagenet_vit_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.backbone == NAME and config.optimizer.name == "adamw"
    config.dataset, config.data_dir, config.download, config.image_size = "tfds:cifar10", str(TFDS_DIR), False, 32
    config.backbone_options = TINY
    config.projector = "64-64-64"
    config.batch_size, config.epochs, config.steps_per_epoch = 16, 1, 2
    config.knn.every_epochs, config.knn.baselines = 0, False  # as tests/test_recipes.py trains the other recipes
    config.picture_every_epochs, config.report = 0, False  # no figures: none is read here
    trainer = Trainer(config, tmp_path / "run", tf.distribute.get_strategy())
    logs = trainer.run()
    assert trainer.step == 2 and np.isfinite(logs["loss"]), logs
    assert isinstance(trainer.model.optimizer, keras.optimizers.AdamW)
    encoder, metadata = artifacts.load_encoder(tmp_path / "run")
    assert encoder.output_shape == (None, 32) and metadata["backbone"] == NAME
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(encoder(images)),
                               keras.ops.convert_to_numpy(trainer.model.encoder(images)), rtol=1e-5, atol=1e-5)


def test_a_mixed_precision_vit_saves_a_float32_encoder_that_reloads(tmp_path):
    """What a --mixed_precision run saves: KerasHub 0.32's ViTPatchingAndEmbedding cannot be rebuilt from its own
    get_config (num_patches, num_positions), so precision.float32_copy rebuilds the nested ViTBackbone whole."""
    needs_keras_hub()
    from bt_keras.assembly import artifacts
    from bt_keras.method import precision

    with precision.policy_scope("mixed_float16"):
        encoder = vit.vit_small_16(input_shape=(32, 32, 3), **TINY)
    copy = precision.float32_copy(encoder)
    assert {layer.dtype_policy.name for layer in copy._flatten_layers(include_self=False)} == {"float32"}
    artifacts.save_encoder(copy, tmp_path, {"image_size": 32, "mean": [0, 0, 0], "std": [1, 1, 1]})
    loaded, _ = artifacts.load_encoder(tmp_path)
    images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(images)), np.asarray(copy(images)), rtol=1e-6, atol=1e-6)
