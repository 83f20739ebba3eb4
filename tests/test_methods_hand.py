"""Each training-free method on a hand-made TokenState whose answer is worked out by hand below."""

from __future__ import annotations

import math

import pytest
import torch

from tokensift.scorers.cls_attention import ClsAttentionMethod
from tokensift.scorers.divprune import DivPruneMethod, max_min_diverse
from tokensift.scorers.l2norm import L2NormMethod
from tokensift.scorers.random import RandomConfig, RandomMethod
from tokensift.scorers.tome import ToMeMethod, bipartite_merge
from tokensift.state import TokenState


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


# -- l2norm -----------------------------------------------------------------------------------------------

# norms:        [CLS]=0     3         1         5         sqrt 2
L2_SAMPLE_0 = [[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [3.0, 4.0], [1.0, 1.0]]
# norms:        [CLS]=0     0.1       6         1         2
L2_SAMPLE_1 = [[0.0, 0.0], [0.1, 0.0], [0.0, 6.0], [1.0, 0.0], [0.0, -2.0]]


def test_l2norm_keeps_largest_norms_and_cls():
    state = make_state([L2_SAMPLE_0, L2_SAMPLE_1])
    method = L2NormMethod()
    torch.testing.assert_close(method.score(state)[0], torch.tensor([0.0, 3.0, 1.0, 5.0, math.sqrt(2)]))
    assert method.select(state, 2).tolist() == [[0, 1, 3], [0, 2, 4]]
    assert method.select(state, 3).tolist() == [[0, 1, 3, 4], [0, 2, 3, 4]]
    assert method.select(state, 1).tolist() == [[0, 3], [0, 2]]


def test_l2norm_reduce_gathers_every_field():
    orig = [[0, 3, 7, 9, 12], [0, 2, 4, 6, 8]]  # an earlier site already dropped tokens
    size = [[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0]]
    reduced = L2NormMethod().reduce(make_state([L2_SAMPLE_0, L2_SAMPLE_1], orig_index=orig, size=size), 2)
    assert reduced.orig_index.tolist() == [[0, 3, 9], [0, 4, 8]]
    assert reduced.size.tolist() == [[1.0, 2.0, 4.0], [1.0, 1.0, 1.0]]
    assert reduced.hidden[0].tolist() == [[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]]
    assert reduced.protected.tolist() == [[True, False, False]] * 2


def test_l2norm_mask_policy_respects_earlier_drops():
    method = L2NormMethod()
    assert method.keep_policy(make_state([L2_SAMPLE_0]), 2).tolist() == [[1.0, 1.0, 0.0, 1.0, 0.0]]
    # token 3 (the largest norm) was dropped at an earlier site: it stays dropped, 4 takes its place
    state = make_state([L2_SAMPLE_0], policy=[[1.0, 1.0, 1.0, 0.0, 1.0]])
    assert method.keep_policy(state, 2).tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0]]


# -- random -----------------------------------------------------------------------------------------------


def _random_state(num_patches: int = 10, batch: int = 1) -> TokenState:
    return make_state(torch.zeros(batch, num_patches + 1, 2))


def test_random_seeded_repeats_and_seeds_differ():
    state = _random_state(16, batch=2)
    a = RandomMethod(RandomConfig(seed=7)).select(state, 4)
    b = RandomMethod(RandomConfig(seed=7)).select(state, 4)
    c = RandomMethod(RandomConfig(seed=8)).select(state, 4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a[:, 0] == 0).all() and (a.diff(dim=1) > 0).all()
    assert not torch.equal(a[0], a[1]), "samples of a batch draw independently"


def test_random_unseeded_follows_torch_global_seed():
    state = _random_state(16)
    method = RandomMethod(RandomConfig(seed=None))
    torch.manual_seed(3)
    a = method.select(state, 4)
    torch.manual_seed(3)
    assert torch.equal(method.select(state, 4), a)


def test_random_is_uniform_over_seeds():
    num_patches, keep, draws = 10, 3, 2000
    state = _random_state(num_patches)
    counts = torch.zeros(num_patches + 1)
    for seed in range(draws):
        kept = RandomMethod(RandomConfig(seed=seed)).select(state, keep)[0]
        counts[kept] += 1
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
    assert method.select(state, 2).tolist() == [[0, 2, 3]]
    assert method.select(state, 3).tolist() == [[0, 1, 2, 3]]


def test_cls_attention_finds_cls_after_earlier_pruning():
    # the [CLS] token keeps orig index 0; patches carry their original indices
    state = make_state(torch.zeros(1, 5, 2), attention=_cls_attention_tensor(), orig_index=[[0, 2, 5, 6, 11]])
    assert ClsAttentionMethod().reduce(state, 2).orig_index.tolist() == [[0, 5, 6]]


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
    assert method.select(state, 1).tolist() == [[2]]  # query 0's row alone would pick token 0
    assert method.select(state, 2).tolist() == [[0, 2]]
    assert method.select(state, 3).tolist() == [[0, 2, 3]]


def test_cls_attention_without_cls_ignores_dropped_queries():
    # token 2 was dropped earlier (mask mode): its row no longer counts, and it cannot be kept
    state = make_state(
        torch.zeros(1, 4, 2), num_prefix=0, attention=[[NO_CLS_ATTENTION]], policy=[[1.0, 1.0, 0.0, 1.0]]
    )
    method = ClsAttentionMethod()
    # means over queries 0, 1, 3: (0.7+0.1+0.1)/3, (0.1+0.1+0)/3, (0.1+0.7+0.7)/3, (0.1+0.1+0.2)/3
    torch.testing.assert_close(method.score(state), torch.tensor([[0.3, 0.2 / 3, 0.5, 0.4 / 3]]))
    assert method.keep_policy(state, 2).tolist() == [[1.0, 0.0, 0.0, 1.0]]


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
    reduced = ToMeMethod().reduce(state, 2)
    assert reduced.orig_index.tolist() == [[0, 1, 5]]
    assert reduced.size.tolist() == [[1.0, 4.0, 4.0]]
    assert reduced.protected.tolist() == [[True, False, False]]
    expected = torch.stack([hidden[0, 0], hidden[0, 1:5].mean(0), hidden[0, 5:9].mean(0)])
    torch.testing.assert_close(reduced.hidden[0], expected)
    assert reduced.keys is None and reduced.attention is None


def test_tome_has_no_mask_form():
    state = make_state(torch.zeros(1, 5, 2), keys=torch.zeros(1, 5, 2))
    with pytest.raises(ValueError, match="gather"):
        ToMeMethod().keep_policy(state, 2)


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
    assert DivPruneMethod().select(state, 3).tolist() == [[0, 1, 3, 5]]
    assert DivPruneMethod().select(state, 1).tolist() == [[0, 3]]
