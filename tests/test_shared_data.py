"""CI needs ../shared (CIFAR-10 in TFDS format, the torch fixture): with BT_KERAS_REQUIRE_SHARED=1 (.ci/run sets it)
a missing folder stops the session at once with one line, where a local run without the variable skips those tests."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


def _pytest(tmp_path, **env):
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "tests/test_files.py"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BT_KERAS_SHARED_DIR": str(tmp_path / "nowhere"), **env})


@pytest.mark.slow
def test_a_missing_shared_folder_is_one_line_and_a_red_run_in_ci(tmp_path):
    required = _pytest(tmp_path, BT_KERAS_REQUIRE_SHARED="1")
    assert required.returncode == 4, required.stdout[-2000:] + required.stderr[-2000:]  # pytest: a usage error
    output = required.stdout + required.stderr
    lines = [line for line in output.splitlines() if "offline test data is missing" in line]
    assert len(lines) == 1 and "cifar10" in lines[0] and "MANIFEST.json" in lines[0], lines
    local = _pytest(tmp_path, BT_KERAS_REQUIRE_SHARED="")
    assert local.returncode == 0 and "offline test data is missing" not in local.stdout + local.stderr


def test_ci_requires_the_shared_folder_and_a_fresh_kernel_cache():
    ci = (REPO / ".ci" / "run").read_text()
    assert "export BT_KERAS_REQUIRE_SHARED=1" in ci and "BT_KERAS_CACHE_DIR=\"$(mktemp -d)\"" in ci
    assert ci.index("BT_KERAS_REQUIRE_SHARED") < ci.index("python -m pytest")
