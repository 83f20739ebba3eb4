"""Token methods, one folder each (config dataclass + module + registration)."""

from tokensift.scorers import (  # noqa: F401  (register)
    cls_attention,
    d2pruner,
    dart,
    divprune,
    dynamicvit,
    dyvte,
    fastv,
    l2norm,
    pyramiddrop,
    random,
    tome,
    visionzip,
)
from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.registry import build_method, get_method_class, methods, register

__all__ = ["MethodConfig", "TokenMethod", "build_method", "get_method_class", "methods", "register"]
