"""``tokensift quickstart-vqa``: token pruning on a multimodal LLM end to end, idempotent.

digit VQA → a tiny LLaVA trained from scratch and frozen (``pretrain_mllm``) → DyVTE exit routers fitted on
it (the recipe ``configs/dyvte_digit_vqa.yaml``) and the learned visual-token scorers trained on it by its answer
loss (``configs/<method>_digit_vqa.yaml``: ``question_selector`` once per scorer seed, ``dynamic_llava`` and
``atp`` with the first seed) → exported → benched with every MLLM pruner, the routers and the oracle, the
selector's seeds folded into one row (``bench/summary.md``). Each stage reuses its output when it already
exists, so a second run only re-benches.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE = CONFIGS / "dyvte_digit_vqa.yaml"
# learned visual-token scorers trained by the demo; the first is trained once per scorer seed
LEARNED = ("question_selector", "dynamic_llava", "atp")
MLLM_METHODS = ("fastv", "pyramiddrop", "visionzip", "dart", "d2pruner", "divprune", "random")
# what fixes the task and the vocabulary: the routers and the bench must see the backbone's own
SCENE_OPTIONS = (
    "canvas_size",
    "patch_size",
    "digit_scale",
    "min_digits",
    "max_digits",
    "question_types",
    "num_channels",
    "num_image_tokens",
    "seed",
    "split_fractions",
    "align_digits",
)


def quickstart_vqa(
    out: Path = Path("runs/vqa"),
    recipe: Path = RECIPE,
    family: str = "llava",
    train_samples: int = 65536,
    backbone_epochs: int = 1,
    text_layers: int = 3,
    router_epochs: int | None = 1,
    router_train_samples: int | None = 2048,
    keep_ratios: str = "1,0.5,0.25,0.1",
    thresholds: str | None = None,
    test_samples: int = 1024,
    bench_batch_size: int = 64,
    data_options: dict | None = None,
    model_options: dict | None = None,
    learned: str = ",".join(LEARNED),
    scorer_seeds: str = "0,1,2",
    scorer_train_samples: int | None = None,
) -> dict:
    """Train a tiny MLLM on digit VQA, fit DyVTE routers on it, and bench every MLLM method.

    Args:
        out: working directory (the model in ``<family>/``, ``routers/``, ``dyvte_artifact/``, ``bench/``).
        recipe: the routers' LightningCLI recipe.
        family: ``llava`` or ``qwen2_vl``.
        train_samples: training questions of the MLLM (one epoch of 65,536 at batch 32, ``pretrain_mllm``'s
            recipe on one thread: about 7 minutes on a quiet core).
        backbone_epochs: passes over them.
        text_layers: decoder layers of the LM (routers sit before layers 1 .. text_layers-1).
        router_epochs: override the recipe's ``trainer.max_epochs`` (``None`` keeps it; 1 keeps the demo short).
        router_train_samples: override the recipe's ``data.init_args.train_samples`` (``None`` keeps its 8,192;
            2,048 at batch 64 is 32 router steps, a few minutes on 2 busy cores).
        keep_ratios: comma-separated budgets to bench.
        thresholds: the routers' exit thresholds to bench (default: the keep ratios read as thresholds).
        test_samples: test questions of the MLLM's evaluation and of the bench.
        bench_batch_size: batch size of the bench (timings use one such batch).
        data_options: further ``DigitVQADataModule`` arguments for every stage (e.g. a smaller canvas).
        model_options: further ``pretrain_mllm`` arguments (sizes, ``lr``).
        learned: comma-separated learned methods to train (each by ``configs/<method>_digit_vqa.yaml``) and bench;
            the first is trained once per seed of ``scorer_seeds``, the others with its first seed; "" trains none.
        scorer_seeds: comma-separated seeds of the first learned method's runs (its row: mean ± sd over them).
        scorer_train_samples: override the recipes' ``data.init_args.train_samples`` (``None`` keeps theirs:
            ``question_selector`` 32,768 = 512 steps at batch 64, about 4 minutes on a quiet core; ``dynamic_llava``
            and ``atp`` 16,384). At 256 steps the selector's annealed relaxation had not converged (0.36 at keep
            0.25, below random, on every seed).
    """
    from tokensift.backbones.pretrain_mllm import REPORT, pretrain_mllm
    from tokensift.bench import run_bench
    from tokensift.bench.seeds import markdown_tables, summarize_seeds
    from tokensift.data import DigitVQADataModule
    from tokensift.io import write_text_atomic
    from tokensift.quickstart import fit_and_export, parse_seeds

    console = Console()
    out = Path(out)
    if not Path(recipe).is_file():
        raise FileNotFoundError(f"recipe {recipe} not found; run from a tokensift checkout or pass --recipe.")

    backbone = out / family
    if (backbone / REPORT).is_file():
        console.print(f"[green]reusing {family}[/] {backbone}")
    else:
        console.rule(f"1/4 train the {family} on digit VQA (once)")
        options = {"train_samples": train_samples, "test_samples": test_samples, **(data_options or {})}
        pretrain_mllm(
            backbone,
            DigitVQADataModule(**options),
            max_epochs=backbone_epochs,
            family=family,
            **({"text_layers": text_layers} | (model_options or {})),
        )
    report = json.loads((backbone / REPORT).read_text())
    console.print(
        f"{family} unpruned test accuracy: {report['test_accuracy']:.4f} "
        f"(text-only baseline {report['text_only_baseline']:.4f})"
    )
    scene = {key: report["data"][key] for key in SCENE_OPTIONS if key in report["data"]}

    artifact = out / "dyvte_artifact"
    fit_and_export(
        console,
        artifact,
        "router artifact",
        "2/4 train the DyVTE exit routers on the frozen model",
        recipe,
        f"--model.init_args.backbone={backbone}",
        out / "routers",
        scene,
        router_epochs,
        [] if router_train_samples is None else [f"--data.init_args.train_samples={router_train_samples}"],
    )

    names = [name for name in learned.split(",") if name.strip()]
    unknown = sorted(set(names) - set(LEARNED))
    if unknown:
        raise ValueError(f"learned: {unknown} have no demo recipe; choose among {list(LEARNED)}.")
    seeds = parse_seeds(scorer_seeds)
    extra = [] if scorer_train_samples is None else [f"--data.init_args.train_samples={scorer_train_samples}"]
    scorers: dict[str, list[Path]] = {}
    for position, name in enumerate(names):
        for seed in seeds if position == 0 else seeds[:1]:
            scorer = out / "artifacts" / name / f"seed{seed}"
            fit_and_export(
                console,
                scorer,
                f"{name} artifact (seed {seed})",
                f"3/4 train {name} on the frozen model by its answer loss (seed {seed})",
                CONFIGS / f"{name}_digit_vqa.yaml",
                f"--model.init_args.backbone={backbone}",
                out / "scorers" / name / f"seed{seed}",
                scene,
                None,
                [*extra, f"--seed_everything={seed}", f"--model.init_args.seed={seed}"],
            )
            scorers.setdefault(name, []).append(scorer)

    console.rule("4/4 bench: every MLLM pruner, the learned scorers, the exit routers and the oracle")
    data = DigitVQADataModule(**(scene | {"test_samples": test_samples, "batch_size": bench_batch_size}))
    learned_specs = [f"{name}:{path}" for name, paths in scorers.items() for path in paths]
    result = run_bench(
        model_dir=str(backbone),
        data=data,
        methods=[*MLLM_METHODS, *learned_specs, f"dyvte:{artifact}"],
        keep_ratios=keep_ratios,
        thresholds=thresholds,
        out=out / "bench",
    )
    if not scorers:
        return result
    groups = {}
    for name in scorers:
        labels = [row["method"] for row in result["rows"] if row["method"].split(":")[0] == name]
        groups[f"{name} (learned)"] = list(dict.fromkeys(labels))
    summary = summarize_seeds(result, groups)
    tables = markdown_tables(summary)
    write_text_atomic(out / "bench" / "summary.md", tables + "\n")
    write_text_atomic(out / "bench" / "summary.json", json.dumps(summary, indent=2) + "\n")
    console.rule(f"summary: {names[0]} over {len(seeds)} seeds (mean ± sd), the rest with 95% bootstrap intervals")
    console.print(tables, markup=False, highlight=False)
    return result | {"seed_summary": summary}
