"""The benchmark's data: a LightningDataModule from what ``data`` names (:mod:`tokensift.data.resolve`), image
batches on the device, the oracle mask on the model's patch grid, and the VQA test batches of a multimodal LLM
(the VQA batch contract, :mod:`tokensift.data.contract`) split into prompts and answers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tokensift.data.resolve import resolve_datamodule


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


def vqa_test_batches(datamodule: Any, max_batches: int | None = None) -> list[dict]:
    """The first ``max_batches`` batches (all without it) of a VQA data module's test loader, as collated.

    Any LightningDataModule works whose ``test_dataloader()`` yields batches of the VQA batch contract
    (:mod:`tokensift.data.contract`); nothing else of the module is read here.
    """
    if not callable(getattr(datamodule, "test_dataloader", None)):
        raise ValueError(
            f"data: {type(datamodule).__name__} has no test_dataloader(); a multimodal LLM is benched on a VQA data "
            "module whose test batches follow the VQA batch contract (tokensift.data.contract), such as "
            "tokensift.data.DigitVQADataModule or tokensift.data.ShapeVQADataModule."
        )
    datamodule.setup("test")
    batches = []
    for batch in datamodule.test_dataloader():
        if not isinstance(batch, Mapping):
            raise ValueError(
                f"data: test batches are {type(batch).__name__}s; a VQA batch is a dict of tensors "
                "(the VQA batch contract: tokensift.data.contract)."
            )
        batches.append(dict(batch))
        if max_batches is not None and len(batches) >= max_batches:
            break
    if not batches:
        raise ValueError("data: the test split is empty; give the data module some test samples.")
    return batches


def take_rows(batch: Mapping, count: int) -> dict:
    """The first ``count`` samples of a VQA batch: per-sample fields sliced, Qwen2-VL's flattened patches and
    Molmo2's frames and pooling cut at the end of the ``count``-th image or video (one per sample)."""
    size = int(batch["input_ids"].shape[0])
    out = {}
    grid = batch.get("image_grid_thw")
    cut = {}  # video fields flattened over the batch's videos (one per sample): where the first count end
    if batch.get("video_grid_thw") is not None:  # Qwen2-VL: t * h * w patches per video
        cut["pixel_values_videos"] = int(batch["video_grid_thw"][:count].prod(-1).sum())
    if batch.get("video_grids") is not None:  # Molmo2: frames per video, frames * rows * cols pooled tokens
        grids = batch["video_grids"][:count]
        cut["pixel_values_videos"] = int(grids[:, 0].sum())
        cut["video_token_pooling"] = int(grids.prod(-1).sum())
    for key, value in batch.items():
        if key == "pixel_values" and grid is not None:
            out[key] = value[: int(grid[:count].prod(-1).sum())]
        elif key in cut:
            out[key] = value[: cut[key]]
        elif isinstance(value, Tensor) and value.ndim and value.shape[0] == size:
            out[key] = value[:count]
        else:
            out[key] = value
    return out


__all__ = ["as_batch", "oracle_on_model_grid", "resolve_datamodule", "take_rows", "vqa_test_batches"]
