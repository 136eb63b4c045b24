"""Held-out loss per domain: the new domain shows adaptation, replay domains show forgetting."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@torch.no_grad()
def eval_losses(model: nn.Module, rows_by_source: dict[str, np.ndarray], rank: int, world: int,
                micro_batch_size: int, device: torch.device) -> dict[str, float]:
    """Token-weighted mean loss per source over its held-out rows, all ranks together.

    Every rank runs the same number of forward passes (FSDP all-gathers in each), padding with
    zero-weight rows where the rows do not divide evenly.
    """
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for name, rows in rows_by_source.items():
        if len(rows) == 0:
            continue
        mine = rows[rank::world]
        n_batches = math.ceil(math.ceil(len(rows) / world) / micro_batch_size)
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for b in range(n_batches):
            chunk = mine[b * micro_batch_size:(b + 1) * micro_batch_size]
            weight = 1.0 if len(chunk) else 0.0
            if not len(chunk):
                chunk = rows[:1]
            x = torch.as_tensor(chunk, dtype=torch.long, device=device)
            loss = model(input_ids=x, labels=x).loss
            tokens = x.shape[0] * (x.shape[1] - 1)
            total[0] += weight * loss.double() * tokens
            total[1] += weight * tokens
        if dist.is_initialized():
            dist.all_reduce(total)
        out[name] = float(total[0] / total[1])
    model.train(was_training)
    return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def forgetting(now: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """Old-domain loss now minus at step 0 (positive: the model forgot)."""
    return {k: now[k] - baseline[k] for k in now if k in baseline}
