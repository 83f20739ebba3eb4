"""``tokensift bench``: learned and training-free token methods side by side, against the unpruned model.

``run_bench`` is the Python entry point; ``bench`` is its typed command-line face (strings for the lists),
meant for ``jsonargparse.auto_cli``::

    tokensift bench --model runs/backbone --data configs/data.yaml \\
        --methods dynamicvit:runs/x/artifact,random,l2norm,tome,divprune,cls_attention \\
        --keep_ratios 1,0.5,0.25,0.1 --out runs/bench

A LLaVA / Qwen2-VL folder as ``--model`` benches multimodal LLM methods on a VQA data module
(:mod:`tokensift.bench.mllm`)::

    tokensift bench --model runs/vqa/llava --data configs/dyvte_digit_vqa.yaml \
        --methods fastv,pyramiddrop,visionzip,dart,d2pruner,divprune,random,dyvte:runs/vqa/dyvte_artifact \
        --keep-ratios 1,0.5,0.25,0.1 --out runs/vqa/bench

Every accuracy carries a 95% percentile-bootstrap interval; ``--flops_ratios`` gives each method's accuracy at
equal FLOPs (:mod:`tokensift.bench.stats`); ``--sweep_sites true`` runs the training-free methods at every
``vit.<i>`` site and picks each one's site on the validation split (:mod:`tokensift.bench.sweep`).
"""

from __future__ import annotations

from tokensift.bench.oracle import OracleMethod
from tokensift.bench.results import COMPARISON_FIELDS, MATCHED_FIELDS, SWEEP_FIELDS
from tokensift.bench.runner import FIELDS, parse_keep_ratios, parse_methods, resolve_datamodule, run_bench
from tokensift.bench.stats import (
    Bootstrap,
    CurvePoint,
    accuracy_at_flops,
    accuracy_interval,
    interpolate_at,
    paired_difference,
)
from tokensift.flops import backbone_flops, pruned_flops, scorer_flops, tokens_per_layer


def bench(
    model: str,
    data: str,
    methods: str,
    keep_ratios: str = "1,0.5,0.25,0.1",
    out: str = "runs/bench",
    batch_size: int | None = 64,
    timing_batches: int = 1,
    repeats: int = 5,
    warmup: int = 2,
    overlay_ratio: float = 0.25,
    max_batches: int | None = None,
    device: str = "cpu",
    num_threads: int | None = None,
    thresholds: str | None = None,
    flops_ratios: str | None = "0.4,0.5,0.6,0.7,0.8",
    bootstrap_resamples: int = 1000,
    bootstrap_seed: int = 0,
    sweep_sites: bool | str = False,
    skip_layers: str | None = None,
) -> dict:
    """Benchmark token methods × keep ratios on a data module's test split.

    The model is an image classifier (ViT / CLIP / SigLIP) or a LLaVA / Qwen2-VL multimodal LLM (then the data is
    any data module whose test batches follow the VQA batch contract, tokensift.data.contract, such as
    tokensift.data.DigitVQADataModule or tokensift.data.ShapeVQADataModule, and accuracy is answer accuracy).

    Writes results.json, results.csv, matched_flops.csv, pareto.png and overlays.png (and site_sweep.csv with
    --sweep_sites) to ``out`` and prints the tables. Every accuracy comes with a 95% bootstrap interval
    (accuracy_low, accuracy_high); learned methods are compared with the best training-free one at equal keep
    ratio and at equal FLOPs ratio by a paired bootstrap (``comparisons`` in results.json).

    Args:
        model: a save_pretrained directory of the frozen classifier (the backbone the scorers were trained on).
        data: a YAML file with class_path/init_args of a LightningDataModule (or a `tokensift fit` config with a
            data: section), that mapping as JSON text, or a class path built with its defaults, e.g.
            tokensift.data.ClutteredDigitsDataModule.
        methods: comma-separated; training-free names (random, cls_attention, tome, divprune, l2norm; on MLLMs
            fastv, pyramiddrop, visionzip, dart, d2pruner, divprune, random) and NAME:ARTIFACT_DIR for exported
            learned scorers, e.g. dynamicvit:runs/x/artifact or dyvte:runs/x/artifact. The unpruned model
            is always included, and the oracle whenever the data carries oracle masks.
        keep_ratios: comma-separated fractions of patch tokens kept after the last site, each in (0, 1].
        out: output directory.
        batch_size: test batch size (overrides the data config; null keeps the data module's).
        timing_batches: how many of the first test batches form the fixed timing set.
        repeats: timed repeats per row (median reported).
        warmup: untimed warm-up repeats before timing.
        overlay_ratio: keep ratio shown in overlays.png.
        max_batches: evaluate only the first this-many test batches.
        device: cpu, cuda or cuda:N.
        num_threads: torch intra-op threads for the run (default: leave torch's setting).
        thresholds: MLLM exit methods (dyvte) only: comma-separated exit thresholds in [0, 1], one row each
            (1 never exits); default: the keep ratios read as thresholds.
        flops_ratios: comma-separated target FLOPs ratios: each method's accuracy there, linear between the two
            budgets that bracket it (none outside its range), in matched_flops.csv and on the Pareto plot;
            null: no equal-cost table.
        bootstrap_resamples: resamples of the test samples behind every 95% interval (percentile bootstrap).
        bootstrap_seed: seed of those resamples.
        sweep_sites: image classifiers: true runs each training-free method at every vit.<i> site (or a
            comma-separated list, e.g. vit.2,vit.3), picks per keep ratio the site with the best accuracy on the
            data's validation split and adds a <method>@best_site row; per-site accuracies in site_sweep.csv.
        skip_layers: layer-skip methods (das:ARTIFACT_DIR) only: comma-separated skip counts, one row each (e.g.
            0,1,2; 0 runs every block); default: 0 .. the top of each artifact's trained_skip_range.
    """
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    return run_bench(
        model_dir=model,
        data=data,
        methods=method_list,
        keep_ratios=parse_keep_ratios(keep_ratios),
        out=out,
        batch_size=batch_size,
        timing_batches=timing_batches,
        repeats=repeats,
        warmup=warmup,
        overlay_ratio=overlay_ratio,
        max_batches=max_batches,
        device=device,
        num_threads=num_threads,
        thresholds=thresholds,
        flops_ratios=flops_ratios,
        bootstrap_resamples=bootstrap_resamples,
        bootstrap_seed=bootstrap_seed,
        sweep_sites=sweep_sites,
        skip_layers=skip_layers,
    )


__all__ = [
    "COMPARISON_FIELDS",
    "FIELDS",
    "MATCHED_FIELDS",
    "SWEEP_FIELDS",
    "Bootstrap",
    "CurvePoint",
    "OracleMethod",
    "accuracy_at_flops",
    "accuracy_interval",
    "backbone_flops",
    "bench",
    "interpolate_at",
    "paired_difference",
    "parse_keep_ratios",
    "parse_methods",
    "pruned_flops",
    "resolve_datamodule",
    "run_bench",
    "scorer_flops",
    "tokens_per_layer",
]
