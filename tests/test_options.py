"""``ts.apply`` refuses options it would otherwise ignore, naming the option and the fix.

- ``**options`` next to a ``TokenMethod`` instance (it carries its own config);
- ``strict`` for a method that is not an artifact (it only checks an artifact's backbone fingerprint);
- ``layer`` / ``num_stages`` together with ``sites=`` (they only pick the default sites, which ``sites`` replaces).

A refused call leaves the model untouched; the same options where they do apply still work.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, make_pixel_values
from tiny_mllm import build_tiny_mllm

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.export import FingerprintMismatch, save_artifact
from tokensift.scorers.dynamicvit import DynamicViTMethod
from tokensift.scorers.random import RandomConfig, RandomMethod


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def refused(model: torch.nn.Module, error: type[Exception], *args, **kwargs) -> str:
    """The message of ``ts.apply(model, *args, **kwargs)``'s ``error``, after checking the model is untouched."""
    hooks = hook_count(model)
    with pytest.raises(error) as info:
        ts.apply(model, *args, **kwargs)
    assert hook_count(model) == hooks, "a refused apply leaves no hook behind"
    assert getattr(model, "_tokensift_handle", None) is None
    return str(info.value)


@pytest.fixture(scope="module")
def llava() -> torch.nn.Module:
    return build_tiny_mllm("llava")


@pytest.fixture
def artifact(tmp_path):
    vit = build_tiny("vit")
    method = DynamicViTMethod.for_backbone(adapt(vit))
    return save_artifact(method, adapt(vit).fingerprint(), tmp_path / "artifact")


# -- options next to a TokenMethod instance --------------------------------------------------------------------
def test_options_next_to_a_method_instance_are_refused():
    model = build_tiny("vit")
    method = RandomMethod(RandomConfig(seed=0))
    message = refused(model, TypeError, method, keep_ratio=0.5, seed=3)
    assert "options ['seed']" in message
    assert "RandomConfig(...)" in message and "'random'" in message  # the two ways to pass it
    # as the message says: on the config, or by name
    x = make_pixel_values()
    kept = []
    for how in (RandomMethod(RandomConfig(seed=3)), "random"):
        options = {"seed": 3} if how == "random" else {}
        with torch.no_grad(), ts.apply(model, how, keep_ratio=0.5, **options) as handle:
            model(pixel_values=x)
            kept.append(handle.kept_orig_index)
    assert torch.equal(*kept)


def test_options_on_an_artifact_are_still_refused(artifact):
    message = refused(build_tiny("vit"), ValueError, artifact, keep_ratio=0.5, hidden_ratio=0.25)
    assert "['hidden_ratio']" in message and "artifact" in message


# -- strict ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strict", [True, False])
def test_strict_for_a_method_that_is_not_an_artifact_is_refused(strict):
    model = build_tiny("vit")
    for method in ("random", RandomMethod()):
        message = refused(model, ValueError, method, keep_ratio=0.5, strict=strict)
        assert f"strict={strict}" in message and "artifact" in message and "leave strict unset" in message


def test_strict_still_checks_an_artifacts_backbone(artifact):
    other = build_tiny("vit", seed=1)  # same structure, other weights
    assert "strict=False" in refused(other, FingerprintMismatch, artifact, keep_ratio=0.5)  # default: strict
    refused(other, FingerprintMismatch, artifact, keep_ratio=0.5, strict=True)
    with ts.apply(other, artifact, keep_ratio=0.5, strict=False) as handle:
        assert handle.sites == ["vit.0", "vit.1", "vit.2"]
    ts.apply(build_tiny("vit"), artifact, keep_ratio=0.5, strict=True).remove()  # the matching backbone


# -- layer / num_stages next to sites= ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "option", "sites"),
    [
        ("fastv", {"layer": 3}, ["llm.2"]),
        ("dart", {"layer": 1}, ["llm.1"]),  # even when they agree: one of the two is redundant
        ("d2pruner", {"layer": 3}, ["llm.2"]),
        ("pyramiddrop", {"num_stages": 2}, ["llm.1", "llm.3"]),
    ],
)
def test_site_picking_options_next_to_sites_are_refused(llava, method, option, sites):
    ((key, value),) = option.items()
    message = refused(llava, ValueError, method, keep_ratio=0.5, sites=sites, **option)
    assert f"{key}={value}" in message and f"sites={sites}" in message
    assert f"give sites= or {key}=, not both" in message


def test_dynamicvit_num_stages_next_to_sites_is_refused():
    message = refused(build_tiny("vit"), ValueError, "dynamicvit", keep_ratio=0.5, sites=["vit.1"], num_stages=2)
    assert "num_stages=2" in message and "not both" in message


def test_site_picking_options_alone_still_choose_the_sites(llava):
    with ts.apply(llava, "fastv", keep_ratio=0.5, layer=3) as handle:
        assert handle.sites == ["llm.3"]
    with ts.apply(llava, "pyramiddrop", keep_ratio=0.5, num_stages=1) as handle:
        assert len(handle.sites) == 1
    with ts.apply(llava, "fastv", keep_ratio=0.5, sites=["llm.1"]) as handle:
        assert handle.sites == ["llm.1"]


def test_other_options_next_to_sites_are_fine_and_unknown_ones_named(llava):
    with ts.apply(llava, "dart", keep_ratio=0.5, sites=["llm.2"], image_pivots=2) as handle:
        assert handle.sites == ["llm.2"] and handle.method.config.image_pivots == 2
    # a method without a `layer` field: the unknown option is named, not blamed on sites=
    message = refused(build_tiny("vit"), ValueError, "random", keep_ratio=0.5, sites=["vit.1"], layer=2)
    assert "RandomConfig has no option ['layer']" in message
