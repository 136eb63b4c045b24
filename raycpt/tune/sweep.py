"""The driver of `raycpt tune`: start a sweep, or continue the one the same command started.

A sweep is fixed by its name (`tune.name`, default <run.name>-sweep) and storage: its folder is
<run.storage>/<tune.name>. Re-running the same command after the driver died (Ctrl-C, a lost
head, a retried RayJob) restores Ray Tune's experiment state from that folder
(`Tuner.can_restore` / `Tuner.restore`): finished trials stay finished, unfinished and errored
ones start again and resume from their own newest committed checkpoint. A re-run with a changed
base job or tune section is refused (it would mix two sweeps); give it another tune.name.

Not restored: the scheduler's rung records (Tune does not save scheduler state), so after a
restore the scheduler judges the restarted trials against each other from then on.

Concurrency and early stopping: `tune.max_concurrent_trials` (default: what the cluster holds,
`trials_that_fit`, with `tune.gpus_per_trial` several trials a GPU) decides the scheduler when
`tune.scheduler.kind` is auto (raycpt/tune/schedulers.py says why): synchronous successive
halving when few trials run at once, ASHA when many do.
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
from raycpt.tune.resources import GIB, check_share_fits, job_training_memory, probe_gpu_memory
from raycpt.tune.results import (
    ALLOWANCES_FOLDER,
    RUNS_FOLDER,
    SWEEP_FILE,
    TRIALS_FILE,
    collect,
    default_values,
    format_summary,
    sweep_uri,
    write_results,
)
from raycpt.tune.schedulers import (
    GatedSearcher,
    GatedVariantGenerator,
    SyncSuccessiveHalving,
    TrialGate,
    choose_kind,
    rung_steps,
)
from raycpt.tune.trial import run_trial, trial_run_name


class SweepStateCallback(ray.tune.Callback):
    """Runs in the driver. Keeps <sweep>/trials.json current (values, run name, Tune status of
    every trial), so `raycpt status SWEEP` needs no running driver; and gives a finished or
    stopped trial's worker placement groups back (raycpt/placement.py)."""

    def __init__(self, uri: str, registry: str):
        self.uri = uri
        self.registry = registry

    def release(self, trial) -> None:
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
        self.release(trial)
        self._write(trials, trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.release(trial)
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
        elif spec.kind == "choice" and tune.search != "grid":
            space[key] = ray.tune.choice(spec.choice)
        else:  # grid, and choice under tune.search=grid: every value
            space[key] = ray.tune.grid_search(spec.grid if spec.kind == "grid" else spec.choice)
    return space


def num_trials(tune: TuneSection, with_baseline: bool) -> int:
    """Trials the sweep will run: every sample (times the grid) plus the job-config trial."""
    grid = 1
    if tune.search != "optuna":
        for spec in tune.space.values():
            if spec.kind == "grid" or (spec.kind == "choice" and tune.search == "grid"):
                grid *= len(spec.grid if spec.kind == "grid" else spec.choice)
    return (tune.num_samples + int(with_baseline)) * grid


def pause_rungs(tune: TuneSection, job: JobConfig) -> list[int]:
    """The rungs of synchronous successive halving: grace x factor^k, on evaluation steps."""
    s = tune.scheduler
    budget = tune.max_steps_per_trial or job.train.max_steps
    every = job.eval.interval_steps or budget
    return rung_steps(s.grace_period_steps or every, s.reduction_factor, budget, every)


def build_scheduler(kind: str, tune: TuneSection, job: JobConfig, gate: TrialGate, on_pause, allowances_uri: str):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    s = tune.scheduler
    budget = tune.max_steps_per_trial or job.train.max_steps
    grace = s.grace_period_steps or job.eval.interval_steps or budget
    if kind == "hyperband":
        shares_a_gpu = job.scaling.use_gpu and tune.gpus_per_trial is not None and tune.gpus_per_trial < 1
        return SyncSuccessiveHalving(pause_rungs(tune, job), s.reduction_factor, gate, time_attr="step",
                                     on_pause=on_pause, allowances_uri=allowances_uri,
                                     train_on_while_waiting=not shares_a_gpu)
    if kind == "asha":
        # time_attr "step": rungs are optimizer steps, whatever the evaluation interval.
        return ASHAScheduler(time_attr="step", max_t=budget, grace_period=grace, reduction_factor=s.reduction_factor)
    if kind == "median":
        return MedianStoppingRule(time_attr="step", grace_period=grace, min_samples_required=s.min_samples_required)
    return FIFOScheduler()


def build_search_alg(tune: TuneSection, first: list[dict[str, Any]], concurrent: int, gate: TrialGate | None):
    """Tune's search for tune.search; under synchronous halving its concurrency limit is `gate`
    (a paused trial must not count as running)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if tune.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(points_to_evaluate=first or None, sampler=optuna.samplers.TPESampler(seed=tune.seed))
        return GatedSearcher(searcher, gate) if gate is not None else ConcurrencyLimiter(searcher, concurrent)
    if gate is not None:
        return GatedVariantGenerator(gate, points_to_evaluate=first or None, random_state=tune.seed)
    # The concurrency limit goes to the search algorithm: Tune ignores max_concurrent_trials
    # when it is given one of its own.
    return BasicVariantGenerator(points_to_evaluate=first or None, random_state=tune.seed, max_concurrent=concurrent)


def trials_that_fit(job: JobConfig, tune: TuneSection, resources: dict[str, float]) -> int:
    """How many trials the cluster holds at once now: each needs its driver and its workers
    (at the elastic maximum, or one worker with tune.gpus_per_trial of a GPU) plus its Ray Data
    reader and a CPU for the stream's short tasks."""
    workers = job.worker_range()[1]
    need = {"CPU": tune.trial_driver_resources.get("CPU", 0) + workers * job.scaling.cpus_per_worker
            + job.data.reader_cpus + 1}
    if job.scaling.use_gpu:
        need["GPU"] = tune.gpus_per_trial or workers
    fits = [math.floor(resources.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0]
    return max(1, min(fits))


def check_gpu_share(job: JobConfig, tune: TuneSection, log=print) -> None:
    """Before any trial starts: the GPU share must hold one trial (raycpt/tune/resources.py)."""
    if tune.gpus_per_trial is None or not job.scaling.use_gpu:
        return
    estimate = job_training_memory(job)
    probed = probe_gpu_memory(tune.gpus_per_trial)
    if probed is None:
        log(f"raycpt tune: no GPU node appeared within the probe's timeout; tune.gpus_per_trial="
            f"{tune.gpus_per_trial:g} not checked (one trial needs about {estimate.total_bytes / GIB:.1f} GiB)")
        return
    memory, name = probed
    check_share_fits(estimate, tune.gpus_per_trial, memory, name)
    log(f"raycpt tune: {tune.gpus_per_trial:g} of a {name} ({tune.gpus_per_trial * memory / GIB:.1f} GiB) holds a "
        f"trial (about {estimate.total_bytes / GIB:.1f} GiB)")


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
              loop_options: dict[str, Any] | None = None, log=print,
              callbacks: list[ray.tune.Callback] | None = None) -> dict[str, Any]:
    """Run (or continue) the sweep to its end; returns results.json's content. `callbacks`:
    more Ray Tune callbacks (raycpt bench tune times every trial with one)."""
    from ray.tune import Tuner

    from raycpt.launch import connect_ray, preflight, ray_storage

    t0 = time.time()
    storage.configure_storage(job.run.s3_endpoint_url)
    uri = sweep_uri(job, tune)
    runs_uri = storage.join(uri, RUNS_FOLDER)
    # The data must fit the model before any trial starts (one check serves all trials).
    preflight(parse_job(trial_tree(job.model_dump(mode="json"), tune, {}, "preflight", runs_uri)))
    connect_ray(min_cpus=job.worker_range()[1] * job.scaling.cpus_per_worker + 1, address=address)
    check_gpu_share(job, tune, log)

    fingerprint = sweep_fingerprint(job, tune)
    registry = registry_name(f"sweep-{tune.name}")
    # Owned by this driver and held until fit() returns: it lives as long as the sweep's trials can.
    registry_actor = PlacementGroupRegistry.options(name=registry, get_if_exists=True).remote()
    saved = storage.join(uri, SWEEP_FILE)
    concurrent = (storage.read_json(saved).get("max_concurrent_trials") if storage.exists(saved) else None) \
        or tune.max_concurrent_trials or trials_that_fit(job, tune, ray.cluster_resources())
    first = [default_values(job, list(tune.space))] if tune.evaluate_job_config else []
    kind = choose_kind(tune.scheduler.kind, concurrent, num_trials(tune, bool(first)), tune.scheduler.reduction_factor,
                       tune.scheduler.async_min_concurrent_trials)
    spec = {"job": job.model_dump(mode="json"), "tune": tune.model_dump(mode="json"), "runs_uri": runs_uri,
            "loop_options": loop_options or {}, "registry": registry,
            "pause_rungs": pause_rungs(tune, job) if kind == "hyperband" else [],
            "allowances_uri": storage.join(uri, ALLOWANCES_FOLDER)}
    state_callback = SweepStateCallback(uri, registry)
    gate = TrialGate(concurrent) if kind == "hyperband" else None
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
        storage.write_json(storage.join(uri, SWEEP_FILE), {
            "format_version": 1, "fingerprint": fingerprint, "job": spec["job"], "tune": spec["tune"],
            "max_concurrent_trials": concurrent, "scheduler": kind, "command": " ".join(sys.argv)})
        rungs = f" (rungs at steps {', '.join(map(str, spec['pause_rungs']))})" if spec["pause_rungs"] else ""
        log(f"raycpt tune: sweep {tune.name} in {uri}: {tune.num_samples} sample(s) of {', '.join(tune.space)}"
            f"{' + the job config' if first else ''} ({tune.search}), {concurrent} at a time, "
            f"{kind} on the objective{rungs}")
        tuner = Tuner(
            trainable,
            param_space=_search_space(tune),
            tune_config=ray.tune.TuneConfig(
                metric="objective", mode="min",
                scheduler=build_scheduler(kind, tune, job, gate, on_pause=state_callback.release,
                                          allowances_uri=spec["allowances_uri"]),
                search_alg=build_search_alg(tune, first, concurrent, gate),
                # The baseline point takes one sample (with grid keys: one repetition of the grid).
                num_samples=tune.num_samples + len(first),
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=ray.tune.RunConfig(
                name=tune.name, storage_path=storage_path, storage_filesystem=fs,
                failure_config=ray.tune.FailureConfig(max_failures=tune.max_trial_failures),
                callbacks=[state_callback, *(callbacks or [])], verbose=1,
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
    return {**summary.as_dict(), "runtime_s": runtime_s, "errors": grid.num_errors, "scheduler": kind,
            "max_concurrent_trials": concurrent}
