"""`raycpt export`: a committed checkpoint -> an HF folder (safetensors, config, tokenizer).

Runs in one process without a process group: DCP reads every rank's shards and assembles full
tensors into a plain CPU model of the base architecture.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed.checkpoint as dcp

from raycpt import storage
from raycpt.checkpoint.dcp import storage_reader
from raycpt.checkpoint.layout import checkpoint_uri_of
from raycpt.checkpoint.state import read_train_state
from raycpt.errors import RaycptError


class ExportError(RaycptError, RuntimeError):
    pass


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def export_hf(run_or_checkpoint: str, output: str, base: str | None = None, adapter_dir: str | None = None) -> str:
    """Write the checkpoint as an HF folder; a LoRA run's adapters are merged into the weights
    (and, with `adapter_dir`, also written there as a PEFT adapter folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from raycpt.model.lora import add_adapters, lora_of, merge_adapters, save_adapter

    entry = checkpoint_uri_of(run_or_checkpoint)
    if entry is None:
        raise ExportError(f"{run_or_checkpoint}: no committed checkpoint to export")
    state = read_train_state(entry.uri)
    base = base or state.config["model"]["base"]
    if not base or not os.path.exists(os.path.join(base, "config.json")):
        raise ExportError(f"--base: the run's model.base {base!r} is not an HF folder here; pass --base DIR")
    config = AutoConfig.from_pretrained(base)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lora = lora_of(state.config)
    if lora is not None:
        add_adapters(model, lora)  # the checkpoint's names: base_layer + lora_A/lora_B
    elif adapter_dir:
        raise ExportError(f"--adapter: {run_or_checkpoint} is a full-model run (no model.lora); drop --adapter")
    sd = model.state_dict()
    dcp.load({"model": sd}, storage_reader=storage_reader(entry.uri))
    model.load_state_dict(sd)
    if lora is not None:
        if adapter_dir:
            save_adapter(model, lora, adapter_dir, base)
        merge_adapters(model)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    os.makedirs(output, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        src = os.path.join(base, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(output, name))
    storage.write_json(os.path.join(output, "raycpt_export.json"),
                       {"checkpoint": entry.uri, "step": entry.step, "base": base,
                        "tokens_per_source": state.tokens_per_source})
    return output
