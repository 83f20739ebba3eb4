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


class Qwen2VLImagePrompts:
    """What ``Qwen2VLProcessor`` does for images, for a folder holding only a tokenizer and an image processor.

    transformers cannot build ``Qwen2VLProcessor`` without torchvision (it insists on a video processor), so a
    Qwen2-VL folder written without one (``tokensift pretrain-mllm``) has the two parts only. Called like the
    processor: the images through the image processor (``pixel_values``, ``image_grid_thw``), then each prompt's
    image placeholders, in order, repeated ``t·h·w / merge_size²`` times (one per LM token), then tokenized.
    """

    chat_template = None

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.merge_size = int(getattr(image_processor, "merge_size", 2))

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **kwargs):
        texts = [text] if isinstance(text, str) else list(text or [])
        encoded = {}
        if images:
            encoded = dict(self.image_processor(images=images, return_tensors=return_tensors))
            counts = iter((encoded["image_grid_thw"].prod(-1) // self.merge_size**2).tolist())
            expanded = []
            for prompt in texts:
                pieces = prompt.split(self.image_token)
                try:
                    spans = [self.image_token * next(counts) for _ in pieces[1:]]
                except StopIteration:
                    raise ValueError(
                        f"text: the prompts hold more {self.image_token!r} placeholders than the "
                        f"{len(encoded['image_grid_thw'])} images given; give one image per placeholder"
                    ) from None
                expanded.append("".join(p + s for p, s in zip(pieces, [*spans, ""], strict=True)))
            if next(counts, None) is not None:
                raise ValueError(
                    f"images: {len(encoded['image_grid_thw'])} images but fewer {self.image_token!r} placeholders "
                    "in the prompts; put one placeholder per image in the text"
                )
            texts = expanded
        encoded.update(self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kwargs))
        return encoded

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)


def load_mllm_processor(name_or_path: str):
    """The multimodal processor of a model folder: ``AutoProcessor``'s, or for a Qwen2-VL folder without one (no
    torchvision) :class:`Qwen2VLImagePrompts` over its tokenizer and image processor; ``None`` when the folder
    holds neither."""
    local = os.path.isdir(name_or_path)
    try:
        processor = transformers.AutoProcessor.from_pretrained(name_or_path, local_files_only=local)
    except (OSError, ValueError, TypeError, AttributeError, ImportError):  # ImportError: Qwen2-VL's video part
        processor = None
    if processor is not None and getattr(processor, "image_processor", None) is not None:
        return processor
    config = transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=local)
    if config.model_type not in ("qwen2_vl", "qwen2_5_vl"):
        return None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
        image_processor = transformers.AutoImageProcessor.from_pretrained(name_or_path, local_files_only=local)
    except (OSError, ValueError):
        return None
    return Qwen2VLImagePrompts(tokenizer, image_processor)
