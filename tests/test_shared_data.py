"""CI needs ../shared (CIFAR-10 in TFDS format, the torch fixture): with BT_KERAS_REQUIRE_SHARED=1 (.ci/run sets it)
a missing folder stops the session at once with one line, where a local run without the variable skips those tests."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, SUBPROCESS_SCRIPTS


@pytest.mark.slow
def test_a_missing_shared_folder_is_one_line_and_a_red_run_in_ci(tmp_path):
    """One fresh process (tests/subprocess_scripts/shared_data_sessions.py) runs pytest's collection twice with the
    shared folder missing: locally (no BT_KERAS_REQUIRE_SHARED) it collects, status 0, without the message; then as
    CI (BT_KERAS_REQUIRE_SHARED=1) it stops with one line, and the process exits with pytest's usage error (4)."""
    env = {**os.environ, "BT_KERAS_SHARED_DIR": str(tmp_path / "nowhere")}
    env.pop("BT_KERAS_REQUIRE_SHARED", None)
    both = subprocess.run([sys.executable, str(SUBPROCESS_SCRIPTS / "shared_data_sessions.py")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    local_out, _, ci_out = both.stdout.partition("CI SESSION")
    local_err, _, ci_err = both.stderr.partition("CI SESSION")
    assert "LOCAL STATUS 0" in local_out, both.stdout[-2000:] + both.stderr[-2000:]
    assert "offline test data is missing" not in local_out + local_err
    assert both.returncode == 4, both.stdout[-2000:] + both.stderr[-2000:]  # pytest: a usage error
    lines = [line for line in (ci_out + ci_err).splitlines() if "offline test data is missing" in line]
    assert len(lines) == 1 and "cifar10" in lines[0] and "MANIFEST.json" in lines[0], lines


def test_ci_requires_the_shared_folder_and_a_fresh_kernel_cache():
    ci = (REPO / ".ci" / "run").read_text()
    assert "export BT_KERAS_REQUIRE_SHARED=1" in ci and "BT_KERAS_CACHE_DIR=\"$(mktemp -d)\"" in ci
    assert ci.index("BT_KERAS_REQUIRE_SHARED") < ci.index("python -m pytest")
