"""Probe run by tests/method/test_optim.py in ONE fresh process (so the kernel's cached state starts empty): LARS
without the native kernel falls back to TensorFlow ops, and native=True refuses with the reason, in two cases one
after the other, each announced on stdout and stderr by a `CASE name` line:

- turned-off: BT_KERAS_NATIVE=0. `kernels.lars_update()` returns before it builds or caches anything, so the next
  case still starts from an empty cache state.
- compiler-fails: BT_KERAS_NATIVE unset, CXX=false and a fresh cache folder: the first build fails, LARS falls back
  and logs why (the warning users see, on stderr after this case's line).

Both settings are read when the kernel is first asked for, not at import, so one interpreter serves both cases.

    python tests/subprocess_scripts/lars_fallback.py CACHE_DIR
"""

import os
import sys

import keras
import numpy as np
import tensorflow as tf

from bt_keras import kernels
from bt_keras.method.optim import LARS

CASES = {"turned-off": {"BT_KERAS_NATIVE": "0"}, "compiler-fails": {"CXX": "false"}}

for name, settings in CASES.items():
    for key in ("BT_KERAS_NATIVE", "CXX"):  # only this case's own settings, not one the developer's shell exports
        os.environ.pop(key, None)
    os.environ.update(settings, BT_KERAS_CACHE_DIR=os.path.join(sys.argv[1], name))
    print("CASE", name, flush=True)
    print("CASE", name, file=sys.stderr, flush=True)
    assert not kernels._state, "a case ran with the kernel's state already set"
    var = keras.Variable(np.ones((4, 4), np.float32))
    LARS(0.5).apply_gradients([(tf.ones((4, 4)), var)])
    assert kernels.lars_update() is None and np.all(var.numpy() < 1)
    try:
        LARS(0.5, native=True).apply_gradients([(tf.ones((4, 4)), var)])
    except RuntimeError as error:
        print("REFUSED", error, flush=True)
    sys.stderr.flush()
