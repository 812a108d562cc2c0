"""The convert command's `main` run in the test's own process, for the error paths of test_torch_file.py and
test_convert.py: one TensorFlow import fewer per case than `python -m bt_keras.convert`. The command in a fresh
process, where absl parses the flags, exit status and console line included: test_torch_file.py's
test_a_pickled_os_system_is_refused_without_running."""

import types

import pytest

# bt_keras.cli.convert's flags at their defaults (its _define_flags), as main reads them from absl's FLAGS.
CONVERT_DEFAULTS = dict(backbone=None, stem=None, cifar_stem_padding=1, prefix=None, ignore_keys=[], image_size=None,
                        mean=None, std=None, overwrite=False)


@pytest.fixture
def convert_main(monkeypatch, capsys):
    """convert_main(torch_checkpoint, output, **flags) -> (exit status, last stderr line) of the command's main, with
    those flags and the defaults for the others; asserts that no traceback was printed."""
    from absl import flags

    from bt_keras.cli import convert as command_line

    def run(torch_checkpoint, output, **given):
        values = {**CONVERT_DEFAULTS, **given, "torch_checkpoint": str(torch_checkpoint), "output": str(output)}
        monkeypatch.setattr(flags, "FLAGS", types.SimpleNamespace(**values))
        with pytest.raises(SystemExit) as exited:
            command_line.main(["convert"])
        stderr = capsys.readouterr().err
        assert "Traceback" not in stderr
        return exited.value.code, stderr.strip().splitlines()[-1]

    return run
