"""The training build of a model: FSDP2 across workers, the plain module on one.

Across several workers: one `fully_shard` per decoder block, then the root (embeddings, norm,
head). On GPU, parameters compute in bf16 while the sharded fp32 master copy stays with the
optimizer and gradients reduce in fp32.

On one worker nothing is sharded, so FSDP2 would only add cost: per-block hooks, a copy-in, a
1-rank all-gather and a copy-out of every weight in forward, the same for every gradient in
backward, and DTensor dispatch in the optimizer. That is host time a small model cannot hide
(at 135M the GPU sat idle 68% of a step). One worker therefore trains the plain module: fp32
weights on the device, bf16 autocast around every forward, and, with `model.compile`, the whole
decoder stack compiled as one graph (static shapes: one graph, not 30 block graphs and their
launches). Parameter names are the same as under FSDP2 (`get_model_state_dict` strips the
compile and checkpoint wrappers), so DCP checkpoints reshard between one and many workers both ways.
`model.shard_single_worker` keeps FSDP2 on one worker (to check a sharded run's memory plan).

On CPU (gloo) everything stays fp32.
"""

from __future__ import annotations

from typing import Any

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

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
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


def local_model(model: nn.Module, compile_model: bool, activation_checkpointing: bool) -> nn.Module:
    """One worker's model, unwrapped: activation checkpointing per block, the decoder stack
    compiled whole (in place: `nn.Module.compile` keeps the parameter names)."""
    if activation_checkpointing:
        _checkpoint_blocks(model)
    if compile_model:
        _raise_recompile_limit(len(decoder_layers(model)))
        model.base_model.compile(fullgraph=False)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 wraps the model (its root is an FSDPModule)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def build_sharded_model(config, mesh: DeviceMesh, device: torch.device, *, param_dtype: torch.dtype | None,
                        attn_implementation: str, activation_checkpointing: bool, compile_blocks: bool,
                        weights_from: str | None, prepare=None, shard: bool | None = None) -> nn.Module:
    """Meta-device build -> optional `prepare(model)` (freezing, LoRA) -> FSDP2 (or, on one
    worker, the plain module) -> allocate -> weights from an HF folder (or leave them to a
    checkpoint load). `shard`: None shards when the mesh has more than one rank."""
    if shard is None:
        shard = mesh.size() > 1
    model = build_on_meta(config, attn_implementation)
    if prepare is not None:
        model = prepare(model)
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
    if weights_from:
        load_base_weights(model, weights_from)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)  # overwritten by the checkpoint load that follows
    return model
