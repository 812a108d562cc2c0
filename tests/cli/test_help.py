"""Every command the README names answers `--help` with its usage and its own flags: the `python -m` names (forwards
to bt_keras.cli since the layout move, where absl listed no flags at first) and the installed `bt-keras-*` scripts."""

import concurrent.futures
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, installed_script

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


def _help(command: list[str]) -> str:
    result = subprocess.run([*command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    return result.stdout + result.stderr


def _helps(commands: dict[str, list[str]]) -> dict[str, str]:
    """Each command's `--help` output, three processes at a time: a start-up is mostly single-threaded imports, so
    on 2 cores they overlap (measured: 17 commands in about half the time of one after another)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        outputs = dict(zip(commands, pool.map(_help, commands.values())))
    return outputs


@pytest.fixture(scope="module")
def module_helps():
    return _helps({module: [sys.executable, "-m", module] for module in MODULES})


@pytest.fixture(scope="module")
def script_helps():
    return _helps({script: [installed_script(script)] for script in SCRIPTS})


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(MODULES))
def test_python_m_help_shows_the_commands_flags(module, module_helps):
    text = module_helps[module]
    assert MODULES[module] in text and "Traceback" not in text, text[-2000:]
    assert "the command's name, kept" not in text  # the forward's own docstring is not the usage


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_installed_scripts_answer_help(script, script_helps):
    text = script_helps[script]
    assert SCRIPTS[script] in text and "Traceback" not in text, text[-2000:]
