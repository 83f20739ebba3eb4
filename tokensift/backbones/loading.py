"""Load a frozen backbone from a local ``save_pretrained`` directory or a hub name."""

from __future__ import annotations

import os
from collections.abc import Collection

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


def _from_pretrained(
    name_or_path: str, supported: Collection[str], expected: str, attn_implementation: str, **kwargs
) -> nn.Module:
    """``from_pretrained`` on the class the config names, one of ``supported`` (else a ``ValueError`` ending in
    ``expected``); local directories never touch the network."""
    local = os.path.isdir(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if not local and looks_local:
        raise FileNotFoundError(
            f"backbone {name_or_path!r} is not a directory; give a local save_pretrained folder or a hub name."
        )
    config = transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=local)
    arch = (config.architectures or [None])[0]
    if arch not in supported:
        raise ValueError(f"backbone {name_or_path!r} is a {arch or config.model_type}; {expected}.")
    cls = getattr(transformers, arch)
    return cls.from_pretrained(name_or_path, local_files_only=local, attn_implementation=attn_implementation, **kwargs)


def load_backbone(name_or_path: str, attn_implementation: str = "sdpa", **kwargs) -> nn.Module:
    """``from_pretrained`` on the class the config names; local directories never touch the network."""
    expected = f"tokensift supports {list(SUPPORTED_ARCHITECTURES)}"
    return _from_pretrained(name_or_path, SUPPORTED_ARCHITECTURES, expected, attn_implementation, **kwargs)


def load_mllm_backbone(name_or_path: str, attn_implementation: str = "sdpa", **kwargs) -> nn.Module:
    """A frozen multimodal LLM (LLaVA, Qwen2-VL) in eval mode; local directories never touch the network."""
    expected = f"exit routers train on a multimodal LLM: {sorted(FAMILIES)}"
    return _from_pretrained(name_or_path, FAMILIES, expected, attn_implementation, **kwargs).eval()
