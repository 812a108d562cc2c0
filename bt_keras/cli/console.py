"""What a `python -m bt_keras.*` command shows on the console: TensorFlow's start-up noise filtered out and short
log lines (the one progress line per epoch is `bt_keras.train.progress`). Loads no TensorFlow itself.

Why a filter on the process's stderr: TensorFlow 2.21 prints its load-time lines from C++ before its logging is
configured, so `TF_CPP_MIN_LOG_LEVEL` (even 3) does not silence them ("WARNING: All log messages before
absl::InitializeLog() is called are written to STDERR", the oneDNN and cudart_stub INFO lines, the CPU-instructions
notice), on a machine without a GPU the first device listing logs "failed call to cuInit" as an ERROR, and later a
few harmless notices are logged as ERRORs too (on a CPU without AVX-512 FP16 a mixed-precision run logs "oneDNN
supports DT_HALF only on platforms with AVX-512. Falling back to the default Eigen-based implementation").

So a quiet command points file descriptor 2 at a pipe for its whole life, from just before TensorFlow loads until
the process (and every child process that inherited fd 2) has exited. A small filter process (this file run as
a script: `python -I -S console.py --filter-stderr`, standard library only: about 25 ms of start-up on its own,
alongside the command, which it costs about 3 ms) reads the pipe and writes to the original stderr every line except:
  * while TensorFlow loads and lists its devices (`quiet_start`'s block): its known start-up lines
    (`is_startup_noise`: C++ INFO/WARNING lines, the absl pre-initialisation banner, the cuInit / CUDA-factory
    ERRORs of a machine without a GPU, the second line of the CPU-instructions notice);
  * for the whole run: the short list of known-harmless ERROR notices in `_HARMLESS_NOTICES` (`is_harmless_notice`).
Everything else, a Python traceback, a real C++ ERROR or a FATAL line included, passes through unchanged and in
the order it was written; the end of the start-up window is a marker line in the same pipe, so it is ordered with
the lines around it. A line not ended by a newline is forwarded after 50 ms without more data (so progress bars
drawn with "\r" stay live); all the dropped lines are written whole by TensorFlow's logger.

Why no line can be lost: the filter is a separate process, not a thread of the command. A line is in the pipe as
soon as the command's write() returns, and the filter reads until end-of-file, which comes only when every write
end is closed -- when the command and its children have exited, however they exit: normally, by an uncaught
exception, os._exit, a FATAL line followed by abort(), a signal. The filter runs in a session of its own and
ignores SIGINT/SIGQUIT/SIGTERM/SIGHUP (a Ctrl-C on the terminal reaches the command's whole process group; its
KeyboardInterrupt traceback must still be shown) and never outlives the writers; only a SIGKILL of the filter
process itself could lose lines. At a normal
exit the command puts the original stderr back on fd 2 and waits (at most 3 s) for the filter to forward the last
lines, so they are out before the shell prompt or before a caller reading a file of stderr goes on
(`subprocess.run(..., capture_output=True)` waits for them anyway: the filter holds the caller's stderr until it
exits; after an abort they may follow the shell prompt). If the filter cannot start (no interpreter executable, no
fd 2, not POSIX), stderr is left alone: nothing is dropped then. While the filter runs, fd 2 of the command is a
pipe (sys.stderr.isatty() is False); stdout is untouched, so output of both on one terminal may interleave a few
milliseconds differently.

`TF_CPP_MIN_LOG_LEVEL=2` (unless already set) is applied at the same time: TensorFlow reads it once, when it
loads, and it drops C++ INFO and WARNING lines for the rest of the run, among them grappler's cost-model warnings
("op_level_cost_estimator ... Error in PredictCost() for the op: CropAndResize", logged at WARNING level each time
a tf.data function with that op is optimised). C++ ERROR lines still print, except the notices above.

All of this is on only when the process runs a bt_keras command (`python -m bt_keras.train`, ...; see
`quiet_requested`) and not asked to be verbose: `--verbose`, absl's `--verbosity` / `-v`, or `BT_KERAS_VERBOSE=1`
show everything, unfiltered, as before. Importing bt_keras in your own program changes nothing on your console.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

# C++ log lines as TensorFlow/absl print them: "I0000 00:00:1796204516.191248    3633 port.cc:153] message".
_CPP_INFO_OR_WARNING = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d?[\d.]*\s+\d+ [\w./-]+:\d+\] ")
# ERROR lines printed while devices are listed that mean only "there is no GPU (driver) here".
_HARMLESS_ERRORS = re.compile(r"^E\d{4} .*\] (failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory)")
_STARTUP_LINES = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    # The second line of cpu_feature_guard's INFO message.
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.$"),
)
_CPP_ERROR = r"^E\d{4} \d\d:\d\d:\d\d?[\d.]*\s+\d+ [\w./-]+:\d+\] "
# Known-harmless ERROR lines, dropped for the whole run on the quiet console. Keep this list tiny: each item must be a
# notice that needs no action, with the reason here; anything not listed reaches the user.
_HARMLESS_NOTICES = (
    # tensorflow/core/util/util.cc, logged once per process when a float16 (mixed_float16) or bfloat16 op runs on a
    # CPU without the AVX-512 FP16/BF16 instructions: oneDNN is skipped and Eigen's kernels run instead (slower,
    # same results). --mixed_precision on such a CPU says "slower on CPU" already.
    re.compile(_CPP_ERROR + r"oneDNN supports DT_(HALF|BFLOAT16) only on platforms with AVX-512\. Falling back to "
               r"the default Eigen-based implementation if present\.$"),
)
VERBOSE_ENV = "BT_KERAS_VERBOSE"
# Written by the command into the filtered fd 2 when TensorFlow has loaded: from there on only the harmless notices
# are dropped. NUL bytes: no text a program prints looks like it. Shorter than PIPE_BUF, so written atomically.
_STARTUP_OVER = b"\0bt_keras.console: start-up over\0\n"
_FILTER_FLAG = "--filter-stderr"
_PARTIAL_LINE_WAIT_S = 0.05  # a line without its newline yet is forwarded after this long without more data
_MAX_HELD_BYTES = 1 << 16  # ... or once this long (no dropped line is)
_EXIT_WAIT_S = 3.0  # how long a command waits at exit for the filter to forward its last lines


def is_startup_noise(line: str) -> bool:
    """True for the lines TensorFlow prints while it loads and finds no GPU (C++ INFO/WARNING lines, the absl
    pre-initialisation banner, the cuInit error); False for everything else, so real errors are never dropped."""
    line = line.rstrip("\r\n")
    if _CPP_INFO_OR_WARNING.match(line) or _HARMLESS_ERRORS.match(line):
        return True
    return any(p.match(line) if isinstance(p, re.Pattern) else line == p for p in _STARTUP_LINES)


def is_harmless_notice(line: str) -> bool:
    """True for the known-harmless ERROR notices (`_HARMLESS_NOTICES`) the quiet console drops for the whole run."""
    line = line.rstrip("\r\n")
    return any(p.match(line) for p in _HARMLESS_NOTICES)


def _dropped(line: bytes, startup: bool) -> bool:
    text = line.decode("utf-8", errors="replace")
    return (startup and is_startup_noise(text)) or is_harmless_notice(text)


def _filter_lines(read_fd: int, write_fd: int, startup: bool = True) -> None:
    """The filter process's loop: copies `read_fd` to `write_fd` line by line until end-of-file, dropping
    `is_startup_noise` lines until the `_STARTUP_OVER` marker (when `startup`) and `is_harmless_notice` lines always.
    A partial line is held at most `_PARTIAL_LINE_WAIT_S`; once its start is forwarded, the rest follows as it comes."""
    import select
    import time

    held = b""  # the start of a line not yet forwarded, nor known to be complete
    held_until = 0.0  # when `held` is forwarded anyway (time.monotonic())
    passing = False  # the start of the current line was forwarded (it can no longer be dropped)
    writable = True

    def write(data: bytes) -> None:
        nonlocal writable
        view = memoryview(data)
        while view and writable:
            try:
                view = view[os.write(write_fd, view):]
            except BlockingIOError:
                select.select([], [write_fd], [])
            except InterruptedError:
                pass
            except OSError:  # stderr went away (a closed pipe, a hung-up terminal): keep draining, so no writer blocks
                writable = False

    while True:
        if held and not passing and \
                not select.select([read_fd], [], [], max(0.0, held_until - time.monotonic()))[0]:
            write(held)
            held, passing = b"", True
            continue
        try:
            chunk = os.read(read_fd, 1 << 16)
        except InterruptedError:
            continue
        if not chunk:
            break
        *lines, rest = (held + chunk).split(b"\n")
        if lines or not held:  # a new line starts in this chunk
            held_until = time.monotonic() + _PARTIAL_LINE_WAIT_S
        out, held = [], b""
        for line in lines:
            line = held + line + b"\n"
            held = b""
            if line.endswith(_STARTUP_OVER):
                startup = False
                held = line[:-len(_STARTUP_OVER)]  # a partial line may precede the marker: it goes on after it
            elif passing:
                passing = False
                out.append(line)
            elif not _dropped(line, startup):
                out.append(line)
        held += rest
        if held and (passing or len(held) > _MAX_HELD_BYTES):
            out.append(held)
            held, passing = b"", True
        if out:
            write(b"".join(out))
    if held and (passing or not _dropped(held, startup)):
        write(held)


class StderrFilter:
    """While started, lines written to file descriptor 2 (by Python or by C++ code, in this process or in a child
    process that inherited it) reach the original stderr in order, except `is_startup_noise` lines until
    `end_startup()` and `is_harmless_notice` lines always (the module docstring says why no line can be lost).

    `start()` points fd 2 at a pipe read by a filter process; `stop()` puts the original stderr back and waits for
    the filter to forward what is left. As a context manager: started on enter, stopped on exit. If fd 2 cannot be
    redirected or the filter process cannot start, nothing changes (nothing is dropped either).
    """

    def __init__(self, startup: bool = True):
        self.startup = startup
        self._saved = None
        self._process = None
        self._pid = None

    @property
    def active(self) -> bool:
        return self._process is not None

    def start(self) -> "StderrFilter":
        if self._process is not None or os.name != "posix" or not sys.executable or not __file__.endswith(".py"):
            return self
        try:
            import subprocess

            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, AttributeError, ValueError):
            return self
        try:
            read_end, write_end = os.pipe()
        except OSError:
            os.close(saved)
            return self
        try:
            # -I: no PYTHON* variables, no user site, no script folder on sys.path (bt_keras/ has modules named like
            # the standard library's); -S: no site-packages. The filter imports only the standard library. Its own
            # session: a Ctrl-C (SIGINT to the terminal's process group) or a hang-up never reaches it, not even
            # while it starts, before it ignores those signals.
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), _FILTER_FLAG, str(int(self.startup))],
                stdin=read_end, stdout=saved, stderr=saved, close_fds=True, start_new_session=True)
        except (OSError, ValueError, subprocess.SubprocessError):
            for fd in (read_end, write_end, saved):
                os.close(fd)
            return self
        os.close(read_end)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._saved, self._process, self._pid = saved, process, os.getpid()
        return self

    def end_startup(self) -> None:
        """From here on only the harmless notices are dropped (a marker line, ordered with the lines around it)."""
        if self._process is None or os.getpid() != self._pid:
            return
        if self._process.poll() is not None:  # the filter could not run here (it never exits while fd 2 is open)
            self.stop()  # the original stderr back, so nothing later is lost
            return
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            os.write(2, _STARTUP_OVER)

    def stop(self, timeout: float = _EXIT_WAIT_S) -> None:
        """Puts the original stderr back on fd 2 (closing this process's write end of the pipe) and waits up to
        `timeout` seconds for the filter to forward the rest and exit; if a child process still holds the pipe,
        the filter keeps forwarding its lines until it exits."""
        if self._process is None or os.getpid() != self._pid:  # not started, or a forked copy: the parent stops it
            return
        import subprocess

        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        process, self._process = self._process, None
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = None
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:  # a child process still holds the pipe: the filter ends after it
            process.returncode = 0  # not waited for (no "still running" warning): it is detached, nothing is lost

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
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
_FILTER: StderrFilter | None = None


def is_quiet() -> bool:
    """Whether this process started quiet (see `quiet_start`)."""
    return _QUIET


@contextlib.contextmanager
def quiet_start(enabled: bool | None = None):
    """Wraps the import of TensorFlow in a command line (bt_keras/cli/train.py): when quiet (`quiet_requested()` by
    default), sets TF_CPP_MIN_LOG_LEVEL=2 unless set, starts the stderr filter (`StderrFilter`), and lists the GPUs
    inside the block (so the cuInit error of a GPU-less machine is dropped; listing physical devices leaves them
    configurable). When the block ends, TensorFlow's start-up noise stops being dropped; the filter itself stays until
    the process exits (it then drops only `is_harmless_notice` lines)."""
    global _QUIET, _FILTER
    enabled = quiet_requested() if enabled is None else enabled
    if not enabled or "tensorflow" in sys.modules:  # already loaded: its start-up lines are already out
        yield
        return
    _QUIET = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if _FILTER is None:
        _FILTER = StderrFilter().start()
        if _FILTER.active:
            import atexit

            atexit.register(_FILTER.stop)
    try:
        yield
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
    finally:
        _FILTER.end_startup()


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


if __name__ == "__main__" and sys.argv[1:2] == [_FILTER_FLAG]:  # the filter process (see StderrFilter.start)
    import signal

    for _name in ("SIGINT", "SIGQUIT", "SIGTERM", "SIGHUP"):  # it ends when the writers have gone, never before
        signal.signal(getattr(signal, _name), signal.SIG_IGN)
    _filter_lines(0, 1, startup=sys.argv[2:3] != ["0"])
