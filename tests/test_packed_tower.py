"""``vit.<i>`` sites on packed towers: Molmo2's frame-batched tower (pooled groups, first-fit-decreasing rows,
block-diagonal attention per frame) and deferred compaction with a key bias (Molmo2 and Qwen2-VL)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Molmo2Config, Molmo2ForConditionalGeneration
from transformers.models.molmo2.video_processing_molmo2 import arange_for_pooling

from tokensift import attention as attn
from tokensift.backbones.mllm import Molmo2Family
from tokensift.budget import Budget
from tokensift.compact import first_fit_decreasing, pack_rows, pack_tokens, unpack_tokens
from tokensift.reduce_packed import FrameTower, PackedTowerHandle
from tokensift.scorers import build_method
from tokensift.scorers.base import KeepDecision, TokenMethod, top_k_mask

SIDE, POOL, PATCH = 6, 3, 4  # 6x6 patches per frame, 3x3 pooling windows: 4 LLM tokens per frame
FAMILY = Molmo2Family()


def build_tiny_molmo2(layers: int = 5, seed: int = 0, side: int = SIDE) -> Molmo2ForConditionalGeneration:
    torch.manual_seed(seed)
    heads, width = 2, 32
    config = Molmo2Config(
        vision_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=width // heads,
            image_size=[side * PATCH, side * PATCH],
            patch_size=PATCH,
        ),
        adapter_config=dict(
            vision_feature_layer=[-1, -3],
            hidden_size=width,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=width // heads,
            intermediate_size=64,
            text_hidden_size=32,
            initializer_range=0.2,
        ),
        text_config=dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=64,
            additional_vocab_size=8,
            num_hidden_layers=2,
            intermediate_size=64,
        ),
        image_patch_id=60,
        image_start_token_id=56,
        low_res_image_start_token_id=57,
        image_end_token_id=58,
        frame_start_token_id=61,
        frame_end_token_id=62,
        initializer_range=0.2,  # a larger init than 0.02, so that dropping a patch visibly changes the others
    )
    return Molmo2ForConditionalGeneration(config).eval()


def video_inputs(
    frames_per_video: list[int], seed: int = 0, side: int = SIDE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels ``[frames, patches, p*p*3]``, ``video_token_pooling`` and ``video_grids``, laid out as Molmo2's
    processor lays them."""
    generator = torch.Generator().manual_seed(seed)
    window, rows, cols = arange_for_pooling(torch.arange(side * side).reshape(side, side), POOL, POOL)
    pixels, pooled, grids, offset = [], [], [], 0
    for frames in frames_per_video:
        pixels.append(torch.randn(frames, side * side, PATCH * PATCH * 3, generator=generator))
        shift = (offset + torch.arange(frames) * side * side).view(-1, 1, 1)
        pooled.append(torch.where(window >= 0, window + shift, window).reshape(-1, window.shape[-1]))
        grids.append(torch.tensor([frames, rows, cols]))
        offset += frames * side * side
    return torch.cat(pixels), torch.cat(pooled), torch.stack(grids)


def molmo2_handle(model, method, budget, sites, kept: list, **options) -> PackedTowerHandle:
    tower = model.model.vision_tower
    tower.set_attn_implementation(attn.wrapped_name("sdpa"))
    return PackedTowerHandle(
        tower,
        tower.layers,
        model.model.multi_modal_projector,
        None,
        method,
        budget,
        sites,
        on_kept=kept.append,
        attention_modules=[block.self_attn for block in tower.layers],
        frames=FrameTower(lambda on_call: FAMILY.watch_feature_calls(model, on_call), FAMILY.pooled_layout),
        **options,
    )


def reference_features(
    model, pixels, pooling, keep_group: torch.Tensor, after_block: int, group_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What Molmo2's adapter computes when each frame's kept patches run *alone* through the blocks after
    ``after_block`` (dropped patches zero in every hidden state read after it): the pooled LLM features.
    ``group_bias`` ``[G]``: a key bias on each group's patches in block ``after_block`` (unpruned frames)."""
    tower = model.model.vision_tower
    tower.set_attn_implementation("sdpa")
    frames, patches = pixels.shape[:2]
    x = tower.patch_embedding(pixels) + tower.positional_embedding[None]
    owner = torch.full((frames * patches,), -1)
    valid = pooling >= 0
    owner[pooling[valid]] = torch.arange(pooling.shape[0]).unsqueeze(1).expand_as(pooling)[valid]
    keep_patch = ((owner >= 0) & keep_group[owner.clamp(min=0)]).view(frames, patches)
    hidden = [x]
    for index, layer in enumerate(tower.layers):
        if index <= after_block:
            bias = None
            if group_bias is not None and index == after_block:
                bias = torch.where(owner >= 0, group_bias[owner.clamp(min=0)], 0.0).view(frames, 1, 1, patches)
            x = layer(x, bias)
            x = x if index < after_block else x * keep_patch.unsqueeze(-1)
        else:
            out = torch.zeros_like(x)
            for f in range(frames):
                if keep_patch[f].any():
                    out[f, keep_patch[f]] = layer(x[f, keep_patch[f]].unsqueeze(0), None)[0]
            x = out
        hidden.append(x)
    layers = model.config.adapter_config.vision_feature_layer
    features = torch.cat([hidden[layer + 1 if layer >= 0 else layer] for layer in layers], dim=-1)
    return model.model.multi_modal_projector(features, pooling).last_hidden_state


class FixedPattern(TokenMethod):
    """Keeps each row's groups by a fixed hash of their index (the same set at any site); optionally returns a
    key bias: ``zeros`` or ``log sigmoid`` of a learned linear score (STTS's path for the gradient)."""

    name = "fixed_pattern_test"

    def __init__(self, bias: str | None = None, width: int = 32):
        super().__init__()
        self.bias = bias
        self.linear = torch.nn.Linear(width, 1)
        self.last_bias: torch.Tensor | None = None

    def reduce(self, state, num_keep):
        self.last_state = state
        scores = ((state.orig_index * 7 + 3) % 11).float()
        keep = top_k_mask(scores, state, num_keep)
        if self.bias is None:
            return KeepDecision(keep)
        if self.bias == "zeros":
            bias = torch.zeros(keep.shape, requires_grad=True)
        else:
            bias = torch.nn.functional.logsigmoid(self.linear(state.hidden).squeeze(-1))
        if bias.requires_grad:  # outside no_grad: the test reads the gradient that reached it
            bias.retain_grad()
        self.last_bias = bias
        return KeepDecision(keep, key_bias=bias)


@pytest.fixture(scope="module")
def molmo2():
    return build_tiny_molmo2()


# -- first-fit-decreasing packing ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 20), max_size=30), st.integers(20, 40))
def test_first_fit_decreasing_places_every_segment_once_within_capacity(lengths, capacity):
    row, offset = first_fit_decreasing(lengths, capacity)
    lengths = torch.tensor(lengths, dtype=torch.long)
    placed = lengths > 0
    assert bool((row[~placed] == -1).all()) and bool((row[placed] >= 0).all())
    for r in row[placed].unique().tolist():
        spans = sorted((int(offset[i]), int(offset[i] + lengths[i])) for i in (row == r).nonzero().flatten().tolist())
        assert spans[-1][1] <= capacity  # no row over capacity
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # no two segments share a slot
    # first fit: no segment would have fitted a row opened before its own when it was placed (decreasing order)
    rows = int(row.max()) + 1 if placed.any() else 0
    assert rows <= max(1, -(-int(lengths.sum()) // capacity) * 2)  # FFD never needs twice the lower bound


def test_first_fit_decreasing_refuses_a_segment_longer_than_a_row():
    with pytest.raises(ValueError, match="does not fit rows of 4 slots"):
        first_fit_decreasing([3, 5], 4)


def test_pack_unpack_round_trip_and_segments():
    keep = torch.tensor([[1, 1, 0, 1], [0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    values = torch.arange(16.0).view(4, 4, 1)
    layout = pack_rows(keep, 4)
    assert layout.rows == 2 and layout.padding == 0 and layout.waste == 0.0  # [frame 2] and [frame 0, frame 1]
    packed = pack_tokens(values, layout)
    assert packed[0, :, 0].tolist() == [8, 9, 10, 11] and packed[1, :, 0].tolist() == [0, 1, 3, 5]
    assert layout.segment.tolist() == [[2, 2, 2, 2], [0, 0, 0, 1]]
    assert layout.spans.tolist() == [[0, 4], [4, 7], [7, 8]]  # slots of the rows read end to end
    assert torch.equal(unpack_tokens(packed, layout), values * keep.unsqueeze(-1))
    contiguous = pack_rows(keep, 3, packing="contiguous")  # frame after frame, cut every 3 slots
    assert contiguous.segment.tolist() == [[0, 0, 0], [1, 2, 2], [2, 2, -1]] and contiguous.padding == 1
    assert contiguous.spans.tolist() == [[0, 3], [3, 4], [4, 8]]
    assert torch.equal(unpack_tokens(pack_tokens(values, contiguous), contiguous), values * keep.unsqueeze(-1))
    with pytest.raises(ValueError, match="packing must be one of"):
        pack_rows(keep, 4, packing="best")


# -- Molmo2: packed rows == each frame alone --------------------------------------------------------------


def test_molmo2_random_vit_site_matches_frames_run_alone(molmo2):
    pixels, pooling, grids = video_inputs([3, 5, 2])
    kept: list[torch.Tensor] = []
    handle = molmo2_handle(molmo2, build_method("random"), Budget(keep_ratio=0.5), ["vit.1"], kept)
    try:
        with torch.no_grad():
            out = torch.cat(molmo2.model.get_video_features(pixels, pooling, grids).pooler_output)
        record = handle.last_records[0]
    finally:
        handle.remove()
    keep = kept[0]
    assert record.kept.tolist() == [6, 10, 4]  # half of each video's 12 / 20 / 8 groups
    assert int(keep.sum()) == 20 and record.rows < pixels.shape[0]  # fewer rows than frames
    with torch.no_grad():
        expected = reference_features(molmo2, pixels, pooling, keep, after_block=1)
    assert torch.allclose(out[keep], expected[keep], atol=1e-5)
    with torch.no_grad():
        unpruned = torch.cat(molmo2.model.get_video_features(pixels, pooling, grids).pooler_output)
    assert not torch.allclose(out[keep], unpruned[keep], atol=1e-3)  # the dropped patches mattered
    assert molmo2.model.__dict__.get("get_video_features") is None  # remove() unwrapped the model


def test_molmo2_keep_ratio_one_is_exact(molmo2):
    pixels, pooling, grids = video_inputs([4, 2])
    with torch.no_grad():
        plain = molmo2.model.get_video_features(pixels, pooling, grids)
    kept: list[torch.Tensor] = []
    handle = molmo2_handle(molmo2, build_method("random"), Budget(keep_ratio=1.0), ["vit.1"], kept)
    try:
        with torch.no_grad():
            out = molmo2.model.get_video_features(pixels, pooling, grids)
    finally:
        handle.remove()
    assert kept == [] and torch.equal(torch.cat(out.pooler_output), torch.cat(plain.pooler_output))


@pytest.mark.parametrize("videos", [1, 4])
def test_molmo2_packing_waste_on_a_realistic_video_batch(videos):
    """Molmo2's own frame grid (27x27 patches, 81 tokens of 3x3 per frame), videos of 16 frames, keep 0.5 (a width-32
    tower keeps it fast). Half of a 16-frame video is exactly 8 rows of one frame: contiguous packing fills them
    (waste 0); first-fit-decreasing, which never splits a frame, needs a 9th (1/9 = 11% waste) unless the frames'
    kept counts pair up exactly, and over 64 frames still one or two rows more than the bound."""
    side = 27
    model = build_tiny_molmo2(layers=3, side=side)
    pixels, pooling, grids = video_inputs([16] * videos, side=side)
    records = {}
    for packing in ("contiguous", "ffd"):
        kept: list[torch.Tensor] = []
        handle = molmo2_handle(model, build_method("l2norm"), Budget(keep_ratio=0.5), ["vit.0"], kept, packing=packing)
        try:
            with torch.no_grad():
                model.model.get_video_features(pixels, pooling, grids)
            records[packing] = handle.last_records[0]
        finally:
            handle.remove()
        record = records[packing]
        assert record.kept.tolist() == [648] * videos and record.row_length == side * side
        assert record.padding == record.rows * record.row_length - int(kept[0].sum()) * POOL * POOL
    bound = 8 * videos  # rows the kept patches fill exactly
    assert records["contiguous"].rows == bound and records["contiguous"].waste == 0.0
    assert records["ffd"].rows <= bound + 2 and records["ffd"].waste <= 2 / (bound + 2)


@pytest.mark.parametrize(("packing", "row_length"), [("ffd", 72), ("contiguous", 16), ("contiguous", 72)])
def test_molmo2_row_length_option_and_its_check(molmo2, packing, row_length):
    """Longer rows, and contiguous packing whose frames continue on the next row (16 slots < a frame's 18 kept
    patches): still each frame's kept patches attending among themselves only."""
    pixels, pooling, grids = video_inputs([3, 2])
    kept: list[torch.Tensor] = []
    handle = molmo2_handle(
        molmo2, build_method("random"), Budget(keep_ratio=0.5), ["vit.1"], kept, row_length=row_length, packing=packing
    )
    try:
        with torch.no_grad():
            out = torch.cat(molmo2.model.get_video_features(pixels, pooling, grids).pooler_output)
        record = handle.last_records[0]
        assert record.row_length == row_length
        assert packing == "ffd" or record.padding < row_length  # contiguous: only the last row has padding
    finally:
        handle.remove()
    with torch.no_grad():
        expected = reference_features(molmo2, pixels, pooling, kept[0], after_block=1)
    assert torch.allclose(out[kept[0]], expected[kept[0]], atol=1e-5)
    with pytest.raises(ValueError, match="row_length must be a positive"):
        molmo2_handle(molmo2, build_method("random"), Budget(keep_ratio=0.5), ["vit.1"], [], row_length=0)


# -- deferred compaction with a key bias ----------------------------------------------------------------------


def test_molmo2_zero_key_bias_equals_removal_after_the_next_block(molmo2):
    pixels, pooling, grids = video_inputs([3, 4])
    outputs = []
    for method, site in ((FixedPattern("zeros"), "vit.1"), (FixedPattern(None), "vit.2")):
        kept: list[torch.Tensor] = []
        handle = molmo2_handle(molmo2, method, Budget(keep_ratio=0.5), [site], kept)
        try:
            with torch.no_grad():
                outputs.append(
                    (torch.cat(molmo2.model.get_video_features(pixels, pooling, grids).pooler_output), kept[0])
                )
            assert handle.last_records[0].deferred == (site == "vit.1")
        finally:
            handle.remove()
    (deferred, keep_a), (plain, keep_b) = outputs
    state = method.last_state  # one row per video, its groups frame by frame: (t, h, w) on the 2x2 token grid
    assert state.kind[state.valid].eq(2).all() and state.valid.sum(1).tolist() == [12, 16]
    assert state.coords[1, :, 0].tolist() == [t for t in range(4) for _ in range(4)]
    assert torch.equal(keep_a, keep_b)
    assert torch.allclose(deferred[keep_a], plain[keep_a], atol=1e-6)


def test_molmo2_key_bias_trains_through_removal(molmo2):
    pixels, pooling, grids = video_inputs([3, 4])
    method = FixedPattern("learned")
    torch.nn.init.normal_(method.linear.weight, std=1.0)  # scores that differ between groups: a bias that acts
    kept: list[torch.Tensor] = []
    handle = molmo2_handle(molmo2, method, Budget(keep_ratio=0.5), ["vit.1"], kept)
    try:
        out = torch.cat(molmo2.model.get_video_features(pixels, pooling, grids).pooler_output)
        out[kept[0]].pow(2).sum().backward()
    finally:
        handle.remove()
    counts = grids.prod(-1).tolist()
    group_bias = torch.cat([method.last_bias[v, :n] for v, n in enumerate(counts)]).detach()
    assert method.last_bias.grad is not None and float(method.last_bias.grad.abs().sum()) > 0
    assert method.linear.weight.grad is not None and float(method.linear.weight.grad.abs().sum()) > 0
    # the bias acts in the block after the site (on whole frames), removal after it: what each frame computes alone
    with torch.no_grad():
        biased = reference_features(molmo2, pixels, pooling, kept[0], after_block=2, group_bias=group_bias)
        unbiased = reference_features(molmo2, pixels, pooling, kept[0], after_block=2)
    out = out.detach()[kept[0]]
    assert torch.allclose(out, biased[kept[0]], atol=1e-6)
    assert float((out - unbiased[kept[0]]).abs().max()) > 1e-4


def test_qwen2_vl_vit_site_with_key_bias():
    from tiny_mllm import build_tiny_mllm, make_batch
    from transformers import Qwen2VLForConditionalGeneration

    from tokensift import api as ts

    config = build_tiny_mllm("qwen2_vl").config
    config.vision_config.depth = 3  # sites vit.0 and vit.1, each with a next block
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    inputs = make_batch("qwen2_vl").inputs()
    logits = {}
    for name, method, site in (("deferred", FixedPattern("zeros"), "vit.0"), ("plain", FixedPattern(None), "vit.1")):
        method.linear = torch.nn.Linear(32, 1)
        handle = ts.apply(model, method, keep_ratio=0.5, sites=[site])
        try:
            with torch.no_grad():
                logits[name] = model(**inputs).logits
            records = handle._vision_handle.last_records
            assert records and records[0].deferred == (name == "deferred")
        finally:
            handle.remove()
    assert torch.allclose(logits["deferred"], logits["plain"], atol=1e-5)
    method = FixedPattern("learned")
    handle = ts.apply(model, method, keep_ratio=0.5, sites=["vit.0"])
    try:
        model(**inputs).logits.float().pow(2).mean().backward()
    finally:
        handle.remove()
    assert method.last_bias.grad is not None and float(method.last_bias.grad.abs().sum()) > 0


# -- through ts.apply on a whole Molmo2 ------------------------------------------------------------------------


def test_molmo2_vit_site_through_apply_batch_equals_one_by_one():
    from tiny_mllm import build_tiny_molmo2, make_molmo2_batch

    from tokensift import api as ts

    model, batch = build_tiny_molmo2(), make_molmo2_batch("video")
    inputs = batch.inputs()
    with torch.no_grad():
        plain = model(**inputs).logits
        with ts.apply(model, "random", keep_ratio=1.0, sites=["vit.0"]):
            assert torch.equal(model(**inputs).logits, plain)
        handle = ts.apply(model, "random", keep_ratio=0.5, sites=["vit.0"])
        try:
            handle.set_samples(torch.arange(batch.size))
            logits = model(**inputs).logits
            record = handle._vision_handle.last_records[0]
            real = inputs["attention_mask"].bool()
            for i in range(batch.size):
                handle.set_samples(torch.tensor([i]))
                alone = model(**batch.sample(i)).logits[0]
                assert torch.allclose(logits[i][real[i]], alone, atol=1e-5)
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        finally:
            handle.remove()
    assert not torch.allclose(logits, plain, atol=1e-3)
    assert record.kept.tolist() == [9, 14, 5] and record.rows == 4  # half of each video's 18 / 27 / 9 tokens
    assert generated.shape == (batch.size, inputs["input_ids"].shape[1] + 3)


@pytest.mark.slow
def test_molmo2_flex_segments_match_per_segment_sdpa(molmo2):
    """flex_attention's document mask (compiled: ~60 s on 2 CPU cores the first time) computes what one SDPA call
    per frame segment computes, key bias included."""
    pixels, pooling, grids = video_inputs([3, 4])
    results = []
    for kernel in ("sdpa", "flex"):
        torch.manual_seed(1)  # the same scorer (weights and bias) for both kernels
        method = FixedPattern("learned")
        torch.nn.init.normal_(method.linear.weight, std=1.0)
        kept: list[torch.Tensor] = []
        handle = molmo2_handle(molmo2, method, Budget(keep_ratio=0.5), ["vit.1", "vit.3"], kept, segment_kernel=kernel)
        try:
            with torch.no_grad():
                results.append(
                    (torch.cat(molmo2.model.get_video_features(pixels, pooling, grids).pooler_output), kept[0])
                )
        finally:
            handle.remove()
    (sdpa, keep), (flex, keep_flex) = results
    assert torch.equal(keep, keep_flex)
    assert torch.allclose(sdpa[keep], flex[keep], atol=1e-5)


def test_molmo2_vit_site_on_multi_crop_images_batch_equals_one_by_one():
    """Images: a low-res view and high-res crops per image, pooled groups spanning two crops, two images in one
    sample; a score that depends on the sample's own patches only (l2norm), so each sample decides alike alone."""
    from tiny_mllm import build_tiny_molmo2, make_molmo2_batch

    from tokensift import api as ts

    model, batch = build_tiny_molmo2(), make_molmo2_batch("image")
    inputs = batch.inputs()
    with torch.no_grad(), ts.apply(model, "l2norm", keep_ratio=0.5, sites=["vit.0"]) as handle:
        logits = model(**inputs).logits
        record = handle._vision_handle.last_records[0]
        real = inputs["attention_mask"].bool()
        for i in range(batch.size):
            assert torch.allclose(logits[i][real[i]], model(**batch.sample(i)).logits[0], atol=1e-5)
    assert record.kept.tolist() == [9, 14, 9, 9]  # half of each image's 18 / 27 / 18 / 18 tokens


def test_molmo2_bad_pooling_and_mask_mode_are_refused(molmo2):
    pixels, pooling, grids = video_inputs([2])
    handle = molmo2_handle(molmo2, build_method("random"), Budget(keep_ratio=0.5), ["vit.1"], [])
    try:
        overlapping = pooling.clone()
        overlapping[1, 0] = overlapping[0, 0]  # one patch pooled by two LLM tokens
        with pytest.raises(ValueError, match="pooled groups overlap"):
            molmo2.model.get_video_features(pixels, overlapping, grids)
        with pytest.raises(ValueError, match="pooling indices name patch"):
            molmo2.model.get_video_features(pixels[:1], pooling, grids)
        with pytest.raises(ValueError, match="sites of a frame-batched tower"):
            handle.mode = "mask"
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="packing must be one of"):
        molmo2_handle(molmo2, build_method("random"), Budget(keep_ratio=0.5), ["vit.1"], [], packing="best_fit")
