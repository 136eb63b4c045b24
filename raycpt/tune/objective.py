"""The number a sweep minimises, from one evaluation, and the Pareto front.

new_loss     mean held-out loss of the `role: new` sources (adaptation; lower is better)
forgetting   per measured set (`objective.over`: the held-out rows of the `role: replay` sources,
             and the probes of `eval.probes`), the loss rise since step 0: in nats, or with
             `relative: true` as a fraction of the step-0 loss; the sets combine as their worst
             (`forgetting: max`) or their mean
old_loss     mean held-out loss of the replay sources (shown in the table, not in the formula)

kind: budget (the default when `forgetting_budget` is set): minimise new_loss subject to
forgetting <= budget.

    objective = new_loss                              within the budget
    objective = OVER_BUDGET + (forgetting - budget)   over it

OVER_BUDGET (1000) is above any cross-entropy a language model reaches (log of the vocab size,
< 12 nats for 128k tokens), so the metric Tune's schedulers compare is one monotone number in
which every trial within the budget beats every trial over it, and over-budget trials rank by
how far over they are (the closest first), not by their new-domain loss.

kind: penalty: objective = new_loss + forgetting_penalty * max(0, forgetting - forgetting_tolerance).

Before a trial's last step the budget (or tolerance) grows with the fraction of its steps trained
(`early_budget`): allowed = budget x sqrt(fraction) (`sqrt`, the default), budget x fraction
(`pro_rata`) or the whole budget (`full`). Forgetting grows while a trial trains (SmolLM2-135M at
peak LR 3e-4: +2% of the probes' loss at step 25 of 300, +8% at 100, +11% at 300), so a rung that
held early evaluations to the whole budget kept the fast learners that end over it and stopped the
only trials that end within it. It can grow fastest early (3e-4 with 0.1 replay over 1000 steps,
the full side of the H200 run: +9.7% at step 250, +22% at the end), and at that run's last rung a
pro-rata share left every survivor over it, ranked by excess alone: a few tenths of a point
decided between the one that ends within a 25% budget and one that ends over, whose German losses
at that step differed by 10%. Replayed on the measured trajectories, the square root keeps both
within their share there, so the loss decides; on both measured grids it keeps the full grid's
winner (tests/test_tune.py). Not yet rerun on a GPU.

Step 0 is the base model for every trial of a sweep, so forgetting compares alike across trials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from raycpt.tune.config import ObjectiveSection

# Names of the metrics the worker loop reports after each evaluation (raycpt/train/evaluate.py).
EVAL_LOSS_PREFIX = "eval/loss/"
EVAL_FORGETTING_PREFIX = "eval/forgetting/"
EVAL_PROBE_LOSS_PREFIX = "eval/probe_loss/"
EVAL_PROBE_FORGETTING_PREFIX = "eval/probe_forgetting/"
OVER_BUDGET = 1000.0
PROBE = "probe"  # the role of an eval.probes set in a roles map


@dataclass(frozen=True)
class Score:
    objective: float
    new_loss: float
    old_loss: float | None
    forgetting: float | None              # combined over the measured sets, in the objective's unit
    penalty: float                        # objective - new_loss
    within_budget: bool | None = None     # kind budget only
    worst: str | None = None              # the set that forgot the most
    by_set: dict[str, float] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, Any]:
        """Numbers only (what a Tune result carries): objective, new_loss, old_loss, forgetting,
        penalty, within_budget (1/0) and forgetting/<set>."""
        out: dict[str, Any] = {"objective": self.objective, "new_loss": self.new_loss, "penalty": self.penalty}
        for k in ("old_loss", "forgetting"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.within_budget is not None:
            out["within_budget"] = 1.0 if self.within_budget else 0.0
        out.update({f"forgetting/{k}": v for k, v in self.by_set.items()})
        return out


def objective_roles(job) -> dict[str, str]:
    """Set name -> new | replay | probe, for every source and probe of a job."""
    return {**{s.name: s.role for s in job.data.sources}, **{p.name: PROBE for p in job.eval.probes}}


def allowed_forgetting(allowance: float, cfg: ObjectiveSection, progress: float) -> float:
    """The budget or tolerance at a `progress` (steps trained / the trial's max steps) of a trial."""
    if cfg.early_budget == "full":
        return allowance
    fraction = min(1.0, max(0.0, progress))
    return allowance * (math.sqrt(fraction) if cfg.early_budget == "sqrt" else fraction)


def score(losses: dict[str, float], baseline: dict[str, float], roles: dict[str, str],
          cfg: ObjectiveSection, progress: float = 1.0) -> Score:
    """Score one evaluation: `losses` now and `baseline` at step 0 (sources and probes by name),
    `roles` name -> new|replay|probe, `progress` the fraction of the trial's steps trained."""
    new = [losses[s] for s, r in roles.items() if r == "new" and s in losses]
    if not new:
        raise ValueError(f"no held-out loss for a role: new source in {sorted(losses)}; prepare the new-domain "
                         "source with --eval-fraction > 0")
    new_loss = sum(new) / len(new)
    measured_roles = {"replay"} if "replay" in cfg.over else set()
    measured_roles |= {PROBE} if "probes" in cfg.over else set()
    replay = [s for s, r in roles.items() if r == "replay" and s in losses]
    old_loss = sum(losses[s] for s in replay) / len(replay) if replay else None
    by_set = {}
    for s, r in roles.items():
        if r in measured_roles and s in losses and s in baseline:
            rise = losses[s] - baseline[s]
            by_set[s] = rise / baseline[s] if cfg.relative and baseline[s] else rise
    if not by_set:
        return Score(new_loss, new_loss, old_loss, None, 0.0,
                     within_budget=True if cfg.kind == "budget" else None)
    worst = max(by_set, key=by_set.get)
    forgetting = by_set[worst] if cfg.forgetting == "max" else sum(by_set.values()) / len(by_set)
    if cfg.kind == "budget":
        budget = allowed_forgetting(cfg.forgetting_budget, cfg, progress)
        within = forgetting <= budget
        objective = new_loss if within else OVER_BUDGET + (forgetting - budget)
        return Score(objective, new_loss, old_loss, forgetting, objective - new_loss, within, worst, by_set)
    tolerance = allowed_forgetting(cfg.forgetting_tolerance, cfg, progress)
    penalty = cfg.forgetting_penalty * max(0.0, forgetting - tolerance)
    return Score(new_loss + penalty, new_loss, old_loss, forgetting, penalty, None, worst, by_set)


def score_record(record: dict[str, Any], first: dict[str, Any], roles: dict[str, str],
                 cfg: ObjectiveSection, max_steps: int) -> Score:
    """Score an eval record of metrics/eval.json against the run's step-0 record."""
    now = {**record["loss"], **record.get("probe_loss", {})}
    base = {**first["loss"], **first.get("probe_loss", {})}
    return score(now, base, roles, cfg, record["step"] / max_steps)


def score_report(metrics: dict[str, Any], roles: dict[str, str], cfg: ObjectiveSection,
                 max_steps: int) -> Score | None:
    """Score a metrics report of the worker loop (its `step` of `max_steps`); None when it
    carries no evaluation."""
    def strip(prefix: str) -> dict[str, float]:
        return {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}

    losses = {**strip(EVAL_LOSS_PREFIX), **strip(EVAL_PROBE_LOSS_PREFIX)}
    if not losses:
        return None
    rise = {**strip(EVAL_FORGETTING_PREFIX), **strip(EVAL_PROBE_FORGETTING_PREFIX)}
    baseline = {s: losses[s] - rise[s] for s in rise if s in losses}
    return score(losses, baseline, roles, cfg, metrics["step"] / max_steps)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Keys of the points no other point beats on both (new_loss, forgetting), lower better.

    A point is dominated when another is no worse on both and better on at least one."""
    front = []
    for key, (a, f) in points.items():
        dominated = any((a2 <= a and f2 <= f) and (a2 < a or f2 < f)
                        for k2, (a2, f2) in points.items() if k2 != key)
        if not dominated:
            front.append(key)
    return sorted(front, key=lambda k: points[k])
