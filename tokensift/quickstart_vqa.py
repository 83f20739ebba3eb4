"""``tokensift quickstart-vqa``: token pruning on a multimodal LLM end to end, idempotent.

digit VQA → a tiny LLaVA trained from scratch and frozen (``pretrain_mllm``) → DyVTE exit routers fitted on
it (the recipe ``configs/dyvte_digit_vqa.yaml``) → exported → benched with every MLLM pruner, the routers
and the oracle. Each stage reuses its output when it already exists, so a second run only re-benches.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "dyvte_digit_vqa.yaml"
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
    """
    from tokensift.backbones.pretrain_mllm import REPORT, pretrain_mllm
    from tokensift.bench import run_bench
    from tokensift.data import DigitVQADataModule
    from tokensift.quickstart import fit_and_export

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

    console.rule("4/4 bench: every MLLM pruner, the exit routers and the oracle on the same frozen model")
    data = DigitVQADataModule(**(scene | {"test_samples": test_samples, "batch_size": bench_batch_size}))
    return run_bench(
        model_dir=str(backbone),
        data=data,
        methods=[*MLLM_METHODS, f"dyvte:{artifact}"],
        keep_ratios=keep_ratios,
        thresholds=thresholds,
        out=out / "bench",
    )
