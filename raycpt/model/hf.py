"""Hugging Face models: import (GGUF -> HF folder), build on the meta device, load weights sharded.

A base model is a local HF folder: config.json, *.safetensors, tokenizer files. Training builds
the architecture on the meta device (no memory), shards it with FSDP2, allocates only each
rank's shards, and copies each rank's part of every tensor straight from the safetensors files,
one tensor at a time, so no rank ever holds the whole model.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch
from torch import nn

from raycpt.errors import RaycptError
from raycpt.model.names import base_weight_name


class ModelError(RaycptError, ValueError):
    """A base model that cannot be used; names the config key and the fix."""


# Any one of these makes a folder loadable by AutoTokenizer (fast tokenizer, sentencepiece, BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "vocab.txt")


def check_base_folder(base: str, key: str = "model.base") -> None:
    """The folder is there and its config.json parses (cheap: no tokenizer or weights read)."""
    if not os.path.exists(base):
        raise ModelError(f"{key}: {base} does not exist; point it at an HF model folder "
                         "(`raycpt import` makes one from a GGUF file)")
    if not os.path.isdir(base):
        raise ModelError(f"{key}: {base} is a file, not a folder; point it at the HF model folder that holds "
                         "config.json, *.safetensors and the tokenizer (`raycpt import` makes one from a GGUF file)")
    cfg = os.path.join(base, "config.json")
    if not os.path.exists(cfg):
        raise ModelError(f"{key}: {base} has no config.json; it is not an HF model folder")
    try:
        with open(cfg, encoding="utf-8") as f:
            parsed = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{key}: {cfg} is not valid JSON ({e}); restore it from the model's source") from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ModelError(f"{key}: {cfg} has no model_type; it is not an HF model config")


def check_model_folder(base: str, key: str = "model.base", weights: bool = True) -> None:
    """Everything training reads from a base model folder, checked on the driver before Ray starts:
    config, tokenizer files, and (`weights`) every safetensors file's header (each must open; no
    tensor is read)."""
    from safetensors import safe_open

    check_base_folder(base, key)
    if not any(os.path.exists(os.path.join(base, n)) for n in TOKENIZER_FILES):
        raise ModelError(f"{key}: {base} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the "
                         "base model's tokenizer into it (AutoTokenizer.save_pretrained)")
    if not weights:
        return
    files = sorted(glob.glob(os.path.join(base, "*.safetensors")))
    if not files:
        raise ModelError(f"{key}: {base} has no *.safetensors weights; save the model with "
                         "save_pretrained(safe_serialization=True), or `raycpt import` a GGUF file")
    for f in files:
        if not os.access(f, os.R_OK):
            raise ModelError(f"{key}: {f} is not readable (permissions); fix them")
        try:
            with safe_open(f, framework="pt") as h:
                h.keys()
        except Exception as e:  # noqa: BLE001 - a cut-off or foreign file: name it
            raise ModelError(f"{key}: {f} is not a readable safetensors file ({type(e).__name__}: "
                             f"{str(e)[:160]}); the download or copy was cut short") from None
    try:
        load_config(base)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers' own reasons (unknown model_type ...)
        raise ModelError(f"{key}: {base}/config.json cannot be loaded ({type(e).__name__}: {str(e)[:200]})") from None


def load_config(base: str):
    from transformers import AutoConfig

    check_base_folder(base)
    return AutoConfig.from_pretrained(base)


def load_tokenizer(base: str, key: str = "model.base"):
    from transformers import AutoTokenizer

    if not os.path.isdir(base):
        raise ModelError(f"{key}: {base} is not a folder with a tokenizer (an HF model folder)")
    try:
        return AutoTokenizer.from_pretrained(base)
    except Exception as e:  # noqa: BLE001 - transformers' reasons vary (missing files, bad JSON ...)
        raise ModelError(f"{key}: no usable tokenizer in {base} ({type(e).__name__}: {str(e)[:200]}); copy the "
                         "base model's tokenizer files into it (AutoTokenizer.save_pretrained)") from None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (the unit of FSDP sharding and activation checkpointing)."""
    inner = getattr(model, "model", None)
    for holder in (inner, getattr(inner, "model", None), getattr(inner, "decoder", None), model):
        layers = getattr(holder, "layers", None) if holder is not None else None
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ModelError(f"model.base: cannot find the decoder layers of {type(model).__name__}")


def build_on_meta(config: Any, attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                 dtype=torch.float32)
    return model


def reinit_nonpersistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Rebuild buffers that are computed at construction, not stored (e.g. rotary inv_freq);
    after `to_empty` they hold garbage."""
    for module in model.modules():
        names = getattr(module, "_non_persistent_buffers_set", set())
        if not names or not hasattr(module, "config"):
            continue
        with torch.device(device):
            fresh = type(module)(module.config)
        for name in names:
            setattr(module, name, getattr(fresh, name).to(device))
        for attr in ("attention_scaling",):
            if hasattr(fresh, attr):
                setattr(module, attr, getattr(fresh, attr))


class SafetensorsReader:
    """Tensors of an HF folder by name, opened lazily (index or single file)."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise ModelError(f"model.base: {folder} has no *.safetensors weights")
        self.handles = [safe_open(f, framework="pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}

    def get(self, name: str) -> torch.Tensor | None:
        h = self.where.get(name)
        return None if h is None else h.get_tensor(name)


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of a full tensor into a (possibly FSDP-sharded) parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            local = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full.to(param.dtype))


def load_base_weights(model: nn.Module, folder: str) -> None:
    """Copy each parameter's local shard from the safetensors files (DTensor-aware)."""
    reader = SafetensorsReader(folder)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = []
    with torch.no_grad():
        for name, param in model.state_dict().items():
            # torch.compile and activation checkpointing wrap blocks and put their wrapper's attribute
            # in the names; the files know the plain names.
            name = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
            # LoRA wraps a Linear as `<name>.base_layer` and adds adapters the base does not have.
            name = base_weight_name(name)
            if name is None:
                continue
            full = reader.get(name)
            if full is None and tied and name.endswith("lm_head.weight"):
                full = reader.get(name.replace("lm_head.weight", "model.embed_tokens.weight"))
            if full is None:
                missing.append(name)
                continue
            copy_full_into(param, full)
    if missing:
        raise ModelError(f"model.base: {folder} lacks weights for {missing[:5]} ({len(missing)} in all)")


_GGUF_MAGIC = b"GGUF"


def check_gguf_file(gguf_file: str) -> None:
    """A GGUF file starts with the bytes GGUF; anything else is refused before transformers reads it."""
    if not os.path.exists(gguf_file):
        raise ModelError(f"{gguf_file}: no such file; give the path of a .gguf model file")
    if os.path.isdir(gguf_file):
        raise ModelError(f"{gguf_file}: is a folder; give the .gguf file inside it")
    with open(gguf_file, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ModelError(f"{gguf_file}: not a GGUF file (it does not start with {_GGUF_MAGIC!r}); "
                         "give a .gguf model file (an HF folder needs no import: use it as model.base)")


def import_gguf(gguf_file: str, output: str) -> str:
    """Write an HF folder (safetensors, config, tokenizer) from a GGUF file, dequantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_file(gguf_file)
    folder, name = os.path.split(os.path.abspath(gguf_file))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, EOFError, IndexError) as e:
        # The gguf reader fails on a cut-off file with whatever numpy says about the short buffer.
        raise ModelError(f"{gguf_file}: not a readable GGUF model ({type(e).__name__}: {str(e)[:200]}); "
                         "the file may be truncated: download it again") from None
    config = model.config
    # A GGUF-loaded config carries the quantization that was undone; the saved folder is plain.
    cfg_dict = config.to_dict()
    cfg_dict.pop("quantization_config", None)
    plain = type(config).from_dict(cfg_dict)
    clean = AutoModelForCausalLM.from_config(plain, dtype=torch.float32)
    clean.load_state_dict(model.state_dict(), strict=False)
    if getattr(plain, "tie_word_embeddings", False):
        clean.tie_weights()
    os.makedirs(output, exist_ok=True)
    clean.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    with open(os.path.join(output, "raycpt_import.json"), "w") as f:
        json.dump({"from_gguf": os.path.basename(gguf_file)}, f)
    return output


def param_count(model: nn.Module, exclude_embeddings: bool = False) -> int:
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in seen or (exclude_embeddings and "embed" in name):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
