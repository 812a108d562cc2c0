"""benchmarks/input_pipeline.py end to end on tiny settings: every case, mode and --augment_on variant is measured,
written and printed, and its derived numbers follow from its measured ones.

Speed is not tested (benchmarks are for that); what is: the script runs as the README tells users to run it, under
one device and 2 replicas, and its per-core and ratio columns are computed from the rates it measured.
"""

import json
import subprocess
import sys

import pytest
from tests.helpers import REPO

from tests.benchmarks.test_scaling import ENV

VARIANTS = ("today", "host", "accelerator", "accelerator+dct")


@pytest.mark.slow  # one child process tracing five pipelines: ~30 s on 2 cores
def test_input_pipeline_measures_every_case_mode_and_variant(tmp_path):
    output = tmp_path / "input_pipeline.json"
    cmd = [sys.executable, "-m", "benchmarks.input_pipeline", "--skip", "cifar10-tfds", "--strategy", "default",
           "mirrored:2", "--augment_on", *VARIANTS, "--batch-size-32", "16", "--batch-size-224", "4", "--num-jpegs",
           "8", "--warmup", "1", "--batches-32", "2", "--batches-224", "2", "--reps", "2", "--output", str(output)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    results = report["results"]
    cases = {"cifar32-memory", "cifar32-memory/mirrored:2", "imagenet224-jpeg", "imagenet224-jpeg/mirrored:2",
             *(f"imagenet224-jpeg/{v}" for v in VARIANTS if v != "host"), "imagenet224-jpeg/ratios"}
    assert set(results) == cases
    for name, r in results.items():
        if name.endswith("/ratios"):
            continue
        assert r["reps"] == 2 and r["batch_size"] == (16 if name.startswith("cifar32") else 4), name
        assert 0 < r["pairs_per_s_min"] <= r["pairs_per_s_median"] <= r["pairs_per_s_max"], name
        assert r["pairs_per_s_per_core"] == pytest.approx(r["pairs_per_s_median"] / r["usable_cores"]), name
        assert r["pairs_per_cpu_second"] > 0, name
        assert any(line.startswith(name + " ") for line in proc.stdout.splitlines()), name  # a row of the table
    named = lambda v: results["imagenet224-jpeg" if v == "host" else f"imagenet224-jpeg/{v}"]  # noqa: E731
    for pair, ratio in results["imagenet224-jpeg/ratios"].items():
        a, b = pair.split("/")
        for field, column in (("per_core", "pairs_per_s_per_core"), ("per_cpu_second", "pairs_per_cpu_second")):
            assert ratio[field] == pytest.approx(named(a)[column] / named(b)[column]), (pair, field)
    assert set(results["imagenet224-jpeg/ratios"]) == {"accelerator/host", "accelerator+dct/host", "host/today"}
    assert report["machine"]["cpu_count"] >= 1 and f"wrote {output}" in proc.stdout
