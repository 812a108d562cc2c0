"""Host tuning (bt_keras.train.host): `configure_host` in a fresh process (threads can only be set before TensorFlow
starts), what it says once TensorFlow has started, and glibc's malloc tuning."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from bt_keras.train import host
from tests.helpers import REPO


@pytest.mark.slow
def test_configure_host_in_a_fresh_process():
    code = "import json; from bt_keras.train import host; print(json.dumps(host.configure_host()))"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["applied"] is True
    assert report["intra_op"] == host.usable_cores()
    assert report["system_allocator"] is False  # the default keeps TensorFlow's pool


def test_configure_host_after_tensorflow_started_says_so_and_rejects_bad_allocators():
    tf.constant(1.0)  # this process's runtime is up (conftest configured its devices)
    assert host.configure_threads(1)["applied"] is False
    with pytest.raises(ValueError, match="allocator must be"):
        host.configure_host(allocator="tcmalloc")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tune_malloc_applies_on_glibc():
    assert host.tune_malloc() is True
