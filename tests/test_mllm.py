"""Multimodal LLMs (LLaVA with a Llama LM, Qwen2-VL): every MLLM method x both families, table-driven.

The models are tiny random-init ones saved with ``save_pretrained`` and loaded back (no hub). Checks:
keep_ratio=1 is exact; budgets per sample; a padded batch equals its samples one by one; cached decoding
after a pruned prefill equals uncached recomputation of the same layout; remove() restores the model;
per-sample visual exit (keep count 0 for some samples); the methods' own selection rules.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_mllm import MLLM_FAMILIES, build_tiny_mllm, image_token_id, make_batch, visual_counts
from transformers import AutoModelForImageTextToText

import tokensift as ts
from tokensift.backbones import MLLMAdapter, adapt
from tokensift.scorers.base import TokenMethod
from tokensift.scorers.d2pruner import debiased_importance, greedy_independent_sets
from tokensift.scorers.dart import DARTConfig, DARTMethod
from tokensift.scorers.visionzip import VisionZipMethod
from tokensift.state import TokenState

# training-free ones, applied by name at a keep ratio (learned dyvte has its own tests: tests/test_dyvte.py)
MLLM_METHODS = sorted(
    name
    for name, info in ts.methods().items()
    if {"pre_llm", "llm.<k>"} & set(info["sites"]) and info["kind"] == "training-free"
)
# selection that depends only on the tokens up to the image, so uncached decoding re-selects the same set
PREFIX_STABLE = {"divprune", "visionzip"}
# merges what it chose from the last token's attention: keeping the same tokens (PinnedKeep) does not recompute the
# merged values; tests/test_video_methods.py replays its choice with its own merge instead
MERGES_BY_TEXT = {"holitom"}
NEW_TOKENS = 4


@pytest.fixture(scope="session")
def saved_mllms(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for family in MLLM_FAMILIES:
        path = tmp_path_factory.mktemp(family)
        build_tiny_mllm(family).save_pretrained(path)
        paths[family] = str(path)
    return paths


def load(saved_mllms, family: str) -> torch.nn.Module:
    return AutoModelForImageTextToText.from_pretrained(saved_mllms[family], local_files_only=True).eval()


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs: dict, **kwargs):
    """Greedy continuation; the image placeholder is suppressed (a random model may emit it)."""
    family = "llava" if model.config.model_type == "llava" else "qwen2_vl"
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            suppress_tokens=[image_token_id(family)],
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )


def continuation(result, inputs: dict) -> torch.Tensor:
    return result.sequences[:, inputs["input_ids"].shape[1] :]


def next_token(step_logits: torch.Tensor, family: str) -> torch.Tensor:
    """Greedy choice at the last position, never the image placeholder."""
    last = step_logits[:, -1].clone()
    last[:, image_token_id(family)] = float("-inf")
    return last.argmax(-1, keepdim=True)


def hook_count(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules()
    )


def attn_implementations(model) -> list[str]:
    return [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")]


def expected_counts(batch, keep_ratio: float) -> list[int]:
    return [math.ceil(keep_ratio * n - 1e-6) for n in visual_counts(batch)]


# -- adapter ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_adapter_names_parts_and_sites(saved_mllms, family):
    model = load(saved_mllms, family)
    adapter = adapt(model)
    assert isinstance(adapter, MLLMAdapter)
    assert adapter.num_layers == 4
    sites = adapter.sites()
    assert sites[-4:] == ["pre_llm", "llm.1", "llm.2", "llm.3"]
    # blocks strictly before the one whose output becomes the features (LLaVA: vision_feature_layer -2 of 3;
    # Qwen2-VL: its last of 2 blocks feeds the merger)
    assert [s for s in sites if s.startswith("vit.")] == ["vit.0"]
    assert adapter.spread_llm_sites(3) == ["llm.1", "llm.2", "llm.3"]
    for bad in ("llm.0", "llm.4", "vit.9", "block1"):
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            adapter.parse_site(bad)
    fingerprint = adapter.fingerprint()
    assert fingerprint["model_type"] == model.config.model_type
    assert fingerprint == adapt(load(saved_mllms, family)).fingerprint()


class Spy(TokenMethod):
    """Keeps every token and remembers the states it was shown."""

    name = "spy"
    site_kinds = ("pre_llm", "llm")

    def __init__(self):
        super().__init__()
        self.states: list[TokenState] = []

    def select(self, state, num_keep):
        self.states.append(state)
        return state.alive.clone()


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_visual_tokens_are_found_per_sample(saved_mllms, family):
    model, batch = load(saved_mllms, family), make_batch(family)
    spy = Spy()
    inputs = batch.inputs()
    with ts.apply(model, spy, keep_ratio=0.5, sites=["pre_llm", "llm.2"]):
        logits(model, inputs)
    first, second = spy.states
    assert (first.site, second.site) == ("pre_llm", "llm.2")
    image = inputs["input_ids"] == image_token_id(family)
    assert torch.equal(first.kind == 1, image)
    assert torch.equal(first.valid, inputs["attention_mask"].bool())
    assert torch.equal(first.protected, inputs["attention_mask"].bool() & ~image)
    assert first.prunable.sum(1).tolist() == visual_counts(batch)
    # images are numbered in batch order; sample 2 holds two of them
    assert [sorted(set(first.image_id[b][image[b]].tolist())) for b in range(3)] == [[0], [1], [2, 3]]
    coords = first.coords[image]
    if family == "llava":  # 4x4 patch grid, row-major
        expected = torch.tensor([(0, p // 4, p % 4) for p in range(16)] * 4)
    else:  # merged grids (1, 4, 4), (1, 4, 2), (1, 2, 4), (1, 4, 4)
        expected = torch.cat(
            [
                torch.stack(
                    torch.meshgrid(torch.arange(1), torch.arange(h), torch.arange(w), indexing="ij"), -1
                ).reshape(-1, 3)
                for h, w in ((4, 4), (4, 2), (2, 4), (4, 4))
            ]
        )
    assert torch.equal(coords, expected)
    # the text summary: mean of the text tokens and the last token's state
    text = first.protected
    torch.testing.assert_close(
        first.text_mean, (first.hidden * text.unsqueeze(-1)).sum(1) / text.sum(1, keepdim=True).float()
    )
    torch.testing.assert_close(first.text_last, first.hidden[:, -1])
    assert second.text_mean.shape == (3, model.config.text_config.hidden_size)


# -- every method x both families --------------------------------------------------------------------------


@pytest.mark.parametrize("method", MLLM_METHODS)
@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_keep_ratio_one_is_exact(saved_mllms, family, method):
    model, batch = load(saved_mllms, family), make_batch(family)
    inputs = batch.inputs()
    reference_logits, reference = logits(model, inputs), generate(model, inputs)
    with ts.apply(model, method, keep_ratio=1.0) as handle:
        assert torch.equal(logits(model, inputs), reference_logits)
        assert handle.last_records == [] and handle.kept_orig_index is None
        assert torch.equal(generate(model, inputs).sequences, reference.sequences)


@pytest.mark.parametrize("method", MLLM_METHODS)
@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_prunes_to_budget_and_removes_cleanly(saved_mllms, family, method):
    model, batch = load(saved_mllms, family), make_batch(family)
    inputs = batch.inputs()
    reference = logits(model, inputs)
    hooks_before, attn_before = hook_count(model), attn_implementations(model)

    handle = ts.apply(model, method, keep_ratio=0.5)
    handle.set_samples(torch.arange(batch.size))  # random draws per sample: the same samples again below
    pruned = logits(model, inputs)
    assert pruned.shape == reference.shape, "logits stay aligned with input_ids"
    assert torch.isfinite(pruned).all()
    assert not torch.allclose(pruned[:, -1], reference[:, -1], atol=1e-4)
    record = handle.last_records[-1]
    assert record.kept_visual.tolist() == expected_counts(batch, 0.5)
    assert record.target.tolist() == expected_counts(batch, 0.5)
    assert record.num_visual.tolist() == visual_counts(batch)
    kept = handle.kept_orig_index
    valid = kept >= 0
    text = inputs["attention_mask"].bool() & (inputs["input_ids"] != image_token_id(family))
    for b in range(batch.size):
        slots = kept[b][valid[b]]
        assert (slots.diff() > 0).all(), "kept tokens stay in their original order"
        assert set(text[b].nonzero().squeeze(1).tolist()) <= set(slots.tolist()), "text is never pruned"
        assert bool(valid[b, -1]), "padding slots go left: the last slot is the last token"
    # a second forward replaces the records
    logits(model, inputs)
    assert len(handle.last_records) == len(handle.sites)
    # disabled (a teacher pass), the model computes what the unpruned one does
    handle.enabled = False
    assert torch.equal(logits(model, inputs), reference)
    handle.enabled = True
    handle.set_samples(torch.arange(batch.size))
    torch.testing.assert_close(logits(model, inputs), pruned)

    handle.remove()
    assert hook_count(model) == hooks_before
    assert attn_implementations(model) == attn_before
    assert not any(hasattr(m, "tokensift_call") for m in model.modules())
    assert torch.equal(logits(model, inputs), reference)
    ts.apply(model, method, keep_ratio=0.5).remove()  # and it can be applied again


@pytest.mark.parametrize("method", [m for m in MLLM_METHODS if m != "random"])
@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_batch_matches_single_samples(saved_mllms, family, method):
    model, batch = load(saved_mllms, family), make_batch(family)
    with ts.apply(model, method, keep_ratio=0.5) as handle:
        batched = generate(model, batch.inputs())
        batched_kept = handle.last_records[-1].kept_visual.tolist()
        tokens = continuation(batched, batch.inputs())
        for i in range(batch.size):
            single = generate(model, batch.sample(i))
            assert handle.last_records[-1].kept_visual.tolist() == [batched_kept[i]]
            assert torch.equal(continuation(single, batch.sample(i))[0], tokens[i])
            for step_batched, step_single in zip(batched.logits, single.logits, strict=True):
                torch.testing.assert_close(step_single[0], step_batched[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("family", "method", "sites"),
    [
        ("llava", "visionzip", None),
        ("llava", "divprune", ["vit.0"]),
        ("qwen2_vl", "divprune", ["vit.0"]),
        ("qwen2_vl", "visionzip", None),
        ("qwen2_vl", "fastv", None),
    ],
)
def test_beam_search_repeats_each_samples_layout(saved_mllms, family, method, sites):
    """generate() encodes the images once and repeats each sample's row per beam; each copy keeps its layout."""
    model, batch = load(saved_mllms, family), make_batch(family)
    with ts.apply(model, method, keep_ratio=0.5, sites=sites) as handle:
        beams = generate(model, batch.inputs(), num_beams=2)
        per_beam = [count for count in expected_counts(batch, 0.5) for _ in range(2)]
        assert handle.last_records[-1].kept_visual.tolist() == per_beam
        tokens = continuation(beams, batch.inputs())
        for i in range(batch.size):
            single = continuation(generate(model, batch.sample(i), num_beams=2), batch.sample(i))[0]
            assert torch.equal(tokens[i, : single.numel()], single)  # the batch row may go on padding after EOS


@pytest.mark.parametrize("site", ["pre_llm", "llm.2"])
@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_pruning_equals_masking_the_dropped_tokens(saved_mllms, family, site):
    """Dropping tokens keeps everyone else's positions: the unpruned model, with the dropped tokens masked out
    of every layer from the site on, computes the same outputs for the kept tokens."""
    model, batch = load(saved_mllms, family), make_batch(family)
    inputs = batch.inputs()
    with ts.apply(model, "divprune", keep_ratio=0.5, sites=[site]) as handle:
        pruned = logits(model, inputs)
        kept_index = handle.kept_orig_index
    batch_size, length = inputs["input_ids"].shape
    kept = torch.zeros(batch_size, length, dtype=torch.bool)
    for b in range(batch_size):
        kept[b, kept_index[b][kept_index[b] >= 0]] = True
    assert bool((kept.sum(1) < inputs["attention_mask"].sum(1)).all())
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    visible = causal & kept[:, None, None, :]
    visible |= torch.eye(length, dtype=torch.bool)  # a dropped or padding row still has one key: no NaN
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
    assert not torch.allclose(masked[:, -1], logits(model, inputs)[:, -1], atol=1e-4), "the masking matters"


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_eager_attention_models_work_too(saved_mllms, family):
    """The masks the handle builds follow the model's kernel: eager gets additive float masks."""
    model, batch = load(saved_mllms, family), make_batch(family)
    model.set_attn_implementation("eager")
    inputs = batch.inputs()
    reference = logits(model, inputs)
    with ts.apply(model, "fastv", keep_ratio=1.0):
        assert torch.equal(logits(model, inputs), reference)
    with ts.apply(model, "pyramiddrop", keep_ratio=0.5):
        tokens = continuation(generate(model, inputs), inputs)
        for i in range(batch.size):
            assert torch.equal(continuation(generate(model, batch.sample(i)), batch.sample(i))[0], tokens[i])


class PinnedKeep(TokenMethod):
    """Keeps, at each site, the original tokens a previous run kept there (any tokens added since are text)."""

    name = "pinned"
    site_kinds = ("pre_llm", "llm")

    def __init__(self, kept: dict[str, torch.Tensor]):
        super().__init__()
        self.kept = kept

    def select(self, state, num_keep):
        kept = self.kept[state.site]
        member = (state.orig_index.unsqueeze(-1) == kept.unsqueeze(1)).any(-1) & (state.orig_index >= 0)
        return (member & state.alive) | state.protected


def uncached_greedy(model, inputs: dict, family: str, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding recomputing the whole sequence every step (no KV cache), with generate()'s positions."""
    inputs = dict(inputs)
    tokens, step_logits = [], []
    for _ in range(steps):
        forward = dict(inputs)
        if family == "llava":  # generate() counts positions over the real tokens; a plain forward would not
            mask = inputs["attention_mask"]
            forward["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        out = logits(model, forward)[:, -1].clone()
        step_logits.append(out.clone())
        out[:, image_token_id(family)] = float("-inf")
        token = out.argmax(-1, keepdim=True)
        tokens.append(token)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], token], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(token)], dim=1)
    return torch.cat(tokens, dim=1), step_logits


@pytest.mark.parametrize("method", [m for m in MLLM_METHODS if m not in MERGES_BY_TEXT])
@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_cached_decoding_matches_uncached_recomputation(saved_mllms, family, method):
    model, batch = load(saved_mllms, family), make_batch(family)
    inputs = batch.inputs()
    with ts.apply(model, method, keep_ratio=0.5) as handle:
        cached = generate(model, inputs)
        kept = {record.site: record.kept_orig_index for record in handle.last_records}
        sites = handle.sites
        if method in PREFIX_STABLE:
            tokens, step_logits = uncached_greedy(model, inputs, family, NEW_TOKENS)
            assert {r.site: r.kept_orig_index for r in handle.last_records}.keys() == kept.keys()
    if method not in PREFIX_STABLE:
        # a selection that reads the last token changes as tokens are appended: recompute with the cached run's
        with ts.apply(model, PinnedKeep(kept), keep_ratio=0.5, sites=sites):
            tokens, step_logits = uncached_greedy(model, inputs, family, NEW_TOKENS)
    assert torch.equal(tokens, continuation(cached, inputs))
    for uncached_step, cached_step in zip(step_logits, cached.logits, strict=True):
        torch.testing.assert_close(uncached_step, cached_step, atol=1e-4, rtol=1e-4)


# -- the exit mechanism (DyVTE): some samples drop every visual token at a layer, the others keep them all ---


class ExitSamples(TokenMethod):
    """Sample ``b`` drops all its visual tokens at site ``llm.<exit_layer[b]>`` (None: keeps them all)."""

    name = "exit_samples"
    site_kinds = ("llm",)

    def __init__(self, exit_layer: list[int | None]):
        super().__init__()
        self.exit_layer = exit_layer
        self.summaries = {}

    def select(self, state, num_keep):
        self.summaries[state.site] = (state.text_mean, state.text_last)
        exiting = torch.tensor([layer == state.layer for layer in self.exit_layer], device=state.hidden.device)
        return state.alive & ~(exiting.unsqueeze(1) & ~state.protected)


EXIT_SITES = ["llm.1", "llm.2", "llm.3"]


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_per_sample_visual_exit(saved_mllms, family):
    """DyVTE's mechanism: within one batch, each sample's visual tokens leave at its own layer, or never."""
    model, batch = load(saved_mllms, family), make_batch(family)
    exit_layer = [1, None, 3]
    unpruned = [generate(model, batch.sample(i)) for i in range(batch.size)]
    alone = []
    for i in range(batch.size):
        with ts.apply(model, ExitSamples([exit_layer[i]]), keep_ratio=0.5, sites=EXIT_SITES):
            alone.append(generate(model, batch.sample(i)))
    method = ExitSamples(exit_layer)
    with ts.apply(model, method, keep_ratio=0.5, sites=EXIT_SITES) as handle:
        together = generate(model, batch.inputs())
        kept = {record.site: record.kept_visual.tolist() for record in handle.last_records}
    n = visual_counts(batch)
    assert kept == {"llm.1": [0, n[1], n[2]], "llm.3": [0, n[1], 0]}  # llm.2: nobody exits, nothing changes
    tokens = continuation(together, batch.inputs())
    for i in range(batch.size):
        assert torch.equal(tokens[i], continuation(alone[i], batch.sample(i))[0])
        for step_together, step_alone in zip(together.logits, alone[i].logits, strict=True):
            torch.testing.assert_close(step_together[i], step_alone[0], atol=1e-4, rtol=1e-4)
    # the sample that keeps its visual tokens computes what the unpruned model does; an exiting one does not
    assert torch.equal(tokens[1], continuation(unpruned[1], batch.sample(1))[0])
    assert not torch.allclose(alone[0].logits[0], unpruned[0].logits[0], atol=1e-4)
    # the router's input at every layer: mean text state and last text state per sample
    assert set(method.summaries) == set(EXIT_SITES)
    for text_mean, text_last in method.summaries.values():
        assert text_mean.shape == text_last.shape == (batch.size, model.config.text_config.hidden_size)


def test_manual_decoding_without_position_ids_continues_from_the_unpruned_length(saved_mllms):
    """A hand-written decode loop passes no positions: the model must not count them from the shorter cache."""
    model, batch = load(saved_mllms, "llava"), make_batch("llava")
    inputs = batch.inputs()
    # pre_llm shortens every layer's cache, layer 0's included, from which Llama would count positions
    with ts.apply(model, "divprune", keep_ratio=0.5, sites=["pre_llm"]):
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            cache, mask, tokens = out.past_key_values, inputs["attention_mask"], []
            for _ in range(NEW_TOKENS):
                token = next_token(out.logits, "llava")
                tokens.append(token)
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        # a plain forward counts positions 0..L-1 over the whole input, padding included; so does the uncached run
        sequence, expected = dict(inputs), []
        for _ in range(NEW_TOKENS):
            token = next_token(logits(model, sequence), "llava")
            expected.append(token)
            sequence["input_ids"] = torch.cat([sequence["input_ids"], token], dim=1)
            sequence["attention_mask"] = torch.cat([sequence["attention_mask"], torch.ones_like(token)], dim=1)
    assert torch.equal(torch.cat(tokens, 1), torch.cat(expected, 1))


# -- vit.<i> sites (LLaVA's tower; Qwen2-VL's packed tower, by merge groups) ----------------------------


@pytest.mark.parametrize(
    ("family", "method"),
    [(f, m) for f in MLLM_FAMILIES for m in ("divprune", "l2norm")] + [("llava", "cls_attention"), ("llava", "tome")],
)
def test_vit_site_drops_the_same_patches_from_the_llm(saved_mllms, family, method):
    model, batch = load(saved_mllms, family), make_batch(family)
    reference = generate(model, batch.inputs())
    hooks_before = hook_count(model)
    with ts.apply(model, method, keep_ratio=1.0, sites=["vit.0"]):
        assert torch.equal(generate(model, batch.inputs()).sequences, reference.sequences)
    with ts.apply(model, method, keep_ratio=0.5, sites=["vit.0"]) as handle:
        batched = generate(model, batch.inputs())
        record = handle.last_records[-1]
        assert record.site == "vit.0"
        # each image keeps half of its own tokens (LLaVA: 16 patches; Qwen2-VL: 16, 8, 8 + 16 merge groups)
        assert record.kept_visual.tolist() == ([8, 8, 16] if family == "llava" else [8, 4, 12])
        tokens = continuation(batched, batch.inputs())
        for i in range(batch.size):
            single = generate(model, batch.sample(i))
            assert torch.equal(continuation(single, batch.sample(i))[0], tokens[i])
            for step_batched, step_single in zip(batched.logits, single.logits, strict=True):
                torch.testing.assert_close(step_single[0], step_batched[i], atol=1e-4, rtol=1e-4)
    assert hook_count(model) == hooks_before
    assert torch.equal(generate(model, batch.inputs()).sequences, reference.sequences)


def test_qwen2_vl_vit_site_keeps_the_merge_groups_the_method_ranks_first(saved_mllms):
    """l2norm at vit.0 keeps, per image, the merge groups whose block-0 states (mean over the group's 2x2 patches)
    have the largest norm; those groups' LLM tokens, and only they, stay in the LLM's input."""
    model, batch = load(saved_mllms, "qwen2_vl"), make_batch("qwen2_vl")
    inputs = batch.inputs()
    tower = adapt(model).tower_blocks
    seen = []
    hook = tower[0].register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    norms = seen[0].view(-1, 4, seen[0].shape[-1]).mean(1).norm(dim=-1)  # one per merge group, in LLM order
    expected, start = [], 0
    for t, h, w in batch.grids:
        count = t * h * w // 4
        top = norms[start : start + count].topk(count // 2).indices
        flags = torch.zeros(count, dtype=torch.bool)
        flags[top] = True
        expected.append(flags)
        start += count
    expected = torch.cat(expected)

    with torch.no_grad(), ts.apply(model, "l2norm", keep_ratio=0.5, sites=["vit.0"]) as handle:
        pruned = model(**inputs).logits
        kept_index = handle.kept_orig_index
    visual = inputs["input_ids"] == image_token_id("qwen2_vl")
    kept = torch.zeros_like(visual)
    for b in range(batch.size):
        kept[b, kept_index[b][kept_index[b] >= 0]] = True
    assert torch.equal(kept[visual], expected)  # visual tokens fill in row-major batch order, as the features
    assert torch.isfinite(pruned).all()


def test_qwen2_vl_vit_site_prunes_a_video_frame_by_frame(saved_mllms):
    """A video's frames are separate attention chunks in the tower; pruning rebuilds them, an emptied frame included."""
    from tiny_mllm import QWEN_VIDEO_TOKEN, QWEN_VISION_END, QWEN_VISION_START

    model = load(saved_mllms, "qwen2_vl")
    t, h, w = 3, 4, 8  # 3 frames of 4x8 patches: 8 merge groups each
    ids = torch.tensor([[1, 5, QWEN_VISION_START, *[QWEN_VIDEO_TOKEN] * (t * h * w // 4), QWEN_VISION_END, 7, 9]])
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values_videos=torch.randn(t * h * w, 96, generator=torch.Generator().manual_seed(0)),
        video_grid_thw=torch.tensor([[t, h, w]]),
        mm_token_type_ids=(ids == QWEN_VIDEO_TOKEN).long() * 2,
    )
    reference = logits(model, inputs)
    with ts.apply(model, "divprune", keep_ratio=1.0, sites=["vit.0"]):
        assert torch.equal(logits(model, inputs), reference)
    for budget, kept in (({"keep_ratio": 0.5}, 12), ({"keep_count": 1}, 1)):  # keep_count 1 empties two frames
        with ts.apply(model, "divprune", sites=["vit.0"], **budget) as handle:
            pruned = logits(model, inputs)
            assert handle.last_records[-1].kept_visual.tolist() == [kept]
            assert torch.isfinite(pruned).all() and not torch.allclose(pruned[:, -1], reference[:, -1], atol=1e-4)
            assert generate(model, inputs).sequences.shape == (1, ids.shape[1] + NEW_TOKENS)


@pytest.mark.parametrize(("method", "needle"), [("tome", "merges tokens"), ("cls_attention", "attention")])
def test_packed_tower_refuses_methods_it_cannot_run(saved_mllms, method, needle):
    model = load(saved_mllms, "qwen2_vl")
    with pytest.raises(ValueError, match=needle):
        ts.apply(model, method, keep_ratio=0.5, sites=["vit.0"])
    assert ts.apply(model, "random", keep_ratio=0.5, sites=["vit.0"]).remove() is None  # nothing left behind


# -- method rules on hand-made states ------------------------------------------------------------------


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_fastv_keeps_the_tokens_the_last_token_attends_to_most(saved_mllms, family):
    """The attention captured at layer K-1 is the eager attention of the unpruned model (causal, GQA, padding)."""
    model, batch = load(saved_mllms, family), make_batch(family)
    inputs = batch.inputs()
    eager = load(saved_mllms, family)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        forward = dict(inputs)
        if family == "llava":
            forward["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        attention = eager(**forward, output_attentions=True).attentions[1]  # layer K-1 = 1
    score = attention[:, :, -1].mean(1)  # the last token's row, averaged over heads
    image = inputs["input_ids"] == image_token_id(family)
    with ts.apply(model, "fastv", keep_ratio=0.5, sites=["llm.2"]) as handle:
        logits(model, forward)
        kept = handle.kept_orig_index
    for b, count in enumerate(expected_counts(batch, 0.5)):
        visual = image[b].nonzero().squeeze(1)
        top = visual[score[b, visual].topk(count).indices]
        kept_visual = [i for i in kept[b].tolist() if i >= 0 and bool(image[b, i])]
        assert sorted(top.tolist()) == kept_visual


def _state(hidden, protected, **fields) -> TokenState:
    b, n, _ = hidden.shape
    return TokenState(
        hidden=hidden,
        protected=protected,
        orig_index=torch.arange(n).expand(b, n),
        size=torch.ones(b, n),
        grid=(0, 0),
        num_prefix=0,
        site=fields.pop("site", "pre_llm"),
        layer=-1,
        valid=torch.ones(b, n, dtype=torch.bool),
        **fields,
    )


def test_visionzip_keeps_dominant_tokens_and_averages_groups_into_anchors():
    # tokens 0..5 visual, 6 text; tower attention ranks 4 > 1 > others
    hidden = torch.arange(7, dtype=torch.float32).reshape(1, 7, 1).repeat(1, 1, 2)
    protected = torch.tensor([[False] * 6 + [True]])
    importance = torch.tensor([[0.0, 0.8, 0.1, 0.1, 0.9, 0.1, 0.0]])
    # keys: tokens 0, 2 point one way, 3, 5 another
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [-1.0, 0.0], [0.0, 1.0], [-1.0, 0.1], [0.0, 0.0]]])
    state = _state(hidden, protected, tower_attention=importance, tower_keys=keys)
    method = VisionZipMethod(VisionZipMethod.config_class(contextual_fraction=0.5))
    decision = method.reduce(state, torch.tensor([4]))
    keep, merged = decision.keep, decision.hidden
    # 2 dominant (4, 1) + 2 contextual anchors among the rest [0, 2, 3, 5]: every 2nd, i.e. 0 and 3
    assert keep[0].nonzero().squeeze(1).tolist() == [0, 1, 3, 4, 6]
    assert merged[0, 0, 0].item() == pytest.approx((0 + 2) / 2)  # 2 joins anchor 0
    assert merged[0, 3, 0].item() == pytest.approx((3 + 5) / 2)  # 5 joins anchor 3
    assert torch.equal(merged[0, [1, 4, 6]], hidden[0, [1, 4, 6]])


def test_dart_keeps_image_pivots_and_the_tokens_least_like_the_pivots():
    # visual tokens 0..5, then the question 6, 7; keys: token 2 has the largest visual norm, token 7 the largest text
    hidden = torch.tensor(
        [[[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.7, 0.7], [-1.0, -0.1], [0.9, 0.1], [1.0, 1.0], [1.0, 0.0]]]
    )
    keys = torch.ones(1, 8, 3) * torch.tensor([1.0, 1, 5, 1, 1, 1, 1, 9]).view(1, 8, 1)
    protected = torch.tensor([[False] * 6 + [True, True]])
    state = _state(hidden, protected, keys=keys, site="llm.2")
    state.normed_hidden = hidden  # the similarity space (the LM's final norm of hidden; a unit weight here)
    keep = DARTMethod(DARTConfig(image_pivots=1, text_pivots=1)).select(state, torch.tensor([3]))
    # pivot 2 is kept; each pivot then claims one token: the least like token 2 (0, 1) is 4 (cos -0.1),
    # the least like token 7 (1, 0) among the rest is 3 (cos 0.71)
    assert keep[0].nonzero().squeeze(1).tolist() == [2, 3, 4, 6, 7]


def test_d2pruner_debiasing_removes_a_positional_trend():
    positions = torch.arange(10)
    content = torch.tensor([0.0, 2, 0, 0, 1, 0, 0, 0, 0.5, 0])
    attention = torch.exp(content + 1.0 * positions)  # later tokens inflated, as an LLM's recency bias
    debiased = debiased_importance(attention, positions)
    assert debiased.argsort(descending=True)[:3].tolist() == [1, 4, 8]  # by content, strongest first
    assert attention.argsort(descending=True)[0].item() == 9  # what raw attention would pick


def test_d2pruner_independent_sets_skip_neighbours_then_take_another_round():
    # a path 0-1-2-3-4; importance order 1, 2, 0, 3, 4; pivot: none
    adjacency = torch.zeros(5, 5, dtype=torch.bool)
    for a in range(4):
        adjacency[a, a + 1] = adjacency[a + 1, a] = True
    order = torch.tensor([1, 2, 0, 3, 4])
    none = torch.zeros(5, dtype=torch.bool)
    assert greedy_independent_sets(order, adjacency, none, 2).nonzero().squeeze(1).tolist() == [1, 3]
    # a third token: round 1 gives {1, 3} only (0, 2, 4 are neighbours), round 2 takes the best left, 2
    assert greedy_independent_sets(order, adjacency, none, 3).nonzero().squeeze(1).tolist() == [1, 2, 3]
    # a pivot blocks its neighbours in the first round
    pivot = torch.tensor([False, False, True, False, False])
    assert greedy_independent_sets(order, adjacency, pivot, 2).nonzero().squeeze(1).tolist() == [0, 2, 4]


# -- bad inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(method="fastv", keep_ratio=0.5, sites=["pre_llm"]), "pre_llm"),
        (dict(method="visionzip", keep_ratio=0.5, sites=["llm.2"]), "llm.2"),
        (dict(method="divprune", keep_ratio=0.5, sites=["llm.0"]), "llm.0"),
        (dict(method="divprune", keep_ratio=0.5, sites=["vit.0", "llm.2"]), "vit"),
        (dict(method="divprune", keep_ratio=0.5, sites=["llm.2", "llm.2"]), "distinct"),
        (dict(method="divprune", keep_ratio=0.5, mode="train"), "gather"),
        (dict(method="divprune", keep_ratio={"llm.1": 0.5}, sites=["llm.2"]), "keep_ratio"),
        (dict(method="tome", keep_ratio=0.5, sites=["pre_llm"]), "tome"),
        (dict(method="fastv", keep_ratio=0), "keep_ratio"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_field(saved_mllms, kwargs, needle):
    model, batch = load(saved_mllms, "llava"), make_batch("llava")
    reference, hooks = logits(model, batch.inputs()), hook_count(model)
    with pytest.raises(ValueError) as info:
        ts.apply(model, **kwargs)
    assert needle in str(info.value)
    assert hook_count(model) == hooks
    assert torch.equal(logits(model, batch.inputs()), reference)


def test_second_apply_is_refused_until_the_first_is_removed(saved_mllms):
    model = load(saved_mllms, "qwen2_vl")
    handle = ts.apply(model, "divprune", keep_ratio=0.5)
    with pytest.raises(ValueError, match="already has a tokensift method"):
        ts.apply(model, "fastv", keep_ratio=0.5)
    handle.remove()
    ts.apply(model, "fastv", keep_ratio=0.5).remove()


def test_multimodal_methods_refuse_a_vision_model():
    from conftest import build_tiny

    with pytest.raises(ValueError, match="multimodal LLM"):
        ts.apply(build_tiny("vit"), "fastv", keep_ratio=0.5)


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_text_only_forward_is_untouched(saved_mllms, family):
    model = load(saved_mllms, family)
    inputs = dict(input_ids=torch.tensor([[1, 5, 6, 7, 8]]), attention_mask=torch.ones(1, 5, dtype=torch.long))
    reference = logits(model, inputs)
    with ts.apply(model, "fastv", keep_ratio=0.5) as handle:
        assert torch.equal(logits(model, inputs), reference)
        assert handle.last_records == []
