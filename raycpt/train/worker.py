"""Where a worker runs: its rank, world, device, Ray Train context and the attempt it belongs to."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from raycpt.checkpoint.attempt import new_attempt_id
from raycpt.train.hooks import LoopHooks, Timeline, say_now


@dataclass(frozen=True)
class Worker:
    """This worker's place in the run."""

    rank: int
    world: int
    device: torch.device
    ray_train: Any  # the `ray.train` module inside Ray Train; None outside it (unit tests, torchrun)
    timeline: Timeline
    attempt: str  # this start's id; rank 0's fences the run folder

    def say(self, msg: str) -> None:
        if self.rank == 0:
            say_now(msg)

    def agree(self, flag: bool) -> bool:
        """True on every rank when any rank passes True (one tiny all-reduce)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def start_worker(hooks: LoopHooks) -> Worker:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    # One attempt id for the whole group, rank 0's: every rank checks the fence against it.
    attempt = [new_attempt_id() if rank == 0 else None]
    dist.broadcast_object_list(attempt, src=0)
    w = Worker(rank, world, device, ray_context(), hooks.timeline(rank, device), attempt[0])
    w.timeline.mark("worker_start", None)
    return w


def ray_context():
    """The `ray.train` module inside a Ray Train worker; None outside it."""
    try:
        import ray.train

        ray.train.get_context()
        return ray.train
    except Exception:  # noqa: BLE001 - outside Ray Train (unit tests, torchrun)
        return None
