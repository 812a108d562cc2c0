"""A `folder:` dataset with files that do not decode (bt_keras.data.image_check): each one named once with its reason
and counted, left out before the seeded shuffle (steps per epoch of the good files, a stopped and resumed run equal
to the uninterrupted one bit for bit), the check kept in the workdir, and the data_check command (`bt-keras-data-check`,
`python -m bt_keras.data_check`).

The bad files: a truncated JPEG, a JPEG whose middle is overwritten with garbage (no marker bytes in it, so
TensorFlow decodes it without an error and only libjpeg's "Corrupt JPEG data" warning tells), a file holding only a
JPEG header, and a text file named .jpg."""

import os
import signal
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from bt_keras import augment, data
from bt_keras.cli import data_check
from bt_keras.data import image_check, sources
from bt_keras.train.trainer import Interrupted
from tests.helpers import installed_script, run_cli, trainer

pytestmark = pytest.mark.hostile

GOOD = 40  # 20 per class, PNG and JPEG in turn
BATCH = 6  # 40 // 6 = 6 steps per epoch; counting the 3 bad files with an image header would give 43 // 6 = 7
BAD = {  # file -> a word its reason must hold
    "cat/truncated.jpg": "truncated",
    "cat/garbage_inside.jpg": "Corrupt JPEG data",
    "dog/header_only.jpg": "truncated",
    "dog/not_an_image.jpg": "not a JPEG or PNG",
}


def _picture(rng, size: int) -> np.ndarray:
    """A smooth random picture (a 4x4 grid upsampled): it compresses like a photograph, not like noise."""
    coarse = rng.random((1, 4, 4, 3)) * 255
    return tf.cast(tf.image.resize(coarse, [size, size])[0], tf.uint8).numpy()


def _garbage_inside(jpeg: bytes, rng) -> bytes:
    """`jpeg` with 200 bytes of its compressed data overwritten by random bytes holding no 0xFF (no marker)."""
    noise = rng.integers(0, 255, 200, dtype=np.uint8).tobytes()  # 0..254
    middle = len(jpeg) // 2
    return jpeg[:middle] + noise + jpeg[middle + 200:]


def write_folder(root: Path) -> Path:
    """root/{cat,dog}/: GOOD small PNGs and JPEGs, and the BAD files."""
    rng = np.random.default_rng(0)
    for i in range(GOOD):
        folder = root / ("cat", "dog")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        picture = _picture(rng, 20 + i % 7)
        encoded = tf.io.encode_png(picture) if i % 4 < 2 else tf.io.encode_jpeg(picture, quality=90)
        (folder / f"{i:02d}.{'png' if i % 4 < 2 else 'jpg'}").write_bytes(encoded.numpy())
    large = tf.io.encode_jpeg(_picture(rng, 64), quality=95).numpy()
    (root / "cat" / "truncated.jpg").write_bytes(large[: len(large) // 2])
    # Garbage that libjpeg notices (a seed of its own): ~7 in 10 random overwrites here leave the decoder out of step
    # at the end ("Corrupt JPEG data: N extraneous bytes"); the others fall back into step and decode silently.
    (root / "cat" / "garbage_inside.jpg").write_bytes(_garbage_inside(large, np.random.default_rng(0)))
    (root / "dog" / "header_only.jpg").write_bytes(large[:300])
    (root / "dog" / "not_an_image.jpg").write_text("a text file with an image's name")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("bad_images") / "pets")


def listed(workdir) -> dict[str, str]:
    """{path: reason} of workdir/bad_images.txt, checking that no path is listed twice."""
    lines = (Path(workdir) / image_check.BAD_IMAGES_FILE).read_text().splitlines()
    entries = [line.split("\t", 1) for line in lines]
    assert all(len(entry) == 2 and entry[1] for entry in entries), lines
    assert len({path for path, _ in entries}) == len(entries), lines
    return dict(entries)


def expected_paths(folder) -> set[str]:
    return {str(folder / name) for name in BAD}


def test_the_garbage_jpeg_decodes_without_an_error(folder):
    """The mid-file garbage case is the one only libjpeg's warning reveals: TensorFlow returns an image for it."""
    image = tf.io.decode_image((folder / "cat" / "garbage_inside.jpg").read_bytes(), channels=3)
    assert image.shape == (64, 64, 3)


class _StopAt(keras.callbacks.Callback):
    """Sends this process SIGTERM after global step `step`: the trainer finishes it, saves it and stops."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if logs["step"] == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _weights(workdir) -> list[np.ndarray]:
    return keras.models.load_model(Path(workdir) / "barlow_twins.keras").get_weights()


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory):
    """Two-epoch runs on the folder, shared by the tests that read them: `whole` uninterrupted, `stopped` stopped by
    SIGTERM after step 8 (in the second epoch) and resumed to the end. Returns the workdirs and the whole run's steps
    per epoch."""
    root = tmp_path_factory.mktemp("runs")
    overrides = dict(dataset=f"folder:{folder}", batch_size=BATCH, steps_per_epoch=None, epochs=2, seed=5)
    whole = trainer(root / "whole", **overrides)
    whole.run()
    with pytest.raises(Interrupted):
        trainer(root / "stopped", **overrides).run([_StopAt(8)])
    trainer(root / "stopped", **overrides).run()
    return dict(whole=root / "whole", stopped=root / "stopped", whole_steps=whole.steps_per_epoch)


@pytest.mark.slow
def test_bad_files_are_counted_and_left_out_of_the_split_and_the_steps(folder, runs):
    info = data.dataset_info(f"folder:{folder}")
    assert info.splits == {"train": GOOD}
    assert info.bad_files == {"train": len(BAD)}
    assert runs["whole_steps"] == GOOD // BATCH


@pytest.mark.slow
def test_the_stream_is_a_function_of_seed_and_step_with_bad_files_present(folder):
    """Batch k of a stream started at batch k equals batch k of the stream from the start (what resume relies on)."""
    def batches(start, count):
        ds = data.pretrain_dataset(f"folder:{folder}", global_batch_size=BATCH, seed=3, start_batch=start,
                                   views=augment.imagenet_views(16))
        return [b[0].numpy() for b in ds.take(count)]

    from_start = batches(0, 9)
    for k in (4, 8):  # inside the first epoch, and in the second
        np.testing.assert_array_equal(batches(k, 1)[0], from_start[k])


@pytest.mark.slow
def test_a_run_names_each_bad_file_once_with_its_reason_in_the_workdir(folder, runs):
    bad = listed(runs["whole"])
    assert set(bad) == expected_paths(folder)
    for name, word in BAD.items():
        assert word in bad[str(folder / name)], (name, bad[str(folder / name)])


@pytest.mark.slow
def test_a_resumed_start_reuses_the_check_kept_in_the_workdir(folder, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    trainer(workdir, dataset=f"folder:{folder}", batch_size=BATCH, steps_per_epoch=None, epochs=1).close()
    assert list((workdir / image_check.CHECKS_DIR).glob("*.json"))
    monkeypatch.setattr(image_check, "_MEMORY", {})  # a new process: only the workdir remembers
    sources._scan_folder_checked.cache_clear()

    def no_scan(*args, **kwargs):
        raise AssertionError("the folder was decoded again")

    monkeypatch.setattr(image_check, "scan", no_scan)
    t = trainer(workdir, dataset=f"folder:{folder}", batch_size=BATCH, steps_per_epoch=None, epochs=1)
    t.close()
    assert t.steps_per_epoch == GOOD // BATCH and set(listed(workdir)) == expected_paths(folder)


@pytest.mark.slow
def test_a_run_stopped_and_resumed_equals_the_uninterrupted_run_bit_for_bit(runs):
    whole, resumed = _weights(runs["whole"]), _weights(runs["stopped"])
    difference = max(float(np.abs(a - b).max()) for a, b in zip(whole, resumed))
    print(f"max |w_resumed - w_uninterrupted| = {difference}")
    assert difference == 0.0


@pytest.mark.slow
def test_data_check_command_lists_the_bad_files_and_exits_1(folder, tmp_path):
    # The installed bt-keras-data-check script, as a process: its exit status (the other cases run it in-process).
    result = run_cli([installed_script("bt-keras-data-check"), str(folder), f"--workdir={tmp_path / 'w'}"])
    assert result.returncode == 1, result.stderr[-3000:]
    summary, *lines = result.stdout.splitlines()
    assert f"{len(BAD)} of {GOOD + len(BAD)} image files do not decode" in summary
    entries = dict(line.split("\t", 1) for line in lines)
    assert len(lines) == len(entries) == len(BAD) and set(entries) == expected_paths(folder)
    assert listed(tmp_path / "w") == entries  # --workdir: the list a run there would write


def test_data_check_command_exits_0_on_a_clean_folder_and_2_on_a_missing_one(folder, tmp_path, capsys):
    """In-process (`bt_keras.cli.data_check.main`, whose return value the command exits with): the exit status and
    the console lines, without a TensorFlow start-up per case; the command as a process is the test above."""
    clean = tmp_path / "clean"
    for name in ("cat", "dog"):
        (clean / name).mkdir(parents=True)
        for path in sorted((folder / name).glob("[0-9]*")):
            (clean / name / path.name).write_bytes(path.read_bytes())
    assert data_check.main([f"folder:{clean}"]) == 0
    out, err = capsys.readouterr()
    assert f"all {GOOD} image files decode" in out, err[-3000:]
    assert data_check.main([str(tmp_path / "nowhere")]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].startswith("ERROR: ") and "Traceback" not in err, err[-3000:]
