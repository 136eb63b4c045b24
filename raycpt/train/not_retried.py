"""raycpt's own errors raised in the workers end the run at once instead of being retried.

Ray Train retries every worker-group failure up to `FailureConfig.max_failures` times. A
RaycptError (bad data met by the reader, a model folder the workers cannot use, a refused resume)
fails the same way at every attempt: retrying it costs a worker-group start per attempt and buries
the one useful message under Ray's tracebacks. Ray 2.60's failure policy cannot be configured per
error type, so this controller callback watches the controller's state: when the controller is
about to restart the workers after a failure whose cause is a RaycptError, it raises that error,
which the controller treats as a failure of its own (never retried) and `fit()` raises it on the
driver inside a ControllerError; `raycpt.errors.find_raycpt_error` takes it out again. Storage
errors are the exception (`retry_in_workers`): an outage may be over by the next attempt.
"""

from __future__ import annotations

from ray.train.v2._internal.execution.callback import ControllerCallback  # Ray 2.60; pinned in pyproject

from raycpt.errors import RaycptError, find_raycpt_error


class StopOnRaycptError(ControllerCallback):
    """Ray Train callback (runs in the controller): no retry for a raycpt error in a worker."""

    def after_controller_state_update(self, previous_state, current_state) -> None:
        failed = getattr(current_state, "training_failed_error", None)
        if failed is None or type(current_state).__name__ not in ("RestartingState", "ReschedulingState"):
            return
        err = find_raycpt_error(failed)
        if err is not None and not err.retry_in_workers:
            raise plain(err)


def plain(err: RaycptError) -> RaycptError:
    """The error without its remote traceback (the message says all; --debug on the driver still
    shows where the driver got it)."""
    return err.with_traceback(None)


def run_worker(config: dict) -> None:
    """Ray Train `train_loop_per_worker`: raycpt's worker loop, with a raycpt error met anywhere in
    it (also inside a Ray Data read, which arrives wrapped in Ray's own errors) raised as itself.
    Ray pickles a worker's error to the controller without its `__cause__` chain, so the wrapped
    original would be lost on the way."""
    from raycpt.train.loop import run_worker as loop

    try:
        loop(config)
    except Exception as e:
        err = find_raycpt_error(e)
        if err is None or err is e:
            raise
        raise plain(err) from None
