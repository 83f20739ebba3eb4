"""The analytic FLOPs model against arithmetic written out by hand on a tiny ViT."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

import tokensift as ts
from tests.tiny_mllm import build_tiny_mllm
from tokensift.backbones import adapt
from tokensift.bench.oracle import OracleMethod
from tokensift.flops import (
    SiteShape,
    backbone_flops,
    block_flops,
    last_prefill_flops,
    mllm_prefill_flops,
    pruned_flops,
    scorer_flops,
    site_flops,
    tokens_per_layer,
)
from tokensift.scorers import build_method
from tokensift.scorers.dynamicvit import DynamicViTConfig, DynamicViTMethod

# d = 8, MLP width m = 16, 3 blocks, an 8x8 image in 4x4 patches: P = 4 patches + 1 [CLS] = 5 tokens,
# 3 channels, 2 classes.
D, M, P, C, PATCH, LABELS = 8, 16, 4, 3, 4, 2


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=D,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=M,
        image_size=8,
        patch_size=PATCH,
        num_channels=C,
        num_labels=LABELS,
    )
    return adapt(ViTForImageClassification(config).eval())


def test_block_flops_by_hand():
    # n = 5: projections 8·5·8² = 2560, attention 4·5²·8 = 800, MLP 4·5·8·16 = 2560
    assert block_flops(5, D, M) == 2560 + 800 + 2560 == 5920
    # n = 3: 8·3·64 = 1536, 4·9·8 = 288, 4·3·8·16 = 1536
    assert block_flops(3, D, M) == 1536 + 288 + 1536 == 3360
    # n = 4: 8·4·64 = 2048, 4·16·8 = 512, 4·4·8·16 = 2048
    assert block_flops(4, D, M) == 2048 + 512 + 2048 == 4608


EMBED = 2 * P * (C * PATCH * PATCH) * D  # 2·4·48·8 = 3072
HEAD = 2 * D * LABELS  # 32
UNPRUNED = 3 * 5920 + EMBED + HEAD  # 20864


def test_unpruned_by_hand(adapter):
    assert EMBED == 3072 and HEAD == 32 and UNPRUNED == 20864
    assert tokens_per_layer(adapter) == [5, 5, 5]
    assert backbone_flops(adapter, [5, 5, 5]) == UNPRUNED
    result = pruned_flops(adapter, None)
    assert result["total"] == result["unpruned"] == UNPRUNED
    assert result["scorer"] == 0 and result["ratio"] == 1.0


def test_one_site_with_training_free_costs(adapter):
    counts = {"vit.0": 2}  # blocks 1 and 2 see 2 patches + [CLS] = 3 tokens
    assert tokens_per_layer(adapter, counts) == [5, 3, 3]
    backbone = 5920 + 2 * 3360 + EMBED + HEAD
    assert backbone == 15744
    # at vit.0 there are n = 5 tokens of d = 8 (2 heads of 4), v = 4 patches, k = 2 of them kept.
    # The captured attention map (cls_attention; tome's key capture computes it too): QKᵀ 2·5·8·5 = 400, scale
    # and softmax 6·2·5² = 300, the head-averaged keys 5·8 = 40.
    capture = 400 + 300 + 40
    expected_scorer = {
        "l2norm": 2 * 5 * 8,  # squares and sums: 80
        "divprune": 3 * 5 * 8 + 2 * 5 * 5 * 8,  # normalise 120 + similarity matrix 400 = 520
        # one round merges r = 2: normalise keys 3·5·4 = 60, A (3) x B (2) similarity 2·3·4·2 = 48,
        # weighted merge of hidden states and keys 2·5·(8 + 4) = 120
        "tome": capture + 60 + 48 + 120,
        "cls_attention": capture + 2 * 25 + 2 * 25,  # head average H·n² = 50, [CLS] row sum 2·n² = 50
        "random": 0,
    }
    for name, scorer in expected_scorer.items():
        result = pruned_flops(adapter, counts, method=build_method(name))
        assert result["backbone"] == backbone, name
        assert result["scorer"] == scorer, name
        assert result["total"] == backbone + scorer, name
        assert result["ratio"] == pytest.approx((backbone + scorer) / UNPRUNED), name
    assert pruned_flops(adapter, counts, method=OracleMethod())["scorer"] == 0


def test_a_site_that_keeps_everything_costs_nothing(adapter):
    result = pruned_flops(adapter, {"vit.0": P}, method=build_method("divprune"))
    assert result["tokens_per_layer"] == [5, 5, 5]
    assert result["scorer"] == 0 and result["ratio"] == 1.0


def test_learned_scorer_counts_its_linear_layers(adapter):
    method = DynamicViTMethod(DynamicViTConfig(hidden_size=D, sites=["vit.0", "vit.1"]))
    # predictor width max(8, int(8·0.5)//4·4) = 8; Linear 8→8, then (8+1 budget input)→4, 4→2, 2→1:
    # 2·(8·8 + 9·4 + 4·2 + 2·1) = 2·110 = 220 FLOPs per token
    per_token = 2 * (8 * 8 + 9 * 4 + 4 * 2 + 2 * 1)
    assert per_token == 220
    # keep_ratio 0.5 over two sites: vit.0 keeps ceil(0.5^(1/2)·4) = 3, vit.1 keeps 0.5·4 = 2
    handle = ts.apply(adapter.model, method, keep_ratio=0.5)
    try:
        assert handle.site_counts() == {"vit.0": 3, "vit.1": 2}
        result = pruned_flops(adapter, handle)
    finally:
        handle.remove()
    assert result["tokens_per_layer"] == [5, 4, 3]
    assert result["backbone"] == 5920 + 4608 + 3360 + EMBED + HEAD == 16992
    # vit.0 sees 5 tokens, vit.1 sees 4 (both sites remove something, so both run)
    assert result["scorer"] == 5 * 220 + 4 * 220 == 1980
    assert result["total"] == 18972
    assert result["ratio"] == pytest.approx(18972 / 20864)
    assert scorer_flops(adapter, method, {"vit.0": 3, "vit.1": 2}) == 1980


def test_handle_at_keep_one_is_unpruned(adapter):
    with ts.apply(adapter.model, "l2norm", keep_ratio=1.0) as handle:
        result = pruned_flops(adapter, handle)
    assert result["total"] == UNPRUNED and result["ratio"] == 1.0


def test_bad_inputs_name_the_problem(adapter):
    with pytest.raises(ValueError, match="tokens_per_layer has 2 entries"):
        backbone_flops(adapter, [5, 5])
    with pytest.raises(TypeError, match="PruningHandle"):
        pruned_flops(adapter, 0.5)


# -- each method's charge on one tiny site, written out ---------------------------------------------------------
# n = 17 tokens of d = 8, attention of H = 2 heads of 4. A vision site: 1 [CLS] + 16 patches, 4 kept.
VIT_SITE = SiteShape("vit.1", tokens=17, prunable=16, keep=4, hidden=8, heads=2, head_dim=4, kv_heads=2)
# QKᵀ 2·17·(2·4)·17 = 4624; per score (2·17² = 578 of them) a scale and a 5-FLOP softmax: 6·578 = 3468
VIT_MAP = 4624 + 3468
VIT_CAPTURE = VIT_MAP + 17 * 8  # + the head-averaged keys the capture stores, n·H_kv·h = 136
# A decoder site llm.2: 5 text + 12 visual tokens, 3 kept; one key/value head (grouped-query), causal mask.
LLM_SITE = SiteShape("llm.2", tokens=17, prunable=12, keep=3, hidden=8, heads=2, head_dim=4, kv_heads=1, causal=True)
LLM_MAP = 4624 + (6 + 1) * 578  # the causal mask adds one FLOP per score: 8670
LLM_CAPTURE = LLM_MAP + 17 * 4  # keys averaged over 1 key/value head of 4: 68


def test_attention_map_primitive():
    assert SiteShape.attention_map(17, 17, 2, 4) == VIT_MAP == 8092
    assert SiteShape.attention_map(17, 17, 2, 4, causal=True) == LLM_MAP == 8670
    assert SiteShape.attention_map(1, 17, 2, 4) == 2 * 8 * 17 + 6 * 2 * 17  # one query row: 272 + 204
    assert SiteShape.cosine_matrix(12, 8) == 3 * 12 * 8 + 2 * 12 * 12 * 8 == 2592


def test_cls_attention_charge():
    # the map on the side, its head average H·n² = 578 and the [CLS] row as a sum over queries 2·n² = 578
    assert site_flops(build_method("cls_attention"), VIT_SITE) == VIT_CAPTURE + 578 + 578 == 9384


def test_l2norm_charge():
    assert site_flops(build_method("l2norm"), VIT_SITE) == 2 * 17 * 8 == 272


def test_divprune_charge():
    # every token present (the [CLS] included) normalised, 3·17·8 = 408, and their similarity 2·17²·8 = 4624
    assert site_flops(build_method("divprune"), VIT_SITE) == 408 + 4624 == 5032
    assert site_flops(build_method("divprune"), LLM_SITE) == 5032  # text included there too; no capture
    assert site_flops(build_method("divprune"), SiteShape("pre_llm", 17, 12, 0, 8, 2, 4, 1, True)) == 0


def test_tome_charge():
    # 12 of 16 patches merge away. Round 1, n = 17: set A = 9 even positions, 8 of them mergeable (the [CLS] is
    # one), B = 8, so r = 8: normalise the head-averaged keys (width 4) 3·17·4 = 204, A x B similarity
    # 2·9·4·8 = 576, the weighted merge of hidden states and keys 2·17·(8 + 4) = 408.
    first = 204 + 576 + 408
    # round 2, n = 9, 4 left to merge: A = 5 (4 mergeable), B = 4, r = 4: 3·9·4 = 108, 2·5·4·4 = 160, 2·9·12 = 216
    second = 108 + 160 + 216
    assert site_flops(build_method("tome"), VIT_SITE) == VIT_CAPTURE + first + second == 9900


def test_fastv_charge():
    # layer K-1's map on the side (all 17 rows) and the last text token's row averaged over heads, H·n = 34
    assert site_flops(build_method("fastv"), LLM_SITE) == LLM_CAPTURE + 34 == 8772


def test_pyramiddrop_charge():
    # the last text token's row in layer K itself, computed beside it: the input RMSNorm on 17 tokens 4·17·8 = 544,
    # their keys 2·17·8·4 = 1088 (one key/value head of 4), one query 2·8·8 = 128, RoPE on both
    # 3·(17·4 + 8) = 228, the row's logits 2·17·8 = 272, scale + causal mask + softmax 7·2·17 = 238
    row = 544 + 1088 + 128 + 228 + 272 + 238
    # then the score averages the row over heads: 2·17 = 34
    assert site_flops(build_method("pyramiddrop"), LLM_SITE) == row + 34 == 2532


def test_d2pruner_charge():
    # the map and the row as FastV, then the cosine graph of the 12 visual hidden states: 3·12·8 + 2·12²·8 = 2592
    assert site_flops(build_method("d2pruner"), LLM_SITE) == LLM_CAPTURE + 34 + 2592 == 11364
    nothing_kept = SiteShape("llm.2", 17, 12, 0, 8, 2, 4, 1, True)
    assert site_flops(build_method("d2pruner"), nothing_kept) == LLM_CAPTURE + 34  # no graph to build


def test_dart_charge():
    # keys from k_proj (no capture), rotated by layer K-1's RoPE 3·17·4 = 204; their L1 norms 2·17·4 = 136; the
    # LM's final RMSNorm on the 17 hidden states 4·17·8 = 544; 8 of 12 visual kept: 4 image pivots (kept) and 4
    # text pivots (5 text tokens), the 4 left to choose shared 1 per pivot; the 17 normed states normalised
    # 3·17·8 = 408; pivot similarities to the visual tokens still free: 8, 7, 6, 5 of them, 2·d each
    site = SiteShape("llm.2", 17, 12, 8, 8, 2, 4, 1, True)
    assert site_flops(build_method("dart"), site) == 204 + 136 + 544 + 408 + 2 * 8 * (8 + 7 + 6 + 5) == 1708
    # 3 kept: all of them image pivots, no similarity is computed
    assert site_flops(build_method("dart"), LLM_SITE) == 204 + 136 + 544 + 408 == 1292


def test_visionzip_charge():
    # pre_llm: 1 text + 16 visual tokens, 8 kept; the tower image: 17 tokens, 2 heads of 4
    site = SiteShape("pre_llm", 17, 16, 8, 8, 2, 4, 1, True, tower_tokens=17, tower_images=1, tower_heads=2,
                     tower_head_dim=4)  # fmt: skip
    # the tower block's map 8092, its averaged keys 17·8 = 136, the head sum into scores 2·17² = 578
    capture = 8092 + 136 + 578
    # contextual round(8·10/64) = 1, dominant 7, rest r = 16 - 7 = 9: cosine of 9 tower keys of width 4
    # 3·9·4 + 2·9²·4 = 108 + 648, group sums 9·8 = 72 and the anchor's mean 1·8 = 8
    assert site_flops(build_method("visionzip"), site) == capture + 756 + 72 + 8 == 9642
    two_images = SiteShape("pre_llm", 17, 16, 8, 8, 2, 4, 1, True, 17, 2, 2, 4)
    assert site_flops(build_method("visionzip"), two_images) == 2 * capture + 836


# -- the multimodal counter charges the same, per sample, at the sites that run ----------------------------------


@pytest.fixture(scope="module")
def llava():
    """tests/tiny_mllm's LLaVA: Llama 32 wide, 4 heads of 8 (2 key/value heads), 4 layers; CLIP tower on 16 patches +
    [CLS], 32 wide in 2 heads of 16; 16 LLM tokens per image."""
    return adapt(build_tiny_mllm("llava"))


def test_mllm_counter_charges_fastv_per_sample(llava):
    # fastv at its default site llm.2 reads layer 1. Sample 0: 10 text + 16 visual reach it, 4 kept; sample 1:
    # 6 text + 32 visual (two images), 8 kept.
    num_text, visual = torch.tensor([10, 6]), torch.tensor([[16, 16, 4, 4], [32, 32, 8, 8]])
    result = mllm_prefill_flops(llava, num_text, visual, build_method("fastv"))

    def charge(n: int) -> int:
        # QKᵀ 2·n·32·n, scale + causal mask + softmax 7·4·n², keys over 2 key/value heads of 8: 16·n, the row 4·n
        return 2 * n * 32 * n + 7 * 4 * n * n + 16 * n + 4 * n

    assert charge(26) == 62712
    assert result["scorer"] == charge(26) + charge(38)
    assert result["total"] == result["llm"] + result["scorer"]
    # a batch in which no sample drops anything at llm.2 never runs the method there
    unpruned = mllm_prefill_flops(llava, num_text, torch.tensor([[16] * 4, [32] * 4]), build_method("fastv"))
    assert unpruned["scorer"] == 0
    # explicit sites: the same charge at llm.2 whatever the method's default
    at_two = mllm_prefill_flops(llava, num_text, visual, build_method("fastv", {"layer": 3}), sites=["llm.2"])
    assert at_two["scorer"] == result["scorer"]


def test_mllm_counter_charges_visionzip_with_the_tower(llava):
    # pre_llm: sample 0, 10 text + 16 visual (one image), 4 kept; sample 1, 6 text + 32 visual (two images), 8 kept
    num_text, visual = torch.tensor([10, 6]), torch.tensor([[4] * 4, [8] * 4])
    result = mllm_prefill_flops(llava, num_text, visual, build_method("visionzip"), torch.tensor([16, 32]))
    # per tower image (17 tokens, 2 heads of 16): map 2·17·32·17 + 6·2·17² = 18496 + 3468, keys 17·32 = 544,
    # head sum 2·17² = 578
    image = 18496 + 3468 + 544 + 578
    # sample 0: contextual round(4·10/64) = 1, rest 16 - 3 = 13: cosine 3·13·16 + 2·13²·16 = 624 + 5408,
    # sums 13·32 and the mean 1·32
    own_0 = 624 + 5408 + 13 * 32 + 32
    # sample 1: contextual round(8·10/64) = 1, rest 32 - 7 = 25: 3·25·16 + 2·25²·16 = 1200 + 20000, 25·32 + 32
    own_1 = 1200 + 20000 + 25 * 32 + 32
    assert result["scorer"] == image + own_0 + 2 * image + own_1


# -- the charged matrix products are the ones that run ----------------------------------------------------------
# torch's FlopCounterMode counts matrix products (not softmax, norms or reductions, and not the CPU SDPA kernel,
# which both runs compared call alike); a method's count minus random's at the same sites and budget is the
# matrix-product part of its charge.


def _counted(model, inputs: dict, name: str, sites: list[str], keep_ratio: float):
    from torch.utils.flop_counter import FlopCounterMode

    with ts.apply(model, name, keep_ratio=keep_ratio, sites=sites) as handle:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(**inputs)
        return counter.get_total_flops(), handle


def test_vit_charges_the_products_that_run(adapter):
    inputs = {"pixel_values": torch.randn(1, C, 8, 8)}
    baseline, _ = _counted(adapter.model, inputs, "random", ["vit.0"], 0.5)
    # n = 5 tokens, d = 8 at vit.0: the captured QKᵀ 2·5·8·5 = 400; DivPrune's similarity 2·5·8·5 = 400; ToMe's
    # capture computes the map too (400) and matches set A (3) against B (2) on keys of width 4, 2·3·4·2 = 48
    for name, products in {"cls_attention": 400, "divprune": 400, "tome": 400 + 48, "l2norm": 0}.items():
        counted, handle = _counted(adapter.model, inputs, name, ["vit.0"], 0.5)
        assert counted - baseline == products, name
        assert pruned_flops(adapter, handle)["scorer"] >= products, name


def test_mllm_charges_the_products_that_run(llava):
    from tests.tiny_mllm import make_batch

    model = llava.model
    inputs = make_batch("llava").sample(0)  # 6 text + 16 visual tokens: n = 22; d = 32, 4 heads of 8, 2 kv heads
    assert inputs["input_ids"].shape == (1, 22)
    expected = {
        ("fastv", "llm.2"): 2 * 22 * 32 * 22,  # layer 1's QKᵀ on the side: 30976
        # layer 2's keys 2·22·32·16, the last text token's query 2·32·32 and its row of logits 2·22·32
        ("pyramiddrop", "llm.2"): 2 * 22 * 32 * 16 + 2 * 32 * 32 + 2 * 22 * 32,
        ("d2pruner", "llm.2"): 2 * 22 * 32 * 22 + 2 * 16 * 32 * 16,  # the map, then the 16 visual states' cosines
        ("divprune", "pre_llm"): 2 * 22 * 32 * 22,  # all 22 hidden states' similarity
        # the tower block's QKᵀ (17 tokens, 2 heads of 16) and the cosines of the 13 non-dominant tower keys (width
        # 16): 4 kept, 1 of them contextual, 16 - 3 = 13 left
        ("visionzip", "pre_llm"): 2 * 17 * 32 * 17 + 2 * 13 * 16 * 13,
    }
    for (name, site), products in expected.items():
        baseline, _ = _counted(model, inputs, "random", [site], 0.25)
        counted, handle = _counted(model, inputs, name, [site], 0.25)
        assert counted - baseline == products, name
        assert last_prefill_flops(handle)["scorer"] >= products, name
