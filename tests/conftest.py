"""Shared fixtures: tiny random-init backbones of the three supported families (ViT, CLIP, SigLIP).

Every model is built under a fixed seed and put in eval mode, so tests are deterministic. The vision
config gives a 4x4 patch grid (16 prunable patches) and 4 blocks, so the valid sites are vit.0 .. vit.2.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    SiglipConfig,
    SiglipForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

transformers.logging.set_verbosity_error()
# The models here are tiny: intra-op threads only add overhead, and on a busy 2-core machine OpenMP's
# spinning workers make every small matmul ~100x slower.
torch.set_num_threads(1)

FAMILIES = ("vit", "clip", "siglip")
VISION_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
    num_channels=3,
)
NUM_PATCHES = (16 // 4) ** 2
NUM_PREFIX = {"vit": 1, "clip": 1, "siglip": 0}  # [CLS] tokens before the patches
BATCH = 3


def build_tiny(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random-init classifier of ``family`` in eval mode, identical for the same seed."""
    torch.manual_seed(seed)
    vc = dict(VISION_CONFIG)
    if family == "vit":
        model = ViTForImageClassification(ViTConfig(**vc, num_labels=3))
    elif family == "clip":
        model = CLIPForImageClassification(CLIPConfig(vision_config=vc, num_labels=3))
    elif family == "siglip":
        model = SiglipForImageClassification(SiglipConfig(vision_config=vc, num_labels=3))
    else:
        raise ValueError(f"unknown family {family!r}")
    return model.eval()


def make_pixel_values(batch: int = BATCH, seed: int = 1234) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, VISION_CONFIG["num_channels"], 16, 16, generator=generator)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family: str) -> torch.nn.Module:
    """One tiny model per family (parametrized over vit / clip / siglip); ``family`` names it."""
    return build_tiny(family)


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    return build_tiny("vit")


@pytest.fixture
def pixel_values() -> torch.Tensor:
    """A fixed batch of 3 random 16x16 RGB images."""
    return make_pixel_values()


@pytest.fixture(scope="session")
def saved_tiny_vit(tmp_path_factory) -> str:
    """Path of a ``save_pretrained`` directory holding the tiny ViT (the same weights as ``tiny_vit``)."""
    path = tmp_path_factory.mktemp("tiny_vit")
    build_tiny("vit").save_pretrained(path)
    return str(path)
