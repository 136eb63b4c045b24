"""FSDP2 wrapping: one `fully_shard` per decoder block, then the root (embeddings, norm, head).

On GPU, parameters compute in bf16 while the sharded fp32 master copy stays with the optimizer
and gradients reduce in fp32. On CPU (gloo) everything stays fp32.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from raycpt.model.hf import build_on_meta, decoder_layers, load_base_weights, reinit_nonpersistent_buffers


def shard_model(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None,
                activation_checkpointing: bool = False, compile_blocks: bool = False) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype
          else MixedPrecisionPolicy())
    layers = decoder_layers(model)
    if compile_blocks:
        # Every block shares one forward code object, and a guard on a per-block attribute (HF's
        # layer_idx, read whenever a KV cache is built) recompiles it per block; past the recompile
        # limit (8 by default) Dynamo silently leaves the remaining blocks eager.
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * len(layers) + 8)
    for i, block in enumerate(layers):
        if activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if compile_blocks:
            block = torch.compile(block, fullgraph=False)
        layers[i] = block
        # The last block's params are needed right away by backward: keep them unsharded. On one
        # worker nothing is sharded, so resharding would only re-cast every weight to bf16 twice a step.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=mesh.size() > 1 and i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def build_sharded_model(config, mesh: DeviceMesh, device: torch.device, *, param_dtype: torch.dtype | None,
                        attn_implementation: str, activation_checkpointing: bool, compile_blocks: bool,
                        weights_from: str | None, prepare=None) -> nn.Module:
    """Meta-device build -> optional `prepare(model)` (freezing, LoRA) -> FSDP2 -> allocate ->
    weights from an HF folder (or leave them to a checkpoint load)."""
    model = build_on_meta(config, attn_implementation)
    if prepare is not None:
        model = prepare(model)
    shard_model(model, mesh, param_dtype, activation_checkpointing, compile_blocks)
    model.to_empty(device=device)
    reinit_nonpersistent_buffers(model, device)
    if getattr(config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        emb = model.get_input_embeddings()
        if head is not None and head.weight is not emb.weight:
            head.weight = emb.weight
    if weights_from:
        load_base_weights(model, weights_from)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)  # overwritten by the checkpoint load that follows
    return model
