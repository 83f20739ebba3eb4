"""Video inputs and the Molmo2 family at ``pre_llm`` / ``llm.<k>``: Molmo2 (images and videos) and Qwen2-VL videos.

Tiny random-init models; batches of three left-padded samples with videos of different lengths (Molmo2: 2, 3 and
1 frames; Qwen2-VL: 2, 3 and 1 temporal patches) or images of different shapes (Molmo2's low-res view and 1 or 2
high-res crops). Checks: each sample's visual tokens, frames and (t, h, w); keep_ratio=1 is bit-exact, generate()
included; a batch equals its samples one by one through generate() with the KV cache; cached decoding equals
uncached recomputation; Molmo2's bidirectional block over a sample's multimodal tokens holds among the kept tokens
(the pruned model equals the unpruned one with the dropped tokens masked out of that mask); a hard policy in mask
mode gives gather mode's logits; remove() restores the model, the feature-method wrappers included.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from tiny_mllm import (
    BOS,
    MOLMO2_MULTIMODAL,
    MOLMO2_PATCH,
    PAD,
    QWEN_VIDEO_TOKEN,
    QWEN_VISION_END,
    QWEN_VISION_START,
    build_tiny_mllm,
    build_tiny_molmo2,
    make_molmo2_batch,
)

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.backbones.mllm import IMAGE, VIDEO
from tokensift.scorers.base import TokenMethod

NEW_TOKENS = 4
# (model, batch) pairs: Molmo2 videos, Molmo2 images, Qwen2-VL videos
CASES = ["molmo2-video", "molmo2-image", "qwen2_vl-video"]


@dataclass
class QwenVideoBatch:
    """Qwen2-VL samples holding one video each: (t, h, w) patch grids of 2, 3 and 1 temporal patches."""

    rows: list[list[int]]
    pixels: list[torch.Tensor]
    grids: list[tuple[int, int, int]]

    @property
    def size(self) -> int:
        return len(self.rows)

    def inputs(self, indices: list[int] | None = None) -> dict:
        indices = list(range(self.size)) if indices is None else indices
        rows = [self.rows[i] for i in indices]
        length = max(len(r) for r in rows)
        input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
        return {
            "input_ids": input_ids,
            "attention_mask": torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows]),
            "pixel_values_videos": torch.cat([self.pixels[i] for i in indices]),
            "video_grid_thw": torch.tensor([self.grids[i] for i in indices]),
            "mm_token_type_ids": (input_ids == QWEN_VIDEO_TOKEN).long() * 2,
        }

    def sample(self, i: int) -> dict:
        return self.inputs([i])


def make_qwen_video_batch(seed: int = 3) -> QwenVideoBatch:
    generator = torch.Generator().manual_seed(seed)
    grids = [(2, 4, 4), (3, 4, 8), (1, 8, 4)]  # 8, 24 and 8 LLM tokens (2x2 merge groups)

    def words(n: int) -> list[int]:
        return torch.randint(3, 50, (n,), generator=generator).tolist()

    def video(grid: tuple[int, int, int]) -> list[int]:
        return [QWEN_VISION_START, *[QWEN_VIDEO_TOKEN] * (math.prod(grid) // 4), QWEN_VISION_END]

    rows = [
        [BOS, *words(2), *video(grids[0]), *words(3)],
        [BOS, *video(grids[1]), *words(5)],
        [BOS, *words(4), *video(grids[2]), *words(1)],
    ]
    pixels = [torch.randn(math.prod(grid), 3 * 2 * 4 * 4, generator=generator) for grid in grids]
    return QwenVideoBatch(rows, pixels, grids)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"molmo2": build_tiny_molmo2(), "qwen2_vl": build_tiny_mllm("qwen2_vl")}


def case(models, name: str):
    """(model, batch, visual token id) of a case."""
    family, kind = name.split("-")
    if family == "molmo2":
        return models["molmo2"], make_molmo2_batch(kind), MOLMO2_PATCH
    return models["qwen2_vl"], make_qwen_video_batch(), QWEN_VIDEO_TOKEN


def visual_counts(batch, token: int) -> list[int]:
    return [row.count(token) for row in batch.rows]


def with_positions(inputs: dict, model) -> dict:
    """A plain forward with generate()'s positions (counted over the real tokens), for 1-D-RoPE models; Qwen2-VL
    computes its M-RoPE positions from the mask itself."""
    if model.config.model_type == "qwen2_vl":
        return inputs
    return {**inputs, "position_ids": (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)}


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**with_positions(inputs, model)).logits


def generate(model, inputs: dict, token: int, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            suppress_tokens=[token],
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )


def continuation(result, inputs: dict) -> torch.Tensor:
    return result.sequences[:, inputs["input_ids"].shape[1] :]


def hook_count(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules()
    )


def attn_implementations(model) -> list[str]:
    return [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")]


class Spy(TokenMethod):
    """Keeps every token and remembers the states it was shown."""

    name = "spy"
    site_kinds = ("pre_llm", "llm")

    def __init__(self):
        super().__init__()
        self.states = []

    def select(self, state, num_keep):
        self.states.append(state)
        return state.alive.clone()


def grid_coords(t: int, h: int, w: int, first: int = 0) -> torch.Tensor:
    return torch.stack(
        torch.meshgrid(torch.arange(first, first + t), torch.arange(h), torch.arange(w), indexing="ij"), -1
    ).reshape(-1, 3)


# -- what the method sees --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("through", ["forward", "generate"])
def test_visual_tokens_frames_and_coords_per_sample(models, name, through):
    """Forward passes the grids; generate() encodes before the first forward and passes none: both read the same."""
    model, batch, token = case(models, name)
    spy = Spy()
    inputs = batch.inputs()
    with ts.apply(model, spy, keep_ratio=0.5, sites=["pre_llm"]):
        if through == "forward":
            logits(model, inputs)
        else:
            generate(model, inputs, token, max_length=None)
    state = spy.states[0]
    visual = inputs["input_ids"] == token
    kind = IMAGE if name.endswith("image") else VIDEO
    assert torch.equal(state.kind == kind, visual) and not bool((state.kind == 3 - kind).any())
    assert state.prunable.sum(1).tolist() == visual_counts(batch, token)
    assert torch.equal(state.protected, inputs["attention_mask"].bool() & ~visual)
    ids = [sorted(set(state.image_id[b][visual[b]].tolist())) for b in range(3)]
    assert ids == ([[0], [1], [2, 3]] if kind == IMAGE else [[0], [1], [2]])
    if name == "molmo2-video":  # frames of 3x3 tokens
        expected = [grid_coords(frames, 3, 3) for frames in (2, 3, 1)]
    elif name == "molmo2-image":  # the low-res view (t = 0), then the high-res crops' pooled canvas (t = 1)
        expected = [torch.cat([grid_coords(1, 3, 3), grid_coords(1, 3, 3 * wide, first=1)]) for wide in (1, 2, 1, 1)]
    else:  # merged (t, h / 2, w / 2)
        expected = [grid_coords(t, h // 2, w // 2) for t, h, w in batch.grids]
    assert torch.equal(state.coords[visual], torch.cat(expected))


# -- exactness, budgets, batches -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["random", "divprune", "fastv"])
@pytest.mark.parametrize("name", CASES)
def test_keep_ratio_one_is_exact(models, name, method):
    model, batch, token = case(models, name)
    inputs = batch.inputs()
    reference_logits, reference = logits(model, inputs), generate(model, inputs, token)
    with ts.apply(model, method, keep_ratio=1.0) as handle:
        assert torch.equal(logits(model, inputs), reference_logits)
        assert handle.last_records == []
        result = generate(model, inputs, token)
    assert torch.equal(result.sequences, reference.sequences)
    for step, reference_step in zip(result.logits, reference.logits, strict=True):
        assert torch.equal(step, reference_step)


SITED = [("random", "pre_llm"), ("divprune", "pre_llm"), ("divprune", "llm.2"), ("fastv", "llm.2")]


@pytest.mark.parametrize(("method", "site"), SITED)
@pytest.mark.parametrize("name", CASES)
def test_prunes_each_sample_to_its_budget_and_removes_cleanly(models, name, method, site):
    model, batch, token = case(models, name)
    inputs = batch.inputs()
    reference = logits(model, inputs)
    hooks_before, attn_before = hook_count(model), attn_implementations(model)
    handle = ts.apply(model, method, keep_ratio=0.5, sites=[site])
    pruned = logits(model, inputs)
    assert pruned.shape == reference.shape and torch.isfinite(pruned).all()
    assert not torch.allclose(pruned[:, -1], reference[:, -1], atol=1e-4)
    expected = [math.ceil(0.5 * n) for n in visual_counts(batch, token)]
    assert handle.last_records[-1].kept_visual.tolist() == expected
    kept = handle.kept_orig_index
    text = inputs["attention_mask"].bool() & (inputs["input_ids"] != token)
    for b in range(batch.size):
        slots = kept[b][kept[b] >= 0]
        assert set(text[b].nonzero().squeeze(1).tolist()) <= set(slots.tolist()), "text is never pruned"
    handle.remove()
    assert hook_count(model) == hooks_before and attn_implementations(model) == attn_before
    assert not any(hasattr(m, "tokensift_call") for m in model.modules())
    # Molmo2's feature methods were wrapped to read the grids generate() pops: the instance is the class's again
    assert not {"get_image_features", "get_video_features"} & set(vars(model.model))
    assert torch.equal(logits(model, inputs), reference)


@pytest.mark.parametrize(("method", "site"), [("divprune", "pre_llm"), ("divprune", "llm.2"), ("fastv", "llm.2")])
@pytest.mark.parametrize("name", CASES)
def test_batch_matches_single_samples_through_generate(models, name, method, site):
    """Left padding, videos of different lengths, each sample's own budget; decoding on the pruned KV cache."""
    model, batch, token = case(models, name)
    with ts.apply(model, method, keep_ratio=0.5, sites=[site]) as handle:
        batched = generate(model, batch.inputs(), token)
        kept = handle.last_records[-1].kept_visual.tolist()
        tokens = continuation(batched, batch.inputs())
        for i in range(batch.size):
            single = generate(model, batch.sample(i), token)
            assert handle.last_records[-1].kept_visual.tolist() == [kept[i]]
            assert torch.equal(continuation(single, batch.sample(i))[0], tokens[i])
            for step_batched, step_single in zip(batched.logits, single.logits, strict=True):
                torch.testing.assert_close(step_single[0], step_batched[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("site", ["pre_llm", "llm.2"])
@pytest.mark.parametrize("name", CASES)
def test_cached_decoding_matches_uncached_recomputation(models, name, site):
    """divprune chooses among the visual tokens by their states, which no later token changes (the visual block
    is bidirectional only among multimodal tokens): recomputing the whole sequence re-selects the same set."""
    model, batch, token = case(models, name)
    inputs = batch.inputs()
    with ts.apply(model, "divprune", keep_ratio=0.5, sites=[site]):
        cached = generate(model, inputs, token)
        sequence, tokens, step_logits = dict(inputs), [], []
        for _ in range(NEW_TOKENS):
            out = logits(model, sequence)[:, -1]
            step_logits.append(out.clone())
            out[:, token] = float("-inf")
            tokens.append(out.argmax(-1, keepdim=True))
            sequence["input_ids"] = torch.cat([sequence["input_ids"], tokens[-1]], dim=1)
            for key in ("attention_mask", "mm_token_type_ids"):
                fill = torch.ones_like if key == "attention_mask" else torch.zeros_like
                sequence[key] = torch.cat([sequence[key], fill(tokens[-1])], dim=1)
    assert torch.equal(torch.cat(tokens, dim=1), continuation(cached, inputs))
    for uncached_step, cached_step in zip(step_logits, cached.logits, strict=True):
        torch.testing.assert_close(uncached_step, cached_step, atol=1e-4, rtol=1e-4)


# -- Molmo2's bidirectional block ------------------------------------------------------------------------------


@pytest.mark.parametrize("site", ["pre_llm", "llm.1", "llm.2"])
@pytest.mark.parametrize("kind", ["video", "image"])
def test_molmo2_visual_block_holds_among_the_kept_tokens(models, kind, site):
    """The pruned model equals the unpruned one whose layers from the site on see Molmo2's own mask (causal, and
    both ways among a sample's multimodal tokens) with the dropped tokens masked out: same positions, same block.
    The tiny Molmo2 scales RoPE in layers 0-1 only, so after llm.1 layer 1 and layers 2-3 each need their own
    table gathered to the kept slots."""
    model, batch = models["molmo2"], make_molmo2_batch(kind)
    inputs = batch.inputs()
    with ts.apply(model, "divprune", keep_ratio=0.5, sites=[site]) as handle:
        pruned = logits(model, inputs)
        kept_index = handle.kept_orig_index
    size, length = inputs["input_ids"].shape
    kept = torch.zeros(size, length, dtype=torch.bool)
    for b in range(size):
        kept[b, kept_index[b][kept_index[b] >= 0]] = True
    multimodal = torch.isin(inputs["input_ids"], torch.tensor(MOLMO2_MULTIMODAL))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    block = multimodal[:, :, None] & multimodal[:, None, :]
    visible = (causal | block) & kept[:, None, :]
    visible = (visible | torch.eye(length, dtype=torch.bool)).unsqueeze(1)  # a dropped row keeps one key: no NaN
    first = 0 if site == "pre_llm" else int(site.split(".")[1])

    def mask_dropped(module, args, kwargs):
        kwargs["attention_mask"] = visible
        return args, kwargs

    layers = adapt(model).layers
    hooks = [layer.register_forward_pre_hook(mask_dropped, with_kwargs=True) for layer in layers[first:]]
    try:
        masked = logits(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(pruned[kept], masked[kept], atol=1e-4, rtol=1e-4)
    # the block matters: a purely causal mask over the kept tokens gives other logits
    causal_only = (causal & kept[:, None, :]) | torch.eye(length, dtype=torch.bool)
    visible = causal_only.unsqueeze(1)
    hooks = [layer.register_forward_pre_hook(mask_dropped, with_kwargs=True) for layer in layers[first:]]
    try:
        without_block = logits(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert not torch.allclose(pruned[kept], without_block[kept], atol=1e-3)


# -- mask (training) mode --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sites", [["pre_llm"], ["llm.2"], ["llm.1", "llm.3"]])
@pytest.mark.parametrize("name", CASES)
def test_hard_policy_in_mask_mode_gives_the_gather_mode_logits(models, name, sites):
    model, batch, token = case(models, name)
    inputs = batch.inputs()
    out = {}
    for mode in ("gather", "mask"):
        with ts.apply(model, "random", keep_ratio=0.4, sites=sites, mode=mode) as handle:
            handle.set_samples(torch.arange(batch.size))
            out[mode] = logits(model, inputs)
            records = handle.last_records
        if mode == "gather":
            kept = records[-1].kept_visual
    assert torch.equal(records[-1].kept_visual.round().long(), kept)
    text = inputs["attention_mask"].bool() & (inputs["input_ids"] != token)
    torch.testing.assert_close(out["mask"][text], out["gather"][text], atol=2e-4, rtol=2e-4)
    assert not torch.allclose(logits(model, inputs)[:, -1], out["mask"][:, -1], atol=1e-3), "the policy matters"


# -- identity and bad input ------------------------------------------------------------------------------------


def test_molmo2_adapter_names_parts_sites_and_fingerprint(models):
    model = models["molmo2"]
    adapter = adapt(model)
    assert adapter.family.name == "molmo2" and adapter.num_layers == 4
    assert adapter.sites()[-4:] == ["pre_llm", "llm.1", "llm.2", "llm.3"]
    assert adapter.family.scored_tower_block(model) == 2  # the adapter reads blocks 2 and 1 (vision_feature_layer)
    fingerprint = adapter.fingerprint()
    assert fingerprint["model_type"] == "molmo2" and fingerprint["hidden_size"] == 32
    assert fingerprint == adapt(build_tiny_molmo2()).fingerprint()
    assert fingerprint["weights_digest"] != adapt(build_tiny_molmo2(seed=1)).fingerprint()["weights_digest"]


def test_molmo2_grids_that_do_not_match_the_placeholders_are_refused(models):
    model, batch = models["molmo2"], make_molmo2_batch("video")
    inputs = batch.inputs([0, 1])
    inputs["input_ids"] = inputs["input_ids"].clone()
    moved = (inputs["input_ids"][0] == MOLMO2_PATCH).nonzero()[-1]  # sample 0 loses a token, sample 1 gains one
    inputs["input_ids"][0, moved] = 5
    row = inputs["input_ids"][1]
    row[(row != MOLMO2_PATCH).nonzero()[-1]] = MOLMO2_PATCH
    with ts.apply(model, "divprune", keep_ratio=0.5, sites=["pre_llm"]), pytest.raises(ValueError, match="straddles"):
        logits(model, inputs)


class TowerSpy(Spy):
    needs_tower_attention = True


@pytest.mark.parametrize("kind", ["video", "image"])
@pytest.mark.parametrize("through", ["forward", "generate"])
def test_molmo2_tower_attention_per_llm_token_pools_its_patches(models, kind, through):
    """VisionZip / HoliTom / KTV read the tower's attention per LLM token: on Molmo2 the attention each pooled patch
    receives in the deepest block the adapter reads, summed over the token's pooling window."""
    model, batch = models["molmo2"], make_molmo2_batch(kind)
    inputs = batch.inputs()
    spy = TowerSpy()
    with ts.apply(model, spy, keep_ratio=0.5, sites=["pre_llm"]):
        if through == "forward":
            logits(model, inputs)
        else:
            generate(model, inputs, MOLMO2_PATCH)
    state = spy.states[0]
    reference_model = copy.deepcopy(model)
    reference_model.set_attn_implementation("eager")
    pixels = inputs["pixel_values" if kind == "image" else "pixel_values_videos"]
    with torch.no_grad():
        tower = reference_model.model.vision_tower(pixels, output_attentions=True)
    block = adapt(model).family.scored_tower_block(model)
    received = tower.attentions[block].float().sum(dim=1).mean(dim=1).reshape(-1)  # per patch, all crops
    pooling = inputs[f"{kind}_token_pooling"]
    expected = (received[pooling.clamp(min=0)] * (pooling >= 0)).sum(dim=1)
    visual = inputs["input_ids"] == MOLMO2_PATCH
    torch.testing.assert_close(state.tower_attention[visual], expected, atol=1e-5, rtol=1e-4)
    assert state.tower_keys.shape == (*visual.shape, 16) and bool(state.tower_keys[visual].abs().sum(-1).gt(0).all())


# -- Qwen2-VL videos at vit.<i> (its packed tower, frame by frame) -------------------------------------------------


def test_qwen2_vl_video_vit_site_batch_matches_single_samples(models):
    model, batch = models["qwen2_vl"], make_qwen_video_batch()
    inputs = batch.inputs()
    reference_logits, reference = logits(model, inputs), generate(model, inputs, QWEN_VIDEO_TOKEN)
    with ts.apply(model, "divprune", keep_ratio=1.0, sites=["vit.0"]):
        assert torch.equal(logits(model, inputs), reference_logits)
        assert torch.equal(generate(model, inputs, QWEN_VIDEO_TOKEN).sequences, reference.sequences)
    with ts.apply(model, "divprune", keep_ratio=0.5, sites=["vit.0"]) as handle:
        batched = generate(model, inputs, QWEN_VIDEO_TOKEN)
        assert handle.last_records[-1].kept_visual.tolist() == [4, 12, 4]
        tokens = continuation(batched, inputs)
        for i in range(batch.size):
            single = generate(model, batch.sample(i), QWEN_VIDEO_TOKEN)
            assert torch.equal(continuation(single, batch.sample(i))[0], tokens[i])
            for step_batched, step_single in zip(batched.logits, single.logits, strict=True):
                torch.testing.assert_close(step_single[0], step_batched[i], atol=1e-4, rtol=1e-4)


def test_qwen2_vl_video_vit_site_mask_mode_gives_the_gather_mode_logits(models):
    model, batch = models["qwen2_vl"], make_qwen_video_batch()
    inputs = batch.inputs()
    out = {}
    for mode in ("gather", "mask"):
        with ts.apply(model, "random", keep_ratio=0.4, sites=["vit.0"], mode=mode) as handle:
            handle.set_samples(torch.arange(batch.size))
            out[mode] = logits(model, inputs)
    text = inputs["attention_mask"].bool() & (inputs["input_ids"] != QWEN_VIDEO_TOKEN)
    torch.testing.assert_close(out["mask"][text], out["gather"][text], atol=2e-4, rtol=2e-4)
    assert not torch.allclose(logits(model, inputs)[:, -1], out["mask"][:, -1], atol=1e-3), "the policy matters"


def test_molmo2_llm_flops_count_the_kept_tokens_and_tower_flops_are_refused(models):
    from tokensift.flops import last_prefill_flops

    model, batch = models["molmo2"], make_molmo2_batch("video")
    with ts.apply(model, "fastv", keep_ratio=0.5, sites=["llm.2"]) as handle:
        logits(model, batch.inputs())
        flops = last_prefill_flops(handle)
        assert handle.visual_tokens_per_layer[:, 2:].tolist() == [[9, 9], [14, 14], [5, 5]]
    assert 0.5 < flops["ratio"] < 1.0 and flops["scorer"] > 0
    with ts.apply(model, "divprune", keep_ratio=0.5, sites=["pre_llm"]) as handle:
        logits(model, batch.inputs())
        with pytest.raises(ValueError, match="Molmo2's tower cost"):
            last_prefill_flops(handle)


@pytest.mark.parametrize(("method", "sites"), [("divprune", ["pre_llm"]), ("fastv", ["llm.2"]), ("visionzip", None)])
def test_molmo2_beam_search_repeats_each_samples_layout(models, method, sites):
    """generate() encodes once and repeats each sample's row per beam: each copy keeps its sample's layout."""
    model, batch = models["molmo2"], make_molmo2_batch("video")
    inputs = batch.inputs()
    with ts.apply(model, method, keep_ratio=0.5, sites=sites) as handle:
        beams = continuation(generate(model, inputs, MOLMO2_PATCH, num_beams=2), inputs)
        assert handle.last_records[-1].kept_visual.tolist() == [9, 9, 14, 14, 5, 5]
        for i in range(batch.size):
            single = continuation(generate(model, batch.sample(i), MOLMO2_PATCH, num_beams=2), batch.sample(i))[0]
            assert torch.equal(beams[i, : single.numel()], single)


def test_molmo2_eager_attention_gets_the_block_mask_too(models):
    """Eager attention takes additive float masks: the handle's masks (visual block included) follow the kernel."""
    model, batch = copy.deepcopy(models["molmo2"]), make_molmo2_batch("video")
    model.set_attn_implementation("eager")
    inputs = batch.inputs()
    reference = logits(model, inputs)
    with ts.apply(model, "fastv", keep_ratio=1.0):
        assert torch.equal(logits(model, inputs), reference)
    with ts.apply(model, "pyramiddrop", keep_ratio=0.5):
        tokens = continuation(generate(model, inputs, MOLMO2_PATCH), inputs)
        for i in range(batch.size):
            single = continuation(generate(model, batch.sample(i), MOLMO2_PATCH), batch.sample(i))[0]
            assert torch.equal(single, tokens[i])
