"""Every training-free method x every backbone family, table-driven: exactness, budgets, removal, errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES, NUM_PATCHES, NUM_PREFIX, build_tiny, make_pixel_values

import tokensift as ts
from tokensift.backbones import adapt

# training-free methods that run on a vision tower (the multimodal-LLM ones are tested in test_mllm.py)
TRAINING_FREE = sorted(
    name for name, info in ts.methods().items() if info["kind"] == "training-free" and "vit.<i>" in info["sites"]
)
# methods whose selection for a sample does not depend on the rest of the batch
BATCH_INDEPENDENT = [name for name in TRAINING_FREE if name != "random"]
SITE = "vit.1"


def test_registry_lists_the_expected_methods():
    methods = ts.methods()
    assert {"l2norm", "random", "cls_attention", "tome", "divprune"} <= set(TRAINING_FREE)
    assert methods["dynamicvit"]["kind"] == "learned"
    assert methods["ia_red2"]["kind"] == "learned" and methods["ia_red2"]["sites"] == ["vit.<i>"]
    for info in methods.values():
        assert info["kind"] in ("learned", "training-free")
        assert info["description"]


def _logits(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


def _hook_count(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules()
    )


def _attn_implementations(model) -> tuple:
    adapter = adapt(model)
    return model.config._attn_implementation, adapter.config._attn_implementation


def _assert_pristine(model, pixel_values, reference, hooks_before, attn_before):
    assert _hook_count(model) == hooks_before
    for layer in adapt(model).layers:
        assert not layer._forward_hooks and not layer._forward_pre_hooks
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not any(hasattr(m, "tokensift_call") for m in model.modules())
    assert _attn_implementations(model) == attn_before
    assert torch.equal(_logits(model, pixel_values), reference)


@pytest.mark.parametrize("method", TRAINING_FREE)
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_ratio_one_is_exact(family, method):
    model, x = build_tiny(family), make_pixel_values()
    reference = _logits(model, x)
    with ts.apply(model, method, keep_ratio=1.0, sites=[SITE]) as handle:
        assert torch.equal(_logits(model, x), reference)
        assert handle.last_records == []  # nothing to prune: the site does not even run
        assert handle.kept_orig_index is None


@pytest.mark.parametrize("method", TRAINING_FREE)
@pytest.mark.parametrize("family", FAMILIES)
def test_prunes_to_budget_and_removes_cleanly(family, method):
    model, x = build_tiny(family), make_pixel_values()
    reference = _logits(model, x)
    hooks_before, attn_before = _hook_count(model), _attn_implementations(model)
    num_prefix = NUM_PREFIX[family]
    keep = math.ceil(0.25 * NUM_PATCHES)

    handle = ts.apply(model, method, keep_ratio=0.25, sites=[SITE])
    assert _attn_implementations(model)[1].startswith("tokensift+")
    assert handle.site_counts() == {SITE: keep}
    pruned = _logits(model, x)
    assert pruned.shape == reference.shape
    assert torch.isfinite(pruned).all()
    assert not torch.allclose(pruned, reference, atol=1e-4)

    (record,) = handle.last_records
    assert record.site == SITE and record.policy is None
    assert record.target == pytest.approx(keep / NUM_PATCHES)
    kept = record.kept_orig_index
    assert kept.shape == (x.shape[0], keep + num_prefix)
    assert torch.equal(handle.kept_orig_index, kept)
    assert record.hidden.shape == (x.shape[0], keep + num_prefix, 32)
    assert torch.equal(record.keep_fraction, torch.full((x.shape[0],), keep / NUM_PATCHES))
    assert (kept[:, 1:] > kept[:, :-1]).all(), "kept tokens must stay in ascending original order"
    assert int(kept.min()) >= 0 and int(kept.max()) < num_prefix + NUM_PATCHES
    if num_prefix:
        assert (kept[:, 0] == 0).all(), "[CLS] must always be kept"
        assert (kept[:, 1:] >= num_prefix).all()

    # a second forward replaces (not appends to) the records
    _logits(model, x)
    assert len(handle.last_records) == 1

    handle.remove()
    _assert_pristine(model, x, reference, hooks_before, attn_before)


@pytest.mark.parametrize("method", TRAINING_FREE)
def test_context_manager_restores(method):
    model, x = build_tiny("vit"), make_pixel_values()
    reference = _logits(model, x)
    hooks_before, attn_before = _hook_count(model), _attn_implementations(model)
    with ts.apply(model, method, keep_ratio=0.5, sites=[SITE]):
        assert not torch.equal(_logits(model, x), reference)
    _assert_pristine(model, x, reference, hooks_before, attn_before)


@pytest.mark.parametrize("method", BATCH_INDEPENDENT)
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_matches_single_samples(family, method):
    model, x = build_tiny(family), make_pixel_values()
    with ts.apply(model, method, keep_ratio=0.25, sites=[SITE]) as handle:
        batched = _logits(model, x)
        batched_kept = handle.kept_orig_index.clone()
        for i in range(x.shape[0]):
            single = _logits(model, x[i : i + 1])
            torch.testing.assert_close(single, batched[i : i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(handle.kept_orig_index[0], batched_kept[i])


def test_random_is_reproducible_per_seed():
    model, x = build_tiny("vit"), make_pixel_values()
    kept = {}
    for seed in (0, 1):
        with ts.apply(model, "random", keep_ratio=0.25, sites=[SITE], seed=seed) as handle:
            _logits(model, x)
            first = handle.kept_orig_index.clone()
            _logits(model, x)  # the next rows (arrival order) are other samples: another draw
            assert not torch.equal(handle.kept_orig_index, first)
            handle.set_samples(torch.arange(x.shape[0]))  # the same samples again: the same draw
            _logits(model, x)
            assert torch.equal(handle.kept_orig_index, first), "a seeded random baseline must repeat"
            kept[seed] = first
        with ts.apply(model, "random", keep_ratio=0.25, sites=[SITE], seed=seed) as handle:
            _logits(model, x)
            assert torch.equal(handle.kept_orig_index, first), "a fresh handle with the same seed repeats"
    assert not torch.equal(kept[0], kept[1])


@pytest.mark.parametrize("method", TRAINING_FREE)
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_count(family, method):
    model, x = build_tiny(family), make_pixel_values()
    with ts.apply(model, method, keep_count=3, sites=[SITE]) as handle:
        out = _logits(model, x)
        assert torch.isfinite(out).all()
        assert handle.kept_orig_index.shape == (x.shape[0], 3 + NUM_PREFIX[family])
        assert torch.equal(handle.last_records[0].keep_fraction, torch.full((x.shape[0],), 3 / NUM_PATCHES))


@pytest.mark.parametrize("method", TRAINING_FREE)
@pytest.mark.parametrize("family", FAMILIES)
def test_per_site_mapping_over_two_sites(family, method):
    model, x = build_tiny(family), make_pixel_values()
    num_prefix = NUM_PREFIX[family]
    budget = {"vit.0": 0.5, "vit.2": 0.25}
    with ts.apply(model, method, keep_ratio=budget, sites=["vit.2", "vit.0"]) as handle:
        assert handle.sites == ["vit.0", "vit.2"]  # put in depth order
        assert handle.site_counts() == {"vit.0": 8, "vit.2": 4}
        out = _logits(model, x)
        assert torch.isfinite(out).all()
        first, second = handle.last_records
        assert (first.site, second.site) == ("vit.0", "vit.2")
        assert first.kept_orig_index.shape == (x.shape[0], 8 + num_prefix)
        assert second.kept_orig_index.shape == (x.shape[0], 4 + num_prefix)
        assert torch.allclose(first.keep_fraction, torch.tensor(0.5))
        assert torch.allclose(second.keep_fraction, torch.tensor(0.25))
        for b in range(x.shape[0]):
            # a token that survives (or anchors a merge at) the second site survived the first
            assert set(second.kept_orig_index[b].tolist()) <= set(first.kept_orig_index[b].tolist())
            assert (second.kept_orig_index[b].diff() > 0).all()


def test_geometric_schedule_over_two_sites():
    model, x = build_tiny("vit"), make_pixel_values()
    with ts.apply(model, "l2norm", keep_ratio=0.25, sites=["vit.0", "vit.2"]) as handle:
        # site 1 of 2 keeps 0.25 ** (1/2) = 0.5, the last site the full ratio
        assert handle.site_counts() == {"vit.0": 8, "vit.2": 4}
        _logits(model, x)
        assert [r.kept_orig_index.shape[1] for r in handle.last_records] == [9, 5]


def test_tome_merges_conserve_size():
    model, x = build_tiny("vit"), make_pixel_values()
    captured = {}

    def spy(method_reduce):
        def wrapped(state, num_keep):
            out = method_reduce(state, num_keep)
            captured["size"] = out.size[out.keep].view(state.hidden.shape[0], -1)  # the kept tokens' sizes
            return out

        return wrapped

    with ts.apply(model, "tome", keep_ratio=0.25, sites=[SITE]) as handle:
        handle.method.reduce = spy(handle.method.reduce)
        _logits(model, x)
    size = captured["size"]
    assert size.shape == (x.shape[0], 5)
    torch.testing.assert_close(size.sum(1), torch.full((x.shape[0],), 17.0))
    assert (size[:, 0] == 1).all(), "[CLS] is never merged"


# -- bad inputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(method="l2norm", keep_ratio=0), "keep_ratio"),
        (dict(method="l2norm", keep_ratio=1.5), "keep_ratio"),
        (dict(method="l2norm", keep_ratio=-1), "keep_ratio"),
        (dict(method="l2norm", keep_ratio={"vit.1": 0.0}), "keep_ratio"),
        (dict(method="l2norm", keep_count=0), "keep_count"),
        (dict(method="l2norm", keep_count=2.5), "keep_count"),
        (dict(method="l2norm", keep_ratio=0.5, keep_count=3), "keep_ratio keep_count"),
        (dict(method="l2norm"), "keep_ratio keep_count"),
        (dict(method="l2norm", keep_ratio=0.5, sites=["vit.99"]), "vit.99"),
        (dict(method="l2norm", keep_ratio=0.5, sites=["vit.3"]), "vit.3"),  # no block left after it
        (dict(method="l2norm", keep_ratio=0.5, sites=["block1"]), "block1"),
        (dict(method="l2norm", keep_ratio=0.5, sites=["vit.1", "vit.1"]), "sites"),
        (dict(method="l2norm", keep_ratio={"vit.2": 0.5}, sites=["vit.1"]), "keep_ratio"),
        (dict(method="l2norm", keep_ratio={"vit.0": 0.5}, sites=["vit.0", "vit.1"]), "keep_ratio"),
        (dict(method="tome", keep_ratio=0.5, mode="mask"), "tome"),
        (dict(method="l2norm", keep_ratio=0.5, mode="train"), "mode"),
        (dict(method="random", keep_ratio=0.5, bogus=1), "bogus"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_field(kwargs, needle):
    model, x = build_tiny("vit"), make_pixel_values()
    reference = _logits(model, x)
    hooks_before, attn_before = _hook_count(model), _attn_implementations(model)
    with pytest.raises(ValueError) as info:
        ts.apply(model, **kwargs)
    for word in needle.split():
        assert word in str(info.value)
    # a refused apply leaves the model untouched
    _assert_pristine(model, x, reference, hooks_before, attn_before)


def test_unknown_method_lists_known_ones():
    model = build_tiny("vit")
    with pytest.raises(ValueError, match="no_such_method") as info:
        ts.apply(model, "no_such_method", keep_ratio=0.5)
    for name in ts.methods():
        assert name in str(info.value)


def test_method_object_of_wrong_type_is_a_type_error():
    with pytest.raises(TypeError):
        ts.apply(build_tiny("vit"), 42, keep_ratio=0.5)


def test_second_apply_is_refused_until_the_first_is_removed(tiny_vit, pixel_values):
    handle = ts.apply(tiny_vit, "l2norm", keep_ratio=0.5)
    with pytest.raises(ValueError, match="already has a tokensift method"):
        ts.apply(tiny_vit, "tome", keep_ratio=0.5)
    handle.remove()
    ts.apply(tiny_vit, "tome", keep_ratio=0.5).remove()
