"""The number a sweep minimises, from one per-domain evaluation, and the Pareto front.

    objective = new_loss + forgetting_penalty * max(0, forgetting - forgetting_tolerance)

new_loss     mean held-out loss of the `role: new` sources (adaptation; lower is better)
forgetting   rise of the held-out loss of the `role: replay` sources since step 0, in nats; the
             worst replay source (`forgetting: max`) or their mean
old_loss     mean held-out loss of the replay sources (shown in the table, not in the formula)

A trial that forgets no more than the tolerance is ranked on the new domain alone; beyond it,
every nat of forgetting costs `forgetting_penalty` nats of new-domain loss. Step 0 is the base
model for every trial of a sweep, so forgetting compares alike across trials.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from raycpt.tune.config import ObjectiveSection

# Names of the per-domain metrics the worker loop reports after each evaluation.
EVAL_LOSS_PREFIX = "eval/loss/"
EVAL_FORGETTING_PREFIX = "eval/forgetting/"


@dataclass(frozen=True)
class Score:
    objective: float
    new_loss: float
    old_loss: float | None
    forgetting: float | None
    penalty: float

    def as_metrics(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def score(losses: dict[str, float], baseline: dict[str, float], roles: dict[str, str],
          cfg: ObjectiveSection) -> Score:
    """Score one evaluation: `losses` now, `baseline` at step 0, `roles` source -> new|replay."""
    new = [losses[s] for s, r in roles.items() if r == "new" and s in losses]
    if not new:
        raise ValueError(f"no held-out loss for a role: new source in {sorted(losses)}; prepare the new-domain "
                         "source with --eval-fraction > 0")
    replay = [s for s, r in roles.items() if r == "replay" and s in losses and s in baseline]
    new_loss = sum(new) / len(new)
    if not replay:
        return Score(new_loss, new_loss, None, None, 0.0)
    rises = [losses[s] - baseline[s] for s in replay]
    forgetting = max(rises) if cfg.forgetting == "max" else sum(rises) / len(rises)
    penalty = cfg.forgetting_penalty * max(0.0, forgetting - cfg.forgetting_tolerance)
    old_loss = sum(losses[s] for s in replay) / len(replay)
    return Score(new_loss + penalty, new_loss, old_loss, forgetting, penalty)


def score_report(metrics: dict[str, Any], roles: dict[str, str], cfg: ObjectiveSection) -> Score | None:
    """Score a metrics report of the worker loop; None when it carries no evaluation."""
    losses = {k[len(EVAL_LOSS_PREFIX):]: float(v) for k, v in metrics.items() if k.startswith(EVAL_LOSS_PREFIX)}
    if not losses:
        return None
    rise = {k[len(EVAL_FORGETTING_PREFIX):]: float(v) for k, v in metrics.items()
            if k.startswith(EVAL_FORGETTING_PREFIX)}
    baseline = {s: losses[s] - rise[s] for s in rise if s in losses}
    return score(losses, baseline, roles, cfg)


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
