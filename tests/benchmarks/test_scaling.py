"""benchmarks/loss_bytes.py and train_step.py's replica columns run end to end on tiny settings, and add up.

Speed is not tested; what is: the bytes read from the traced ops equal bt_keras.method.loss_forms' count (so the
extrapolation to the paper's setting rests on measured graphs), the fit predicts the width it did not use, and the
scaling table compares each mirrored configuration with its one-device twin from the same run.
"""

import json
import os
import subprocess
import sys

import pytest
from tests.helpers import REPO

# A small reference matmul: these tests check how the numbers add up, not the numbers (benchmarks.harness).
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO), "BT_KERAS_BENCHMARK_MATMUL_SIZE": "512"}


@pytest.mark.slow
def test_loss_bytes_measures_extrapolates_and_matches_the_cost_model(tmp_path):
    from bt_keras.method import loss_forms

    output = tmp_path / "loss_bytes.json"
    cmd = [sys.executable, "-m", "benchmarks.loss_bytes", "--replicas", "4", "--batch", "64", "--dim",
           "256", "--trace-dims", "16", "32", "64", "128", "--output", str(output)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    for form, r in report["forms"].items():
        assert r["fit"]["check_predicted"] == pytest.approx(r["fit"]["check_measured"], rel=1e-9)
        assert r["extrapolated_bytes"] == pytest.approx(r["model_bytes"], rel=1e-9)
        assert r["model_bytes"] == pytest.approx(loss_forms.costs(64, 256, 4)[form].bytes_sent)
    assert report["ratio_gram_over_correlation"] == pytest.approx(
        loss_forms.costs(64, 256, 4)["gram"].bytes_sent / loss_forms.costs(64, 256, 4)["correlation"].bytes_sent)
    assert "| gram |" in proc.stdout and "| correlation |" in proc.stdout


@pytest.mark.slow  # one child process measuring three configurations of a three-layer CNN: ~25 CPU-s
def test_train_step_reports_replicas_against_one_device(tmp_path):
    """One device, 2 replicas summed by `auto` and by forced collective ops, in one run: the collective bytes each
    configuration's traced step sends, and the printed table's ratios against the one-device twin.

    The configurations share one child (--shared-child): what is checked is the accounting, which does not depend
    on the process a configuration is measured in; the small CNN keeps the traces short (sync BatchNorm, LARS and
    the loss are the same as under a ResNet)."""
    output = tmp_path / "train_step.json"
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--backbone", "small_cnn", "--image-size", "8",
           "--batch-size", "8", "--projector", "64-32", "--allocator", "default", "--shared-child",
           "--strategy", "default", "mirrored:2", "--cross-device", "auto", "collective", "--warmup", "1",
           "--steps", "1", "--output", str(output)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["config"]["name"]: r for r in json.loads(output.read_text())["results"]}
    one = results["custom/b8/p32/default"]
    auto = results["custom/b8/p32/default/mirrored:2"]
    collective = results["custom/b8/p32/default/mirrored:2/collective"]
    assert "collectives" not in one
    gradient_bytes = 4 * auto["trainable_parameters"]
    for two in (auto, collective):
        loss = two["collectives"]["loss"]
        for form in ("gram", "correlation"):
            assert loss[form]["measured_bytes"] == pytest.approx(loss[form]["model_bytes"])
        assert two["collectives"]["loss_form_used"] == "gram"  # B 8 < D 32
        # The whole step sends at least every gradient once (over 2 replicas, either way: the gradient's own size).
        assert two["collectives"]["step"]["bytes_sent"] >= gradient_bytes
        assert two["variables_gib_per_replica"] * 2**30 >= 2 * gradient_bytes  # weights and momentum
    # On CPU devices auto sums by ReductionToOneDevice: no collective all-reduce, the tensors cross by reference;
    # forced collective ops are ring all-reduces and nothing crosses devices outside them.
    assert "all_reduce" not in auto["collectives"]["step"]["by_kind"]
    assert auto["collectives"]["step"]["by_reference"]["bytes_sent"] >= gradient_bytes
    assert collective["collectives"]["step"]["by_kind"]["all_reduce"]["bytes_sent"] >= gradient_bytes
    assert collective["collectives"]["step"]["by_reference"]["bytes_sent"] < gradient_bytes / 100
    assert "Replicas against one device" in proc.stdout
    for two in (auto, collective):
        ratio = (f"{two['images_per_s'] / one['images_per_s']:.2f}, "
                 f"{two['fraction_of_matmul'] / one['fraction_of_matmul']:.2f}")
        assert ratio in proc.stdout
