"""The quiet console (bt_keras.console): TensorFlow's start-up lines are dropped, real errors pass through, the train
CLI shows no C++ INFO/WARNING line and no retracing warning, and `--verbose` shows everything again."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bt_keras import console

REPO = Path(__file__).resolve().parents[1]
CPP_INFO_OR_WARNING = re.compile(r"^[IW]\d{4} ", re.M)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", console.VERBOSE_ENV)}
    return {**env, "PYTHONPATH": str(REPO), **extra}


@pytest.mark.parametrize("line, noise", [
    ("I0000 00:00:1796204516.191248    3633 port.cc:153] oneDNN custom operations are on.", True),
    ("W0000 00:00:1796204516.2    3633 op_level_cost_estimator.cc:699] Error in PredictCost() for the op", True),
    ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR", True),
    ("E0000 00:00:1796204516.2    3633 cuda_executor.cc:1228] failed call to cuInit: UNKNOWN ERROR (303)", True),
    ("E0000 00:00:1796204516.2    3633 kernel.cc:77] a real C++ error", False),
    ("Traceback (most recent call last):", False),
    ("ValueError: I0000 is not a number", False),
])
def test_startup_noise_is_recognised_and_nothing_else(line, noise):
    assert console.is_startup_noise(line) is noise


def test_quiet_only_for_bt_keras_commands_without_verbose():
    assert console.quiet_requested(["python", "-m", "bt_keras.train", "--workdir=x"], {})
    assert not console.quiet_requested(["python", "-m", "bt_keras.train", "--verbose"], {})
    assert not console.quiet_requested(["python", "-m", "bt_keras.train", "--verbosity=1"], {})
    assert not console.quiet_requested(["python", "-m", "bt_keras.train"], {console.VERBOSE_ENV: "1"})
    assert not console.quiet_requested(["python", "my_script.py"], {})
    assert console.quiet_requested(["/venv/bin/python", "/venv/bin/bt-keras-train", "--workdir=x"], {})
    assert not console.quiet_requested(["/venv/bin/python", "/venv/bin/bt-keras-train", "-v=1"], {})


def test_filter_drops_startup_noise_and_passes_real_errors():
    result = subprocess.run([sys.executable, str(REPO / "tests" / "probes" / "stderr_filter.py")], cwd=REPO,
                            env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "oneDNN" not in err and "absl::InitializeLog" not in err and "cuInit" not in err
    assert "a real C++ error" in err and "a plain line" in err and "no newline at the end" in err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError" in err
    assert re.search(r"^W0000 .*after the window$", err, re.M), "lines after the window must pass unfiltered"
    assert "dropped 3" in result.stdout


def _train(tmp_path, *flags):
    args = [sys.executable, "-m", "bt_keras.train", "--config=experiments/quickstart.py", f"--workdir={tmp_path}",
            "--config.epochs=2", "--config.steps_per_epoch=2", "--config.batch_size=32", "--config.knn.every_epochs=1",
            "--config.knn.train_examples=256", "--config.knn.test_examples=128", "--config.knn.baselines=False",
            "--config.log_every_steps=1", *flags]
    return subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_cli_is_quiet_by_default_and_verbose_on_request(tmp_path):
    quiet = _train(tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    output = quiet.stdout + quiet.stderr
    assert not CPP_INFO_OR_WARNING.search(output), CPP_INFO_OR_WARNING.findall(output)[:5]
    assert "retracing" not in output and "absl::InitializeLog" not in output and "cuInit" not in output, output
    assert output.count("No GPU found: training on CPU.") == 1
    assert re.search(r"^epoch 2/2 ━+ 2/2 .*kNN top-1 0\.\d+$", quiet.stdout, re.M), quiet.stdout
    assert "Finished at step 4" in quiet.stdout

    verbose = _train(tmp_path / "verbose", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    noisy = verbose.stdout + verbose.stderr
    assert CPP_INFO_OR_WARNING.search(noisy) or "absl::InitializeLog" in noisy, noisy[-3000:]
    assert re.search(r"^I\d{4} .*\] ", noisy, re.M) or "I0000" in noisy  # absl INFO lines come back too


@pytest.mark.slow
def test_a_python_error_keeps_its_traceback_on_the_quiet_console(tmp_path):
    result = _train(tmp_path, "--callbacks=tests.probes.failing_callback:make")
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr and "KeyError" in result.stderr, result.stderr[-3000:]
    assert not CPP_INFO_OR_WARNING.search(result.stdout + result.stderr)
