"""The run options :func:`~tokensift.bench.runner.run_bench` and :func:`~tokensift.bench.mllm.run_mllm_bench`
share, validated before any expensive work."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tokensift.bench.data import resolve_datamodule


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


__all__ = ["BenchSettings", "bench_settings", "torch_threads"]
