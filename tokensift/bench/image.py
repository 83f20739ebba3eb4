"""The image-classifier bench (ViT / CLIP / SigLIP): every method × keep ratio on a data module's test split.

Per row: accuracy with its bootstrap interval, retention (accuracy / unpruned accuracy), oracle recall (fraction
of the target's patches whose original index survives the last site), analytic FLOPs ratio
(``tokensift.flops``), wall-clock speedup and peak-memory ratio (:mod:`tokensift.bench.measure`), both
measured against the unpruned model in the same run. With ``sweep_sites`` the training-free methods also run at
every swept site (:mod:`tokensift.bench.sweep`), scored on the validation and the test split, and once more,
fully measured, at the site validation picked.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import tokensift as ts
from tokensift.backbones import adapt, load_backbone
from tokensift.backbones.vision import VisionAdapter
from tokensift.bench.data import as_batch, oracle_on_model_grid
from tokensift.bench.measure import environment_metadata, measure_speed_and_memory
from tokensift.bench.oracle import OracleMethod
from tokensift.bench.results import (
    MATCHED_FLOPS_NOTE,
    RowProgress,
    finalize_rows,
    print_report,
    summarize,
    write_results,
)
from tokensift.bench.settings import BenchSettings, torch_threads
from tokensift.bench.specs import ORACLE, UNPRUNED, MethodSpec, bench_skip_spec, rows_of_spec
from tokensift.bench.stats import Bootstrap
from tokensift.bench.sweep import best_site_label, choose_best_sites, resolve_sweep_sites
from tokensift.export.artifact import Artifact, FingerprintMismatch
from tokensift.flops import pruned_flops, vit_skip_flops
from tokensift.reduce import PruningHandle
from tokensift.scorers.base import is_skip_method
from tokensift.skip import LayerSkipHandle, skipped_site_labels


def _forward(model: nn.Module, batch: dict[str, Tensor], method: nn.Module | None, handle=None) -> Tensor:
    if isinstance(method, OracleMethod):
        method.oracle_mask = batch.get("oracle_mask")
    # random draws (random, oracle) per test sample, any batch size; a layer-skip handle draws nothing
    if hasattr(handle, "set_samples") and "index" in batch:
        handle.set_samples(batch["index"])
    return model(pixel_values=batch["pixel_values"]).logits


def kept_patches(handle: PruningHandle | None, batch_size: int, num_patches: int, num_prefix: int, device) -> Tensor:
    """``[B, P]`` bool: patches whose original index survived the last site (ToMe: merge anchors)."""
    kept = getattr(handle, "kept_orig_index", None)  # None: unpruned, or a layer-skip handle (every token stays)
    if kept is None:
        return torch.ones(batch_size, num_patches, dtype=torch.bool, device=device)
    patch = kept.to(device) - num_prefix
    patch = torch.where(patch >= 0, patch, torch.full_like(patch, num_patches))  # prefix tokens -> spare column
    mask = torch.zeros(batch_size, num_patches + 1, dtype=torch.bool, device=device)
    mask.scatter_(1, patch, True)
    return mask[:, :num_patches]


@dataclass
class _Eval:
    accuracy: float
    oracle_recall: float | None
    num_samples: int
    correct: np.ndarray  # [samples] 1.0 where the argmax is the label, in the split's order


def _evaluate(model, batches, method, handle, num_patches, num_prefix, device) -> _Eval:
    """Top-1 accuracy (micro: the fraction of samples whose argmax is the label) and oracle recall."""
    hits = total = 0
    correct = []
    with torch.no_grad():
        for batch in batches:
            logits = _forward(model, batch, method, handle)
            correct.append((logits.argmax(-1) == batch["labels"]).cpu())
            oracle = batch.get("oracle_mask")
            if oracle is not None:
                oracle = oracle.bool()
                kept = kept_patches(handle, oracle.shape[0], num_patches, num_prefix, device)
                hits += int((kept & oracle).sum())
                total += int(oracle.sum())
    per_sample = torch.cat(correct).double().numpy()
    recall = hits / total if total else None
    return _Eval(float(per_sample.mean()), recall, int(per_sample.size), per_sample)


def _apply(
    model: nn.Module, spec: MethodSpec, keep_ratio: float, sites: list[str] | None = None
) -> tuple[PruningHandle, nn.Module]:
    built = spec.build()
    try:
        handle = ts.apply(model, built, keep_ratio=keep_ratio, sites=sites)
    except FingerprintMismatch as error:
        raise ValueError(
            f"methods: the artifact in {spec.entry!r} does not match the model: {error} "
            "Benchmark it on the backbone it was trained on."
        ) from None
    method = built.method if isinstance(built, Artifact) else built
    return handle, method


def _check_image_size(adapter: VisionAdapter, pixel_values: Tensor, model_path: Path) -> None:
    try:
        adapter.check_pixel_values(pixel_values)
    except ValueError as error:
        height, width = pixel_values.shape[-2:]
        size = adapter.config.image_size
        raise ValueError(
            f"data: test images are {height}x{width} pixels, {pixel_values.shape[1]} channels, which the model in "
            f"{model_path} does not take ({error}); set the data module's image size and channels (e.g. "
            f"init_args.canvas_size: {size})."
        ) from None


def _load_split(loader, split: str, adapter, model_path: Path, device, max_batches: int | None):
    """The split's batches on ``device`` (at most ``max_batches``), oracle masks on the model's patch grid."""
    iterator = iter(loader)
    first = next(iterator, None)
    if first is None:
        raise ValueError(f"data: the {split} dataloader is empty; give the data module some {split} samples.")
    first = as_batch(first, device)
    _check_image_size(adapter, first["pixel_values"], model_path)  # before generating the whole split
    rest = islice(iterator, None if max_batches is None else max_batches - 1)
    batches = [first, *(as_batch(b, device) for b in rest)]
    grid = adapter.grid_for(first["pixel_values"])
    for batch in batches:
        if "oracle_mask" in batch:
            batch["oracle_mask"] = oracle_on_model_grid(batch["oracle_mask"], first["pixel_values"].shape, grid)
    return batches, grid


def _val_batches(datamodule, adapter, model_path: Path, device, max_batches: int | None):
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    datamodule.setup("validate")
    try:
        loader = datamodule.val_dataloader()
    except (AttributeError, RuntimeError, NotImplementedError, MisconfigurationException) as error:
        raise ValueError(
            f"sweep_sites: {type(datamodule).__name__} gives no validation split ({error}); the sweep picks each "
            "method's site on a validation split, never on the test split, so give a data module with one."
        ) from None
    batches, _ = _load_split(loader, "validation", adapter, model_path, device, max_batches)
    return batches


@dataclass
class _Context:
    model: nn.Module
    adapter: VisionAdapter
    batches: list[dict[str, Tensor]]
    timing: list[dict[str, Tensor]]
    num_patches: int
    num_prefix: int
    device: torch.device
    repeats: int
    warmup: int
    progress: RowProgress

    def evaluate(self, handle, method, batches=None) -> _Eval:
        batches = self.batches if batches is None else batches
        return _evaluate(self.model, batches, method, handle, self.num_patches, self.num_prefix, self.device)

    def flops(self, handle) -> dict:
        if isinstance(handle, LayerSkipHandle):
            return vit_skip_flops(self.adapter, handle, num_patches=self.num_patches)
        return pruned_flops(self.adapter, handle, num_patches=self.num_patches)

    def measure(self, label: str, kind: str, ratio: float | None, handle: PruningHandle | None, method) -> dict:
        result = self.evaluate(handle, method)
        flops = self.flops(handle)
        skips = isinstance(handle, LayerSkipHandle)
        counts = handle.site_counts(self.num_patches) if handle is not None and not skips else {}
        times, speedups, memory = measure_speed_and_memory(
            lambda batch: _forward(self.model, batch, method, handle),
            self.timing,
            handle,
            self.repeats,
            self.warmup,
            self.device,
        )
        row = {
            "method": label,
            "kind": kind,
            "keep_ratio": ratio,
            "keep_count": counts[handle.sites[-1]] if counts else self.num_patches,
            "num_patches": self.num_patches,
            "accuracy": result.accuracy,
            "oracle_recall": result.oracle_recall,
            "flops": flops["total"],
            "flops_backbone": flops["backbone"],
            "flops_scorer": flops["scorer"],
            "flops_ratio": flops["ratio"],
            "peak_mem_bytes": memory,
            "num_samples": result.num_samples,
            "sites": skipped_site_labels(handle) if skips else list(getattr(handle, "sites", [])),
            "artifact": None,
            "skip_layers": handle.skip_layers if skips else None,
            "_correct": result.correct,
            "_times": times,
            "_speedups": speedups,
        }
        self.progress.advance(row)
        return row


def _site_sweep(context: _Context, val_batches, specs, ratios, sites, bootstrap: Bootstrap) -> list[dict]:
    """Every training-free spec × site × keep ratio: validation and test accuracy, oracle recall, FLOPs ratio."""
    entries = []
    for spec in specs:
        for site in sites:
            handle, method = _apply(context.model, spec, ratios[0], sites=[site])
            try:
                for ratio in ratios:
                    handle.set_budget(keep_ratio=ratio)
                    val = context.evaluate(handle, method, val_batches)
                    test = context.evaluate(handle, method)
                    low, high = bootstrap.interval(test.correct)
                    entries.append(
                        {
                            "method": spec.label,
                            "site": site,
                            "keep_ratio": ratio,
                            "val_accuracy": val.accuracy,
                            "accuracy": test.accuracy,
                            "accuracy_low": low,
                            "accuracy_high": high,
                            "oracle_recall": test.oracle_recall,
                            "flops_ratio": context.flops(handle)["ratio"],
                        }
                    )
                    context.progress.advance(entries[-1])
            finally:
                handle.remove()
    return entries


def _bench_spec(context: _Context, spec: MethodSpec, ratios, overlay_batch, overlay_ratio: float):
    """One method at every keep ratio (measured rows) and its ``overlays.png`` column at ``overlay_ratio``."""
    handle, method = _apply(context.model, spec, ratios[0])
    rows = []
    try:
        for ratio in ratios:
            handle.set_budget(keep_ratio=ratio)
            row = context.measure(spec.label, spec.kind, ratio, handle, method)
            row["artifact"] = None if spec.artifact is None else str(spec.artifact.path)
            rows.append(row)
        handle.set_budget(keep_ratio=overlay_ratio)
        # ia_red2: its interpreters' per-head keep maps of this pass only (recorded on request: the timed passes don't)
        recording = getattr(method, "recording_head_maps", None)
        with torch.no_grad(), recording() if callable(recording) else contextlib.nullcontext():
            logits = _forward(context.model, overlay_batch, method, handle)
        size = int(overlay_batch["pixel_values"].shape[0])
        kept = kept_patches(handle, size, context.num_patches, context.num_prefix, context.device)
        column = {
            "title": f"{spec.label} @ {overlay_ratio:g}",
            "kept": kept.cpu().numpy(),
            "preds": logits.argmax(-1).cpu().numpy(),
        }
        if callable(recording):
            column["head_maps"] = {site: m.cpu().numpy() for site, m in method.head_maps().items()} or None
    finally:
        handle.remove()
        if isinstance(method, OracleMethod):
            method.oracle_mask = None
    return rows, column


def _best_site_rows(context: _Context, specs, ratios, chosen: dict[tuple[str, float], str]) -> list[dict]:
    """Each training-free method at its validation-chosen site per keep ratio, measured like every other row."""
    rows = []
    for spec in specs:
        for ratio in ratios:
            handle, method = _apply(context.model, spec, ratio, sites=[chosen[(spec.label, ratio)]])
            try:
                rows.append(context.measure(best_site_label(spec.label), spec.kind, ratio, handle, method))
            finally:
                handle.remove()
    return rows


def _run_metadata(rows, timing, repeats, warmup, bootstrap, flops_ratios, sweep_sites, val_batches) -> dict:
    return {
        "timing": {
            "timing_batches": len(timing),
            "repeats": repeats,
            "warmup": warmup,
            "unpruned_time_ms": rows[0]["time_ms"],
            "statistic": "time: median over repeats; speedup: median over repeats of unpruned / pruned time "
            "of back-to-back passes",
        },
        "flops_model": "analytic, see tokensift.flops (2 FLOPs per multiply-add; embedding and head once)",
        "accuracy_interval": bootstrap.describe(),
        "flops_ratios": flops_ratios,
        "matched_flops": MATCHED_FLOPS_NOTE,
        "site_sweep": None if sweep_sites is None else _sweep_metadata(sweep_sites, val_batches),
    }


def run_image_bench(
    model_path: Path,
    specs: list[MethodSpec],
    oracle_requested: bool,
    ratios: list[float],
    overlay_ratio: float,
    settings: BenchSettings,
    num_threads: int | None,
    quiet: bool,
    flops_ratios: list[float],
    bootstrap_resamples: int,
    bootstrap_seed: int,
    sweep: str | list[str] | None,
    skip_layers: list[int] | None = None,
) -> dict:
    """The image bench on validated options (:func:`tokensift.bench.runner.run_bench` validates them)."""
    from tokensift.bench.plots import plot_head_maps, plot_overlays

    timing_batches, repeats, warmup, num_overlay_images, max_batches, torch_device, datamodule, *_ = settings
    data_description, out_dir = settings.data_description, settings.out_dir

    with torch_threads(num_threads), RowProgress(quiet) as progress:
        model = load_backbone(str(model_path)).eval().to(torch_device)
        adapter = adapt(model)
        if not adapter.has_classifier:
            raise ValueError(
                f"model: {type(model).__name__} in {model_path} has no classification head; the benchmark measures "
                "accuracy, so give a *ForImageClassification model."
            )
        sweep_sites = None
        if sweep is not None:
            valid = [f"vit.{i}" for i in range(adapter.num_layers - 1)]  # a block must follow the site
            sweep_sites = resolve_sweep_sites(sweep, valid)
            if not any(spec.kind == "training-free" for spec in specs):
                raise ValueError("sweep_sites: sweeps training-free methods' sites; methods names none.")

        datamodule.setup("test")
        batches, grid = _load_split(
            datamodule.test_dataloader(), "test", adapter, model_path, torch_device, max_batches
        )
        has_oracle = all("oracle_mask" in b for b in batches)
        if oracle_requested and not has_oracle:
            raise ValueError("methods: 'oracle' needs test batches that carry an oracle_mask; this data has none.")
        if has_oracle:
            specs = [*specs, MethodSpec(ORACLE, ORACLE, ORACLE, ORACLE)]
        val_batches = None
        if sweep_sites is not None:
            val_batches = _val_batches(datamodule, adapter, model_path, torch_device, max_batches)
        num_patches = grid[0] * grid[1]
        num_prefix = adapter.num_prefix
        timing = batches[:timing_batches]

        context = _Context(
            model, adapter, batches, timing, num_patches, num_prefix, torch_device, repeats, warmup, progress
        )
        # the unpruned row, each method's budgets; a sweep adds every site's entry and a best-site row per budget
        free = sum(spec.kind == "training-free" for spec in specs)
        swept = 0 if sweep_sites is None else free * len(ratios) * (len(sweep_sites) + 1)
        progress.start(1 + sum(rows_of_spec(spec, ratios, skip_layers) for spec in specs) + swept)
        rows = [context.measure(UNPRUNED, "none", 1.0, None, None)]
        bootstrap = Bootstrap(rows[0]["num_samples"], bootstrap_resamples, bootstrap_seed)
        overlay_images = batches[0]
        n_overlay = min(num_overlay_images, int(overlay_images["pixel_values"].shape[0]))
        overlay_batch = {k: v[:n_overlay] for k, v in overlay_images.items()}
        with torch.no_grad():
            unpruned_preds = model(pixel_values=overlay_batch["pixel_values"]).logits.argmax(-1).cpu().numpy()
        columns = [{"title": f"{UNPRUNED} (all tokens)", "kept": None, "preds": unpruned_preds}]

        for spec in specs:
            if spec.artifact is not None and is_skip_method(spec.artifact.method):
                rows += bench_skip_spec(
                    context.model,
                    spec,
                    skip_layers,
                    lambda h, s=spec: context.measure(s.label, s.kind, None, h, h.method),
                )
                continue
            spec_rows, column = _bench_spec(context, spec, ratios, overlay_batch, overlay_ratio)
            rows += spec_rows
            columns.append(column)
        site_sweep = None
        if sweep_sites is not None:
            free = [spec for spec in specs if spec.kind == "training-free"]
            site_sweep = _site_sweep(context, val_batches, free, ratios, sweep_sites, bootstrap)
            rows += _best_site_rows(context, free, ratios, choose_best_sites(site_sweep))

        summary = summarize(rows, bootstrap, flops_ratios)
        rows = finalize_rows(rows)
        metadata = {
            "model": str(model_path),
            "model_class": type(model).__name__,
            "model_type": adapter.config.model_type,
            "data": data_description,
            "batch_size": int(batches[0]["labels"].shape[0]),
            "num_samples": rows[0]["num_samples"],
            "num_batches": len(batches),
            "num_patches": num_patches,
            "num_prefix": num_prefix,
            **environment_metadata(torch_device),
            "methods": [s.entry for s in specs],
            "keep_ratios": ratios,
            "overlay_ratio": overlay_ratio,
            **_run_metadata(rows, timing, repeats, warmup, bootstrap, flops_ratios, sweep_sites, val_batches),
        }

    title = f"{metadata['model_class']} ({model_path.name}) · {metadata['num_samples']} test images"
    files = write_results(out_dir, rows, metadata, title, quiet=True, summary=summary, site_sweep=site_sweep)
    images = overlay_batch["pixel_values"].float().cpu().numpy()
    oracle_masks = overlay_batch["oracle_mask"].bool().cpu().numpy() if "oracle_mask" in overlay_batch else None
    files["overlays"] = plot_overlays(
        images,
        overlay_batch["labels"].cpu().tolist(),
        oracle_masks,
        columns,
        grid,
        out_dir / "overlays.png",
        title=f"kept tokens at keep ratio {overlay_ratio:g}",
    )
    for number, column in enumerate(c for c in columns if c.get("head_maps")):
        name = "head_maps" if number == 0 else f"head_maps_{number}"
        files[name] = plot_head_maps(
            images,
            overlay_batch["labels"].cpu().tolist(),
            column["head_maps"],
            grid,
            out_dir / f"{name}.png",
            title=f"{column['title']}: interpreter heads",
        )
    if not quiet:
        print_report(rows, summary, site_sweep, title=f"tokensift bench · {title}")
    result: dict[str, Any] = {"rows": rows, "metadata": metadata, **summary}
    if site_sweep is not None:
        result["site_sweep"] = site_sweep
    result["files"] = {k: str(v) for k, v in files.items()}
    return result


def _sweep_metadata(sites: list[str], val_batches) -> dict:
    return {
        "sites": sites,
        "val_samples": int(sum(int(b["labels"].shape[0]) for b in val_batches)),
        "selection": "per training-free method and keep ratio, the site with the highest accuracy on the data "
        "module's validation split (ties: the lower FLOPs ratio, then the earlier site); rows "
        "'<method>@best_site' are that site measured on the test split, which plays no part in the choice",
    }


__all__ = ["run_image_bench"]
