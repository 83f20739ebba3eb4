"""Load a frozen backbone from a local ``save_pretrained`` directory or a hub name."""

from __future__ import annotations

import os

import transformers
from torch import nn

from tokensift.backbones.mllm import FAMILIES

# architectures tokensift trains scorers on; a config naming another one gets a clear error
SUPPORTED_ARCHITECTURES = (
    "ViTForImageClassification",
    "CLIPForImageClassification",
    "SiglipForImageClassification",
    "ViTModel",
    "CLIPVisionModel",
    "SiglipVisionModel",
)


def load_backbone(name_or_path: str, attn_implementation: str = "sdpa", **kwargs) -> nn.Module:
    """``from_pretrained`` on the class the config names; local directories never touch the network."""
    local = os.path.isdir(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if not local and looks_local:
        raise FileNotFoundError(
            f"backbone {name_or_path!r} is not a directory; give a local save_pretrained folder or a hub name."
        )
    config = transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=local)
    arch = (config.architectures or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"backbone {name_or_path!r} is a {arch or config.model_type}; tokensift supports "
            f"{list(SUPPORTED_ARCHITECTURES)}."
        )
    cls = getattr(transformers, arch)
    return cls.from_pretrained(name_or_path, local_files_only=local, attn_implementation=attn_implementation, **kwargs)


def load_mllm_backbone(name_or_path: str, attn_implementation: str = "sdpa", **kwargs) -> nn.Module:
    """A frozen multimodal LLM (LLaVA, Qwen2-VL) in eval mode; local directories never touch the network."""
    local = os.path.isdir(name_or_path)
    if not local and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise FileNotFoundError(
            f"backbone {name_or_path!r} is not a directory; give a local save_pretrained folder or a hub name."
        )
    config = transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=local)
    arch = (config.architectures or [None])[0]
    if arch not in FAMILIES:
        raise ValueError(
            f"backbone {name_or_path!r} is a {arch or config.model_type}; exit routers train on a multimodal LLM: "
            f"{sorted(FAMILIES)}."
        )
    cls = getattr(transformers, arch)
    model = cls.from_pretrained(name_or_path, local_files_only=local, attn_implementation=attn_implementation, **kwargs)
    return model.eval()
