"""The training report (bt_keras.train.figures, `python -m bt_keras.report`): the figure is written with all its panels,
the C it shows is the C the picture callback logged (and the model's own C), the curves are metrics.jsonl's."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from bt_keras import paths
from bt_keras.train import callbacks, figures
from tests.helpers import REPO, tiny_model, view_pair



def tiny_workdir(tmp_path: Path):
    """A workdir as a run leaves it: metrics.jsonl, config.json, and C of a tiny model from the picture callback."""
    model = tiny_model(projector="16-16")
    views = tuple(tf.constant(v) for v in view_pair(32))
    picture = callbacks.CrossCorrelationPicture(views, tmp_path)
    picture.set_model(model)
    picture.on_epoch_end(0, {"step": 7})
    records = [{"kind": "start", "step": 0, "knn_top1": 0.5}]
    records += [{"kind": "train", "step": s, "loss": 100.0 / s, "on_diagonal": 10.0 / s, "off_diagonal": 900.0 / s,
                 "lr": 0.01 * s, "embedding_std": 0.2} for s in range(1, 8)]
    records += [{"kind": "epoch", "step": 7, "loss": 14.3, "lr": 0.07, "knn_top1": 0.75, "epoch": 1}]
    (tmp_path / paths.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / paths.CONFIG_FILE).write_text(json.dumps({"name": "tiny", "dataset": "digits",
                                                              "backbone": "resnet18", "projector": "16-16"}))
    c = model.compute_loss_terms(*views, training=False)["cross_correlation"].numpy()
    return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(folder, C): tiny_workdir built once for the module (a model, its C and the picture callback's files). Read
    only; a test that writes to its workdir takes `workdir`, a copy of its own."""
    folder = tmp_path_factory.mktemp("tiny_run")
    return folder, tiny_workdir(folder)


@pytest.fixture
def workdir(tiny_run, tmp_path):
    """A copy of tiny_run's folder of this test's own."""
    folder = tmp_path / "run"
    shutil.copytree(tiny_run[0], folder)
    return folder


@pytest.mark.slow
def test_report_has_every_panel_and_shows_the_logged_c(tiny_run, workdir):
    c = tiny_run[1]
    logged = np.load(workdir / paths.CORRELATION_DATA)
    np.testing.assert_array_equal(logged, c)  # 16 x 16: shown whole
    assert json.loads((workdir / paths.CORRELATION_INFO).read_text()) == {"step": 7, "dim": 16, "shown": 16}

    path = figures.write_report(workdir)
    assert path == workdir / paths.REPORT_PICTURE and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fig = figures.figure(workdir)
    axes = {ax.get_label(): ax for ax in fig.axes}
    assert set(figures.PANELS) <= set(axes)
    heat_map = axes["cross-correlation C"].images[0]
    np.testing.assert_array_equal(np.asarray(heat_map.get_array()), c)
    assert heat_map.get_clim() == (-1.0, 1.0) and heat_map.colorbar is not None

    data = figures.figure_data(workdir)
    np.testing.assert_array_equal(data["diagonal of C"], np.diagonal(c))
    off = c[~np.eye(16, dtype=bool)]
    np.testing.assert_array_equal(np.sort(data["off-diagonal of C"]), np.sort(off))
    diag_counts = sum(p.get_height() for p in axes["diagonal of C"].patches)
    off_counts = sum(p.get_height() for p in axes["off-diagonal of C"].patches)
    assert diag_counts == 16 and off_counts == 16 * 15  # every entry in a bin (all within [-1, 1])
    steps, loss = data["loss"]
    np.testing.assert_array_equal(steps, np.arange(1, 8))
    np.testing.assert_allclose(loss, 100.0 / np.arange(1, 8))
    np.testing.assert_allclose(axes["loss"].lines[0].get_ydata(), loss)
    assert data["kNN accuracy"]["points"] == [(0, 0.5), (7, 0.75)]


def test_the_picture_of_c_has_a_colour_bar(tiny_run):
    folder, _ = tiny_run
    picture = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(folder / paths.CORRELATION_PICTURE))
    assert picture.shape[0] > 300 and picture.shape[1] > picture.shape[0]  # axes + colour bar, not a 16 x 16 bitmap
    rgb = figures.correlation_picture(np.eye(4), step=3)
    assert rgb.dtype == np.uint8 and rgb.shape == picture.shape[:2] + (3,)


def test_final_metrics_are_the_last_epoch_with_the_latest_knn(tiny_run):
    folder, _ = tiny_run
    assert figures.final_metrics(folder) == {"step": 7, "loss": 14.3, "lr": 0.07, "knn_top1": 0.75, "epoch": 1}


def test_report_command(workdir):
    (workdir / paths.REPORT_PICTURE).unlink(missing_ok=True)
    # -X importtime lists every module the command imports (on stderr): a report reads files and draws, so neither
    # TensorFlow nor Keras may load (bt_keras.paths holds the file names).
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "bt_keras.report", str(workdir)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (workdir / paths.REPORT_PICTURE).exists() and "Report:" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "matplotlib" in imported and "bt_keras.train.figures" in imported  # the listing is complete
    assert not {m for m in imported if m.split(".")[0] in ("tensorflow", "keras")}, sorted(imported)[:20]


def test_report_command_on_a_folder_that_is_no_run(tmp_path, capsys):
    from bt_keras.cli import report

    assert report.main([str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    assert report.main([]) == 2 and "usage:" in capsys.readouterr().err


@pytest.mark.hostile
def test_a_hand_edited_metrics_file_is_left_out_with_a_warning_not_a_traceback(workdir, caplog):
    """A record with "step": "x" (or a value that is no number) made `report` and the rerun of a finished run end in a
    TypeError; such records are now left out, counted in one warning."""
    metrics = workdir / paths.METRICS_FILE
    with metrics.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": "epoch", "step": "x", "loss": 1.0}) + "\n")
        f.write(json.dumps({"kind": "epoch", "step": 10**6, "loss": "NaN?", "epoch": 99}) + "\n")
    with caplog.at_level(logging.WARNING):
        final = figures.final_metrics(workdir)
        path = figures.write_report(workdir)
    assert path.exists() and final["step"] == 10**6 and "loss" not in final and final["epoch"] == 99
    assert "2 record(s)" in caplog.text
