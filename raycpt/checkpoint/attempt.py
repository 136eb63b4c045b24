"""Attempt fencing: only the newest start of a run may commit or delete in its folder.

Workers can outlive their driver (Ray gives each its own process group; a head node can die while
worker nodes live on), so an old attempt may still be saving while a newer one trains in the same
run folder. Every start writes its attempt id to `<run>/ATTEMPT`; rank 0 of an attempt reads it
back before it commits a checkpoint, deletes one or writes the sample log, and an attempt that
finds a newer id stops with `AttemptFenced` instead of writing over the newer attempt's work.
Ids sort by start time, so "newer" needs no coordination beyond the one small object.
"""

from __future__ import annotations

import time
import uuid

from raycpt import storage
from raycpt.errors import RaycptError

ATTEMPT_FILE = "ATTEMPT"


class AttemptFenced(RaycptError, RuntimeError):
    """A newer attempt of the run has started; this one must not write into the run folder."""


def new_attempt_id() -> str:
    """The start time in nanoseconds (orders attempts), then a random tail (tells apart two
    attempts that start in the same nanosecond on different nodes)."""
    return f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"


def _started_ns(attempt_id: str) -> int:
    return int(attempt_id.split("-", 1)[0])


class AttemptFence:
    """One attempt's claim on a run folder; `claim()` once at the start (rank 0), `check()`
    before every commit or deletion."""

    def __init__(self, run_uri: str, attempt_id: str):
        self.run_uri = run_uri
        self.attempt_id = attempt_id
        self.uri = storage.join(run_uri, ATTEMPT_FILE)

    def claim(self) -> None:
        storage.write_json(self.uri, {"attempt": self.attempt_id, "wall_time": time.time()})

    def newest(self) -> str | None:
        if not storage.exists(self.uri):
            return None
        return str(storage.read_json(self.uri)["attempt"])

    def check(self, action: str) -> None:
        """Raise AttemptFenced when a newer attempt has claimed the run folder."""
        newest = self.newest()
        if newest is not None and newest != self.attempt_id and _started_ns(newest) >= _started_ns(self.attempt_id):
            raise AttemptFenced(
                f"{self.run_uri}: attempt {self.attempt_id} stops before it would {action}: a newer attempt "
                f"({newest}, see {self.uri}) has started in this run folder. Nothing to fix if that attempt is "
                f"the one you want; otherwise stop it and resubmit"
            )
