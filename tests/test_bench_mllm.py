"""``tokensift bench`` on multimodal LLMs: a tiny digit-VQA LLaVA (a few training steps), every output file,
keep ratio 1 = unpruned, the oracle's recall, the prefill FLOPs by hand, DyVTE's exit layers; the VQA demo
end to end (slow)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import tokensift as ts
from tests.tiny_mllm import build_tiny_mllm, build_tiny_molmo2, make_batch, make_molmo2_batch
from tokensift.backbones import adapt
from tokensift.backbones.loading import load_mllm_backbone
from tokensift.backbones.pretrain_mllm import pretrain_mllm
from tokensift.backbones.vqa import answer_accuracy
from tokensift.bench import FIELDS, bench, run_bench
from tokensift.data import DigitVQADataModule
from tokensift.export.artifact import save_artifact
from tokensift.flops import mllm_prefill_flops, mllm_vision_flops
from tokensift.scorers.dyvte import DyVTEConfig, DyVTEMethod

DATA = dict(batch_size=8, train_samples=64, val_samples=8, test_samples=16, seed=1)
TINY = dict(vision_hidden_size=32, vision_layers=1, text_hidden_size=32, text_layers=3)
QUIET = dict(enable_progress_bar=False, enable_model_summary=False)
METHODS = ("fastv", "visionzip", "random")
RATIOS = (1.0, 0.5, 0.1)
THRESHOLDS = (1.0, 0.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny LLaVA trained for 16 steps on digit VQA, random-init DyVTE routers exported, and one bench run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench_mllm")
    model_dir, _ = pretrain_mllm(
        root / "llava", DigitVQADataModule(**DATA), max_epochs=2, trainer_kwargs=QUIET, lr=5e-3, **TINY
    )
    model = load_mllm_backbone(str(model_dir))
    adapter = adapt(model)
    torch.manual_seed(0)
    routers = DyVTEMethod.for_backbone(adapter, DyVTEConfig(router_width=16)).eval()
    artifact = save_artifact(routers, adapter.fingerprint(), root / "dyvte", default_budget={"threshold": 0.5})
    out = root / "bench"
    config = root / "data.yaml"  # what --data takes on the command line
    config.write_text(json.dumps({"data": {"class_path": "tokensift.data.DigitVQADataModule", "init_args": DATA}}))
    result = bench(
        model=str(model_dir),
        data=str(config),
        methods=",".join([*METHODS, f"dyvte:{artifact}"]),
        keep_ratios=",".join(map(str, RATIOS)),
        thresholds=",".join(map(str, THRESHOLDS)),
        out=str(out),
        batch_size=None,
        repeats=1,
        warmup=0,
    )
    return {"result": result, "out": out, "model_dir": model_dir, "model": model, "artifact": artifact}


def _rows(run) -> dict[tuple[str, float], dict]:
    return {
        (r["method"], r["threshold"] if r["threshold"] is not None else r["keep_ratio"]): r
        for r in run["result"]["rows"]
    }


def test_every_output_file_and_row(run):
    out = run["out"]
    for name in ("results.json", "results.csv", "pareto.png", "overlays.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    expected = {("unpruned", 1.0)} | {(m, r) for m in (*METHODS, "oracle") for r in RATIOS}
    expected |= {("dyvte", t) for t in THRESHOLDS}
    assert set(_rows(run)) == expected
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == run["result"]["rows"]
    assert saved["metadata"]["model_type"] == "llava" and saved["metadata"]["num_samples"] == 16
    with (out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == list(FIELDS) and len(table) == len(expected)
    for row in run["result"]["rows"]:
        assert set(row) == set(FIELDS)
        for field in ("accuracy", "oracle_recall", "flops_ratio", "speedup", "mem_ratio", "time_ms"):
            assert isinstance(row[field], float) and row[field] >= 0, (row["method"], field)
        assert row["num_samples"] == 16 and row["num_patches"] == 64


def test_intervals_and_accuracy_at_equal_flops(run):
    result = run["result"]
    for row in result["rows"]:
        assert 0.0 <= row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"] <= 1.0, row["method"]
    assert any(row["accuracy_high"] > row["accuracy_low"] for row in result["rows"])
    assert result["metadata"]["accuracy_interval"]["resamples"] == 1000
    matched = result["matched_flops"]
    assert {e["method"] for e in matched} == {*METHODS, "dyvte", "oracle"}
    rows = _rows(run)
    for entry in matched:
        flops = [r["flops_ratio"] for r in result["rows"] if r["method"] == entry["method"]]
        covered = min(flops) <= entry["flops_ratio"] <= max(flops)
        assert (entry["accuracy"] is not None) == covered, entry
        if covered:
            assert entry["accuracy_low"] <= entry["accuracy"] + 1e-12 <= entry["accuracy_high"] + 2e-12
    # random's curve runs from keep 0.1 to keep 1 (FLOPs ratio 1): a target between two budgets lies between them
    low, high = rows[("random", 0.5)], rows[("random", 1.0)]
    target = round((low["flops_ratio"] + high["flops_ratio"]) / 2, 6)
    data = {"class_path": "tokensift.data.DigitVQADataModule", "init_args": DATA}
    again = run_bench(
        run["model_dir"], data, "random", RATIOS, out=run["out"].parent / "again", repeats=1, warmup=0,
        quiet=True, flops_ratios=[target],
    )  # fmt: skip
    (entry,) = [e for e in again["matched_flops"] if e["method"] == "random"]
    low, high = (next(r for r in again["rows"] if r["method"] == "random" and r["keep_ratio"] == k) for k in (0.5, 1.0))
    weight = (target - low["flops_ratio"]) / (high["flops_ratio"] - low["flops_ratio"])
    assert entry["accuracy"] == pytest.approx(low["accuracy"] + weight * (high["accuracy"] - low["accuracy"]))
    saved = json.loads((run["out"] / "results.json").read_text())
    assert saved["matched_flops"] == matched and saved["comparisons"] == result["comparisons"]


def test_keep_ratio_one_is_the_unpruned_model(run):
    rows = _rows(run)
    unpruned = rows[("unpruned", 1.0)]
    data = DigitVQADataModule(**DATA)
    data.setup("test")
    reference = answer_accuracy(run["model"], data.test_dataset, batch_size=8, generate=False)["accuracy"]
    assert unpruned["accuracy"] == pytest.approx(reference)
    assert 0.0 < unpruned["accuracy"] < 1.0  # a model that answers some, not all, so equality can fail
    for method in (*METHODS, "oracle"):
        assert rows[(method, 1.0)]["accuracy"] == unpruned["accuracy"], method
        assert rows[(method, 1.0)]["oracle_recall"] == 1.0, method
    assert rows[("random", 1.0)]["flops_ratio"] == pytest.approx(1.0)
    assert rows[("dyvte", 1.0)]["accuracy"] == unpruned["accuracy"]  # threshold 1 never exits


def test_oracle_keeps_every_oracle_patch_the_budget_allows(run):
    rows = _rows(run)
    data = DigitVQADataModule(**DATA)
    data.setup("test")
    most = max(int(data.test_dataset[i]["oracle_mask"].sum()) for i in range(16))
    for ratio in RATIOS:
        oracle = rows[("oracle", ratio)]
        # every sample keeps keep_count visual tokens: all its oracle patches fit iff the largest set does
        assert (oracle["oracle_recall"] == 1.0) == (oracle["keep_count"] >= most), ratio
        for method in METHODS:
            assert oracle["oracle_recall"] >= rows[(method, ratio)]["oracle_recall"], (method, ratio)
    assert rows[("oracle", 0.5)]["oracle_recall"] == 1.0
    assert rows[("random", 0.1)]["flops_ratio"] < rows[("random", 0.5)]["flops_ratio"] < 1.0


def test_dyvte_rows_carry_the_mean_exit_layer(run):
    rows = _rows(run)
    never, always = rows[("dyvte", 1.0)], rows[("dyvte", 0.0)]
    assert never["mean_exit_layer"] == 3.0 and never["keep_count"] == 64  # kept to the end of 3 layers
    assert always["mean_exit_layer"] == 1.0 and always["keep_count"] == 0  # every sample exits at llm.1
    assert always["flops_ratio"] < never["flops_ratio"]
    assert never["flops_scorer"] > 0 and never["kind"] == "learned" and never["keep_ratio"] is None
    assert all(rows[(m, r)]["mean_exit_layer"] is None for m in (*METHODS, "oracle") for r in RATIOS)


def test_prefill_flops_by_hand():
    """tests/tiny_mllm's LLaVA: CLIP 32 wide, MLP 64, 3 blocks, 16x16 px in 4-px patches; Llama 32 wide,
    4 heads of 8 (2 key/value heads), gated MLP 64, 4 layers; projector 32 -> 32 -> 32."""
    adapter = adapt(build_tiny_mllm("llava"))
    patches, tower_tokens = 16, 17  # + CLIP's [CLS]
    block = tower_tokens * (4 * 2 * 32 * 32 + 2 * 2 * 32 * 64) + 4 * tower_tokens**2 * 32
    vision = 2 * (32 * 3 * 4 * 4) * patches + 3 * block + patches * 2 * (32 * 32 + 32 * 32)
    assert mllm_vision_flops(adapter, 16) == vision == 1_061_248

    per_token = 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32) + 2 * 3 * 32 * 64  # q k v o + gate up down

    def layer(n: int) -> int:
        return n * per_token + 4 * n * n * 32

    # 10 text tokens; 16 visual tokens kept to layer 2, then 4 (pruned at llm.2)
    flops = mllm_prefill_flops(adapter, torch.tensor([10]), torch.tensor([[16, 16, 4, 4]]))
    assert flops["llm"] == 2 * layer(26) + 2 * layer(14) == 2 * 565_760 + 2 * 283_136
    assert flops["unpruned"] == 4 * layer(26) == 2_263_040
    # the bench's ratio: the vision side on both sides
    ratio = (vision + flops["llm"]) / (vision + flops["unpruned"])
    assert ratio == 2_759_040 / 3_324_288


def test_tower_flops_counter_charges_what_the_tower_ran():
    """Unpruned, the counter is mllm_vision_flops per image; a vit.<i> site on Molmo2's packed tower lowers it
    (per-frame attention over the kept patches), a pre_llm site leaves it alone."""
    from tokensift.flops import TowerFlopsCounter

    llava = build_tiny_mllm("llava")
    batch = make_batch("llava")
    inputs = batch.inputs()
    with torch.no_grad(), TowerFlopsCounter(adapt(llava)) as counter:
        llava(**inputs)
    images = int(inputs["pixel_values"].shape[0])
    assert counter.flops == images * mllm_vision_flops(adapt(llava), 16)

    molmo = build_tiny_molmo2()
    inputs = make_molmo2_batch("video").inputs([0, 1, 2])
    totals = {}
    for site in (None, "pre_llm", "vit.0"):
        handle = None if site is None else ts.apply(molmo, "random", keep_ratio=0.5, sites=[site])
        with torch.no_grad(), TowerFlopsCounter(adapt(molmo)) as counter:
            molmo(**inputs)
        totals[site] = counter.flops
        if handle is not None:
            handle.remove()
    assert totals["pre_llm"] == totals[None] > totals["vit.0"] > 0


def test_bad_inputs_name_the_field(run, tmp_path):
    data = {"class_path": "tokensift.data.DigitVQADataModule", "init_args": DATA}
    with pytest.raises(ValueError, match="cannot run on a multimodal LLM"):
        run_bench(run["model_dir"], data, "tome", out=tmp_path)
    with pytest.raises(ValueError, match=r"sweep_sites: the site sweep covers image classifiers"):
        run_bench(run["model_dir"], data, "random", out=tmp_path, sweep_sites=True)
    with pytest.raises(ValueError, match=r"thresholds: 1\.5 is outside"):
        run_bench(run["model_dir"], data, "random", thresholds="1.5", out=tmp_path)
    other = dict(DATA, num_channels=1)
    with pytest.raises(ValueError, match="data: images have 1 channels"):
        run_bench(run["model_dir"], {**data, "init_args": other}, "random", out=tmp_path, quiet=True)
    assert not Path(tmp_path / "results.json").exists()


@pytest.mark.slow
def test_quickstart_vqa_end_to_end_and_reuses_its_outputs(tmp_path):
    from tokensift.quickstart_vqa import quickstart_vqa

    torch.set_num_threads(1)
    options = dict(
        out=tmp_path / "vqa",
        train_samples=128,
        text_layers=3,  # fastv scores at llm.2
        router_epochs=1,
        router_train_samples=64,
        keep_ratios="1,0.25",
        test_samples=16,
        bench_batch_size=16,
        model_options={"vision_hidden_size": 32, "vision_layers": 1, "text_hidden_size": 32},
        scorer_seeds="0,1",
        scorer_train_samples=64,
    )
    result = quickstart_vqa(**options)
    methods = {row["method"] for row in result["rows"]}
    assert methods == {"unpruned", "fastv", "pyramiddrop", "visionzip", "dart", "d2pruner", "divprune", "random",
                       "dyvte", "oracle", "question_selector:seed0", "question_selector:seed1", "dynamic_llava",
                       "atp"}  # fmt: skip
    for name in ("results.json", "results.csv", "pareto.png", "overlays.png", "summary.md", "summary.json"):
        assert (tmp_path / "vqa" / "bench" / name).is_file()
    summary = result["seed_summary"]["budgets"]
    selector = [row for row in summary if row["method"] == "question_selector (learned)"]
    assert selector and all(row["seeds"] == 2 for row in selector)
    weights = tmp_path / "vqa" / "llava" / "model.safetensors"
    scorer = tmp_path / "vqa" / "artifacts" / "question_selector" / "seed1" / "scorer.safetensors"
    stamps = [weights.stat().st_mtime_ns, scorer.stat().st_mtime_ns]
    quickstart_vqa(**options)  # reuses the model, the routers and the scorers
    assert [weights.stat().st_mtime_ns, scorer.stat().st_mtime_ns] == stamps
