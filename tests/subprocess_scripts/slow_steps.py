"""A `--callbacks` factory that sleeps after every training step, so a test can kill a tiny run between two steps
(tests/train/test_sharding.py): the tiny network steps in milliseconds, a real one in a second or more."""

import time

import keras

SECONDS_PER_STEP = 0.25


class _Sleep(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(SECONDS_PER_STEP)


def make():
    return _Sleep()
