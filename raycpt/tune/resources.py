"""Trials that share a GPU: what one trial needs, and whether its share of a GPU holds it.

`tune.gpus_per_trial: 0.25` gives each trial's (single) training worker a quarter of a GPU in
Ray's accounting, so 4 trials of a 135M model train at once on one H200. Ray does not enforce
the share in memory: every trial can allocate the whole device, so the sweep checks before any
trial starts that the share can hold one trial's training state (estimated from the model
config, `training_memory`), and refuses with the key to change when it cannot.

The estimate is an upper bound of what FSDP2 training on one rank keeps (raycpt/model/fsdp.py):
fp32 master weights, fp32 gradients and AdamW's two fp32 moments (16 bytes a parameter, even for
frozen or LoRA-only parts, whose optimizer state is smaller), the bf16 unsharded copy of the
weights, the activations the backward pass keeps for one micro-batch, one chunk of the fused
LM-head loss, and a fixed allowance for the CUDA context, allocator and kernels' workspace.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from raycpt.config import ConfigError, JobConfig

GIB = 1 << 30
CONTEXT_OVERHEAD_BYTES = int(1.5 * GIB)  # CUDA context, cuBLAS/NCCL workspace, compile artifacts
FRAGMENTATION_MARGIN = 1.15              # the caching allocator's slack over live tensors


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    weights_bytes: int        # fp32 master + bf16 compute copy
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int    # one micro-batch's saved activations
    loss_bytes: int           # one chunk of logits and its gradient
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        live = (self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes
                + self.loss_bytes)
        return int(live * FRAGMENTATION_MARGIN) + self.overhead_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def training_memory(params: int, num_layers: int, hidden_size: int, intermediate_size: int, vocab_size: int,
                    micro_batch_size: int, seq_len: int, *, bf16: bool, activation_checkpointing: bool,
                    loss_chunk_tokens: int) -> MemoryEstimate:
    """Peak device memory of one training rank that holds the whole model (a world of 1)."""
    act = 2 if bf16 else 4
    tokens = micro_batch_size * seq_len
    # Per token and decoder block, what autograd keeps with SDPA attention (no score matrix):
    # both norms' inputs and outputs, q/k/v, the attention output, and the MLP's gate, up,
    # activation and product (k/v heads counted as full width: an upper bound under GQA).
    per_token_block = act * (8 * hidden_size + 4 * intermediate_size)
    if activation_checkpointing:
        # Only each block's input is kept; one block's activations are rebuilt at a time.
        activations = tokens * (num_layers * act * hidden_size + per_token_block)
    else:
        activations = tokens * num_layers * per_token_block
    chunk = min(loss_chunk_tokens or tokens, tokens)
    loss = chunk * vocab_size * (act + 4 + 4)  # logits, their fp32 copy, and the gradient
    return MemoryEstimate(params=params, weights_bytes=params * (4 + (2 if bf16 else 0)), grads_bytes=4 * params,
                          optimizer_bytes=8 * params, activations_bytes=activations, loss_bytes=loss,
                          overhead_bytes=CONTEXT_OVERHEAD_BYTES)


def job_training_memory(job: JobConfig, model_config: Any | None = None) -> MemoryEstimate:
    """`training_memory` of a job's model (config.json of model.base; built on the meta device
    to count the parameters, which allocates nothing)."""
    from raycpt.model.hf import build_on_meta, load_config, param_count

    cfg = model_config if model_config is not None else load_config(job.model.base)
    hidden = cfg.hidden_size
    return training_memory(
        param_count(build_on_meta(cfg)), cfg.num_hidden_layers, hidden,
        getattr(cfg, "intermediate_size", None) or 4 * hidden, cfg.vocab_size, job.train.micro_batch_size,
        job.data.seq_len, bf16=job.scaling.use_gpu and job.model.param_dtype == "bfloat16",
        activation_checkpointing=job.model.activation_checkpointing, loss_chunk_tokens=job.model.loss_chunk_tokens)


def check_share_fits(estimate: MemoryEstimate, gpus_per_trial: float, device_memory_bytes: int,
                     device_name: str = "the GPU") -> None:
    """Raise ConfigError naming tune.gpus_per_trial when the share cannot hold one trial."""
    share_bytes = gpus_per_trial * device_memory_bytes
    if estimate.total_bytes <= share_bytes:
        return
    need = estimate.total_bytes / GIB
    fits = math.floor(device_memory_bytes / estimate.total_bytes * 100) / 100
    fix = (f"raise it to at least {min(1.0, math.ceil(estimate.total_bytes / device_memory_bytes * 100) / 100):g}"
           + (f" ({int(1 / fits)} trials a GPU)" if fits >= 0.01 and int(1 / fits) > 1 else "")
           if estimate.total_bytes <= device_memory_bytes else "one GPU cannot hold it")
    raise ConfigError(
        f"tune.gpus_per_trial: {gpus_per_trial:g} of {device_name} ({device_memory_bytes / GIB:.0f} GiB) is "
        f"{share_bytes / GIB:.1f} GiB, but one trial needs about {need:.1f} GiB ({estimate.params / 1e6:.0f}M params: "
        f"{(estimate.weights_bytes + estimate.grads_bytes + estimate.optimizer_bytes) / GIB:.1f} GiB of weights, "
        f"gradients and AdamW state, {estimate.activations_bytes / GIB:.1f} GiB of activations); {fix}, or lower "
        "train.micro_batch_size, or set model.activation_checkpointing=true")


def probe_gpu_memory(gpus_per_trial: float, timeout_s: float = 300.0) -> tuple[int, str] | None:
    """(total memory in bytes, device name) of a GPU a trial's worker would get, read by a Ray
    task that reserves the same share; None when no GPU node appears within `timeout_s`."""
    import ray

    @ray.remote(num_gpus=gpus_per_trial, num_cpus=0)
    def device_memory() -> tuple[int, str]:
        import torch

        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), props.name

    ref = device_memory.remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        return None
    return ray.get(ref)


def compute_share(early: dict[str, float], full: dict[str, float]) -> dict[str, float]:
    """What an early-stopped sweep cost as a share of the same sweep with every trial run to the
    end: keys `trial_steps`, `gpu_seconds`, `wall_s` of each side -> their ratios."""
    return {k: (early[k] / full[k]) if full.get(k) else math.nan for k in ("trial_steps", "gpu_seconds", "wall_s")}
