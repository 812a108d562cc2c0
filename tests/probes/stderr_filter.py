"""Run by tests/test_console.py in a fresh process: writes TensorFlow-like start-up noise, a real C++ error, a plain
line and a Python traceback to file descriptor 2 inside `console.StderrFilter`, then one noise line after it."""

import os
import sys
import traceback

from bt_keras import console

NOISE = b"I0000 00:00:1796204516.191248    3633 port.cc:153] oneDNN custom operations are on.\n"

with console.StderrFilter() as active:
    os.write(2, NOISE)
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
    os.write(2, b"E0000 00:00:1796204516.2    3633 cuda_executor.cc:1228] failed call to cuInit: UNKNOWN ERROR (303)\n")
    os.write(2, b"E0000 00:00:1796204516.3    3633 kernel.cc:77] a real C++ error\n")
    print("a plain line", file=sys.stderr, flush=True)
    try:
        1 / 0
    except ZeroDivisionError:
        traceback.print_exc()
    os.write(2, b"no newline at the end")
print("", file=sys.stderr)
os.write(2, b"W0000 00:00:1796204516.4    3633 later.cc:1] after the window\n")  # passes
print(f"dropped {len(active.dropped)}")
