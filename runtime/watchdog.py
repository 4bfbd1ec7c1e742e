"""watchdog: report a training step that runs far past the time its plan predicts.

A hang in a streamed step is silent: the issuing thread waits for an update, the optimizer thread for a
copy's event, the GPU for nothing at all. The watchdog names the step, how long it has run against the
prediction, and prints every thread's Python stack, so the report says where each one waits. It only
reports (once per step); it never stops training.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback

FLOOR_SECONDS = 30.0
"""No report before this: short steps vary by more than any multiple of a millisecond prediction."""


class Watchdog:
    def __init__(self, predicted_seconds: float, factor: float, floor_seconds: float | None = None):
        self.predicted, self.factor = max(predicted_seconds, 1e-9), factor
        self.floor = FLOOR_SECONDS if floor_seconds is None else floor_seconds
        self.limit = max(factor * predicted_seconds, self.floor)
        self.running: dict[int, float] = {}
        """Step -> when it was issued (time.monotonic)."""
        self.reported: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="mtc-watchdog", daemon=True)
        self.thread.start()

    def started(self, step: int) -> None:
        with self.lock:
            self.running[step] = time.monotonic()

    def finished(self, step: int) -> None:
        with self.lock:
            self.running.pop(step, None)

    def close(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        while not self.stopped.wait(min(1.0, self.limit / 4)):
            with self.lock:
                late = [(step, time.monotonic() - started) for step, started in self.running.items()
                        if step not in self.reported and time.monotonic() - started > self.limit]
                self.reported.update(step for step, _ in late)
            for step, elapsed in late:
                self._report(step, elapsed)

    def _report(self, step: int, elapsed: float) -> None:
        stacks = []
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident != threading.get_ident():
                stacks.append(f"--- thread {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame)))
        print(f"mtc watchdog: step {step + 1} of this plan has run {elapsed:.1f} s, {elapsed / self.predicted:.0f}x "
              f"the {self.predicted:.3g} s the plan predicts (reported past {self.limit:.3g} s: {self.factor:g}x, at "
              f"least {self.floor:g} s); it has not finished. Where each thread is:\n" + "\n".join(stacks),
              file=sys.stderr, flush=True)
