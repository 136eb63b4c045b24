"""The compute of one optimizer step: forward and backward over the micro-batches of this worker.

Nothing here waits on the device: the batch goes up once per step from pinned memory, losses
stay on the device (the loop reads them only at report steps), so the host runs ahead and
queues the next step's kernels while the device works. Step times come from CUDA events
recorded at step boundaries and read only at report steps (`StepClock`).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn


def batch_to_device(input_ids: np.ndarray, device: torch.device) -> torch.Tensor:
    """All micro-batches of a step in one copy; pinned so the copy does not block the host."""
    t = torch.tensor(input_ids, dtype=torch.long)  # a copy: the stream's arrays are read-only
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def forward_backward(model: nn.Module, input_ids: np.ndarray, micro_batch_size: int,
                     device: torch.device) -> torch.Tensor:
    """Accumulate gradients of the mean loss over the rows of `input_ids` (this worker's slice of
    the global batch); under FSDP2 gradients are reduced across workers on the last micro-batch only.
    Returns the sum of the micro-batch losses, detached and on the device."""
    batch = batch_to_device(input_ids, device)
    accum = batch.shape[0] // micro_batch_size
    sharded = hasattr(model, "set_requires_gradient_sync")  # FSDP2; one worker's plain module has no sync
    keep_unsharded = accum > 1 and getattr(model, "raycpt_unsharded_between_micro_batches", False)
    if accum > 1 and getattr(model, "raycpt_cuda_graphs", False):
        # A CUDA graph's outputs live in memory its next replay overwrites: a gradient taken over
        # as `.grad` on one micro-batch would be clobbered by the next. Gradients that exist are
        # added to in place instead.
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    loss_sum = torch.zeros((), device=device)
    for i in range(accum):
        x = batch[i * micro_batch_size:(i + 1) * micro_batch_size]
        if sharded:
            model.set_requires_gradient_sync(i == accum - 1)
            if keep_unsharded:
                model.set_reshard_after_backward(i == accum - 1)
        # use_cache=False: HF otherwise fills a KV cache in training (copies, and one recompile per block).
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        (loss / accum).backward()
        loss_sum += loss.detach()
    return loss_sum


class StepClock:
    """Per-step wall time on the device's timeline (CUDA events) or the host clock on CPU.

    `mark()` at every step boundary costs no sync; `read()` (at report steps) waits for the last
    mark and returns the durations since the previous read."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def read(self) -> list[float]:
        if len(self.marks) < 2:
            return []
        if self.cuda:
            self.marks[-1].synchronize()
            out = [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        else:
            out = [b - a for a, b in zip(self.marks, self.marks[1:])]
        self.marks = self.marks[-1:]
        return out


class StepProfiler:
    """torch.profiler over steps [start, stop) of rank 0; writes the kernel table by device time
    to `path` (loop option `profile`: [path, start, stop]; raycpt bench train --profile)."""

    def __init__(self, spec: list | None, rank: int):
        self.path, self.start, self.stop = (spec if spec and rank == 0 else (None, -1, -1))
        self.prof = None

    def step(self, step: int) -> None:
        """Call after step `step - 1` finished (its number is the next step to run)."""
        if self.path is None:
            return
        if step == self.start:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
        elif step == self.stop and self.prof is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            with open(self.path, "w") as f:
                f.write(f"steps {self.start}..{self.stop - 1}\n")
                if torch.cuda.is_available():
                    f.write(device_idle_summary(self.prof, self.stop - self.start) + "\n")
                f.write(self.prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90))
            if torch.cuda.is_available():  # the timeline, for chrome://tracing or Perfetto
                import gzip
                import shutil

                raw = self.path + ".trace.json"
                self.prof.export_chrome_trace(raw)
                with open(raw, "rb") as src, gzip.open(raw + ".gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.remove(raw)
            self.prof = None


def device_idle_summary(prof, steps: int) -> str:
    """How much of the profiled window the GPU ran nothing (union of kernel and copy intervals),
    and the longest idle gaps: idle time is what launch overhead or a host wait costs."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return "device idle: no device events"
    busy, gaps, (cur_s, cur_e) = 0.0, [], spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((s - cur_e, cur_e - spans[0][0]))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    window = cur_e - spans[0][0]
    idle = window - busy
    top = ", ".join(f"{g / 1e3:.2f}ms@{at / 1e3:.0f}ms" for g, at in sorted(gaps, reverse=True)[:8])
    return (f"device window {window / 1e3:.1f} ms over {steps} steps: busy {busy / 1e3:.1f} ms, idle "
            f"{idle / 1e3:.1f} ms ({100 * idle / window:.1f}%) in {len(gaps)} gaps; longest: {top}")


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
