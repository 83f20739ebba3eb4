"""``run_bench``: every method × keep ratio on a data module's test split, in one process.

Per row: accuracy, retention (accuracy / unpruned accuracy), oracle recall (fraction of the target's
patches whose original index survives the last site), analytic FLOPs ratio (``tokensift.bench.flops``),
wall-clock speedup and peak-memory ratio, both measured against the unpruned model in the same run.

Peak memory (``peak_mem_bytes``; ``mem_ratio`` = method / unpruned) is the peak of tensor memory
*allocated during one forward pass* of the first timing batch, above what was allocated when the pass
started (so the weights and the input batch are excluded: it is the activation and workspace peak).
On CUDA it is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
``memory_allocated`` before the pass. On CPU it is replayed from ``torch.profiler``'s allocator trace
(``profile_memory=True``): every tensor allocation (+bytes) and free (-bytes) of the CPU allocator during
the pass, in order, and the maximum of the running sum. Memory that is not a torch tensor (Python
objects, the allocator's own caches, the process's RSS) is not counted.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import gc
import importlib
import io
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

import tokensift as ts
from tokensift import attention as attn
from tokensift.backbones import adapt, load_backbone
from tokensift.backbones.vision import VisionAdapter
from tokensift.bench.flops import pruned_flops
from tokensift.bench.oracle import OracleMethod
from tokensift.export.artifact import MANIFEST, Artifact, FingerprintMismatch
from tokensift.reduce import PruningHandle
from tokensift.scorers import TokenMethod, build_method

UNPRUNED = "unpruned"
ORACLE = "oracle"
MEMORY_MEASURE = {
    "cuda": "torch.cuda.max_memory_allocated during one forward pass minus memory_allocated before it "
    "(activation + workspace peak, weights and inputs excluded)",
    "cpu": "peak of the running sum of CPU tensor allocations minus frees during one forward pass, from "
    "torch.profiler's allocator trace (profile_memory=True); activation + workspace peak, weights and "
    "inputs excluded; non-tensor memory not counted",
}
FIELDS = (
    "method",
    "kind",
    "keep_ratio",
    "keep_count",
    "num_patches",
    "accuracy",
    "retention",
    "oracle_recall",
    "flops",
    "flops_backbone",
    "flops_scorer",
    "flops_ratio",
    "time_ms",
    "speedup",
    "peak_mem_bytes",
    "mem_ratio",
    "num_samples",
    "sites",
    "artifact",
    "threshold",
    "mean_exit_layer",
)
_CLASS_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


# -- method specs ---------------------------------------------------------------------------------
@dataclass
class MethodSpec:
    """One ``methods`` entry: a registered training-free name, ``NAME:ARTIFACT_DIR``, or the oracle."""

    label: str  # the row's ``method`` field
    name: str
    kind: str  # "learned" | "training-free" | "oracle"
    entry: str
    artifact: Artifact | None = None

    def build(self) -> TokenMethod | Artifact:
        if self.kind == ORACLE:
            return OracleMethod()
        if self.artifact is not None:
            return self.artifact
        return build_method(self.name)


def _registered_names() -> dict[str, str]:
    return {name: info["kind"] for name, info in ts.methods().items()}


def _load_artifact_for(entry: str, name: str | None, path: Path) -> Artifact:
    if not (path / MANIFEST).is_file():
        what = "does not exist" if not path.exists() else f"has no {MANIFEST}"
        raise FileNotFoundError(
            f"methods: the artifact {str(path)!r} in {entry!r} {what}; export one with "
            "`tokensift export CKPT OUT_DIR` and pass it as NAME:ARTIFACT_DIR."
        )
    artifact = ts.load(path)
    held = artifact.manifest.get("method")
    if name is not None and held != name:
        raise ValueError(
            f"methods: {entry!r} names {name!r} but {str(path)!r} holds a {held!r} scorer; write {held}:{path}."
        )
    return artifact


def parse_methods(methods: Sequence[str] | str) -> tuple[list[MethodSpec], bool]:
    """Validate ``methods`` (loading artifacts now); returns the specs and whether ``oracle`` was named."""
    if isinstance(methods, str):
        methods = methods.split(",")
    entries = [m.strip() for m in methods if m and m.strip()]
    known = _registered_names()
    free = sorted(n for n, k in known.items() if k == "training-free")
    learned = sorted(n for n, k in known.items() if k == "learned")
    specs: list[MethodSpec] = []
    oracle_requested = False
    for entry in entries:
        if entry in (UNPRUNED, ORACLE):
            oracle_requested |= entry == ORACLE
            continue  # always benchmarked (the oracle whenever batches carry an oracle_mask)
        name, sep, path = entry.partition(":")
        if sep:
            name, path = name.strip(), path.strip()
            if name not in known:
                raise ValueError(
                    f"methods: unknown method {name!r} in {entry!r}; learned scorers: {learned} "
                    "(give NAME:ARTIFACT_DIR)."
                )
            if not path:
                raise ValueError(f"methods: {entry!r} has no artifact path; write {name}:ARTIFACT_DIR.")
            artifact = _load_artifact_for(entry, name, Path(path))
            specs.append(MethodSpec(name, name, artifact.method.kind, entry, artifact))
        elif entry in known:
            if known[entry] == "learned":
                raise ValueError(
                    f"methods: {entry!r} is a learned scorer and needs its trained weights; "
                    f"write {entry}:ARTIFACT_DIR (an exported artifact directory)."
                )
            specs.append(MethodSpec(entry, entry, "training-free", entry))
        elif (Path(entry) / MANIFEST).is_file():
            artifact = _load_artifact_for(entry, None, Path(entry))
            name = artifact.manifest["method"]
            specs.append(MethodSpec(name, name, artifact.method.kind, entry, artifact))
        else:
            raise ValueError(
                f"methods: unknown method {entry!r}; training-free methods: {free}; learned scorers go as "
                f"NAME:ARTIFACT_DIR with NAME in {learned} (e.g. dynamicvit:runs/x/artifact)."
            )
    if not specs and not oracle_requested:
        raise ValueError(
            f"methods: nothing to benchmark; give comma-separated methods, e.g. random,l2norm or "
            f"dynamicvit:ARTIFACT_DIR (training-free: {free})."
        )
    seen: dict[str, int] = {}
    for spec in specs:
        seen[spec.label] = seen.get(spec.label, 0) + 1
    for spec in specs:
        if seen[spec.label] > 1:
            spec.label = spec.entry
    labels = [s.label for s in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"methods: {duplicates} are listed more than once; list each method once.")
    return specs, oracle_requested


def parse_keep_ratios(keep_ratios: Sequence[float] | str, field: str = "keep_ratios") -> list[float]:
    if isinstance(keep_ratios, str):
        parts = [p.strip() for p in keep_ratios.split(",") if p.strip()]
    else:
        parts = list(keep_ratios)
    ratios = []
    for part in parts:
        try:
            ratio = float(part)
        except (TypeError, ValueError):
            raise ValueError(f"{field}: {part!r} is not a number; give fractions such as 1,0.5,0.25.") from None
        if not 0.0 < ratio <= 1.0 or math.isnan(ratio):
            raise ValueError(
                f"{field}: {ratio!r} is outside (0, 1]; a keep ratio is the fraction of patch tokens kept "
                "(1 keeps all), e.g. 1,0.5,0.25,0.1."
            )
        ratios.append(ratio)
    if not ratios:
        raise ValueError(f"{field}: give at least one keep ratio in (0, 1], e.g. 1,0.5,0.25,0.1.")
    return sorted(set(ratios), reverse=True)


# -- data -----------------------------------------------------------------------------------------
def _import_class(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(
            f"data: cannot import class_path {class_path!r}; give an importable LightningDataModule such as "
            "tokensift.data.ClutteredDigitsDataModule."
        ) from None


def _data_spec_from_yaml(path: Path) -> dict:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"data: {path} is not valid YAML ({error}).") from None
    if isinstance(loaded, Mapping) and "class_path" not in loaded and isinstance(loaded.get("data"), Mapping):
        loaded = loaded["data"]  # a `tokensift fit` config: take its data section
    if not isinstance(loaded, Mapping) or "class_path" not in loaded:
        raise ValueError(
            f"data: {path} must hold `class_path:` and `init_args:` of a LightningDataModule "
            "(or a `data:` section with them, as a `tokensift fit` config does)."
        )
    return dict(loaded)


def resolve_datamodule(data: Any, batch_size: int | None = None) -> tuple[Any, dict]:
    """A LightningDataModule from an instance, a ``{class_path, init_args}`` mapping, a YAML path or a class path.

    Returns the module and a JSON-able description of it; ``batch_size`` (when given) overrides the module's.
    """
    from lightning.pytorch import LightningDataModule

    if isinstance(data, (str, os.PathLike)):
        text = os.fspath(data)
        path = Path(text)
        if path.is_file():
            data = _data_spec_from_yaml(path)
        elif _CLASS_PATH.match(text) and not text.endswith((".yaml", ".yml", ".json")):
            data = {"class_path": text}
        else:
            raise FileNotFoundError(
                f"data: {text!r} is neither an existing YAML file nor a class path; give e.g. configs/data.yaml "
                "or tokensift.data.ClutteredDigitsDataModule."
            )
    if isinstance(data, Mapping):
        if "class_path" not in data and isinstance(data.get("data"), Mapping):
            data = data["data"]
        if "class_path" not in data:
            raise ValueError("data: a mapping must give class_path (and optionally init_args) of a LightningDataModule")
        cls = _import_class(str(data["class_path"]))
        if not (isinstance(cls, type) and issubclass(cls, LightningDataModule)):
            raise ValueError(f"data: {data['class_path']} is not a LightningDataModule subclass.")
        init_args = dict(data.get("init_args") or {})
        try:
            module = cls(**init_args)
        except TypeError as error:
            raise ValueError(f"data.init_args do not fit {data['class_path']}: {error}") from None
    elif isinstance(data, LightningDataModule):
        module = data
    else:
        raise TypeError(
            f"data must be a LightningDataModule, a {{class_path, init_args}} mapping, a YAML path or a class path; "
            f"got {type(data).__name__}."
        )
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}.")
        if not hasattr(module, "batch_size"):
            raise ValueError(
                f"batch_size: {type(module).__name__} has no batch_size attribute to override; pass batch_size=None "
                "and set it in the data config."
            )
        module.batch_size = batch_size
    hparams = dict(getattr(module, "hparams", {}) or {})
    if batch_size is not None and "batch_size" in hparams:
        hparams["batch_size"] = batch_size
    description = {
        "class_path": f"{type(module).__module__}.{type(module).__qualname__}",
        "init_args": json.loads(json.dumps(hparams, default=str)),
    }
    return module, description


def _as_batch(batch: Any, device: torch.device) -> dict[str, Tensor]:
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch or "labels" not in batch:
            raise ValueError(f"data: test batches must carry pixel_values and labels; got keys {sorted(batch)}.")
        out = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        out = {"pixel_values": batch[0], "labels": batch[1]}
    else:
        raise ValueError("data: test batches must be dicts with pixel_values/labels or (images, labels) pairs.")
    return {k: v.to(device) for k, v in out.items()}


def oracle_on_model_grid(mask: Tensor, image_shape: Sequence[int], grid: tuple[int, int]) -> Tensor:
    """The data's ``oracle_mask`` ([B, P_data], row-major) on the model's patch grid ([B, rows·cols]).

    Equal grids pass through. A data grid finer than the model's (its patch size divides the model's) is
    exact: a model patch holds target ink iff one of its data sub-patches does. A coarser or misaligned data
    grid cannot say which model patch holds the ink, so it is refused with the fix.
    """
    mask = mask.bool()
    rows, cols = grid
    if mask.shape[-1] == rows * cols:
        return mask
    height, width = int(image_shape[-2]), int(image_shape[-1])
    side = math.isqrt(max(1, height * width // max(1, mask.shape[-1])))
    data_rows, data_cols = (height // side, width // side) if side else (0, 0)
    if data_rows * data_cols == mask.shape[-1] and data_rows % rows == 0 and data_cols % cols == 0:
        fr, fc = data_rows // rows, data_cols // cols
        return mask.view(-1, rows, fr, cols, fc).any(dim=4).any(dim=2).reshape(-1, rows * cols)
    model_patch = height // rows
    raise ValueError(
        f"data: oracle_mask has {mask.shape[-1]} patches per image but the model cuts its {height}x{width} images "
        f"into {rows}x{cols} patches of {model_patch} pixels; give the data the model's patch size "
        f"(e.g. init_args.patch_size: {model_patch}) or a divisor of it."
    )


# -- measurement ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """Silence C++ writes to file descriptor 2 (the profiler's start/stop banners) for a moment."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, io.UnsupportedOperation):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(model: nn.Module, batch: dict[str, Tensor], method: nn.Module | None) -> Tensor:
    if isinstance(method, OracleMethod):
        method.oracle_mask = batch.get("oracle_mask")
    return model(pixel_values=batch["pixel_values"]).logits


# A forward callable runs the (possibly pruned) model on one prepared batch and returns its logits; the
# vision and the MLLM evaluators each build theirs, and every measurement below is shared.
Forward = Callable[[dict], Tensor]


def _time_forward(forward: Forward, batches, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per repeat; one repeat is a forward pass over every timing batch."""
    with torch.no_grad():
        for _ in range(warmup):
            for batch in batches:
                forward(batch)
        return [_timed_pass(forward, batches, device) for _ in range(repeats)]


def _time_paired(forward: Forward, batches, handle, repeats: int, warmup: int, device: torch.device):
    """Seconds per pruned repeat and, per repeat, unpruned / pruned time of two back-to-back passes.

    Pairing each pruned pass with an unpruned one right before it cancels load that drifts over the run
    (other processes on a shared machine), which a ratio of two separately measured medians does not.
    The unpruned pass is the same call with the handle disabled.
    """
    times, speedups = [], []
    with torch.no_grad():
        for _ in range(warmup):
            for batch in batches:
                forward(batch)
        for _ in range(repeats):
            handle.enabled = False
            try:
                unpruned = _timed_pass(forward, batches, device)
            finally:
                handle.enabled = True
            pruned = _timed_pass(forward, batches, device)
            times.append(pruned)
            speedups.append(unpruned / pruned if pruned > 0 else float("nan"))
    return times, speedups


def _timed_pass(forward: Forward, batches, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        forward(batch)
    _sync(device)
    return time.perf_counter() - start


def _release_handle_state(handle) -> None:
    """Drop what the handle keeps from its previous forward pass (records, bookkeeping, per-call attention
    arguments), so that freeing it does not happen inside, and distort, the next measured pass."""
    if handle is None:
        return
    handle.last_records = []
    handle._run = None  # rebuilt at the start of every forward pass (vision: the tower's pre-hook; MLLM: the prefill)
    if isinstance(handle, PruningHandle):
        for module in handle.adapter.attention_modules:
            setattr(module, attn.CALL_ATTRIBUTE, None)  # set again by each block's pre-hook before use


def _peak_memory(forward: Forward, batch, device: torch.device, handle=None) -> int | None:
    """Activation peak (bytes) of one forward pass; see the module docstring."""
    _release_handle_state(handle)
    gc.collect()
    with torch.no_grad():
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            forward(batch)
            _sync(device)
            return int(torch.cuda.max_memory_allocated(device) - base)
        if device.type != "cpu":
            return None
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        # the profiler prints start/stop banners and an allocator notice on fd 2 (C++): keep the log clean
        with _quiet_stderr_fd():
            prof.start()
            try:
                forward(batch)
            finally:
                prof.stop()
        try:
            events = prof.profiler.kineto_results.events()
            trace = [
                (e.start_ns(), e.nbytes())
                for e in events
                if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
            ]
        except (AttributeError, RuntimeError):
            return None
        trace.sort(key=lambda item: item[0])  # stable: same-timestamp events keep their order
        current = peak = 0
        for _, nbytes in trace:
            current += nbytes
            peak = max(peak, current)
        return int(peak)


def measure_speed_and_memory(
    forward: Forward, timing: list[dict], handle, repeats: int, warmup: int, device: torch.device
) -> tuple[list[float], list[float], int | None]:
    """Per-repeat seconds, per-repeat speedups vs the unpruned model (1 without a handle) and the activation peak."""
    if handle is None:
        times = _time_forward(forward, timing, repeats, warmup, device)
        speedups = [1.0] * len(times)
    else:
        times, speedups = _time_paired(forward, timing, handle, repeats, warmup, device)
    return times, speedups, _peak_memory(forward, timing[0], device, handle)


def _kept_patches(handle: PruningHandle | None, batch_size: int, num_patches: int, num_prefix: int, device) -> Tensor:
    """``[B, P]`` bool: patches whose original index survived the last site (ToMe: merge anchors)."""
    kept = handle.kept_orig_index if handle is not None else None
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


def _evaluate(model, batches, method, handle, num_classes, num_patches, num_prefix, device) -> _Eval:
    from torchmetrics.classification import MulticlassAccuracy

    metric = MulticlassAccuracy(num_classes=num_classes, average="micro").to(device)
    hits = total = 0
    samples = 0
    with torch.no_grad():
        for batch in batches:
            logits = _forward(model, batch, method)
            metric.update(logits, batch["labels"])
            samples += int(batch["labels"].shape[0])
            oracle = batch.get("oracle_mask")
            if oracle is not None:
                oracle = oracle.bool()
                kept = _kept_patches(handle, oracle.shape[0], num_patches, num_prefix, device)
                hits += int((kept & oracle).sum())
                total += int(oracle.sum())
    recall = hits / total if total else None
    return _Eval(float(metric.compute()), recall, samples)


# -- output ---------------------------------------------------------------------------------------
def _atomic_write_text(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _csv_text(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {k: (" ".join(v) if isinstance(v, list) else ("" if v is None else v)) for k, v in row.items()}
        writer.writerow(flat)
    return buffer.getvalue()


def budget_label(row: Mapping) -> str:
    """``0.25`` for a keep ratio, ``t=0.5`` for an exit method's decision threshold."""
    if row.get("threshold") is not None:
        return f"t={row['threshold']:g}"
    return f"{row['keep_ratio']:g}"


def finalize_rows(rows: list[dict]) -> list[dict]:
    """Turn the measured ``_times`` / ``_speedups`` into medians and add the ratios to ``rows[0]`` (unpruned);
    returns the rows with exactly the ``FIELDS`` columns."""
    base_acc, base_mem = rows[0]["accuracy"], rows[0]["peak_mem_bytes"]
    for row in rows:
        row["time_ms"] = statistics.median(row.pop("_times")) * 1e3
        row["speedup"] = statistics.median(row.pop("_speedups"))
        row["retention"] = row["accuracy"] / base_acc if base_acc > 0 else None
        mem = row["peak_mem_bytes"]
        row["mem_ratio"] = mem / base_mem if mem is not None and base_mem else None
    return [{field: row.get(field) for field in FIELDS} for row in rows]


def write_results(out_dir: Path, rows: list[dict], metadata: dict, title: str, quiet: bool) -> dict[str, Path]:
    """``results.json``, ``results.csv`` and ``pareto.png`` (each written under a temporary name, then renamed)
    and, unless ``quiet``, the table on the console."""
    from tokensift.bench.plots import plot_pareto

    files = {
        "json": _atomic_write_text(
            out_dir / "results.json", json.dumps({"metadata": metadata, "rows": rows}, indent=2) + "\n"
        ),
        "csv": _atomic_write_text(out_dir / "results.csv", _csv_text(rows)),
    }
    files["pareto"] = plot_pareto(rows, out_dir / "pareto.png", title=title)
    if not quiet:
        print_table(rows, title=f"tokensift bench · {title}")
    return files


def environment_metadata(device: torch.device) -> dict:
    """Where the numbers were measured: device, threads, library versions, time."""
    return {
        "device": str(device),
        "device_name": _device_name(device),
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": _version("transformers"),
        "tokensift_version": ts.__version__,
        "memory_measure": MEMORY_MEASURE.get(device.type, "not measured on this device"),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(value: float | None, digits: int = 3, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def print_table(rows: Sequence[dict], title: str = "tokensift bench") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    with_exits = any(row.get("mean_exit_layer") is not None for row in rows)
    columns = ["method", "budget", "acc", "retention", "oracle_recall", "flops_ratio", "speedup", "mem_ratio"]
    for column in [*columns, *(["exit_layer"] if with_exits else [])]:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        cells = [
            row["method"],
            budget_label(row),
            _fmt(row["accuracy"], 4),
            _fmt(row["retention"]),
            _fmt(row["oracle_recall"]),
            _fmt(row["flops_ratio"]),
            _fmt(row["speedup"], 2, "×"),
            _fmt(row["mem_ratio"]),
        ]
        if with_exits:
            cells.append(_fmt(row.get("mean_exit_layer"), 2))
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal and console.width < 120:
        console = Console(width=120)  # a pipe or a log file: do not squeeze the columns to 80
    console.print(table)


# -- the benchmark --------------------------------------------------------------------------------
def _positive_int(value, field: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field}: must be an integer >= {minimum}, got {value!r}.")
    return value


class BenchSettings(NamedTuple):
    """The run options :func:`run_bench` and :func:`tokensift.bench.mllm.run_mllm_bench` share, validated."""

    timing_batches: int
    repeats: int
    warmup: int
    num_overlay_images: int
    max_batches: int | None
    device: torch.device
    datamodule: Any
    data_description: dict
    out_dir: Path


def bench_settings(
    data: Any,
    batch_size: int | None,
    out: str | os.PathLike,
    timing_batches: int,
    repeats: int,
    warmup: int,
    num_overlay_images: int,
    max_batches: int | None,
    device: str,
) -> BenchSettings:
    """Validate the shared run options, resolve the data module and create the output directory."""
    timing_batches = _positive_int(timing_batches, "timing_batches")
    repeats = _positive_int(repeats, "repeats")
    warmup = _positive_int(warmup, "warmup", minimum=0)
    num_overlay_images = _positive_int(num_overlay_images, "num_overlay_images")
    if max_batches is not None:
        max_batches = _positive_int(max_batches, "max_batches")
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device: {device!r} is not a torch device; use cpu, cuda or cuda:N.") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for CUDA but torch sees no GPU; use --device cpu.")
    datamodule, data_description = resolve_datamodule(data, batch_size)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    return BenchSettings(
        timing_batches,
        repeats,
        warmup,
        num_overlay_images,
        max_batches,
        torch_device,
        datamodule,
        data_description,
        out_dir,
    )


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(num_threads)`` for the block, restored afterwards; ``None`` leaves torch's setting."""
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(_positive_int(num_threads, "num_threads"))
    try:
        yield
    finally:
        if num_threads is not None:
            torch.set_num_threads(previous_threads)


def _apply(model: nn.Module, spec: MethodSpec, keep_ratio: float) -> tuple[PruningHandle, nn.Module]:
    built = spec.build()
    try:
        handle = ts.apply(model, built, keep_ratio=keep_ratio)
    except FingerprintMismatch as error:
        raise ValueError(
            f"methods: the artifact in {spec.entry!r} does not match the model: {error} "
            "Benchmark it on the backbone it was trained on."
        ) from None
    method = built.method if isinstance(built, Artifact) else built
    return handle, method


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
        out: the output directory (``results.json``, ``results.csv``, ``pareto.png``, ``overlays.png``).
        batch_size: overrides the data module's batch size (``None`` keeps it).
        timing_batches: the first this-many test batches are the fixed timing set; one timed repeat is a
            forward pass over all of them.
        repeats: timed repeats per row (the median is used); ``warmup``: untimed repeats before them.
        overlay_ratio: the keep ratio shown in ``overlays.png``.
        max_batches: evaluate only the first this-many test batches (``None``: all).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        num_overlay_images: rows of ``overlays.png``.
        num_threads: ``torch.set_num_threads`` for the run (restored afterwards); ``None`` leaves it.
        quiet: do not print the table.

    Returns ``{"rows": [...], "metadata": {...}, "files": {...}}``; the same rows and metadata are in
    ``results.json``.
    """
    from tokensift.bench.plots import plot_overlays

    # -- validate everything before any expensive work -----------------------------------------------
    model_path = Path(model_dir)
    if not model_path.is_dir():
        raise FileNotFoundError(
            f"model: {str(model_path)!r} is not a directory; give a save_pretrained folder (config.json + weights)."
        )
    if is_multimodal_dir(model_path):
        from tokensift.bench.mllm import run_mllm_bench

        return run_mllm_bench(
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
        )
    if thresholds is not None:
        raise ValueError(
            "thresholds: only exit methods on multimodal LLMs (dyvte) take decision thresholds; "
            f"{model_path} is not a LLaVA / Qwen2-VL folder, so leave thresholds unset."
        )
    specs, oracle_requested = parse_methods(methods)
    ratios = parse_keep_ratios(keep_ratios)
    overlay_ratio = parse_keep_ratios([overlay_ratio], field="overlay_ratio")[0]
    settings = bench_settings(
        data, batch_size, out, timing_batches, repeats, warmup, num_overlay_images, max_batches, device
    )
    timing_batches, repeats, warmup, num_overlay_images, max_batches, torch_device, datamodule, *_ = settings
    data_description, out_dir = settings.data_description, settings.out_dir

    with torch_threads(num_threads):
        model = load_backbone(str(model_path)).eval().to(torch_device)
        adapter = adapt(model)
        if not adapter.has_classifier:
            raise ValueError(
                f"model: {type(model).__name__} in {model_path} has no classification head; the benchmark measures "
                "accuracy, so give a *ForImageClassification model."
            )
        num_classes = int(model.config.num_labels)

        datamodule.setup("test")
        loader = datamodule.test_dataloader()
        iterator = iter(loader)
        first = next(iterator, None)
        if first is None:
            raise ValueError("data: the test dataloader is empty; give the data module some test samples.")
        first = _as_batch(first, torch_device)
        _check_image_size(adapter, first["pixel_values"], model_path)  # before generating the whole split
        rest = islice(iterator, None if max_batches is None else max_batches - 1)
        batches = [first, *(_as_batch(b, torch_device) for b in rest)]
        grid = adapter.grid_for(first["pixel_values"])
        for batch in batches:
            if "oracle_mask" in batch:
                batch["oracle_mask"] = oracle_on_model_grid(batch["oracle_mask"], first["pixel_values"].shape, grid)
        has_oracle = all("oracle_mask" in b for b in batches)
        if oracle_requested and not has_oracle:
            raise ValueError("methods: 'oracle' needs test batches that carry an oracle_mask; this data has none.")
        if has_oracle:
            specs = [*specs, MethodSpec(ORACLE, ORACLE, ORACLE, ORACLE)]
        num_patches = grid[0] * grid[1]
        num_prefix = adapter.num_prefix
        timing = batches[:timing_batches]

        context = _Context(
            model, adapter, batches, timing, num_classes, num_patches, num_prefix, torch_device, repeats, warmup
        )
        rows = [context.measure(UNPRUNED, "none", 1.0, None, None)]
        overlay_images = batches[0]
        n_overlay = min(num_overlay_images, int(overlay_images["pixel_values"].shape[0]))
        overlay_batch = {k: v[:n_overlay] for k, v in overlay_images.items()}
        with torch.no_grad():
            unpruned_preds = model(pixel_values=overlay_batch["pixel_values"]).logits.argmax(-1).cpu().numpy()
        columns = [{"title": f"{UNPRUNED} (all tokens)", "kept": None, "preds": unpruned_preds}]

        for spec in specs:
            handle, method = _apply(model, spec, ratios[0])
            try:
                for ratio in ratios:
                    handle.set_budget(keep_ratio=ratio)
                    row = context.measure(spec.label, spec.kind, ratio, handle, method)
                    row["artifact"] = None if spec.artifact is None else str(spec.artifact.path)
                    rows.append(row)
                handle.set_budget(keep_ratio=overlay_ratio)
                with torch.no_grad():
                    logits = _forward(model, overlay_batch, method)
                kept = _kept_patches(handle, n_overlay, num_patches, num_prefix, torch_device)
                columns.append(
                    {
                        "title": f"{spec.label} @ {overlay_ratio:g}",
                        "kept": kept.cpu().numpy(),
                        "preds": logits.argmax(-1).cpu().numpy(),
                    }
                )
            finally:
                handle.remove()
                if isinstance(method, OracleMethod):
                    method.oracle_mask = None

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
            "timing": {
                "timing_batches": len(timing),
                "repeats": repeats,
                "warmup": warmup,
                "unpruned_time_ms": rows[0]["time_ms"],
                "statistic": "time: median over repeats; speedup: median over repeats of unpruned / pruned time "
                "of back-to-back passes",
            },
            "flops_model": "analytic, see tokensift.bench.flops (2 FLOPs per multiply-add; embedding and head once)",
        }

    title = f"{metadata['model_class']} ({model_path.name}) · {metadata['num_samples']} test images"
    files = write_results(out_dir, rows, metadata, title, quiet=True)
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
    if not quiet:
        print_table(rows, title=f"tokensift bench · {title}")
    return {"rows": rows, "metadata": metadata, "files": {k: str(v) for k, v in files.items()}}


@dataclass
class _Context:
    model: nn.Module
    adapter: VisionAdapter
    batches: list[dict[str, Tensor]]
    timing: list[dict[str, Tensor]]
    num_classes: int
    num_patches: int
    num_prefix: int
    device: torch.device
    repeats: int
    warmup: int

    def measure(self, label: str, kind: str, ratio: float, handle: PruningHandle | None, method) -> dict:
        result = _evaluate(
            self.model, self.batches, method, handle, self.num_classes, self.num_patches, self.num_prefix, self.device
        )
        flops = pruned_flops(self.adapter, handle, num_patches=self.num_patches)
        counts = handle.site_counts(self.num_patches) if handle is not None else {}
        times, speedups, memory = measure_speed_and_memory(
            lambda batch: _forward(self.model, batch, method),
            self.timing,
            handle,
            self.repeats,
            self.warmup,
            self.device,
        )
        return {
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
            "sites": list(handle.sites) if handle is not None else [],
            "artifact": None,
            "_times": times,
            "_speedups": speedups,
        }


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


def _check_image_size(adapter: VisionAdapter, pixel_values: Tensor, model_path: Path) -> None:
    expected = int(getattr(adapter.config, "image_size", 0) or 0)
    height, width = pixel_values.shape[-2:]
    if expected and (height != expected or width != expected):
        raise ValueError(
            f"data: test images are {height}x{width} pixels but the model in {model_path} expects "
            f"{expected}x{expected}; set the data module's image size (e.g. init_args.canvas_size: {expected})."
        )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


__all__ = [
    "FIELDS",
    "MEMORY_MEASURE",
    "MethodSpec",
    "budget_label",
    "finalize_rows",
    "is_multimodal_dir",
    "measure_speed_and_memory",
    "oracle_on_model_grid",
    "parse_keep_ratios",
    "parse_methods",
    "resolve_datamodule",
    "run_bench",
    "write_results",
]
