"""The VQA batch contract: what a data module's batches must carry for the MLLM recipe
(:func:`tokensift.backbones.pretrain_mllm.pretrain_mllm`), the exit-router trainer and ``tokensift bench`` on a
LLaVA / Qwen2-VL model, and :func:`check_vqa_batch`, which says which field is missing or ill-shaped and how to fix it.

Any LightningDataModule whose loaders yield such batches works; digit VQA (:mod:`tokensift.data.digit_vqa`) and
shape VQA (:mod:`tokensift.data.shape_vqa`) are two. ``B`` is the batch size, ``L`` the padded length.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from tokensift.data.vqa import IGNORE_INDEX

__all__ = [
    "CONTRACT_FAMILIES",
    "OPTIONAL_FIELDS",
    "REQUIRED_FIELDS",
    "VIDEO_FIELDS",
    "VQA_BATCH_CONTRACT",
    "VQABatchError",
    "answer_tokens",
    "check_vqa_batch",
    "repeat_samples",
    "split_answers",
]

REQUIRED_FIELDS = ("input_ids", "attention_mask", "pixel_values", "labels", "index")
OPTIONAL_FIELDS = ("image_grid_thw", "mm_token_type_ids", "oracle_mask", "question_type")
VIDEO_FIELDS = {"qwen2_vl": ("video_grid_thw",), "molmo2": ("video_token_pooling", "video_grids")}
"""What a video batch carries beside ``pixel_values_videos`` (which stands in for ``pixel_values``), per family."""
CONTRACT_FAMILIES = ("llava", "qwen2_vl", "molmo2")

VQA_BATCH_CONTRACT = """\
A VQA batch is a dict of tensors, the model's processor outputs plus the answer and bookkeeping:

  input_ids       int64 [B, L]  <s>, the prompt with the model's image token repeated once per visual LLM token
                                of the sample, then the answer's tokens (teacher forcing); padding where
                                attention_mask is 0 (left padding lets a prompt-only batch end where the
                                answer starts; any side is accepted)
  attention_mask  int64 [B, L]  1 at real tokens, 0 at padding
  pixel_values    llava:    float [B, C, H, W], one image per sample (what LLaVA's image processor returns)
                  qwen2_vl: float [sum of t*h*w over images, C*temporal*p*p], the flattened patches
                            Qwen2VLImageProcessor returns, with image_grid_thw; or images [B, C, H, W] without
                            image_grid_thw, which tokensift patches with the model's vision config
  image_grid_thw  int64 [num_images, 3]  qwen2_vl with flattened patches: each image's (t, h, w) patch grid
  labels          int64 [B, L]  -100 everywhere but the answer's tokens (one or more), equal to input_ids there,
                                one contiguous run after the last image token; the prompt is everything before it
  index           int64 [B]     each sample's index in its split (per-sample random draws key on it)
optional:
  oracle_mask     bool [B, P]   the visual tokens the question needs, P = the sample's visual tokens in the order
                                they appear in input_ids (the raster order of the LLM token grid); the bench
                                reports oracle recall and runs the oracle row only when batches carry it
  mm_token_type_ids int64 [B, L]  qwen2_vl: 1 at image tokens (computed from input_ids when absent)
  question_type   int64 [B]     index into the data's question_type_names, for accuracy per question type
video batches (one video per sample, tokensift.data.video_vqa) carry pixel_values_videos instead of pixel_values:
  qwen2_vl: pixel_values_videos float [sum of t*h*w, C*temporal*p*p] and video_grid_thw int64 [B, 3], one video
            token per merged patch, mm_token_type_ids 2 there
  molmo2:   pixel_values_videos float [frames, patches, p*p*C], video_token_pooling int64 [tokens, pool_h*pool_w]
            (indices into the flattened patches, -1 padding), video_grids int64 [B, 3] (frames, rows, cols), the
            image_patch_id once per pooled token, mm_token_type_ids 1 there and at the frame start / end tokens
  oracle_mask may then be [B, P_max]: each row's visual tokens first, False after them

Data-module attributes read when present: answer_token_ids (a closed answer vocabulary: argmax and generate are
restricted to it), pad_token_id / tokenizer (re-padding prompts, decoding answers for figures), image_token_id
(checked against the model), question_type_names. pretrain_mllm also builds the model from the module: tokenizer,
image_token_id, image_size, patch_size, num_channels, num_patches, num_image_tokens (one LM token per data patch),
and uses image_processor() and alignment_targets(batch) when the module has them.

Answer accuracy: a sample is right when every answer token is: the argmax (over answer_token_ids when given) of
the prompt's next-token logits for a one-token answer, greedy generate over as many tokens for a longer one.
"""


class VQABatchError(ValueError):
    """A batch that breaks the VQA batch contract; the message names the field and the fix."""


def _fail(field: str, problem: str, fix: str) -> None:
    raise VQABatchError(f"batch[{field!r}] {problem}; {fix} (the VQA batch contract: tokensift.data.contract)")


def _integer(tensor: Tensor) -> bool:
    return not tensor.dtype.is_floating_point and not tensor.dtype.is_complex and tensor.dtype != torch.bool


def _tensor(batch: Mapping, field: str, ndim: int | tuple[int, ...], what: str) -> Tensor:
    value = batch[field]
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if not isinstance(value, Tensor):
        _fail(field, f"is a {type(value).__name__}, not a tensor", f"collate it into a {what} tensor")
    if value.ndim not in ndims:
        _fail(field, f"has shape {tuple(value.shape)}", f"give a {what} tensor")
    return value


def check_vqa_batch(
    batch: Mapping,
    family: str,
    *,
    image_token_id: int | None = None,
    spatial_merge_size: int | None = None,
    require_labels: bool = True,
) -> None:
    """Raise :class:`VQABatchError` naming the first field of ``batch`` that breaks :data:`VQA_BATCH_CONTRACT`.

    Args:
        batch: one collated batch.
        family: ``llava`` or ``qwen2_vl``, the model the batch is for.
        image_token_id: the model's image token; given, every row must hold image tokens, one per oracle patch.
        spatial_merge_size: Qwen2-VL's merge size; given, the grids' LM tokens must match the image tokens.
        require_labels: ``False`` for a prompt-only batch (no ``labels``).
    """
    if not isinstance(batch, Mapping):
        raise VQABatchError(
            f"a VQA batch is a dict of tensors, got {type(batch).__name__}; collate samples into a dict"
        )
    if family not in CONTRACT_FAMILIES:
        raise VQABatchError(f"family must be one of {list(CONTRACT_FAMILIES)}, got {family!r}")
    video = "pixel_values_videos" in batch
    required = [f for f in REQUIRED_FIELDS if require_labels or f != "labels"]
    if video:
        required = [f for f in required if f != "pixel_values"] + list(VIDEO_FIELDS.get(family, ()))
    elif family == "molmo2":
        raise VQABatchError(
            "batch lacks pixel_values_videos: tokensift reads molmo2 video batches (Molmo2VideoProcessor's layout); "
            "collate them with tokensift.data.video_vqa.VideoVQACollator"
        )
    missing = [f for f in required if f not in batch]
    if missing:
        present = sorted(str(k) for k in batch)
        raise VQABatchError(
            f"batch lacks {missing} (it has {present}); a VQA batch carries {list(required)} and, for qwen2_vl "
            "processor patches, image_grid_thw (the VQA batch contract: tokensift.data.contract)"
        )
    ids = _tensor(batch, "input_ids", 2, "int64 [B, L]")
    if not _integer(ids):
        _fail("input_ids", f"has dtype {ids.dtype}", "give token ids as int64")
    size, length = ids.shape
    mask = _tensor(batch, "attention_mask", 2, "int64 [B, L]")
    if tuple(mask.shape) != (size, length):
        _fail("attention_mask", f"has shape {tuple(mask.shape)}, input_ids {(size, length)}", "pad both alike")
    if bool(((mask != 0) & (mask != 1)).any()):
        _fail("attention_mask", "holds values other than 0 and 1", "mark real tokens 1 and padding 0")
    index = _tensor(batch, "index", 1, "int64 [B]")
    if len(index) != size or not _integer(index):
        _fail("index", f"is {index.dtype} {tuple(index.shape)} for {size} samples", "give each sample's dataset index")
    is_image = None if image_token_id is None else ids == image_token_id
    if is_image is not None and bool((is_image.sum(1) == 0).any()):
        rows = (is_image.sum(1) == 0).nonzero().flatten().tolist()
        _fail(
            "input_ids",
            f"rows {rows} hold no image token {image_token_id}",
            "give the model's image token per visual token",
        )

    if require_labels:
        labels = _tensor(batch, "labels", 2, "int64 [B, L]")
        if tuple(labels.shape) != (size, length) or not _integer(labels):
            _fail(
                "labels",
                f"is {labels.dtype} {tuple(labels.shape)}, input_ids {(size, length)}",
                "pad labels like input_ids",
            )
        answer = labels != IGNORE_INDEX
        count = answer.sum(1)
        if bool((count == 0).any()):
            rows = (count == 0).nonzero().flatten().tolist()
            _fail("labels", f"rows {rows} mark no answer token", "label the answer's tokens (-100 elsewhere)")
        if bool((labels[answer] != ids[answer]).any()):
            _fail(
                "labels",
                "differ from input_ids at answer positions",
                "put the answer's tokens in input_ids too (teacher forcing)",
            )
        if bool((mask[answer] == 0).any()):
            _fail("labels", "mark padded positions", "label only real tokens")
        positions = torch.arange(length, device=ids.device).expand(size, -1)
        first = torch.where(answer, positions, length).min(1).values
        last = torch.where(answer, positions, -1).max(1).values
        if bool((last - first + 1 != count).any()):
            _fail("labels", "mark a broken run of tokens", "label one contiguous answer after the prompt")
        if is_image is not None:
            last_image = torch.where(is_image, positions, -1).max(1).values
            if bool((last_image > first).any()):
                _fail("labels", "start before the last image token", "put the answer after the prompt and its image")

    if video:
        _check_video(batch, family, size, is_image, spatial_merge_size)
    grid = batch.get("image_grid_thw")
    pixels = batch.get("pixel_values")
    if video:
        pass  # the video fields were checked above
    elif not isinstance(pixels, Tensor) or not pixels.dtype.is_floating_point:
        _fail("pixel_values", f"is {getattr(pixels, 'dtype', type(pixels).__name__)}", "give float pixel values")
    elif family == "llava":
        if pixels.ndim != 4 or pixels.shape[0] != size:
            _fail(
                "pixel_values",
                f"has shape {tuple(pixels.shape)}",
                f"give llava one image per sample, [{size}, C, H, W]",
            )
    elif grid is None:
        if pixels.ndim != 4 or pixels.shape[0] != size:
            _fail(
                "pixel_values",
                f"has shape {tuple(pixels.shape)} and the batch has no image_grid_thw",
                "give qwen2_vl the processor's flattened patches with image_grid_thw, or images [B, C, H, W]",
            )
    else:
        if not isinstance(grid, Tensor) or grid.ndim != 2 or grid.shape[1] != 3 or not _integer(grid):
            _fail(
                "image_grid_thw",
                f"is {getattr(grid, 'shape', grid)!r}",
                "give int64 [num_images, 3] (t, h, w) per image",
            )
        if pixels.ndim != 2 or pixels.shape[0] != int(grid.prod(-1).sum()):
            _fail(
                "pixel_values",
                f"has shape {tuple(pixels.shape)} but image_grid_thw holds {int(grid.prod(-1).sum())} patches",
                "give qwen2_vl the flattened patches of every image, [sum of t*h*w, C*temporal*p*p]",
            )
        if is_image is not None and spatial_merge_size:
            tokens = int(grid.prod(-1).sum()) // spatial_merge_size**2
            if tokens != int(is_image.sum()):
                _fail(
                    "input_ids",
                    f"hold {int(is_image.sum())} image tokens but the grids merge into {tokens}",
                    "repeat the image token once per merged patch (t*h*w / merge_size**2 per image)",
                )
    types = batch.get("mm_token_type_ids")
    if types is not None and (not isinstance(types, Tensor) or tuple(types.shape) != (size, length)):
        _fail("mm_token_type_ids", f"has shape {tuple(getattr(types, 'shape', ()))}", "pad it like input_ids")

    oracle = batch.get("oracle_mask")
    if oracle is not None:
        oracle = _tensor(batch, "oracle_mask", 2, "bool [B, P]")
        if oracle.dtype != torch.bool:
            _fail("oracle_mask", f"has dtype {oracle.dtype}", "give a bool mask (mask.bool())")
        if oracle.shape[0] != size:
            _fail("oracle_mask", f"has {oracle.shape[0]} rows for {size} samples", "give one row per sample")
        counts = None if is_image is None else is_image.sum(1)
        if counts is not None and not video and bool((counts != oracle.shape[1]).any()):
            _fail(
                "oracle_mask",
                f"has {oracle.shape[1]} patches per row but the rows hold {sorted(set(counts.tolist()))} image tokens",
                "give one oracle entry per visual token, in input_ids order",
            )
        if counts is not None and video:
            beyond = torch.arange(oracle.shape[1], device=oracle.device) >= counts.to(oracle.device).unsqueeze(1)
            if int(counts.max()) > oracle.shape[1] or bool((oracle & beyond).any()):
                _fail(
                    "oracle_mask",
                    f"has {oracle.shape[1]} entries per row for rows of {sorted(set(counts.tolist()))} visual tokens",
                    "give one entry per visual token in input_ids order, padded with False to the longest row",
                )
    kinds = batch.get("question_type")
    if kinds is not None and (not isinstance(kinds, Tensor) or tuple(kinds.shape) != (size,)):
        _fail(
            "question_type",
            f"has shape {tuple(getattr(kinds, 'shape', ()))}",
            "give one question-type index per sample",
        )


def _check_video(batch: Mapping, family: str, size: int, is_image: Tensor | None, merge: int | None) -> None:
    """The video fields of ``batch`` (one video per sample) in qwen2_vl's or molmo2's processor layout."""
    if family == "llava":
        _fail("pixel_values_videos", "is given for llava", "give llava images in pixel_values")
    pixels = batch["pixel_values_videos"]
    if not isinstance(pixels, Tensor) or not pixels.dtype.is_floating_point:
        _fail("pixel_values_videos", f"is {getattr(pixels, 'dtype', type(pixels).__name__)}", "give float pixels")
    grid_field = "video_grid_thw" if family == "qwen2_vl" else "video_grids"
    grid = _tensor(batch, grid_field, 2, "int64 [B, 3]")
    if grid.shape != (size, 3) or not _integer(grid):
        _fail(grid_field, f"is {grid.dtype} {tuple(grid.shape)} for {size} samples", "give one (t, h, w) per video")
    visual = None if is_image is None else int(is_image.sum())
    if family == "qwen2_vl":
        if pixels.ndim != 2 or pixels.shape[0] != int(grid.prod(-1).sum()):
            _fail(
                "pixel_values_videos",
                f"has shape {tuple(pixels.shape)} but video_grid_thw holds {int(grid.prod(-1).sum())} patches",
                "give the flattened patches of every video, [sum of t*h*w, C*temporal*p*p]",
            )
        if visual is not None and merge and int(grid.prod(-1).sum()) // merge**2 != visual:
            _fail("input_ids", f"hold {visual} video tokens but the grids merge into more or fewer", "one per merge")
        return
    pooling = _tensor(batch, "video_token_pooling", 2, "int64 [tokens, pool_h * pool_w]")
    if pixels.ndim != 3 or pixels.shape[0] != int(grid[:, 0].sum()):
        _fail(
            "pixel_values_videos",
            f"has shape {tuple(pixels.shape)} for {int(grid[:, 0].sum())} frames in video_grids",
            "give molmo2 [frames of every video, patches, patch * patch * C]",
        )
    tokens = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    if pooling.shape[0] != tokens or int(pooling.max()) >= pixels.shape[0] * pixels.shape[1]:
        _fail(
            "video_token_pooling",
            f"has {pooling.shape[0]} rows (max index {int(pooling.max())}) for {tokens} pooled tokens",
            "give one row of patch indices per pooled token, into the batch's flattened patches",
        )
    if visual is not None and visual != tokens:
        _fail("input_ids", f"hold {visual} image_patch_id tokens for {tokens} pooled tokens", "one per pooled token")


_SEQUENCE_FIELDS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def split_answers(batch: Mapping, pad_token_id: int = 0) -> tuple[dict, Tensor]:
    """A contract batch -> ``(prompt batch, answers)``.

    The prompt batch holds each row's real tokens before its first answer token, re-padded on the left (so
    every row ends where its answer starts, as a prefill and ``generate`` need), without ``labels`` /
    ``position_ids``; the other fields pass through. ``answers`` is ``[B, T]``, each row's answer tokens with
    -100 after them (``T``: the longest answer). A left-padded batch whose answers are all one token gives the
    same prompt batch as collating without the answer.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch["attention_mask"].bool()
    size, length = ids.shape
    answer = labels != IGNORE_INDEX
    positions = torch.arange(length, device=ids.device).expand(size, -1)
    first = torch.where(answer, positions, length).min(1).values
    keep = mask & (positions < first.unsqueeze(1))
    lengths = keep.sum(1)
    width = int(lengths.max())
    rows = torch.arange(size, device=ids.device).unsqueeze(1).expand(size, length)
    column = keep.long().cumsum(1) - 1 + (width - lengths).unsqueeze(1)
    prompt = {key: value for key, value in batch.items() if key not in (*_SEQUENCE_FIELDS, "labels", "position_ids")}
    for key in _SEQUENCE_FIELDS:
        if key not in batch:
            continue
        value = batch[key]
        fill = pad_token_id if key == "input_ids" else 0
        out = torch.full((size, width), fill, dtype=value.dtype, device=value.device)
        out[rows[keep], column[keep]] = value[keep]
        prompt[key] = out
    return prompt, answer_tokens(labels)


def answer_tokens(labels: Tensor) -> Tensor:
    """``[B, T]``: each row's labelled tokens in order, -100 after them (``T``: the longest answer)."""
    answer = labels != IGNORE_INDEX
    rows, positions = answer.nonzero(as_tuple=True)
    answers = torch.full(
        (labels.shape[0], int(answer.sum(1).max())), IGNORE_INDEX, dtype=labels.dtype, device=labels.device
    )
    answers[rows, (answer.long().cumsum(1) - 1)[rows, positions]] = labels[rows, positions]
    return answers


_MOLMO2_FIELDS = ("video_token_pooling", "video_grids", "image_token_pooling", "image_grids", "image_num_crops")


def repeat_samples(
    batch: Mapping,
    times: int,
    *,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    spatial_merge_size: int | None = None,
) -> dict:
    """``batch`` with each sample repeated ``times`` times in a row (sample 0's copies, then sample 1's, ...): a
    GRPO step runs a prompt's samples as one batch.

    Per-sample fields (``[B, ...]``: ``input_ids``, ``attention_mask``, ``labels``, ``index``, ``oracle_mask``,
    LLaVA's ``pixel_values [B, C, H, W]``, ...) are repeated along their first dimension, ``position_ids [3, B, L]``
    along its second. Images that are not one per sample are dealt to the samples by their LM tokens, in order,
    against each row's count of ``image_token_id`` / ``video_token_id``, then repeated with their sample: LLaVA's
    ``pixel_values [images, C, H, W]`` (equal tokens per image) and Qwen2-VL's packed patches (``pixel_values`` with
    ``image_grid_thw``, ``pixel_values_videos`` with ``video_grid_thw``; ``t·h·w / spatial_merge_size²`` tokens per
    image). Molmo2's pooled layouts are refused.
    """
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ValueError(f"repeat_samples: times must be an integer >= 1, got {times!r}.")
    molmo2 = [key for key in _MOLMO2_FIELDS if key in batch]
    if molmo2:
        raise ValueError(
            f"repeat_samples: the batch holds Molmo2's pooled layout ({molmo2}), which it cannot repeat per sample; "
            "use LLaVA or Qwen2-VL batches."
        )
    ids = batch.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError("repeat_samples: the batch needs input_ids [B, L] (it counts the samples).")
    size = ids.shape[0]
    grids = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}
    token_ids = {"pixel_values": image_token_id, "pixel_values_videos": video_token_id}
    out = {}
    for key, value in batch.items():
        if key in grids and grids[key] in batch:  # Qwen2-VL's packed patches
            grid = batch[grids[key]].long()
            rows = grid.prod(-1)
            if spatial_merge_size is None:
                raise ValueError(
                    f"repeat_samples: batch[{key!r}] holds packed Qwen2-VL patches; pass spatial_merge_size (the "
                    "vision config's) so each image's tokens can be counted."
                )
            index, items = _deal(ids, token_ids[key], rows, rows // spatial_merge_size**2, times, key)
            out[key], out[grids[key]] = value[index.to(value.device)], batch[grids[key]][items.to(grid.device)]
        elif key in grids.values():
            continue  # repeated with its patches
        elif key == "pixel_values" and isinstance(value, Tensor) and value.dim() == 4 and value.shape[0] != size:
            images = value.shape[0]  # LLaVA with images not one per sample: equal tokens per image
            tokens = int((ids == image_token_id).sum()) // max(images, 1) if image_token_id is not None else 0
            ones = torch.ones(images, dtype=torch.long)
            index, _ = _deal(ids, image_token_id, ones, ones * tokens, times, key)
            out[key] = value[index.to(value.device)]
        elif key == "position_ids" and isinstance(value, Tensor) and value.dim() == 3:
            out[key] = value.repeat_interleave(times, dim=1)
        elif isinstance(value, Tensor) and value.dim() >= 1:
            if value.shape[0] != size:
                raise ValueError(
                    f"repeat_samples: batch[{key!r}] has {value.shape[0]} rows for {size} samples; give per-sample "
                    "fields [B, ...] (Qwen2-VL patches come with their grid_thw)."
                )
            out[key] = value.repeat_interleave(times, dim=0)
        elif isinstance(value, (list, tuple)) and len(value) == size:
            out[key] = type(value)(item for item in value for _ in range(times))
        else:
            out[key] = value
    return out


def _deal(
    ids: Tensor, token_id: int | None, rows: Tensor, tokens: Tensor, times: int, key: str
) -> tuple[Tensor, Tensor]:
    """Images (``rows[i]`` rows of the pixel tensor, ``tokens[i]`` LM tokens each, in order) dealt to the samples
    by each row's count of ``token_id``, then every sample's repeated ``times``: ``(pixel rows, image order)``."""
    if token_id is None:
        raise ValueError(
            f"repeat_samples: batch[{key!r}] does not hold one image per sample; pass image_token_id / "
            "video_token_id (the model config's) so each sample's images can be told apart."
        )
    rows, tokens = rows.cpu(), tokens.cpu()
    per_sample = (ids == token_id).sum(1).cpu()
    if int(tokens.sum()) != int(per_sample.sum()) or bool((tokens <= 0).any()):
        raise ValueError(
            f"repeat_samples: batch[{key!r}] holds images of {int(tokens.sum())} LM tokens in all but input_ids "
            f"hold {int(per_sample.sum())} tokens {token_id}; the images and the prompts do not match."
        )
    owner = torch.searchsorted(per_sample.cumsum(0), tokens.cumsum(0) - tokens, right=True)
    starts = rows.cumsum(0) - rows
    pixel_rows, order = [], []
    for sample in range(ids.shape[0]):
        images = (owner == sample).nonzero().flatten().tolist()
        for _ in range(times):
            order.extend(images)
            pixel_rows.extend(torch.arange(int(starts[i]), int(starts[i] + rows[i])) for i in images)
    index = torch.cat(pixel_rows) if pixel_rows else torch.zeros(0, dtype=torch.long)
    return index, torch.tensor(order, dtype=torch.long)
