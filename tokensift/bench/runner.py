"""``run_bench``: every method × keep ratio on a data module's test split, in one process.

It validates the options and hands an image classifier to :func:`tokensift.bench.image.run_image_bench` and a
LLaVA / Qwen2-VL folder to :func:`tokensift.bench.mllm.run_mllm_bench`. The parts both share live in their own
modules: method specs (:mod:`~tokensift.bench.specs`), data (:mod:`~tokensift.bench.data`), run options
(:mod:`~tokensift.bench.settings`), timing and memory (:mod:`~tokensift.bench.measure`), intervals and accuracy
at equal FLOPs (:mod:`~tokensift.bench.stats`), rows, files and tables (:mod:`~tokensift.bench.results`), the
site sweep (:mod:`~tokensift.bench.sweep`). Their public names stay importable from here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokensift.bench.data import oracle_on_model_grid, resolve_datamodule
from tokensift.bench.image import run_image_bench
from tokensift.bench.measure import MEMORY_MEASURE, environment_metadata, measure_speed_and_memory
from tokensift.bench.mllm import run_mllm_bench
from tokensift.bench.results import FIELDS, budget_label, finalize_rows, print_table, write_results
from tokensift.bench.seeds import fold_seeds
from tokensift.bench.settings import BenchSettings, bench_settings, torch_threads
from tokensift.bench.specs import ORACLE, UNPRUNED, MethodSpec, parse_keep_ratios, parse_methods, parse_skip_layers
from tokensift.bench.stats import (
    DEFAULT_FLOPS_RATIOS,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    check_bootstrap,
    parse_flops_ratios,
)
from tokensift.bench.sweep import parse_sweep_sites


def is_multimodal_dir(model_path: Path) -> bool:
    """Whether a ``save_pretrained`` folder holds a multimodal LLM tokensift prunes (LLaVA, Qwen2-VL)."""
    from tokensift.backbones.mllm import FAMILIES

    config = model_path / "config.json"
    if not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (json.JSONDecodeError, AttributeError):
        return False
    return bool(architectures) and architectures[0] in FAMILIES


def run_bench(
    model_dir: str | os.PathLike,
    data: Any,
    methods: Sequence[str] | str,
    keep_ratios: Sequence[float] | str = (1.0, 0.5, 0.25, 0.1),
    out: str | os.PathLike = "runs/bench",
    batch_size: int | None = None,
    timing_batches: int = 1,
    repeats: int = 5,
    warmup: int = 2,
    overlay_ratio: float = 0.25,
    max_batches: int | None = None,
    device: str = "cpu",
    num_overlay_images: int = 4,
    num_threads: int | None = None,
    quiet: bool = False,
    thresholds: Sequence[float] | str | None = None,
    flops_ratios: Sequence[float] | str | None = DEFAULT_FLOPS_RATIOS,
    bootstrap_resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = DEFAULT_SEED,
    sweep_sites: bool | str | Sequence[str] | None = False,
    skip_layers: Sequence[int] | str | None = None,
) -> dict:
    """Benchmark ``methods`` × ``keep_ratios`` on ``data``'s test split against the unpruned model.

    A multimodal LLM (a LLaVA or Qwen2-VL folder) is benchmarked on a VQA data module by
    :func:`tokensift.bench.mllm.run_mllm_bench` with the same rows, files and measurements; ``thresholds``
    (the budgets of exit methods such as ``dyvte``) applies there only.

    Args:
        model_dir: a ``save_pretrained`` directory of a supported classifier (ViT / CLIP / SigLIP), or of a
            LLaVA / Qwen2-VL model.
        data: a LightningDataModule, a ``{class_path, init_args}`` mapping, a YAML file holding one (or a
            ``tokensift fit`` config with a ``data:`` section) or a class path built with its defaults.
        methods: registered training-free names (``random``, ``cls_attention``, ``tome``, ``divprune``,
            ``l2norm``) and ``NAME:ARTIFACT_DIR`` for exported learned scorers (e.g. ``dynamicvit:runs/x/art``).
            ``unpruned`` is always included, ``oracle`` whenever the test batches carry an ``oracle_mask``.
        keep_ratios: fractions of patch tokens kept after the last site, each in (0, 1].
        out: the output directory (``results.json``, ``results.csv``, ``matched_flops.csv``, ``pareto.png``,
            ``overlays.png``; ``site_sweep.csv`` with a sweep).
        batch_size: overrides the data module's batch size (``None`` keeps it).
        timing_batches: the first this-many test batches are the fixed timing set; one timed repeat is a
            forward pass over all of them.
        repeats: timed repeats per row (the median is used); ``warmup``: untimed repeats before them.
        overlay_ratio: the keep ratio shown in ``overlays.png``.
        max_batches: evaluate only the first this-many test batches (``None``: all; the validation split of a
            site sweep too).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        num_overlay_images: rows of ``overlays.png``.
        num_threads: ``torch.set_num_threads`` for the run (restored afterwards); ``None`` leaves it.
        quiet: do not print the tables.
        flops_ratios: target FLOPs ratios of the equal-cost table (``matched_flops``): each method's accuracy
            there, read linearly off its accuracy-vs-FLOPs-ratio curve; ``None`` or empty: no table.
        bootstrap_resamples / bootstrap_seed: the percentile bootstrap behind every 95% interval
            (:mod:`tokensift.bench.stats`).
        sweep_sites: image classifiers only: ``True`` runs each training-free method at every ``vit.<i>``
            site (or a list / comma-separated string of sites), picks per keep ratio the site with the best
            validation-split accuracy and adds a fully measured ``<method>@best_site`` row; the per-site
            accuracies (validation and test) are in ``site_sweep``.
        skip_layers: layer-skip methods (``das:ARTIFACT_DIR``) only: the skip counts, one row each (0 runs every
            block); ``None``: 0 .. the top of each artifact's ``trained_skip_range``.

    Returns ``{"rows": [...], "metadata": {...}, "matched_flops": [...], "comparisons": [...], "files": {...}}``
    (and ``"site_sweep"`` with a sweep); the same is in ``results.json``. A learned method given with several
    artifacts (``NAME:DIR`` each, one per training seed) is also folded into one row per budget, mean ± sd over
    them (``"seeds"``; ``summary.md`` / ``summary.json``, printed unless ``quiet``).
    """
    # -- validate everything before any expensive work -----------------------------------------------
    model_path = Path(model_dir)
    if not model_path.is_dir():
        raise FileNotFoundError(
            f"model: {str(model_path)!r} is not a directory; give a save_pretrained folder (config.json + weights)."
        )
    targets = parse_flops_ratios(flops_ratios)
    check_bootstrap(bootstrap_resamples, bootstrap_seed)
    sweep = parse_sweep_sites(sweep_sites)
    if is_multimodal_dir(model_path):
        if sweep is not None:
            raise ValueError(
                "sweep_sites: the site sweep covers image classifiers' vit.<i> sites; on a multimodal LLM pick "
                "sites per method instead (not swept yet), and leave sweep_sites unset."
            )
        result = run_mllm_bench(
            model_dir=model_path,
            data=data,
            methods=methods,
            keep_ratios=keep_ratios,
            thresholds=thresholds,
            out=out,
            batch_size=batch_size,
            timing_batches=timing_batches,
            repeats=repeats,
            warmup=warmup,
            overlay_ratio=overlay_ratio,
            max_batches=max_batches,
            device=device,
            num_overlay_images=num_overlay_images,
            num_threads=num_threads,
            quiet=quiet,
            flops_ratios=targets,
            bootstrap_resamples=bootstrap_resamples,
            bootstrap_seed=bootstrap_seed,
            skip_layers=skip_layers,
        )
        return fold_seeds(result, Path(out), quiet)
    if thresholds is not None:
        raise ValueError(
            "thresholds: only exit methods on multimodal LLMs (dyvte) take decision thresholds; "
            f"{model_path} is not a LLaVA / Qwen2-VL folder, so leave thresholds unset."
        )
    specs, oracle_requested = parse_methods(methods)
    counts = parse_skip_layers(skip_layers, specs)
    ratios = parse_keep_ratios(keep_ratios)
    overlay_ratio = parse_keep_ratios([overlay_ratio], field="overlay_ratio")[0]
    settings = bench_settings(
        data, batch_size, out, timing_batches, repeats, warmup, num_overlay_images, max_batches, device
    )
    result = run_image_bench(
        model_path,
        specs,
        oracle_requested,
        ratios,
        overlay_ratio,
        settings,
        num_threads,
        quiet,
        targets,
        bootstrap_resamples,
        bootstrap_seed,
        sweep,
        skip_layers=counts,
    )
    return fold_seeds(result, Path(out), quiet)


__all__ = [
    "FIELDS",
    "MEMORY_MEASURE",
    "ORACLE",
    "UNPRUNED",
    "BenchSettings",
    "MethodSpec",
    "bench_settings",
    "budget_label",
    "environment_metadata",
    "finalize_rows",
    "is_multimodal_dir",
    "measure_speed_and_memory",
    "oracle_on_model_grid",
    "parse_keep_ratios",
    "parse_methods",
    "print_table",
    "resolve_datamodule",
    "run_bench",
    "torch_threads",
    "write_results",
]
