"""Test set-up: split the CPU into 4 logical devices, so multi-replica strategies can be tested on one machine.

This must run before TensorFlow initialises its devices, which is why it lives here, imported first by pytest.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 4

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)
