"""``tokensift bench``'s progress bar: one step per measured (method, budget) row and site-sweep entry, on the image
and the MLLM bench; off with ``quiet`` and when stdout is not a terminal.

``FORCE_COLOR`` makes rich treat pytest's captured stdout as a terminal, so the bar draws there: its first frame
(``0/N``) and its last one (``N/N``, the count it reached over the total it was given) are in the output."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import ViTForImageClassification

from tests.test_bench import DATA, save_backbone
from tokensift.backbones import adapt
from tokensift.bench import run_bench
from tokensift.data import ClutteredDigitsDataModule
from tokensift.export.artifact import save_artifact
from tokensift.scorers.das import DASMethod

FAST = dict(repeats=1, warmup=0, max_batches=1)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    path = save_backbone(root / "vit")
    adapter = adapt(ViTForImageClassification.from_pretrained(path))
    torch.manual_seed(0)
    das = save_artifact(
        DASMethod.for_backbone(adapter), adapter.fingerprint(), root / "das", default_budget={"skip_layers": 1}
    )
    return path, das


def _frames(text: str, total: int) -> list[tuple[int, str]]:
    """Every frame of the bar in ``text`` (colours stripped), in order: the rows it counted and what it named last.
    Rich redraws at most 10 times a second, so a fast bench skips frames, never the first or the last."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    pattern = rf"tokensift bench \S*\s+(\d+)/{total} \d+:\d\d:\d\d ?([^\r\n]*)"
    return [(int(count), named.strip()) for count, named in re.findall(pattern, plain)]


def test_image_bench_bar_reaches_every_row_and_sweep_entry(backbone, tmp_path, monkeypatch, capsys):
    vit, das = backbone
    monkeypatch.setenv("FORCE_COLOR", "1")
    result = run_bench(
        str(vit),
        ClutteredDigitsDataModule(**dict(DATA, val_samples=16)),
        ["random", "l2norm", f"das:{das}"],
        [1.0, 0.5],
        out=tmp_path / "bench",
        sweep_sites=["vit.0", "vit.1"],
        **FAST,
    )
    out = capsys.readouterr().out
    # unpruned + (random, l2norm, oracle) x 2 ratios + das x skip 0,1 + 2 best-site rows x 2 ratios; 2x2x2 sweep entries
    total = len(result["rows"]) + len(result["site_sweep"])
    assert (len(result["rows"]), len(result["site_sweep"])) == (13, 8)
    frames = _frames(out, total)
    counts = [count for count, _ in frames]
    assert counts[0] == 0 and counts[-1] == total and counts == sorted(counts), frames
    assert frames[-1][1] == "l2norm@best_site 0.5", "the last frame names the last row measured"


def test_image_bench_quiet_prints_nothing_and_a_pipe_gets_no_bar(backbone, tmp_path, monkeypatch, capsys):
    vit, _ = backbone
    data = ClutteredDigitsDataModule(**DATA)
    monkeypatch.setenv("FORCE_COLOR", "1")
    run_bench(str(vit), data, ["random"], [1.0, 0.5], out=tmp_path / "quiet", quiet=True, **FAST)
    captured = capsys.readouterr()
    assert captured.out == "" and "/5" not in captured.err

    monkeypatch.delenv("FORCE_COLOR")
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # whatever the runner's stdout is, rich sees no terminal
    result = run_bench(str(vit), data, ["random"], [1.0, 0.5], out=tmp_path / "piped", **FAST)
    out = capsys.readouterr().out
    assert len(result["rows"]) == 5 and "unpruned" in out, "the tables still print"
    assert _frames(out, 5) == []


def test_mllm_bench_bar_counts_ratios_thresholds_and_the_oracle(tmp_path_factory, monkeypatch, capsys):
    from tokensift.backbones.loading import load_mllm_backbone
    from tokensift.backbones.pretrain_mllm import pretrain_mllm
    from tokensift.data import DigitVQADataModule
    from tokensift.scorers.dyvte import DyVTEConfig, DyVTEMethod

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("progress_mllm")
    data = dict(batch_size=8, train_samples=16, val_samples=8, test_samples=8, seed=1)
    tiny = dict(vision_hidden_size=32, vision_layers=1, text_hidden_size=32, text_layers=3)  # fastv prunes at llm.2
    quiet = dict(enable_progress_bar=False, enable_model_summary=False, logger=False)
    model_dir, _ = pretrain_mllm(root / "llava", DigitVQADataModule(**data), trainer_kwargs=quiet, **tiny)
    adapter = adapt(load_mllm_backbone(str(model_dir)))
    torch.manual_seed(0)
    routers = DyVTEMethod.for_backbone(adapter, DyVTEConfig(router_width=16))
    dyvte = save_artifact(routers, adapter.fingerprint(), root / "dyvte", default_budget={"threshold": 0.5})

    monkeypatch.setenv("FORCE_COLOR", "1")
    result = run_bench(
        str(model_dir),
        DigitVQADataModule(**data),
        ["fastv", f"dyvte:{dyvte}"],
        [1.0, 0.5, 0.25],
        thresholds=[1.0, 0.0],
        out=root / "bench",
        **FAST,
    )
    out = capsys.readouterr().out
    # unpruned + fastv x 3 ratios + oracle x 3 ratios + dyvte x 2 thresholds
    assert len(result["rows"]) == 9
    frames = _frames(out, 9)
    assert frames[0][0] == 0 and frames[-1] == (9, "oracle 0.25"), frames

    run_bench(str(model_dir), DigitVQADataModule(**data), "fastv", [1.0, 0.5], out=root / "q", quiet=True, **FAST)
    assert capsys.readouterr().out == ""
