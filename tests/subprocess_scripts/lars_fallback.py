"""Probe run by tests/method/test_optim.py in a fresh process (so the kernel's cached state starts empty): LARS
without the native kernel falls back to TensorFlow ops, and native=True refuses with the reason."""

import keras
import numpy as np
import tensorflow as tf

from bt_keras import kernels
from bt_keras.method.optim import LARS

var = keras.Variable(np.ones((4, 4), np.float32))
LARS(0.5).apply_gradients([(tf.ones((4, 4)), var)])
assert kernels.lars_update() is None and np.all(var.numpy() < 1)
try:
    LARS(0.5, native=True).apply_gradients([(tf.ones((4, 4)), var)])
except RuntimeError as error:
    print("REFUSED", error)
