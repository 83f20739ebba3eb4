"""Mask (training) mode on multimodal LLMs: the keep policy enters every later layer's attention as a key bias.

A hard 0/1 policy in mask mode must give the answer logits gather mode gives (the same tokens dropped from
every layer from the site on, text never), for LLaVA and Qwen2-VL, on the mixed-layout, left-padded batch of
``tiny_mllm.make_batch``; the kernel stays SDPA (a float mask, no eager attention forced); a soft policy's
gradient reaches the scorer through the frozen LLM; decoding with a cache is refused in mask mode. Qwen2-VL's
packed tower (``vit.<i>``, merge groups, attention per frame chunk) gives gather mode's logits too, its soft
policy trains through the tower's later blocks and the LLM, and flash attention there is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_mllm import MLLM_FAMILIES, build_tiny_mllm, image_token_id, make_batch
from torch import nn

import tokensift as ts
from tokensift import attention as attn
from tokensift.scorers.base import TokenMethod
from tokensift.scorers.learned import straight_through_top_k
from tokensift.scorers.random.model import RandomMethod

SITES = {
    "llava": [["pre_llm"], ["llm.2"], ["llm.1", "llm.3"], ["vit.0"]],
    "qwen2_vl": [["pre_llm"], ["llm.2"], ["llm.1", "llm.3"], ["vit.0"], ["vit.0", "vit.1"]],
}
CASES = [(family, sites) for family in MLLM_FAMILIES for sites in SITES[family]]


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    out = {family: build_tiny_mllm(family).eval() for family in MLLM_FAMILIES}
    # the tiny Qwen2-VL tower has two blocks, so only vit.0 (the last block feeds the merger); two sites need three
    config = copy.deepcopy(out["qwen2_vl"].config)
    config.vision_config.depth = 3
    torch.manual_seed(0)
    out["qwen2_vl_deep"] = type(out["qwen2_vl"])(config).eval()
    return out


def model_for(models: dict[str, nn.Module], family: str, sites: list[str]) -> nn.Module:
    deep = family == "qwen2_vl" and sum(site.startswith("vit.") for site in sites) > 1
    return models["qwen2_vl_deep"] if deep else models[family]


def answer_rows(inputs: dict, family: str) -> torch.Tensor:
    """``[B, L]`` the text tokens of each sample (never dropped), padding excluded."""
    return inputs["attention_mask"].bool() & (inputs["input_ids"] != image_token_id(family))


@pytest.mark.parametrize(("family", "sites"), CASES, ids=[f"{f}-{'+'.join(s)}" for f, s in CASES])
def test_hard_policy_in_mask_mode_gives_the_gather_mode_logits(models, family, sites):
    model, inputs = model_for(models, family, sites), make_batch(family).inputs()
    logits = {}
    for mode in ("gather", "mask"):
        with ts.apply(model, "random", keep_ratio=0.4, sites=sites, mode=mode) as handle:
            handle.set_samples(torch.arange(3))
            with torch.no_grad():
                logits[mode] = model(**inputs).logits
            records = handle.last_records
        if mode == "mask":
            assert all(r.policy is not None and r.kept_orig_index is None for r in records)
        else:
            kept = records[-1].kept_visual
    assert torch.equal(records[-1].kept_visual.round().long(), kept), "both modes keep the same count per sample"
    text = answer_rows(inputs, family)
    torch.testing.assert_close(logits["mask"][text], logits["gather"][text], atol=2e-4, rtol=2e-4)
    with torch.no_grad():
        unpruned = model(**inputs).logits
    assert not torch.allclose(unpruned[:, -1], logits["mask"][:, -1], atol=1e-3), "the policy matters"


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_mask_mode_keeps_the_sdpa_kernel_and_restores_the_model(models, family):
    model, inputs = models[family], make_batch(family).inputs()
    language_model = ts.backbones.adapt(model).language_model
    with torch.no_grad():
        reference = model(**inputs).logits
    calls = []
    original = attn.ALL_ATTENTION_FUNCTIONS["sdpa"]

    def counting(module, query, key, value, attention_mask, **kwargs):
        calls.append(attention_mask.dtype if attention_mask is not None else None)
        return original(module, query, key, value, attention_mask, **kwargs)

    attn.ALL_ATTENTION_FUNCTIONS["sdpa"] = counting
    try:
        with ts.apply(model, "random", keep_ratio=0.5, sites=["pre_llm"], mode="mask"):
            assert language_model.config._attn_implementation == "tokensift+sdpa"
            with torch.no_grad():
                model(**inputs)
    finally:
        attn.ALL_ATTENTION_FUNCTIONS["sdpa"] = original
    assert calls and all(dtype == torch.float32 for dtype in calls[-ts.backbones.adapt(model).num_layers :])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


class SoftScorer(TokenMethod):
    """A learned method with a soft policy: sigmoid of a linear score of each visual token."""

    name = "soft_test_scorer"
    kind = "learned"
    site_kinds = ("pre_llm", "llm")

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, 1)

    def score(self, state):
        return self.linear(state.hidden.detach()).squeeze(-1)

    def keep_policy(self, state, num_keep):
        policy = torch.sigmoid(self.score(state))
        return policy if state.policy is None else policy * state.policy


@pytest.mark.parametrize("site", ["pre_llm", "llm.2"])
@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_soft_policy_gradient_reaches_the_scorer_through_the_frozen_llm(models, family, site):
    model, inputs = models[family], make_batch(family).inputs()
    adapter = ts.backbones.adapt(model)
    scorer = SoftScorer(adapter.text_config.hidden_size)
    scorer.config.sites = [site]
    with ts.apply(model, scorer, keep_ratio=0.5, mode="mask") as handle:
        handle.method.train()
        out = model(**inputs).logits[:, -1].logsumexp(-1).sum()
        out.backward()
        record = handle.last_records[-1]
    assert scorer.linear.weight.grad is not None and float(scorer.linear.weight.grad.abs().sum()) > 0
    assert record.kept_visual.requires_grad, "the kept count is differentiable (a budget term can train it)"


def test_decoding_with_a_cache_is_refused_in_mask_mode(models):
    model, inputs = models["llava"], make_batch("llava").inputs()
    handle = ts.apply(model, "random", keep_ratio=0.5, sites=["llm.2"], mode="mask")
    with handle, pytest.raises(ValueError, match="mask"), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)


class StraightThroughScorer(SoftScorer):
    """A hard 0/1 policy with a straight-through gradient (Gumbel top-k without noise)."""

    name = "straight_through_test_scorer"

    def keep_policy(self, state, num_keep):
        logits = self.score(state)
        policy = straight_through_top_k(logits, state.prunable, num_keep, torch.full_like(logits, 0.5), 1.0)
        policy = torch.where(state.protected | ~state.valid, torch.ones_like(policy), policy)
        return policy if state.policy is None else policy * state.policy


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_straight_through_policy_is_exact_forward_and_reaches_dropped_tokens(models, family):
    """A hard policy that carries a gradient takes the renormalised policy softmax: the forward is the gather
    model's (text logits), and dropped tokens' logits get a gradient (a blocked log p bias would give them none)."""
    model, inputs = models[family], make_batch(family).inputs()
    scorer = StraightThroughScorer(ts.backbones.adapt(model).text_config.hidden_size)
    scorer.config.sites = ["pre_llm"]
    logits_seen = {}

    def keep_logits(module, args, output):
        output.retain_grad()
        logits_seen["value"] = output

    hook = scorer.linear.register_forward_hook(keep_logits)
    with ts.apply(model, scorer, keep_ratio=0.4, mode="mask") as handle:
        handle.method.train()
        masked = model(**inputs).logits
        masked[:, -1].logsumexp(-1).sum().backward()
        policy = handle.last_records[-1].policy.detach()
    hook.remove()
    with ts.apply(model, scorer, keep_ratio=0.4) as handle, torch.no_grad():
        gathered = model(**inputs).logits
    text = answer_rows(inputs, family)
    torch.testing.assert_close(masked.detach()[text], gathered[text], atol=2e-4, rtol=2e-4)
    gradient = logits_seen["value"].grad.squeeze(-1)
    dropped = (policy == 0) & inputs["attention_mask"].bool()
    assert bool(dropped.any()) and float(gradient[dropped].abs().sum()) > 0


@pytest.mark.parametrize("mode", ["gather", "mask"])
def test_a_concealed_answer_is_padding_to_the_method_and_stays_in_the_sequence(models, mode):
    """Teacher-forced training batches hold the answer; the method must choose without it, as at inference."""
    model, inputs = models["llava"], make_batch("llava").inputs()
    answer = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    answer[:, -1] = True
    seen = {}

    class Spy(RandomMethod):
        def score(self, state):
            seen["valid"] = state.valid.clone()
            return super().score(state)

    with ts.apply(model, Spy(), keep_ratio=0.5, sites=["pre_llm"], mode=mode) as handle:
        handle.conceal(answer)
        with torch.no_grad():
            model(**inputs)
        record = handle.last_records[-1]
        with pytest.raises(ValueError, match="conceal"), torch.no_grad():
            model(**make_batch("llava").inputs([0, 1]))  # another batch while it is set
    assert not bool(seen["valid"][:, -1].any()), "the answer is padding to the method"
    last = inputs["input_ids"].shape[1] - 1
    if mode == "gather":
        assert bool((record.kept_orig_index == last).any(1).all()), "and it stays in the sequence"
    else:
        assert bool((record.policy[:, -1] == 1).all())


# -- Qwen2-VL's packed tower (vit.<i>: merge groups, attention per frame chunk) ------------------------------


class SoftTowerScorer(SoftScorer):
    """A soft policy over a packed tower's merge groups (the mean of each group's patches)."""

    name = "soft_tower_test_scorer"
    site_kinds = ("vit",)


class StraightThroughTowerScorer(StraightThroughScorer):
    name = "straight_through_tower_test_scorer"
    site_kinds = ("vit",)

    def keep_policy(self, state, num_keep):
        self.last_policy = super().keep_policy(state, num_keep)  # [images, groups], padding 1
        return self.last_policy


@pytest.mark.parametrize("sites", [["vit.0"], ["vit.0", "vit.1"]], ids=["vit.0", "vit.0+vit.1"])
def test_soft_policy_at_packed_tower_sites_trains_through_the_tower_and_the_llm(models, sites):
    model, inputs = model_for(models, "qwen2_vl", sites), make_batch("qwen2_vl").inputs()
    tower = ts.backbones.adapt(model).tower
    scorer = SoftTowerScorer(model.config.vision_config.embed_dim)
    scorer.config.sites = sites
    with ts.apply(model, scorer, keep_ratio=0.5, mode="mask") as handle:
        handle.method.train()
        loss = model(**inputs).logits[:, -1].logsumexp(-1).sum()
        record = handle.last_records[-1]
        # the LLM's share: the gradient reaching the policy its attention was given (text 1, one per merge group)
        (through_llm,) = torch.autograd.grad(loss, record.policy, retain_graph=True)
        loss.backward()
        full = scorer.linear.weight.grad.clone()
        scorer.zero_grad()
        # the tower's share: the merged features depend on the policy only through the later blocks' attention
        features = tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        features.square().sum().backward()
        through_tower = scorer.linear.weight.grad
    visual = inputs["input_ids"] == image_token_id("qwen2_vl")
    assert float(through_llm[visual].abs().sum()) > 0 and float(full.abs().sum()) > 0
    assert through_tower is not None and float(through_tower.abs().sum()) > 0
    assert record.kept_visual.requires_grad, "the kept count is differentiable (a budget term can train it)"
    assert bool(((record.policy > 0) & (record.policy < 1))[visual].all()), "soft, one value per LLM token"


def test_straight_through_policy_at_a_packed_tower_is_exact_forward(models):
    """A straight-through hard policy takes the renormalised policy softmax in the tower's later blocks (chunk by
    chunk) and the LLM: the forward is gather mode's (text logits), and dropped merge groups get a gradient."""
    model, inputs = models["qwen2_vl"], make_batch("qwen2_vl").inputs()
    scorer = StraightThroughTowerScorer(model.config.vision_config.embed_dim)
    scorer.config.sites = ["vit.0"]
    seen = {}

    def keep_logits(module, args, output):
        output.retain_grad()
        seen["value"] = output

    hook = scorer.linear.register_forward_hook(keep_logits)
    with ts.apply(model, scorer, keep_ratio=0.4, mode="mask") as handle:
        handle.method.train()
        masked = model(**inputs).logits
        masked[:, -1].logsumexp(-1).sum().backward()
    hook.remove()
    dropped = scorer.last_policy.detach() == 0
    with ts.apply(model, scorer, keep_ratio=0.4), torch.no_grad():
        gathered = model(**inputs).logits
    text = answer_rows(inputs, "qwen2_vl")
    torch.testing.assert_close(masked.detach()[text], gathered[text], atol=2e-4, rtol=2e-4)
    gradient = seen["value"].grad.squeeze(-1)  # [images, groups]
    assert bool(dropped.any()) and float(gradient[dropped].abs().sum()) > 0


@pytest.mark.parametrize("budget", [{"keep_ratio": 0.5}, {"keep_count": 1}], ids=["half", "one-empties-two-frames"])
def test_packed_tower_mask_mode_biases_a_video_frame_by_frame(models, budget):
    """A video's frames are separate attention chunks; each gets its own share of the bias (an emptied frame too:
    its patches see only themselves, where gather mode has no chunk for it)."""
    from tiny_mllm import QWEN_VIDEO_TOKEN, QWEN_VISION_END, QWEN_VISION_START

    model = models["qwen2_vl"]
    t, h, w = 3, 4, 8  # 3 frames of 4x8 patches: 8 merge groups each
    ids = torch.tensor([[1, 5, QWEN_VISION_START, *[QWEN_VIDEO_TOKEN] * (t * h * w // 4), QWEN_VISION_END, 7, 9]])
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values_videos=torch.randn(t * h * w, 96, generator=torch.Generator().manual_seed(0)),
        video_grid_thw=torch.tensor([[t, h, w]]),
        mm_token_type_ids=(ids == QWEN_VIDEO_TOKEN).long() * 2,
    )
    logits = {}
    for mode in ("gather", "mask"):
        with ts.apply(model, "random", sites=["vit.0"], mode=mode, **budget), torch.no_grad():
            logits[mode] = model(**inputs).logits
    text = ids != QWEN_VIDEO_TOKEN
    torch.testing.assert_close(logits["mask"][text], logits["gather"][text], atol=2e-4, rtol=2e-4)


def test_packed_tower_mask_mode_refuses_flash_attention(models):
    """Flash attention runs the packed tower's frames in one call, which takes no per-key bias."""
    model = models["qwen2_vl"]
    config = ts.backbones.adapt(model).tower.config
    original = config._attn_implementation
    config._attn_implementation = "flash_attention_2"  # as loaded with it (set directly: no flash-attn here)
    try:
        with pytest.raises(ValueError, match="flash"):
            ts.apply(model, "random", keep_ratio=0.5, sites=["vit.0"], mode="mask")
    finally:
        config._attn_implementation = original
    with ts.apply(model, "random", keep_ratio=0.5, sites=["vit.0"]) as handle:
        wrapped = config._attn_implementation
        config._attn_implementation = attn.PREFIX + "flash_attention_2"
        try:
            with pytest.raises(ValueError, match="flash"):
                handle.mode = "mask"
        finally:
            config._attn_implementation = wrapped
        assert handle.mode == "gather"
        handle.mode = "mask"
    assert config._attn_implementation == original
