"""A deadline on every training step read from a tf.data service: a dispatcher that dies mid-run ends the run.

Why a thread: once the dispatcher is gone, TensorFlow's client retries it forever inside `next(iterator)`, a C++ call
that no Python exception or signal handler interrupts, so the trainer's loop never regains control. The watchdog
thread notices a step that has not finished for `stall_s` seconds, asks the dispatcher at the address whether it still
answers (`bt_keras.data.service.dispatcher_problem`), and when it does not, calls `on_lost(message)` with one line
naming the address; the trainer's `on_lost` releases the workdir lock and ends the process. A slow step (a long
epoch, a busy worker) with a dispatcher that answers is left alone.

Only a step in flight counts: saves, callbacks and evaluations between steps are never cut short, so the last
checkpoint is whole (CheckpointManager writes its index last in any case).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from bt_keras.data import service


class DispatcherWatchdog:
    """Watches the steps of a run reading from the tf.data service at `address` ('grpc://HOST:PORT').

    Call `step_started()` before each step and `step_finished()` after it, inside `with watchdog:` (which starts and
    stops the thread). `on_lost(message)` runs in the watchdog's thread, at most once."""

    def __init__(self, address: str, stall_s: float, on_lost: Callable[[str], None], poll_s: float | None = None):
        self.address, self.stall_s, self.on_lost = address, float(stall_s), on_lost
        self.poll_s = poll_s if poll_s is not None else max(0.5, min(5.0, self.stall_s / 4))
        self._step_since: float | None = None  # monotonic time the step in flight began; None between steps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bt_keras-dispatcher-watchdog", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=self.poll_s + 1)

    def step_started(self) -> None:
        self._step_since = time.monotonic()

    def step_finished(self) -> None:
        self._step_since = None

    def stalled_for(self) -> float:
        """Seconds the step in flight has run (0 between steps)."""
        since = self._step_since
        return 0.0 if since is None else time.monotonic() - since

    def _watch(self) -> None:
        """Every `poll_s`: a step stalled past `stall_s` while the dispatcher does not answer is the end of the run."""
        while not self._stop.wait(self.poll_s):
            stalled = self.stalled_for()
            if stalled < self.stall_s:
                continue
            problem = service.dispatcher_problem(self.address, timeout=min(5.0, self.stall_s))
            if problem and self.stalled_for() > 0:  # still in the same stalled step
                self.on_lost(f"The tf.data service dispatcher {self.address} stopped answering ({problem}) and no "
                             f"training step has finished for {stalled:.0f} s, so the run is stopped; the last "
                             "complete checkpoint is kept. Restart the dispatcher (and its workers) at that address, "
                             "then run the same command to resume.")
                return
