"""``tokensift quickstart-video`` end to end at a tiny size: video data → Qwen2-VL and its single-frame baseline →
STTS over two seeds → bench with per-frame overlays; a second run reuses every trained output."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.slow
def test_quickstart_video_end_to_end_and_reuses_its_outputs(tmp_path):
    from tokensift.quickstart_video import quickstart_video

    torch.set_num_threads(1)
    options = dict(
        out=tmp_path / "video",
        train_samples=32,
        test_samples=16,
        keep_ratios="1,0.5",
        bench_batch_size=16,
        data_options={"val_samples": 16, "min_frames": 4, "max_frames": 6},
        model_options={"vision_hidden_size": 32, "vision_layers": 4, "text_hidden_size": 32},
        methods="holitom,ktv,random",
        scorer_seeds="0,1",
        scorer_train_samples=16,
    )
    result = quickstart_video(**options)
    methods = {row["method"] for row in result["rows"]}
    assert methods == {"unpruned", "holitom", "ktv", "random", "oracle", "stts:seed0", "stts:seed1"}
    for name in ("results.json", "results.csv", "pareto.png", "overlays.png", "summary.md", "summary.json"):
        assert (tmp_path / "video" / "bench" / name).is_file()
    summary = result["seed_summary"]
    assert set(summary["baselines"]) == {"text_only", "single_frame", "unpruned"}
    stts = [row for row in summary["budgets"] if row["method"] == "stts (learned)"]
    assert stts and all(row["seeds"] == 2 for row in stts)
    half = {row["method"]: row for row in result["rows"] if row["keep_ratio"] == 0.5}
    # removal inside the tower: the tower's FLOPs fall with the kept tokens, which a pre-LLM method leaves alone
    assert half["stts:seed0"]["flops_backbone"] < half["random"]["flops_backbone"]
    weights = tmp_path / "video" / "qwen2_vl" / "model.safetensors"
    scorer = tmp_path / "video" / "artifacts" / "stts" / "seed1" / "scorer.safetensors"
    stamps = [weights.stat().st_mtime_ns, scorer.stat().st_mtime_ns]
    quickstart_video(**options)  # reuses the models and the scorers
    assert [weights.stat().st_mtime_ns, scorer.stat().st_mtime_ns] == stamps
