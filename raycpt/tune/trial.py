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

Under synchronous successive halving (raycpt/tune/schedulers.py) Tune pauses a trial at a rung
by ending it, and starts it again once it is promoted. So that nothing is trained twice, the
worker loop saves a checkpoint at every rung (besides the job's own `checkpoint.interval_steps`),
the trial's result at a rung reaches Tune only once that step's checkpoint is committed, and the
workers wait at the rung until the scheduler lets them train on (raycpt/train/rung_wait.py): a
paused trial trained nothing past its rung.

Start-up: with the loop option `timeline_dir`, each start of a trial appends its phases to
<timeline_dir>/<trial id>.jsonl (trial_start here, then the worker loop's worker_start,
model_built, model_ready, first_step), which `raycpt bench tune` reads.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from raycpt import storage
from raycpt.config import parse_job
from raycpt.placement import RegisterPlacementGroups
from raycpt.train.rung_wait import allowance_uri
from raycpt.tune.config import ObjectiveSection, TuneSection, trial_tree
from raycpt.tune.objective import objective_roles, score_report


def trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


class TrialReportCallback(TuneReportCallback):
    """Forward the worker loop's evaluations to Tune, scored by the sweep objective.

    Progress reports (loss, lr, tokens/s) stay out of Tune: the scheduler judges trials on the
    held-out per-domain losses only, and each result Tune sees carries `objective` and `step`.
    An evaluation at one of `hold_steps` (the rungs where Tune may pause the trial) is held back
    until the worker loop reports that step's checkpoint committed."""

    def __init__(self, roles: dict[str, str], objective: dict[str, Any], max_steps: int,
                 hold_steps: list[int] | None = None):
        super().__init__()
        self._roles = roles
        self._objective = ObjectiveSection.model_validate(objective)
        self._max_steps = max_steps
        self._hold_steps = set(hold_steps or [])
        self._held: dict[str, Any] | None = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        scored = score_report(metrics[0], self._roles, self._objective, self._max_steps)
        if scored is None:
            held = self._held
            if checkpoint is not None and held is not None and metrics[0].get("step", -1) >= held["step"]:
                self._held = None
                super().after_report(run_context, [held], None)
            return
        result = {**metrics[0], **scored.as_metrics()}
        if result.get("step") in self._hold_steps:
            self._held = result
            return
        super().after_report(run_context, [result], None)


def mark_trial_start(timeline_dir: str | None, trial_id: str) -> str | None:
    """Append a trial_start mark to the trial's timeline file; returns the file (None: off)."""
    if not timeline_dir:
        return None
    os.makedirs(timeline_dir, exist_ok=True)
    path = os.path.join(timeline_dir, f"{trial_id}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"event": "trial_start", "step": None, "time": time.time()}) + "\n")
    return path


def run_trial(values: dict[str, Any], spec: dict[str, Any]) -> None:
    """Tune function trainable: `values` are the trial's dotted keys -> values; `spec` is the
    sweep (base job tree, tune section, where trial runs live, loop options)."""
    import ray.tune

    from raycpt.launch import build_trainer

    tune = TuneSection.model_validate(spec["tune"])
    trial_id = ray.tune.get_context().get_trial_id()
    tree = trial_tree(spec["job"], tune, values, trial_run_name(trial_id), spec["runs_uri"])
    rungs = spec.get("pause_rungs") or []
    job = parse_job(tree)
    storage.configure_storage(job.run.s3_endpoint_url)
    loop_options = dict(spec.get("loop_options") or {})
    if rungs:  # the workers save and wait at each rung for the scheduler's verdict (raycpt/train/rung_wait.py)
        loop_options["rung_wait"] = {"rungs": rungs, "allowance_uri": allowance_uri(spec["allowances_uri"], trial_id)}
    timeline = mark_trial_start(loop_options.pop("timeline_dir", None), trial_id)
    if timeline:
        loop_options["timeline_file"] = timeline
    roles = objective_roles(job)  # sources and probes
    callbacks = [TrialReportCallback(roles, tune.objective.model_dump(), job.train.max_steps, hold_steps=rungs),
                 RegisterPlacementGroups(spec["registry"], trial_id)]
    # A failed Train run raises here, so Tune marks the trial errored and may restart it.
    build_trainer(job, loop_options, callbacks=callbacks, gpus_per_worker=tune.gpus_per_trial or 1.0).fit()
