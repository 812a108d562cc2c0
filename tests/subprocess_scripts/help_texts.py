"""Run by tests/cli/test_help.py: the `--help` output of many commands, each run as its own `__main__` in a child
process forked from this one, which has loaded TensorFlow and Keras once (a fresh `python -m` pays that import,
about 5 CPU-seconds, for every command).

    python help_texts.py -m MODULE... [--script PATH...]

Each child runs the command as Python runs it: `runpy.run_module(MODULE, run_name="__main__", alter_sys=True)`, what
`python -m MODULE` does (sys.argv[0] the module's file, the module as `__main__`), or `runpy.run_path(PATH,
run_name="__main__")` for an installed console script, what its `#!python` line does; sys.argv[1:] is `--help`. The
child's file descriptors 1 and 2 go to one file, so all it prints (absl writes the usage from Python and C++ may
write too) is kept, and its flags are its own: absl's FLAGS are defined afresh in every child. Prints one JSON object
{command: [its exit status, its output]} on stdout.
"""

import atexit
import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback

import keras  # noqa: F401  (loaded once here: what every child would otherwise import again)
import tensorflow  # noqa: F401

CHILD_TIMEOUT_S = 60  # a --help takes about a second; one that hangs fails its own test, not all of them


def help_text(kind: str, target: str) -> tuple[int, str]:
    """The exit status and output of `target --help` (`kind`: -m or --script), run in a forked child."""
    with tempfile.TemporaryFile() as out:
        pid = os.fork()
        if pid == 0:  # the child: runs the command, then exits with its status, whatever it does
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                sys.argv = [target, "--help"]
                if kind == "-m":
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(target, run_name="__main__")
                code = 0
            except SystemExit as stop:  # as the interpreter treats it: a number is the status, text is printed
                if stop.code is None or isinstance(stop.code, int):
                    code = stop.code or 0
                else:
                    print(stop.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001  a traceback, as the interpreter prints it
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                atexit._run_exitfuncs()  # what the interpreter's exit runs: the quiet console's filter hands over
                os._exit(code)
        status = _wait(pid, CHILD_TIMEOUT_S)
        out.seek(0)
        text = out.read().decode(errors="replace")
        if status is None:  # a child forked while a TensorFlow thread held a lock can hang: name it, go on
            return -9, f"{target} --help did not finish in {CHILD_TIMEOUT_S} s (killed)\n{text}"
        return os.waitstatus_to_exitcode(status), text


def _wait(pid: int, timeout: float) -> int | None:
    """The child's wait status, or None after killing it when it ran `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def main() -> None:
    kind, commands = None, []
    for arg in sys.argv[1:]:
        if arg in ("-m", "--script"):
            kind = arg
        else:
            commands.append((kind, arg))
    print(json.dumps({target: help_text(kind, target) for kind, target in commands}))


if __name__ == "__main__":
    main()
