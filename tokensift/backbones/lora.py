"""LoRA adapters on a backbone's attention, trained beside a scorer and shipped as a standard peft folder.

Training injects the adapter into the unmodified transformers model in place (``peft``'s
``inject_adapter_in_model``), so the backbone keeps its class and tokensift's adapter still names its
sites. Export rebuilds the backbone as a ``PeftModel`` and lets peft write the folder, so anything that
reads peft adapters (``PeftModel.from_pretrained``) reads it; ``ts.apply`` loads it the same way.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER_DIR = "adapter"
# the attention projections every supported family (ViT, CLIP, SigLIP in transformers 5) names alike
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")


def lora_config(options: dict[str, Any]):
    """A ``peft.LoraConfig`` from YAML-style options; LoRA defaults to the query and value projections."""
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError("model.lora needs peft: pip install 'tokensift[peft]'.") from error
    options = dict(options)
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"model.lora has no option {unknown}; it takes peft.LoraConfig fields such as r, lora_alpha, "
            "lora_dropout, target_modules."
        )
    options.setdefault("target_modules", list(DEFAULT_TARGET_MODULES))
    return LoraConfig(**options)


def add_lora(model: nn.Module, options: dict[str, Any]) -> None:
    """Inject trainable LoRA layers into ``model`` in place; every other weight keeps its ``requires_grad``."""
    from peft import inject_adapter_in_model

    # peft marks only adapters trainable; an unfrozen backbone must stay unfrozen (parameters keep their identity)
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    inject_adapter_in_model(lora_config(options), model)
    for parameter in model.parameters():
        parameter.requires_grad_(trainable.get(id(parameter), True))  # new parameters are LoRA's


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in name


def lora_modules(model: nn.Module) -> list[nn.Module]:
    """The layers peft replaced (they own the LoRA weights and their dropout)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def save_adapter(base_model: nn.Module, options: dict[str, Any], weights: dict[str, torch.Tensor], out: Path) -> None:
    """Write ``weights`` (named as in a model that went through :func:`add_lora`) as a peft adapter folder."""
    from peft import get_peft_model

    peft_model = get_peft_model(base_model, lora_config(options))
    result = peft_model.base_model.model.load_state_dict(weights, strict=False)
    expected = {name for name, _ in peft_model.base_model.model.named_parameters() if is_lora_parameter(name)}
    missing = sorted(expected - set(weights))
    if result.unexpected_keys or missing:
        raise ValueError(
            f"the checkpoint's LoRA weights do not fit model.lora={options}: "
            f"unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}."
        )
    peft_model.save_pretrained(out)
    peft_model.unload()  # hand the caller its model back without LoRA layers


def load_adapter(model: nn.Module, path: str | os.PathLike):
    """Apply the peft adapter folder ``path`` to ``model`` in place; ``.unload()`` on the result removes it."""
    try:
        from peft import PeftModel
    except ImportError as error:
        raise ImportError(f"the artifact at {path} carries a LoRA adapter; install peft to apply it.") from error
    return PeftModel.from_pretrained(model, os.fspath(path), is_trainable=False)


__all__ = [
    "ADAPTER_DIR",
    "add_lora",
    "is_lora_parameter",
    "load_adapter",
    "lora_config",
    "lora_modules",
    "save_adapter",
]
