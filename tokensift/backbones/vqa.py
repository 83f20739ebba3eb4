"""Answer accuracy of a (possibly pruned) multimodal LM on digit VQA (:mod:`tokensift.data.digit_vqa`).

Every answer is one token, so accuracy needs no decoding loop: the prompt (left-padded, ending in
``answer :``) goes through the model once and the prediction is the argmax of the next-token logits over
the answer vocabulary. ``generate(max_new_tokens=1)`` with every other token suppressed must pick the
same token; :func:`answer_accuracy` measures both, so a pruning hook that breaks generation (cache,
position ids) shows up as disagreement.

:func:`mllm_inputs` turns a :class:`~tokensift.data.digit_vqa.DigitVQACollator` batch into the keyword
arguments of a LLaVA or Qwen2-VL forward; the training recipe (:mod:`tokensift.backbones.pretrain_mllm`)
uses it too, so training, evaluation and generation see identical inputs.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from tokensift.data.digit_vqa import QUESTION_TYPES, DigitVQA, DigitVQACollator

__all__ = ["SUPPORTED_MODEL_TYPES", "answer_accuracy", "mllm_inputs", "padded_position_ids", "qwen2_vl_patches"]

SUPPORTED_MODEL_TYPES = ("llava", "qwen2_vl")


def padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding (0 for the first real token), as ``generate`` computes them.

    A plain forward numbers positions from the first column, padding included; passing these keeps a
    left-padded forward identical to the unpadded one and to ``generate``."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def qwen2_vl_patches(
    pixel_values: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, C, H, W] -> Qwen2-VL's flattened patches and ``image_grid_thw``.

    Same layout as ``Qwen2VLImageProcessor``: patches are ordered by merge window (row-major over
    windows, then row-major within a window), each flattened as (C, temporal, patch, patch) with a still
    image repeated ``temporal_patch_size`` times. Returns ``(patches [B * gh * gw, C * t * p * p],
    grid_thw [B, 3])``.
    """
    batch, channels, height, width = pixel_values.shape
    cell = patch_size * merge_size
    if height % cell or width % cell:
        raise ValueError(
            f"image of {height}x{width} px is not a whole number of {cell}-px merge windows "
            f"(patch_size {patch_size} x merge_size {merge_size}); resize the canvas or change patch_size"
        )
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = pixel_values.reshape(
        batch, channels, grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size
    )
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh/m, gw/m, m, m, C, p, p)
    patches = patches.unsqueeze(6).expand(*patches.shape[:6], temporal_patch_size, patch_size, patch_size)
    flat = patches.reshape(batch * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    grid_thw = torch.tensor([[1, grid_h, grid_w]] * batch, dtype=torch.long, device=pixel_values.device)
    return flat, grid_thw


def mllm_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor], generation: bool = False) -> dict:
    """Forward keyword arguments for ``model`` from a digit-VQA batch (no ``labels``).

    LLaVA: ``input_ids``, ``attention_mask``, ``pixel_values`` and, unless ``generation`` (``generate``
    derives the same itself), padding-aware ``position_ids``. Qwen2-VL: ``pixel_values`` as flattened
    patches, ``image_grid_thw`` and ``mm_token_type_ids`` (1 at image tokens); it computes its own
    multimodal rotary positions from the attention mask.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if model_type == "llava":
        inputs["pixel_values"] = batch["pixel_values"]
        if not generation:
            inputs["position_ids"] = padded_position_ids(batch["attention_mask"])
    elif model_type == "qwen2_vl":
        vision = model.config.vision_config
        inputs["pixel_values"], inputs["image_grid_thw"] = qwen2_vl_patches(
            batch["pixel_values"], vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        )
        inputs["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).long()
    else:
        raise ValueError(
            f"model_type {model_type!r} is not supported for digit VQA; use one of {list(SUPPORTED_MODEL_TYPES)}"
        )
    return inputs


@torch.no_grad()
def answer_accuracy(
    model: torch.nn.Module,
    dataset: DigitVQA,
    batch_size: int = 64,
    generate: bool = True,
    max_samples: int | None = None,
) -> dict:
    """Accuracy of ``model`` on ``dataset`` by a single forward on the prompt and by ``generate``.

    Args:
        model: a LLaVA or Qwen2-VL ``...ForConditionalGeneration`` (pruning hooks may be attached); it is
            put in eval mode and restored afterwards.
        dataset: a :class:`DigitVQA` split whose tokenizer and image-token count match the model.
        batch_size: prompts per forward.
        generate: also run ``generate(max_new_tokens=1)`` (greedy, non-answer tokens suppressed).
        max_samples: evaluate the first ``max_samples`` samples only.

    Returns:
        ``{"accuracy", "generate_accuracy" (None without ``generate``), "agreement"`` (fraction of samples
        where both predictions are the same token; None without ``generate``), ``"per_type"``
        (question type -> forward accuracy), ``"num_samples"}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    if count < 1:
        raise ValueError(f"nothing to evaluate: dataset has {len(dataset)} samples, max_samples={max_samples}")
    tokenizer = dataset.tokenizer
    answer_ids = torch.tensor(dataset.answer_token_ids, dtype=torch.long)
    suppressed = sorted(set(range(len(tokenizer))) - set(answer_ids.tolist()))
    collate = DigitVQACollator(tokenizer.pad_token_id, padding_side="left", with_answer=False)
    subset = torch.utils.data.Subset(dataset, range(count))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(QUESTION_TYPES))
    seen = torch.zeros(len(QUESTION_TYPES))
    generated_correct = agree = 0
    try:
        for batch in DataLoader(subset, batch_size=batch_size, collate_fn=collate):
            batch = {key: value.to(device) for key, value in batch.items()}
            logits = model(**mllm_inputs(model, batch)).logits[:, -1]
            predicted = answer_ids.to(device)[logits[:, answer_ids.to(device)].argmax(-1)]
            hit = (predicted == batch["answer_id"]).float().cpu()
            kinds = batch["question_type"].cpu()
            correct.index_add_(0, kinds, hit)
            seen.index_add_(0, kinds, torch.ones_like(hit))
            if generate:
                output = model.generate(
                    **mllm_inputs(model, batch, generation=True),
                    max_new_tokens=1,
                    do_sample=False,
                    suppress_tokens=suppressed,
                    pad_token_id=tokenizer.pad_token_id,
                )
                chosen = output[:, -1]
                generated_correct += int((chosen == batch["answer_id"]).sum())
                agree += int((chosen == predicted).sum())
    finally:
        model.train(was_training)
    per_type = {name: float(correct[i] / seen[i]) for i, name in enumerate(QUESTION_TYPES) if seen[i] > 0}
    return {
        "accuracy": float(correct.sum() / seen.sum()),
        "generate_accuracy": generated_correct / count if generate else None,
        "agreement": agree / count if generate else None,
        "per_type": per_type,
        "num_samples": count,
    }
