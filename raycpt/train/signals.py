"""SIGTERM on a training worker (spot reclaim, pod eviction, `kill PID`) -> a checkpoint at the
next step boundary.

Python lets only a process's main thread install signal handlers and runs them there. Ray Train
runs the training function on a second thread of its worker actor, so the handler is installed
by a task that Ray runs on the actor's main thread (the backend's start hook in `launch.py`). It
only records the request; the training loop polls `sigterm_requested()` at step boundaries. A
second SIGTERM falls through to the handler that was there before (Ray's: exit), so a platform
that insists still stops the process.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

_requested = threading.Event()


def install_sigterm_hook() -> bool:
    """Install the recording handler; False when not on the main thread (then it cannot be)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame) -> None:
        if _requested.is_set():
            if callable(previous):
                previous(signum, frame)
            raise SystemExit(128 + signum)
        _requested.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    return True


def sigterm_requested() -> bool:
    return _requested.is_set()



class StopFlag:
    """Why the loop should save at the next step boundary: a Ray preemption notice (save and
    train on) or SIGTERM on this worker (save and stop)."""

    def __init__(self, ray_train: Any) -> None:
        self.ray_train = ray_train  # None outside Ray Train
        self.reason: str | None = None
        self.preemption_seen = False  # one just-in-time save per notice

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason

    def poll(self, agree: Callable[[bool], bool]) -> bool:
        """On every rank at the same steps (a barrier): whether any worker asks to save now."""
        if self.ray_train is not None and not self.preemption_seen and self.ray_train.get_preemption_info() is not None:
            self.set("preemption notice")
            self.preemption_seen = True
        if sigterm_requested():
            self.set("SIGTERM")
        return agree(self.reason is not None)

    def train_on(self) -> bool:
        """After the stop's checkpoint committed: True (and cleared) for a preemption notice, which
        Ray advises to answer with a save and more training; False for a stop."""
        if self.reason == "preemption notice":
            self.reason = None
            return True
        return False
