"""LR schedules at their key steps, and the AdamW parameter groups (no processes, no Ray)."""

from __future__ import annotations

import pytest
import torch

from raycpt.config import OptimConfig
from raycpt.train.optim import build_optimizer, param_groups, set_lr
from raycpt.train.schedule import lr_at


def optim(**kw) -> OptimConfig:
    return OptimConfig(**{"peak_lr": 1e-3, "start_lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 10, **kw})


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_rewarm_is_linear_from_start_lr_to_peak(schedule):
    o = optim(schedule=schedule)
    assert lr_at(0, o, 101) == pytest.approx(1e-4)
    assert lr_at(5, o, 101) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert lr_at(10, o, 101) == pytest.approx(1e-3)


def test_cosine_and_linear_redecay_hit_their_midpoint_and_min_lr_at_the_last_step():
    mid = 10 + 90 // 2  # warmup 10, last step 100
    assert lr_at(mid, optim(schedule="cosine"), 101) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(mid, optim(schedule="linear"), 101) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    for s in ("cosine", "linear"):
        assert lr_at(100, optim(schedule=s), 101) == pytest.approx(1e-5)
        lrs = [lr_at(i, optim(schedule=s), 101) for i in range(10, 101)]
        assert all(a >= b for a, b in zip(lrs, lrs[1:])), f"{s} re-decay is not monotone"


def test_wsd_holds_the_peak_then_cools_down_over_the_last_fraction():
    o = optim(schedule="wsd", cooldown_fraction=0.2)  # 100 steps: cool down over the last 20
    assert lr_at(79, o, 100) == pytest.approx(1e-3)
    assert lr_at(80, o, 100) == pytest.approx(1e-3)
    assert lr_at(99, o, 100) == pytest.approx(1e-5)
    assert 1e-5 < lr_at(90, o, 100) < 1e-3


def test_constant_holds_the_peak():
    assert lr_at(500, optim(schedule="constant"), 1000) == pytest.approx(1e-3)


def test_param_groups_no_decay_on_norms_biases_and_own_lr_for_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, attention_bias=True,
                                         tie_word_embeddings=False))
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)  # frozen: in no group
    o = optim(embedding_lr_ratio=0.25, weight_decay=0.1)
    groups = {g["name"]: g for g in param_groups(model, o)}
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert by_group["embeddings"] == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all("norm" in n or n.endswith(".bias") for n in by_group["no_decay"])
    assert "model.layers.0.self_attn.q_proj.bias" in by_group["no_decay"]
    assert all(n.endswith(".weight") and "norm" not in n for n in by_group["decay"])
    assert "model.layers.0.self_attn.q_proj.weight" not in set().union(*by_group.values())
    assert groups["decay"]["weight_decay"] == 0.1
    assert groups["no_decay"]["weight_decay"] == groups["embeddings"]["weight_decay"] == 0.0

    opt = build_optimizer(model, o, torch.device("cpu"))
    set_lr(opt, 2e-4)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"decay": 2e-4, "no_decay": 2e-4, "embeddings": 5e-5})
