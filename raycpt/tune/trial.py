"""One sweep trial: a normal raycpt training run, started from inside a Ray Tune trial.

This is the pattern Ray 2.60 documents for Ray Train V2 (docs: train/user-guides/
hyperparameter-optimization): the Tune trial is a light function that builds a TorchTrainer and
calls `fit()`; the training workers are the Train run's own, placed by Ray Train in a placement
group of their own, so a trial holds exactly its scaling section's workers plus a small driver.
When Tune stops the trial (ASHA, or the sweep ends), the trial's actor exits; the Train
controller and workers it owns go with it and Ray Train's placement-group cleaner removes their
placement group (tests/test_tune.py checks that none is left).

Every trial has its own deterministic run name (from the Tune trial id, which a restored sweep
keeps), so a trial restarted after a driver crash resumes from its own newest committed
checkpoint by raycpt's ordinary start decision. All trials read the same prepared shards.
"""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from raycpt import storage
from raycpt.config import parse_job
from raycpt.placement import RegisterPlacementGroups
from raycpt.tune.config import ObjectiveSection, TuneSection, trial_tree
from raycpt.tune.objective import score_report


def trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


class TrialReportCallback(TuneReportCallback):
    """Forward the worker loop's evaluations to Tune, scored by the sweep objective.

    Progress reports (loss, lr, tokens/s) stay out of Tune: the scheduler judges trials on the
    held-out per-domain losses only, and each result Tune sees carries `objective` and `step`."""

    def __init__(self, roles: dict[str, str], objective: dict[str, Any]):
        super().__init__()
        self._roles = roles
        self._objective = ObjectiveSection.model_validate(objective)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        scored = score_report(metrics[0], self._roles, self._objective)
        if scored is None:
            return
        super().after_report(run_context, [{**metrics[0], **scored.as_metrics()}], None)


def run_trial(values: dict[str, Any], spec: dict[str, Any]) -> None:
    """Tune function trainable: `values` are the trial's dotted keys -> values; `spec` is the
    sweep (base job tree, tune section, where trial runs live, loop options)."""
    import ray.tune

    from raycpt.launch import build_trainer

    tune = TuneSection.model_validate(spec["tune"])
    trial_id = ray.tune.get_context().get_trial_id()
    job = parse_job(trial_tree(spec["job"], tune, values, trial_run_name(trial_id), spec["runs_uri"]))
    storage.configure_storage(job.run.s3_endpoint_url)
    roles = {s.name: s.role for s in job.data.sources}
    callbacks = [TrialReportCallback(roles, tune.objective.model_dump()),
                 RegisterPlacementGroups(spec["registry"], trial_id)]
    # A failed Train run raises here, so Tune marks the trial errored and may restart it.
    build_trainer(job, spec.get("loop_options"), callbacks=callbacks).fit()
