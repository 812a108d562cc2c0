"""A `--callbacks` factory that sleeps after every training step, so a test can kill a tiny run between two steps
(tests/train/test_sharding.py): the tiny network steps in milliseconds, a real one in a second or more."""

import time

import keras

SECONDS_PER_STEP = 0.25


class _Sleep(keras.callbacks.Callback):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(self.seconds)


def make():
    return _Sleep(SECONDS_PER_STEP)


def make_half_second():
    """Twice as slow: for a test that must stop a run twice, at steps it cannot choose exactly, before it ends."""
    return _Sleep(2 * SECONDS_PER_STEP)
