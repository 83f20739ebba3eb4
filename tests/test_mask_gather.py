"""Mask mode (training) must compute what gather mode (inference) computes on the kept tokens.

Gather mode shrinks the sequence after a site; mask mode keeps its length and hides dropped tokens from
every later attention (and from the head's mean pooling). With a hard 0/1 policy the two must agree on
every kept token's final state and on the logits. Mask mode must also let gradients reach a learned scorer.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import FAMILIES, NUM_PATCHES, NUM_PREFIX, build_tiny, make_pixel_values

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.scorers.dynamicvit import DynamicViTMethod

BUDGETS = {
    "one_site": (["vit.1"], 0.5),
    "two_sites": (["vit.0", "vit.2"], {"vit.0": 0.5, "vit.2": 0.25}),
}


def _run(model, pixel_values, method, sites, keep_ratio, mode):
    """Logits, final per-token states (as the head reads them, before its pooling) and the handle's records."""
    captured = {}

    def capture(module, args, output):
        captured["hidden"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    hook = adapt(model).final_token_module.register_forward_hook(capture)
    try:
        with ts.apply(model, method, keep_ratio=keep_ratio, sites=sites, mode=mode) as handle, torch.no_grad():
            logits = model(pixel_values=pixel_values).logits
            records = list(handle.last_records)
    finally:
        hook.remove()
    return logits, captured["hidden"], records


@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("method", ["l2norm", "cls_attention", "divprune"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mask_mode_matches_gather_mode(family, method, budget):
    model, x = build_tiny(family), make_pixel_values()
    sites, keep_ratio = BUDGETS[budget]
    g_logits, g_hidden, g_records = _run(model, x, method, sites, keep_ratio, "gather")
    m_logits, m_hidden, m_records = _run(model, x, method, sites, keep_ratio, "mask")
    num_prefix = NUM_PREFIX[family]

    assert [r.site for r in g_records] == [r.site for r in m_records] == sites
    for g, m in zip(g_records, m_records, strict=True):
        assert m.kept_orig_index is None and g.policy is None
        assert m.policy.shape == (x.shape[0], num_prefix + NUM_PATCHES)
        assert set(m.policy.unique().tolist()) <= {0.0, 1.0}, "a training-free policy is hard 0/1"
        kept_by_policy = [row.nonzero().squeeze(-1) for row in m.policy]
        for b in range(x.shape[0]):
            assert torch.equal(kept_by_policy[b], g.kept_orig_index[b]), f"{g.site}: sample {b} kept other tokens"
        torch.testing.assert_close(m.keep_fraction, g.keep_fraction)

    kept = g_records[-1].kept_orig_index
    assert g_hidden.shape[1] == kept.shape[1] and m_hidden.shape[1] == num_prefix + NUM_PATCHES
    m_kept = m_hidden.gather(1, kept.unsqueeze(-1).expand(-1, -1, m_hidden.shape[-1]))
    torch.testing.assert_close(m_kept, g_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m_logits, g_logits, atol=1e-5, rtol=1e-5)
    # and the pruning did change something, so the agreement is not trivial
    with torch.no_grad():
        assert not torch.allclose(model(pixel_values=x).logits, g_logits, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_mode_matches_gather_mode_random(family):
    # a single site sees the full sequence in both modes, so the seeded draws coincide
    model, x = build_tiny(family), make_pixel_values()
    g_logits, _, g_records = _run(model, x, "random", ["vit.1"], 0.25, "gather")
    m_logits, _, m_records = _run(model, x, "random", ["vit.1"], 0.25, "mask")
    for b in range(x.shape[0]):
        assert torch.equal(m_records[0].policy[b].nonzero().squeeze(-1), g_records[0].kept_orig_index[b])
    torch.testing.assert_close(m_logits, g_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_mode_keep_ratio_one_is_exact(family):
    model, x = build_tiny(family), make_pixel_values()
    with torch.no_grad():
        reference = model(pixel_values=x).logits
    logits, _, records = _run(model, x, "l2norm", ["vit.1"], 1.0, "mask")
    assert records == []
    assert torch.equal(logits, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_mode_gradients_reach_the_learned_scorer_only(family):
    model, x = build_tiny(family), make_pixel_values()
    model.requires_grad_(False)
    adapter = adapt(model)
    method = DynamicViTMethod.for_backbone(adapter)
    assert method.config.sites == ["vit.0", "vit.1", "vit.2"]
    labels = torch.tensor([0, 1, 2])
    torch.manual_seed(0)  # the Gumbel noise
    with ts.apply(model, method, keep_ratio=0.5, mode="mask") as handle:
        method.train()  # apply() puts the method in eval; training samples hard decisions with noise
        logits = model(pixel_values=x).logits
        records = handle.last_records
        assert len(records) == 3
        for record in records:
            assert record.policy.requires_grad
            assert set(record.policy.detach().unique().tolist()) <= {0.0, 1.0}
            if NUM_PREFIX[family]:
                assert (record.policy[:, 0] == 1).all(), "[CLS] is never dropped"
        # a dropped token stays dropped: each stage's policy is within the previous one
        for earlier, later in itertools.pairwise(records):
            assert (later.policy <= earlier.policy).all()
        # a loss on the logits and on the budget, as a trainer would use
        keep = torch.stack([r.keep_fraction for r in records], dim=1)
        loss = torch.nn.functional.cross_entropy(logits, labels) + ((keep - 0.5) ** 2).mean()
        loss.backward()

    assert all(p.grad is None for p in model.parameters()), "the frozen backbone must get no gradient"
    for name, param in method.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    for stage, predictor in enumerate(method.predictors):
        total = sum(float(p.grad.abs().sum()) for p in predictor.parameters())
        assert total > 0, f"stage {stage} got no gradient"


def test_mask_mode_without_budget_loss_still_trains_every_stage():
    # the logits alone (no budget term) must reach every stage through the policy attention and pooling
    model, x = build_tiny("clip"), make_pixel_values()
    model.requires_grad_(False)
    method = DynamicViTMethod.for_backbone(adapt(model))
    torch.manual_seed(0)
    with ts.apply(model, method, keep_ratio=0.5, mode="mask"):
        method.train()
        model(pixel_values=x).logits.square().sum().backward()
    for stage, predictor in enumerate(method.predictors):
        grads = [p.grad for p in predictor.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0, f"stage {stage} got no gradient from the logits"


def test_topk_training_signal_ignores_a_shift_of_all_logits():
    # top-k keeps the same tokens if every logit moves by a constant, so the straight-through gradient must
    # not push that common mode: it once grew every logit and ranked the target's patches last
    model, x = build_tiny("vit"), make_pixel_values()
    model.requires_grad_(False)
    method = DynamicViTMethod.for_backbone(adapt(model))
    scored = []
    score = method.score

    def keep_grad(state):
        logits = score(state)
        logits.retain_grad()
        scored.append((logits, state.prunable.clone()))
        return logits

    method.score = keep_grad
    torch.manual_seed(0)
    with ts.apply(model, method, keep_ratio=0.25, mode="mask"):
        method.train()
        torch.nn.functional.cross_entropy(model(pixel_values=x).logits, torch.tensor([0, 1, 2])).backward()
    assert len(scored) == 3
    for logits, prunable in scored:
        assert logits.grad.abs().sum() > 0
        per_sample = (logits.grad * prunable).sum(dim=1)
        torch.testing.assert_close(per_sample, torch.zeros_like(per_sample), atol=1e-9, rtol=0)
