"""`raycpt export`: a committed checkpoint -> an HF folder (safetensors, config, tokenizer).

Runs in one process without a process group: DCP reads every rank's shards and assembles full
tensors into a plain CPU model of the base architecture (float32, as training keeps them), which
is cast to the export dtype (`auto`: the base model's, so a bf16 base exports a bf16 folder that
a server such as vLLM loads as bf16 at half the fp32 size). After writing, the folder is loaded
back as a server would load it and its logits are compared with the float32 checkpoint's; a
difference beyond the dtype's rounding raises ExportError. Files are made readable by group and
others (0644): an export on shared storage is meant to be served by someone else's process.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from raycpt import storage
from raycpt.checkpoint.dcp import storage_reader
from raycpt.checkpoint.integrity import check_checkpoint, load_or_name_the_checkpoint
from raycpt.checkpoint.layout import CheckpointEntry, checkpoint_uri_of
from raycpt.checkpoint.state import TrainState
from raycpt.errors import RaycptError


class ExportError(RaycptError, RuntimeError):
    pass


# Relative L2 error of the exported folder's logits against the float32 checkpoint's, per dtype.
# bf16 keeps 8 mantissa bits and fp16 11; the rounding of the weights and of every activation
# compounds over the layers: measured on SmolLM2-135M (30 layers, 32 random tokens) 1.6% for bf16
# and 0.11% for fp16, so the bounds leave 5x / 27x room for deeper models. A wrong tensor (missed
# merge, transposed or untied weight) is off by far more (~100%).
EXPORT_DTYPES = ("auto", "bfloat16", "float16", "float32")
LOGITS_RTOL = {torch.float32: 1e-5, torch.float16: 3e-2, torch.bfloat16: 8e-2}
_CHECK_TOKENS = 32

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


@dataclass
class LoadedCheckpoint:
    """A committed checkpoint assembled into a plain CPU model of the base architecture."""

    model: nn.Module
    entry: CheckpointEntry
    state: TrainState                   # the checkpoint's train state (config, step, eval history, ...)
    base: str                           # the HF folder of the architecture and tokenizer
    lora: Any                           # the run's LoRA config, None for a full-model run


def load_checkpoint_model(run_or_checkpoint: str, base: str | None = None) -> LoadedCheckpoint:
    """Read a run's newest committed checkpoint (or a checkpoint folder) into one process: DCP
    assembles every rank's shards into full tensors. A LoRA run's model keeps its adapters
    unmerged (`merge_adapters` folds them in)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from raycpt.model.lora import add_adapters, lora_of

    entry = checkpoint_uri_of(run_or_checkpoint)
    if entry is None:
        raise ExportError(f"{run_or_checkpoint}: no committed checkpoint to export")
    state = check_checkpoint(entry)  # train state parses, metadata is safe, no shard truncated
    base = base or state.config["model"]["base"]
    if not base or not os.path.exists(os.path.join(base, "config.json")):
        raise ExportError(f"--base: the run's model.base {base!r} is not an HF folder here; pass --base DIR")
    config = AutoConfig.from_pretrained(base)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lora = lora_of(state.config)
    if lora is not None:
        add_adapters(model, lora)  # the checkpoint's names: base_layer + lora_A/lora_B
    sd = model.state_dict()
    load_or_name_the_checkpoint(lambda: dcp.load({"model": sd}, storage_reader=storage_reader(entry.uri)), entry.uri)
    model.load_state_dict(sd)
    return LoadedCheckpoint(model, entry, state, base, lora)


def base_dtype(base: str) -> torch.dtype:
    """The dtype the base model's config.json names (`dtype`, or `torch_dtype` before transformers
    5); float32 when it names none."""
    with open(os.path.join(base, "config.json")) as f:
        cfg = json.load(f)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or dtype not in LOGITS_RTOL:
        raise ExportError(f"--dtype auto: {base}/config.json names dtype {name!r}, which raycpt does not export; "
                          f"pass --dtype {'|'.join(EXPORT_DTYPES[1:])}")
    return dtype


def resolve_dtype(dtype: str, base: str) -> torch.dtype:
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype}: choose one of {', '.join(EXPORT_DTYPES)}")
    return base_dtype(base) if dtype == "auto" else getattr(torch, dtype)


def export_hf(run_or_checkpoint: str, output: str, base: str | None = None, adapter_dir: str | None = None,
              dtype: str = "auto") -> str:
    """Write the checkpoint as an HF folder in `dtype`; a LoRA run's adapters are merged into the
    weights (and, with `adapter_dir`, also written there as a PEFT adapter folder)."""
    from raycpt.model.lora import merge_adapters, save_adapter

    loaded = load_checkpoint_model(run_or_checkpoint, base)
    model, entry, state, base, lora = loaded.model, loaded.entry, loaded.state, loaded.base, loaded.lora
    if lora is None and adapter_dir:
        raise ExportError(f"--adapter: {run_or_checkpoint} is a full-model run (no model.lora); drop --adapter")
    target = resolve_dtype(dtype, base)
    config = model.config
    if lora is not None:
        if adapter_dir:
            save_adapter(model, lora, adapter_dir, base)
        merge_adapters(model)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    probe = torch.randint(0, config.vocab_size, (1, _CHECK_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=probe).logits.float()
    model.to(target)
    model.config.dtype = target  # config.json's `dtype`: what `dtype="auto"` loaders (vLLM, HF) use
    os.makedirs(output, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    del model
    for name in _TOKENIZER_FILES:
        src = os.path.join(base, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(output, name))
    storage.write_json(os.path.join(output, "raycpt_export.json"),
                       {"checkpoint": entry.uri, "step": entry.step, "base": base, "dtype": str(target)[6:],
                        "tokens_per_source": state.tokens_per_source})
    make_readable(output)
    check_logits(output, probe, reference, target)
    return output


def check_logits(folder: str, probe: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> float:
    """Load the written folder as a server would (its own dtype) and compare its logits with the
    float32 checkpoint's; returns the relative L2 error, raises ExportError past the dtype's bound."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", local_files_only=True)
    got_dtype = next(loaded.parameters()).dtype
    if got_dtype != dtype:
        raise ExportError(f"--output {folder}: the written folder loads as {got_dtype}, not {dtype}")
    with torch.no_grad():
        got = loaded.eval()(input_ids=probe).logits.float()
    error = float((got - reference).norm() / reference.norm().clamp_min(1e-12))
    if not error <= LOGITS_RTOL[dtype]:
        raise ExportError(f"--output {folder}: the exported {dtype} logits differ from the checkpoint's by "
                          f"{error:.2%} (relative L2; at most {LOGITS_RTOL[dtype]:.2%} is rounding); the folder "
                          "is not a faithful export; export with --dtype float32 to rule out precision")
    return error


def make_readable(folder: str) -> None:
    """0644 files and 0755 folders: whatever the umask or temp-file mode the writers used."""
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
