"""Token methods, one folder each (config dataclass + module + registration)."""

from tokensift.scorers import cls_attention, divprune, dynamicvit, l2norm, random, tome  # noqa: F401  (register)
from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.registry import build_method, get_method_class, methods, register

__all__ = ["MethodConfig", "TokenMethod", "build_method", "get_method_class", "methods", "register"]
