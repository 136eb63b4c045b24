"""The audit log of the global sample ids trained per step (`train.log_sample_ids`).

Written to `<run>/samples/` at each checkpoint; the resume-equivalence and fault tests read it to
check that an interrupted run trains exactly the sequence of an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.distributed as dist

from raycpt import storage
from raycpt.checkpoint.attempt import AttemptFence


class SampleLog:
    def __init__(self, run_uri: str, enabled: bool, rank: int, world: int, fence: AttemptFence | None):
        self.run_uri, self.enabled, self.rank, self.world, self.fence = run_uri, enabled, rank, world, fence
        self.entries: list[dict[str, Any]] = []

    def add(self, step: int, sample_ids: np.ndarray) -> None:
        """Every rank, after each step (a gather of the workers' slices when enabled)."""
        if not self.enabled:
            return
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, sample_ids.tolist())
        if self.rank == 0:
            self.entries.append({"step": step, "ids": [i for part in gathered for i in part]})

    def flush(self) -> None:
        """Rank 0 writes the steps since the last flush (at each checkpoint)."""
        if self.rank != 0 or not self.entries:
            return
        first, last = self.entries[0]["step"], self.entries[-1]["step"]
        if self.fence is not None:
            self.fence.check(f"write the sample log of steps {first}-{last}")
        storage.write_json(storage.join(self.run_uri, "samples", f"steps-{first:08d}-{last:08d}.json"), self.entries)
        self.entries = []
