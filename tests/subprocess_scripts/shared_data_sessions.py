"""Run by tests/test_shared_data.py in one fresh process, with BT_KERAS_SHARED_DIR naming a missing folder: two
pytest sessions that collect tests/test_files.py, one after the other through `pytest.main` (what `python -m pytest`
runs). First a local one (BT_KERAS_REQUIRE_SHARED unset): its status is printed as `LOCAL STATUS n`. Then CI's
(BT_KERAS_REQUIRE_SHARED=1): its status is this process's exit status, as a shell running pytest sees it. conftest.py
reads the variable when each session is configured, so one interpreter serves both."""

import os
import sys

import pytest

ARGS = ["-q", "-p", "no:cacheprovider", "--collect-only", "tests/test_files.py"]

os.environ.pop("BT_KERAS_REQUIRE_SHARED", None)
local = pytest.main(ARGS)
print(f"LOCAL STATUS {int(local)}", flush=True)
print("CI SESSION", flush=True)
print("CI SESSION", file=sys.stderr, flush=True)
os.environ["BT_KERAS_REQUIRE_SHARED"] = "1"
sys.exit(int(pytest.main(ARGS)))
