"""The README's main job, run exactly as a new user runs it: the quickstart trains to a kNN accuracy far above chance
and at least its random initialisation's, prints its baseline table, writes what it promises (the report too), and
resumes when run again; a rerun of the finished run prints its final metrics."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # end-to-end runs


def readme_train_command():
    readme = (REPO / "README.md").read_text()
    line = next(c for c in re.findall(r"```bash\n(.*?)```", readme, re.S) if "bt_keras.train" in c).strip()
    return line.split("&&")[-1].strip().split()


def run(args, workdir):
    args = [a if not a.startswith("--workdir=") else f"--workdir={workdir}" for a in args]
    assert args[:3] == ["python", "-m", "bt_keras.train"]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a new user runs it
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
    # Non-flaky bounds: measured 0.975 from 0.925 at random init (raw pixels 0.972; README's benchmark line, goal
    # >= 0.95): at least 0.95 and 2.5 points (9 of the 360 test digits) above random init.
    assert knn[-1] >= 0.95 and knn[-1] >= knn[0] + 0.025, knn
    table = json.loads((tmp_path / "baselines.json").read_text())["rows"]
    assert [r["name"] for r in table] == ["random initialisation", "raw pixels (8x8)", "Barlow Twins"]
    assert table[2]["knn_top1"] == pytest.approx(knn[-1])
    assert re.search(r"^Barlow Twins +0\.9\d\d +0\.9\d\d$", result.stdout, re.M), result.stdout
    assert "Finished at step 440" in result.stdout
    for name in ("encoder.keras", "encoder.json", "checkpoints/checkpoint", "cross_correlation.png",
                 "cross_correlation.npy", "report.png"):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # Run again as it is: nothing left to train, and it says where it finished.
    rerun = run(command, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r'Finished at step 440: \{.*"loss": [\d.]+, .*"knn_top1": 0\.9', rerun.stdout), rerun.stdout

    # Running again with one more epoch resumes at step 440 rather than starting over.
    again = run(command + ["--config.epochs=41"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Finished at step 451" in again.stdout
