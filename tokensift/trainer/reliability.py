"""Crash-safe, exactly resumable fits: atomic checkpoint files, ``last.ckpt`` by step, the NaN stop, random state.

:class:`tokensift.trainer.base.FrozenBackboneTrainer` uses these in its hooks; ``tokensift fit`` adds
:class:`LastCheckpoint` to its default callbacks.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

RNG_KEY = "tokensift_rng"


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN or infinite loss or gradient; training stops before the weights change."""


_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a hidden ``.<name>.partial-<pid>`` file beside it, fsync, then rename it over.

    A reader (``--ckpt_path``, ``tokensift export``) sees the previous complete file or the new complete file,
    never a half-written one, whatever kills the process. (Lightning's own save stages the file in the system
    temp directory, and a move from another filesystem is a copy.) A partial file left by a killed run is
    removed by the next save into the same directory or by a resume from it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}.")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partial_files(target.parent)
        partial = target.parent / f".{target.name}.partial-{os.getpid()}"
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)


def remove_stale_partial_files(directory: Path) -> list[Path]:
    """Delete ``.<name>.partial-<pid>`` files in ``directory`` whose writer is gone; return what was deleted."""
    removed = []
    for path in directory.glob(".*.partial-*") if directory.is_dir() else []:
        match = _PARTIAL.match(path.name)
        if match and not _process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes one checkpoint at a time: an older partial file of its own is stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: written at every epoch end, every ``every_n_train_steps`` optimizer steps when set, and when
    the run is stopped with SIGTERM (after the step in progress), so a killed fit resumes from where it stopped
    with ``--ckpt_path .../last.ckpt``. Other exceptions (a NaN loss) write nothing: the file stays the last good
    state. (Lightning's ``ModelCheckpoint`` takes steps or epochs, not both.)
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        filename: str = "last",
        save_on_exception: bool = True,
        **kwargs,
    ):
        if every_n_train_steps is not None and (
            isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int) or every_n_train_steps < 1
        ):
            raise ValueError(
                "checkpoint_every_n_steps (LastCheckpoint.every_n_train_steps) must be a positive integer or null, "
                f"got {every_n_train_steps!r}."
            )
        super().__init__(filename=filename, save_on_exception=save_on_exception, **kwargs)
        self.every_n_steps = every_n_train_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every = self.every_n_steps
        if every and trainer.global_step % every == 0 and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)


def as_random_state(state) -> tuple:
    """``random.Random.getstate()`` back from a checkpoint (tuples may come back as lists)."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def global_rng_state() -> dict:
    """torch's, CUDA's, numpy's and Python's global generators, in types torch's weights-only loader reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(as_random_state(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def last_checkpoint_paths(trainer) -> str:
    """The checkpoint files the trainer's checkpoint callbacks last wrote, for error messages."""
    callbacks = trainer.checkpoint_callbacks
    paths = [getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "") for cb in callbacks]
    paths = sorted({p for p in paths if p})
    return ", ".join(paths) if paths else "none written yet"
