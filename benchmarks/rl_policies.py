"""The accuracy tables of the reward-trained policies (issue 13): ia_red2 and das on the demo ViT, cacovid and das on
the demo LLaVA, each over three training seeds, benched beside the gradient-trained scorers and the training-free
pruners of the two demos, idempotent.

    .venv/bin/python benchmarks/rl_policies.py [--out runs/rl] [--no-image] [--no-vqa] [--no-das] [--seeds 0,1,2]

Needs the demo ViT ``runs/quickstart/backbone`` (``make demo``) and the demo LLaVA ``runs/vqa/llava``
(``make demo-vqa``); their dynamicvit artifacts (``runs/quickstart/artifacts/seed*``) and gradient-trained MLLM scorers
(``runs/vqa/artifacts/{question_selector,atp,dynamic_llava}/seed*``) are benched when present, never retrained.

- every fit of seed S runs with ``--seed_everything S --model.init_args.seed S``;
- image: ``tokensift fit -c configs/ia_red2_digits.yaml`` exported to ``<out>/ia_red2/seedS``
  and ``configs/das_digits.yaml`` to ``<out>/das_vit/seedS``, then one
  ``tokensift bench`` on the ViT (``<out>/bench_image``) with them, the dynamicvit seeds and the image demo's
  training-free methods;
- vqa: ``configs/cacovid_digit_vqa.yaml`` to ``<out>/cacovid/seedS`` and ``configs/das_digit_vqa.yaml`` to
  ``<out>/das_llava/seedS``, then one bench on the LLaVA
  (``<out>/bench_vqa``) with them, the existing gradient-trained scorers and the VQA demo's training-free methods.

An artifact folder that exists is reused (a second run only re-benches); fits log under ``<out>/logs/...``. The end
prints each bench's seed-folded tables (also ``<out>/bench_*/summary.md``) and das against token pruning at equal FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
VIT = Path("runs/quickstart/backbone")
LLAVA = Path("runs/vqa/llava")
DYNAMICVIT = Path("runs/quickstart/artifacts")
MLLM_SCORERS = Path("runs/vqa/artifacts")
GRADIENT_TRAINED_MLLM = ("question_selector", "atp", "dynamic_llava")


def parse_floats(text: str, name: str) -> list[float]:
    """``"0.5,0.25"`` → ``[0.5, 0.25]``; a ValueError naming the option otherwise."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated numbers, got {text!r}.") from None
    if not values:
        raise ValueError(f"--{name} needs at least one value, got {text!r}.")
    return values


def require_backbones(image: bool, vqa: bool) -> None:
    """Refuse before any work when a stage's demo backbone is missing, naming the make target that builds it."""
    from tokensift.backbones.pretrain import REPORT as VIT_REPORT
    from tokensift.backbones.pretrain_mllm import REPORT as MLLM_REPORT

    missing = []
    if image and not (VIT / VIT_REPORT).is_file():
        missing.append(f"{VIT} (run `make demo`, or pass --no-image)")
    if vqa and not (LLAVA / MLLM_REPORT).is_file():
        missing.append(f"{LLAVA} (run `make demo-vqa`, or pass --no-vqa)")
    if missing:
        raise SystemExit("benchmarks/rl_policies.py needs " + " and ".join(missing) + ".")


def train_seeds(
    console,
    name: str,
    recipe: Path,
    backbone: Path,
    out: Path,
    seeds: Sequence[int],
    data_options: Mapping,
) -> list[Path]:
    """One fit + export of ``recipe`` on ``backbone`` per seed into ``out/<name>/seed<s>`` (reused when there)."""
    from tokensift.quickstart import fit_and_export

    artifacts = []
    for seed in seeds:
        artifact = out / name / f"seed{seed}"
        logs = out / "logs" / name / f"seed{seed}"
        # a seed moves everything a run draws: the initial weights (--seed_everything) and the model's own draws
        # (keep ratios, Bernoulli / Gumbel noise, skip sets: --model.init_args.seed)
        extra = [f"--seed_everything={seed}", f"--trainer.default_root_dir={logs}", f"--model.init_args.seed={seed}"]
        fit_and_export(
            console,
            artifact,
            f"{name} artifact (seed {seed})",
            f"train {name} (seed {seed}) by {recipe.name}",
            recipe,
            f"--model.init_args.backbone={backbone}",
            logs,
            dict(data_options),
            None,
            extra,
        )
        artifacts.append(artifact)
    return artifacts


def existing(paths: Sequence[Path]) -> list[Path]:
    return [path for path in paths if (path / "tokensift.json").is_file()]


def skip_versus_tokens(summary: Mapping) -> str:
    """das (mean ± sd over its seeds) against the best token-pruning rows at each FLOPs target of the equal-cost table:
    the best learned token scorer (seed mean) and the best training-free method, and das minus the latter."""
    from tokensift.bench.seeds import _accuracy_text

    def mean(entry: Mapping) -> float:
        accuracy = entry["accuracy"]
        return accuracy["mean"] if isinstance(accuracy, Mapping) else accuracy

    matched = [e for e in summary["matched_flops"] if e.get("accuracy") is not None]
    targets = sorted({e["flops_ratio"] for e in matched})
    lines = [
        "| FLOPs ratio | das (layer skipping) | best learned token scorer | best training-free token pruner "
        "| das − training-free |",
        "|---|---|---|---|---|",
    ]
    for target in targets:
        here = [e for e in matched if e["flops_ratio"] == target]
        das = [e for e in here if e["method"].split(":")[0].startswith("das")]
        learned = [e for e in here if e["kind"] == "learned" and e not in das]
        free = [e for e in here if e["kind"] == "training-free"]
        best_learned = max(learned, key=mean, default=None)
        best_free = max(free, key=mean, default=None)

        def cell(entry: Mapping | None) -> str:
            return "—" if entry is None else f"{entry['method']} {_accuracy_text(entry)}"

        gap = f"{mean(das[0]) - mean(best_free):+.3f}" if das and best_free else "—"
        lines.append(f"| {target:g} | {_accuracy_text(das[0]) if das else '—'} | {cell(best_learned)} | "
                     f"{cell(best_free)} | {gap} |")  # fmt: skip
    return "\n".join(lines)


def bench(model: Path, data, methods: Sequence[str], args: argparse.Namespace, out: Path, sweep: bool) -> dict:
    from tokensift.bench import run_bench

    return run_bench(
        model_dir=str(model),
        data=data,
        methods=list(methods),
        keep_ratios=[1.0, *parse_floats(args.keep_ratios, "keep-ratios")],
        flops_ratios=parse_floats(args.flops_ratios, "flops-ratios"),
        out=out,
        sweep_sites=sweep,
        quiet=not args.print_bench,
        num_threads=1,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/rl"), help="artifacts, logs and benches land here")
    parser.add_argument("--seeds", type=str, default="0,1,2", help="training seeds of every reward-trained policy")
    parser.add_argument(
        "--image", action=argparse.BooleanOptionalAction, default=True, help="ia_red2 (+ das) on the ViT"
    )
    parser.add_argument("--vqa", action=argparse.BooleanOptionalAction, default=True, help="cacovid (+ das) on LLaVA")
    parser.add_argument("--das", action=argparse.BooleanOptionalAction, default=True, help="das rows in both benches")
    parser.add_argument("--keep-ratios", type=str, default="0.5,0.25,0.1", help="budgets below 1 (1 is always run)")
    parser.add_argument(
        "--flops-ratios", type=str, default="0.5,0.6,0.7,0.8,0.9", help="targets of the equal-FLOPs table"
    )
    parser.add_argument(
        "--sweep-sites",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="image bench: training-free methods also at their best vit.<i> site (as `make demo`)",
    )
    parser.add_argument("--test-samples", type=int, default=1024, help="test questions of the VQA bench")
    parser.add_argument("--bench-batch-size", type=int, default=64, help="batch size of both benches")
    parser.add_argument("--print-bench", action="store_true", help="also print run_bench's own per-row tables")
    args = parser.parse_args(argv)
    require_backbones(args.image, args.vqa)

    from rich.console import Console

    from tokensift.data import ClutteredDigitsDataModule, DigitVQADataModule
    from tokensift.quickstart import TRAINING_FREE, parse_seeds
    from tokensift.quickstart_vqa import MLLM_METHODS, SCENE_OPTIONS

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds)
    console = Console()
    out: Path = args.out
    tables: dict[str, str] = {}
    results: dict[str, dict] = {}
    started = time.perf_counter()

    if args.image:
        methods = [f"ia_red2:{a}" for a in train_seeds(
            console, "ia_red2", CONFIGS / "ia_red2_digits.yaml", VIT, out, seeds, {}
        )]  # fmt: skip
        if args.das:
            das = train_seeds(console, "das_vit", CONFIGS / "das_digits.yaml", VIT, out, seeds, {})
            methods += [f"das:{a}" for a in das]
        methods += [f"dynamicvit:{a}" for a in existing(sorted(DYNAMICVIT.glob("seed*")))]
        methods += list(TRAINING_FREE)
        console.rule("bench on the demo ViT")
        data = ClutteredDigitsDataModule(batch_size=args.bench_batch_size)
        results["image"] = bench(VIT, data, methods, args, out / "bench_image", args.sweep_sites)

    if args.vqa:
        report = json.loads((LLAVA / "tokensift_mllm.json").read_text())
        scene = {key: report["data"][key] for key in SCENE_OPTIONS if key in report["data"]}
        methods = [f"cacovid:{a}" for a in train_seeds(
            console, "cacovid", CONFIGS / "cacovid_digit_vqa.yaml", LLAVA, out, seeds, scene
        )]  # fmt: skip
        if args.das:
            das = train_seeds(
                console, "das_llava", CONFIGS / "das_digit_vqa.yaml", LLAVA, out, seeds, scene
            )
            methods += [f"das:{a}" for a in das]
        for name in GRADIENT_TRAINED_MLLM:
            methods += [f"{name}:{a}" for a in existing(sorted((MLLM_SCORERS / name).glob("seed*")))]
        methods += list(MLLM_METHODS)
        console.rule("bench on the demo LLaVA")
        data = DigitVQADataModule(**(scene | {"test_samples": args.test_samples, "batch_size": args.bench_batch_size}))
        results["vqa"] = bench(LLAVA, data, methods, args, out / "bench_vqa", False)

    from tokensift.bench.seeds import markdown_tables

    for name, result in results.items():
        summary = result.get("seeds")
        if summary is None:
            console.print(f"{name}: no method has several artifacts, so no seed-folded table (see the bench's tables)")
            continue
        tables[f"{name}: accuracy (learned rows: mean ± sd over seeds)"] = markdown_tables(summary)
        if args.das:
            tables[f"{name}: das (layer skipping) vs token pruning at equal FLOPs"] = skip_versus_tokens(summary)
    for title, table in tables.items():
        print(f"\n## {title}\n\n{table}")
    print(f"\nwall time {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
