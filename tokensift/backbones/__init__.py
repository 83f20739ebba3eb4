"""Backbone adapters: name the sites of an unmodified transformers model."""

from tokensift.backbones.loading import load_backbone
from tokensift.backbones.vision import VisionAdapter, adapt

__all__ = ["VisionAdapter", "adapt", "load_backbone"]
