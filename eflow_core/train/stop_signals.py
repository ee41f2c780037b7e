"""SIGTERM (what schedulers send on preemption) and SIGINT (Ctrl-C) stop training at a step boundary.

The first signal only sets a flag: the step in flight finishes, the trainer commits a checkpoint labelled
with the steps actually applied and exits. A second signal aborts at once (KeyboardInterrupt); committed
checkpoints are never half-written, so nothing is lost but the steps since the last one.
"""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """Context manager installing the handlers (main thread only; elsewhere it does nothing)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None  # name of the first signal
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
