"""Per-sample randomness: ``random``, the benchmark's oracle and DynamicViT's Gumbel noise draw per sample.

Each sample's draw is a function of (seed, its sample index, the draw, the site, the token), never of its
row in a batch: over a test set every sample gets its own mask, the same seed gives the same masks, and
batch size, batch composition and padding change nothing.
"""

from __future__ import annotations

import pytest
import torch
from tiny_mllm import LLAVA_IMAGE_TOKEN, LLAVA_PATCHES, PAD, build_tiny_mllm, make_batch
from transformers import ViTConfig, ViTForImageClassification

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.bench.oracle import MLLMOracleMethod, OracleMethod
from tokensift.bench.runner import oracle_on_model_grid
from tokensift.data import ClutteredDigitsDataModule
from tokensift.data.digit_vqa import DigitVQA, DigitVQACollator
from tokensift.scorers.dynamicvit import DynamicViTMethod
from tokensift.scorers.random import RandomConfig, RandomMethod
from tokensift.state import SampleCounter, TokenState, keyed_uniform

TEST_SAMPLES = 24
KEEP_RATIO = 0.5  # 8 of 16 patches: 12870 possible masks, so equal masks of different samples mean shared noise


def digits_vit() -> torch.nn.Module:
    """A tiny ViT on the 32x32 cluttered digits with the data's 8-pixel patches (a 4x4 grid)."""
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    return ViTForImageClassification(config).eval()


def test_loader(batch_size: int) -> list[dict]:
    data = ClutteredDigitsDataModule(
        canvas_size=32,
        clutter_size=(2, 3),
        num_clutter=3,
        train_samples=8,
        val_samples=8,
        test_samples=TEST_SAMPLES,
        batch_size=batch_size,
    )
    data.setup("test")
    return list(data.test_dataloader())


test_loader.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return digits_vit()


@pytest.fixture(scope="module")
def batches() -> dict[int, list[dict]]:
    return {size: test_loader(size) for size in (4, 8)}


def kept_per_sample(model, batches, method, name_samples: bool = True, oracle: str | None = None) -> dict[int, tuple]:
    """Sample index -> the patch indices it kept, over the whole test set; ``oracle``: "data" gives the oracle
    the batch's oracle mask, "none" an empty one (so it ranks by its noise alone)."""
    out = {}
    with torch.no_grad(), ts.apply(model, method, keep_ratio=KEEP_RATIO) as handle:
        for batch in batches:
            if oracle is not None:
                mask = oracle_on_model_grid(batch["oracle_mask"], batch["pixel_values"].shape, (4, 4))
                method.oracle_mask = mask if oracle == "data" else torch.zeros_like(mask)
            if name_samples:
                handle.set_samples(batch["index"])
            model(pixel_values=batch["pixel_values"])
            for index, kept in zip(batch["index"].tolist(), handle.kept_orig_index.tolist(), strict=True):
                out[index] = tuple(kept)
    return out


# -- random on a vision backbone ---------------------------------------------------------------------------
def test_loaders_carry_each_samples_dataset_index(batches):
    for size, loader in batches.items():
        assert torch.equal(torch.cat([b["index"] for b in loader]), torch.arange(TEST_SAMPLES)), size
    vqa = DigitVQA("test", 6, seed=1)
    batch = DigitVQACollator(vqa.tokenizer.pad_token_id)([vqa[i] for i in (4, 1, 5)])
    assert batch["index"].tolist() == [4, 1, 5]


def test_random_masks_differ_between_samples_and_repeat_per_seed(model, batches):
    masks = kept_per_sample(model, batches[4], RandomMethod(RandomConfig(seed=0)))
    assert sorted(masks) == list(range(TEST_SAMPLES))
    # before: one generator re-seeded per call, so row b of every batch kept the same tokens (4 masks in all)
    assert len(set(masks.values())) == TEST_SAMPLES, "every sample of the test set draws its own mask"
    assert kept_per_sample(model, batches[4], RandomMethod(RandomConfig(seed=0))) == masks, "same seed, same masks"
    other = kept_per_sample(model, batches[4], RandomMethod(RandomConfig(seed=1)))
    assert sum(other[i] != masks[i] for i in masks) >= TEST_SAMPLES - 1, "another seed draws anew"


def test_random_masks_do_not_depend_on_batch_size_or_composition(model, batches):
    by_four = kept_per_sample(model, batches[4], RandomMethod(RandomConfig(seed=3)))
    assert kept_per_sample(model, batches[8], RandomMethod(RandomConfig(seed=3))) == by_four
    # a shuffled batch of other sizes: each sample still keeps its own mask
    everything = {k: torch.cat([b[k] for b in batches[8]]) for k in ("pixel_values", "index")}
    order = torch.tensor([17, 2, 9, 23, 0])
    shuffled = [{k: v[order] for k, v in everything.items()}]
    again = kept_per_sample(model, shuffled, RandomMethod(RandomConfig(seed=3)))
    assert again == {i: by_four[i] for i in order.tolist()}
    # without set_samples the handle numbers rows in arrival order: an in-order test loader gets dataset indices
    for size in (4, 8):
        counted = kept_per_sample(model, batches[size], RandomMethod(RandomConfig(seed=3)), name_samples=False)
        assert counted == by_four, size


def test_random_repeats_a_forward_only_for_the_same_samples(model, batches):
    x = batches[4][0]["pixel_values"]
    with torch.no_grad(), ts.apply(model, "random", keep_ratio=KEEP_RATIO, seed=5) as handle:
        model(pixel_values=x)
        first = handle.kept_orig_index.clone()
        model(pixel_values=x)  # rows 4..7 in arrival order: other samples, other masks
        assert not any(torch.equal(a, b) for a, b in zip(first, handle.kept_orig_index, strict=True))
        handle.set_samples(torch.arange(4))
        model(pixel_values=x)
        assert torch.equal(handle.kept_orig_index, first)


def test_unseeded_random_still_follows_torch_global_generator(model, batches):
    x = batches[4][0]["pixel_values"]
    kept = []
    for _ in range(2):
        torch.manual_seed(11)
        with torch.no_grad(), ts.apply(model, "random", keep_ratio=KEEP_RATIO, seed=None) as handle:
            model(pixel_values=x)
            kept.append(handle.kept_orig_index)
    assert torch.equal(*kept)


# -- the benchmark's oracle ------------------------------------------------------------------------------------
def test_oracle_fills_with_per_sample_noise(model, batches):
    masks = kept_per_sample(model, batches[4], OracleMethod(seed=0), oracle="data")
    assert kept_per_sample(model, batches[8], OracleMethod(seed=0), oracle="data") == masks
    assert kept_per_sample(model, batches[4], OracleMethod(seed=0), oracle="data", name_samples=False) == masks
    target_patches = {}
    for batch in batches[4]:
        grid_mask = oracle_on_model_grid(batch["oracle_mask"], batch["pixel_values"].shape, (4, 4))
        for index, row in zip(batch["index"].tolist(), grid_mask, strict=True):
            target_patches[index] = set((row.nonzero().squeeze(1) + 1).tolist())  # +1: after [CLS]
    fills = {}
    for index, kept in masks.items():
        target = target_patches[index]
        if len(target) <= 8:
            assert target <= set(kept), "every target patch survives when the budget allows"
        fills[index] = tuple(sorted(set(kept) - target - {0}))
    assert len(set(fills.values())) == TEST_SAMPLES, "the random others differ from sample to sample"
    # with no oracle patches the oracle ranks by its noise alone: before, row b of every batch kept the same
    noise_only = kept_per_sample(model, batches[4], OracleMethod(seed=0), oracle="none")
    assert len(set(noise_only.values())) == TEST_SAMPLES
    assert kept_per_sample(model, batches[8], OracleMethod(seed=0), oracle="none") == noise_only


def test_bench_rows_of_random_and_oracle_do_not_depend_on_the_batch_size(model, tmp_path):
    from tokensift.bench import run_bench

    backbone = tmp_path / "backbone"
    model.save_pretrained(backbone)
    rows = {}
    for batch_size in (8, 12):
        data = dict(canvas_size=32, clutter_size=(2, 3), num_clutter=3, test_samples=TEST_SAMPLES)
        result = run_bench(
            str(backbone),
            ClutteredDigitsDataModule(**data, batch_size=batch_size),
            ["random"],
            [0.25],
            out=tmp_path / f"out{batch_size}",
            repeats=1,
            warmup=0,
            quiet=True,
        )
        rows[batch_size] = {(r["method"], r["keep_ratio"]): (r["accuracy"], r["oracle_recall"]) for r in result["rows"]}
    assert {"random", "oracle"} <= {method for method, _ in rows[8]}
    assert rows[8] == rows[12], "each test sample keeps the same tokens at any batch size"


def test_mllm_oracle_and_random_draw_per_sample_whatever_the_padding():
    """pre_llm on LLaVA: a sample keeps the same visual tokens alone and left-padded in a batch."""
    model = build_tiny_mllm("llava")
    batch = make_batch("llava")
    rows = [r for r in batch.rows if r.count(LLAVA_IMAGE_TOKEN) == LLAVA_PATCHES]  # one image each
    pixels = [batch.pixels[batch.images[i][0]] for i, r in enumerate(batch.rows) if r in rows]

    def inputs(indices):
        length = max(len(rows[i]) for i in indices)
        return dict(
            input_ids=torch.tensor([[PAD] * (length - len(rows[i])) + rows[i] for i in indices]),
            attention_mask=torch.tensor([[0] * (length - len(rows[i])) + [1] * len(rows[i]) for i in indices]),
            pixel_values=torch.stack([pixels[i] for i in indices]),
        )

    def kept_visual(handle, call_inputs) -> list[tuple]:
        """Per row: the kept visual tokens as ranks among the row's image tokens."""
        out = []
        for ids, kept in zip(call_inputs["input_ids"], handle.kept_orig_index, strict=True):
            visual = (ids == LLAVA_IMAGE_TOKEN).nonzero().squeeze(1).tolist()
            out.append(tuple(visual.index(k) for k in kept.tolist() if k >= 0 and k in visual))
        return out

    oracle_rows = torch.zeros(len(rows), LLAVA_PATCHES, dtype=torch.bool)
    oracle_rows[:, :3] = True
    for method in (RandomMethod(RandomConfig(seed=0)), MLLMOracleMethod(seed=0)):
        with torch.no_grad(), ts.apply(model, method, keep_ratio=0.5, sites=["pre_llm"]) as handle:
            both = inputs([0, 1])
            method.oracle_mask = oracle_rows
            handle.set_samples(torch.tensor([40, 41]))
            model(**both)
            together = kept_visual(handle, both)
            assert together[0] != together[1], f"{method.name}: two samples, two draws"
            for i in range(2):
                alone = inputs([i])
                method.oracle_mask = oracle_rows[i : i + 1]
                handle.set_samples(torch.tensor([40 + i]))
                model(**alone)
                assert kept_visual(handle, alone) == [together[i]], f"{method.name}: padding changed sample {i}"
            if isinstance(method, MLLMOracleMethod):
                assert all({0, 1, 2} <= set(kept) for kept in together), "the oracle patches come first"


def test_generate_beams_of_a_sample_share_its_random_draw():
    model = build_tiny_mllm("llava")
    batch = make_batch("llava")
    inputs = batch.inputs([0, 1])
    with torch.no_grad(), ts.apply(model, "random", keep_ratio=0.5, sites=["pre_llm"]) as handle:
        handle.set_samples(torch.tensor([7, 8]))  # one index per sample; generate() repeats each row per beam
        model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=PAD)
        kept = handle.kept_orig_index
        assert kept.shape[0] == 4
        assert torch.equal(kept[0], kept[1]) and torch.equal(kept[2], kept[3]), "beams of a sample share a layout"
        assert not torch.equal(kept[0], kept[2])
        with pytest.raises(ValueError, match="set_samples named 3 samples"):
            handle.set_samples(torch.tensor([1, 2, 3]))
            model(**inputs)


# -- DynamicViT's Gumbel noise in training ------------------------------------------------------------------
def gumbel_policies(model, method, parts: list[torch.Tensor], pixel_values, draw) -> dict[int, torch.Tensor]:
    """Sample index -> its last-site training policy, with the batch cut into ``parts`` (index tensors)."""
    out = {}
    with torch.no_grad(), ts.apply(model, method, keep_ratio=0.5, mode="mask") as handle:
        method.train()
        for index in parts:
            handle.set_samples(index, draw=draw)
            model(pixel_values=pixel_values[index])
            for i, policy in zip(index.tolist(), handle.last_records[-1].policy, strict=True):
                out[i] = policy.round()
    return out


def test_dynamicvit_gumbel_noise_is_a_function_of_sample_and_step(model, batches):
    method = DynamicViTMethod.for_backbone(adapt(model))
    pixel_values = torch.cat([b["pixel_values"] for b in batches[8]])[:8]
    whole = gumbel_policies(model, method, [torch.arange(8)], pixel_values, draw=(0, 0))
    split = gumbel_policies(
        model, method, [torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5, 7])], pixel_values, (0, 0)
    )
    assert whole.keys() == split.keys()
    for i in whole:
        assert torch.equal(whole[i], split[i]), f"sample {i}: one batch of 8 and two ranks of 4 draw alike"
    # the noise, not only the logits, differs between samples and steps: with a constant scorer only noise ranks
    for predictor in method.predictors:
        torch.nn.init.zeros_(predictor.head[-1].weight)
    flat = gumbel_policies(model, method, [torch.arange(8)], pixel_values, draw=(0, 0))
    assert len({tuple(p.tolist()) for p in flat.values()}) == 8, "each sample draws its own noise"
    next_step = gumbel_policies(model, method, [torch.arange(8)], pixel_values, draw=(0, 1))
    assert all(not torch.equal(flat[i], next_step[i]) for i in flat), "the next step draws anew"
    again = gumbel_policies(model, method, [torch.arange(8)], pixel_values, draw=(0, 1))
    assert all(torch.equal(again[i], next_step[i]) for i in again), "the same (sample, step) draws the same"


# -- the noise itself and the errors ---------------------------------------------------------------------------
def test_keyed_uniform_is_uniform_and_independent_of_the_row():
    keys = torch.arange(64).expand(256, -1)
    values = keyed_uniform(12345, torch.arange(256), keys)
    assert values.dtype == torch.float32 and float(values.min()) >= 0 and float(values.max()) < 1
    assert abs(float(values.mean()) - 0.5) < 0.01 and abs(float(values.var()) - 1 / 12) < 0.005
    assert torch.equal(keyed_uniform(12345, torch.tensor([200, 3]), keys[:2]), values[[200, 3]])
    histogram = torch.histc(values, bins=10, min=0, max=1) / values.numel()
    assert (histogram - 0.1).abs().max() < 0.01, histogram


def test_a_state_without_sample_index_counts_rows():
    state = TokenState(
        hidden=torch.zeros(2, 5, 4),
        protected=torch.zeros(2, 5, dtype=torch.bool),
        orig_index=torch.arange(5).expand(2, -1),
        size=torch.ones(2, 5),
        grid=(1, 5),
        num_prefix=0,
        site="vit.0",
        layer=0,
    )
    with pytest.raises(ValueError, match="sample_index is None"):
        state.uniform(0)
    method = RandomMethod(RandomConfig(seed=0))
    first, second = method.score(state), method.score(state)
    assert not torch.equal(first, second) and not torch.equal(first[0], first[1])
    counter = SampleCounter()
    assert counter.take(2).tolist() == [0, 1] and counter.take(1).tolist() == [2]


@pytest.mark.parametrize(
    ("index", "draw", "needle"),
    [
        (torch.tensor([0.0, 1.0]), (), "index must be a 1-D tensor of non-negative integer"),
        (torch.tensor([[0, 1]]), (), "index must be a 1-D tensor"),
        (torch.tensor([0, -1]), (), "non-negative"),
        (torch.tensor([0, 1]), (0, -2), "draw must be non-negative integers"),
    ],
)
def test_bad_set_samples_arguments_are_named(model, index, draw, needle):
    with ts.apply(model, "random", keep_ratio=0.5) as handle, pytest.raises(ValueError, match=needle):
        handle.set_samples(index, draw=draw)


def test_set_samples_must_name_every_row(model):
    with ts.apply(model, "random", keep_ratio=0.5) as handle:
        handle.set_samples(torch.arange(3))
        with pytest.raises(ValueError, match="named 3 samples but the forward pass has 2 rows"):
            model(pixel_values=torch.randn(2, 3, 32, 32))


def test_random_seed_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="seed must be a non-negative integer or None"):
        RandomConfig(seed=-1)


def test_qwen2_vl_packed_tower_random_draws_follow_the_sample():
    """vit.0 on Qwen2-VL's packed tower: a one-image sample keeps the same merge groups alone and in a batch."""
    from tiny_mllm import image_token_id

    model = build_tiny_mllm("qwen2_vl")
    batch = make_batch("qwen2_vl")  # samples 0 and 1 carry one image each

    def kept_visual(handle, call_inputs) -> list[tuple]:
        out = []
        for ids, kept in zip(call_inputs["input_ids"], handle.kept_orig_index, strict=True):
            visual = (ids == image_token_id("qwen2_vl")).nonzero().squeeze(1).tolist()
            out.append(tuple(visual.index(k) for k in kept.tolist() if k >= 0 and k in visual))
        return out

    with torch.no_grad(), ts.apply(model, RandomMethod(RandomConfig(seed=0)), keep_ratio=0.5, sites=["vit.0"]) as h:
        both = batch.inputs([0, 1])
        h.set_samples(torch.tensor([40, 41]))
        model(**both)
        together = kept_visual(h, both)
        for i in range(2):
            alone = batch.inputs([i])
            h.set_samples(torch.tensor([40 + i]))
            model(**alone)
            assert kept_visual(h, alone) == [together[i]], f"batching changed sample {i}'s draw"
        again = batch.inputs([0])
        h.set_samples(torch.tensor([7]))
        model(**again)
        assert kept_visual(h, again) != [together[0]], "another sample index, another draw"
