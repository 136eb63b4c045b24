"""Throughput, MFU and the driver-side progress line."""

from __future__ import annotations

import torch

# Dense bf16 peak FLOP/s by device name fragment (no sparsity), as MFU conventions use.
_PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12))


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """6N + 12·L·d·T: dense matmuls forward+backward plus attention scores (torchtitan's count)."""
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


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
