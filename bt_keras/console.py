"""What a `python -m bt_keras.*` command shows on the console: TensorFlow's start-up noise filtered out and short
log lines (the one progress line per epoch is `bt_keras.progress`). Loads no TensorFlow itself.

Why a filter on the process's stderr: TensorFlow 2.21 prints its load-time lines from C++ before its logging is
configured, so `TF_CPP_MIN_LOG_LEVEL` (even 3) does not silence them ("WARNING: All log messages before
absl::InitializeLog() is called are written to STDERR", the oneDNN and cudart_stub INFO lines, the CPU-instructions
notice), and on a machine without a GPU the first device listing logs "failed call to cuInit" as an ERROR. So while
TensorFlow loads and lists its devices, file descriptor 2 is pointed at a pipe; a thread reads it line by line and
forwards every line except those known start-up messages (`is_startup_noise`) to the real stderr. Anything else,
a Python traceback or a real C++ error included, passes through unchanged, and the window ends (fd 2 restored, the
pipe drained) as soon as the imports are done, so nothing printed later goes through it.

`TF_CPP_MIN_LOG_LEVEL=2` (unless already set) is applied at the same time: TensorFlow reads it once, when it
loads, and it drops C++ INFO and WARNING lines for the rest of the run, among them grappler's cost-model warnings
("op_level_cost_estimator ... Error in PredictCost() for the op: CropAndResize", logged at WARNING level each time
a tf.data function with that op is optimised). C++ ERROR lines still print.

All of this is on only when the process runs a bt_keras command (`python -m bt_keras.train`, ...; see
`quiet_requested`) and not asked to be verbose: `--verbose`, absl's `--verbosity` / `-v`, or `BT_KERAS_VERBOSE=1`
show everything, as before. Importing bt_keras in your own program changes nothing on your console.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

# C++ log lines as TensorFlow/absl print them: "I0000 00:00:1796204516.191248    3633 port.cc:153] message".
_CPP_INFO_OR_WARNING = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d?[\d.]*\s+\d+ [\w./-]+:\d+\] ")
# ERROR lines printed while devices are listed that mean only "there is no GPU (driver) here".
_HARMLESS_ERRORS = re.compile(r"^E\d{4} .*\] (failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory)")
_STARTUP_LINES = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    # The second line of cpu_feature_guard's INFO message.
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.$"),
)
VERBOSE_ENV = "BT_KERAS_VERBOSE"


def is_startup_noise(line: str) -> bool:
    """True for the lines TensorFlow prints while it loads and finds no GPU (C++ INFO/WARNING lines, the absl
    pre-initialisation banner, the cuInit error); False for everything else, so real errors are never dropped."""
    line = line.rstrip("\r\n")
    if _CPP_INFO_OR_WARNING.match(line) or _HARMLESS_ERRORS.match(line):
        return True
    return any(p.match(line) if isinstance(p, re.Pattern) else line == p for p in _STARTUP_LINES)


class StderrFilter:
    """Context manager: while active, lines written to file descriptor 2 (by Python or by C++ code) for which
    `drop(line)` is true are discarded; all others reach the original stderr, in order, as they are written.

    A thread drains the pipe continuously, so writers never block on a full pipe. On exit fd 2 is restored, which
    closes the pipe's last write end; the thread forwards what is left (a final line without a newline too) and
    ends. If fd 2 cannot be redirected (no such descriptor, an unusual platform), the filter does nothing.
    """

    def __init__(self, drop=is_startup_noise):
        self.drop = drop
        self.dropped: list[str] = []
        self._saved = None
        self._thread = None

    def __enter__(self):
        try:
            sys.stderr.flush()
            saved = os.dup(2)
            read_end, write_end = os.pipe()
        except (OSError, AttributeError, ValueError):
            return self
        os.dup2(write_end, 2)
        os.close(write_end)
        self._saved = saved
        self._thread = threading.Thread(target=self._pump, args=(read_end,), name="bt_keras-stderr", daemon=True)
        self._thread.start()
        return self

    def _pump(self, read_end: int) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._emit(line + b"\n")
            if pending:
                self._emit(pending)
        finally:
            os.close(read_end)

    def _emit(self, line: bytes) -> None:
        if self.drop(line.decode("utf-8", errors="replace")):
            self.dropped.append(line.decode("utf-8", errors="replace").rstrip("\n"))
            return
        view = memoryview(line)
        while view:
            view = view[os.write(self._saved, view):]

    def __exit__(self, *exc_info):
        if self._saved is None:
            return False
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._saved, 2)  # fd 2 held the pipe's last write end (unless a child process inherited it)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():  # else a child still writes into the pipe: the thread keeps forwarding
            os.close(self._saved)
        self._saved = None
        return False


def _command_arguments(argv) -> list[str] | None:
    """The arguments after the command when the interpreter runs a bt_keras command line (`python -m bt_keras.X ...`
    or an installed `bt-keras-*` script), else None."""
    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m":
            return argv[i + 2:] if argv[i + 1].startswith("bt_keras.") else None
    if len(argv) > 1 and os.path.basename(argv[1]).startswith("bt-keras-"):
        return argv[2:]
    return None


def _asks_verbose(args) -> bool:
    for arg in args:
        if arg in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1", "-v") or \
                arg.startswith(("--verbosity", "-v=")):
            return True
    return False


def quiet_requested(orig_argv=None, environ=None) -> bool:
    """True when this process runs a bt_keras command (`python -m bt_keras.X`, `bt-keras-train`) without `--verbose`, `--verbosity`,
    `-v` or BT_KERAS_VERBOSE=1: then its console is kept quiet. Read from the interpreter's original command line
    (`sys.orig_argv`), which exists before the command's flags are parsed."""
    orig_argv = list(getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv)
    environ = os.environ if environ is None else environ
    if environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return False
    arguments = _command_arguments(orig_argv)
    return arguments is not None and not _asks_verbose(arguments)


_QUIET = False


def is_quiet() -> bool:
    """Whether this process started quiet (see `quiet_start`)."""
    return _QUIET


@contextlib.contextmanager
def quiet_start(enabled: bool | None = None):
    """Wraps the import of TensorFlow in a command line (bt_keras/train.py): when quiet (`quiet_requested()` by default), sets
    TF_CPP_MIN_LOG_LEVEL=2 unless set, filters stderr while TensorFlow loads, and lists the GPUs inside the filter
    (so the cuInit error of a GPU-less machine is dropped; listing physical devices leaves them configurable)."""
    global _QUIET
    enabled = quiet_requested() if enabled is None else enabled
    if not enabled or "tensorflow" in sys.modules:  # already loaded: its start-up lines are already out
        yield
        return
    _QUIET = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with StderrFilter():
        yield
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")


def device_line() -> str | None:
    """"No GPU found: training on CPU." when TensorFlow sees no GPU, else None (call after TensorFlow is loaded)."""
    import tensorflow as tf

    return None if tf.config.list_physical_devices("GPU") else "No GPU found: training on CPU."


def short_log_lines() -> None:
    """absl log records as "WARNING: message" (no date, thread id and file prefix), WARNING and above only: the
    quiet console's Python logging. Call after absl has parsed its flags (inside `app.run`)."""
    from absl import logging as absl_logging
    import logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    absl_logging.get_absl_handler().setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
