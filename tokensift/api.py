"""The public inference entry points: ``methods``, ``load`` and ``apply``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from tokensift.backbones import MLLMAdapter, adapt
from tokensift.budget import Budget
from tokensift.export.artifact import Artifact, check_fingerprint, load_artifact
from tokensift.reduce import Mode, PruningHandle
from tokensift.reduce_mllm import MLLMPruningHandle
from tokensift.scorers import TokenMethod, build_method
from tokensift.scorers import methods as _methods


def methods() -> dict[str, dict]:
    """Every registered method: ``name -> {"kind": "learned" | "training-free", "sites": [...], ...}``."""
    return _methods()


def load(path: str | os.PathLike) -> Artifact:
    """Read an exported artifact (JSON + safetensors, never pickle)."""
    return load_artifact(path)


def apply(
    model: nn.Module,
    method: str | os.PathLike | TokenMethod | Artifact,
    keep_ratio: float | Mapping[str, float] | None = None,
    keep_count: int | Mapping[str, int] | None = None,
    sites: list[str] | None = None,
    mode: Mode = "gather",
    strict: bool = True,
    **options,
) -> PruningHandle | MLLMPruningHandle:
    """Prune ``model``'s tokens with ``method`` at a budget chosen now.

    ``model`` is a vision transformer (sites ``vit.<i>``) or a multimodal LLM, LLaVA or Qwen2-VL (sites
    ``vit.<i>``, ``pre_llm``, ``llm.<k>``; the budget counts each sample's visual tokens).

    ``method`` is a registered name (``ts.methods()``), an artifact directory or ``Artifact``, or a
    ``TokenMethod``. ``keep_ratio`` / ``keep_count`` apply to the last site (earlier sites follow a
    geometric schedule) or per site as a mapping; an artifact falls back to its default budget.
    ``options`` configure a registered method (e.g. ``seed`` for ``random``). Returns a handle whose
    ``remove()`` restores the model exactly; it also works as a context manager.
    """
    adapter = adapt(model)
    default_budget: dict = {}
    if isinstance(method, (str, os.PathLike)) and _looks_like_path(method):
        method = load_artifact(method)
    if isinstance(method, Artifact):
        if options:
            raise ValueError(f"options {sorted(options)} do not apply to an exported artifact; retrain instead.")
        check_fingerprint(method.manifest, adapter.fingerprint(), strict=strict)
        default_budget = method.default_budget
        method = method.method
    elif isinstance(method, str):
        method = build_method(method, options)
    elif not isinstance(method, TokenMethod):
        raise TypeError(f"method must be a name, an artifact path or a TokenMethod, got {type(method).__name__}")
    if keep_ratio is None and keep_count is None:
        if not default_budget:
            raise ValueError(f"{method.name} needs a budget: pass keep_ratio (0, 1] or keep_count.")
        budget = Budget(**default_budget)
    else:
        budget = Budget(keep_ratio=keep_ratio, keep_count=keep_count)
    if method.kind == "learned" and sites is not None and list(sites) != list(method.config.sites):
        raise ValueError(f"a learned {method.name} scorer runs at the sites it was trained for: {method.config.sites}")
    method.to(next(model.parameters()).device)
    if mode == "gather":
        method.eval()  # mask mode keeps the caller's choice: a learned method in train() samples its policy
    if not isinstance(adapter, MLLMAdapter) and "vit" not in method.site_kinds:
        raise ValueError(
            f"{method.name} runs inside a multimodal LLM (sites {list(method.site_kinds)}); "
            f"{type(model).__name__} is a vision model. Methods for it: vit sites in ts.methods()."
        )
    if isinstance(adapter, MLLMAdapter):
        return MLLMPruningHandle(adapter, method, budget, sites=sites, mode=mode)
    return PruningHandle(adapter, method, budget, sites=sites, mode=mode)


def _looks_like_path(value: str | os.PathLike) -> bool:
    text = os.fspath(value)
    return isinstance(value, os.PathLike) or os.sep in text or Path(text).exists()
