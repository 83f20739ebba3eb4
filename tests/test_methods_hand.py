"""Each method's rule on a small case worked out by hand below (the layer, the attention row, the normalisation,
what is protected); for the LLM-side methods also the signal the handle hands them, recomputed on a tiny model.

``docs/methods.md`` lists each method's reference and where tokensift differs on purpose.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from tiny_mllm import MLLM_FAMILIES, build_tiny_mllm, image_token_id, make_batch

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.compact import compact_state
from tokensift.reduce import SiteRecord
from tokensift.scorers.cls_attention import ClsAttentionMethod
from tokensift.scorers.d2pruner import D2PrunerConfig, D2PrunerMethod
from tokensift.scorers.dart import DARTConfig, DARTMethod
from tokensift.scorers.divprune import DivPruneMethod, max_min_diverse
from tokensift.scorers.dynamicvit import DynamicViTConfig, DynamicViTMethod
from tokensift.scorers.dyvte import DyVTEConfig, DyVTEMethod
from tokensift.scorers.fastv import FastVMethod
from tokensift.scorers.l2norm import L2NormMethod
from tokensift.scorers.pyramiddrop import PyramidDropMethod
from tokensift.scorers.random import RandomConfig, RandomMethod
from tokensift.scorers.tome import ToMeMethod, bipartite_merge
from tokensift.scorers.visionzip import VisionZipMethod
from tokensift.state import TokenState
from tokensift.trainer.losses import LossWeights, scorer_objective


def make_state(
    hidden,
    num_prefix: int = 1,
    *,
    attention=None,
    keys=None,
    policy=None,
    orig_index=None,
    size=None,
) -> TokenState:
    hidden = torch.as_tensor(hidden, dtype=torch.float32)
    b, n, _ = hidden.shape
    index = torch.arange(n).expand(b, n).clone()
    return TokenState(
        hidden=hidden,
        protected=index < num_prefix,
        orig_index=index if orig_index is None else torch.as_tensor(orig_index),
        size=torch.ones(b, n) if size is None else torch.as_tensor(size, dtype=torch.float32),
        grid=(1, n - num_prefix),
        num_prefix=num_prefix,
        site="vit.1",
        layer=1,
        policy=None if policy is None else torch.as_tensor(policy, dtype=torch.float32),
        attention=None if attention is None else torch.as_tensor(attention, dtype=torch.float32),
        keys=None if keys is None else torch.as_tensor(keys, dtype=torch.float32),
    )


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def select(method, state: TokenState, num_keep: int) -> list[list[int]]:
    """The positions ``method`` keeps in each sample, every sample keeping ``num_keep`` prunable tokens."""
    keep = method.select(state, torch.full((state.hidden.shape[0],), num_keep))
    return kept(keep)


def reduce(method, state: TokenState, num_keep: int) -> TokenState:
    """``state`` compacted by ``method``'s decision, as a vision tower's handle compacts it."""
    decision = method.reduce(state, torch.full((state.hidden.shape[0],), num_keep))
    return compact_state(state, decision, method.name)


def kept(mask: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().squeeze(1).tolist() for row in mask]


# -- l2norm -----------------------------------------------------------------------------------------------

# norms:        [CLS]=0     3         1         5         sqrt 2
L2_SAMPLE_0 = [[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [3.0, 4.0], [1.0, 1.0]]
# norms:        [CLS]=0     0.1       6         1         2
L2_SAMPLE_1 = [[0.0, 0.0], [0.1, 0.0], [0.0, 6.0], [1.0, 0.0], [0.0, -2.0]]


def test_l2norm_keeps_largest_norms_and_cls():
    state = make_state([L2_SAMPLE_0, L2_SAMPLE_1])
    method = L2NormMethod()
    torch.testing.assert_close(method.score(state)[0], torch.tensor([0.0, 3.0, 1.0, 5.0, math.sqrt(2)]))
    assert select(method, state, 2) == [[0, 1, 3], [0, 2, 4]]
    assert select(method, state, 3) == [[0, 1, 3, 4], [0, 2, 3, 4]]
    assert select(method, state, 1) == [[0, 3], [0, 2]]


def test_l2norm_reduce_gathers_every_field():
    orig = [[0, 3, 7, 9, 12], [0, 2, 4, 6, 8]]  # an earlier site already dropped tokens
    size = [[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0]]
    reduced = reduce(L2NormMethod(), make_state([L2_SAMPLE_0, L2_SAMPLE_1], orig_index=orig, size=size), 2)
    assert reduced.orig_index.tolist() == [[0, 3, 9], [0, 4, 8]]
    assert reduced.size.tolist() == [[1.0, 2.0, 4.0], [1.0, 1.0, 1.0]]
    assert reduced.hidden[0].tolist() == [[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]]
    assert reduced.protected.tolist() == [[True, False, False]] * 2


def test_l2norm_mask_policy_respects_earlier_drops():
    method = L2NormMethod()
    assert method.keep_policy(make_state([L2_SAMPLE_0]), torch.tensor([2])).tolist() == [[1.0, 1.0, 0.0, 1.0, 0.0]]
    # token 3 (the largest norm) was dropped at an earlier site: it stays dropped, 4 takes its place
    state = make_state([L2_SAMPLE_0], policy=[[1.0, 1.0, 1.0, 0.0, 1.0]])
    assert method.keep_policy(state, torch.tensor([2])).tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0]]


def test_a_vision_tower_refuses_decisions_keeping_different_counts():
    state = make_state([L2_SAMPLE_0, L2_SAMPLE_1])
    decision = L2NormMethod().reduce(state, torch.tensor([2, 3]))
    assert kept(decision.keep) == [[0, 1, 3], [0, 2, 3, 4]]  # the method itself takes per-sample counts
    with pytest.raises(ValueError, match=r"l2norm at vit\.1 kept \[3, 4\] tokens per sample"):
        compact_state(state, decision, "l2norm at vit.1")


# -- random -----------------------------------------------------------------------------------------------


def _random_state(num_patches: int = 10, batch: int = 1) -> TokenState:
    return make_state(torch.zeros(batch, num_patches + 1, 2))


def test_random_seeded_repeats_and_seeds_differ():
    state = _random_state(16, batch=2)
    a = select(RandomMethod(RandomConfig(seed=7)), state, 4)
    b = select(RandomMethod(RandomConfig(seed=7)), state, 4)
    c = select(RandomMethod(RandomConfig(seed=8)), state, 4)
    assert a == b
    assert a != c
    assert all(row[0] == 0 and len(row) == 5 for row in a)
    assert a[0] != a[1], "samples of a batch draw independently"


def test_random_unseeded_follows_torch_global_seed():
    state = _random_state(16)
    method = RandomMethod(RandomConfig(seed=None))
    torch.manual_seed(3)
    a = select(method, state, 4)
    torch.manual_seed(3)
    assert select(method, state, 4) == a


def test_random_is_uniform_over_seeds():
    num_patches, keep, draws = 10, 3, 2000
    state = _random_state(num_patches)
    counts = torch.zeros(num_patches + 1)
    for seed in range(draws):
        counts[select(RandomMethod(RandomConfig(seed=seed)), state, keep)[0]] += 1
    assert counts[0] == draws  # [CLS] always
    frequency = counts[1:] / draws
    # each patch is kept with probability k/n = 0.3; the standard error over 2000 draws is ~0.01
    assert (frequency - keep / num_patches).abs().max() < 0.05, frequency


# -- cls_attention ----------------------------------------------------------------------------------------


def _cls_attention_tensor() -> torch.Tensor:
    # every non-[CLS] query attends to tokens 1 and 4: scoring by attention *received* would keep those
    others = [0.0, 0.5, 0.0, 0.0, 0.5]
    head_0 = [[0.1, 0.4, 0.1, 0.3, 0.1], others, others, others, others]
    head_1 = [[0.1, 0.0, 0.5, 0.3, 0.1], others, others, others, others]
    return torch.tensor([[head_0, head_1]])  # [B=1, H=2, N=5, N=5]


def test_cls_attention_uses_head_averaged_cls_row():
    state = make_state(torch.zeros(1, 5, 2), attention=_cls_attention_tensor())
    method = ClsAttentionMethod()
    # mean over heads of the [CLS] row: [0.1, 0.2, 0.3, 0.3, 0.1]; head 0 alone would pick 1 and 3
    torch.testing.assert_close(method.score(state), torch.tensor([[0.1, 0.2, 0.3, 0.3, 0.1]]))
    assert select(method, state, 2) == [[0, 2, 3]]
    assert select(method, state, 3) == [[0, 1, 2, 3]]


def test_cls_attention_finds_cls_after_earlier_pruning():
    # the [CLS] token keeps orig index 0; patches carry their original indices
    state = make_state(torch.zeros(1, 5, 2), attention=_cls_attention_tensor(), orig_index=[[0, 2, 5, 6, 11]])
    assert reduce(ClsAttentionMethod(), state, 2).orig_index.tolist() == [[0, 5, 6]]


# no [CLS] (SigLIP): the score is the attention each key receives, averaged over the (live) queries
NO_CLS_ATTENTION = [
    [0.70, 0.10, 0.10, 0.10],
    [0.10, 0.10, 0.70, 0.10],
    [0.25, 0.00, 0.10, 0.65],
    [0.10, 0.00, 0.70, 0.20],
]


def test_cls_attention_without_cls_uses_attention_received():
    state = make_state(torch.zeros(1, 4, 2), num_prefix=0, attention=[[NO_CLS_ATTENTION]])
    method = ClsAttentionMethod()
    # column means: (0.7+0.1+0.25+0.1)/4, (0.1+0.1+0+0)/4, (0.1+0.7+0.1+0.7)/4, (0.1+0.1+0.65+0.2)/4
    torch.testing.assert_close(method.score(state), torch.tensor([[0.2875, 0.05, 0.4, 0.2625]]))
    assert select(method, state, 1) == [[2]]  # query 0's row alone would pick token 0
    assert select(method, state, 2) == [[0, 2]]
    assert select(method, state, 3) == [[0, 2, 3]]


def test_cls_attention_without_cls_ignores_dropped_queries():
    # token 2 was dropped earlier (mask mode): its row no longer counts, and it cannot be kept
    state = make_state(
        torch.zeros(1, 4, 2), num_prefix=0, attention=[[NO_CLS_ATTENTION]], policy=[[1.0, 1.0, 0.0, 1.0]]
    )
    method = ClsAttentionMethod()
    # means over queries 0, 1, 3: (0.7+0.1+0.1)/3, (0.1+0.1+0)/3, (0.1+0.7+0.7)/3, (0.1+0.1+0.2)/3
    torch.testing.assert_close(method.score(state), torch.tensor([[0.3, 0.2 / 3, 0.5, 0.4 / 3]]))
    assert method.keep_policy(state, torch.tensor([2])).tolist() == [[1.0, 0.0, 0.0, 1.0]]


# -- tome -------------------------------------------------------------------------------------------------


def _tome_inputs(t4_metric):
    # positions: A = {0 ([CLS]), 2, 4}, B = {1, 3}
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], t4_metric]])
    hidden = torch.tensor([[[5.0, 5.0, 5.0], [1.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 1.0], [2.0, 2.0, 2.0]]])
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0]])  # token 2 already stands for 3 tokens
    protected = torch.tensor([[True, False, False, False, False]])
    orig_index = torch.tensor([[0, 1, 2, 3, 4]])
    return hidden, metric, size, protected, orig_index


def test_bipartite_merge_one_pair():
    # [CLS]'s metric equals token 1's exactly: were it not protected it would be the best pair.
    # token 2 ~ token 1 (cos 0.995) is the best unprotected pair; token 4 ~ token 3 (cos 0.196) is next.
    hidden, metric, size, protected, orig = _tome_inputs([-1.0, 0.2])
    h, m, s, p, o = bipartite_merge(hidden, metric, size, protected, orig, r=1)
    assert o.tolist() == [[0, 1, 3, 4]]  # the merged token keeps its B anchor's index, order kept
    assert s.tolist() == [[1.0, 4.0, 1.0, 1.0]]
    assert p.tolist() == [[True, False, False, False]]
    # size-weighted: (1 * [1, 0, 0] + 3 * [0, 4, 0]) / 4
    torch.testing.assert_close(h[0, 1], torch.tensor([0.25, 3.0, 0.0]))
    torch.testing.assert_close(h[0, 0], hidden[0, 0])  # [CLS] untouched
    torch.testing.assert_close(h[0, 2:], hidden[0, 3:])
    torch.testing.assert_close(m[0, 1], torch.tensor([1.0, 0.075]))  # the metric merges the same way


def test_bipartite_merge_two_pairs():
    hidden, metric, size, protected, orig = _tome_inputs([-1.0, 0.2])
    h, _, s, _, o = bipartite_merge(hidden, metric, size, protected, orig, r=2)
    assert o.tolist() == [[0, 1, 3]]
    assert s.tolist() == [[1.0, 4.0, 2.0]]
    torch.testing.assert_close(h[0], torch.tensor([[5.0, 5.0, 5.0], [0.25, 3.0, 0.0], [1.0, 1.0, 1.5]]))


def test_bipartite_merge_two_into_one_anchor():
    # token 4 now also matches token 1 best: both A tokens merge into it
    hidden, metric, size, protected, orig = _tome_inputs([1.0, -0.1])
    h, _, s, _, o = bipartite_merge(hidden, metric, size, protected, orig, r=2)
    assert o.tolist() == [[0, 1, 3]]
    assert s.tolist() == [[1.0, 5.0, 1.0]]
    # (1 * [1, 0, 0] + 3 * [0, 4, 0] + 1 * [2, 2, 2]) / 5
    torch.testing.assert_close(h[0, 1], torch.tensor([0.6, 2.8, 0.4]))
    torch.testing.assert_close(h[0, 2], hidden[0, 3])


def test_bipartite_merge_zero_is_identity():
    inputs = _tome_inputs([-1.0, 0.2])
    out = bipartite_merge(*inputs, r=0)
    for a, b in zip(out, (inputs[0], inputs[1], inputs[2], inputs[3], inputs[4]), strict=True):
        assert torch.equal(a, b)


def test_tome_reduce_runs_two_rounds():
    e1, e2, e3, e4 = [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]
    # [CLS], then pairs (1, 2), (3, 4), (5, 6), (7, 8) share a direction; e1~e2 and e3~e4 (cos 0.707)
    keys = torch.tensor([[e1, e1, e1, e2, e2, e3, e3, e4, e4]])
    hidden = torch.arange(9 * 2, dtype=torch.float32).view(1, 9, 2)
    state = make_state(hidden, keys=keys)
    # remove 6 of 8 patches: round 1 merges all 4 A patches (2->1, 4->3, 6->5, 8->7), leaving
    # [CLS, 1, 3, 5, 7]; round 2 has A = {[CLS], 3, 7}, B = {1, 5}: 3->1 and 7->5
    decision = ToMeMethod().reduce(state, torch.tensor([2]))
    assert kept(decision.keep) == [[0, 1, 5]]  # the survivors stay at their B anchors' positions
    reduced = compact_state(state, decision, "tome")
    assert reduced.orig_index.tolist() == [[0, 1, 5]]
    assert reduced.size.tolist() == [[1.0, 4.0, 4.0]]
    assert reduced.protected.tolist() == [[True, False, False]]
    expected = torch.stack([hidden[0, 0], hidden[0, 1:5].mean(0), hidden[0, 5:9].mean(0)])
    torch.testing.assert_close(reduced.hidden[0], expected)
    assert reduced.keys is None and reduced.attention is None


def test_tome_decision_is_over_the_states_current_positions():
    # an earlier site left original tokens 0, 2, 3, 5, 7: the decision names positions, the survivors keep theirs
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]]])
    hidden = torch.arange(5 * 2, dtype=torch.float32).view(1, 5, 2)
    state = make_state(hidden, keys=keys, orig_index=[[0, 2, 3, 5, 7]], size=[[1.0, 2.0, 1.0, 3.0, 1.0]])
    # A = {[CLS], 3 (pos 2), 7 (pos 4)}, B = {2 (pos 1), 5 (pos 3)}: pos 2 ~ pos 3 (cos 1) merges
    decision = ToMeMethod().reduce(state, torch.tensor([3]))
    assert kept(decision.keep) == [[0, 1, 3, 4]]
    assert decision.size[decision.keep].tolist() == [1.0, 2.0, 4.0, 1.0]
    torch.testing.assert_close(decision.hidden[0, 3], (hidden[0, 2] + 3 * hidden[0, 3]) / 4)
    reduced = compact_state(state, decision, "tome")
    assert reduced.orig_index.tolist() == [[0, 2, 5, 7]]


def test_tome_has_no_mask_form():
    state = make_state(torch.zeros(1, 5, 2), keys=torch.zeros(1, 5, 2))
    with pytest.raises(ValueError, match="gather"):
        ToMeMethod().keep_policy(state, torch.tensor([2]))


# -- divprune ---------------------------------------------------------------------------------------------

# angles (degrees) of unit vectors; cosine distance grows with the angle between two of them
DIV_ANGLES = [0.0, 10.0, 100.0, 200.0, 205.0]


def test_max_min_diverse_greedy_order():
    features = torch.tensor([[unit(a) for a in DIV_ANGLES]])
    candidates = torch.ones(1, 5, dtype=torch.bool)
    # nearest-neighbour angles: 10, 10, 90, 5, 5 -> first pick token 2 (100 deg).
    # distance to {100}: 100, 90, -, 100, 105 -> token 4 (205 deg).
    # to {100, 205}: min(100, 155)=100, min(90, 165)=90, -, min(100, 5)=5 -> token 0.
    # to {100, 205, 0}: -, 10, -, 5 -> token 1.
    assert max_min_diverse(features, candidates, 4).tolist() == [[2, 4, 0, 1]]
    assert sorted(max_min_diverse(features, candidates, 3)[0].tolist()) == [0, 2, 4]


def test_max_min_diverse_ignores_non_candidates():
    features = torch.tensor([[unit(a) for a in DIV_ANGLES]])
    candidates = torch.tensor([[True, True, True, False, True]])  # 200 deg is not in play
    # nearest among candidates: 10, 10, 90, -, 105 -> token 4 first (its close neighbour is gone).
    # to {205}: 155, 165, 105 -> token 1; to {205, 10}: min(155, 10)=10, min(105, 90)=90 -> token 2.
    assert max_min_diverse(features, candidates, 3).tolist() == [[4, 1, 2]]


def test_divprune_select_keeps_cls_and_diverse_patches():
    cls = unit(150.0)  # protected: kept, and no part of the diversity search
    state = make_state([[cls, *[unit(a) for a in DIV_ANGLES]]])
    assert select(DivPruneMethod(), state, 3) == [[0, 1, 3, 5]]
    assert select(DivPruneMethod(), state, 1) == [[0, 3]]


def test_divprune_per_sample_counts_take_each_samples_first_greedy_picks():
    cls = unit(150.0)
    features = [cls, *[unit(a) for a in DIV_ANGLES]]
    state = make_state([features, features])
    # the greedy order is 2, 4, 0, 1 over the patches (positions 3, 5, 1, 2): sample 0 keeps 3, sample 1 keeps 1
    assert kept(DivPruneMethod().select(state, torch.tensor([3, 1]))) == [[0, 1, 3, 5], [0, 3]]


# -- multimodal LLM sites: a sample's visual tokens, then its text (protected) -----------------------------


def llm_state(hidden, num_text: int, site: str = "llm.2", **fields) -> TokenState:
    """One image's visual tokens followed by ``num_text`` text tokens (the question; the last one predicts next)."""
    hidden = torch.as_tensor(hidden, dtype=torch.float32)
    b, n, _ = hidden.shape
    index = torch.arange(n).expand(b, n).clone()
    protected = index >= n - num_text
    return TokenState(
        hidden=hidden,
        protected=protected,
        orig_index=index,
        size=torch.ones(b, n),
        grid=(0, 0),
        num_prefix=0,
        site=site,
        layer=int(site.split(".")[1]) if site.startswith("llm.") else -1,
        valid=torch.ones(b, n, dtype=torch.bool),
        kind=(~protected).long(),
        image_id=torch.where(protected, -1, 0),
        **fields,
    )


# -- fastv ------------------------------------------------------------------------------------------------


def test_fastv_ranks_by_the_last_text_tokens_row_averaged_over_heads():
    # tokens 0..3 visual, 4..5 text; state.attention is layer K-1's map [B, H, N, N]
    attention = torch.zeros(1, 2, 6, 6)
    attention[0, :, :5] = torch.tensor([0.9, 0.0, 0.0, 0.0, 0.1, 0.0])  # earlier rows all favour token 0
    attention[0, 0, 5] = torch.tensor([0.0, 0.5, 0.1, 0.3, 0.05, 0.05])  # the last text token's row, head 0
    attention[0, 1, 5] = torch.tensor([0.0, 0.02, 0.44, 0.3, 0.14, 0.1])  # head 1
    state = llm_state(torch.zeros(1, 6, 2), num_text=2, attention=attention)
    # mean over heads of row 5: [0, 0.26, 0.27, 0.3, ...]; head 0 alone would pick 1 and 3, row 0 token 0
    keep = FastVMethod().select(state, torch.tensor([2]))
    assert kept(keep) == [[2, 3, 4, 5]]
    keep = FastVMethod().select(state, torch.tensor([1]))
    assert kept(keep) == [[3, 4, 5]]  # the text is always kept


# -- pyramiddrop ------------------------------------------------------------------------------------------


def test_pyramiddrop_ranks_by_the_query_row_of_layer_k_itself_averaged_over_heads():
    # state.query_attention [B, H, N]: the last text token's row in layer K; state.attention (layer K-1) ignored
    query_attention = torch.tensor([[[0.1, 0.5, 0.1, 0.1, 0.2], [0.3, 0.0, 0.4, 0.1, 0.2]]])
    layer_before = torch.zeros(1, 2, 5, 5)
    layer_before[..., 3] = 1.0  # FastV's signal would keep token 3
    state = llm_state(torch.zeros(1, 5, 2), num_text=1, query_attention=query_attention, attention=layer_before)
    # head means: [0.2, 0.25, 0.25, 0.1]: keep 2 -> tokens 1 and 2
    assert kept(PyramidDropMethod().select(state, torch.tensor([2]))) == [[1, 2, 4]]
    assert kept(PyramidDropMethod().select(state, torch.tensor([3]))) == [[0, 1, 2, 4]]


class _Probe:
    """Records the TokenState a method is handed at its site."""

    def __init__(self, cls):
        probe = self

        class Probed(cls):
            def select(self, state, num_keep):
                probe.state = state
                return super().select(state, num_keep)

        self.method = Probed()
        self.state = None


def _layer_inputs(model, inputs, layers):
    """Unpruned forward: (hidden states, rotary (cos, sin)) entering each decoder layer in ``layers``."""
    adapter = adapt(model)
    seen, hooks = {}, []
    for k in layers:

        def hook(module, args, kwargs, k=k):
            seen[k] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

        hooks.append(adapter.layers[k].register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return adapter, seen


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_pyramiddrop_reads_layer_k_own_attention_not_layer_k_minus_1(family):
    """PyramidDrop's pdrop_rank_drop: layer K's input_layernorm, q_proj, k_proj and RoPE on the input of layer K,
    the last instruction token's softmax row (causal, padding masked; grouped-query heads shared)."""
    model, batch = build_tiny_mllm(family), make_batch(family)
    inputs = batch.inputs()  # left-padded, samples of different layouts
    k = 2
    adapter, seen = _layer_inputs(model, inputs, [k])
    hidden, (cos, sin) = seen[k]
    layer = adapter.layers[k]
    attention = layer.self_attn
    rope = sys.modules[type(attention).__module__].apply_rotary_pos_emb  # transformers' own
    b, n, _ = hidden.shape
    d = attention.head_dim
    with torch.no_grad():
        normed = layer.input_layernorm(hidden)
        q = attention.q_proj(normed).view(b, n, -1, d).transpose(1, 2)
        key = attention.k_proj(normed).view(b, n, -1, d).transpose(1, 2)
        q, key = rope(q, key, cos, sin)
        key = key.repeat_interleave(q.shape[1] // key.shape[1], dim=1)
        logits = (q[:, :, -1:] @ key.transpose(-1, -2)).squeeze(2) * d**-0.5  # the last token's row
    padding = inputs["attention_mask"] == 0
    expected = logits.masked_fill(padding[:, None], float("-inf")).softmax(-1)  # causal: the last row sees all

    probe = _Probe(PyramidDropMethod)
    with ts.apply(model, probe.method, keep_ratio=0.5, sites=[f"llm.{k}"]) as handle, torch.no_grad():
        model(**inputs)
        kept_index = handle.kept_orig_index
    torch.testing.assert_close(probe.state.query_attention, expected, atol=1e-5, rtol=1e-4)

    # FastV's signal, layer K-1's attention, ranks differently on this model
    with torch.no_grad():
        model.set_attn_implementation("eager")
        before = model(**inputs, output_attentions=True).attentions[k - 1][:, :, -1].mean(1)
        model.set_attn_implementation("sdpa")
    image = inputs["input_ids"] == image_token_id(family)
    differs = []
    for row in range(b):
        visual = image[row].nonzero().squeeze(1)
        count = sum(1 for i in kept_index[row].tolist() if i >= 0 and bool(image[row, i]))
        ours = visual[expected[row].mean(0)[visual].topk(count).indices].sort().values.tolist()
        assert ours == [i for i in kept_index[row].tolist() if i >= 0 and bool(image[row, i])]
        differs.append(ours != visual[before[row, visual].topk(count).indices].sort().values.tolist())
    assert any(differs), "layer K's row and layer K-1's row should rank differently on this model"


# -- dart -------------------------------------------------------------------------------------------------


def test_dart_measures_similarity_after_the_final_norm():
    # visual 0..3, text 4 (the only text pivot); keys: token 1 has the largest visual L1 norm (image pivot)
    hidden = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.2], [0.0, 0.0]]])
    keys = torch.tensor([[[1.0], [5.0], [1.0], [1.0], [1.0]]])
    weight = torch.tensor([1.0, 10.0])  # a non-uniform RMSNorm weight stretches the second channel
    normed = hidden * weight  # the norm's per-token scale does not change a cosine, its weight does
    method = DARTMethod(DARTConfig(image_pivots=1, text_pivots=0))
    # pivot 1 = (1, 1); budget 2 = the pivot + 1 token least like it. raw: cos(0)=0.71, cos(2)=0.71, cos(3)=0.83
    # -> a tie between 0 and 2 (0 first); normed: 0=(1,0) cos 0.10, 2=(0,10) cos 0.995, 3=(1,2) cos 0.95 -> token 0
    state = llm_state(hidden, num_text=1, keys=keys, normed_hidden=normed)
    assert kept(method.select(state, torch.tensor([2]))) == [[0, 1, 4]]
    # with the weight on the first channel the least similar is token 2 instead
    state = llm_state(hidden, num_text=1, keys=keys, normed_hidden=hidden * torch.tensor([10.0, 1.0]))
    assert kept(method.select(state, torch.tensor([2]))) == [[1, 2, 4]]


def test_dart_pivots_claim_equal_shares_in_sequence_order():
    # visual 0..5, text 6, 7; image pivot 3 (largest key L1), text pivot 7; budget 5 = pivot + 2 shares of 2
    hidden = torch.tensor(
        [[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.9, 0.1], [0.0, -1.0], [0.7, 0.7], [1.0, 1.0], [1.0, -1.0]]]
    )
    keys = torch.tensor([[[1.0], [1.0], [1.0], [9.0], [1.0], [1.0], [1.0], [3.0]]])
    state = llm_state(hidden, num_text=2, keys=keys, normed_hidden=hidden)
    keep = DARTMethod(DARTConfig(image_pivots=1, text_pivots=1)).select(state, torch.tensor([5]))
    # pivot 3 (0.9, 0.1) first: least similar free tokens 2 (cos -0.99) and 4 (-0.11); then pivot 7 (1, -1):
    # among 0, 1, 5: cos 0.71, -0.71, 0 -> 1 and 5
    assert kept(keep) == [[1, 2, 3, 4, 5, 6, 7]]


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_dart_reads_the_final_norm_of_layer_k_input_and_layer_k_minus_1_rotated_keys(family):
    """DART: ``self.norm(layer_outputs[0])`` of layer K-1 and that layer's key states after RoPE (M-RoPE)."""
    model, batch = build_tiny_mllm(family), make_batch(family)
    lm = adapt(model).language_model
    with torch.no_grad():  # a trained LM's final norm is far from a unit weight
        lm.norm.weight.copy_(torch.linspace(0.1, 3.0, lm.norm.weight.numel()))
    inputs = batch.inputs()
    k = 2
    adapter, seen = _layer_inputs(model, inputs, [k - 1, k])
    before, (cos, sin) = seen[k - 1]
    attention = adapter.layers[k - 1].self_attn
    rope = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    b, n, _ = before.shape
    with torch.no_grad():
        key = attention.k_proj(adapter.layers[k - 1].input_layernorm(before)).view(b, n, -1, attention.head_dim)
        _, key = rope(key.transpose(1, 2), key.transpose(1, 2), cos, sin)
        expected_keys = key.transpose(1, 2).flatten(2)
        expected_normed = lm.norm(seen[k][0])
    probe = _Probe(DARTMethod)
    with ts.apply(model, probe.method, keep_ratio=0.5, sites=[f"llm.{k}"]), torch.no_grad():
        model(**inputs)
    torch.testing.assert_close(probe.state.normed_hidden, expected_normed, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probe.state.keys, expected_keys, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(probe.state.normed_hidden, probe.state.hidden)


# -- d2pruner ---------------------------------------------------------------------------------------------


def test_d2pruner_debiased_pivots_then_an_independent_set_on_the_grid():
    # six visual tokens in one row of an image (coords (0, 0, w)), one text token; one-hot hidden: no semantic edges
    content = torch.tensor([1.0, 3.0, 0.0, 0.0, 3.0, 1.0])  # no linear trend: sum((w - 2.5) * content) = 0
    row = torch.ones(7)
    row[:6] = torch.exp(content + 0.5 * torch.arange(6))  # + a recency trend debiasing removes
    attention = torch.zeros(1, 1, 7, 7)
    attention[0, 0, 6] = row  # the last text token's row at layer K-1
    coords = torch.tensor([[[0, 0, w] for w in range(6)] + [[0, 0, 0]]])
    hidden = torch.eye(7)[None]
    state = llm_state(hidden, num_text=1, attention=attention, coords=coords)
    method = D2PrunerMethod(D2PrunerConfig(pivot_fraction=0.5, spatial_radius=1, similarity_threshold=0.9))
    # debiased order 1, 4, 0, 5, 2, 3 (raw attention would rank 4, 5, 1, ...); budget 3: round(1.5) = 2 pivots,
    # 1 and 4, which block their neighbours 0, 2, 3, 5; the next round takes the best left, 0
    assert kept(method.select(state, torch.tensor([3]))) == [[0, 1, 4, 6]]
    # no pivots: the independent set walks the order: 1 (blocks 0, 2), 4 (blocks 3, 5), then a second round: 0
    method = D2PrunerMethod(D2PrunerConfig(pivot_fraction=0.0, spatial_radius=1, similarity_threshold=0.9))
    assert kept(method.select(state, torch.tensor([2]))) == [[1, 4, 6]]


# -- visionzip --------------------------------------------------------------------------------------------


def test_visionzip_dominant_by_tower_attention_contextual_mean_includes_the_anchor():
    # visual 0..5, text 6; tower attention ranks 2 > 5 > the rest
    hidden = torch.tensor([[[0.0], [3.0], [6.0], [9.0], [12.0], [15.0], [100.0]]])
    importance = torch.tensor([[0.1, 0.1, 0.9, 0.1, 0.1, 0.5, 0.0]])
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.9, 0.0], [1.0, -0.1], [0.0, 1.0], [0.0, 0.0]]])
    state = llm_state(hidden, num_text=1, site="pre_llm", tower_attention=importance, tower_keys=keys)
    method = VisionZipMethod(VisionZipMethod.config_class(contextual_fraction=1 / 3))
    decision = method.reduce(state, torch.tensor([3]))
    keep, merged = decision.keep, decision.hidden
    # budget 3: round(3 / 3) = 1 contextual, 2 dominant (2, 5); the rest [0, 1, 3, 4]: anchor every 4th -> 0;
    # 1, 3, 4 all join it: its group mean (0 + 3 + 9 + 12) / 4 = 6 (VisionZip: 0 + (3 + 9 + 12) / 3 = 8)
    assert kept(keep) == [[0, 2, 5, 6]]
    assert merged[0, 0, 0].item() == pytest.approx(6.0)
    assert torch.equal(merged[0, [2, 5, 6]], hidden[0, [2, 5, 6]])


# -- dynamicvit: the objective ----------------------------------------------------------------------------


def _records(policy, protected, fraction, target, exact):
    return [SiteRecord("vit.1", None, torch.tensor(policy), torch.tensor(fraction), target, None, protected, exact)]


def test_dynamicvit_objective_distils_patch_tokens_only_and_budget_only_where_the_count_varies():
    logits = torch.tensor([[2.0, 0.0]])
    labels = torch.tensor([0])
    tokens = torch.tensor([[[10.0], [1.0], [2.0]]])  # [CLS], patch 1 (kept), patch 2 (dropped)
    teacher = torch.zeros(1, 3, 1)
    protected = torch.tensor([[True, False, False]])
    policy = [[1.0, 1.0, 0.0]]
    task = F.cross_entropy(logits, labels)
    # topk: exactly the budget's count, so no budget term (and no logged key); tokens: patch 1 alone, (1 - 0)^2 = 1
    # (counting [CLS] would give (100 + 1) / 2)
    terms = scorer_objective(
        logits, labels, logits, tokens, teacher, _records(policy, protected, [0.5], 0.25, True), LossWeights()
    )
    assert set(terms) == {"loss", "task", "distill", "tokens"}
    assert terms["tokens"].item() == pytest.approx(1.0)
    assert terms["distill"].item() == pytest.approx(0.0, abs=1e-7)
    assert terms["loss"].item() == pytest.approx(task.item() + 0.5 * 1.0)
    # threshold: a variable count, (0.5 - 0.25)^2 = 0.0625 weighted 2
    terms = scorer_objective(
        logits, labels, logits, tokens, teacher, _records(policy, protected, [0.5], 0.25, False), LossWeights()
    )
    assert terms["budget"].item() == pytest.approx(0.0625)
    assert terms["loss"].item() == pytest.approx(task.item() + 0.5 * 1.0 + 2 * 0.0625)


@pytest.mark.parametrize("selection", ["topk", "threshold"])
def test_dynamicvit_budget_term_only_for_threshold_selection(tiny_vit, pixel_values, selection):
    method = DynamicViTMethod.for_backbone(adapt(tiny_vit), DynamicViTConfig(selection=selection))
    torch.manual_seed(0)
    with ts.apply(tiny_vit, method, keep_ratio=0.3, mode="mask") as handle:
        method.train()
        logits = tiny_vit(pixel_values=pixel_values).logits
        records = handle.last_records
    assert all(r.exact_count == (selection == "topk") for r in records)
    tokens = torch.zeros(*records[-1].policy.shape, 2)
    terms = scorer_objective(logits, logits.argmax(-1), logits.detach(), tokens, tokens, records, LossWeights())
    if selection == "topk":
        assert "budget" not in terms
        return
    terms["budget"].backward()  # threshold: the kept fraction moves with the logits, so the term trains the scorer
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())


def test_dynamicvit_gumbel_topk_keeps_each_samples_own_count():
    config = DynamicViTConfig(hidden_size=8, sites=["vit.1"], budget_conditioned=False)
    method = DynamicViTMethod(config).train()
    torch.manual_seed(0)
    state = make_state(torch.randn(3, 9, 8))
    state.sample_index = torch.arange(3)  # the same noise in both calls
    policy = method.keep_policy(state, torch.tensor([2, 5, 8]))
    assert policy[:, 0].tolist() == [1.0, 1.0, 1.0]  # [CLS]
    assert policy[:, 1:].sum(1).tolist() == [2.0, 5.0, 8.0]
    same = method.keep_policy(state, torch.tensor([5, 5, 5]))
    assert torch.equal(same[1], policy[1]), "a sample's decision depends on its own count only"


# -- dyvte ------------------------------------------------------------------------------------------------


def test_dyvte_exits_a_sample_when_its_exit_logit_reaches_the_threshold_log_odds():
    config = DyVTEConfig(
        hidden_size=2, num_layers=4, sites=["llm.2"], router_width=2, output="logit", normalize_inputs=False
    )
    method = DyVTEMethod(config)
    first, second = method.routers[0].net[0], method.routers[0].net[2]
    with torch.no_grad():  # exit logit = GELU(text_last[0]) - 1, reading [text_mean ⊕ text_last]
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, 2] = 1.0
        second.weight.copy_(torch.tensor([[1.0, 0.0]]))
        second.bias.fill_(-1.0)
    text_last = torch.tensor([[3.0, 0.0], [0.0, 0.0]])  # logits GELU(3) - 1 = 1.996, GELU(0) - 1 = -1
    state = llm_state(torch.zeros(2, 4, 2), num_text=2, text_mean=torch.zeros(2, 2), text_last=text_last)
    torch.testing.assert_close(method.score(state), torch.tensor([3.0 * 0.99865 - 1.0, -1.0]), atol=1e-4, rtol=0)
    everything = torch.tensor([4, 4])
    method.threshold = 0.5  # log-odds 0: sample 0 exits (only its text stays), sample 1 keeps all
    assert kept(method.select(state, everything)) == [[2, 3], [0, 1, 2, 3]]
    method.threshold = 0.9  # log-odds 2.197 > 1.996: nobody exits
    assert kept(method.select(state, everything)) == [[0, 1, 2, 3], [0, 1, 2, 3]]
    method.threshold = 0.25  # log-odds -1.099 < -1: both exit
    assert kept(method.select(state, everything)) == [[2, 3], [2, 3]]
