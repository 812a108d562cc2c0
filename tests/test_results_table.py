"""experiments/results_table.py turns per-checkpoint evaluation JSONs into the RESULTS.md table."""

import json
import subprocess
import sys
from tests.helpers import REPO


def _write(path, protocol, top1, top5):
    path.write_text(json.dumps({"protocol": protocol, "top1": top1, "top5": top5}))


def test_table_rows_per_step_with_images_seen(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"batch_size": 256}))
    _write(tmp_path / "eval_knn_tfds_cifar10_step0.json", "knn", 0.293, 0.81)
    _write(tmp_path / "eval_linear_features_tfds_cifar10_step0.json", "linear_features", 0.371, 0.855)
    _write(tmp_path / "eval_knn_tfds_cifar10_step100.json", "knn", 0.4, 0.9)
    out = subprocess.run([sys.executable, str(REPO / "experiments" / "results_table.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[2] == "| 0 (random init) | 0 | 29.3 | 81.0 | 37.1 | 85.5 |"
    assert out[3] == "| 100 | 25,600 | 40.0 | 90.0 | - | - |"


def test_no_results_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "results_table.py"), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "No eval_*_step*.json" in result.stderr
