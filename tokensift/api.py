"""The public inference entry points: ``methods``, ``load`` and ``apply``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

from torch import nn

from tokensift import attention as attn
from tokensift.backbones import MLLMAdapter, adapt
from tokensift.backbones.lora import load_adapter
from tokensift.budget import Budget
from tokensift.export.artifact import Artifact, FingerprintMismatch, check_fingerprint, from_pretrained
from tokensift.export.hub import looks_like_hub_id
from tokensift.reduce import Mode, PruningHandle
from tokensift.reduce_mllm import HANDLE_ATTRIBUTE, MLLMPruningHandle
from tokensift.scorers import build_method, get_method_class
from tokensift.scorers import methods as _methods
from tokensift.scorers.base import Method, is_skip_method
from tokensift.skip import LayerSkipHandle


def methods() -> dict[str, dict]:
    """Every registered method: ``name -> {"kind": "learned" | "training-free", "sites": [...], ...}``."""
    return _methods()


def load(
    path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Artifact:
    """Read an exported artifact (JSON + safetensors, never pickle): a local folder, else a hub id ``org/name``
    resolved through huggingface_hub's cache (``revision``, ``cache_dir``, ``local_files_only``; offline under
    ``HF_HUB_OFFLINE=1``). An existing folder wins over a hub id of the same spelling."""
    return from_pretrained(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)


def apply(
    model: nn.Module,
    method: str | os.PathLike | Method | Artifact,
    keep_ratio: float | Mapping[str, float] | None = None,
    keep_count: int | Mapping[str, int] | None = None,
    sites: list[str] | None = None,
    mode: Mode = "gather",
    strict: bool | None = None,
    threshold: float | None = None,
    skip_layers: int | None = None,
    **options,
) -> PruningHandle | MLLMPruningHandle | LayerSkipHandle:
    """Prune ``model``'s tokens with ``method`` at a budget chosen now.

    ``model`` is a vision transformer (sites ``vit.<i>``) or a multimodal LLM, LLaVA, Qwen2-VL or Molmo2 (sites
    ``vit.<i>``, ``pre_llm``, ``llm.<k>``; the budget counts each sample's visual tokens).

    ``method`` is a registered name (``ts.methods()``), an artifact directory, a hub id ``org/name`` of one in
    huggingface_hub's cache (see :func:`load`), an ``Artifact``, or a
    ``TokenMethod``. ``keep_ratio`` / ``keep_count`` apply to the last site (earlier sites follow a
    geometric schedule) or per site as a mapping; an artifact falls back to its default budget.
    ``options`` configure a method given by name (e.g. ``seed`` for ``random``); a ``TokenMethod`` carries its
    own config and an artifact its trained one, so options there are refused, as are ``layer`` /
    ``num_stages`` next to ``sites=`` (they only pick the default sites). ``strict`` (default True) applies to
    artifacts: False applies one to a backbone whose fingerprint differs. Returns a handle whose
    ``remove()`` restores the model exactly; it also works as a context manager.

    Exit methods (``dyvte``) decide per sample when all its visual tokens leave; their budget is
    ``threshold``, the exit probability at which a sample exits (0: at the first router layer, 1: never),
    not ``keep_ratio`` / ``keep_count``. ``"dyvte:PATH"`` names an artifact and checks it holds that method.

    Layer-skip methods (``das``) remove whole blocks rather than tokens: their budget is ``skip_layers``, how many
    blocks run the method's adapters instead (an artifact's default: the count it was trained for), and the handle
    is a :class:`tokensift.skip.LayerSkipHandle` (``set_skip(n)``); ``keep_ratio`` / ``keep_count`` / ``sites`` do not
    apply to them, nor ``skip_layers`` to a token method. While blocks are skipped, ``output_hidden_states`` holds
    one entry fewer per skipped block (the indices after it shift): read per-layer states with the handle's
    ``enabled = False``.

    An artifact trained with LoRA carries a peft adapter folder: it is applied to ``model`` first (in
    place, removed again by ``remove()``), then the scorer.
    """
    if isinstance(getattr(model, HANDLE_ATTRIBUTE, None), LayerSkipHandle):  # its blocks are swapped out
        raise ValueError("this model already has a tokensift method applied; remove() its handle first.")
    adapter = adapt(model)
    sites = _checked_sites(sites)
    default_budget: dict = {}
    lora_path = None
    expected_name = None
    if isinstance(method, str) and _method_prefix(method) is not None:
        expected_name, method = _method_prefix(method)
    if isinstance(method, (str, os.PathLike)) and (_looks_like_path(method) or looks_like_hub_id(method)):
        method = from_pretrained(method)  # a local folder first, then a hub id from huggingface_hub's cache
        if expected_name is not None and method.method.name != expected_name:
            held = method.method.name
            raise ValueError(
                f"{method.path} holds a {held} artifact (the 'method' field of its tokensift.json), not "
                f"{expected_name}; write {held}:{method.path}."
            )
    from_artifact = isinstance(method, Artifact)
    if isinstance(method, Artifact):
        if options:
            raise ValueError(f"options {sorted(options)} do not apply to an exported artifact; retrain instead.")
        _check_artifact_backbone(method, adapter.fingerprint(), strict is not False)
        default_budget = method.default_budget
        if method.manifest.get("adapter"):
            if method.path is None:
                raise ValueError("this artifact carries a LoRA adapter: load it with ts.load(path) to apply both.")
            lora_path = method.path / method.manifest["adapter"]
        method = method.method
    elif isinstance(method, str):
        _check_site_options(method, options, sites)
        _refuse_untrained(method)
        method = build_method(method, options)
    elif not isinstance(method, Method):
        raise TypeError(
            f"method must be a name, an artifact path or a Method (TokenMethod, LayerSkipMethod), got "
            f"{type(method).__name__}"
        )
    elif options:
        raise TypeError(
            f"options {sorted(options)} configure a method given by name; {type(method).__name__} is already built "
            f"and would ignore them: set them on its config ({type(method.config).__name__}(...)) or pass "
            f"{method.name!r} with the options."
        )
    if strict is not None and not from_artifact:
        raise ValueError(
            f"strict={strict!r} checks an exported artifact's backbone fingerprint; {method.name} is not an artifact "
            "(a method name or TokenMethod), so leave strict unset."
        )
    if is_skip_method(method):
        return _apply_skip(adapter, method, default_budget, skip_layers, keep_ratio, keep_count, threshold, sites)
    if skip_layers is not None:
        raise ValueError(
            f"skip_layers= is the budget of layer-skip methods (das); {method.name} prunes tokens: give keep_ratio "
            "(0, 1] or keep_count."
        )
    if method.decides_exits:
        if keep_ratio is not None or keep_count is not None:
            raise ValueError(
                f"{method.name} decides per sample when its visual tokens exit: its budget is threshold= (an exit "
                "probability in [0, 1]), not keep_ratio / keep_count."
            )
        if threshold is None:  # the artifact's default, else what the method object already carries
            threshold = default_budget.get("threshold", getattr(method, "threshold", None))
        if threshold is None:
            raise ValueError(f"{method.name} needs threshold= (an exit probability in [0, 1]; 1 never exits).")
        method.threshold = threshold
        budget = Budget(keep_ratio=1.0)  # a ceiling only: the method sets each sample's count at each site
    elif threshold is not None:
        raise ValueError(
            f"threshold= is the budget of exit methods (dyvte); {method.name} takes keep_ratio / keep_count."
        )
    elif keep_ratio is None and keep_count is None:
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
    handle_class = MLLMPruningHandle if isinstance(adapter, MLLMAdapter) else PruningHandle
    if lora_path is None:
        return handle_class(adapter, method, budget, sites=sites, mode=mode)
    applied = (
        getattr(model, HANDLE_ATTRIBUTE, None) is not None
        if isinstance(adapter, MLLMAdapter)
        else attn.base_name(adapter.config._attn_implementation) != adapter.config._attn_implementation
    )
    if applied:
        raise ValueError("this model already has a tokensift method applied; remove() its handle first.")
    lora_model = load_adapter(model, lora_path)
    try:
        handle = handle_class(adapter, method, budget, sites=sites, mode=mode)
    except BaseException:
        lora_model.unload()
        raise
    handle.on_remove(lora_model.unload)
    return handle


def _apply_skip(adapter, method, default_budget: dict, skip_layers, keep_ratio, keep_count, threshold, sites):
    """``ts.apply`` for a layer-skip method: its budget is ``skip_layers`` (default: the artifact's)."""
    given = {"keep_ratio": keep_ratio, "keep_count": keep_count, "threshold": threshold, "sites": sites}
    wrong = [name for name, value in given.items() if value is not None]
    if wrong:
        raise ValueError(
            f"{wrong[0]}= does not apply to {method.name}, which skips whole layers rather than tokens: give "
            f"skip_layers= (how many layers run its adapters instead, 0 .. {len(method.candidate_layers)})."
        )
    if skip_layers is None:
        skip_layers = default_budget.get("skip_layers")
    if skip_layers is None:
        raise ValueError(f"{method.name} needs a budget: pass skip_layers (how many layers to skip).")
    method.check_skip_count(skip_layers)
    method.to(next(adapter.model.parameters()).device)
    method.eval()
    return LayerSkipHandle(adapter, method, skip_layers)


# options that only choose a method's default sites: ``sites=`` replaces those, so both together is a mistake
_SITE_PICKING_OPTIONS = ("layer", "num_stages")


def _check_site_options(name: str, options: dict, sites: list[str] | None) -> None:
    if sites is None or not options:
        return
    known = {f.name for f in fields(get_method_class(name).config_class)}  # unknown ones: build_method names them
    picked = [key for key in _SITE_PICKING_OPTIONS if key in options and key in known]
    if picked:
        key = picked[0]
        raise ValueError(
            f"{key}={options[key]!r} only picks {name}'s default sites and sites={list(sites)} replaces them, so "
            f"{key} would be ignored: give sites= or {key}=, not both."
        )


def _checked_sites(sites) -> list[str] | None:
    """``sites`` as a list of names, or a TypeError / ValueError naming the field (``None``: the default)."""
    if sites is None:
        return None
    if isinstance(sites, str) or not isinstance(sites, (list, tuple)):
        raise TypeError(f"sites must be a list of site names such as ['vit.1'] (or None), got {sites!r}.")
    if not sites:
        raise ValueError("sites=[] names no site; give at least one (e.g. ['vit.1']) or None for the default.")
    wrong = [site for site in sites if not isinstance(site, str)]
    if wrong:
        raise TypeError(f"sites must be site names (str) such as 'vit.1' or 'llm.2', got {wrong!r} in {sites!r}.")
    return list(sites)


def _refuse_untrained(name: str) -> None:
    """A learned method given by name has no trained weights: say how to get an artifact."""
    if name in _methods() and get_method_class(name).kind == "learned":
        raise ValueError(
            f"{name} is a learned method: apply an exported artifact (ts.apply(model, 'path/to/artifact') or "
            f"ts.load(path)), trained with `tokensift fit` and written by `tokensift export`, not the bare name."
        )


def _check_artifact_backbone(artifact: Artifact, fingerprint: dict, strict: bool) -> None:
    try:
        check_fingerprint(artifact.manifest, fingerprint, strict=strict)
    except FingerprintMismatch as error:
        finetuned = artifact.manifest.get("backbone_weights")
        if finetuned and artifact.path is not None:
            raise FingerprintMismatch(
                f"{error} This scorer was trained with its backbone: load the model from "
                f"{artifact.path / finetuned} and apply the artifact to that."
            ) from error
        raise


def _method_prefix(value: str) -> tuple[str, str] | None:
    """``"dyvte:runs/artifact"`` -> ``("dyvte", "runs/artifact")`` when the prefix is a registered method."""
    name, sep, path = value.partition(":")
    if not sep or not path or name not in _methods():
        return None
    return name, path


def _looks_like_path(value: str | os.PathLike) -> bool:
    text = os.fspath(value)
    return isinstance(value, os.PathLike) or os.sep in text or Path(text).exists()
