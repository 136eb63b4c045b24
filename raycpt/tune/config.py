"""The `tune:` section of a job YAML: what a sweep searches, for how long, and what it minimises.

    tune:
      space:                                    # dotted job keys -> distribution
        optim.peak_lr: {loguniform: [3.0e-5, 1.0e-3]}
        data.replay_ratio: {grid: [0.05, 0.15, 0.25]}
      num_samples: 2                            # random draws (each grid point this many times)
      max_concurrent_trials: 2
      max_steps_per_trial: 24                   # every trial's train.max_steps
      scheduler: {kind: asha, grace_period_steps: 8, reduction_factor: 2}
      objective: {forgetting_budget: 0.03, relative: true, over: [probes, replay]}

Every searched value becomes a dotted override of the job (the one config mechanism), so a key
can be searched exactly when `raycpt train JOB key=value` accepts it; that is checked when the
sweep loads, for the bounds and every listed value, and an error names `tune.space.<key>`.
`raycpt train` ignores this section; `raycpt tune` reads it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raycpt.config import (
    ConfigError,
    JobConfig,
    apply_overrides,
    dotted_path,
    fix_hint,
    parse_job,
    read_yaml_tree,
    resolve_relative_paths,
    split_dotted,
)

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpace(_Section):
    """One searched key: exactly one of the four distributions."""

    loguniform: tuple[float, float] | None = Field(
        None, description="[low, high], both > 0: sampled uniformly in log space (learning rates).")
    uniform: tuple[float, float] | None = Field(None, description="[low, high]: sampled uniformly.")
    choice: list[Any] | None = Field(None, min_length=1, description="Values drawn at random, one per sample.")
    grid: list[Any] | None = Field(
        None, min_length=1, description="Every value is tried (times num_samples); grids of several keys multiply.")

    @model_validator(mode="after")
    def _one_kind(self) -> "ParamSpace":
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {given or 'none'})")
        for kind in ("loguniform", "uniform"):
            bounds = getattr(self, kind)
            if bounds is not None:
                lo, hi = bounds
                if not lo < hi:
                    raise ValueError(f"{kind}: need low < high (got [{lo}, {hi}])")
                if kind == "loguniform" and lo <= 0:
                    raise ValueError(f"loguniform: low must be > 0 (got {lo}); use uniform for ranges from 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    def probe_values(self) -> list[Any]:
        """Values that stand for the whole range when the job schema checks the key."""
        v = getattr(self, self.kind)
        return list(v)


class SchedulerSection(_Section):
    kind: Literal["auto", "hyperband", "asha", "median", "fifo"] = Field(
        "auto",
        description="hyperband: synchronous successive halving (one HyperBand bracket over every trial: "
        "trials are judged at each rung only once all have reached it, the best 1/factor go on); "
        "asha: asynchronous successive halving (judges each trial against those already at its rung: "
        "good when many run at once); median: stop a trial worse than the median of the others at the "
        "same step; fifo: no early stopping. auto: hyperband unless at least "
        "async_min_concurrent_trials run at once and the sweep has reduction_factor times more trials "
        "than that, then asha (docs/deploying.md, Sweeps).",
    )
    grace_period_steps: int | None = Field(
        None, gt=0, description="Steps every trial trains before it can be stopped (the first rung); "
        "default: eval.interval_steps.")
    reduction_factor: float = Field(
        2.0, gt=1, description="hyperband/asha: rungs at grace_period x factor^k steps; at each rung about "
        "1/factor of the trials go on.")
    min_samples_required: int = Field(
        2, ge=1, description="median: trials that must have reached a step before the rule stops any.")
    async_min_concurrent_trials: int = Field(
        8, ge=1, description="auto: the concurrency from which ASHA is chosen over synchronous halving.")


class ObjectiveSection(_Section):
    """What a sweep minimises (raycpt/tune/objective.py has the formulas):

    kind: budget   minimise new_loss subject to forgetting <= forgetting_budget; a trial over
                   the budget ranks after every trial within it (objective = 1000 + excess)
    kind: penalty  new_loss + forgetting_penalty * max(0, forgetting - forgetting_tolerance)

    new_loss is the mean held-out loss of the `role: new` sources; forgetting is the rise since
    step 0 of the loss of each set named in `over` (replay sources' held-out rows, probes), in
    nats or (`relative: true`) as a fraction of the step-0 loss; sets combine by `forgetting`."""

    kind: Literal["budget", "penalty"] | None = Field(
        None, description="budget: constrained (needs forgetting_budget); penalty: the soft form. "
        "Default: budget when forgetting_budget is set, else penalty.")
    forgetting_budget: float | None = Field(
        None, ge=0, description="kind budget: the most forgetting a trial may show to count, e.g. 0.03 "
        "(with relative: true, 3% above the step-0 loss).")
    relative: bool = Field(
        False, description="Measure forgetting as (loss - step-0 loss) / step-0 loss instead of in nats; "
        "budget and tolerance are then fractions.")
    over: list[Literal["probes", "replay"]] = Field(
        default_factory=lambda: ["probes", "replay"], min_length=1,
        description="Which sets forgetting is measured on: eval.probes and/or the held-out rows of the "
        "role: replay sources (replayed text always looks unforgotten; probes do not).")
    forgetting_tolerance: float = Field(
        0.05, ge=0, description="kind penalty: forgetting allowed before the penalty applies.")
    forgetting_penalty: float = Field(
        10.0, ge=0, description="kind penalty: objective added per unit of forgetting above the tolerance "
        "(0: optimise the new domain alone).")
    forgetting: Literal["max", "mean"] = Field(
        "max", description="How several sets combine: the worst one, or their mean.")
    early_budget: Literal["sqrt", "pro_rata", "full"] = Field(
        "sqrt", description="What forgetting a trial may show before its last step (the budget of "
        "kind budget, the tolerance of kind penalty), as a share of that allowance growing with the "
        "fraction of the trial's max steps trained: sqrt (that fraction's square root), pro_rata (the "
        "fraction itself) or full (the whole allowance at every step). Forgetting grows as a trial "
        "trains, so a rung judged against the whole budget prefers the fast learners that forget "
        "later; it can grow fastest early, and then a pro-rata share puts every survivor of a late rung "
        "over it, ranked by their excess alone (docs/deploying.md, section 10: two measured grids, "
        "the rule replayed on them).")

    @model_validator(mode="after")
    def _kind(self) -> "ObjectiveSection":
        if self.kind is None:
            self.kind = "budget" if self.forgetting_budget is not None else "penalty"
        if self.kind == "budget" and self.forgetting_budget is None:
            raise ValueError("kind budget needs forgetting_budget, e.g. forgetting_budget: 0.03")
        return self

    @property
    def uses_forgetting(self) -> bool:
        return self.kind == "budget" or self.forgetting_penalty > 0


class TuneSection(_Section):
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$",
        description="Sweep name; the sweep folder is <run.storage>/<name> (trials' run folders, "
        "Tune's state, results). Fixed, so re-running the command continues the sweep. "
        "Default: <run.name>-sweep.")
    space: dict[str, ParamSpace] = Field(
        description="Dotted job key (as in an override) -> distribution. Nested keys "
        "(optim: {peak_lr: {...}}) are read as dotted ones.")
    num_samples: int = Field(
        4, gt=0, description="Random draws; with grid keys, repeats of the whole grid. The job-config "
        "trial (evaluate_job_config) comes on top.")
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="Trials training at once; default: as many as the cluster's CPUs/GPUs "
        "hold now (each trial needs its scaling section's workers).")
    max_steps_per_trial: int | None = Field(
        None, gt=0, description="The budget of a trial that is never stopped: every trial's "
        "train.max_steps (its LR schedule decays over it). Default: the job's train.max_steps. "
        "The best-config YAML keeps the job's own train.max_steps.")
    evaluate_job_config: bool = Field(
        True, description="Also train the job's own values of the searched keys as the first trial "
        "(the baseline the table compares with).")
    seed: int | None = Field(None, ge=0, description="Seed of the random draws; default run.seed.")
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    trial_driver_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 0.1},
        description="Ray resources of each trial's driver (the Tune trial that starts its Ray Train "
        "run and waits); the training workers reserve their own from the scaling section. Give it a "
        "custom resource of an on-demand node to keep drivers off spot nodes.")
    search: Literal["random", "grid", "optuna"] = Field(
        "random", description="random: Tune's random draws (grid keys enumerated); grid: every combination of "
        "grid/choice keys, num_samples times; optuna: Optuna's TPE proposes each trial from the results so far "
        "(pip install 'raycpt[tune]').")
    gpus_per_trial: float | None = Field(
        None, gt=0, le=1, description="Share of one GPU each trial's training worker reserves (scaling.use_gpu, "
        "one worker per trial), e.g. 0.25: 4 trials a GPU. Checked before the sweep starts against the "
        "model's training memory. Default: one GPU per worker.")
    max_trial_failures: int = Field(
        2, ge=0, description="Restarts of a failed trial (each resumes from its own newest checkpoint).")
    trial_keep_last: int = Field(
        1, gt=0, description="checkpoint.keep_last of every trial (trial checkpoints only serve resumption).")


# ---------------------------------------------------------------------------------------------
# Loading and validation


def _flatten_space(space: Any, prefix: str = "") -> dict[str, Any]:
    """{optim: {peak_lr: {loguniform: ..}}} and {"optim.peak_lr": {loguniform: ..}} alike."""
    if not isinstance(space, dict):
        return {prefix: space}
    if prefix and (set(space) & set(DISTRIBUTIONS) or not space):
        return {prefix: space}
    out: dict[str, Any] = {}
    for k, v in space.items():
        out.update(_flatten_space(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Copy of `tree` with `key` (a.b[0].c) set to a Python value (no YAML string round trip)."""
    tree = apply_overrides(tree, [f"{key}=placeholder"])  # creates missing parents as an override does
    parts = split_dotted(key)
    node: Any = tree
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value)
    return tree


def get_dotted(tree: dict[str, Any], key: str) -> Any:
    """The value at `key` (a.b[0].c) of a plain tree, None where a part is missing."""
    node: Any = tree
    for part in split_dotted(key):
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return copy.deepcopy(node)


def _section_errors(e: ValidationError, prefix: str) -> list[str]:
    lines = []
    for err in e.errors():
        loc = err["loc"]
        if loc and loc[0] == "space" and len(loc) > 1:
            # Space keys hold dots themselves: `tune.space.optim.peak_lr.loguniform`.
            path = f"{prefix}.space.{loc[1]}" + ("." + dotted_path(loc[2:]) if len(loc) > 2 else "")
        else:
            path = f"{prefix}.{dotted_path(loc)}" if loc else prefix
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" and "ctx" in err else fix_hint(err, TuneSection)
        got = err.get("input")
        shown = err["type"] not in ("missing", "value_error") and not isinstance(got, dict)
        got_txt = f" (got {got!r})" if shown else ""
        lines.append(f"{path}: {msg}{got_txt}")
    return lines


def trial_tree(base: dict[str, Any], tune: TuneSection, values: dict[str, Any], run_name: str,
               storage_uri: str) -> dict[str, Any]:
    """The job of one trial: the base job, the trial's values, its own run folder and budget."""
    tree = copy.deepcopy(base)
    for key, value in values.items():
        tree = set_dotted(tree, key, value)
    tree["run"]["name"] = run_name
    tree["run"]["storage"] = storage_uri
    if tune.max_steps_per_trial is not None:
        tree["train"]["max_steps"] = tune.max_steps_per_trial
    tree["checkpoint"]["keep_last"] = tune.trial_keep_last
    return tree


def parse_sweep(tree: dict[str, Any], base_dir: str | Path) -> tuple[JobConfig, TuneSection]:
    """Validate a job tree that has a `tune:` section; raise ConfigError listing every problem.

    Relative paths resolve against `base_dir` (the YAML's folder)."""
    tree = copy.deepcopy(tree)
    raw = tree.pop("tune", None)
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError("tune: missing; add a `tune:` section with at least `space:` (see jobs/sweep.yaml)")
    raw = dict(raw)
    if isinstance(raw.get("space"), dict):
        raw["space"] = _flatten_space(raw["space"])
    job = resolve_relative_paths(parse_job(tree), Path(base_dir))
    try:
        tune = TuneSection.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("invalid sweep config:\n  " + "\n  ".join(_section_errors(e, "tune"))) from None

    base = job.model_dump(mode="json")
    if not tune.space:
        problems.append("tune.space: empty; name at least one dotted key, "
                        "e.g. optim.peak_lr: {loguniform: [1e-5, 1e-3]}")
    for key, spec in tune.space.items():
        if key.split(".")[0].split("[")[0] in ("run", "tune"):
            problems.append(f"tune.space.{key}: run.* and tune.* are fixed per sweep; search training keys only")
            continue
        for value in spec.probe_values():
            try:
                parse_job(set_dotted(base, key, value))
            except ConfigError as e:
                detail = str(e).split("\n", 1)[-1].strip().replace("\n  ", "; ")
                problems.append(f"tune.space.{key}: value {value!r} makes an invalid job: {detail}")
                break
            except Exception as e:  # noqa: BLE001 - the override path itself is wrong (no such list index)
                problems.append(f"tune.space.{key}: not a key of the job ({e})")
                break
    if tune.max_steps_per_trial is not None:
        try:
            parse_job(trial_tree(base, tune, {}, "probe", job.run.storage))
        except ConfigError as e:
            detail = str(e).split("\n", 1)[-1].strip().replace("\n  ", "; ")
            problems.append(f"tune.max_steps_per_trial: {tune.max_steps_per_trial} makes an invalid job: {detail}")
    steps = tune.max_steps_per_trial or job.train.max_steps
    if tune.scheduler.kind != "fifo":
        every = job.eval.interval_steps
        grace = tune.scheduler.grace_period_steps or every
        if every is None:
            problems.append(f"eval.interval_steps: early stopping ({tune.scheduler.kind}) needs evaluations before "
                            f"the end of a trial; set it, e.g. eval.interval_steps={max(1, steps // 4)}, or "
                            "tune.scheduler.kind=fifo")
        elif grace is not None and grace < every:
            problems.append(f"tune.scheduler.grace_period_steps: {grace} is shorter than eval.interval_steps {every}; "
                            "a trial cannot be judged before its first evaluation")
        if grace is not None and grace >= steps:
            problems.append(f"tune.scheduler.grace_period_steps: {grace} leaves no room to stop a trial of {steps} "
                            "steps; make it smaller than tune.max_steps_per_trial")
    problems += resource_and_search_problems(job, tune)
    roles = {s.role for s in job.data.sources}
    if "new" not in roles:
        problems.append("data.sources[*].role: the sweep objective needs a source with role: new")
    obj = tune.objective
    measured = (["replay"] if "replay" in obj.over and "replay" in roles else []) \
        + (["probes"] if "probes" in obj.over and job.eval.probes else [])
    if obj.uses_forgetting and not measured:
        problems.append(f"tune.objective.over: {obj.over} names no set this job evaluates (no role: replay "
                        "source, no eval.probes); add one, or set tune.objective.forgetting_penalty=0")
    if problems:
        raise ConfigError("invalid sweep config:\n  " + "\n  ".join(problems))
    if tune.name is None:
        tune = tune.model_copy(update={"name": f"{job.run.name}-sweep"})
    if tune.seed is None:
        tune = tune.model_copy(update={"seed": job.run.seed})
    return job, tune


def resource_and_search_problems(job: JobConfig, tune: TuneSection) -> list[str]:
    """What is wrong with the sweep's GPU share and search for this job (the share's memory is
    checked later, on the cluster: raycpt/tune/resources.py)."""
    problems = []
    if tune.gpus_per_trial is not None:
        if not job.scaling.use_gpu:
            problems.append("tune.gpus_per_trial: needs scaling.use_gpu=true (CPU trials share through "
                            "scaling.cpus_per_worker, which may be fractional)")
        if job.worker_range() != (1, 1):
            problems.append(f"tune.gpus_per_trial: {tune.gpus_per_trial:g} needs scaling.num_workers=1 (NCCL cannot "
                            "put two ranks of one run on one GPU; got scaling.num_workers="
                            f"{job.scaling.num_workers})")
    if tune.search == "grid":
        for key, spec in tune.space.items():
            if spec.kind in ("loguniform", "uniform"):
                problems.append(f"tune.space.{key}: tune.search=grid needs grid or choice values (got {spec.kind})")
    if tune.search == "optuna":
        for key, spec in tune.space.items():
            if spec.kind == "grid":
                problems.append(f"tune.space.{key}: tune.search=optuna draws every key; use choice instead of grid")
        try:
            import optuna  # noqa: F401
        except ImportError:
            problems.append("tune.search: optuna is not installed; pip install 'raycpt[tune]' (or optuna)")
    return problems


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[JobConfig, TuneSection]:
    """Load a job YAML with a `tune:` section; overrides may name job keys or tune keys
    (`tune.num_samples=8`)."""
    return parse_sweep(apply_overrides(read_yaml_tree(path), list(overrides)), Path(path).resolve().parent)


def sweep_fingerprint(job: JobConfig, tune: TuneSection) -> str:
    """What a sweep is: its base job and its tune section (a re-run must match to continue)."""
    d = {"job": job.model_dump(mode="json"), "tune": tune.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
