"""Every command the README names answers `--help` with its usage and its own flags: the `python -m` names (forwards
to bt_keras.cli since the layout move, where absl listed no flags at first) and the installed `bt-keras-*` scripts.

The commands run in one process, tests/subprocess_scripts/help_texts.py, that loads TensorFlow once and runs each
command as `__main__` in a child forked from it (runpy, as `python -m` and a script's `#!python` line do), instead
of 17 fresh interpreters that each import TensorFlow (about 5 CPU-seconds apiece). That the forked run is what a
shell gets is checked on the one command that loads no TensorFlow: its real `python -m` and installed-script runs
print the same help, byte for byte.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, SUBPROCESS_SCRIPTS, installed_script

# command -> a flag (or usage word) its help must show
MODULES = {
    "bt_keras.train": "--workdir",
    "bt_keras.report": "WORKDIR",
    "bt_keras.convert": "--torch_checkpoint",
    "bt_keras.data_service": "--dispatcher",
    "bt_keras.data_check": "--workdir",
    "bt_keras.evaluate.knn": "--temperature",
    "bt_keras.evaluate.linear": "--C",
    "bt_keras.evaluate.finetune": "--backbone_lr",
    "export.savedmodel": "--export_dir",
    "export.onnx": "--output",
    "export.client": "--rest",
}
SCRIPTS = {"bt-keras-train": "--workdir", "bt-keras-export": "--export_dir", "bt-keras-export-onnx": "--output",
           "bt-keras-convert": "--torch_checkpoint", "bt-keras-client": "--rest", "bt-keras-data-check": "--workdir"}
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}


def _helps(*args: str) -> dict[str, list]:
    """{command: [exit status, `--help` output]} from help_texts.py, run once for all of `args` (-m MODULE...
    --script PATH...)."""
    result = subprocess.run([sys.executable, str(SUBPROCESS_SCRIPTS / "help_texts.py"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _real_help(command: list[str]) -> list:
    """[exit status, output] of `COMMAND --help` in a fresh process, as a shell runs it (stdout, then stderr)."""
    result = subprocess.run([*command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    return [result.returncode, result.stdout + result.stderr]


@pytest.fixture(scope="module")
def helps() -> dict[str, list]:
    """One help_texts.py run for every module and, where they run this checkout's bt_keras, the installed scripts;
    {module or script name: [exit status, output]}."""
    try:
        scripts = {installed_script(script): script for script in SCRIPTS}
    except pytest.skip.Exception:  # another checkout's scripts: test_installed_scripts_answer_help skips, saying why
        scripts = {}
    by_command = _helps("-m", *MODULES, *(["--script", *scripts] if scripts else []))
    return {scripts.get(command, command): result for command, result in by_command.items()}


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(MODULES))
def test_python_m_help_shows_the_commands_flags(module, helps):
    _, text = helps[module]
    assert MODULES[module] in text and "Traceback" not in text, text[-2000:]
    assert "the command's name, kept" not in text  # the forward's own docstring is not the usage


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_installed_scripts_answer_help(script, helps):
    installed_script(script)  # skips where the scripts run another checkout's bt_keras
    _, text = helps[script]
    assert SCRIPTS[script] in text and "Traceback" not in text, text[-2000:]


@pytest.mark.slow
def test_the_forked_runs_print_what_a_fresh_process_prints(helps):
    """export.client loads no TensorFlow, so its real runs cost a fraction of a second: `python -m export.client
    --help` and `bt-keras-client --help` in fresh processes print exactly what help_texts.py's children printed,
    with the same exit status."""
    assert helps["export.client"] == _real_help([sys.executable, "-m", "export.client"])
    assert helps["bt-keras-client"] == _real_help([installed_script("bt-keras-client")])
