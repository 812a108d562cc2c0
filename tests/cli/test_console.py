"""The quiet console (bt_keras.cli.console): TensorFlow's start-up lines are dropped, real errors pass through, the train
CLI shows no C++ INFO/WARNING line and no retracing warning, and `--verbose` shows everything again."""

import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from bt_keras.cli import console
from tests.helpers import CPP_INFO_OR_WARNING, REPO, SUBPROCESS_SCRIPTS, train_command

PROBE = SUBPROCESS_SCRIPTS / "stderr_filter.py"
FATAL = b"F0000 00:00:1796606688.7    3791 parse_flags_from_env.cc:234] Unknown flag in TF_XLA_FLAGS: --bogus_flag\n"


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


@pytest.mark.parametrize("line, harmless", [
    ("E0000 00:00:1796606688.581979    3791 util.cc:131] oneDNN supports DT_HALF only on platforms with AVX-512. "
     "Falling back to the default Eigen-based implementation if present.", True),
    ("E0000 00:00:1796606688.581979    3791 util.cc:131] oneDNN supports DT_HALF only on platforms with AVX-512. "
     "Falling back to the default Eigen-based implementation if present.\r\n", True),
    ("E0000 00:00:1796606688.581979    3791 util.cc:131] oneDNN supports DT_HALF only on platforms with AVX-512. "
     "And then something else went wrong.", False),
    ("F0000 00:00:1796606688.581979    3791 util.cc:131] oneDNN supports DT_HALF only on platforms with AVX-512. "
     "Falling back to the default Eigen-based implementation if present.", False),
    ("E0000 00:00:1796204516.2    3633 cuda_executor.cc:1228] failed call to cuInit: UNKNOWN ERROR (303)", False),
    ("I0000 00:00:1796204516.191248    3633 port.cc:153] oneDNN custom operations are on.", False),
    ("E0000 00:00:1796204516.2    3633 kernel.cc:77] a real C++ error", False),
])
def test_only_known_notices_are_harmless_for_the_whole_run(line, harmless):
    assert console.is_harmless_notice(line) is harmless


def _probe(mode, timeout=30, **kwargs):
    return subprocess.run([sys.executable, str(PROBE), mode], cwd=REPO, env=_env(), capture_output=True,
                          timeout=timeout, **kwargs)


def test_filter_drops_startup_noise_and_passes_real_errors():
    result = _probe("window", text=True)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "oneDNN" not in err and "absl::InitializeLog" not in err and "cuInit" not in err
    assert "a real C++ error" in err and "a plain line" in err and "no newline at the end" in err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError" in err
    assert re.search(r"^W0000 .*after the window$", err, re.M), "lines after the window must pass unfiltered"


def test_quiet_command_drops_the_dt_half_notice_after_the_import_window_and_nothing_else():
    result = _probe("command", text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "E0000 00:00:1796606688.6    3791 kernel.cc:77] a real C++ error",
        "F0000 00:00:1796606688.7    3791 parse_flags_from_env.cc:234] Unknown flag in TF_XLA_FLAGS: --bogus_flag",
        "W0000 00:00:1796204516.4    3633 later.cc:1] a warning after the window",
        "done",
    ], result.stderr  # the fake TensorFlow's start-up noise and the DT_HALF notice are dropped, in order otherwise


@pytest.mark.parametrize("mode", ["abort-import", "abort-later"])
def test_a_fatal_line_reaches_stderr_although_the_process_aborts_right_after_it(mode):
    for _ in range(3):  # a lost line was a race (a filter thread died with the process): try it more than once
        result = _probe(mode)
        assert result.returncode == -signal.SIGABRT, result
        assert result.stderr == FATAL, result.stderr


def test_many_lines_arrive_complete_and_in_order_also_from_a_worker_that_outlives_the_command():
    start = time.monotonic()
    result = _probe("many")
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - start < 20  # no hang: the filter ends when the worker's write end closes too
    lines = result.stderr.decode().split("\n")
    worker = [line for line in lines if line.startswith("worker ")]
    own = [line for line in lines if not line.startswith("worker ")]
    assert worker == [f"worker {i}" for i in range(200)]  # written after the command exited: still all there
    via = lambda i: "fd 2" if i % 3 == 0 else "sys.stderr"
    assert own == [f"line {i} via {via(i)}" for i in range(3000)] + ["the last line, without a newline", ""], \
        [line for line in own if "oneDNN" in line]  # the DT_HALF notices (the worker's too) dropped


def test_a_partial_line_is_forwarded_while_the_command_still_runs():
    process = subprocess.Popen([sys.executable, str(PROBE), "partial"], cwd=REPO, env=_env(), stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen, deadline = b"", time.monotonic() + 20
        while b"progress 1/2" not in seen and time.monotonic() < deadline:
            if select.select([process.stderr], [], [], 0.5)[0]:
                chunk = os.read(process.stderr.fileno(), 4096)
                assert chunk, seen
                seen += chunk
        assert seen == b"\rprogress 1/2", seen  # before its newline: a progress bar stays live
        process.stdin.write(b"go\n")
        process.stdin.close()
        seen += process.stderr.read()
        assert process.wait(timeout=20) == 0
        assert seen == b"\rprogress 1/2\rprogress 2/2\n", seen
    finally:
        process.kill()
        process.wait()


def test_a_ctrl_c_right_after_start_up_keeps_the_keyboardinterrupt_traceback():
    process = subprocess.Popen([sys.executable, str(PROBE), "interrupt"], cwd=REPO, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert process.stdout.readline() == b"ready\n"
        os.killpg(process.pid, signal.SIGINT)  # what a Ctrl-C does: the whole process group, the filter's start too
        _, err = process.communicate(timeout=20)
        assert process.returncode == -signal.SIGINT, err
        assert err.decode().endswith("KeyboardInterrupt\n"), err
    finally:
        process.kill()
        process.wait()


def test_quiet_start_changes_nothing_outside_a_bt_keras_command():
    code = ("import os, sys\nfrom bt_keras.cli import console\nbefore = os.fstat(2)\nwith console.quiet_start(): pass\n"
            "print(os.path.samestat(before, os.fstat(2)), console.is_quiet())\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout == "True False\n", result  # fd 2 untouched, not quiet


def _train(tmp_path, *flags):
    """`python -m bt_keras.train` as a user starts it (no TF_CPP_MIN_LOG_LEVEL, no BT_KERAS_VERBOSE): the tiny network
    for one step, no kNN and no picture, since only what the console shows is read."""
    args = train_command(tmp_path, *flags, epochs=1, steps=1)
    return subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_cli_is_verbose_on_request(tmp_path):
    """`--verbose` brings TensorFlow's lines back. (The quiet default is judged on the README's main job itself, in
    tests/test_quickstart.py: no C++ INFO/WARNING lines, one "No GPU found" line, the progress lines.)"""
    verbose = _train(tmp_path / "verbose", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    noisy = verbose.stdout + verbose.stderr
    assert CPP_INFO_OR_WARNING.search(noisy) or "absl::InitializeLog" in noisy, noisy[-3000:]
    assert re.search(r"^I\d{4} .*\] ", noisy, re.M) or "I0000" in noisy  # absl INFO lines come back too


@pytest.mark.slow
def test_a_python_error_keeps_its_traceback_on_the_quiet_console(tmp_path):
    result = _train(tmp_path, "--callbacks=tests.subprocess_scripts.failing_callback:make")
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr and "KeyError" in result.stderr, result.stderr[-3000:]
    assert not CPP_INFO_OR_WARNING.search(result.stdout + result.stderr)
