"""Held-out evaluation on known data (no Ray, no process group)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raycpt.train.evaluate import eval_losses, forgetting, perplexity


def small_llama(vocab: int = 100):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def test_uniform_model_scores_log_vocab_and_its_perplexity_is_the_vocab():
    model = small_llama(100)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: every next token has probability 1/100
    rng = np.random.default_rng(0)
    rows = {"new": rng.integers(0, 100, (5, 12)), "old": rng.integers(0, 100, (3, 12))}
    losses = eval_losses(model, rows, 0, 1, 2, torch.device("cpu"))  # 5 rows in micro-batches of 2
    assert losses == pytest.approx({"new": math.log(100), "old": math.log(100)}, abs=1e-5)
    assert perplexity(losses["new"]) == pytest.approx(100, rel=1e-4)


def test_eval_is_the_token_mean_over_all_rows_whatever_the_micro_batch():
    model = small_llama(100).eval()
    rows = np.random.default_rng(1).integers(0, 100, (5, 10))
    with torch.no_grad():
        x = torch.as_tensor(rows)
        logits = model(input_ids=x).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 100), x[:, 1:].reshape(-1)).item()
    for micro in (1, 2, 5):
        got = eval_losses(model, {"d": rows}, 0, 1, micro, torch.device("cpu"))["d"]
        assert got == pytest.approx(expected, abs=1e-5)
    assert eval_losses(model, {"d": rows[:0]}, 0, 1, 2, torch.device("cpu")) == {}  # no held-out rows: no entry


def test_forgetting_is_old_domain_loss_now_minus_at_step_0():
    assert forgetting({"english": 3.5, "code": 2.0}, {"english": 3.0, "code": 2.5}) == \
        pytest.approx({"english": 0.5, "code": -0.5})
