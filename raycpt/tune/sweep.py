"""The driver of `raycpt tune`: start a sweep, or continue the one the same command started.

A sweep is fixed by its name (`tune.name`, default <run.name>-sweep) and storage: its folder is
<run.storage>/<tune.name>. Re-running the same command after the driver died (Ctrl-C, a lost
head, a retried RayJob) restores Ray Tune's experiment state from that folder
(`Tuner.can_restore` / `Tuner.restore`): finished trials stay finished, unfinished and errored
ones start again and resume from their own newest committed checkpoint. A re-run with a changed
base job or tune section is refused (it would mix two sweeps); give it another tune.name.

Not restored: the scheduler's rung records (Tune does not save scheduler state), so after a
restore ASHA judges the restarted trials against each other from then on.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import ray.tune

from raycpt import storage
from raycpt.config import ConfigError, JobConfig, parse_job
from raycpt.placement import PlacementGroupRegistry, registry_name
from raycpt.tune.config import TuneSection, sweep_fingerprint, trial_tree
from raycpt.tune.results import (
    RUNS_FOLDER,
    SWEEP_FILE,
    TRIALS_FILE,
    collect,
    default_values,
    format_summary,
    sweep_uri,
    write_results,
)
from raycpt.tune.trial import run_trial, trial_run_name


class SweepStateCallback(ray.tune.Callback):
    """Runs in the driver. Keeps <sweep>/trials.json current (values, run name, Tune status of
    every trial), so `raycpt status SWEEP` needs no running driver; and gives a finished or
    stopped trial's worker placement groups back (raycpt/placement.py)."""

    def __init__(self, uri: str, registry: str):
        self.uri = uri
        self.registry = registry

    def _release(self, trial) -> None:
        try:
            n = ray.get(ray.get_actor(self.registry).release.remote(trial.trial_id), timeout=60)
        except Exception as e:  # noqa: BLE001 - log and go on; the job's end frees everything
            print(f"raycpt tune: releasing trial {trial.trial_id}'s resources failed: {e}", flush=True)
            return
        if n:
            print(f"raycpt tune: trial {trial.trial_id} stopped; removed {n} placement group(s) it left", flush=True)

    def _write(self, trials: list, trial=None, status: str | None = None, error: str | None = None) -> None:
        path = storage.join(self.uri, TRIALS_FILE)
        known = storage.read_json(path)["trials"] if storage.exists(path) else {}
        for t in trials:
            entry = known.get(t.trial_id, {})
            entry.update(run_name=trial_run_name(t.trial_id), values=dict(t.config), status=t.status)
            if trial is not None and t.trial_id == trial.trial_id:
                entry["status"] = status or t.status
                if error is not None:
                    entry["error"] = error
            known[t.trial_id] = entry
        storage.write_json(path, {"trials": known})

    def on_trial_start(self, iteration, trials, trial, **info):
        ray.get(ray.get_actor(self.registry).reopen.remote(trial.trial_id))
        self._write(trials, trial, "RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._write(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)
        self._write(trials, trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)
        self._write(trials, trial, "ERROR", error=str(getattr(trial, "error_file", "") or "see the trial's logs"))

    def on_experiment_end(self, trials, **info):
        self._write(trials)


def _trial_dirname(trial) -> str:
    return f"tune-{trial.trial_id}"


def _search_space(tune: TuneSection) -> dict[str, Any]:
    space = {}
    for key, spec in tune.space.items():
        if spec.kind == "loguniform":
            space[key] = ray.tune.loguniform(*spec.loguniform)
        elif spec.kind == "uniform":
            space[key] = ray.tune.uniform(*spec.uniform)
        elif spec.kind == "choice":
            space[key] = ray.tune.choice(spec.choice)
        else:
            space[key] = ray.tune.grid_search(spec.grid)
    return space


def _scheduler(tune: TuneSection, job: JobConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    s = tune.scheduler
    budget = tune.max_steps_per_trial or job.train.max_steps
    grace = s.grace_period_steps or job.eval.interval_steps or budget
    if s.kind == "asha":
        # time_attr "step": rungs are optimizer steps, whatever the evaluation interval.
        return ASHAScheduler(time_attr="step", max_t=budget, grace_period=grace, reduction_factor=s.reduction_factor)
    if s.kind == "median":
        return MedianStoppingRule(time_attr="step", grace_period=grace, min_samples_required=s.min_samples_required)
    return FIFOScheduler()


def trials_that_fit(job: JobConfig, tune: TuneSection, resources: dict[str, float]) -> int:
    """How many trials the cluster holds at once now: each needs its driver and its workers
    (at the elastic maximum) plus its Ray Data reader and a CPU for the stream's short tasks."""
    workers = job.worker_range()[1]
    need = {"CPU": tune.trial_driver_resources.get("CPU", 0) + workers * job.scaling.cpus_per_worker
            + job.data.reader_cpus + 1}
    if job.scaling.use_gpu:
        need["GPU"] = workers
    fits = [math.floor(resources.get(k, 0) / v) for k, v in need.items() if v > 0]
    return max(1, min(fits))


def _check_same_sweep(uri: str, fingerprint: str, job: JobConfig, tune: TuneSection) -> None:
    from raycpt.checkpoint.resume import flatten

    saved = storage.read_json(storage.join(uri, SWEEP_FILE))
    if saved["fingerprint"] == fingerprint:
        return
    now = {"job": job.model_dump(mode="json"), "tune": tune.model_dump(mode="json")}
    a, b = flatten({"job": saved["job"], "tune": saved["tune"]}), flatten(now)
    diffs = [f"  {k.split('.', 1)[1] if k.startswith('job.') else k}: {a.get(k)!r} -> {b.get(k)!r}"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    raise ConfigError(f"sweep {tune.name} at {uri} was started with another config:\n" + "\n".join(diffs)
                      + "\nRevert the change to continue it, or start a new sweep with tune.name=<new name>")


def run_sweep(job: JobConfig, tune: TuneSection, address: str | None = None,
              loop_options: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Run (or continue) the sweep to its end; returns results.json's content."""
    from ray.tune import Tuner
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raycpt.launch import connect_ray, preflight, ray_storage

    t0 = time.time()
    storage.configure_storage(job.run.s3_endpoint_url)
    uri = sweep_uri(job, tune)
    runs_uri = storage.join(uri, RUNS_FOLDER)
    # The data must fit the model before any trial starts (one check serves all trials).
    preflight(parse_job(trial_tree(job.model_dump(mode="json"), tune, {}, "preflight", runs_uri)))
    connect_ray(min_cpus=job.worker_range()[1] * job.scaling.cpus_per_worker + 1, address=address)

    fingerprint = sweep_fingerprint(job, tune)
    registry = registry_name(f"sweep-{tune.name}")
    # Owned by this driver and held until fit() returns: it lives as long as the sweep's trials can.
    registry_actor = PlacementGroupRegistry.options(name=registry, get_if_exists=True).remote()
    spec = {"job": job.model_dump(mode="json"), "tune": tune.model_dump(mode="json"), "runs_uri": runs_uri,
            "loop_options": loop_options or {}, "registry": registry}
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, spec=spec),
                                        {k.lower() if k in ("CPU", "GPU") else k: v
                                         for k, v in tune.trial_driver_resources.items()})
    storage_path, fs = ray_storage(job)
    experiment_path = storage_path.rstrip("/") + "/" + tune.name
    if storage.exists(storage.join(uri, SWEEP_FILE)):
        _check_same_sweep(uri, fingerprint, job, tune)
    if Tuner.can_restore(experiment_path, storage_filesystem=fs):
        log(f"raycpt tune: continuing sweep {tune.name} from {uri}")
        tuner = Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                              storage_filesystem=fs)
    else:
        concurrent = tune.max_concurrent_trials or trials_that_fit(job, tune, ray.cluster_resources())
        storage.write_json(storage.join(uri, SWEEP_FILE), {
            "format_version": 1, "fingerprint": fingerprint, "job": spec["job"], "tune": spec["tune"],
            "max_concurrent_trials": concurrent, "command": " ".join(sys.argv)})
        first = [default_values(job, list(tune.space))] if tune.evaluate_job_config else []
        log(f"raycpt tune: sweep {tune.name} in {uri}: {tune.num_samples} sample(s) of {', '.join(tune.space)}"
            f"{' + the job config' if first else ''}, {concurrent} at a time, {tune.scheduler.kind} on the objective")
        tuner = Tuner(
            trainable,
            param_space=_search_space(tune),
            tune_config=ray.tune.TuneConfig(
                metric="objective", mode="min", scheduler=_scheduler(tune, job),
                # The concurrency limit goes to the search algorithm: Tune ignores
                # max_concurrent_trials when it is given one of its own.
                search_alg=BasicVariantGenerator(points_to_evaluate=first or None, random_state=tune.seed,
                                                 max_concurrent=concurrent),
                # The baseline point takes one sample (with grid keys: one repetition of the grid).
                num_samples=tune.num_samples + len(first),
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=ray.tune.RunConfig(
                name=tune.name, storage_path=storage_path, storage_filesystem=fs,
                failure_config=ray.tune.FailureConfig(max_failures=tune.max_trial_failures),
                callbacks=[SweepStateCallback(uri, registry)], verbose=1,
            ),
        )
    grid = tuner.fit()
    del registry_actor
    summary = collect(uri, job, tune)
    runtime_s = time.time() - t0
    write_results(summary, job, tune, {"runtime_s": runtime_s, "errors": grid.num_errors})
    log(format_summary(summary))
    log(f"sweep runtime {runtime_s:.0f}s | table: {storage.join(uri, 'results.md')} | "
        f"best config: {storage.join(uri, 'best.yaml')}")
    return {**summary.as_dict(), "runtime_s": runtime_s, "errors": grid.num_errors}
