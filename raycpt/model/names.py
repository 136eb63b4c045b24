"""Parameter names across the wrappers raycpt puts around a model (torch.compile, activation
checkpointing, LoRA), mapped back to the names in the base model's files. Pure string functions,
shared by the weight loader (hf.py) and the adapters (lora.py)."""

from __future__ import annotations


def plain_name(name: str) -> str:
    """A parameter's name without the wrappers torch.compile and activation checkpointing add."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def base_weight_name(name: str) -> str | None:
    """Name in the base model's safetensors of a parameter of the (possibly adapted) model;
    None for adapter parameters, which the base does not have."""
    if is_adapter_param(name):
        return None
    return name.replace(".base_layer.", ".")
