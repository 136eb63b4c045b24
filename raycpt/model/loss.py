"""Causal-LM loss that never holds full-vocabulary fp32 logits.

For a 128k vocabulary, HF's loss keeps bf16 logits [tokens, V] for backward and upcasts them to
fp32 (4 bytes x 16k tokens x 128k = 8.4 GB per micro-batch of 8 x 2048). Here the LM head and the
cross-entropy run chunk by chunk over tokens inside one autograd function: each chunk's logits
live only while its loss and its logit gradient (softmax - one-hot) are computed, and the chunk's
contribution to d(hidden) and d(head weight) is taken right away (the Liger / torchtune "fused
linear cross-entropy" idea). Backward then only scales the stored gradients by the incoming one.
The FLOPs are the same three head matmuls as the plain path; on CUDA the per-chunk softmax and
one-hot run as one compiled kernel, so the chunk's logits are read about twice.

The weight gradient accumulates across chunks in the weight's dtype (bf16 under FSDP2 mixed
precision, one rounding per chunk): the same precision a single bf16 GEMM of the plain path ends in.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

IGNORE_INDEX = -100


def _ce_chunk(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of one chunk and d(sum CE)/d(logits), in the logits' dtype (math in fp32)."""
    lf = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(lf, dim=-1)
    target_logit = lf.gather(1, safe[:, None]).squeeze(1)
    loss = ((lse - target_logit) * valid).sum()
    # One-hot by comparison (not scatter) so the compiler fuses it with the softmax.
    onehot = torch.arange(lf.shape[1], device=lf.device)[None, :] == safe[:, None]
    grad = (torch.exp(lf - lse[:, None]) - onehot.to(lf.dtype)) * valid[:, None]
    return loss, grad.to(logits.dtype)


_compiled_ce_chunk: Callable[..., Any] | None = None


def _chunk_fn(device: torch.device) -> Callable[..., Any]:
    global _compiled_ce_chunk
    if device.type != "cuda":
        return _ce_chunk  # CPU runs (tests, laptop) stay eager: compiling costs more than it saves
    if _compiled_ce_chunk is None:
        _compiled_ce_chunk = torch.compile(_ce_chunk, dynamic=False)
    return _compiled_ce_chunk


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk_tokens: int) -> torch.Tensor:
        n = hidden.shape[0]
        fn = _chunk_fn(hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        w = weight.to(hidden.dtype)
        for start in range(0, n, chunk_tokens):
            h = hidden[start:start + chunk_tokens]
            loss_c, g = fn(h @ w.t(), targets[start:start + chunk_tokens])
            loss_sum += loss_c
            torch.mm(g, w, out=grad_hidden[start:start + chunk_tokens])
            grad_weight.addmm_(g.t().to(weight.dtype), h.to(weight.dtype))
        n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1).to(acc_dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, n_valid)
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        return (grad_hidden * scale.to(grad_hidden.dtype), grad_weight * scale.to(grad_weight.dtype), None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk_tokens: int = 8192) -> torch.Tensor:
    """mean CE of softmax(hidden @ weight.T) against `targets` over entries != -100.

    hidden [N, d], weight [V, d], targets [N]. Equal (up to rounding) to
    ``F.cross_entropy((hidden @ weight.T).float(), targets)`` with its gradients."""
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be > 0")
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        # One worker's unsharded model computes under autocast (raycpt/model/fsdp.py) with fp32
        # weights: run the head in the autocast dtype explicitly, as under FSDP2's bf16 params
        # (the `out=` and in-place matmuls below take no autocast); the cast is differentiable,
        # so the head's gradient still lands on the fp32 weight.
        dt = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            return chunked_linear_cross_entropy(hidden.to(dt), weight.to(dt), targets, chunk_tokens)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCE.apply(hidden, weight, targets, chunk_tokens)
    # Evaluation: the loss alone, without the gradient matmuls.
    fn = _chunk_fn(hidden.device)
    w = weight.to(hidden.dtype)
    total = sum(fn(hidden[s:s + chunk_tokens] @ w.t(), targets[s:s + chunk_tokens])[0]
                for s in range(0, hidden.shape[0], chunk_tokens))
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1).to(total.dtype)


def causal_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets, flattened: position t predicts t+1; each row's last position is ignored."""
    pad = torch.full_like(input_ids[:, :1], IGNORE_INDEX)
    return torch.cat([input_ids[:, 1:], pad], dim=1).reshape(-1)


def supports_chunked_loss(model: nn.Module) -> bool:
    """Plain linear LM heads only: softcapped or scaled logits (Gemma 2, Cohere) keep HF's loss."""
    cfg = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    return (isinstance(head, nn.Linear) and head.bias is None and base is not None and base is not model
            and getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None)


def use_chunked_loss(model: nn.Module, chunk_tokens: int) -> bool:
    """Route `model(input_ids=..., labels=...)` through the chunked loss; returns whether it did.

    The forward is replaced on this instance (the class belongs to transformers) rather than
    bypassed, because FSDP2 gathers the root's parameters (embeddings, final norm, head) in hooks
    that only run when the root module itself is called. Calls without labels (generation,
    export checks) still run the model's own forward and return logits."""
    if chunk_tokens <= 0 or not supports_chunked_loss(model):
        return False
    from transformers.modeling_outputs import CausalLMOutputWithPast

    hf_forward = model.forward

    def forward(input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs: Any):
        if labels is None:
            return hf_forward(input_ids=input_ids, **kwargs)
        kwargs.setdefault("use_cache", False)  # a loss needs no KV cache
        hidden = model.base_model(input_ids=input_ids, **kwargs).last_hidden_state
        head = model.get_output_embeddings()
        loss = chunked_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                                            causal_targets(labels), chunk_tokens)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = forward
    return True
