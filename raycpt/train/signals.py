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

