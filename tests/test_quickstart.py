"""The README's main job, run exactly as a new user runs it: the quickstart trains, beats its own random
initialisation on kNN, writes what it promises, and resumes when run again."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs

REPO = Path(__file__).resolve().parents[1]


def readme_train_command():
    readme = (REPO / "README.md").read_text()
    line = next(c for c in re.findall(r"```bash\n(.*?)```", readme, re.S) if "bt_keras.train" in c).strip()
    return line.split("&&")[-1].strip().split()


def run(args, workdir):
    args = [a if not a.startswith("--workdir=") else f"--workdir={workdir}" for a in args]
    assert args[:3] == ["python", "-m", "bt_keras.train"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, *args[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_quickstart_learns_and_resumes(tmp_path):
    command = readme_train_command()
    start = time.perf_counter()
    result = run(command, tmp_path)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    knn = [line["knn_top1"] for line in lines if "knn_top1" in line]
    print(f"quickstart: {elapsed:.0f} s; kNN top-1 from {knn[0]:.3f} (random init) to {knn[-1]:.3f}")
    assert len(knn) >= 3
    assert knn[-1] > knn[0] + 0.1, knn  # learning, not just running
    assert "Finished at step 220" in result.stdout
    for name in ("encoder.keras", "encoder.json", "checkpoints/checkpoint", "cross_correlation.png"):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # Running again with one more epoch resumes at step 220 rather than starting over.
    again = run(command + ["--config.epochs=21"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Finished at step 231" in again.stdout
