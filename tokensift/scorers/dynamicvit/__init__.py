from tokensift.scorers.dynamicvit.model import DynamicViTConfig, DynamicViTMethod

__all__ = ["DynamicViTConfig", "DynamicViTMethod"]
