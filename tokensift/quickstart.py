"""``tokensift quickstart``: the embedded default end to end, idempotent.

cluttered digits → a ViT trained once and frozen → a ``dynamicvit`` scorer fitted on it (the recipe
``configs/dynamicvit_digits.yaml``) → exported → benched against every training-free method.
Each stage reuses its output when it already exists, so a second run only re-benches what is missing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "dynamicvit_digits.yaml"
TRAINING_FREE = ("random", "l2norm", "cls_attention", "tome", "divprune")


def fit_and_export(
    console: Console,
    artifact: Path,
    label: str,
    title: str,
    recipe: Path,
    backbone_arg: str,
    save_dir: Path,
    data_options: dict,
    max_epochs: int | None,
    extra_args: Sequence[str] = (),
) -> None:
    """Stages 2 and 3: ``tokensift fit`` of ``recipe`` on the frozen backbone (``backbone_arg``), logging to
    ``save_dir``, with ``data_options`` as data init_args, ``max_epochs`` when given, then ``extra_args``; export
    its last checkpoint to ``artifact``. An existing ``artifact`` is reused."""
    from tokensift.export.checkpoint import export
    from tokensift.fit_cli import TokensiftCLI

    if (artifact / "tokensift.json").is_file():
        console.print(f"[green]reusing {label}[/] {artifact}")
        return
    console.rule(title)
    args = ["fit", f"--config={recipe}", backbone_arg, f"--trainer.logger.init_args.save_dir={save_dir}"]
    # JSON for lists and numbers; a string as it is (quoted, jsonargparse would keep the quotes)
    args += [
        f"--data.init_args.{key}={value if isinstance(value, str) else json.dumps(value)}"
        for key, value in data_options.items()
    ]
    if max_epochs is not None:
        args.append(f"--trainer.max_epochs={max_epochs}")
    cli = TokensiftCLI(args=[*args, *extra_args])
    last = Path(cli.trainer.checkpoint_callbacks[-1].dirpath) / "last.ckpt"
    console.rule("3/4 export")
    export(last, artifact, overwrite=True)


def parse_seeds(seeds: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``; at least one seed, no repeats."""
    try:
        values = [int(part) for part in str(seeds).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"scorer_seeds must be comma-separated integers, got {seeds!r}.") from None
    if not values or len(set(values)) != len(values):
        raise ValueError(f"scorer_seeds needs at least one seed and no repeats, got {seeds!r}.")
    return values


def quickstart(
    out: Path = Path("runs/quickstart"),
    recipe: Path = RECIPE,
    backbone_epochs: int = 4,
    backbone_train_samples: int = 16384,
    scorer_epochs: int | None = None,
    scorer_seeds: str = "0,1,2",
    keep_ratios: str = "1,0.5,0.25,0.1",
    sweep_sites: bool = True,
    bench_batch_size: int = 64,
    data_options: dict | None = None,
    backbone_options: dict | None = None,
) -> dict:
    """Run the embedded default end to end and print where each method stands.

    Args:
        out: working directory (backbone/, scorer/, artifact/, bench/ land here).
        recipe: the scorer's LightningCLI recipe.
        backbone_epochs: epochs of the ViT trained from scratch (once; reused afterwards).
        backbone_train_samples: training canvases per backbone epoch.
        scorer_epochs: override the recipe's ``trainer.max_epochs``.
        scorer_seeds: comma-separated seeds; one scorer is trained and benched per seed, so the learned row is
            reported as mean ± spread over training runs, not one lucky draw.
        keep_ratios: comma-separated budgets to bench.
        sweep_sites: also bench every training-free method at each ``vit.<i>`` and report it at its best site
            (chosen on the validation split), as the learned scorer's sites were chosen for it.
        bench_batch_size: batch size of the bench (timings use one such batch).
        data_options: ``ClutteredDigitsDataModule`` arguments applied to every stage (e.g. a smaller canvas).
        backbone_options: ``BackboneClassifier`` arguments (width, depth, lr) of the ViT trained from scratch.
    """
    from tokensift.backbones.pretrain import REPORT, pretrain_backbone
    from tokensift.bench import run_bench
    from tokensift.bench.seeds import markdown_tables, summarize_seeds
    from tokensift.data import ClutteredDigitsDataModule
    from tokensift.io import write_text_atomic

    console = Console()
    out = Path(out)
    data_options = dict(data_options or {})
    if not Path(recipe).is_file():
        raise FileNotFoundError(f"recipe {recipe} not found; run from a tokensift checkout or pass --recipe.")

    backbone = out / "backbone"
    if (backbone / REPORT).is_file():
        console.print(f"[green]reusing backbone[/] {backbone}")
    else:
        console.rule("1/4 train the ViT backbone (once)")
        backbone_data = {"train_samples": backbone_train_samples, "batch_size": 128} | data_options
        data = ClutteredDigitsDataModule(**backbone_data)
        pretrain_backbone(backbone, data, max_epochs=backbone_epochs, **(backbone_options or {}))
    backbone_accuracy = json.loads((backbone / REPORT).read_text())["test_accuracy"]
    console.print(f"backbone unpruned test accuracy: {backbone_accuracy:.4f}")

    seeds = parse_seeds(scorer_seeds)
    artifacts = []
    for seed in seeds:
        artifact = out / "artifacts" / f"seed{seed}"
        fit_and_export(
            console,
            artifact,
            f"scorer artifact (seed {seed})",
            f"2/4 train the dynamicvit scorer on the frozen backbone (seed {seed})",
            recipe,
            f"--model.backbone={backbone}",
            out / "scorer" / f"seed{seed}",
            data_options,
            scorer_epochs,
            [f"--seed_everything={seed}"],
        )
        artifacts.append(artifact)
    console.rule("4/4 bench: learned vs training-free on the same frozen model")
    methods = [f"dynamicvit:{artifact}" for artifact in artifacts] + list(TRAINING_FREE)
    ratios = [float(r) for r in keep_ratios.split(",")]
    data = ClutteredDigitsDataModule(**(data_options | {"batch_size": bench_batch_size}))
    result = run_bench(
        model_dir=str(backbone),
        data=data,
        methods=methods,
        keep_ratios=ratios,
        out=out / "bench",
        sweep_sites=sweep_sites,
    )
    learned = [row["method"] for row in result["rows"] if row["kind"] == "learned"]
    summary = summarize_seeds(result, {"dynamicvit (learned)": list(dict.fromkeys(learned))})
    tables = markdown_tables(summary)
    write_text_atomic(out / "bench" / "summary.md", tables + "\n")
    write_text_atomic(out / "bench" / "summary.json", json.dumps(summary, indent=2) + "\n")
    console.rule(
        f"summary: dynamicvit over {len(seeds)} scorer seeds (mean ± sd), the rest with 95% bootstrap intervals"
    )
    console.print(tables, markup=False, highlight=False)
    return result | {"seed_summary": summary}
