"""``tokensift bench`` end to end on a tiny ViT and a tiny cluttered-digits test split."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from jsonargparse import auto_cli
from transformers import ViTConfig, ViTForImageClassification

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.bench import (
    FIELDS,
    CurvePoint,
    accuracy_at_flops,
    accuracy_interval,
    bench,
    paired_difference,
    run_bench,
)
from tokensift.bench.runner import oracle_on_model_grid
from tokensift.bench.sweep import choose_best_sites
from tokensift.data import ClutteredDigitsDataModule
from tokensift.scorers.dynamicvit import DynamicViTMethod

TRAINING_FREE = ["random", "l2norm", "tome", "divprune", "cls_attention"]
RATIOS = [1.0, 0.5, 0.25]
DATA = dict(canvas_size=32, patch_size=4, clutter_size=(2, 3), num_clutter=2, test_samples=32, batch_size=16)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def save_backbone(path: Path) -> Path:
    torch.manual_seed(0)
    # a wider init than the default 0.02, so the untrained model's predictions vary from image to image
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=4,
        num_labels=10,
        initializer_range=0.2,
    )
    ViTForImageClassification(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    start = time.perf_counter()
    root = tmp_path_factory.mktemp("bench")
    backbone = save_backbone(root / "backbone")
    model = ViTForImageClassification.from_pretrained(backbone)
    adapter = adapt(model)
    torch.manual_seed(1)
    scorer = DynamicViTMethod.for_backbone(adapter)
    artifact = ts.save_artifact(scorer, adapter.fingerprint(), root / "artifact")
    datamodule = ClutteredDigitsDataModule(**DATA)
    result = run_bench(
        str(backbone),
        datamodule,
        [*TRAINING_FREE, f"dynamicvit:{artifact}"],
        RATIOS,
        out=root / "out",
        batch_size=None,
        timing_batches=1,
        repeats=2,
        warmup=1,
        overlay_ratio=0.25,
    )
    elapsed = time.perf_counter() - start
    return SimpleNamespace(
        root=root, backbone=backbone, artifact=artifact, result=result, out=root / "out", elapsed=elapsed
    )


def _by_method(rows: list[dict]) -> dict[str, dict[float, dict]]:
    grouped: dict[str, dict[float, dict]] = {}
    for row in rows:
        grouped.setdefault(row["method"], {})[row["keep_ratio"]] = row
    return grouped


def test_runs_quickly(run):
    assert run.elapsed < 60, f"the tiny bench took {run.elapsed:.1f}s"


def test_writes_every_output(run):
    for name in ("results.json", "results.csv", "pareto.png", "overlays.png"):
        path = run.out / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in ("pareto.png", "overlays.png"):
        assert (run.out / name).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in run.out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    saved = json.loads((run.out / "results.json").read_text())
    assert saved["rows"] == run.result["rows"]
    meta = saved["metadata"]
    for key in ("model", "data", "batch_size", "device", "torch_version", "num_samples", "memory_measure"):
        assert key in meta, key
    assert meta["model"] == str(run.backbone)
    assert meta["data"]["class_path"] == "tokensift.data.digits.ClutteredDigitsDataModule"
    assert meta["data"]["init_args"]["canvas_size"] == 32
    assert meta["batch_size"] == 16 and meta["num_samples"] == 32
    assert meta["device"] == "cpu" and meta["torch_version"] == torch.__version__
    with (run.out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(saved["rows"])
    assert list(table[0]) == list(FIELDS)


def test_every_method_and_ratio_has_a_full_row(run):
    rows = run.result["rows"]
    grouped = _by_method(rows)
    assert set(grouped) == {"unpruned", *TRAINING_FREE, "dynamicvit", "oracle"}
    assert list(grouped["unpruned"]) == [1.0]
    for name in [*TRAINING_FREE, "dynamicvit", "oracle"]:
        assert sorted(grouped[name]) == sorted(RATIOS), name
    for row in rows:
        assert set(row) == set(FIELDS)
        for field in ("accuracy", "retention", "oracle_recall", "flops_ratio", "speedup", "mem_ratio", "time_ms"):
            assert isinstance(row[field], float) and row[field] >= 0, (row["method"], field, row[field])
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["oracle_recall"] <= 1.0
        assert row["num_samples"] == 32 and row["num_patches"] == 64
        assert row["peak_mem_bytes"] > 0
    assert grouped["dynamicvit"][0.5]["kind"] == "learned"
    assert grouped["dynamicvit"][0.5]["artifact"] == str(run.artifact)
    assert grouped["dynamicvit"][0.5]["sites"] == ["vit.0", "vit.1", "vit.2"]


def test_keep_one_matches_unpruned(run):
    grouped = _by_method(run.result["rows"])
    base = grouped["unpruned"][1.0]
    assert base["retention"] == 1.0 and base["flops_ratio"] == 1.0 and base["oracle_recall"] == 1.0
    for name, by_ratio in grouped.items():
        row = by_ratio[1.0]
        assert row["accuracy"] == base["accuracy"], name
        assert row["flops_ratio"] == 1.0 and row["oracle_recall"] == 1.0 and row["keep_count"] == 64, name
    for row in run.result["rows"]:
        assert row["retention"] == pytest.approx(row["accuracy"] / base["accuracy"])


def test_flops_ratio_falls_with_the_keep_ratio(run):
    for name, by_ratio in _by_method(run.result["rows"]).items():
        if name == "unpruned":
            continue
        flops = [by_ratio[r]["flops_ratio"] for r in sorted(by_ratio, reverse=True)]
        assert flops == sorted(set(flops), reverse=True), (name, flops)  # strictly decreasing
        counts = [by_ratio[r]["keep_count"] for r in sorted(by_ratio, reverse=True)]
        assert counts == [64, 32, 16], name
    # a learned scorer pays for its predictors: more FLOPs than the backbone alone
    learned = _by_method(run.result["rows"])["dynamicvit"][0.5]
    assert learned["flops_scorer"] > 0 and learned["flops"] == learned["flops_backbone"] + learned["flops_scorer"]


def test_oracle_keeps_every_target_patch_when_the_budget_allows(run):
    datamodule = ClutteredDigitsDataModule(**DATA)
    datamodule.setup("test")
    most = max(int(datamodule.test_dataset[i]["oracle_mask"].sum()) for i in range(len(datamodule.test_dataset)))
    oracle = _by_method(run.result["rows"])["oracle"]
    covered = [row for row in oracle.values() if row["keep_count"] >= most]
    assert len(covered) >= 2  # keep 1.0 and 0.5 (32 of 64 patches) cover every target on this data
    for row in covered:
        assert row["oracle_recall"] == 1.0, row
    for row in run.result["rows"]:
        if row["method"] != "oracle" and row["keep_ratio"] == 0.25:
            assert row["oracle_recall"] <= oracle[0.25]["oracle_recall"] + 1e-9, row["method"]
    assert "oracle" not in ts.methods()  # benchmark-only, never in the public registry


def test_cli_function_with_a_yaml_data_config(run, tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n"
        "  class_path: tokensift.data.ClutteredDigitsDataModule\n"
        "  init_args: {canvas_size: 32, patch_size: 2, clutter_size: [2, 3], num_clutter: 2, test_samples: 8,\n"
        "    batch_size: 64}\n"
    )
    out = tmp_path / "cli"
    result = auto_cli(
        bench,
        args=[
            f"--model={run.backbone}",
            f"--data={config}",
            "--methods=random,l2norm",
            "--keep_ratios=1,0.5",
            f"--out={out}",
            "--batch_size=4",
            "--repeats=1",
            "--warmup=0",
            "--max_batches=1",
            "--sweep_sites=vit.1,vit.2",
            "--flops_ratios=0.75,0.95",
            "--bootstrap_resamples=200",
        ],
        as_positional=False,  # model/data/methods as --flags (the default makes the required ones positional)
    )
    assert {p.name for p in out.iterdir()} >= {
        "results.json", "results.csv", "pareto.png", "overlays.png", "matched_flops.csv", "site_sweep.csv"
    }  # fmt: skip
    assert {e["site"] for e in result["site_sweep"]} == {"vit.1", "vit.2"}
    assert {e["flops_ratio"] for e in result["matched_flops"]} == {0.75, 0.95}
    assert result["metadata"]["accuracy_interval"]["resamples"] == 200
    assert result["metadata"]["batch_size"] == 4 and result["metadata"]["num_samples"] == 4
    assert {(r["method"], r["keep_ratio"]) for r in result["rows"]} == {
        ("unpruned", 1.0),
        *((m, r) for m in ("random", "l2norm", "oracle", "random@best_site", "l2norm@best_site") for r in (1.0, 0.5)),
    }


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(methods=["magic"]), ValueError, r"methods: unknown method 'magic'"),
        (dict(methods=["magic:some/dir"]), ValueError, r"methods: unknown method 'magic'"),
        (dict(methods=["dynamicvit"]), ValueError, r"dynamicvit:ARTIFACT_DIR"),
        (dict(methods=["dynamicvit:does/not/exist"]), FileNotFoundError, r"methods: the artifact .* does not exist"),
        (dict(keep_ratios=[1.0, 1.5]), ValueError, r"keep_ratios: 1.5 is outside \(0, 1\]"),
        (dict(keep_ratios=[0.0]), ValueError, r"keep_ratios: 0.0 is outside \(0, 1\]"),
        (dict(overlay_ratio=2.0), ValueError, r"overlay_ratio: 2.0 is outside"),
        (dict(model_dir="does/not/exist"), FileNotFoundError, r"model: .* is not a directory"),
        (dict(data="no.such.DataModule"), ValueError, r"data: cannot import class_path 'no.such.DataModule'"),
        (dict(data="missing.yaml"), FileNotFoundError, r"data: 'missing.yaml' is neither"),
        (dict(repeats=0), ValueError, r"repeats: must be an integer >= 1"),
    ],
)
def test_errors_name_the_field_and_the_fix(run, tmp_path, kwargs, error, match):
    args = dict(
        model_dir=str(run.backbone),
        data=ClutteredDigitsDataModule(**DATA),
        methods=["random"],
        keep_ratios=[1.0],
        out=tmp_path / "out",
    )
    args.update(kwargs)
    with pytest.raises(error, match=match):
        run_bench(**args)
    assert not (tmp_path / "out").exists()  # validation happens before anything is written


def test_artifact_name_must_match_and_image_size_is_checked(run, tmp_path):
    with pytest.raises(ValueError, match=r"holds a 'dynamicvit' scorer; write dynamicvit:"):
        run_bench(str(run.backbone), ClutteredDigitsDataModule(**DATA), [f"l2norm:{run.artifact}"], [1.0], tmp_path)
    with pytest.raises(ValueError, match=r"data: test images are 64x64 .*canvas_size: 32"):
        run_bench(
            str(run.backbone), "tokensift.data.ClutteredDigitsDataModule", ["random"], [1.0], tmp_path, batch_size=2
        )


def test_oracle_mask_moves_onto_the_model_grid():
    fine = torch.zeros(1, 4, 4, dtype=torch.bool)  # a 4x4 data grid of 2-pixel patches on an 8x8 image
    fine[0, 1, 2] = True  # -> model patch (0, 1) of a 2x2 grid of 4-pixel patches
    fine[0, 3, 0] = True  # -> model patch (1, 0)
    coarse = oracle_on_model_grid(fine.view(1, 16), (1, 3, 8, 8), (2, 2))
    assert coarse.tolist() == [[False, True, True, False]]
    same = torch.tensor([[True, False, False, True]])
    assert torch.equal(oracle_on_model_grid(same, (1, 3, 8, 8), (2, 2)), same)
    with pytest.raises(ValueError, match=r"data: oracle_mask has 4 patches .* init_args.patch_size: 2"):
        oracle_on_model_grid(same, (1, 3, 8, 8), (4, 4))


# -- intervals, equal cost, paired comparisons, site sweep ------------------------------------------------------
def test_every_accuracy_has_an_interval_around_it(run):
    rows = run.result["rows"]
    for row in rows:
        low, high = row["accuracy_low"], row["accuracy_high"]
        assert 0.0 <= low <= row["accuracy"] <= high <= 1.0, row["method"]
    assert any(row["accuracy_high"] > row["accuracy_low"] for row in rows)  # not all degenerate
    meta = run.result["metadata"]["accuracy_interval"]
    assert meta["level"] == 0.95 and meta["resamples"] == 1000
    with (run.out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [float(r["accuracy_low"]) for r in table] == [r["accuracy_low"] for r in rows]


def test_intervals_shrink_with_more_test_samples(run, tmp_path):
    widths = {}
    for samples in (32, 512):
        result = run_bench(
            str(run.backbone),
            ClutteredDigitsDataModule(**dict(DATA, test_samples=samples, batch_size=64)),
            ["l2norm"],
            [1.0, 0.5],
            out=tmp_path / str(samples),
            repeats=1,
            warmup=0,
            quiet=True,
            flops_ratios=None,
        )
        unpruned = result["rows"][0]
        assert 0.0 < unpruned["accuracy"] < 1.0
        widths[samples] = unpruned["accuracy_high"] - unpruned["accuracy_low"]
    assert 0.0 < widths[512] < 0.6 * widths[32], widths  # ~1/sqrt(16) of it


def test_accuracy_interval_and_paired_difference_by_hand():
    rng = np.random.default_rng(3)
    small, large = rng.random(40) < 0.7, rng.random(4000) < 0.7
    for correct in (small, large):
        out = accuracy_interval(correct, resamples=500, seed=1)
        assert out["accuracy"] == correct.mean()
        assert out["accuracy_low"] < out["accuracy"] < out["accuracy_high"]
    width = {n: accuracy_interval(c)["accuracy_high"] - accuracy_interval(c)["accuracy_low"] for n, c in
             ((40, small), (4000, large))}  # fmt: skip
    assert width[4000] < 0.2 * width[40]
    assert accuracy_interval(small, seed=5) == accuracy_interval(small, seed=5)  # seeded
    # b is a, except 30 of 400 samples a gets right and b does not: a paired interval excludes 0
    a = rng.random(400) < 0.6
    b = a.copy()
    flipped = np.flatnonzero(a)[:30]
    b[flipped] = False
    paired = paired_difference(a, b)
    assert paired["difference"] == pytest.approx(30 / 400)
    assert 0.0 < paired["difference_low"] < paired["difference"] < paired["difference_high"]
    assert paired["p_not_above_zero"] == 0.0
    same = paired_difference(a, a)
    assert same["difference"] == same["difference_low"] == same["difference_high"] == 0.0
    with pytest.raises(ValueError, match="pair the same test samples"):
        paired_difference(a, b[:-1])


def test_accuracy_at_equal_flops_on_a_synthetic_curve():
    points = [
        CurvePoint(1.0, 0.9, np.array([0.8, 0.9, 1.0]), "1"),
        CurvePoint(0.6, 0.7, np.array([0.6, 0.7, 0.8]), "0.5"),
        CurvePoint(0.2, 0.5, np.array([0.4, 0.5, 0.6]), "0.25"),
    ]
    below, middle, on, upper, above = accuracy_at_flops(points, [0.1, 0.4, 0.6, 0.9, 1.1])
    assert below is None and above is None  # no extrapolation past the cheapest or dearest budget
    # 0.4 is halfway from 0.2 to 0.6: accuracy (0.5 + 0.7) / 2, replicates [0.5, 0.6, 0.7] draw by draw
    assert middle["accuracy"] == pytest.approx(0.6) and middle["between"] == "0.25–0.5"
    # 95% percentile interval of [0.5, 0.6, 0.7] (numpy linear): 0.5 + 0.05·0.1 and 0.6 + 0.95·0.1
    assert middle["accuracy_low"] == pytest.approx(0.505) and middle["accuracy_high"] == pytest.approx(0.695)
    assert on["accuracy"] == 0.7 and on["between"] == "0.5"
    # 0.9 is 3/4 of the way from 0.6 to 1.0
    assert upper["accuracy"] == pytest.approx(0.7 + 0.75 * 0.2)
    assert upper["accuracy_low"] == pytest.approx(0.75 + 0.05 * 0.1)


def test_matched_flops_table_follows_each_curve(run):
    rows, matched = run.result["rows"], run.result["matched_flops"]
    assert {e["flops_ratio"] for e in matched} == {0.4, 0.5, 0.6, 0.7, 0.8}
    grouped = _by_method(rows)
    assert {e["method"] for e in matched} == set(grouped) - {"unpruned"}
    for entry in matched:
        curve = sorted((r["flops_ratio"], r["accuracy"]) for r in grouped[entry["method"]].values())
        target = entry["flops_ratio"]
        if not curve[0][0] <= target <= curve[-1][0]:
            assert entry["accuracy"] is None and entry["accuracy_low"] is None, entry
            continue
        (x0, y0), (x1, y1) = next((p, q) for p, q in itertools.pairwise(curve) if p[0] <= target <= q[0])
        assert entry["accuracy"] == pytest.approx(y0 + (target - x0) / (x1 - x0) * (y1 - y0)), entry
        assert entry["accuracy_low"] <= entry["accuracy"] + 1e-12 <= entry["accuracy_high"] + 2e-12
    assert any(e["accuracy"] is None for e in matched) and any(e["accuracy"] is not None for e in matched)
    with (run.out / "matched_flops.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(matched)
    assert json.loads((run.out / "results.json").read_text())["matched_flops"] == matched


def test_learned_is_compared_with_the_best_training_free_method(run):
    grouped = _by_method(run.result["rows"])
    by_ratio = {c["value"]: c for c in run.result["comparisons"] if c["at"] == "keep_ratio"}
    assert sorted(by_ratio) == [0.25, 0.5]  # keep 1 drops nothing
    for ratio, comparison in by_ratio.items():
        free = {name: grouped[name][ratio]["accuracy"] for name in TRAINING_FREE}
        assert comparison["learned"] == "dynamicvit" and free[comparison["baseline"]] == max(free.values())
        assert comparison["difference"] == pytest.approx(grouped["dynamicvit"][ratio]["accuracy"] - max(free.values()))
        assert comparison["difference_low"] <= comparison["difference"] <= comparison["difference_high"]


def test_site_sweep_picks_the_site_with_the_best_validation_accuracy(run, tmp_path):
    result = run_bench(
        str(run.backbone),
        ClutteredDigitsDataModule(**dict(DATA, val_samples=48)),
        ["l2norm", "random"],
        [1.0, 0.5, 0.25],
        out=tmp_path / "sweep",
        repeats=1,
        warmup=0,
        quiet=True,
        sweep_sites=True,
    )
    sweep = result["site_sweep"]
    assert {e["site"] for e in sweep} == {"vit.0", "vit.1", "vit.2"}  # 4 blocks: a block must follow the site
    assert len(sweep) == 2 * 3 * 3
    assert result["metadata"]["site_sweep"]["val_samples"] == 48
    rows = {(r["method"], r["keep_ratio"]): r for r in result["rows"]}
    for method in ("l2norm", "random"):
        for ratio in (1.0, 0.5, 0.25):
            entries = [e for e in sweep if e["method"] == method and e["keep_ratio"] == ratio]
            (best,) = [e for e in entries if e["best"]]
            assert best["val_accuracy"] == max(e["val_accuracy"] for e in entries)
            row = rows[(f"{method}@best_site", ratio)]
            assert row["sites"] == [best["site"]] and row["kind"] == "training-free"
            # the measured row is the sweep's test score at that site: the same model, data and draws
            assert row["accuracy"] == best["accuracy"] and row["flops_ratio"] == pytest.approx(best["flops_ratio"])
    # the sweep is not a re-run of the default site: some site's test accuracy differs at keep 0.5
    assert len({e["accuracy"] for e in sweep if e["method"] == "l2norm" and e["keep_ratio"] == 0.5}) > 1
    with (tmp_path / "sweep" / "site_sweep.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(sweep)


def test_choose_best_sites_uses_validation_not_test_accuracy():
    entries = [
        {"method": "m", "keep_ratio": 0.5, "site": "vit.0", "val_accuracy": 0.6, "accuracy": 0.9, "flops_ratio": 0.4},
        {"method": "m", "keep_ratio": 0.5, "site": "vit.1", "val_accuracy": 0.8, "accuracy": 0.7, "flops_ratio": 0.5},
        {"method": "m", "keep_ratio": 0.5, "site": "vit.2", "val_accuracy": 0.8, "accuracy": 0.8, "flops_ratio": 0.6},
    ]
    assert choose_best_sites(entries) == {("m", 0.5): "vit.1"}  # best validation; the tie goes to fewer FLOPs
    assert [e["best"] for e in entries] == [False, True, False]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(flops_ratios="0.5,2"), r"flops_ratios: 2.0 is outside \(0, 1\]"),
        (dict(bootstrap_resamples=1), r"bootstrap_resamples: must be an integer >= 2"),
        (dict(sweep_sites="block3"), r"sweep_sites: .*block3.* are not vit.<i> sites"),
    ],
)
def test_new_options_are_validated_before_any_work(run, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_bench(str(run.backbone), ClutteredDigitsDataModule(**DATA), ["random"], [1.0], tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()


def test_sweep_sites_outside_the_model_are_named(run, tmp_path):
    with pytest.raises(ValueError, match=r"sweep_sites: \['vit.3'\] do not exist on this model"):
        run_bench(
            str(run.backbone), ClutteredDigitsDataModule(**DATA), ["random"], [1.0], tmp_path, sweep_sites="vit.3"
        )


def test_sweep_refuses_data_without_a_validation_split(run, tmp_path):
    from lightning.pytorch import LightningDataModule

    class TestOnly(LightningDataModule):
        def __init__(self):
            super().__init__()
            self.inner = ClutteredDigitsDataModule(**DATA)

        def setup(self, stage=None):
            self.inner.setup("test")

        def test_dataloader(self):
            return self.inner.test_dataloader()

    with pytest.raises(ValueError, match=r"sweep_sites: TestOnly gives no validation split .*never on the test split"):
        run_bench(str(run.backbone), TestOnly(), ["random"], [1.0, 0.5], tmp_path, sweep_sites=True, quiet=True)


def test_several_artifacts_of_one_method_are_named_by_their_folder(run, tmp_path):
    from tokensift.bench.specs import parse_methods

    for folder in ("seed0", "seed1", "other/seed1"):
        shutil.copytree(run.artifact, tmp_path / folder)
    specs, _ = parse_methods([f"dynamicvit:{tmp_path / 'seed0'}", f"dynamicvit:{tmp_path / 'seed1'}", "random"])
    assert [s.label for s in specs] == ["dynamicvit:seed0", "dynamicvit:seed1", "random"]
    # two folders of one name: the whole entry tells them apart
    entries = [f"dynamicvit:{tmp_path / 'seed1'}", f"dynamicvit:{tmp_path / 'other' / 'seed1'}"]
    specs, _ = parse_methods(entries)
    assert [s.label for s in specs] == entries


def test_hub_ids_as_methods(run, tmp_path, monkeypatch):
    """``--methods`` takes hub ids (``NAME:org/name`` or ``org/name``) resolved from the local hub cache, as
    ``ts.apply`` does; rows are named by the repo, not by the snapshot's commit folder."""
    import huggingface_hub

    from tests.test_hub import cache_repo

    cache = tmp_path / "hub_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for repo in ("my-org/seed-a", "my-org/seed-b"):
        cache_repo(cache, repo, run.artifact)
    monkeypatch.chdir(tmp_path)
    data = ClutteredDigitsDataModule(**DATA)
    common = dict(batch_size=None, timing_batches=1, repeats=1, warmup=0, overlay_ratio=0.5)
    result = run_bench(
        str(run.backbone), data, ["dynamicvit:my-org/seed-a", "my-org/seed-b"], [0.5], tmp_path / "out", **common
    )
    rows = {row["method"]: row for row in result["rows"] if row["keep_ratio"] == 0.5}
    local = _by_method(run.result["rows"])["dynamicvit"][0.5]
    assert set(rows) - {"oracle"} == {"dynamicvit:seed-a", "dynamicvit:seed-b"}
    assert rows["dynamicvit:seed-a"]["accuracy"] == rows["dynamicvit:seed-b"]["accuracy"] == local["accuracy"]
    with pytest.raises(FileNotFoundError, match=r"methods: 'dynamicvit:my-org/absent': .*not in the cache"):
        run_bench(str(run.backbone), data, ["dynamicvit:my-org/absent"], [0.5], tmp_path / "o2", **common)
