"""FlowCut and VFlowOpt: their rules on small cases worked out by hand (FlowCut's value terms, VFlowOpt's patch
entropy), the flow FlowCut carries between the blocks of one forward pass (and never between forward passes or
samples), what the handle gives them (values, every block observed, pixel patches), VFlowOpt's calibration, and
both applied end to end (``ts.apply``) to the tiny ViT / CLIP / SigLIP and LLaVA with batches of several samples.

``docs/methods.md`` lists their references and where tokensift differs on purpose.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES, NUM_PREFIX, build_tiny, make_pixel_values
from tiny_mllm import build_tiny_mllm, make_batch
from transformers import LlavaConfig, LlavaForConditionalGeneration, ViTConfig, ViTForImageClassification

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.calibration import calibrate, flow_similarity, schedule
from tokensift.flops import SiteShape, scorer_flops, site_flops, vit_site_shape
from tokensift.scorers.flowcut import FlowCutConfig, FlowCutMethod, flow_score
from tokensift.scorers.vflowopt import (
    VFlowOptConfig,
    VFlowOptMethod,
    entropy_prior,
    global_token_attention,
    patch_entropy,
)
from tokensift.state import TokenState

LN2 = math.log(2.0)


def make_state(attention, values=None, num_prefix: int = 1, *, orig_index=None, layer: int = 1, sample_index=None,
               policy=None, grid=None, patch_pixels=None) -> TokenState:  # fmt: skip
    """``values``: ``[B, N, Dh]`` (one value head) or ``[B, Hv, N, Dh]``; ``patch_pixels``: ``[B, N, C, p·p]``."""
    attention = torch.as_tensor(attention, dtype=torch.float32)
    if values is not None:
        values = torch.as_tensor(values, dtype=torch.float32)
        values = values.unsqueeze(1) if values.dim() == 3 else values
    b, _, n, _ = attention.shape
    orig = torch.arange(n).expand(b, n).clone() if orig_index is None else torch.as_tensor(orig_index)
    full = int(orig.max()) + 1  # the unpruned sequence: at least up to the largest original index
    return TokenState(
        hidden=torch.zeros(b, n, 2),
        protected=orig < num_prefix,
        orig_index=orig,
        size=torch.ones(b, n),
        grid=grid or (1, full - num_prefix),
        num_prefix=num_prefix,
        site=f"vit.{layer}",
        layer=layer,
        policy=None if policy is None else torch.as_tensor(policy, dtype=torch.float32),
        attention=attention,
        values=values,
        patch_pixels=None if patch_pixels is None else torch.as_tensor(patch_pixels, dtype=torch.float32),
        sample_index=sample_index,
    )


def kept(mask: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().squeeze(1).tolist() for row in mask]


def select(method, state: TokenState, num_keep: int) -> list[list[int]]:
    return kept(method.select(state, torch.full((state.hidden.shape[0],), num_keep)))


def cls_rows(*rows: list[float]) -> list[list[float]]:
    """An attention map (one head) whose [CLS] row is ``rows[0]``; the other queries attend uniformly."""
    n = len(rows[0])
    return [rows[0]] + [[1.0 / n] * n for _ in range(n - 1)]


# -- FlowCut: the rule ----------------------------------------------------------------------------------------
# One image: [CLS] and three patches. Heads 0 and 1 give [CLS] the row (0.1, 0.5, 0.2, 0.2) on average, so the
# patches draw a = (0.5, 0.2, 0.2) / 0.9 of [CLS]'s flow. One value head: v_cls = (1, 0), so v_cls . v_j = (1, 0, 0,
# ln 2) over [CLS] and the patches, softmax (e, 1, 1, 2) / (e + 4), and over the patches s = (1, 1, 2) / 4; the
# values' L1 norms are (1, 2, 3 + ln 2). Scores (a + s) * |v|_1:
#   p1 = (5/9 + 1/4) * 1 = 0.806    p2 = (2/9 + 1/4) * 2 = 0.944    p3 = (2/9 + 1/2) * (3 + ln 2) = 2.667
# so p3 then p2 survive, although [CLS] attends most to p1: its value carries the least.
SITE1_ATTENTION = [[cls_rows([0.1, 0.6, 0.2, 0.1]), cls_rows([0.1, 0.4, 0.2, 0.3])]]
SITE1_VALUES = [[[1.0, 0.0], [0.0, 1.0], [0.0, -2.0], [LN2, 3.0]]]
SITE1_SCORES = [0.0, 5 / 9 + 1 / 4, (2 / 9 + 1 / 4) * 2, (2 / 9 + 1 / 2) * (3 + LN2)]
# The next site (block 2) sees [CLS], p2, p3. [CLS]'s row (0.2, 0.6, 0.2): a = (0.75, 0.25); values (0, 1.5), (0, 1):
# similarity 0 for both, s = (0.5, 0.5); scores p2 = 1.25 * 1.5 = 1.875, p3 = 0.75 * 1 = 0.75: alone, p2 wins.
# With the flow of site 1 (decay 0.5): p2 = (0.944 + 1.875) / 2 = 1.410, p3 = (2.667 + 0.75) / 2 = 1.708: p3 wins.
SITE2_ATTENTION = [[cls_rows([0.2, 0.6, 0.2]), cls_rows([0.2, 0.6, 0.2])]]
SITE2_VALUES = [[[1.0, 0.0], [0.0, 1.5], [0.0, 1.0]]]
SITE2_ORIG = [[0, 2, 3]]


def test_flow_score_is_flowcuts_normalised_sum_times_density():
    relation = torch.tensor([[9.0, 0.2, 0.6, 0.2]])  # [CLS]'s own entry is no candidate: ignored
    semantic = torch.tensor([[5.0, 0.5, 0.25, 0.25]])
    density = torch.tensor([[7.0, 1.0, 1.0, 4.0]])
    candidates = torch.tensor([[False, True, True, True]])
    # (0.2 + 0.5) * 1, (0.6 + 0.25) * 1, (0.2 + 0.25) * 4
    torch.testing.assert_close(flow_score(relation, semantic, density, candidates), torch.tensor([[0, 0.7, 0.85, 1.8]]))


def test_flowcut_scores_cls_attention_and_value_similarity_times_value_density():
    state = make_state(SITE1_ATTENTION, SITE1_VALUES)
    method = FlowCutMethod()
    torch.testing.assert_close(method.site_score(state)[0], torch.tensor(SITE1_SCORES))
    assert select(method, state, 1) == [[0, 3]]
    assert select(method, state, 2) == [[0, 2, 3]]


def test_flowcut_value_terms_are_per_head_softmaxes_with_cls_and_the_norm_of_the_head_mean():
    # Two value heads of width 1 (FlowCut's CLIPAttention_forward): head 0 values (1 | 0, 0, ln 2) for ([CLS] | p1,
    # p2, p3), head 1 (0 | 2, -4, 6). Per head, softmax over all live tokens of v_cls . v_j: head 0 (e, 1, 1, 2) /
    # (e + 4), head 1 uniform 1/4 (v_cls = 0). Averaged over heads, then over the patches renormalised (compute_score):
    #   s ∝ (1/(e+4) + 1/4, 1/(e+4) + 1/4, 2/(e+4) + 1/4)
    # which a softmax over the patches alone would make (1/4 + 1/3, 1/4 + 1/3, 1/2 + 1/3) instead. Density: the L1
    # norm of the head-averaged value, |(0 + 2)/2| = 1, |(0 - 4)/2| = 2, |(ln 2 + 6)/2|: not the mean of the norms.
    values = [[[[1.0], [0.0], [0.0], [LN2]], [[0.0], [2.0], [-4.0], [6.0]]]]
    attention = [[cls_rows([0.1, 0.5, 0.2, 0.2])] * 2]
    e4 = math.e + 4.0
    semantic = torch.tensor([1 / e4 + 1 / 4, 1 / e4 + 1 / 4, 2 / e4 + 1 / 4])
    relation = torch.tensor([0.5, 0.2, 0.2]) / 0.9
    density = torch.tensor([1.0, 2.0, (LN2 + 6.0) / 2])
    expected = (relation + semantic / semantic.sum()) * density
    scores = FlowCutMethod().site_score(make_state(attention, values))[0]
    torch.testing.assert_close(scores, torch.cat([torch.zeros(1), expected]))


def test_flowcut_without_cls_uses_attention_received_and_the_mean_value():
    # SigLIP: no [CLS]. Queries attend (0.5, 0.25, 0.25), (0.5, 0.25, 0.25), (0.2, 0.2, 0.6): received (0.4, 0.233,
    # 0.367). Mean value (1, 0); values (1, 1), (2, 0), (0, 1) give similarities (1, 2, 0), L1 norms (2, 2, 1).
    attention = [[[[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]]]
    state = make_state(attention, [[[1.0, 1.0], [2.0, 0.0], [0.0, -1.0]]], num_prefix=0)
    received = torch.tensor([1.2, 0.7, 1.1]) / 3
    semantic = torch.tensor([math.e, math.e**2, 1.0]) / (math.e + math.e**2 + 1.0)
    expected = (received / received.sum() + semantic) * torch.tensor([2.0, 2.0, 1.0])
    torch.testing.assert_close(FlowCutMethod().site_score(state)[0], expected)


# -- FlowCut: the flow carried between the blocks of one forward pass ----------------------------------------
def two_sites(method: FlowCutMethod, index: torch.Tensor, second=None) -> list[list[int]]:
    """Site 1 keeps two patches (p2, p3); then the positions kept at site 2 (``second``: its state)."""
    assert select(method, make_state(SITE1_ATTENTION, SITE1_VALUES, sample_index=index), 2) == [[0, 2, 3]]
    state = second or make_state(SITE2_ATTENTION, SITE2_VALUES, orig_index=SITE2_ORIG, layer=2, sample_index=index)
    return select(method, state, 1)


def test_flowcut_accumulates_the_flow_of_the_earlier_site():
    alone = FlowCutMethod().site_score(make_state(SITE2_ATTENTION, SITE2_VALUES, orig_index=SITE2_ORIG, layer=2))
    torch.testing.assert_close(alone[0], torch.tensor([0.0, 1.875, 0.75]))
    assert two_sites(FlowCutMethod(), torch.tensor([5])) == [[0, 2]]  # p3 (its flow at site 1 carries it)
    assert two_sites(FlowCutMethod(FlowCutConfig(decay=0.0)), torch.tensor([5])) == [[0, 1]]  # p2: site 2 alone


def test_flowcut_starts_afresh_on_another_forward_pass():
    index = torch.tensor([5])
    # another forward pass: its rows come as another tensor (the handle makes one per forward)
    other = make_state(SITE2_ATTENTION, SITE2_VALUES, orig_index=SITE2_ORIG, layer=2, sample_index=torch.tensor([5]))
    assert two_sites(FlowCutMethod(), index, other) == [[0, 1]]
    # the same rows at a block that is not deeper: a new pass that starts there
    again = make_state(SITE2_ATTENTION, SITE2_VALUES, orig_index=SITE2_ORIG, layer=1, sample_index=index)
    assert two_sites(FlowCutMethod(), index, again) == [[0, 1]]
    # a live token (p1) that site 1 dropped: these tokens did not come from there
    foreign = make_state(SITE2_ATTENTION, SITE2_VALUES, orig_index=[[0, 1, 3]], layer=2, sample_index=index)
    assert two_sites(FlowCutMethod(), index, foreign) == [[0, 1]]


# Block 2 with every token still there: [CLS]'s row (0.2, 0, 0.6, 0.2) gives a = (0, 0.75, 0.25); values (1, 0) for
# [CLS] and (0, 1), (0, 1.5), (0, 1) for the patches: similarity 0 for each, s = 1/3 each; densities (1, 1.5, 1).
# Alone: p1 = 1/3, p2 = (0.75 + 1/3) * 1.5 = 1.625, p3 = (0.25 + 1/3) * 1 = 0.583: p2 wins. After block 1 observed
# (SITE1_SCORES, nothing dropped): p1 = (0.806 + 0.333) / 2 = 0.569, p2 = (0.944 + 1.625) / 2 = 1.285,
# p3 = (2.667 + 0.583) / 2 = 1.625: p3 wins.
BLOCK2_ATTENTION = [[cls_rows([0.2, 0.0, 0.6, 0.2])]]
BLOCK2_VALUES = [[[1.0, 0.0], [0.0, 1.0], [0.0, 1.5], [0.0, 1.0]]]


def test_flowcut_observe_adds_a_block_that_prunes_nothing_to_the_flow():
    index = torch.tensor([5])
    site = make_state(BLOCK2_ATTENTION, BLOCK2_VALUES, layer=2, sample_index=index)
    alone = FlowCutMethod().site_score(site)[0]
    torch.testing.assert_close(alone, torch.tensor([0.0, 1 / 3, 1.625, 0.25 + 1 / 3]))
    assert select(FlowCutMethod(), site, 1) == [[0, 2]]
    method = FlowCutMethod()
    assert method.observe(make_state(SITE1_ATTENTION, SITE1_VALUES, layer=1, sample_index=index)) is None
    torch.testing.assert_close(method.score(site)[0], (torch.tensor(SITE1_SCORES) + alone) / 2)
    assert select(method, site, 1) == [[0, 3]]
    # an observation of another forward pass (another index tensor) is not carried
    method = FlowCutMethod()
    method.observe(make_state(SITE1_ATTENTION, SITE1_VALUES, layer=1, sample_index=torch.tensor([5])))
    assert select(method, site, 1) == [[0, 2]]


def test_flowcut_in_mask_mode_carries_the_flow_of_the_live_tokens():
    index = torch.tensor([5])
    method = FlowCutMethod()
    policy = method.keep_policy(make_state(SITE1_ATTENTION, SITE1_VALUES, sample_index=index), torch.tensor([2]))
    assert policy.tolist() == [[1.0, 0.0, 1.0, 1.0]]
    # site 2 in mask mode: every token still there, p1 dropped by the policy: invisible to [CLS] and out of the
    # value softmax (its large value would otherwise take the similarity mass)
    attention = [[cls_rows([0.2, 0.0, 0.6, 0.2]), cls_rows([0.2, 0.0, 0.6, 0.2])]]
    values = [[[1.0, 0.0], [9.0, 9.0], [0.0, 1.5], [0.0, 1.0]]]
    state = make_state(attention, values, layer=2, sample_index=index, policy=policy)
    assert method.keep_policy(state, torch.tensor([1])).tolist() == [[1.0, 0.0, 0.0, 1.0]]


# -- FlowCut: sites and cost ------------------------------------------------------------------------------------
def test_flowcut_default_sites_are_every_second_block_ending_at_the_deepest():
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=12, num_attention_heads=2,
                                              intermediate_size=16, image_size=8, patch_size=4))  # fmt: skip
    assert FlowCutMethod().default_sites(adapt(vit)) == ["vit.0", "vit.2", "vit.4", "vit.6", "vit.8", "vit.10"]
    assert FlowCutMethod(FlowCutConfig(num_stages=2)).default_sites(adapt(vit)) == ["vit.3", "vit.7"]
    # LLaVA reads the tower's hidden state -2: as FlowCut on LLaVA-1.5 (blocks 1, 3, ..., 21 of 24), the deepest
    # site is the block before the feature block, and the sites go down from it in steps of two
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=16,
                               num_hidden_layers=6, num_attention_heads=2, image_size=8, patch_size=4),
            text_config=dict(model_type="llama", hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
            image_token_index=63,
        )
    )  # fmt: skip
    assert FlowCutMethod().default_sites(adapt(llava)) == ["vit.1", "vit.3"]
    assert VFlowOptMethod().default_sites(adapt(llava)) == ["vit.1", "vit.2"]


def test_flowcut_and_vflowopt_charge_what_they_compute():
    # n = 17 tokens ([CLS] + 16), H = 2 heads of h = 16
    site = SiteShape("vit.1", tokens=17, prunable=16, keep=8, hidden=32, heads=2, head_dim=16, kv_heads=2)
    # [CLS] row averaged over heads, per-head value dot products, the head-averaged values and their L1 norms
    values = 2 * 17 * 2 * 16 + 17 * 2 * 16 + 2 * 17 * 16
    assert FlowCutMethod().analytic_flops(site) == 2 * 17 + values
    no_cls = SiteShape("vit.1", tokens=16, prunable=16, keep=8, hidden=32, heads=2, head_dim=16, kv_heads=2)
    # the map averaged over heads, the attention received, each head's mean value instead of [CLS]'s
    values = 2 * 16 * 2 * 16 + 16 * 2 * 16 + 2 * 16 * 16
    assert FlowCutMethod().analytic_flops(no_cls) == 2 * 256 + 2 * 256 + 2 * 16 * 2 * 16 + values
    assert VFlowOptMethod().analytic_flops(site) == 2 * 289 + 4 * 289


def test_flowcut_is_charged_at_every_block_it_observes():
    adapter = adapt(build_tiny("clip"))  # 4 blocks, [CLS] + 16 patches, hidden 32
    method = FlowCutMethod()

    def shape(layer, tokens, alive, keep):
        return vit_site_shape(adapter, f"vit.{layer}", tokens, alive, keep)

    # sites vit.0 (16 -> 8) and vit.2 (8 -> 4): block 1 observed on 9 tokens, block 3 after the last site is not
    expected = site_flops(method, shape(0, 17, 16, 8)) + site_flops(method, shape(1, 9, 8, 8))
    expected += site_flops(method, shape(2, 9, 8, 4))
    assert scorer_flops(adapter, method, {"vit.0": 8, "vit.2": 4}) == expected
    # vit.0 keeps every patch: blocks 0 and 1 are observed on all 17 tokens, then vit.2 runs
    expected = 2 * site_flops(method, shape(0, 17, 16, 16)) + site_flops(method, shape(2, 17, 16, 4))
    assert scorer_flops(adapter, method, {"vit.0": 16, "vit.2": 4}) == expected
    # nothing to remove: nothing observed, nothing charged
    assert scorer_flops(adapter, method, {"vit.0": 16, "vit.2": 16}) == 0.0
    # a method that does not observe is charged at its running sites only (VFlowOpt)
    vflowopt = VFlowOptMethod()
    expected = site_flops(vflowopt, shape(0, 17, 16, 8)) + site_flops(vflowopt, shape(2, 9, 8, 4))
    assert scorer_flops(adapter, vflowopt, {"vit.0": 8, "vit.2": 4}) == expected


# -- VFlowOpt: the rule --------------------------------------------------------------------------------------
# One head, four tokens. Rows are the queries: received (column means) = (0.5, 0.125, 0.15, 0.225), mean 0.25.
GLOBAL_MAP = [
    [0.7, 0.1, 0.1, 0.1],
    [0.6, 0.2, 0.1, 0.1],
    [0.5, 0.1, 0.3, 0.1],
    [0.2, 0.1, 0.1, 0.6],
]


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.0, [0.5, 0.125, 0.15, 0.225]),  # every token global: the attention received
        (0.8, [0.45, 0.1, 0.1, 0.35]),  # tokens 0 and 3 receive more than 0.2: their rows averaged
        (1.5, [0.7, 0.1, 0.1, 0.1]),  # only token 0 receives more than 0.375
        (3.0, [0.7, 0.1, 0.1, 0.1]),  # nobody above 0.75: the most-attended token stays global
    ],
)
def test_vflowopt_scores_by_the_rows_of_the_global_tokens(threshold, expected):
    attention = torch.tensor([[GLOBAL_MAP]])
    alive = torch.ones(1, 4, dtype=torch.bool)
    torch.testing.assert_close(global_token_attention(attention, alive, threshold)[0], torch.tensor(expected))


def test_vflowopt_averages_heads_and_ignores_dropped_tokens():
    # head 0 puts token 0's row at (0.9, 0.1, 0, 0), head 1 at (0.5, 0.1, 0.2, 0.2): the average is GLOBAL_MAP[0]
    other = [[0.9, 0.1, 0.0, 0.0], *GLOBAL_MAP[1:]]
    second = [[0.5, 0.1, 0.2, 0.2], *GLOBAL_MAP[1:]]
    state = make_state([[other, second]], num_prefix=0)
    method = VFlowOptMethod(VFlowOptConfig(global_threshold=1.5))
    torch.testing.assert_close(method.score(state)[0], torch.tensor([0.7, 0.1, 0.1, 0.1]))
    assert select(method, state, 1) == [[0]]
    # token 0 dropped at an earlier site (mask mode): live queries 1..3 receive on average (0.133, 0.167, 0.267)
    # of tokens 1..3 (token 0's column no longer counts), mean 0.189; at t = 1.2 only token 3 (> 0.227) is global
    policy = [[0.0, 1.0, 1.0, 1.0]]
    state = make_state([[GLOBAL_MAP]], num_prefix=0, policy=policy)
    scores = VFlowOptMethod(VFlowOptConfig(global_threshold=1.2)).score(state)[0]
    torch.testing.assert_close(scores[1:], torch.tensor([0.1, 0.1, 0.6]))


def test_vflowopt_with_cls_ranks_patches_only():
    state = make_state([[GLOBAL_MAP]], num_prefix=1)
    assert select(VFlowOptMethod(VFlowOptConfig(global_threshold=0.8)), state, 1) == [[0, 3]]


# -- VFlowOpt: the patch-entropy prior ---------------------------------------------------------------------------
def grey(level: float) -> list[float]:
    """One pixel of three equal channels that VFlowOpt's ``(x · 255)`` → ``uint8`` reads as ``int(level)``."""
    return [(level + 0.5) / 255] * 3


def patch(*pixels: list[float]) -> list[list[float]]:
    """A 2 × 2 patch ``[C, p·p]`` of four ``[r, g, b]`` pixels."""
    return [list(channel) for channel in zip(*pixels, strict=True)]


# Four 2 × 2 patches (three channels), grey level = round(0.3333 · (r + g + b)) of the uint8 levels:
# - all four pixels (10, 10, 10): one level (10), entropy 0;
# - (0, 0, 0), (0, 0, 1), (0, 1, 1), (1, 1, 1): levels 0, round(0.3333) = 0, round(0.6666) = 1, round(0.9999) = 1:
#   two levels twice each, entropy 1 bit;
# - four distinct grey levels 0, 30, 60, 90: 2 bits;
# - two pixels at -1.5 / 255 (x · 255 = -1.5, which the uint8 cast wraps to 255, as in the reference) and two at 0:
#   two levels, 1 bit (clamping the negatives to 0 would make it one level, 0 bits).
ENTROPY_PATCHES = [
    [
        patch(grey(10), grey(10), grey(10), grey(10)),
        patch([0.5 / 255] * 3, [0.5 / 255, 0.5 / 255, 1.5 / 255], [0.5 / 255, 1.5 / 255, 1.5 / 255], grey(1)),
        patch(grey(0), grey(30), grey(60), grey(90)),
        patch([-1.5 / 255] * 3, [-1.5 / 255] * 3, grey(0), grey(0)),
    ]
]


def test_patch_entropy_is_vflowopts_grey_level_histogram_entropy():
    entropy = patch_entropy(torch.tensor(ENTROPY_PATCHES))
    torch.testing.assert_close(entropy, torch.tensor([[0.0, 1.0, 2.0, 1.0]]))
    # the prior: a softmax over the live patches, 0 elsewhere ([CLS], dropped tokens)
    prior = entropy_prior(torch.tensor(ENTROPY_PATCHES), torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(prior, torch.tensor([[1.0, math.e, math.e**2, math.e]]) / (1 + math.e) ** 2)
    prior = entropy_prior(torch.tensor(ENTROPY_PATCHES), torch.tensor([[False, True, True, False]]))
    torch.testing.assert_close(prior, torch.tensor([[0.0, 1.0, math.e, 0.0]]) / (1 + math.e))


def test_vflowopt_adds_alpha_times_the_entropy_prior():
    # GLOBAL_MAP at t = 1.5 scores (0.7, 0.1, 0.1, 0.1); the prior is softmax(0, 1, 2, 1) = (1, e, e², e) / (1 + e)²
    # = (0.072, 0.197, 0.534, 0.197). alpha = 2: (0.845, 0.493, 1.169, 0.493), token 2 (the most textured) outranks
    # token 0 (the most attended); alpha = -1 ranks against texture: token 2 drops below 1 and 3.
    state = make_state([[GLOBAL_MAP]], num_prefix=0, patch_pixels=ENTROPY_PATCHES)
    prior = torch.tensor([1.0, math.e, math.e**2, math.e]) / (1 + math.e) ** 2
    for alpha in (2.0, -1.0, 0.5):
        method = VFlowOptMethod(VFlowOptConfig(global_threshold=1.5, alpha=alpha))
        torch.testing.assert_close(method.score(state)[0], torch.tensor([0.7, 0.1, 0.1, 0.1]) + alpha * prior)
    assert select(VFlowOptMethod(VFlowOptConfig(global_threshold=1.5, alpha=2.0)), state, 1) == [[2]]
    assert select(VFlowOptMethod(VFlowOptConfig(global_threshold=1.5, alpha=-1.0)), state, 3) == [[0, 1, 3]]
    # alpha = 0 reads no pixels
    bare = make_state([[GLOBAL_MAP]], num_prefix=0)
    assert select(VFlowOptMethod(VFlowOptConfig(global_threshold=1.5)), bare, 1) == [[0]]
    with pytest.raises(ValueError, match="patch_pixels"):
        VFlowOptMethod(VFlowOptConfig(alpha=1.0)).score(bare)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_handle_gives_vflowopt_each_tokens_pixel_patch(family):
    model, x, p = build_tiny(family), make_pixel_values(), NUM_PREFIX[family]
    # [B, 16, 3, 16]: the 4 × 4 patches of the 16 × 16 images, row-major over the grid, each channel row by row
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(3, 16, 3, 16)
    full = torch.cat([torch.zeros(3, p, 3, 16), patches], dim=1)
    seen = []
    with ts.apply(model, "vflowopt", keep_ratio=0.25, alpha=0.5) as handle, torch.no_grad():
        original = handle.method.score

        def spy(state):
            seen.append((state.orig_index.clone(), state.patch_pixels))
            return original(state)

        handle.method.score = spy
        model(pixel_values=x)
    assert len(seen) == 2  # vit.0 on every token, vit.2 on the survivors of vit.0
    for orig_index, pixels in seen:
        expected = full.gather(1, orig_index[..., None, None].expand(-1, -1, 3, 16))
        assert torch.equal(pixels, expected)
    assert seen[1][0].shape == (3, 8 + p)


# -- configs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "options", "field"),
    [
        (FlowCutConfig, {"decay": 1.0}, "decay"),
        (FlowCutConfig, {"decay": -0.1}, "decay"),
        (FlowCutConfig, {"num_stages": 0}, "num_stages"),
        (VFlowOptConfig, {"global_threshold": -1.0}, "global_threshold"),
        (VFlowOptConfig, {"global_threshold": float("nan")}, "global_threshold"),
        (VFlowOptConfig, {"num_stages": 0}, "num_stages"),
        (VFlowOptConfig, {"alpha": float("inf")}, "alpha"),
        (VFlowOptConfig, {"keep_ratios": {"vit.0": 0.0}}, "keep_ratios"),
        (VFlowOptConfig, {"keep_ratios": {"vit.0": 0.5}, "sites": ["vit.1"]}, "keep_ratios"),
    ],
)
def test_bad_options_name_the_field(config, options, field):
    with pytest.raises(ValueError, match=f"{config.__name__}.{field}"):
        config(**options)


@pytest.mark.parametrize(("method", "options"), [("flowcut", {"decay": 2}), ("vflowopt", {"global_threshold": -3})])
def test_apply_refuses_bad_options_by_name(method, options):
    (field,) = options
    with pytest.raises(ValueError, match=field):
        ts.apply(build_tiny("vit"), method, keep_ratio=0.5, **options)


# -- end to end: vision backbones ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["flowcut", "vflowopt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_apply_prunes_progressively_at_the_default_sites(family, method):
    model, x = build_tiny(family), make_pixel_values()  # a batch of 3
    with torch.no_grad():
        reference = model(pixel_values=x).logits
    with ts.apply(model, method, keep_ratio=0.25) as handle, torch.no_grad():
        assert handle.sites == ["vit.0", "vit.2"]  # progressive: two sites of the tiny 4-block towers
        pruned = model(pixel_values=x).logits
        first, second = handle.last_records
        assert first.kept_orig_index.shape == (3, 8 + NUM_PREFIX[family])
        assert second.kept_orig_index.shape == (3, 4 + NUM_PREFIX[family])
        for b in range(3):
            assert set(second.kept_orig_index[b].tolist()) <= set(first.kept_orig_index[b].tolist())
        for b in range(3):  # each sample alone keeps what it kept in the batch
            single = model(pixel_values=x[b : b + 1]).logits
            torch.testing.assert_close(single, pruned[b : b + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(handle.kept_orig_index[0], second.kept_orig_index[b])
    assert torch.isfinite(pruned).all() and not torch.allclose(pruned, reference, atol=1e-4)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_flowcut_carries_the_flow_through_every_block_in_every_forward_pass(family):
    model, x = build_tiny(family), make_pixel_values()
    with ts.apply(model, "flowcut", keep_ratio=0.25) as handle, torch.no_grad():
        method, carried = handle.method, []
        original = method._flow_before

        def spy(state):
            before = original(state)
            carried.append((state.site, before is not None))
            return before

        method._flow_before = spy
        for _ in range(2):
            model(pixel_values=x)
    # sites vit.0 and vit.2; block 1 between them is observed; block 3, after the last site, is not
    assert carried == [("vit.0", False), ("vit.1", True), ("vit.2", True)] * 2


def _calls(model, method: str, x, **options) -> list[tuple[str, int, int, bool]]:
    """(hook, block, tokens, has attention) of every call of the method's ``observe`` / ``score`` in one forward."""
    calls = []
    with ts.apply(model, method, **options) as handle, torch.no_grad():
        for hook in ("observe", "score"):
            original = getattr(handle.method, hook, None)
            if original is None:
                continue

            def spy(state, hook=hook, original=original):
                calls.append((hook, state.layer, state.hidden.shape[1], state.attention is not None))
                return original(state)

            setattr(handle.method, hook, spy)
        model(pixel_values=x)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_the_handle_calls_observe_after_every_block_while_tokens_remain_to_be_removed(family):
    model, x, n = build_tiny(family), make_pixel_values(), 16 + NUM_PREFIX[family]
    p = NUM_PREFIX[family]
    # one site at vit.2 (LLaVA's setting: the first prune after some blocks): blocks 0 and 1 observed, with attention
    assert _calls(model, "flowcut", x, keep_ratio=0.25, sites=["vit.2"]) == [
        ("observe", 0, n, True),
        ("observe", 1, n, True),
        ("score", 2, n, True),
    ]
    # a site that drops nothing is observed like any block; block 1 after vit.0 drops to 8 runs on 8 patches
    assert _calls(model, "flowcut", x, keep_ratio={"vit.0": 1.0, "vit.2": 0.25}, sites=["vit.0", "vit.2"]) == [
        ("observe", 0, n, True),
        ("observe", 1, n, True),
        ("score", 2, n, True),
    ]
    assert _calls(model, "flowcut", x, keep_ratio={"vit.0": 0.5, "vit.1": 0.25}, sites=["vit.0", "vit.1"]) == [
        ("score", 0, n, True),
        ("score", 1, 8 + p, True),
    ]
    # nothing to remove (keep_ratio=1): no block observed, no site run, nothing captured
    assert _calls(model, "flowcut", x, keep_ratio=1.0) == []
    # a method that does not ask is never called between its sites
    assert _calls(model, "vflowopt", x, keep_ratio=0.25) == [("score", 0, n, True), ("score", 2, 8 + p, True)]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_the_handle_gives_flowcut_the_blocks_values_per_head(family):
    model, x = build_tiny(family), make_pixel_values()
    adapter = adapt(model)
    computed, seen = {}, {}
    hooks = [
        adapter.attention_modules[i].v_proj.register_forward_hook(
            lambda m, a, out, i=i: computed.__setitem__(i, out.detach())
        )
        for i in range(adapter.num_layers)
    ]
    try:
        with ts.apply(model, "flowcut", keep_ratio=0.25, sites=["vit.2"]) as handle, torch.no_grad():
            for hook in ("observe", "score"):
                original = getattr(handle.method, hook)

                def spy(state, original=original):
                    seen[state.layer] = state.values
                    return original(state)

                setattr(handle.method, hook, spy)
            model(pixel_values=x)
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(seen) == [0, 1, 2]
    b, n, _ = computed[0].shape
    for layer, values in seen.items():  # [B, H, N, h]: v_proj's output split into its heads
        assert values.shape == (b, 2, n, 16)
        torch.testing.assert_close(values, computed[layer].view(b, n, 2, 16).transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("mode_rows", ["counter", "same_index_tensor"])
def test_flowcut_flow_never_leaks_between_forward_passes(mode_rows):
    model = build_tiny("clip")
    a, b = make_pixel_values(seed=1), make_pixel_values(seed=2)
    index = torch.arange(3)

    def kept_for(handle, pixels):
        if mode_rows == "same_index_tensor":
            handle.set_samples(index)  # the very same tensor object every time
        with torch.no_grad():
            model(pixel_values=pixels)
        return [r.kept_orig_index.clone() for r in handle.last_records]

    with ts.apply(model, "flowcut", keep_ratio=0.25) as handle:
        fresh_b = kept_for(handle, b)
    with ts.apply(model, "flowcut", keep_ratio=0.25) as handle:
        kept_for(handle, a)
        after_a = kept_for(handle, b)
        assert all(torch.equal(x, y) for x, y in zip(after_a, fresh_b, strict=True))
        # a budget under which vit.0 drops nothing: the next pass starts at vit.2, deeper than the last carried
        # site of the pass before (vit.0 alone ran under the first budget); it must still start afresh
        handle.set_budget(keep_ratio={"vit.0": 0.5, "vit.2": 0.5})
        kept_for(handle, a)
        handle.set_budget(keep_ratio={"vit.0": 1.0, "vit.2": 0.25})
        late = kept_for(handle, b)
    with ts.apply(model, "flowcut", keep_ratio={"vit.0": 1.0, "vit.2": 0.25}) as handle:
        assert torch.equal(kept_for(handle, b)[-1], late[-1])


@pytest.mark.parametrize("method", ["flowcut", "vflowopt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mask_mode_keeps_what_gather_mode_keeps(family, method):
    model, x = build_tiny(family), make_pixel_values()
    budget = {"vit.0": 0.5, "vit.2": 0.25}
    runs = {}
    for mode in ("gather", "mask"):
        with ts.apply(model, method, keep_ratio=budget, mode=mode) as handle, torch.no_grad():
            model(pixel_values=x)
            runs[mode] = list(handle.last_records)
    for g, m in zip(runs["gather"], runs["mask"], strict=True):
        assert [row.nonzero().squeeze(-1).tolist() for row in m.policy] == g.kept_orig_index.tolist()


# -- end to end: LLaVA's tower ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["flowcut", "vflowopt"])
def test_llava_tower_sites_drop_the_same_patches_from_the_llm(method):
    model, batch = build_tiny_mllm("llava"), make_batch("llava")  # 3 samples, 4 images
    with torch.no_grad():
        reference = model(**batch.inputs()).logits
    with ts.apply(model, method, keep_ratio=1.0), torch.no_grad():
        assert torch.equal(model(**batch.inputs()).logits, reference)
    with ts.apply(model, method, keep_ratio=0.5) as handle, torch.no_grad():
        assert handle.sites == ["vit.0"]  # the tiny tower's only site (3 blocks, features from the 2nd)
        pruned = model(**batch.inputs()).logits
        assert handle.last_records[-1].kept_visual.tolist() == [8, 8, 16]  # half of each image's 16 patches
        for i in range(batch.size):  # each sample alone: the same logits at its last token
            single = model(**batch.sample(i)).logits
            torch.testing.assert_close(single[0, -1], pruned[i, -1], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(pruned).all() and not torch.allclose(pruned[:, -1], reference[:, -1], atol=1e-4)


# -- VFlowOpt's calibration ---------------------------------------------------------------------------------------
def test_schedule_spends_the_budget_and_never_keeps_more_later():
    # blocks after the sites: 2, 1, 1; budget 0.5 of 4 blocks = 2 token-blocks; at least 1/16 per site
    assert schedule([0.0, 0.0], [2, 1, 1], 0.5, 1 / 16) == [0.5, 0.5, 0.5]
    # the first site keeps all it may (1 - (2 - 2/16) / 2 left... 0.9375), the rest get the minimum
    assert schedule([1.0, 1.0], [2, 1, 1], 0.5, 1 / 16) == [0.9375, 0.0625, 0.0625]
    ratios = schedule([0.3, 0.6], [2, 1, 1], 0.5, 1 / 16)
    assert ratios == sorted(ratios, reverse=True)
    assert math.isclose(2 * ratios[0] + ratios[1] + ratios[2], 2.0)


def test_calibrate_chooses_the_candidate_with_the_highest_flow_similarity():
    model = build_tiny("vit")
    batches = [make_pixel_values(seed=11), {"pixel_values": make_pixel_values(seed=12), "label": torch.zeros(3)}]
    with torch.no_grad():
        reference_logits = model(pixel_values=batches[0]).logits
    history: list = []
    fitted = calibrate(model, batches, 0.5, sites=["vit.2", "vit.0"], trials=8, initial_trials=4, history=history)

    assert len(history) == 8 and fitted.sites == ["vit.0", "vit.2"]
    objectives = [h["objective"] for h in history]
    best = history[objectives.index(max(objectives))]
    assert fitted.global_threshold == best["global_threshold"] and fitted.keep_ratios == best["keep_ratios"]
    assert fitted.alpha == best["alpha"] and all(-1.0 <= h["alpha"] <= 1.0 for h in history)  # VFlowOpt's box
    assert len({round(o, 9) for o in objectives}) > 1, "the candidates differ in the objective"
    # the first candidate is the starting point: threshold 7, alpha 0 and the schedule's midpoints
    start = history[0]
    assert math.isclose(start["global_threshold"], 7.0) and start["alpha"] == 0.0
    if max(objectives) > objectives[0]:
        assert (fitted.global_threshold, fitted.keep_ratios) != (start["global_threshold"], start["keep_ratios"])
    # the budget: blocks 1-2 run on the ratio of vit.0, block 3 on that of vit.2, on average 0.5
    r0, r2 = fitted.keep_ratios["vit.0"], fitted.keep_ratios["vit.2"]
    assert r0 >= r2 and math.isclose((2 * r0 + r2) / 3, 0.5)

    # the objective is what flow_similarity documents: cosine of the head's input, pruned vs unpruned, averaged
    assert math.isclose(flow_similarity(model, fitted, batches), max(objectives), rel_tol=1e-6)
    features = {}
    hook = model.classifier.register_forward_pre_hook(lambda m, args: features.setdefault("x", []).append(args[0]))
    try:
        with torch.no_grad():
            for pixels in (batches[0], batches[1]["pixel_values"]):
                model(pixel_values=pixels)
            with ts.apply(model, VFlowOptMethod(fitted), keep_ratio=fitted.keep_ratios):
                for pixels in (batches[0], batches[1]["pixel_values"]):
                    model(pixel_values=pixels)
    finally:
        hook.remove()
    unpruned, pruned = torch.cat(features["x"][:2]), torch.cat(features["x"][2:])
    by_hand = torch.nn.functional.cosine_similarity(pruned, unpruned, dim=-1).mean()
    assert math.isclose(float(by_hand), max(objectives), rel_tol=1e-5)

    # repeatable, and the model is left as it was
    again = calibrate(model, batches, 0.5, sites=["vit.0", "vit.2"], trials=8, initial_trials=4)
    assert again == fitted
    # alpha_range=(a, a) fixes alpha: (0, 0) searches the threshold and ratios only, pixels unread
    fixed: list = []
    config = calibrate(model, batches, 0.5, sites=["vit.0", "vit.2"], trials=3, initial_trials=2,
                       alpha_range=(0.0, 0.0), history=fixed)  # fmt: skip
    assert config.alpha == 0.0 and [h["alpha"] for h in fixed] == [0.0, 0.0, 0.0]
    with torch.no_grad():
        assert torch.equal(model(pixel_values=batches[0]).logits, reference_logits)


def test_calibrate_on_llava_fits_the_towers_site():
    model, batch = build_tiny_mllm("llava"), make_batch("llava")
    inputs = dict(batch.inputs(), labels=torch.zeros(3, 1))  # labels are not an input to prune with
    history: list = []
    fitted = calibrate(model, [inputs], 0.5, trials=3, initial_trials=2, history=history)
    assert fitted.sites == ["vit.0"] and fitted.keep_ratios == {"vit.0": 0.5}  # one site: its ratio is the budget
    assert all(-1.0 <= h["objective"] <= 1.0 for h in history)
    with ts.apply(model, VFlowOptMethod(fitted), keep_ratio=fitted.keep_ratios) as handle, torch.no_grad():
        model(**batch.inputs())
        assert handle.last_records[-1].kept_visual.tolist() == [8, 8, 16]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(budget=0.0), "budget"),
        (dict(budget=1.5), "budget"),
        (dict(budget=0.5, trials=0), "trials"),
        (dict(budget=0.5, threshold_range=(5.0, 1.0)), "threshold_range"),
        (dict(budget=0.5, alpha_range=(1.0, -1.0)), "alpha_range"),
        (dict(budget=0.5, alpha_range=(0.0, float("inf"))), "alpha_range"),
        (dict(budget=0.5, sites=["llm.1"]), "vit"),
        (dict(budget=0.5, sites=["vit.3"]), "vit.3"),
    ],
)
def test_calibrate_refuses_bad_arguments_naming_them(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        calibrate(build_tiny("vit"), [make_pixel_values()], **kwargs)
    with pytest.raises(ValueError, match="batches"):
        calibrate(build_tiny("vit"), [], 0.5)
