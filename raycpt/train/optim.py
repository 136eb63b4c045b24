"""AdamW with parameter groups: no weight decay on norms and biases, a separate (smaller) LR for
the embeddings and the LM head. Each group carries `lr_scale`; the loop sets
``lr = schedule(step) * lr_scale`` on every step."""

from __future__ import annotations

import torch
from torch import nn

from raycpt.config import OptimConfig

EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "wpe")


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    groups: dict[str, dict] = {
        "decay": {"params": [], "weight_decay": optim.weight_decay, "lr_scale": 1.0, "name": "decay"},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
        "embeddings": {"params": [], "weight_decay": 0.0, "lr_scale": optim.embedding_lr_ratio, "name": "embeddings"},
    }
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if any(e in name for e in EMBEDDING_NAMES):
            groups["embeddings"]["params"].append(p)
        elif p.ndim < 2 or "norm" in name or name.endswith(".bias"):
            groups["no_decay"]["params"].append(p)
        else:
            groups["decay"]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def adamw_implementation(params: list[torch.Tensor]) -> str:
    """"fused" (one multi-tensor kernel per dtype group) when every parameter is on a GPU, plain
    tensors or FSDP2 DTensors alike; "foreach" elsewhere (CPU, gloo), where fused is not faster."""
    if params and all(p.device.type == "cuda" for p in params):
        return "fused"
    return "foreach"


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; fused or foreach by where the parameters are (`device`, the
    worker's, is where they were put)."""
    groups = param_groups(model, optim)
    impl = adamw_implementation([p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, lr=optim.peak_lr, betas=tuple(optim.betas), eps=optim.eps,
                             fused=impl == "fused", foreach=None if impl == "fused" else True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
