"""One console line per epoch while training, with a progress bar: what `python -m bt_keras.train` shows.

    epoch  3/20 ━━━━━━━━━━━━━━━━━━━━ 11/11    2.1 s  loss 39.8  on-diag 9.1  off-diag 5899  kNN top-1 0.953

`ProgressLines` is the callback the trainer attaches (chief only); `EpochProgress` draws one epoch's line. The kNN
accuracy appears on the epochs the kNN monitor measured it (the monitor runs before this callback).
"""

from __future__ import annotations

import sys
import time

import keras

_METRICS = (("loss", "loss", "{:.1f}"), ("on_diagonal", "on-diag", "{:.1f}"), ("off_diagonal", "off-diag", "{:.0f}"),
            ("knn_top1", "kNN top-1", "{:.3f}"))


class EpochProgress:
    """One console line per epoch: `epoch  3/20 ━━━━━━━━━━━━━━━━━━━━ 11/11  2.1 s  loss 339.8  on-diag ...`.

    On a terminal the line is redrawn as steps finish (at most 10 times a second); in a file or pipe only the
    finished line is written, so logs stay one line per epoch.
    """

    WIDTH = 20

    def __init__(self, epoch: int, epochs: int, steps: int, *, stream=None, enabled: bool = True):
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.stream = sys.stdout if stream is None else stream
        self.enabled = enabled
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def line(self, done: int, logs: dict) -> str:
        filled = int(round(self.WIDTH * done / max(self.steps, 1)))
        bar = "━" * filled + " " * (self.WIDTH - filled)
        digits = len(str(self.epochs))
        parts = [f"epoch {self.epoch + 1:>{digits}}/{self.epochs} {bar} {done:>{len(str(self.steps))}}/{self.steps}",
                 f"{time.perf_counter() - self.start:5.1f} s"]
        parts += [f"{label} {fmt.format(logs[key])}" for key, label, fmt in _METRICS if key in logs]
        return "  ".join(parts)

    def update(self, done: int, logs: dict) -> None:
        now = time.perf_counter()
        if self.live and (now - self._last_draw >= 0.1 or done == self.steps):
            self._last_draw = now
            self.stream.write("\r" + self.line(done, logs) + "\x1b[K")
            self.stream.flush()

    def finish(self, logs: dict) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.live else "") + self.line(self.steps, logs) + ("\x1b[K" if self.live else "")
                              + "\n")
            self.stream.flush()


class ProgressLines(keras.callbacks.Callback):
    """An `EpochProgress` line per epoch of `epochs` epochs of `steps_per_epoch` steps. Batch logs hold tensors on
    the steps the trainer does not read back, so the line shows the last values read (Python floats) only."""

    def __init__(self, epochs: int, steps_per_epoch: int, stream=None):
        super().__init__()
        self.epochs, self.steps_per_epoch, self.stream = epochs, steps_per_epoch, stream
        self.bar, self.values = None, {}

    def on_epoch_begin(self, epoch, logs=None):
        self.bar, self.values = EpochProgress(epoch, self.epochs, self.steps_per_epoch, stream=self.stream), {}

    def on_train_batch_end(self, batch, logs=None):
        self.values.update({k: v for k, v in (logs or {}).items() if isinstance(v, float)})
        if self.bar is not None:
            self.bar.update(batch + 1, self.values)

    def on_epoch_end(self, epoch, logs=None):
        if self.bar is not None:
            self.bar.finish({**self.values, **{k: v for k, v in (logs or {}).items() if isinstance(v, float)}})
            self.bar = None
