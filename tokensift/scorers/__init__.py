"""Token methods, one folder each (config dataclass + module + registration)."""

from tokensift.scorers import (  # noqa: F401  (register)
    atp,
    cacovid,
    cls_attention,
    d2pruner,
    dart,
    das,
    divprune,
    dynamic_llava,
    dynamicvit,
    dyvte,
    fastv,
    flowcut,
    holitom,
    ia_red2,
    ktv,
    l2norm,
    pyramiddrop,
    question_selector,
    random,
    stts,
    tome,
    vflowopt,
    visionzip,
)
from tokensift.scorers.base import KeepDecision, MethodConfig, TokenMethod
from tokensift.scorers.registry import build_method, get_method_class, methods, register

__all__ = ["KeepDecision", "MethodConfig", "TokenMethod", "build_method", "get_method_class", "methods", "register"]
