"""Named Llama shapes with random weights, for tests and speed benchmarks (no download needed)."""

from __future__ import annotations

import os
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # Shapes-only tests: small enough for a 2-core CPU, a real tokenizer's vocab.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-3.2-3B.
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-3-8B (untied embeddings and head).
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}
SHAPES["llama3-8b-lora"] = SHAPES["llama3-8b"]

# What a shape trains besides its architecture, as job sections: the LoRA CPT recipe of
# jobs/llama3-8b-german.yaml (adapters on every linear layer, embed_tokens and lm_head trained in
# full at a tenth of the LR, as Unsloth's CPT notebooks do).
SHAPE_RECIPES: dict[str, dict[str, Any]] = {
    "llama3-8b-lora": {"model": {"lora": {"rank": 128, "alpha": 32.0, "train_embeddings": True}},
                       "optim": {"embedding_lr_ratio": 0.1}},
}


def llama_config(shape: str, max_position_embeddings: int = 8192, num_layers: int | None = None):
    """The HF config of a named shape; `num_layers` replaces its decoder block count (memory plans
    of a large shape checked on fewer blocks)."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose from {sorted(SHAPES)}")
    kw = dict(SHAPES[shape])
    if num_layers is not None:
        if num_layers <= 0:
            raise ValueError(f"num_layers must be > 0, got {num_layers}")
        kw["num_hidden_layers"] = num_layers
    rope_theta = kw.pop("rope_theta", 10000.0)
    cfg = LlamaConfig(max_position_embeddings=max_position_embeddings, **kw)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    return cfg


def write_random_model(shape: str, folder: str, tokenizer_dir: str | None = None, seed: int = 0) -> str:
    """An HF folder with a randomly initialised Llama of a named shape (and a copied tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    cfg = llama_config(shape)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer_dir:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder
