"""The second image task end to end: textured shapes → a ViT trained from scratch → the default ``dynamicvit``
recipe, untuned → bench against every training-free vision method and the oracle, at equal keep and at equal FLOPs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/second_task.py [--out runs/second_task]

Stages (each reused when its output exists, so a second run only re-benches):

1. ``pretrain_backbone`` on ``TexturedShapesDataModule`` (d 64, 4 blocks: the digits demo's ViT; 8 epochs of
   16,384 canvases), saved to ``OUT/backbone``.
2. ``tokensift fit -c configs/dynamicvit_shapes.yaml`` (``configs/dynamicvit_digits.yaml`` with the data swapped:
   same hyperparameters), exported to ``OUT/artifact``.
3. ``run_bench`` over the learned scorer, every training-free vision method (also at every ``vit.<i>`` site, the
   best on the validation split per keep ratio: ``<method>@best_site``) and the oracle, at the table's keep
   ratios plus a finer grid (``--match-grid``) so that every curve spans the FLOPs targets; files in ``OUT/bench``.

Printed: every method at equal keep (accuracy with its 95% bootstrap interval, oracle recall, FLOPs ratio), every
method at equal FLOPs (``--flops-ratios``, linear between its budgets), and the learned scorer minus the best
training-free method, paired over the same test samples, at each keep ratio and FLOPs ratio; last, within each
FLOPs budget, the training-free configuration (method × site × keep ratio) with the best validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "dynamicvit_shapes.yaml"
TRAINING_FREE = ("random", "l2norm", "cls_attention", "tome", "divprune")
LEARNED = "dynamicvit"


def build_backbone(out: Path, epochs: int, train_samples: int, console: Console) -> float:
    from tokensift.backbones.pretrain import REPORT, pretrain_backbone
    from tokensift.data import TexturedShapesDataModule

    if not (out / REPORT).is_file():
        console.rule("1/3 train the ViT backbone on textured shapes")
        data = TexturedShapesDataModule(train_samples=train_samples, batch_size=128)
        pretrain_backbone(out, data, max_epochs=epochs, trainer_kwargs={"enable_progress_bar": False})
    else:
        console.print(f"[green]reusing backbone[/] {out}")
    return float(json.loads((out / REPORT).read_text())["test_accuracy"])


def build_artifact(
    out: Path, backbone: Path, logs: Path, epochs: int | None, fit_args: list[str], console: Console
) -> None:
    from tokensift.cli import TokensiftCLI
    from tokensift.export.checkpoint import export

    if (out / "tokensift.json").is_file():
        console.print(f"[green]reusing scorer artifact[/] {out}")
        return
    console.rule("2/3 fit the default dynamicvit recipe on the frozen backbone")
    args = [
        "fit",
        f"--config={RECIPE}",
        f"--model.backbone={backbone}",
        f"--trainer.logger.init_args.save_dir={logs}",
        "--trainer.enable_progress_bar=false",
    ]
    if epochs is not None:
        args.append(f"--trainer.max_epochs={epochs}")
    cli = TokensiftCLI(args=[*args, *fit_args])
    export(Path(cli.trainer.checkpoint_callbacks[-1].dirpath) / "last.ckpt", out, overwrite=True)


def print_equal_keep(rows: list[dict], budgets: list[float], console: Console) -> None:
    """Every method at the main keep ratios: accuracy, its 95% bootstrap interval, oracle recall, FLOPs ratio."""
    table = Table(title="textured shapes · equal keep ratio")
    for column in ("method", "keep", "acc", "95% CI", "oracle recall", "FLOPs ratio", "sites"):
        table.add_column(column, justify="left" if column in ("method", "sites") else "right")
    for row in rows:
        if row["method"] != "unpruned" and row["keep_ratio"] not in budgets:
            continue
        recall = "—" if row["oracle_recall"] is None else f"{row['oracle_recall']:.3f}"
        table.add_row(
            row["method"],
            f"{row['keep_ratio']:g}",
            f"{row['accuracy']:.3f}",
            f"{row['accuracy_low']:.3f}–{row['accuracy_high']:.3f}",
            recall,
            f"{row['flops_ratio']:.3f}",
            " ".join(row["sites"]) if isinstance(row["sites"], list) else str(row["sites"] or ""),
        )
    console.print(table)


def print_frontier(result: dict, targets: list[float], console: Console) -> None:
    """At each FLOPs ratio: the training-free configuration (method × site × keep ratio, from the site sweep) whose
    FLOPs ratio is at most the target and whose *validation* accuracy is highest, with its test accuracy; beside
    it the learned scorer's test accuracy at that FLOPs ratio (linear between its budgets)."""
    sweep = result.get("site_sweep") or []
    learned = {e["flops_ratio"]: e for e in result["matched_flops"] if e["method"] == LEARNED}
    table = Table(title="textured shapes · best training-free configuration within each FLOPs budget (chosen on val)")
    for column in ("FLOPs ≤", LEARNED, "95% CI", "training-free pick", "its FLOPs", "test acc", "95% CI "):
        table.add_column(column, justify="left" if column == "training-free pick" else "right")
    for target in targets:
        within = [e for e in sweep if e["flops_ratio"] <= target + 1e-9]
        ours = learned.get(target)
        cells = ["—", "—"]
        if ours is not None and ours["accuracy"] is not None:
            cells = [f"{ours['accuracy']:.3f}", f"{ours['accuracy_low']:.3f}–{ours['accuracy_high']:.3f}"]
        if within:
            pick = max(within, key=lambda e: (e["val_accuracy"], -e["flops_ratio"]))
            cells += [
                f"{pick['method']} @ {pick['site']} keep {pick['keep_ratio']:g}",
                f"{pick['flops_ratio']:.3f}",
                f"{pick['accuracy']:.3f}",
                f"{pick['accuracy_low']:.3f}–{pick['accuracy_high']:.3f}",
            ]
        else:
            cells += ["—"] * 4
        table.add_row(f"{target:g}", *cells)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/second_task"))
    parser.add_argument("--backbone-epochs", type=int, default=8)
    parser.add_argument("--backbone-train-samples", type=int, default=16384)
    parser.add_argument("--scorer-epochs", type=int, default=None, help="override the recipe's max_epochs")
    parser.add_argument(
        "--fit-args",
        default="",
        help='more `tokensift fit` overrides for the scorer, e.g. "--model.method_options.sites=[vit.0]"',
    )
    parser.add_argument("--keep-ratios", default="0.5,0.25,0.1", help="the budgets of the equal-keep table")
    parser.add_argument(
        "--match-grid",
        default="0.4,0.3,0.2,0.15,0.05",
        help="extra keep ratios benched for every method, only to compare at equal FLOPs",
    )
    parser.add_argument(
        "--flops-ratios", default="0.4,0.45,0.5,0.6,0.7", help="FLOPs ratios at which every method is compared"
    )
    parser.add_argument(
        "--sweep-sites",
        default="true",
        help="training-free methods at every vit.<i> site too, the best on validation per keep ratio "
        "(<method>@best_site rows); false: only their default site",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per bench row")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    console = Console(width=140)
    start = time.perf_counter()
    out = args.out
    accuracy = build_backbone(out / "backbone", args.backbone_epochs, args.backbone_train_samples, console)
    console.print(f"backbone unpruned test accuracy: {accuracy:.4f}")
    fit_args = shlex.split(args.fit_args)
    build_artifact(out / "artifact", out / "backbone", out / "scorer", args.scorer_epochs, fit_args, console)

    from tokensift.bench import run_bench
    from tokensift.data import TexturedShapesDataModule

    console.rule("3/3 bench: learned vs training-free vs oracle on the same frozen model")
    budgets = [float(r) for r in args.keep_ratios.split(",")]
    grid = [float(r) for r in args.match_grid.split(",") if r.strip()]
    result = run_bench(
        model_dir=out / "backbone",
        data=TexturedShapesDataModule(batch_size=64),
        methods=[f"{LEARNED}:{out / 'artifact'}", *TRAINING_FREE, "oracle"],
        keep_ratios=sorted({1.0, *budgets, *grid}, reverse=True),
        out=out / "bench",
        repeats=args.repeats,
        warmup=1,
        flops_ratios=args.flops_ratios,
        sweep_sites=args.sweep_sites,
        quiet=True,
    )
    from tokensift.bench.results import print_comparisons, print_matched

    print_equal_keep(result["rows"], budgets, console)
    print_matched(result["matched_flops"])
    print_comparisons(result["comparisons"])
    if result.get("site_sweep"):
        print_frontier(result, [float(r) for r in args.flops_ratios.split(",")], console)
    console.print(f"every row: {result['files']['csv']}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
