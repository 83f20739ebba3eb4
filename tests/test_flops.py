"""The analytic FLOPs model against arithmetic written out by hand on a tiny ViT."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.bench.flops import backbone_flops, block_flops, pruned_flops, scorer_flops, tokens_per_layer
from tokensift.bench.oracle import OracleMethod
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
    # at vit.0 there are n = 5 tokens of d = 8, and k = 2 patches are kept
    expected_scorer = {
        "l2norm": 5 * 8,  # n·d = 40
        "divprune": 5 * 5 * 8 + 2 * 5,  # n²·d + k·n = 210
        "tome": 5 * 5 / 4 * 8,  # n²/4·d = 50
        "cls_attention": 0,
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
