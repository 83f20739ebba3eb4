"""Wall clock and peak memory of one (method, budget), measured against the unpruned model in the same run,
and where the numbers were measured.

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
import datetime as dt
import gc
import io
import os
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

import tokensift as ts
from tokensift import attention as attn
from tokensift.reduce import PruningHandle

MEMORY_MEASURE = {
    "cuda": "torch.cuda.max_memory_allocated during one forward pass minus memory_allocated before it "
    "(activation + workspace peak, weights and inputs excluded)",
    "cpu": "peak of the running sum of CPU tensor allocations minus frees during one forward pass, from "
    "torch.profiler's allocator trace (profile_memory=True); activation + workspace peak, weights and "
    "inputs excluded; non-tensor memory not counted",
}


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


__all__ = ["MEMORY_MEASURE", "Forward", "environment_metadata", "measure_speed_and_memory"]
