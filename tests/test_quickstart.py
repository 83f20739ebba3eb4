"""The embedded default end to end, on a tiny canvas: backbone → scorer → artifact → bench, idempotent."""

from __future__ import annotations

import json

import pytest

from tokensift.cli import main

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
        "--keep_ratios=1,0.5,0.25",
        "--bench_batch_size=32",
        f"--data_options={json.dumps(TINY)}",
        '--backbone_options={"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, '
        '"intermediate_size": 64}',
    ]
    main(args)
    out = tmp_path / "qs"
    for produced in ["backbone/config.json", "artifact/tokensift.json", "bench/results.json", "bench/pareto.png"]:
        assert (out / produced).is_file(), produced
    rows = json.loads((out / "bench" / "results.json").read_text())["rows"]
    assert {row["method"] for row in rows} >= {"dynamicvit", "random", "tome", "divprune", "cls_attention", "oracle"}
    first_artifact = (out / "artifact" / "scorer.safetensors").stat().st_mtime_ns

    main(args)  # a second run reuses the backbone and the artifact
    printed = capsys.readouterr().out
    assert "reusing backbone" in printed and "reusing scorer artifact" in printed
    assert (out / "artifact" / "scorer.safetensors").stat().st_mtime_ns == first_artifact
