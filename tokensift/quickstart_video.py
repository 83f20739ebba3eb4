"""``tokensift quickstart-video``: spatio-temporal token pruning on a video LLM end to end, idempotent.

video digit VQA → a tiny Qwen2-VL (or Molmo2) trained from scratch on it and frozen (``pretrain_mllm``), with its
single-frame baseline → ``stts`` trained on the frozen model once per scorer seed (the recipe
``configs/stts_video_vqa.yaml``: the answer loss through the scorer's attention bias, tokens removed inside the
vision tower) → exported → benched beside the training-free video and image pruners, random and the oracle at
the same budgets, STTS's seeds folded into one row (``bench/summary.md``), and per-frame overlays of the kept
tokens. Each stage reuses its output when it already exists, so a second run only re-benches.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE = CONFIGS / "stts_video_vqa.yaml"
# the video LLM of configs/pretrain_video_qwen2_vl.yaml: 84 px frames in 7 px patches, a 5-block tower (d 64) that is
# most of a forward's work, a 2-layer LM
MODEL = dict(
    vision_hidden_size=64, vision_layers=5, text_hidden_size=64, text_layers=2, num_attention_heads=4, lr=0.002,
    alignment_loss_weight=1.0,
)  # fmt: skip
VIDEO = dict(frame_size=84, patch_size=7, min_frames=8, max_frames=8, batch_size=16, val_samples=128)
# training-free methods benched beside STTS: the video ones and image ones that run before the LLM (the demo LM has
# 2 layers: no room for fastv's default llm.2)
VIDEO_METHODS = ("holitom", "ktv", "divprune", "visionzip", "random")
# what fixes the task and the vocabulary: the scorer and the bench must see the backbone's own
SCENE_OPTIONS = (
    "frame_size",
    "patch_size",
    "pool_size",
    "digit_scale",
    "min_frames",
    "max_frames",
    "min_digits",
    "max_digits",
    "num_clutter",
    "question_types",
    "num_channels",
    "family",
    "seed",
    "split_fractions",
)


def quickstart_video(
    out: Path = Path("runs/video"),
    recipe: Path = RECIPE,
    family: str = "qwen2_vl",
    train_samples: int = 12288,
    backbone_epochs: int = 1,
    single_frame_baseline: bool = True,
    keep_ratios: str = "1,0.5,0.25",
    test_samples: int = 512,
    bench_batch_size: int = 16,
    data_options: dict | None = None,
    model_options: dict | None = None,
    methods: str = ",".join(VIDEO_METHODS),
    scorer_seeds: str = "0,1,2",
    scorer_train_samples: int | None = 4096,
    stts_site: str = "vit.1",
) -> dict:
    """Train a tiny video LLM on video digit VQA, fit STTS on it, and bench it beside the training-free methods.

    Args:
        out: working directory (the model in ``<family>/``, ``artifacts/stts/seed<k>/``, ``bench/``).
        recipe: STTS's LightningCLI recipe.
        family: ``molmo2`` or ``qwen2_vl``.
        train_samples: training questions of the video LLM.
        backbone_epochs: passes over them.
        single_frame_baseline: also train the same recipe on the last frame alone (``<family>_single_frame/``),
            the baseline a video model must beat.
        keep_ratios: comma-separated budgets to bench (fractions of each video's visual tokens).
        test_samples: test questions of the evaluations and of the bench.
        bench_batch_size: batch size of the bench (timings use one such batch).
        data_options: further ``VideoDigitVQADataModule`` arguments for every stage.
        model_options: further ``pretrain_mllm`` arguments (sizes, ``lr``).
        methods: comma-separated training-free methods benched beside STTS.
        scorer_seeds: comma-separated seeds of the STTS runs (its row: mean ± sd over them).
        scorer_train_samples: override the recipe's ``data.init_args.train_samples`` (``None`` keeps its 8,192).
        stts_site: STTS's site (the recipe's ``vit.3``, the reference's, is the 5-block tower's last: its removal
            would come after the tower; ``vit.1`` scores after block 1, biases block 2 and removes tokens from blocks
            3-4 and the LLM).
    """
    from tokensift.backbones.pretrain_mllm import REPORT, pretrain_mllm
    from tokensift.bench import run_bench
    from tokensift.bench.seeds import markdown_tables, summarize_seeds
    from tokensift.data import VideoDigitVQADataModule
    from tokensift.io import write_text_atomic
    from tokensift.quickstart import fit_and_export, parse_seeds

    console = Console()
    out = Path(out)
    if not Path(recipe).is_file():
        raise FileNotFoundError(f"recipe {recipe} not found; run from a tokensift checkout or pass --recipe.")
    options = {"family": family, **VIDEO, **(data_options or {})}

    def pretrain(folder: Path, title: str, **extra) -> dict:
        if (folder / REPORT).is_file():
            console.print(f"[green]reusing {folder.name}[/] {folder}")
        else:
            console.rule(title)
            data = VideoDigitVQADataModule(
                **{"train_samples": train_samples, "test_samples": test_samples, **options, **extra}
            )
            pretrain_mllm(folder, data, max_epochs=backbone_epochs, family=family, **(MODEL | (model_options or {})))
        return json.loads((folder / REPORT).read_text())

    backbone = out / family
    report = pretrain(backbone, f"1/4 train the {family} on video digit VQA (once)")
    baselines = {"text_only": report["text_only_baseline"]}
    if single_frame_baseline:
        single = pretrain(
            out / f"{family}_single_frame", "1/4 the single-frame baseline: same recipe, last frame only",
            single_frame=True,
        )  # fmt: skip
        baselines["single_frame"] = single["test_accuracy"]
    console.print(
        f"{family} unpruned test accuracy {report['test_accuracy']:.4f}; baselines: "
        + ", ".join(f"{name} {value:.4f}" for name, value in baselines.items())
    )
    scene = {key: report["data"][key] for key in SCENE_OPTIONS if key in report["data"]}

    seeds = parse_seeds(scorer_seeds)
    extra = [] if scorer_train_samples is None else [f"--data.init_args.train_samples={scorer_train_samples}"]
    extra.append(f"--model.init_args.method_options={json.dumps({'sites': [stts_site]})}")
    artifacts = []
    for seed in seeds:
        artifact = out / "artifacts" / "stts" / f"seed{seed}"
        fit_and_export(
            console,
            artifact,
            f"stts artifact (seed {seed})",
            f"2/4 train stts on the frozen {family} by its answer loss (seed {seed})",
            recipe,
            f"--model.init_args.backbone={backbone}",
            out / "scorers" / "stts" / f"seed{seed}",
            scene,
            None,
            [*extra, f"--seed_everything={seed}", f"--model.init_args.seed={seed}"],
        )
        artifacts.append(artifact)

    console.rule("4/4 bench: STTS beside the training-free methods, random and the oracle")
    names = [name.strip() for name in methods.split(",") if name.strip()]
    data = VideoDigitVQADataModule(**(scene | {"test_samples": test_samples, "batch_size": bench_batch_size}))
    result = run_bench(
        model_dir=str(backbone),
        data=data,
        methods=[*names, *(f"stts:{path}" for path in artifacts)],
        keep_ratios=keep_ratios,
        out=out / "bench",
    )
    labels = [row["method"] for row in result["rows"] if row["method"].split(":")[0] == "stts"]
    summary = summarize_seeds(result, {"stts (learned)": list(dict.fromkeys(labels))})
    summary["baselines"] = baselines | {"unpruned": report["test_accuracy"]}
    tables = markdown_tables(summary)
    baseline_line = "Baselines (test accuracy): " + ", ".join(
        f"{name} {value:.4f}" for name, value in summary["baselines"].items()
    )
    write_text_atomic(out / "bench" / "summary.md", f"{baseline_line}\n\n{tables}\n")
    write_text_atomic(out / "bench" / "summary.json", json.dumps(summary, indent=2) + "\n")
    console.rule(f"summary: stts over {len(seeds)} seeds (mean ± sd), the rest with 95% bootstrap intervals")
    console.print(baseline_line, markup=False, highlight=False)
    console.print(tables, markup=False, highlight=False)
    return result | {"seed_summary": summary}
