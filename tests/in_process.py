"""Commands run inside the test process: `python -m bt_keras.train ARGS` (train_in_process), for the command line's
error paths and short runs, and the evaluation commands (evaluate_in_process).

A fresh `python -m bt_keras.train` spends about 5 CPU-seconds importing TensorFlow before it reads a flag. Where the
test's point is what the command does with its flags (a one-line error and its exit status, a callback it loads, a
resume it reports), running the same entry point, `bt_keras.cli.train.run()`, here shows the same: the same absl
parsing, the same `main`, the same `except` clauses that turn errors into one line and an exit status. What only a
fresh process shows (a signal, the quiet console's filter on file descriptor 2, an installed script, the status a
shell receives) stays with the tests that start one (tests.helpers.run_cli and train_command).

Test files import from tests.helpers; this module is beside it for the commands' in-process runs.
"""

import contextlib
import gc
import io
import logging
import subprocess
import sys
from unittest import mock


def _clear_flags() -> None:
    """absl's FLAGS as before a first parse: every value unparsed, and the `--config.FIELD` flags that ml_collections
    defines when it loads `--config` removed (it defines them again on the next parse)."""
    from absl import flags

    flags.FLAGS.unparse_flags()
    for name in [name for name in flags.FLAGS if name.startswith("config.")]:
        delattr(flags.FLAGS, name)


def train_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """Runs bt_keras.cli.train.run() with sys.argv = ["bt_keras.train", *args] (e.g. `train_command(...)[3:]`) and
    returns what `run_cli(train_command(...))` would: the exit status (0, or SystemExit's code), stdout and stderr.
    The log records of the run (bt_keras's, absl's, TensorFlow's Python warnings), which the command's log handler
    writes to its stderr, follow that stderr's text, so a test can check that none of them appeared.

    absl's flags are global: they are cleared before and after (`_clear_flags`), so no value of one call leaks into
    the next. absl's
    `app.run` puts its log handler on the root logger and sets its level; both are put back afterwards, so the tests
    that follow (pytest's caplog among them) see the logging they would have seen."""
    from bt_keras.cli import train

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stdout, stderr, logs = io.StringIO(), io.StringIO(), io.StringIO()
    # Its own buffer: absl's first app.run removes the root's handlers that write to sys.stderr (here `stderr`).
    log_lines = logging.StreamHandler(logs)
    log_lines.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    gc.collect()  # what earlier code left (a restore status whose warnings would land here) is collected first
    root.addHandler(log_lines)  # TensorFlow's logger passes its records on to the root's too
    returncode = 0
    _clear_flags()
    try:
        with mock.patch.object(sys, "argv", ["bt_keras.train", *args]), contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            train.run()
    except SystemExit as stop:  # as the interpreter treats it: a number is the status, text is printed (status 1)
        if stop.code is None or isinstance(stop.code, int):
            returncode = stop.code or 0
        else:
            print(stop.code, file=stderr)
            returncode = 1
    finally:
        gc.collect()  # TensorFlow warns of unread checkpoint values when their restore status is collected
        _clear_flags()
        root.handlers[:] = handlers
        root.setLevel(level)
    return subprocess.CompletedProcess(["bt_keras.train", *args], returncode, stdout.getvalue(),
                                       stderr.getvalue() + logs.getvalue())


def evaluate_in_process(command, *args) -> dict:
    """An evaluation command (bt_keras.cli.evaluate_knn, _linear, _finetune) in this process: its flags parsed from
    `args` into flag values of their own (no global FLAGS touched), then its run(); returns its result record."""
    from absl import flags

    values = flags.FlagValues()
    command.define_flags(values)
    values(["prog", *[str(a) for a in args]])
    return command.run(values)
