"""Run by tests/cli/test_console.py in a fresh process; writes TensorFlow-like lines to file descriptor 2 under the
quiet console's stderr filter. `python stderr_filter.py MODE`:

  window        inside `console.StderrFilter`: start-up noise, a real C++ error, a plain line, a Python traceback and
                a last line without a newline; then one noise line after the filter has stopped (the default)
  command       enters the quiet mode as `python -m bt_keras.train` does (`console.quiet_start`, with a fake
                TensorFlow that prints start-up noise on import), then writes lines after the import window
  abort-import  like `command`, but the fake TensorFlow writes a FATAL line and aborts while it loads
  abort-later   like `command`, then a FATAL line and os.abort() after the import window
  many          like `command`, then many numbered lines (os.write and print) mixed with lines to drop, a worker
                process that writes after this process has exited, and a last line without a newline
  partial       like `command`, then a progress-bar line without a newline; waits for a line on stdin, then exits
  interrupt     like `command`, then says "ready" on stdout and sleeps until a Ctrl-C (SIGINT) interrupts it

No real TensorFlow is loaded: the fake one is found first (a meta path finder), so a run takes a fraction of a second.
"""

import importlib.abc
import importlib.util
import os
import signal
import subprocess
import sys
import time
import traceback
import types

from bt_keras.cli import console

NOISE = b"I0000 00:00:1796204516.191248    3633 port.cc:153] oneDNN custom operations are on.\n"
ABSL_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
CUINIT = b"E0000 00:00:1796204516.2    3633 cuda_executor.cc:1228] failed call to cuInit: UNKNOWN ERROR (303)\n"
DT_HALF = (b"E0000 00:00:1796606688.581979    3791 util.cc:131] oneDNN supports DT_HALF only on platforms with "
           b"AVX-512. Falling back to the default Eigen-based implementation if present.\n")
REAL_ERROR = b"E0000 00:00:1796606688.6    3791 kernel.cc:77] a real C++ error\n"
FATAL = b"F0000 00:00:1796606688.7    3791 parse_flags_from_env.cc:234] Unknown flag in TF_XLA_FLAGS: --bogus_flag\n"


class FakeTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import tensorflow` gives a module that prints start-up noise like TensorFlow 2.21 on a CPU-only machine."""

    def __init__(self, abort=False):
        self.abort = abort

    def find_spec(self, name, path, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "tensorflow" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        os.write(2, ABSL_BANNER)
        os.write(2, NOISE)
        if self.abort:
            os.write(2, FATAL)
            os.abort()

        def list_physical_devices(kind=None):
            os.write(2, CUINIT)
            return []

        module.config = types.SimpleNamespace(list_physical_devices=list_physical_devices)


def quiet_command(abort=False):
    sys.meta_path.insert(0, FakeTensorFlow(abort))
    with console.quiet_start(enabled=True):
        pass
    assert "tensorflow" in sys.modules


def window():
    with console.StderrFilter():
        os.write(2, NOISE)
        os.write(2, ABSL_BANNER)
        os.write(2, CUINIT)
        os.write(2, REAL_ERROR)
        print("a plain line", file=sys.stderr, flush=True)
        try:
            1 / 0
        except ZeroDivisionError:
            traceback.print_exc()
        os.write(2, b"no newline at the end")
    print("", file=sys.stderr)
    os.write(2, b"W0000 00:00:1796204516.4    3633 later.cc:1] after the window\n")  # passes


def command():
    quiet_command()
    os.write(2, DT_HALF)
    os.write(2, REAL_ERROR)
    os.write(2, FATAL)
    os.write(2, b"W0000 00:00:1796204516.4    3633 later.cc:1] a warning after the window\n")
    print("done", file=sys.stderr)


def many(count=3000):
    quiet_command()
    # The worker ends the command's last line (written without a newline) first.
    worker = ("import os, sys, time\ntime.sleep(0.3)\nos.write(2, b'\\n' + bytes.fromhex(sys.argv[1]))\n"
              "for i in range(200):\n    os.write(2, b'worker %d\\n' % i)\n")
    subprocess.Popen([sys.executable, "-c", worker, DT_HALF.hex()])  # inherits fd 2; outlives this process
    for i in range(count):
        if i % 3 == 0:
            os.write(2, b"line %d via fd 2\n" % i)
        else:
            print(f"line {i} via sys.stderr", file=sys.stderr)
        if i % 100 == 0:
            sys.stderr.flush()
            os.write(2, DT_HALF)
    sys.stderr.flush()
    os.write(2, b"the last line, without a newline")


def partial():
    quiet_command()
    os.write(2, b"\rprogress 1/2")
    sys.stdin.readline()  # the test has seen the partial line
    os.write(2, b"\rprogress 2/2\n")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "window"
    if mode == "window":
        window()
    elif mode == "command":
        command()
    elif mode == "abort-import":
        quiet_command(abort=True)
    elif mode == "abort-later":
        quiet_command()
        os.write(2, FATAL)
        os.abort()
    elif mode == "many":
        many()
    elif mode == "partial":
        partial()
    elif mode == "interrupt":
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the test runner ignores SIGINT
        quiet_command()
        print("ready", flush=True)
        time.sleep(60)
    else:
        sys.exit(f"unknown mode {mode}")
