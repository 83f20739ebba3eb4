"""Tests for the video digit-VQA task (tokensift.data.video_vqa): determinism, splits, time-dependent answers,
the oracle's alignment with each family's visual tokens, both processor layouts on the real HF models."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tokensift.backbones.pretrain_mllm import build_mllm
from tokensift.backbones.vqa import mllm_inputs
from tokensift.data.contract import VQABatchError, check_vqa_batch
from tokensift.data.digits import normalize
from tokensift.data.video_vqa import (
    ANSWER_WORDS,
    QUESTION_TYPES,
    VideoDigitVQA,
    VideoDigitVQADataModule,
    molmo2_video_inputs,
    qwen2_vl_video_patches,
)
from tokensift.data.vqa import IGNORE_INDEX, qwen2_vl_patches

FAMILIES = ("molmo2", "qwen2_vl")
TINY_MODEL = dict(vision_hidden_size=32, vision_layers=2, text_hidden_size=32, text_layers=1)


def _split(family: str = "molmo2", split: str = "train", num_samples: int = 64, **options) -> VideoDigitVQA:
    return VideoDigitVQA(split, num_samples, family=family, seed=2, **options)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_items_are_a_function_of_seed_split_and_index(family):
    first, again = _split(family), _split(family)
    assert all(_equal(first[i], again[i]) for i in (0, 5, 17))
    assert _equal(first[9], first[9]) and not torch.equal(first[3]["frames"], first[4]["frames"])
    other_seed = VideoDigitVQA("train", 64, family=family, seed=3)
    assert not torch.equal(other_seed[0]["frames"], first[0]["frames"])


def test_splits_draw_from_disjoint_source_digits():
    sources = {}
    for split in ("train", "val", "test"):
        dataset = _split(split=split, num_samples=40)
        used = {d.source for i in range(40) for d in dataset.sample_spec(i).digits}
        used |= {b[0] for i in range(40) for b in dataset.sample_spec(i).background}
        assert used <= set(dataset.source_indices.tolist())
        sources[split] = set(dataset.source_indices.tolist())
    assert not sources["train"] & sources["val"] and not sources["train"] & sources["test"]
    assert not sources["val"] & sources["test"]


def test_background_is_static_and_digits_follow_their_windows():
    dataset = _split(num_samples=32)
    for index in range(32):
        spec = dataset.sample_spec(index)
        frames, relevant, classes = dataset.render(spec)
        assert frames.shape == (spec.num_frames, 84, 84)
        digit_ink = classes != IGNORE_INDEX
        background = np.where(digit_ink, 0, frames)
        # away from every digit's pixels each frame equals the first: the clutter does not change
        covered = digit_ink.any(0)
        assert np.array_equal(background[:, ~covered], np.repeat(background[:1, ~covered], len(frames), 0))
        for digit in spec.digits:
            shown = [(classes[t] == dataset.digit_class(digit)).any() for t in range(spec.num_frames)]
            assert shown == [t in digit.shown for t in range(spec.num_frames)]
        assert relevant.any() and not (relevant & ~digit_ink).any()


def test_answers_depend_on_time():
    dataset = _split(num_samples=200, question_types=("first", "last"))
    rng = np.random.default_rng(0)
    changed = answered = 0
    for index in range(200):
        spec = dataset.sample_spec(index)
        order = [*rng.permutation(spec.num_frames - 1).tolist(), spec.num_frames - 1]  # the last frame stays
        shuffled = dataset.permuted_spec(spec, order)
        answer = dataset.answer(shuffled)
        if answer:  # onsets stay distinct: one answer, that of the shuffled onsets
            answered += 1
            changed += answer != dataset.answer(spec)
            onsets = {dataset.digit_class(d): d.onset for d in shuffled.digits}
            pick = min if spec.question_type == "first" else max
            assert answer == str(pick(onsets, key=onsets.get))
            # the rendered shuffled item shows the same frames in the new order, the same last frame
            assert torch.equal(dataset.item(shuffled, index)["frames"], dataset[index]["frames"][order])
    # a shuffle keeps a digit's frame count, which correlates with its onset: it moves the onsets of some videos only
    assert answered >= 100 and changed >= 0.1 * answered
    reverse = list(range(dataset.sample_spec(0).num_frames))[::-1]
    with pytest.raises(ValueError, match="order"):
        dataset.permuted_spec(dataset.sample_spec(0), reverse[:-1])


def test_moving_digit_is_the_answer_and_single_frame_keeps_the_last_frame():
    dataset = _split(num_samples=40, question_types=("moves",))
    single = _split(num_samples=40, question_types=("moves",), single_frame=True)
    for index in range(40):
        spec = dataset.sample_spec(index)
        movers = [d for d in spec.digits if d.moves]
        assert len(movers) == 1 and dataset.answer(spec) == str(dataset.digit_class(movers[0]))
        full, last = dataset[index], single[index]
        assert torch.equal(last["frames"], full["frames"][-1:]) and last["num_frames"] == 1
        assert last["answer_id"] == full["answer_id"]
        assert len(last["oracle_mask"]) == dataset.tokens_per_frame


def test_answers_are_balanced_and_single_tokens():
    dataset = _split(num_samples=2000)
    answers = Counter()
    kinds = Counter()
    for index in range(2000):
        _, answer, kind = dataset.question_answer(index)
        answers[(kind, answer)] += 1
        kinds[kind] += 1
        assert answer in ANSWER_WORDS
    assert set(kinds) == set(QUESTION_TYPES) and min(kinds.values()) > 400
    for kind in ("first", "last", "moves"):
        counts = [answers[(kind, str(d))] for d in range(10)]
        assert min(counts) > 0.4 * max(counts), (kind, counts)
    frame_counts = [answers[("count_frames", str(n))] for n in range(1, 9)]
    assert min(frame_counts) > 0.4 * max(frame_counts), frame_counts


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_marks_the_visual_tokens_of_the_needed_digits(family):
    dataset = _split(family, num_samples=24, min_frames=3, max_frames=7)
    cell, grid, temporal = dataset.token_cell, dataset.grid_size, dataset.temporal_patch
    for index in range(24):
        spec = dataset.sample_spec(index)
        item = dataset[index]
        _, relevant, _ = dataset.render(spec)
        frames = -(-spec.num_frames // temporal) * temporal
        padded = np.concatenate([relevant, np.repeat(relevant[-1:], frames - spec.num_frames, 0)])
        expected = []
        for start in range(0, frames, temporal):  # per frame (Molmo2) / temporal patch (Qwen2-VL), raster order
            ink = padded[start : start + temporal].any(0)
            expected += [
                ink[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell].any()
                for r in range(grid)
                for c in range(grid)
            ]
        assert item["oracle_mask"].tolist() == expected
        placeholder = (item["input_ids"] == dataset.image_token_id).sum()
        assert len(item["oracle_mask"]) == int(placeholder) == dataset.num_visual_tokens(spec.num_frames)


def test_qwen2_vl_video_patches_match_the_image_layout():
    frame = torch.randn(3, 28, 28)
    still, grid = qwen2_vl_video_patches(torch.stack([frame, frame]), patch_size=7)
    image, image_grid = qwen2_vl_patches(frame[None], 7, 2, 2)
    assert torch.equal(still, image) and grid.tolist() == image_grid[0].tolist() == [1, 4, 4]
    # an odd video is padded with its last frame; frame t of a temporal patch is slice t of each patch
    video = torch.randn(3, 3, 28, 28)
    patches, grid = qwen2_vl_video_patches(video, patch_size=7)
    assert grid.tolist() == [2, 4, 4]
    per_time = patches.reshape(2, 16, 3, 2, 7, 7)
    assert torch.equal(per_time[1, :, :, 0], per_time[1, :, :, 1])
    assert torch.equal(per_time[0, 0, :, 1], video[1, :, :7, :7])


def test_molmo2_video_inputs_index_each_frames_pooled_patches():
    videos = [torch.randn(2, 3, 42, 42), torch.randn(3, 3, 42, 42)]
    inputs = molmo2_video_inputs(videos, patch_size=7, pool_size=3)
    assert inputs["pixel_values_videos"].shape == (5, 36, 147)
    assert inputs["video_grids"].tolist() == [[2, 2, 2], [3, 2, 2]]
    pooling = inputs["video_token_pooling"]
    assert pooling.shape == (20, 9) and int(pooling.min()) >= 0
    # token 4 is frame 0 of video 1, top-left window: patches (0..2, 0..2) of that frame
    flat = inputs["pixel_values_videos"].reshape(-1, 147)
    first = flat[pooling[8, 0]].reshape(7, 7, 3)
    assert torch.equal(first, videos[1][0, :, :7, :7].permute(1, 2, 0))
    assert pooling[8].tolist() == [72 + r * 6 + c for r in range(3) for c in range(3)]


@pytest.mark.parametrize("family", FAMILIES)
def test_batches_run_the_real_model_with_videos_of_different_lengths(family):
    data = VideoDigitVQADataModule(
        family=family, batch_size=3, frame_size=56 if family == "qwen2_vl" else 42, min_frames=2, max_frames=5,
        question_types=("first", "last", "count_frames"), max_digits=2, train_samples=8, val_samples=4,
        test_samples=4, seed=1,
    )  # fmt: skip
    dataset = data.build("train")
    samples = [dataset[i] for i in range(8)]
    by_length = sorted(samples, key=lambda s: int(s["num_frames"]))
    picked = [by_length[0], by_length[-1], by_length[3]]  # the shortest and the longest video in one batch
    batch = data.collate_fn(picked)
    counts = (batch["input_ids"] == data.image_token_id).sum(1)
    assert len(set(counts.tolist())) > 1  # rows of different lengths in one batch
    merge = 2 if family == "qwen2_vl" else None
    check_vqa_batch(batch, family, image_token_id=data.image_token_id, spatial_merge_size=merge)
    for row, sample in enumerate(picked):  # the oracle and token classes: each row's own, then padding
        count = int(counts[row])
        assert torch.equal(batch["oracle_mask"][row, :count], sample["oracle_mask"])
        assert not batch["oracle_mask"][row, count:].any()
    torch.manual_seed(0)
    model = build_mllm(family, data, **TINY_MODEL).eval()
    with torch.no_grad():  # the model's own placeholder check: as many visual features as tokens
        logits = model(**mllm_inputs(model, batch)).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    if family == "molmo2":  # the processor marks the frame markers as visual too
        frame_markers = torch.isin(batch["input_ids"], torch.tensor(data.frame_token_ids))
        assert torch.equal(
            batch["mm_token_type_ids"].bool(), (batch["input_ids"] == data.image_token_id) | frame_markers
        )
    else:
        assert set(batch["mm_token_type_ids"].unique().tolist()) == {0, 2}


def test_pixels_are_the_normalised_frames():
    dataset = _split("qwen2_vl", num_samples=4)
    spec = dataset.sample_spec(1)
    frames, _, _ = dataset.render(spec)
    item = dataset[1]
    assert torch.allclose(item["frames"][:, 0], torch.from_numpy(normalize(frames)))
    assert item["frames"].shape[1] == 3


def test_contract_refuses_a_broken_video_batch():
    data = VideoDigitVQADataModule(family="molmo2", batch_size=2, frame_size=42, question_types=("count_frames",),
                                   train_samples=4, val_samples=2, test_samples=2)  # fmt: skip
    batch = data.collate_fn([data.build("train")[i] for i in range(2)])
    broken = dict(batch, video_token_pooling=batch["video_token_pooling"][:-1])
    with pytest.raises(VQABatchError, match="video_token_pooling"):
        check_vqa_batch(broken, "molmo2", image_token_id=data.image_token_id)
    oracle = batch["oracle_mask"].clone()
    oracle = torch.cat([oracle, torch.ones(2, 1, dtype=torch.bool)], 1)
    with pytest.raises(VQABatchError, match="oracle_mask"):
        check_vqa_batch(dict(batch, oracle_mask=oracle), "molmo2", image_token_id=data.image_token_id)
    with pytest.raises(VQABatchError, match="pixel_values_videos"):
        images = {k: v for k, v in batch.items() if k != "pixel_values_videos"} | {"pixel_values": oracle.float()}
        check_vqa_batch(images, "molmo2")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (dict(family="llava"), "family"),
        (dict(min_frames=5, max_frames=3), "min_frames"),
        (dict(max_frames=17), "max_frames"),
        (dict(frame_size=80), "frame_size"),
        (dict(family="qwen2_vl", frame_size=84, patch_size=6), "frame_size"),
        (dict(frame_size=42), "frame_size"),  # no room to move: 'moves' needs a wider quadrant
        (dict(min_frames=2, max_digits=3), "min_frames"),
        (dict(question_types=["when"]), "question_types"),
        (dict(max_digits=5), "max_digits"),
        (dict(num_clutter=-1), "num_clutter"),
        (dict(batch_size=0), "batch_size"),
        (dict(padding_side="middle"), "padding_side"),
    ],
)
def test_bad_options_raise_naming_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        VideoDigitVQADataModule(**options)


def test_collator_refuses_another_family():
    data = VideoDigitVQADataModule(family="molmo2", train_samples=4, val_samples=2, test_samples=2)
    with pytest.raises(ValueError, match="family"):
        data.collator(family="qwen2_vl")
