"""The training build of a model: FSDP2 across workers, the plain module on one.

Across several workers: one `fully_shard` per decoder block, then the root (embeddings, norm,
head). On GPU, parameters compute in bf16 while the sharded fp32 master copy stays with the
optimizer and gradients reduce in fp32.

On one worker nothing is sharded, so FSDP2 only adds work: per-block hooks, a copy-in, a 1-rank
all-gather and a copy-out of every weight in forward, the same for every gradient in backward,
and DTensor dispatch in the optimizer. A small model cannot hide that host time (at 135M the GPU
sat idle 68% of a step). So a small model on one worker trains as the plain module
(`model.single_worker: plain`): fp32 weights on the device, bf16 autocast around every forward
with a bf16 residual stream (as under FSDP2's bf16 parameters), and, with `model.compile`, the
whole decoder stack compiled as one graph and captured in CUDA graphs (static shapes): one
replay instead of ~2,000 kernel launches a step. Parameter names are the same as under FSDP2
(`get_model_state_dict` strips the compile and checkpoint wrappers), so DCP checkpoints reshard
between one and many workers both ways. A large model is GPU-bound, and there FSDP2's bf16
parameters, which keep every activation between the GEMMs in bf16, measured faster than
autocast over fp32 weights; `auto` picks by size (docs/performance.md has the figures).

On CPU (gloo) everything stays fp32.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from raycpt.model.hf import build_on_meta, decoder_layers, load_base_weights, reinit_nonpersistent_buffers


def _raise_recompile_limit(n_blocks: int) -> None:
    # Every block shares one forward code object, and a guard on a per-block attribute (HF's
    # layer_idx, read whenever a KV cache is built) recompiles it per block; past the recompile
    # limit (8 by default) Dynamo silently leaves the remaining blocks eager.
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * n_blocks + 8)


def _checkpoint_blocks(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = decoder_layers(model)
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def shard_model(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None,
                activation_checkpointing: bool = False, compile_blocks: bool = False) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype
          else MixedPrecisionPolicy())
    if activation_checkpointing:
        _checkpoint_blocks(model)
    layers = decoder_layers(model)
    if compile_blocks:
        _raise_recompile_limit(len(layers))
    for i, block in enumerate(layers):
        if compile_blocks:
            block = torch.compile(block, fullgraph=False)
        layers[i] = block
        # The last block's params are needed right away by backward: keep them unsharded. On one
        # worker nothing is sharded, so resharding would only re-cast every weight to bf16 twice a step.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=mesh.size() > 1 and i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # On one worker the same holds between the micro-batches of a step: `forward_backward` keeps
    # the bf16 weights until the last one's backward rather than re-cast all of them per micro-batch
    # (at 8B with 8 micro-batches, ~117 GB of copies a step). Held anyway from the end of each forward.
    model.raycpt_unsharded_between_micro_batches = mesh.size() == 1
    return model


def autocast_forward(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Run every call of `model` (training, evaluation, whatever its `forward` is replaced with
    later) under autocast to `dtype`: fp32 master weights, bf16 matmuls, as FSDP2's mixed
    precision computes. Hooks, not a wrapper module, so parameter names stay the base model's."""
    active: list[Any] = []

    def enter(module: nn.Module, args: Any, kwargs: Any) -> None:
        ctx = torch.autocast(device.type, dtype=dtype)
        ctx.__enter__()
        active.append(ctx)

    def leave(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        active.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter, with_kwargs=True)
    # always_call: an exception inside forward still leaves autocast.
    model.register_forward_hook(leave, with_kwargs=True, always_call=True)


def bf16_residual_stream(model: nn.Module, dtype: torch.dtype) -> None:
    """The input embeddings' output in `dtype`: the residual stream (and every elementwise kernel
    on it) then stays in bf16, as it does under FSDP2's bf16 parameters, instead of being promoted
    to fp32 by the fp32 embedding table."""
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.to(dtype))


def local_model(model: nn.Module, compile_model: bool, activation_checkpointing: bool) -> nn.Module:
    """One worker's model, unwrapped: activation checkpointing per block, the decoder stack
    compiled whole (in place: `nn.Module.compile` keeps the parameter names) and captured in CUDA
    graphs ("reduce-overhead"; the loss, clipping and optimizer stay outside)."""
    if activation_checkpointing:
        _checkpoint_blocks(model)
    if compile_model:
        _raise_recompile_limit(len(decoder_layers(model)))
        model.base_model.compile(mode="reduce-overhead", fullgraph=False)
        model.raycpt_cuda_graphs = True  # forward_backward keeps gradients out of the graphs' memory
    return model


PLAIN_BELOW_PARAMS = 500_000_000  # `single_worker: auto`: host-bound below, GPU-bound above


def shards(world_size: int, single_worker: Literal["auto", "plain", "fsdp2"], n_params: int) -> bool:
    """Whether FSDP2 wraps the model: always on several workers; on one, by `model.single_worker`."""
    if world_size > 1 or single_worker == "fsdp2":
        return True
    return single_worker == "auto" and n_params >= PLAIN_BELOW_PARAMS


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 wraps the model (its root is an FSDPModule)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def build_sharded_model(config, mesh: DeviceMesh, device: torch.device, *, param_dtype: torch.dtype | None,
                        attn_implementation: str, activation_checkpointing: bool, compile_blocks: bool,
                        weights_from: str | None, prepare=None,
                        single_worker: Literal["auto", "plain", "fsdp2"] = "auto") -> nn.Module:
    """Meta-device build -> optional `prepare(model)` (freezing, LoRA) -> FSDP2 (or, on one
    worker, maybe the plain module: `single_worker`, see `shards`) -> allocate -> weights from an
    HF folder (or leave them to a checkpoint load)."""
    from raycpt.model.hf import param_count

    model = build_on_meta(config, attn_implementation)
    if prepare is not None:
        model = prepare(model)
    shard = shards(mesh.size(), single_worker, param_count(model))
    if shard:
        shard_model(model, mesh, param_dtype, activation_checkpointing, compile_blocks)
    else:
        local_model(model, compile_blocks and device.type == "cuda", activation_checkpointing)
    model.to_empty(device=device)
    reinit_nonpersistent_buffers(model, device)
    if getattr(config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        emb = model.get_input_embeddings()
        if head is not None and head.weight is not emb.weight:
            head.weight = emb.weight
    if not shard and param_dtype is not None and param_dtype != torch.float32:
        autocast_forward(model, device, param_dtype)
        bf16_residual_stream(model, param_dtype)
    if weights_from:
        load_base_weights(model, weights_from)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)  # overwritten by the checkpoint load that follows
    return model
