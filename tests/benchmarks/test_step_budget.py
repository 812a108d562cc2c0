"""benchmarks/step_budget.py runs end to end on a tiny configuration, and its report adds up.

Speed itself is not tested (benchmarks are not timed tests); what is checked is that every part ran, that the sums
and ratios are computed from the parts, and that the optimizer's byte count matches the model's parameter count
counted independently here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # end-to-end runs


@pytest.fixture(scope="module")
def budget(tmp_path_factory):
    output = tmp_path_factory.mktemp("budget") / "step_budget.json"
    # The three-layer CNN: every part (encoder, projector, loss, LARS, the whole step) is traced and timed as for a
    # ResNet, at a fraction of the tracing time; the accounting is what is checked.
    cmd = [sys.executable, "-m", "benchmarks.step_budget", "--preset", "cifar", "--backbone", "small_cnn",
           "--image-size", "16", "--batch-size", "4", "--projector", "64-32", "--repeats", "1", "--output", str(output)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "BT_KERAS_BENCHMARK_MATMUL_SIZE": "512",  # a small reference
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(output.read_text()), proc.stdout


def test_step_budget_reports_every_part_and_adds_them_up(budget):
    result, stdout = budget
    parts = result["parts"]
    assert list(parts) == ["encoder", "projector", "loss", "optimizer"]
    assert all(p["s"] > 0 for p in parts.values()) and result["step"]["s"] > 0
    assert result["sum_of_parts_s"] == pytest.approx(sum(p["s"] for p in parts.values()))
    assert result["ceiling_fraction_of_matmul"] == pytest.approx(
        result["step"]["gflop"] / result["sum_of_parts_s"] / result["matmul_gflops"])
    # The parts' FLOPs are those harness.count_flops counts for the whole step (as train_step.py does).
    assert sum(p["gflop"] for p in parts.values()) == pytest.approx(result["step"]["gflop"])
    assert result["skinny_matmul"]["shape"] == [8, 32, 32]
    for line in ("| encoder", "| projector", "| sum of parts", "| train_step", "skinny matmul", "GB moved"):
        assert line in stdout


def test_step_budget_counts_the_optimizer_bytes_from_the_parameters(budget):
    from bt_keras.nets import backbones, heads

    result, _ = budget
    encoder = backbones.small_cnn(input_shape=(16, 16, 3))
    projector = heads.projector("64-32")
    projector.build((None, encoder.output_shape[-1]))
    trainable = sum(int(np.prod(v.shape)) for v in encoder.trainable_variables + projector.trainable_variables)
    assert result["optimizer"]["parameters"] == trainable
    assert result["optimizer"]["bytes_moved"] == 7 * 4 * trainable  # float32: read w, g; read w, g, m, write w, m
