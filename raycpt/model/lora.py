"""Partial training: freeze the lower decoder blocks, or LoRA continued pretraining (peft) with
`embed_tokens` and `lm_head` trained in full at their own, smaller LR (the Unsloth CPT recipe).

Everything here acts on the model as built on the meta device, *before* FSDP2 wraps it, so the
adapters are ordinary parameters of each decoder block and get sharded with it, and a frozen
parameter simply never gets a gradient (FSDP2 allows frozen and trainable parameters in one
block). The optimizer only ever sees parameters with `requires_grad` (raycpt.train.optim).

Meta materialisation leaves the adapters with uninitialised memory: a fresh run calls
`init_adapters`, which draws each full `lora_A` from a seeded generator and copies each rank's
slice, so the adapters are the same on any number of workers; `lora_B` starts at zero so the
model starts exactly at the base model. A resume or `init.source: run` overwrites all of it
from the checkpoint (DCP stores base and adapter weights alike, so a checkpoint is self-contained).

Adapters travel in the PEFT folder format (adapter_config.json + adapter_model.safetensors, as
peft's and Unsloth's `save_pretrained` write them): `raycpt export --adapter DIR` writes one and
`model.init.source: adapter` continues from one with a fresh optimizer.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from typing import Any, Callable

import torch
from torch import nn

from raycpt.config import LoraConfig, ModelConfig
from raycpt.model.hf import ModelError, copy_full_into, decoder_layers
from raycpt.model.names import is_adapter_param, plain_name

ADAPTER = "default"  # peft's adapter name; part of every adapter parameter's name
PEFT_PREFIX = "base_model.model."  # how peft's saved adapter files name the wrapped model
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_config(lora: LoraConfig, base: str | None = None, for_saving: bool = False):
    from peft import LoraConfig as PeftLoraConfig

    # Training sets requires_grad on the embeddings itself (no peft wrapper, names stay the
    # base's); only a saved adapter lists them as peft's "modules to save".
    to_save = ["embed_tokens", "lm_head"] if lora.train_embeddings and for_saving else None
    return PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias="none", base_model_name_or_path=base, modules_to_save=to_save,
    )


def _embedding_weights(model: nn.Module) -> list[nn.Parameter]:
    out = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and all(module.weight is not p for p in out):
            out.append(module.weight)
    return out


def add_adapters(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Inject LoRA into `lora.target_modules` in place; only adapters (and, with
    `train_embeddings`, the embeddings and LM head) stay trainable."""
    from peft.tuners.lora import LoraModel

    try:
        # The tuner injects into `model` in place and freezes everything but the adapters.
        LoraModel(model, peft_config(lora), ADAPTER)
    except ValueError as e:
        raise ModelError(f"model.lora.target_modules: {e}; name Linear layers of the base model "
                         "(e.g. q_proj, v_proj)") from None
    if lora.train_embeddings:
        for p in _embedding_weights(model):
            p.requires_grad_(True)
    return model


def freeze_lower_blocks(model: nn.Module, k: int, freeze_embeddings: bool) -> nn.Module:
    layers = decoder_layers(model)
    if k > len(layers):
        raise ModelError(f"model.freeze_layers: {k} exceeds the model's {len(layers)} decoder blocks")
    for block in list(layers)[:k]:
        for p in block.parameters():
            p.requires_grad_(False)
    if freeze_embeddings:
        # With tied embeddings this also freezes lm_head: they are one tensor.
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def partial_training(cfg: ModelConfig) -> Callable[[nn.Module], nn.Module] | None:
    """The `prepare` step of `build_sharded_model` for this model config (None: train everything)."""
    if cfg.lora is None and cfg.freeze_layers == 0 and not cfg.freeze_embeddings:
        return None

    def prepare(model: nn.Module) -> nn.Module:
        if cfg.lora is not None:
            add_adapters(model, cfg.lora)
        return freeze_lower_blocks(model, cfg.freeze_layers, cfg.freeze_embeddings)

    return prepare


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters, shared tensors counted once, full (unsharded) sizes."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def init_adapters(model: nn.Module, seed: int) -> int:
    """Fresh adapters after meta materialisation: lora_A as nn.Linear's default init (peft's),
    lora_B zero. Each full tensor comes from a generator seeded by (seed, name), so the values
    do not depend on the number of workers. Returns how many tensors were initialised."""
    n = 0
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(plain_name(name).encode()))
            full = torch.empty(tuple(p.shape), dtype=torch.float32)
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=g)
            copy_full_into(p, full)
            n += 1
        elif ".lora_B." in name:
            with torch.no_grad():
                p.zero_()
            n += 1
    return n


# ---- PEFT adapter folders -------------------------------------------------------------------

def _peft_key(name: str) -> str:
    # peft drops the adapter name from the keys it saves: q_proj.lora_A.default.weight -> q_proj.lora_A.weight
    return PEFT_PREFIX + name.replace(f".{ADAPTER}.", ".")


def adapter_tensors(model: nn.Module, lora: LoraConfig) -> dict[str, torch.Tensor]:
    """The tensors a PEFT adapter folder holds, by their names there (plain, full CPU tensors)."""
    out: dict[str, torch.Tensor] = {}
    emb = {"embed_tokens", "lm_head"} if lora.train_embeddings else set()
    for name, t in model.state_dict().items():
        if is_adapter_param(name) or (emb and name.split(".")[-2] in emb):
            out[_peft_key(name)] = t.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def save_adapter(model: nn.Module, lora: LoraConfig, folder: str, base: str | None) -> str:
    """Write a PEFT adapter folder from an (unsharded) adapted model."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    peft_config(lora, base, for_saving=True).save_pretrained(folder)
    save_file(adapter_tensors(model, lora), os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


def check_adapter_config(folder: str, lora: LoraConfig) -> None:
    """The adapter must have the shape of `model.lora`; else name what differs."""
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.exists(path) or not os.path.exists(os.path.join(folder, ADAPTER_WEIGHTS)):
        raise ModelError(f"model.init.adapter: {folder} is not a PEFT adapter folder "
                         f"(adapter_config.json and {ADAPTER_WEIGHTS}); `raycpt export RUN --adapter DIR` writes one")
    saved = json.load(open(path))
    problems = []
    if saved.get("peft_type") not in (None, "LORA"):
        problems.append(f"peft_type {saved.get('peft_type')} (raycpt continues LoRA adapters)")
    if saved.get("r") != lora.rank:
        problems.append(f"model.lora.rank: {lora.rank}, the adapter has r={saved.get('r')}")
    targets = saved.get("target_modules")
    if targets is not None:
        # Unsloth lists the fully trained embeddings among the targets; they are not adapters.
        targets = [t for t in targets if t not in ("embed_tokens", "lm_head")]
    if targets is not None and set(targets) != set(lora.target_modules):
        problems.append(f"model.lora.target_modules: {sorted(lora.target_modules)}, the adapter has {sorted(targets)}")
    if saved.get("lora_alpha") is not None and float(saved["lora_alpha"]) != lora.alpha:
        problems.append(f"model.lora.alpha: {lora.alpha}, the adapter has lora_alpha={saved['lora_alpha']}")
    if problems:
        raise ModelError(f"model.init.adapter: {folder} does not match model.lora; set the config to the "
                         "adapter's shape:\n  " + "\n  ".join(problems))


def load_adapter(model: nn.Module, folder: str, lora: LoraConfig) -> list[str]:
    """Copy a PEFT adapter's tensors into the (sharded) adapted model. Embedding tensors the
    adapter carries (modules_to_save) replace the base's; returns the names loaded."""
    from safetensors import safe_open

    check_adapter_config(folder, lora)
    params = {plain_name(n): p for n, p in model.named_parameters()}
    loaded, missing = [], []
    with safe_open(os.path.join(folder, ADAPTER_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        for name, p in params.items():
            key = _peft_key(name)
            # Older peft releases saved fully trained modules as `<module>.modules_to_save.weight`.
            older = key.rsplit(".", 1)[0] + ".modules_to_save." + key.rsplit(".", 1)[1]
            found = key if key in keys else older if older in keys else None
            if found is None:
                if is_adapter_param(name):
                    missing.append(key)
                continue
            copy_full_into(p, f.get_tensor(found))
            loaded.append(name)
    if missing:
        raise ModelError(f"model.init.adapter: {folder} lacks {len(missing)} adapter tensors, e.g. {missing[:3]}; "
                         "check model.lora.target_modules against the adapter's")
    return loaded


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base Linear and drop the adapters (export)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model


def lora_of(job_config: dict[str, Any]) -> LoraConfig | None:
    """The LoRA config a checkpoint's saved job config used (None: full model)."""
    raw = job_config.get("model", {}).get("lora")
    return LoraConfig.model_validate(raw) if raw else None


def check_init_run(saved_job_config: dict[str, Any], cfg: ModelConfig) -> None:
    """`init.source: run` loads the other run's model state by name: the LoRA shape must match."""
    theirs, ours = lora_of(saved_job_config), cfg.lora
    if (theirs is None) != (ours is None) or (ours is not None and (
            theirs.rank, sorted(theirs.target_modules)) != (ours.rank, sorted(ours.target_modules))):
        raise ModelError(
            f"model.init.run: that run trained with model.lora={theirs.model_dump() if theirs else None}, this one "
            f"sets {ours.model_dump() if ours else None}; match model.lora, or `raycpt export` that run and "
            "start from the exported folder as model.base (with model.init.source: base)")
