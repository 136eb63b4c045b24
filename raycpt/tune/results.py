"""What a sweep found, read from storage alone: the trials table, the Pareto front of adaptation
vs forgetting, the compute early stopping saved, and the best config as a ready-to-run job YAML.

The sweep folder (<run.storage>/<tune.name>) holds:
    sweep.json     the sweep's definition (base job, tune section, fingerprint)
    trials.json    every trial: its values, run name and Tune status (the driver keeps it current)
    runs/<name>/   each trial's raycpt run folder (checkpoints, metrics/eval.json)
    results.md     the table;  results.json  the same as data;  best.yaml  the best config
    (and Ray Tune's own experiment state, which `raycpt tune` restores from)

Losses come from each trial's metrics/eval.json (the per-domain evaluation the loop writes),
so the table is right even for trials whose last result never reached Tune.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from raycpt import storage
from raycpt.checkpoint.layout import latest_committed
from raycpt.config import JobConfig, parse_job
from raycpt.tune.config import ObjectiveSection, TuneSection, get_dotted, set_dotted
from raycpt.tune.objective import objective_roles, pareto_front, score_record

SWEEP_FILE = "sweep.json"
TRIALS_FILE = "trials.json"
RUNS_FOLDER = "runs"
ALLOWANCES_FOLDER = "rung-allowances"  # how far each trial may train (raycpt/train/rung_wait.py)


@dataclass
class TrialRow:
    trial_id: str
    run_name: str
    values: dict[str, Any]
    tune_status: str                    # PENDING | RUNNING | TERMINATED | ERROR (Tune's word)
    baseline: bool = False              # the job's own values of the searched keys
    steps: int = 0                      # furthest step trained (last evaluation or checkpoint)
    eval_step: int | None = None        # step of the evaluation the scores come from
    objective: float | None = None
    new_loss: float | None = None
    old_loss: float | None = None
    forgetting: float | None = None     # worst (or mean) over the measured sets, objective's unit
    forgetting_by: dict[str, float] = field(default_factory=dict)   # per replay source / probe
    worst: str | None = None            # the set that forgot the most
    within_budget: bool | None = None   # objective kind budget only
    status: str = ""                    # done | stopped early | running | pending | error
    pareto: bool = False
    best: bool = False
    closest: bool = False               # no trial met the budget: this one came closest
    error: str | None = None


@dataclass
class SweepSummary:
    name: str
    uri: str
    keys: list[str]
    budget_steps: int
    tokens_per_step: int
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    sets: list[str] = field(default_factory=list)   # the measured sets (replay sources, probes), table order
    rows: list[TrialRow] = field(default_factory=list)

    @property
    def best(self) -> TrialRow | None:
        return next((r for r in self.rows if r.best), None)

    @property
    def closest(self) -> TrialRow | None:
        return next((r for r in self.rows if r.closest), None)

    @property
    def baseline(self) -> TrialRow | None:
        return next((r for r in self.rows if r.baseline), None)

    def compute(self) -> dict[str, Any]:
        """Steps trained vs every trial run to its full budget (all trials cost the same per step)."""
        spent = sum(r.steps for r in self.rows)
        full = self.budget_steps * len(self.rows)
        return {"trials": len(self.rows), "steps_trained": spent, "steps_if_all_ran_to_the_end": full,
                "tokens_trained": spent * self.tokens_per_step,
                "saved_share": (1 - spent / full) if full else 0.0,
                "stopped_early": sum(r.status == "stopped early" for r in self.rows)}

    def as_dict(self) -> dict[str, Any]:
        best = self.best
        closest = self.closest
        return {"name": self.name, "uri": self.uri, "searched_keys": self.keys, "budget_steps": self.budget_steps,
                "objective": self.objective.model_dump(mode="json"), "forgetting_sets": self.sets,
                "trials": [asdict(r) for r in self.rows], "best_trial": best.trial_id if best else None,
                "closest_trial": closest.trial_id if closest else None,
                "pareto_front": [r.trial_id for r in self.rows if r.pareto], "compute": self.compute()}


def sweep_uri(job: JobConfig, tune: TuneSection) -> str:
    return storage.join(job.run.storage, tune.name)


def read_definition(uri: str) -> tuple[JobConfig, TuneSection, dict[str, Any]]:
    d = storage.read_json(storage.join(uri, SWEEP_FILE))
    return parse_job(d["job"]), TuneSection.model_validate(d["tune"]), d


def read_trials(uri: str) -> dict[str, dict[str, Any]]:
    path = storage.join(uri, TRIALS_FILE)
    return storage.read_json(path)["trials"] if storage.exists(path) else {}


def default_values(job: JobConfig, keys: list[str]) -> dict[str, Any]:
    """The job's own value of each searched key (the baseline trial)."""
    tree = job.model_dump(mode="json")
    return {k: get_dotted(tree, k) for k in keys}


def collect(uri: str, job: JobConfig, tune: TuneSection) -> SweepSummary:
    """Rows for every trial the sweep has started, scored from the trials' own eval history."""
    budget = tune.max_steps_per_trial or job.train.max_steps
    keys = list(tune.space)
    roles = objective_roles(job)
    over = {"replay": "replay", "probe": "probes"}
    sets = [n for n, r in roles.items() if over.get(r) in tune.objective.over]
    summary = SweepSummary(tune.name, uri, keys, budget, job.train.global_batch_size * job.data.seq_len,
                           tune.objective, sets)
    defaults = default_values(job, keys)
    for trial_id, t in sorted(read_trials(uri).items()):
        run_uri = storage.join(uri, RUNS_FOLDER, t["run_name"])
        row = TrialRow(trial_id, t["run_name"], t["values"], t["status"], error=t.get("error"),
                       baseline=tune.evaluate_job_config and t["values"] == defaults)
        eval_path = storage.join(run_uri, "metrics", "eval.json")
        history = storage.read_json(eval_path) if storage.exists(eval_path) else []
        committed = latest_committed(run_uri)
        row.steps = max([h["step"] for h in history[-1:]] + [committed.step if committed else 0])
        if history:
            s = score_record(history[-1], history[0], roles, tune.objective, budget)
            row.eval_step = history[-1]["step"]
            row.objective, row.new_loss = s.objective, s.new_loss
            row.old_loss, row.forgetting = s.old_loss, s.forgetting
            row.forgetting_by, row.worst, row.within_budget = s.by_set, s.worst, s.within_budget
        row.status = _status(row, budget)
        summary.rows.append(row)
    _rank(summary)
    return summary


def _status(row: TrialRow, budget: int) -> str:
    if row.tune_status == "ERROR":
        return "error"
    if row.tune_status in ("PENDING", "PAUSED"):
        return "pending"
    if row.tune_status == "RUNNING":
        return "running"
    return "done" if row.eval_step == budget else "stopped early"


def _rank(summary: SweepSummary) -> None:
    """Best and Pareto front among the trials that trained their full budget (losses after
    fewer steps are not comparable); among all evaluated trials when none has yet."""
    scored = [r for r in summary.rows if r.objective is not None]
    finished = [r for r in scored if r.status == "done"]
    pool = finished or scored
    if not pool:
        return
    # kind budget: the best is the best trial within the budget; when none is, the trial of the
    # smallest objective is the one that came closest (objective = OVER_BUDGET + excess).
    eligible = [r for r in pool if r.within_budget is not False]
    if eligible:
        min(eligible, key=lambda r: r.objective).best = True
    else:
        min(pool, key=lambda r: r.objective).closest = True
    front = pareto_front({r.trial_id: (r.new_loss, r.forgetting or 0.0) for r in pool})
    for r in pool:
        r.pareto = r.trial_id in front


def _fmt(v: Any, width: int) -> str:
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float):
        text = f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
        return text.rjust(width)
    return str(v).rjust(width)


def _fmt_forgetting(v: float | None, relative: bool) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.1f}%" if relative else f"{v:+.4f}"


def format_table(summary: SweepSummary) -> str:
    """A fixed-width table: one line per trial, the full-budget trials first, each group by
    objective (losses after fewer steps do not compare); one forgetting column per replay
    source and probe; `*` marks the Pareto front of new loss vs worst forgetting."""
    rel = summary.objective.relative
    budget = summary.objective.kind == "budget"
    heads = (["trial"] + summary.keys + ["objective", "new loss", "old loss"]
             + [f"forgot {s}" for s in summary.sets] + ["worst"] + (["budget"] if budget else [])
             + ["steps", "status"])
    order = {"done": 0, "stopped early": 1, "running": 2, "pending": 3, "error": 4}
    rows = sorted(summary.rows, key=lambda r: (order.get(r.status, 5), r.objective if r.objective is not None
                                                 else math.inf, r.trial_id))
    body = []
    for r in rows:
        tag = " (job)" if r.baseline else ""
        mark = ("best " if r.best else "") + ("closest " if r.closest else "") + ("*" if r.pareto else "")
        verdict = [] if not budget else ["-" if r.within_budget is None else ("within" if r.within_budget else "over")]
        body.append([r.trial_id + tag] + [r.values.get(k) for k in summary.keys]
                    + [r.objective, r.new_loss, r.old_loss]
                    + [_fmt_forgetting(r.forgetting_by.get(s), rel) for s in summary.sets]
                    + [_fmt_forgetting(r.forgetting, rel)] + verdict
                    + [f"{r.steps}/{summary.budget_steps}", f"{r.status} {mark}".strip()])
    widths = [max(len(h), *(len(_fmt(b[i], 0).strip()) for b in body)) if body else len(h)
              for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) if i in (0, len(heads) - 1) else h.rjust(w)
                       for i, (h, w) in enumerate(zip(heads, widths)))]
    for b in body:
        cells = [str(b[0]).ljust(widths[0])] + [_fmt(v, w) for v, w in zip(b[1:-1], widths[1:-1])] + [str(b[-1])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def objective_text(o: ObjectiveSection) -> str:
    unit = "relative to step 0" if o.relative else "in nats"
    how = "the worst of" if o.forgetting == "max" else "the mean over"
    sets = " and ".join("probes" if x == "probes" else "replay sources" for x in o.over)
    share = {"sqrt": "sqrt(steps trained / max steps)", "pro_rata": "steps trained / max steps"}.get(o.early_budget)
    early = (f"; before its last step a trial is held to that x {share} (early_budget: {o.early_budget})"
             if share else "")
    if o.kind == "budget":
        limit = f"{100 * o.forgetting_budget:.1f}%" if o.relative else f"{o.forgetting_budget:g} nats"
        return (f"objective: minimise new-domain loss subject to forgetting ({how} {sets}, {unit}) <= {limit}; "
                f"a trial over the budget scores 1000 + its excess, so it ranks after every trial within it{early}")
    tol = f"{100 * o.forgetting_tolerance:.1f}%" if o.relative else f"{o.forgetting_tolerance:g}"
    return (f"objective = new-domain loss + {o.forgetting_penalty:g} x max(0, forgetting - {tol}) "
            f"(forgetting: {how} {sets}, {unit}){early}")


def format_summary(summary: SweepSummary) -> str:
    c = summary.compute()
    lines = [f"sweep {summary.name}  ({summary.uri})", format_table(summary), ""]
    lines.append(objective_text(summary.objective) + "; * = Pareto front of new loss vs worst forgetting")
    if any(r.status in ("running", "pending") for r in summary.rows):
        lines.append(f"compute so far: {c['steps_trained']} trial steps; {c['stopped_early']} of {c['trials']} "
                     "trials stopped early (the sweep is still running)")
    else:
        lines.append(f"compute: {c['steps_trained']} of {c['steps_if_all_ran_to_the_end']} trial steps "
                     f"({100 * c['saved_share']:.0f}% saved by stopping {c['stopped_early']} of {c['trials']} "
                     "trials early)")
    best, base, closest = summary.best, summary.baseline, summary.closest
    rel = summary.objective.relative
    if best is not None:
        values = ", ".join(f"{k}={v}" for k, v in best.values.items())
        worst = f", worst forgetting {_fmt_forgetting(best.forgetting, rel)} ({best.worst})" if best.worst else ""
        lines.append(f"best: trial {best.trial_id} ({values}) objective {best.objective:.4f}{worst}")
        if base is not None and base.objective is not None and base is not best:
            lines.append(f"job's own config: trial {base.trial_id} objective {base.objective:.4f} "
                         f"({best.objective - base.objective:+.4f} for the best)")
    elif closest is not None:
        values = ", ".join(f"{k}={v}" for k, v in closest.values.items())
        budget = summary.objective.forgetting_budget
        lines.append(f"no trial met the forgetting budget ({_fmt_forgetting(budget, rel).lstrip('+')}); the closest: "
                     f"trial {closest.trial_id} ({values}), "
                     f"worst forgetting {_fmt_forgetting(closest.forgetting, rel)} "
                     f"on {closest.worst}, new loss {closest.new_loss:.4f}. No best.yaml was written; raise "
                     "tune.objective.forgetting_budget or search lower LRs / more replay")
    return "\n".join(lines)


def best_job_yaml(job: JobConfig, tune: TuneSection, summary: SweepSummary) -> str | None:
    """The job with the best trial's values, as a YAML `raycpt train` runs as is (absolute
    paths, its own run name, the job's full train.max_steps, no tune section)."""
    best = summary.best
    if best is None:
        return None
    tree = job.model_dump(mode="json")
    for key, value in best.values.items():
        tree = set_dotted(tree, key, value)
    tree["run"]["name"] = f"{tune.name}-best"
    parse_job(tree)  # the sweep validated every value; a failure here is a bug, not a user error
    header = [f"# Best config of sweep {tune.name}: trial {best.trial_id}, objective {best.objective:.4f} "
              f"(new loss {best.new_loss:.4f}, forgetting {_fmt_forgetting(best.forgetting, tune.objective.relative)}"
              f"{' on ' + best.worst if best.worst else ''} at step {best.eval_step})",
              f"# {objective_text(tune.objective)}",
              *(f"#   {k}: {v}" for k, v in best.values.items()),
              f"# Trials trained {summary.budget_steps} steps; this run trains train.max_steps={job.train.max_steps}.",
              f"# Run it:  raycpt train {storage.join(summary.uri, 'best.yaml')}"]
    return "\n".join(header) + "\n" + yaml.safe_dump(tree, sort_keys=False)


def write_results(summary: SweepSummary, job: JobConfig, tune: TuneSection,
                  extra: dict[str, Any] | None = None) -> None:
    storage.write_bytes(storage.join(summary.uri, "results.md"), (format_summary(summary) + "\n").encode())
    storage.write_json(storage.join(summary.uri, "results.json"), {**summary.as_dict(), **(extra or {})})
    text = best_job_yaml(job, tune, summary)
    best_uri = storage.join(summary.uri, "best.yaml")
    if text is not None:
        storage.write_bytes(best_uri, text.encode())
    elif storage.exists(best_uri):
        storage.remove_tree(best_uri)  # an earlier best no longer stands (none meets the budget now)


def is_sweep(uri: str) -> bool:
    try:
        return storage.exists(storage.join(uri, SWEEP_FILE))
    except Exception:  # noqa: BLE001 - not a folder we can read: not a sweep
        return False


def sweep_status(uri: str) -> tuple[SweepSummary, dict[str, Any]]:
    """`raycpt status SWEEP`: the table as storage has it now (a sweep still running included)."""
    job, tune, _ = read_definition(uri)
    summary = collect(uri, job, tune)
    best_path = storage.join(uri, "best.yaml")
    return summary, {**summary.as_dict(), "best_yaml": best_path if storage.exists(best_path) else None}


def status_command(target: str, overrides: list[str], as_json: bool) -> int | None:
    """`raycpt status` for a sweep (its folder, or a job YAML with a tune section); None when the
    target is not a sweep, so the caller shows a run instead."""
    import json
    import os

    if target.endswith((".yaml", ".yml")) and os.path.exists(target):
        tree = yaml.safe_load(open(target)) or {}
        if not isinstance(tree, dict) or "tune" not in tree:
            return None
        from raycpt.tune.config import load_sweep

        job, tune = load_sweep(target, overrides)
        storage.configure_storage(job.run.s3_endpoint_url)
        target = sweep_uri(job, tune)
        if not is_sweep(target):
            print(f"sweep {tune.name}: not started yet ({target}); run `raycpt tune` on the YAML")
            return 3
    elif not is_sweep(target):
        return None
    summary, st = sweep_status(target)
    if as_json:
        print(json.dumps(st, indent=1))
    else:
        print(format_summary(summary))
        if st["best_yaml"]:
            print(f"best config: {st['best_yaml']}  (raycpt train {st['best_yaml']})")
    return 0
