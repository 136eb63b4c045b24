"""Learning-rate schedules as pure functions of the step (the checkpoint stores only the step).

Re-warm linearly from `start_lr` to `peak_lr` over `warmup_steps`, then:
- cosine: cosine re-decay to `min_lr` at `max_steps`;
- linear: straight line to `min_lr` at `max_steps`;
- wsd: hold `peak_lr`, then cool down linearly to `min_lr` over the last `cooldown_fraction`
  of the run (the "infinite" schedule of Ibrahim et al. 2024);
- constant: hold `peak_lr`.
"""

from __future__ import annotations

import math

from raycpt.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (0-based) of a run of `max_steps` steps."""
    warm = optim.warmup_steps
    if warm > 0 and step < warm:
        return optim.start_lr + (optim.peak_lr - optim.start_lr) * step / warm
    if optim.schedule == "constant":
        return optim.peak_lr
    last = max(max_steps - 1, 1)
    if optim.schedule == "wsd":
        cooldown_steps = max(1, round(optim.cooldown_fraction * max_steps))
        start = max(warm, max_steps - cooldown_steps)
        if step < start:
            return optim.peak_lr
        frac = min(1.0, (step - start) / max(last - start, 1))
        return optim.peak_lr + (optim.min_lr - optim.peak_lr) * frac
    frac = min(1.0, max(0.0, (step - warm) / max(last - warm, 1)))
    if optim.schedule == "linear":
        return optim.peak_lr + (optim.min_lr - optim.peak_lr) * frac
    return optim.min_lr + 0.5 * (optim.peak_lr - optim.min_lr) * (1.0 + math.cos(math.pi * frac))


def describe(optim: OptimConfig, max_steps: int, points: int = 11) -> list[tuple[int, float]]:
    """(step, lr) samples across the run, for `raycpt schedule` and docs."""
    steps = sorted({round(i * (max_steps - 1) / (points - 1)) for i in range(points)} | {optim.warmup_steps})
    return [(s, lr_at(s, optim, max_steps)) for s in steps if s < max_steps]
