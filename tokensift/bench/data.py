"""The benchmark's data: a LightningDataModule from what ``data`` names, its batches on the device, and the
oracle mask on the model's patch grid."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_CLASS_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


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


def as_batch(batch: Any, device: torch.device) -> dict[str, Tensor]:
    """An image batch (a dict with ``pixel_values`` / ``labels``, or an ``(images, labels)`` pair) on ``device``."""
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


__all__ = ["as_batch", "oracle_on_model_grid", "resolve_datamodule"]
