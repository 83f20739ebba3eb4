"""Training-free video methods ``holitom`` and ``ktv``: their algorithms on hand-built cases, then on tiny Qwen2-VL
and Molmo2 models with video inputs (videos of different lengths, left padded): budgets per sample, a batch equals
its samples one by one, keep_ratio=1 exact, cached generate() equals uncached recomputation. Images (one-frame videos)
run through the table-driven tests of tests/test_mllm.py, which take every training-free pre_llm / llm.<k> method.
"""

from __future__ import annotations

import itertools
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
    Molmo2Batch,
    build_tiny_mllm,
    build_tiny_molmo2,
    make_molmo2_batch,
)

import tokensift as ts
from tokensift.flops import SiteShape
from tokensift.scorers.holitom import HoliTomConfig, HoliTomMethod, holitom_keep_ratios
from tokensift.scorers.holitom.model import (
    dpc_knn_centres,
    fold_into_most_similar,
    merge_into_centres,
    static_windows,
)
from tokensift.scorers.ktv import KTVConfig, KTVMethod
from tokensift.scorers.ktv.model import key_token_scores, kmeans_keyframes, rank_weights
from tokensift.scorers.video import proportional_counts, sample_videos, weighted_counts
from tokensift.state import TokenState

VIDEO_METHODS = ("holitom", "ktv")
NEW_TOKENS = 3


# -- hand-built states ------------------------------------------------------------------------------------------


def video_state(frames: torch.Tensor, importance: torch.Tensor | None = None, text: int = 2) -> TokenState:
    """One sample: ``text`` text tokens, then a video ``frames`` ``[T, H, W, D]`` in row-major (t, h, w) order."""
    t, h, w, d = frames.shape
    visual = t * h * w
    n = text + visual
    hidden = torch.cat([torch.randn(text, d, generator=torch.Generator().manual_seed(0)), frames.reshape(visual, d)])
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    coords = torch.cat([torch.full((text, 3), -1), grid.reshape(visual, 3)]).unsqueeze(0)
    protected = torch.arange(n) < text
    scores = torch.zeros(n) if importance is None else torch.cat([torch.zeros(text), importance.reshape(visual)])
    return TokenState(
        hidden=hidden.unsqueeze(0),
        protected=protected.unsqueeze(0),
        orig_index=torch.arange(n).unsqueeze(0),
        size=torch.ones(1, n),
        grid=(0, 0),
        num_prefix=0,
        site="pre_llm",
        layer=-1,
        valid=torch.ones(1, n, dtype=torch.bool),
        kind=torch.where(protected, 0, 2).unsqueeze(0),
        image_id=torch.where(protected, -1, 0).unsqueeze(0),
        coords=coords,
        tower_attention=scores.unsqueeze(0),
        text_mean=hidden[:text].mean(0, keepdim=True),
    )


def test_sample_videos_orders_tokens_by_frame_then_row():
    frames = torch.randn(3, 2, 2, 4)
    state = video_state(frames)
    permutation = torch.tensor([0, 1, *(torch.randperm(12, generator=torch.Generator().manual_seed(1)) + 2).tolist()])
    shuffled = state.gather(permutation.unsqueeze(0))  # any slot order: the grid comes from the coords
    (slots,) = sample_videos(shuffled, 0, "test")
    assert slots.shape == (3, 4)
    assert torch.equal(shuffled.hidden[0, slots], frames.reshape(3, 4, 4))


def test_budget_shares_are_proportional_and_capped():
    assert proportional_counts(5, [4, 4, 2]) == [2, 2, 1]
    assert proportional_counts(10, [4, 4, 2]) == [4, 4, 2]
    assert sum(proportional_counts(7, [3, 3, 3, 3])) == 7
    # KTV's 6 keyframes: 288 + 4 x 144 + 72 tokens
    assert weighted_counts(936, [2, 1, 1, 1, 1, 0.5], [576] * 6) == [288, 144, 144, 144, 144, 72]
    assert weighted_counts(10, [100, 1, 1], [2, 10, 10]) == [2, 4, 4]  # a capped part's surplus goes to the others
    with pytest.raises(ValueError, match="cannot place"):
        weighted_counts(5, [1, 1], [2, 2])


# -- HoliTom's algorithm ----------------------------------------------------------------------------------------


def brute_force_windows(sim: torch.Tensor, tau: float) -> float:
    """The most tokens any segmentation into consecutive windows saves: (len - 1) x positions static throughout."""
    frames = sim.shape[0] + 1
    best = 0.0
    for cuts in itertools.product([False, True], repeat=frames - 1):
        start, saved = 0, 0.0
        for end in range(frames):
            if end == frames - 1 or cuts[end]:
                if end > start:
                    saved += (end - start) * float((sim[start:end] > tau).all(0).sum())
                start = end + 1
        best = max(best, saved)
    return best


def saved_by(windows, sim, tau) -> float:
    return sum((e - s) * float((sim[s:e] > tau).all(0).sum()) for s, e in windows if e > s)


def test_static_windows_finds_the_best_segmentation():
    # frames 0-1-2 alike at positions 0..2, frames 3-4 alike everywhere, frame 2 -> 3 a cut
    sim = torch.tensor([[0.9, 0.9, 0.9, 0.1], [0.9, 0.9, 0.9, 0.1], [0.1, 0.1, 0.1, 0.1], [0.95, 0.95, 0.95, 0.95]])
    windows = static_windows(sim, tau=0.8, max_window=1024)
    assert windows == [(0, 2), (3, 4)]
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):  # the dynamic programme reaches the exhaustive optimum
        random_sim = torch.rand(5, 3, generator=generator)
        windows = static_windows(random_sim, tau=0.5, max_window=1024)
        assert [w[0] for w in windows] == [0] + [w[1] + 1 for w in windows[:-1]] and windows[-1][1] == 5
        assert saved_by(windows, random_sim, 0.5) == brute_force_windows(random_sim, 0.5)
    assert all(e - s < 2 for s, e in static_windows(sim, tau=0.8, max_window=2))


def test_identical_frames_form_one_window_and_are_averaged():
    """Frames 0 and 1 nearly equal (one static window), frame 2 different: with the static positions' full share
    the kept token of each static position is its mean over the window, written into the window's first frame."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(2, 2, 8, generator=generator)
    frames = torch.stack([base, base + 0.01 * torch.randn(2, 2, 8, generator=generator), -base.flip(0)])
    state = video_state(frames)
    decision = HoliTomMethod().reduce(state, torch.tensor([8]))
    kept = decision.keep[0, 2:].view(3, 4)
    assert kept[0].all() and not kept[1].any() and kept[2].all()  # 4 static (frame 0) + frame 2's 4 dynamic
    merged = decision.hidden[0, 2:].view(3, 4, 8)
    torch.testing.assert_close(merged[0], frames[:2].mean(0).reshape(4, 8))
    torch.testing.assert_close(merged[2], frames[2].reshape(4, 8))


def test_a_budget_above_the_distinct_tokens_collapses_nothing():
    """Two identical frames leave 4 distinct tokens; a budget of 7 keeps every frame apart (4 + 3 by the shares),
    frame 1 losing its least attended token, none merged."""
    frame = torch.randn(1, 2, 2, 8, generator=torch.Generator().manual_seed(8))
    importance = torch.arange(8.0)
    state = video_state(torch.cat([frame, frame]), importance)
    decision = HoliTomMethod().reduce(state, torch.tensor([7]))
    assert decision.keep[0, 2:].nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 5, 6, 7]
    assert torch.equal(decision.hidden, state.hidden)


def test_dynamic_tokens_are_kept_by_tower_attention():
    frames = torch.randn(1, 2, 3, 4, generator=torch.Generator().manual_seed(2))  # an image: one frame
    importance = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7])
    decision = HoliTomMethod().reduce(video_state(frames, importance), torch.tensor([3]))
    assert decision.keep[0, 2:].nonzero().squeeze(1).tolist() == [1, 3, 5]
    assert torch.equal(decision.hidden, video_state(frames, importance).hidden)  # kept, not merged


def test_dpc_knn_picks_one_centre_per_cluster_and_merges_with_beta():
    a = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.05, 0.05]])
    b = torch.tensor([[5.0, 5.0], [5.1, 5.0], [5.0, 5.1]])
    features = torch.cat([a, b])
    centres, distance = dpc_knn_centres(features, 2, neighbours=2)
    assert sorted(c in range(4) for c in centres.tolist()) == [False, True]  # one in each cluster
    merged = merge_into_centres(features, centres, distance, beta=0.6)
    for centre, value in zip(centres.tolist(), merged, strict=True):
        group = list(range(4)) if centre < 4 else list(range(4, 7))
        others = features[[i for i in group if i != centre]].mean(0)
        torch.testing.assert_close(value, 0.6 * features[centre] + 0.4 * others)


def test_inner_merge_folds_in_sequence_order_by_running_mean():
    hidden = torch.tensor([[9.0, 9.0], [1.0, 0.0], [2.0, 0.1], [4.0, 0.2], [0.0, 1.0], [0.1, 3.0]])
    visual = torch.tensor([False, True, True, True, True, True])
    keep = torch.tensor([True, True, False, False, True, False])
    out = fold_into_most_similar(hidden, torch.tensor([1, 4]), keep, visual)
    # tokens 2, 3 fold into 1 in order: ((h1 + h2) / 2 + h3) / 2; token 5 into 4
    torch.testing.assert_close(out[1], ((hidden[1] + hidden[2]) / 2 + hidden[3]) / 2)
    torch.testing.assert_close(out[4], (hidden[4] + hidden[5]) / 2)
    assert torch.equal(out[[0, 2, 3, 5]], hidden[[0, 2, 3, 5]])


def test_holitom_keep_ratios_give_the_reference_split():
    assert holitom_keep_ratios(0.1, 18) == {"pre_llm": 0.1, "llm.18": 0.05}
    with pytest.raises(ValueError, match="inner_merge"):
        holitom_keep_ratios(0.1, 18, inner_merge=1.0)


@pytest.mark.parametrize(
    ("config", "options", "needle"),
    [
        (HoliTomConfig, {"tau": 2.0}, "tau"),
        (HoliTomConfig, {"beta": -0.1}, "beta"),
        (HoliTomConfig, {"contextual_fraction": 1.5}, "contextual_fraction"),
        (HoliTomConfig, {"max_window": 1}, "max_window"),
        (HoliTomConfig, {"layer": 0}, "layer"),
        (KTVConfig, {"keyframes": 0}, "keyframes"),
        (KTVConfig, {"rate": 2}, "rate"),
        (KTVConfig, {"question_ranking": 1}, "question_ranking"),
    ],
)
def test_bad_options_name_the_field(config, options, needle):
    with pytest.raises(ValueError, match=needle):
        config(**options)


# -- KTV's algorithm --------------------------------------------------------------------------------------------


def test_kmeans_picks_one_keyframe_per_cluster_nearest_its_centre():
    generator = torch.Generator().manual_seed(4)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    members = [0, 1, 0, 2, 1, 2, 2]
    features = centres[members] + 0.3 * torch.randn(7, 2, generator=generator)
    keyframes = kmeans_keyframes(features, 3, iterations=100)
    assert sorted(members[k] for k in keyframes.tolist()) == [0, 1, 2]
    for k in keyframes.tolist():
        group = [i for i, m in enumerate(members) if m == members[k]]
        mean = features[group].mean(0)
        assert k == group[int((features[group] - mean).norm(dim=-1).argmin())]


def test_ktv_keeps_whole_keyframes_one_per_cluster():
    generator = torch.Generator().manual_seed(5)
    scenes = torch.randn(3, 2, 2, 8, generator=generator)
    order = [0, 0, 1, 1, 1, 2]  # six frames, three scenes
    frames = scenes[order] + 0.01 * torch.randn(6, 2, 2, 8, generator=generator)
    state = video_state(frames)
    method = KTVMethod(KTVConfig(keyframes=3, question_ranking=False))
    keep = method.select(state, torch.tensor([12]))
    per_frame = keep[0, 2:].view(6, 4).sum(1)
    kept_frames = per_frame.nonzero().squeeze(1).tolist()
    assert per_frame[kept_frames].tolist() == [4, 4, 4]
    assert sorted(order[f] for f in kept_frames) == [0, 1, 2]


def test_ktv_takes_more_keyframes_when_the_budget_needs_them():
    frames = torch.randn(6, 2, 2, 8, generator=torch.Generator().manual_seed(9))
    method = KTVMethod(KTVConfig(keyframes=2, question_ranking=False))
    keep = method.select(video_state(frames), torch.tensor([16]))
    assert keep[0, 2:].view(6, 4).sum(1).sort(descending=True).values.tolist() == [4, 4, 4, 4, 0, 0]


def test_ktv_question_ranking_gives_the_reference_shares():
    assert rank_weights(torch.arange(6)) == [2.0, 1.0, 1.0, 1.0, 1.0, 0.5]
    assert rank_weights(torch.arange(12)) == [2.0] * 2 + [1.0] * 8 + [0.5] * 2
    assert rank_weights(torch.tensor([1, 0])) == [1.0, 2.0]
    assert rank_weights(torch.tensor([0])) == [2.0]


def test_ktv_token_score_is_importance_and_non_redundancy():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    importance = torch.tensor([0.2, 0.6, 1.0])
    cos = torch.nn.functional.cosine_similarity(features.unsqueeze(1), features.unsqueeze(0), dim=-1)
    redundancy = (cos.sum(1) - 1) / 2
    expected = 0.2 * (importance - 0.2) / 0.8 + 0.8 * (
        1 - (redundancy - redundancy.min()) / (redundancy.max() - redundancy.min())
    )
    torch.testing.assert_close(key_token_scores(features, importance, 0.2), expected)


def test_ktv_on_an_image_picks_key_tokens():
    frames = torch.randn(1, 2, 3, 4, generator=torch.Generator().manual_seed(6))
    importance = torch.rand(6, generator=torch.Generator().manual_seed(7))
    state = video_state(frames, importance)
    keep = KTVMethod().select(state, torch.tensor([2]))
    score = key_token_scores(frames.reshape(6, 4), importance, 0.2)
    assert keep[0, 2:].nonzero().squeeze(1).tolist() == sorted(score.argsort(descending=True)[:2].tolist())


@pytest.mark.parametrize("method", [HoliTomMethod(), KTVMethod()])
def test_analytic_flops(method):
    shape = dict(site="pre_llm", tokens=40, prunable=32, hidden=16, heads=4, head_dim=4, kv_heads=2)
    assert method.analytic_flops(SiteShape(keep=8, **shape)) > 0
    assert method.analytic_flops(SiteShape(keep=32, **shape)) == 0.0
    if isinstance(method, HoliTomMethod):
        assert method.analytic_flops(SiteShape(keep=8, **dict(shape, site="llm.3"))) > 0


# -- on tiny Qwen2-VL and Molmo2 models with videos --------------------------------------------------------------


@dataclass
class VideoBatch:
    rows: list[list[int]]
    pixels: list[torch.Tensor]  # per sample: [t * h * w, 96] patches
    grids: list[tuple[int, int, int]]

    def inputs(self, indices: list[int] | None = None) -> dict:
        indices = list(range(len(self.rows))) if indices is None else indices
        rows = [self.rows[i] for i in indices]
        length = max(len(r) for r in rows)
        input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
        return dict(
            input_ids=input_ids,
            attention_mask=torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows]),
            pixel_values_videos=torch.cat([self.pixels[i] for i in indices]),
            video_grid_thw=torch.tensor([self.grids[i] for i in indices]),
            mm_token_type_ids=(input_ids == QWEN_VIDEO_TOKEN).long() * 2,
        )


def make_video_batch(seed: int = 11) -> VideoBatch:
    """Qwen2-VL, three samples: videos of 3, 2 and 4 temporal frames (4x8 patches: 8 tokens a frame), prompts of
    different lengths; the last video repeats frames (0 = 1, 2 = 3), which HoliTom's segmentation collapses."""
    generator = torch.Generator().manual_seed(seed)
    grids = [(3, 4, 8), (2, 4, 8), (4, 4, 8)]

    def words(n: int) -> list[int]:
        return torch.randint(3, 50, (n,), generator=generator).tolist()

    def video(grid) -> list[int]:
        return [QWEN_VISION_START, *[QWEN_VIDEO_TOKEN] * (math.prod(grid) // 4), QWEN_VISION_END]

    rows = [
        [BOS, *words(2), *video(grids[0]), *words(3)],
        [BOS, *video(grids[1]), *words(6)],
        [BOS, *words(1), *video(grids[2]), *words(2)],
    ]
    pixels = [torch.randn(math.prod(g), 96, generator=generator) for g in grids]
    frame = 4 * 8
    pixels[2][frame : 2 * frame] = pixels[2][:frame]
    pixels[2][3 * frame :] = pixels[2][2 * frame : 3 * frame]
    return VideoBatch(rows, pixels, grids)


@dataclass
class VideoCase:
    model: torch.nn.Module
    batch: VideoBatch | Molmo2Batch
    visual_token: int
    suppress: list[int]  # placeholders a random model may emit

    def counts(self) -> list[int]:
        return [row.count(self.visual_token) for row in self.batch.rows]


@pytest.fixture(scope="module", params=["qwen2_vl", "molmo2"])
def case(request) -> VideoCase:
    if request.param == "qwen2_vl":
        return VideoCase(build_tiny_mllm("qwen2_vl"), make_video_batch(), QWEN_VIDEO_TOKEN, [QWEN_VIDEO_TOKEN])
    return VideoCase(build_tiny_molmo2(), make_molmo2_batch("video"), MOLMO2_PATCH, list(MOLMO2_MULTIMODAL))


def generate(case: VideoCase, inputs: dict):
    with torch.no_grad():
        return case.model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            suppress_tokens=case.suppress,
            return_dict_in_generate=True,
            output_logits=True,
        )


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("method", VIDEO_METHODS)
def test_keep_ratio_one_is_exact_on_video(case, method):
    inputs = case.batch.inputs()
    reference, reference_generate = logits(case.model, inputs), generate(case, inputs)
    with ts.apply(case.model, method, keep_ratio=1.0) as handle:
        assert torch.equal(logits(case.model, inputs), reference)
        assert handle.last_records == []
        assert torch.equal(generate(case, inputs).sequences, reference_generate.sequences)


@pytest.mark.parametrize("method", VIDEO_METHODS)
def test_video_budget_per_sample_and_batch_equals_samples(case, method):
    batch = case.batch
    with ts.apply(case.model, method, keep_ratio=0.25) as handle:
        counts = [handle.site_counts(n) for n in case.counts()]
        batched = generate(case, batch.inputs())
        records = {r.site: r for r in handle.last_records}
        assert list(records) == handle.sites
        for site, record in records.items():
            assert record.kept_visual.tolist() == [c[site] for c in counts]
        assert records[handle.sites[-1]].kept_visual.tolist() == [math.ceil(0.25 * n) for n in case.counts()]
        tokens = batched.sequences[:, batch.inputs()["input_ids"].shape[1] :]
        for i in range(len(batch.rows)):
            single = generate(case, batch.inputs([i]))
            assert torch.equal(single.sequences[0, batch.inputs([i])["input_ids"].shape[1] :], tokens[i])
            for step_batched, step_single in zip(batched.logits, single.logits, strict=True):
                torch.testing.assert_close(step_single[0], step_batched[i], atol=1e-4, rtol=1e-4)


def test_holitom_runs_before_and_inside_the_llm(case):
    inputs = case.batch.inputs()
    reference = logits(case.model, inputs)
    with ts.apply(case.model, "holitom", keep_ratio=0.25) as handle:
        assert handle.sites == ["pre_llm", "llm.3"]  # 18/28 of 4 layers
        pruned = logits(case.model, inputs)
        assert torch.isfinite(pruned).all() and not torch.allclose(pruned[:, -1], reference[:, -1], atol=1e-4)
    # the reference split: 25% enter the LLM, half of those pass layer 3
    with ts.apply(case.model, "holitom", keep_ratio=holitom_keep_ratios(0.25, 3)) as handle:
        logits(case.model, inputs)
        kept = [r.kept_visual.tolist() for r in handle.last_records]
        expected = [[math.ceil(share * n - 1e-6) for n in case.counts()] for share in (0.25, 0.125)]
        assert kept == expected
    # without the inner merge (HoliTom w/o M), and the inner merge alone
    for sites in (["pre_llm"], ["llm.2"]):
        with ts.apply(case.model, "holitom", keep_ratio=0.25, sites=sites) as handle:
            assert torch.isfinite(logits(case.model, inputs)).all()
            assert [r.site for r in handle.last_records] == sites


def test_holitom_collapses_repeated_frames_in_the_model():
    """Qwen2-VL: the third video repeats frames 0 = 1 and 2 = 3; its kept tokens lie in frames 0 and 2 only."""
    model, inputs = build_tiny_mllm("qwen2_vl"), make_video_batch().inputs([2])
    with ts.apply(model, "holitom", keep_ratio=0.5, sites=["pre_llm"]) as handle:
        logits(model, inputs)
        kept = handle.last_records[-1].kept_orig_index[0]
    video = (inputs["input_ids"][0] == QWEN_VIDEO_TOKEN).nonzero().squeeze(1)
    frames = torch.isin(video, kept).view(4, 8).sum(1)
    assert frames[1] == 0 and frames[3] == 0 and frames.sum() == 16


class PinnedHoliTom(HoliTomMethod):
    """HoliTom whose inner merge keeps the tokens a previous run kept at ``llm.<k>`` (and merges as HoliTom)."""

    def __init__(self, kept: torch.Tensor):
        super().__init__()
        self.kept = kept

    def inner_keep(self, state, num_keep):
        member = (state.orig_index.unsqueeze(-1) == self.kept.unsqueeze(1)).any(-1) & state.prunable
        return [row.nonzero().squeeze(1) for row in member]


def test_holitom_cached_decoding_matches_uncached_recomputation(case):
    """Cached generate() equals recomputing the whole sequence each step with the prefill's inner choice pinned (the
    last token's attention moves as tokens are appended; the pre_llm merge reads only the video)."""
    inputs = case.batch.inputs()
    with ts.apply(case.model, "holitom", keep_ratio=0.25) as handle:
        cached = generate(case, inputs)
        sites = handle.sites
        inner = handle.last_records[-1].kept_orig_index
    with ts.apply(case.model, PinnedHoliTom(inner), keep_ratio=0.25, sites=sites):
        forward = dict(inputs)
        for step in range(NEW_TOKENS):
            step_logits = logits(case.model, forward)[:, -1]
            torch.testing.assert_close(step_logits, cached.logits[step], atol=1e-4, rtol=1e-4)
            token = cached.sequences[:, inputs["input_ids"].shape[1] + step].unsqueeze(1)
            forward["input_ids"] = torch.cat([forward["input_ids"], token], dim=1)
            forward["attention_mask"] = torch.cat([forward["attention_mask"], torch.ones_like(token)], dim=1)
            forward["mm_token_type_ids"] = torch.cat([forward["mm_token_type_ids"], torch.zeros_like(token)], dim=1)
