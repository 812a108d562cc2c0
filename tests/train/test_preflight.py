"""Checks before a run starts (bt_keras.train.preflight, issue 15 item 7): unknown config fields and bad values, and
folder data without a decodable batch, are one clear error (one line, exit status 2 from `python -m bt_keras.train`)
before anything is written; a step that cannot be built leaves no checkpoint; small image sizes train.

The command line's error paths run in-process (tests/in_process.py: the same entry point, without a fresh
TensorFlow import each); one goes through a real `python -m bt_keras.train`, for the status and line a shell sees."""

import numpy as np
import pytest
import tensorflow as tf

from bt_keras import paths
from bt_keras.train import preflight
from bt_keras.train.trainer import Trainer
from tests.helpers import REPO, last_error_line, run_cli, tiny_config, train_command, trainer
from tests.in_process import train_in_process

pytestmark = pytest.mark.hostile


@pytest.mark.parametrize("override, expected", [
    ("--config.nope=1", "--config.nope=1: the config has no field 'nope'"),
    ("--config.image_sise=32", "Did you mean --config.image_size"),
    ("--config.knn.nope=1", "no field 'knn.nope'"),
])
def test_an_unknown_config_field_is_one_line_exit_2(tmp_path, override, expected):
    result = train_in_process(train_command(tmp_path / "run", override)[3:])
    assert result.returncode == 2
    assert expected in last_error_line(result.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_unknown_config_field_is_one_line_exit_2_in_a_fresh_process(tmp_path):
    """The in-process runs above, once as a shell runs the command: the status it gets, the one line on the quiet
    console."""
    result = run_cli(train_command(tmp_path / "run", "--config.nope=1"), timeout=120)
    assert result.returncode == 2
    assert "--config.nope=1: the config has no field 'nope'" in last_error_line(result.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, field", [
    (dict(image_size=0), "config.image_size=0"),
    (dict(image_size=1), "config.image_size=1"),
    (dict(view1=dict(crop_size=24)), "config.view1.crop_size=24"),
    (dict(checkpoint_every_epochs=0), "config.checkpoint_every_epochs=0"),
    (dict(epochs=0), "config.epochs=0"),
    (dict(keep_checkpoints=0), "config.keep_checkpoints=0"),
    (dict(projector="64-x"), "config.projector='64-x'"),
    (dict(lambd=0.0), "config.lambd=0.0"),
    (dict(backbone="resnet7"), "config.backbone='resnet7'"),
    (dict(stem="cifar_pad3"), "config.stem='cifar_pad3'"),
    (dict(image_size=100_000), "config.image_size=100000"),  # 2 x 32 x 100000^2 x 3 floats: far beyond any RAM
])
def test_bad_field_values_fail_before_anything_is_written(tmp_path, overrides, field):
    config = tiny_config()
    for name, value in overrides.items():
        if isinstance(value, dict):
            config[name].update(value)
        else:
            config[name] = value
    with pytest.raises(ValueError, match="Invalid config") as raised:
        Trainer(config, tmp_path / "run", tf.distribute.get_strategy())
    assert field in str(raised.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_every_recipe_passes_the_config_check():
    import runpy

    for recipe in sorted((REPO / "experiments").glob("*.py")):
        module = runpy.run_path(str(recipe))
        if "get_config" in module:
            assert preflight.config_problems(module["get_config"]()) == [], recipe.name


@pytest.mark.slow
def test_a_small_image_size_trains(tmp_path):
    # image_size=7 was reported to fail inside the graph; the padded stride-2 layers take any size >= 1.
    for size in (preflight.MIN_IMAGE_SIZE, 7):
        t = trainer(tmp_path / f"s{size}", image_size=size, epochs=1, steps_per_epoch=1)
        logs = t.run()
        assert np.isfinite(logs["loss"]) and t.step == 1
        assert t._step_fn.experimental_get_tracing_count() == 1  # the trace before ckpt-0 is the one that runs


def test_cli_image_size_0_is_one_line_exit_2_and_writes_nothing(tmp_path):
    result = train_in_process(train_command(tmp_path / "run", "--config.image_size=0")[3:])
    assert result.returncode == 2
    assert "config.image_size=0 must be an integer >= 2" in last_error_line(result.stderr)
    assert not (tmp_path / "run").exists()


def test_a_step_that_cannot_be_built_leaves_no_checkpoint(tmp_path, monkeypatch):
    # A mistake the field checks do not know: the first step is traced before ckpt-0 and config.json are written.
    monkeypatch.setattr(preflight, "config_problems", lambda config: [])
    config = tiny_config()
    config.view1.crop_size = 24  # the views crop 24 px for a 32 px encoder
    t = Trainer(config, tmp_path, tf.distribute.get_strategy())
    with pytest.raises(Exception):
        t.run()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
    assert not (tmp_path / paths.LOCK_FILE).exists()


def _png(rng, size=12) -> bytes:
    return tf.io.encode_png(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).numpy()


def _image_folder(root, good: int, broken: int):
    rng = np.random.default_rng(0)
    for i in range(good + broken):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        content = _png(rng)
        if i >= good:  # a PNG header, then garbage: passes the scan, fails to decode
            content = content[:16] + b"\x00garbage" * 20
        (folder / f"{i:03d}.png").write_bytes(content)
    return root


@pytest.mark.parametrize("good, broken, expected", [
    (0, 40, "fewer than config.batch_size=32 of its 40 image files decode"),
    (20, 20, "fewer than config.batch_size=32 of its 40 image files decode"),
    (10, 0, "config.batch_size=32 is larger than the 10 images"),
])
def test_folder_data_without_a_decodable_batch_is_a_clear_error(tmp_path, good, broken, expected):
    data_root = _image_folder(tmp_path / "images", good, broken)
    with pytest.raises(ValueError) as raised:
        trainer(tmp_path / "run", dataset=f"folder:{data_root}")
    assert expected in str(raised.value) and f"config.dataset='folder:{data_root}'" in str(raised.value)
    assert not (tmp_path / "run").exists()


def test_cli_folder_of_undecodable_images_is_one_line_exit_2(tmp_path):
    data_root = _image_folder(tmp_path / "images", 0, 40)
    result = train_in_process(train_command(tmp_path / "run", f"--config.dataset=folder:{data_root}")[3:])
    assert result.returncode == 2
    assert "decode" in last_error_line(result.stderr) and "StopIteration" not in result.stderr
