"""Turn a training checkpoint into an artifact (``tokensift export CKPT OUT_DIR``)."""

from __future__ import annotations

from pathlib import Path

import torch

from tokensift.export.artifact import save_artifact
from tokensift.scorers.registry import get_method_class

METHOD_PREFIX = "method."


def export(
    checkpoint: Path,
    out_dir: Path,
    keep_ratio: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the scorer of a ``tokensift fit`` checkpoint as an artifact directory.

    Args:
        checkpoint: a ``.ckpt`` written by ``tokensift fit``.
        out_dir: the artifact directory to create (written to a temporary name, then renamed).
        keep_ratio: the artifact's default budget (default: the first ratio it was validated at).
        overwrite: replace ``out_dir`` if it exists.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; `tokensift fit` writes them under its logs.")
    # weights_only: the restricted unpickler that loads tensors and plain containers, never arbitrary objects
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    meta = ckpt.get("tokensift")
    if meta is None:
        raise ValueError(f"{checkpoint} was not written by `tokensift fit` (it has no 'tokensift' entry).")
    cls = get_method_class(meta["method"])
    method = cls(cls.config_class.from_dict(meta["config"]))
    state = {k[len(METHOD_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(METHOD_PREFIX)}
    method.load_state_dict(state)
    budget = {"keep_ratio": keep_ratio} if keep_ratio is not None else meta["default_budget"]
    extra = {
        "trained_keep_ratio_range": meta["trained_keep_ratio_range"],
        "source_checkpoint": checkpoint.name,
        "global_step": int(ckpt.get("global_step", 0)),
    }
    return save_artifact(method, meta["fingerprint"], out_dir, default_budget=budget, extra=extra, overwrite=overwrite)
