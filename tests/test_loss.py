"""The chunked LM-head loss equals the plain one, value and gradients, and HF's model loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raycpt.model.loss import IGNORE_INDEX, causal_targets, chunked_linear_cross_entropy, use_chunked_loss


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 1000])
def test_chunked_ce_matches_plain_ce_and_gradients(chunk_tokens):
    g = torch.Generator().manual_seed(chunk_tokens)
    n, d, v = 50, 16, 301
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = IGNORE_INDEX
    upstream = torch.rand((), generator=g, dtype=torch.float64) + 0.5

    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    ref_gh, ref_gw = torch.autograd.grad(ref * upstream, (hidden, weight))
    out = chunked_linear_cross_entropy(hidden, weight, targets, chunk_tokens)
    gh, gw = torch.autograd.grad(out * upstream, (hidden, weight))

    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # evaluation path: loss only
        assert torch.allclose(chunked_linear_cross_entropy(hidden, weight, targets, chunk_tokens), ref, rtol=1e-12)
    assert torch.allclose(gh, ref_gh, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gw, ref_gw, rtol=1e-10, atol=1e-12)


def test_all_targets_ignored_gives_zero_not_nan():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    out = chunked_linear_cross_entropy(hidden, weight, torch.full((4,), IGNORE_INDEX), 3)
    out.backward()
    assert out.item() == 0.0 and torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_model_forward_uses_chunked_loss_and_matches_hf():
    from transformers import AutoModelForCausalLM

    from raycpt.model.shapes import llama_config

    torch.manual_seed(0)
    cfg = llama_config("tiny")
    ref_model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64)
    model.load_state_dict(ref_model.state_dict())
    assert use_chunked_loss(model, chunk_tokens=10)
    x = torch.randint(0, cfg.vocab_size, (3, 17))

    hf_loss = ref_model(input_ids=x, labels=x).loss  # HF upcasts logits to fp32 only
    logits = ref_model(input_ids=x).logits.reshape(-1, cfg.vocab_size)
    ref = F.cross_entropy(logits, causal_targets(x), ignore_index=IGNORE_INDEX)
    ref.backward()
    out = model(input_ids=x, labels=x)
    assert out.logits is None  # no full-vocabulary logits were built
    out.loss.backward()
    assert torch.allclose(out.loss, ref, rtol=1e-10)
    assert torch.allclose(out.loss.float(), hf_loss, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-12), name
    assert model(input_ids=x).logits.shape == (3, 17, cfg.vocab_size)  # no labels: HF's own forward


def test_causal_targets_shift_and_ignore_last():
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert causal_targets(x).tolist() == [2, 3, IGNORE_INDEX, 5, 6, IGNORE_INDEX]
