"""Ray Train's record of a run's committed checkpoints, kept beside raycpt's own.

Ray Train is told about each committed checkpoint (`ray.train.report(checkpoint=...)`), so
`ray.train.get_checkpoint()` names it after a restart; storage stays the authority: the start
decision uses the newest committed checkpoint in storage and only logs a disagreement.
Ray is given a small pointer folder, not the checkpoint itself: Ray prunes what it records
(CheckpointConfig.num_to_keep) and refuses to resume a run whose recorded checkpoints are gone,
while raycpt's own retention decides which checkpoints stay.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch.distributed as dist

from raycpt import storage
from raycpt.checkpoint.layout import step_uri
from raycpt.config import JobConfig

RAY_RECORDS = "ray-checkpoints"  # under the run folder; Ray Train owns and prunes these
POINTER_FILE = "raycpt_checkpoint.json"


class RayRecords:
    """Reports each newly committed checkpoint to Ray Train once (`ray_train` None: outside Ray)."""

    def __init__(self, ray_train: Any, job: JobConfig):
        self.ray_train = ray_train
        self.job = job
        self.reported_step: int | None = None

    def report(self, step: int | None) -> None:
        """Every rank calls this at the same point, as Ray Train's report requires."""
        if self.ray_train is None or step is None or step == self.reported_step:
            return
        from ray.train import Checkpoint, CheckpointUploadMode

        checkpoint = None
        if dist.get_rank() == 0:
            pointer = storage.join(self.job.run_uri, RAY_RECORDS, f"step-{step:08d}")
            storage.write_json(storage.join(pointer, POINTER_FILE),
                               {"step": step, "uri": step_uri(self.job.run_uri, step)})
            fs = self.ray_train.get_context().get_storage().storage_filesystem
            path = pointer.split("://", 1)[-1] if storage.is_remote(pointer) else storage.local_path(pointer)
            checkpoint = Checkpoint(path=path, filesystem=fs)
        tokens = step * self.job.train.global_batch_size * self.job.data.seq_len
        self.ray_train.report({"step": step, "tokens": tokens}, checkpoint=checkpoint,
                              checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        self.reported_step = step

    def recorded_step(self) -> int | None:
        """The step of the checkpoint Ray Train hands this (restarted) run, if any."""
        if self.ray_train is None or self.ray_train.get_checkpoint() is None:
            return None
        try:
            with self.ray_train.get_checkpoint().as_directory() as d:
                with open(os.path.join(d, POINTER_FILE)) as f:
                    return int(json.load(f)["step"])
        except (OSError, ValueError, KeyError):
            return None
