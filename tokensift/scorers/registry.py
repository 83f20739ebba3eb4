"""Name -> method class. Each method folder registers itself on import (peft's layout)."""

from __future__ import annotations

from tokensift.scorers.base import Method

_METHODS: dict[str, type[Method]] = {}
# "layers": a layer-skip method (das) replaces whole blocks, layer.<i>, rather than reducing tokens at a site
_SITE_PATTERNS = {"vit": "vit.<i>", "pre_llm": "pre_llm", "llm": "llm.<k>", "layers": "layer.<i>"}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_METHODS[cls.name].__name__})")
    _METHODS[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ValueError(
            f"unknown method {name!r}; known methods: {sorted(_METHODS)} "
            "(or give the path of an exported artifact directory)."
        )
    return _METHODS[name]


def build_method(name: str, options: dict | None = None) -> Method:
    cls = get_method_class(name)
    return cls(cls.config_class.from_dict(options))


def methods() -> dict[str, dict]:
    """Every registered method: its kind, the sites it supports and a one-line description."""
    return {
        name: {
            "kind": cls.kind,
            "sites": [_SITE_PATTERNS[kind] for kind in cls.site_kinds],
            "needs_attention": getattr(cls, "needs_attention", False),
            "description": cls.description,
        }
        for name, cls in sorted(_METHODS.items())
    }
