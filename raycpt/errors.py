"""The root of raycpt's own errors.

Every error raycpt raises on purpose (bad config, bad data, an unusable checkpoint, unreachable
storage ...) derives from `RaycptError`: the CLI renders it as one paragraph and exits 2, and a
worker that raises one fails the run at once instead of being retried (it would fail the same way
again). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

# Ray Data appends its retry account to a failed task's error message (ray/data/_internal/util.py,
# "Failed to ... after 1/1 attempts ... if you believe this to be transient."): about Ray's retry
# knobs, not the user's problem, and raycpt's message already says the fix.
_RAY_DATA_RETRY_NOTE = re.compile(r"\nFailed to [^\n]* after \d+/\d+ attempts \(total backoff [^\n]*\)\..*\Z", re.S)


class RaycptError(Exception):
    """An error whose message tells the user what is wrong, which key or file, and the fix."""

    # Raised in a worker, a restart would meet it again: the run ends at once (see
    # raycpt/train/not_retried.py). True for errors that can pass (storage unreachable for a while).
    retry_in_workers = False


def user_message(err: RaycptError) -> str:
    """The error's message as the user reads it: raycpt's text without what Ray added on the way."""
    return _RAY_DATA_RETRY_NOTE.sub("", str(err))


class UsageError(RaycptError, ValueError):
    """A command-line argument or flag that cannot work; the message names it and the fix."""


def find_raycpt_error(e: BaseException | None, _depth: int = 0) -> RaycptError | None:
    """The raycpt error behind `e`: `e` itself, or the one Ray wrapped (a task's or an actor's
    error, a Ray Data stage, a Ray Train worker or controller failure); None when there is none.

    Ray re-raises a remote error as a class that derives from both RayTaskError and the original
    class, with the remote traceback in its text, so the original (`cause`) is preferred."""
    if e is None or _depth > 8:
        return None
    if isinstance(e, RaycptError) and getattr(e, "cause", None) is None:
        return e  # raised by raycpt here, not a Ray wrapper of a remote one
    inner: list[BaseException | None] = [getattr(e, "cause", None)]
    inner.append(getattr(e, "_base_exc", None))  # Ray Train's UserExceptionWithTraceback
    inner.append(getattr(e, "controller_failure", None))  # Ray Train's ControllerError
    for attr in ("worker_failures", "failures"):  # Ray Train's WorkerGroupError, DCP's CheckpointException
        failures = getattr(e, attr, None)  # rank -> error (DCP: rank -> (error, traceback))
        if isinstance(failures, dict):
            for k in sorted(failures):
                f = failures[k]
                inner.append(f[0] if isinstance(f, tuple) and f else f)
    inner += [e.__cause__, None if e.__suppress_context__ else e.__context__]
    for sub in inner:
        if isinstance(sub, BaseException) and sub is not e:
            found = find_raycpt_error(sub, _depth + 1)
            if found is not None:
                return found
    return e if isinstance(e, RaycptError) else None
