"""The embedded default end to end, on a tiny canvas: backbone → scorer → artifact → bench, idempotent."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tokensift.bench.seeds import fold_seeds, markdown_tables, seed_groups, summarize_seeds
from tokensift.cli import main
from tokensift.quickstart import parse_seeds

TINY = {
    "canvas_size": 32,
    "num_clutter": 2,
    "clutter_size": [2, 3],
    "train_samples": 256,
    "val_samples": 32,
    "test_samples": 64,
    "batch_size": 32,
}


@pytest.mark.slow
def test_quickstart_end_to_end_and_idempotent(tmp_path, capsys):
    args = [
        "quickstart",
        f"--out={tmp_path / 'qs'}",
        "--backbone_epochs=1",
        "--scorer_epochs=1",
        "--scorer_seeds=0,1",
        "--keep_ratios=1,0.5,0.25",
        "--bench_batch_size=32",
        f"--data_options={json.dumps(TINY)}",
        '--backbone_options={"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, '
        '"intermediate_size": 64}',
    ]
    main(args)
    out = tmp_path / "qs"
    for produced in [
        "backbone/config.json",
        "artifacts/seed0/tokensift.json",
        "artifacts/seed1/tokensift.json",
        "bench/results.json",
        "bench/pareto.png",
        "bench/site_sweep.csv",
        "bench/summary.md",
        "bench/summary.json",
    ]:
        assert (out / produced).is_file(), produced
    seed0, seed1 = (load_file(out / "artifacts" / f"seed{s}" / "scorer.safetensors") for s in (0, 1))
    assert any(not torch.equal(seed0[k], seed1[k]) for k in seed0), "two seeds, two scorers"
    payload = json.loads((out / "bench" / "results.json").read_text())
    methods = {row["method"] for row in payload["rows"]}
    assert {"random", "tome", "divprune", "cls_attention", "oracle"} <= methods
    assert {m for m in methods if m.endswith("@best_site")}, "training-free methods also at their best site"
    learned = [row for row in payload["rows"] if row["kind"] == "learned"]
    assert len({row["method"] for row in learned}) == 2
    # the seeded row is the mean of the two runs' rows, and its spread their standard deviation
    summary = json.loads((out / "bench" / "summary.json").read_text())
    folded = {e["keep_ratio"]: e for e in summary["budgets"] if e["method"] == "dynamicvit (learned)"}
    for ratio in (0.5, 0.25):
        runs = [row["accuracy"] for row in learned if row["keep_ratio"] == ratio]
        assert folded[ratio]["accuracy"]["n"] == 2
        assert folded[ratio]["accuracy"]["mean"] == pytest.approx(sum(runs) / 2)
        assert folded[ratio]["accuracy"]["std"] == pytest.approx(abs(runs[0] - runs[1]) / 2**0.5)
    assert "dynamicvit (learned)" in (out / "bench" / "summary.md").read_text()
    first_artifact = (out / "artifacts" / "seed0" / "scorer.safetensors").stat().st_mtime_ns

    main(args)  # a second run reuses the backbone and the artifacts
    printed = capsys.readouterr().out
    assert "reusing backbone" in printed and "reusing scorer artifact (seed 1)" in printed
    assert (out / "artifacts" / "seed0" / "scorer.safetensors").stat().st_mtime_ns == first_artifact


def test_seed_summary_folds_the_runs_of_one_method():
    def row(method, kind, ratio, accuracy):
        interval = {"accuracy_low": accuracy - 0.01, "accuracy_high": accuracy + 0.01}
        return {"method": method, "kind": kind, "keep_ratio": ratio, "accuracy": accuracy, "oracle_recall": 0.5,
                "flops_ratio": ratio, "speedup": 1.0, **interval}  # fmt: skip

    result = {
        "rows": [row("a", "learned", 0.5, 0.8), row("b", "learned", 0.5, 0.9), row("tome", "training-free", 0.5, 0.7)],
        "matched_flops": [{"method": "a", "kind": "learned", "flops_ratio": 0.6, "accuracy": 0.7}],
        "comparisons": [
            {"learned": "a", "baseline": "tome", "at": "keep_ratio", "value": 0.5, "difference": 0.1,
             "difference_low": 0.05, "difference_high": 0.15},
            {"learned": "b", "baseline": "tome", "at": "keep_ratio", "value": 0.5, "difference": 0.2,
             "difference_low": -0.01, "difference_high": 0.3},
        ],
    }  # fmt: skip
    summary = summarize_seeds(result, {"learned": ["a", "b"]})
    folded = {e["method"]: e for e in summary["budgets"]}
    assert folded["learned"]["accuracy"]["mean"] == pytest.approx(0.85)
    assert folded["learned"]["accuracy"]["std"] == pytest.approx(0.1 / 2**0.5)
    assert folded["tome"]["accuracy"] == 0.7  # a training-free row keeps its own interval
    assert summary["wins"] == [
        {"method": "learned", "at": "keep_ratio", "value": 0.5, "seeds": 2, "seeds_above": 1, "seeds_below": 0,
         "mean_difference": pytest.approx(0.15), "baselines": ["tome"]}
    ]  # fmt: skip
    text = markdown_tables(summary)
    assert "0.850 ± 0.071 (2 seeds)" in text and "0.700 [0.690, 0.710]" in text and "1/2" in text
    with pytest.raises(ValueError, match="groups: no bench rows for \\['c'\\]"):
        summarize_seeds(result, {"learned": ["a", "c"]})


def test_bench_folds_a_method_given_with_several_artifacts(tmp_path, capsys):
    def row(method, kind, accuracy):
        return {"method": method, "kind": kind, "keep_ratio": 0.5, "accuracy": accuracy, "flops_ratio": 0.5,
                "accuracy_low": accuracy - 0.01, "accuracy_high": accuracy + 0.01}  # fmt: skip

    rows = [
        row("ia_red2:seed0", "learned", 0.8),
        row("ia_red2:seed1", "learned", 0.9),
        row("dynamicvit", "learned", 0.7),
    ]
    result = {"rows": [*rows, row("random", "training-free", 0.6)], "matched_flops": [], "comparisons": []}
    assert seed_groups(result) == {"ia_red2 (learned)": ["ia_red2:seed0", "ia_red2:seed1"]}  # one artifact: no group
    folded = fold_seeds(dict(result), tmp_path, quiet=False)
    assert "| ia_red2 (learned) | 0.850 ± 0.071 (2 seeds) |" in (tmp_path / "summary.md").read_text()
    assert "ia_red2 (learned): 2" in capsys.readouterr().out
    assert folded["files"]["summary_md"] == str(tmp_path / "summary.md") and "seeds" in folded
    single = {"rows": rows[2:], "matched_flops": [], "comparisons": []}
    assert fold_seeds(single, tmp_path / "none", quiet=True) is single and not (tmp_path / "none").exists()


def test_scorer_seeds_are_checked():
    for bad in ("", "0,0", "x"):
        with pytest.raises(ValueError, match="scorer_seeds"):
            parse_seeds(bad)
    assert parse_seeds("2, 0") == [2, 0]
