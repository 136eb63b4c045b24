"""Throughput, MFU and the driver-side progress line."""

from __future__ import annotations

import time

import torch

# Dense bf16 peak FLOP/s by device name fragment (no sparsity), as MFU conventions use.
_PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12))


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int, n_trainable: int | None = None) -> float:
    """6N + 12·L·d·T: dense matmuls forward+backward plus attention scores (torchtitan's count),
    less the weight-gradient matmul (2 FLOPs a token) that backward skips for every frozen
    parameter when `n_trainable` of the N are trained (LoRA, frozen layers or embeddings)."""
    frozen = 0 if n_trainable is None else n_params - n_trainable
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len - 2.0 * frozen


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for frag, peak in _PEAK_FLOPS:
        if frag in name:
            return peak
    return None


def _fmt_duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_line(m: dict) -> str:
    mfu = f"{m['mfu'] * 100:.1f}%" if m.get("mfu") is not None else "-"
    return (f"step {m['step']}/{m['max_steps']} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
            f"gnorm {m['grad_norm']:.2f} | {m['tokens_per_s']:,.0f} tok/s | mfu {mfu} | "
            f"data-wait {m['data_wait_share'] * 100:.1f}% | ckpt-stall {m['checkpoint_stall_s']:.2f}s | "
            f"eta {_fmt_duration(m['eta_s'])}")


def eval_line(record: dict, baseline: dict | None) -> str:
    """One line per evaluation: loss per source and probe with its change since step 0 (absolute
    and relative), task accuracies with step 0's."""
    base = baseline or {}
    parts = []
    for field, label in (("loss", ""), ("probe_loss", "probe ")):
        for name, loss in record.get(field, {}).items():
            extra = ""
            if name in base.get(field, {}) and record["step"] != base.get("step"):
                b = base[field][name]
                extra = f" ({loss - b:+.4f}, {100 * (loss - b) / b if b else 0.0:+.1f}% vs step 0)"
            parts.append(f"{label}{name} {loss:.4f}{extra}")
    for name, t in record.get("tasks", {}).items():
        b = base.get("tasks", {}).get(name)
        was = f" (step 0 {b['acc']:.3f}/{b['acc_norm']:.3f})" if b and record["step"] != base.get("step") else ""
        parts.append(f"task {name} acc {t['acc']:.3f} acc_norm {t['acc_norm']:.3f}{was}")
    return f"eval step {record['step']}: " + " | ".join(parts)


class MetricWindow:
    """The steps since the last report: throughput, data wait, checkpoint stall, step times.

    `report` closes the window with the metrics of its last step (the loss averaged over workers)
    and opens the next one."""

    def __init__(self, job, world: int, flops_per_token: float, peak_flops: float | None, clock, stream,
                 checkpointer):
        self.job, self.world, self.flops_per_token, self.peak_flops = job, world, flops_per_token, peak_flops
        # A StepClock (train/step.py), a DataStream and a Checkpointer: their wait/blocked counters.
        self.clock, self.stream, self.checkpointer = clock, stream, checkpointer
        self._open()

    def _open(self) -> None:
        self.t0, self.steps = time.perf_counter(), 0
        self.wait0, self.blocked0 = self.stream.wait_s, self.checkpointer.blocked_s

    def step_done(self) -> None:
        self.steps += 1

    def due(self, step: int) -> bool:
        return step % self.job.train.log_interval_steps == 0 or step == self.job.train.max_steps

    def report(self, step: int, loss_sum: torch.Tensor, accum: int, lr: float, grad_norm: torch.Tensor,
               device: torch.device) -> tuple[dict, list[float]]:
        """(metrics, the window's step times in s); every rank calls it (the loss is all-reduced)."""
        import numpy as np
        import torch.distributed as dist

        from raycpt.train.step import peak_memory_gib

        mean_loss = loss_sum / accum
        dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
        if device.type != "cuda":  # gloo has no AVG
            mean_loss /= self.world
        # Read the step clock first: it waits for the device, which runs behind the host, so the
        # window's wall time covers its steps' work, not just their launch.
        step_times = self.clock.read()
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        job = self.job
        tps = self.steps * job.train.global_batch_size * job.data.seq_len / elapsed
        gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        metrics = {
            "step": step, "max_steps": job.train.max_steps, "loss": float(mean_loss), "lr": lr,
            "grad_norm": float(gn), "tokens_per_s": tps,
            "mfu": (tps * self.flops_per_token / (self.peak_flops * self.world)) if self.peak_flops else None,
            "data_wait_share": (self.stream.wait_s - self.wait0) / elapsed,
            "checkpoint_stall_s": self.checkpointer.blocked_s - self.blocked0,
            "step_time_median_s": float(np.median(step_times)) if step_times else None,
            "step_time_p90_s": float(np.percentile(step_times, 90)) if step_times else None,
            "peak_memory_gib": peak_memory_gib(device),
            "eta_s": (job.train.max_steps - step) * elapsed / max(self.steps, 1),
            **{f"tokens/{k}": v for k, v in self.stream.tokens_per_source().items()},
        }
        self._open()
        return metrics, step_times
