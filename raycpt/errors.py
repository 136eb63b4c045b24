"""The root of raycpt's own errors.

Every error raycpt raises on purpose (bad config, bad data, an unusable checkpoint, unreachable
storage ...) derives from `RaycptError`: the CLI renders it as one paragraph and exits 2, and a
worker that raises one fails the run at once instead of being retried (it would fail the same way
again). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
from typing import Any

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


def _inner_errors(e: BaseException) -> list[BaseException]:
    """The errors `e` carries: a Ray wrapper's original (`cause`), Ray Train's wrapped user error
    and controller failure, per-rank failures, then Python's own chain."""
    inner: list[Any] = [getattr(e, "cause", None)]
    inner.append(getattr(e, "_base_exc", None))  # Ray Train's UserExceptionWithTraceback
    inner.append(getattr(e, "controller_failure", None))  # Ray Train's ControllerError
    for attr in ("worker_failures", "failures"):  # Ray Train's WorkerGroupError, DCP's CheckpointException
        failures = getattr(e, attr, None)  # rank -> error (DCP: rank -> (error, traceback))
        if isinstance(failures, dict):
            for k in sorted(failures):
                f = failures[k]
                inner.append(f[0] if isinstance(f, tuple) and f else f)
    inner += [e.__cause__, None if e.__suppress_context__ else e.__context__]
    return [sub for sub in inner if isinstance(sub, BaseException) and sub is not e]


def error_chain(e: BaseException | None, max_depth: int = 8) -> list[BaseException]:
    """`e` and every error inside it (`_inner_errors`, recursively), depth first, each once."""
    seen: list[BaseException] = []

    def visit(err: BaseException, depth: int) -> None:
        if depth > max_depth or any(err is s for s in seen):
            return
        seen.append(err)
        for sub in _inner_errors(err):
            visit(sub, depth + 1)

    if e is not None:
        visit(e, 0)
    return seen


def find_raycpt_error(e: BaseException | None) -> RaycptError | None:
    """The raycpt error behind `e`: `e` itself, or the one Ray wrapped (a task's or an actor's
    error, a Ray Data stage, a Ray Train worker or controller failure); None when there is none.

    Ray re-raises a remote error as a class that derives from both RayTaskError and the original
    class, with the remote traceback in its text, so the original (`cause`) is preferred."""
    chain = error_chain(e)
    for err in chain:
        if isinstance(err, RaycptError) and getattr(err, "cause", None) is None:
            return err  # raised by raycpt, not a Ray wrapper of a remote one
    wrappers = [err for err in chain if isinstance(err, RaycptError)]
    return wrappers[-1] if wrappers else None
