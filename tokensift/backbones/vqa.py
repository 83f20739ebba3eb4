"""Answer accuracy of a (possibly pruned) multimodal LM on a VQA data module (the VQA batch contract,
:mod:`tokensift.data.contract`; digit VQA and shape VQA are two such tasks).

A batch carries the prompt and the answer's tokens (``labels``). The prompt (every row's tokens before its
answer, left-padded, ending where the answer starts) goes through the model once; a one-token answer is the
argmax of the next-token logits (over the data's answer vocabulary when it has one), a longer one is read off
the teacher-forced pass at every label position (the forward accuracy) and decoded by ``generate``
(the generate accuracy). :func:`answer_accuracy` measures both, so a pruning hook that breaks generation
(cache, position ids) shows up as disagreement.

:func:`mllm_inputs` turns a contract batch into the keyword arguments of a LLaVA or Qwen2-VL forward; the
training recipe (:mod:`tokensift.backbones.pretrain_mllm`) and the bench use it too, so training, evaluation
and generation see identical inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from tokensift.data.contract import check_vqa_batch, split_answers
from tokensift.data.vqa import IGNORE_INDEX, VQACollator, qwen2_vl_patches

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "answer_accuracy",
    "answer_ids_of",
    "answers_correct",
    "generate_answers",
    "mllm_inputs",
    "model_family",
    "pad_token_id_of",
    "padded_position_ids",
    "qwen2_vl_patches",
    "restricted_argmax",
    "teacher_forced_answers",
    "visual_token_id",
]

SUPPORTED_MODEL_TYPES = ("llava", "qwen2_vl", "molmo2")
VIDEO_INPUTS = {
    "qwen2_vl": ("pixel_values_videos", "video_grid_thw"),
    "molmo2": ("pixel_values_videos", "video_token_pooling", "video_grids"),
}
"""The processor's video fields each family's forward takes (tokensift.data.video_vqa writes them)."""


def model_family(model: torch.nn.Module) -> str:
    """``llava`` or ``qwen2_vl``: the model's ``config.model_type``, refused with the supported list otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported for VQA; use one of {list(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding (0 for the first real token), as ``generate`` computes them.

    A plain forward numbers positions from the first column, padding included; passing these keeps a
    left-padded forward identical to the unpadded one and to ``generate``."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def visual_token_id(model: torch.nn.Module, batch: dict) -> int:
    """The placeholder of the batch's visual tokens: the model's video token in a video batch (Qwen2-VL's differs
    from its image token)."""
    config = model.config
    if batch.get("pixel_values_videos") is not None:
        return int(getattr(config, "video_token_id", config.image_token_id))
    return int(config.image_token_id)


def mllm_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor], generation: bool = False) -> dict:
    """Forward keyword arguments for ``model`` from a VQA batch (no ``labels``).

    Video batches (``pixel_values_videos``; Qwen2-VL and Molmo2): the processor's video fields
    (:data:`VIDEO_INPUTS`) and ``mm_token_type_ids`` as they are, plus Molmo2's padding-aware ``position_ids``.
    LLaVA: ``input_ids``, ``attention_mask``, ``pixel_values`` and, unless ``generation`` (``generate``
    derives the same itself), padding-aware ``position_ids``. Qwen2-VL: the processor's ``pixel_values`` and
    ``image_grid_thw`` as they are, or images ``[B, C, H, W]`` patched with the model's vision config, and
    ``mm_token_type_ids`` (1 at image tokens) when the batch has none; it computes its own multimodal rotary
    positions from the attention mask.
    """
    model_type = model_family(model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "pixel_values_videos" in batch:  # a video batch: the processor's fields as they are
        inputs.update({key: batch[key] for key in VIDEO_INPUTS.get(model_type, ("pixel_values_videos",))})
        inputs["mm_token_type_ids"] = batch["mm_token_type_ids"]
        if model_type == "molmo2" and not generation:  # 1-D positions, as llava's
            inputs["position_ids"] = padded_position_ids(batch["attention_mask"])
        return inputs
    if model_type == "llava":
        inputs["pixel_values"] = batch["pixel_values"]
        if not generation:
            inputs["position_ids"] = padded_position_ids(batch["attention_mask"])
    else:
        if "image_grid_thw" in batch:
            inputs["pixel_values"], inputs["image_grid_thw"] = batch["pixel_values"], batch["image_grid_thw"]
        else:
            vision = model.config.vision_config
            inputs["pixel_values"], inputs["image_grid_thw"] = qwen2_vl_patches(
                batch["pixel_values"], vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
            )
        types = batch.get("mm_token_type_ids")
        inputs["mm_token_type_ids"] = (
            (batch["input_ids"] == model.config.image_token_id).long() if types is None else types
        )
    return inputs


def restricted_argmax(logits: Tensor, answer_ids: Tensor | None) -> Tensor:
    """Token ids of the argmax of ``logits [..., V]``, over ``answer_ids`` only when given."""
    if answer_ids is None:
        return logits.argmax(-1)
    answer_ids = answer_ids.to(logits.device)
    return answer_ids[logits[..., answer_ids].argmax(-1)]


def teacher_forced_answers(logits: Tensor, labels: Tensor, answer_ids: Tensor | None = None) -> Tensor:
    """``[B, T]``: the prediction at each answer token of a teacher-forced pass (``logits [B, L, V]`` of the
    whole sequence; the token at ``t`` is predicted at ``t - 1``), -100 after each row's answer."""
    answer = labels != IGNORE_INDEX
    size = labels.shape[0]
    counts = answer.sum(1)
    rows, positions = answer.nonzero(as_tuple=True)
    rank = (answer.long().cumsum(1) - 1)[rows, positions]
    out = torch.full((size, int(counts.max())), IGNORE_INDEX, dtype=torch.long, device=labels.device)
    out[rows, rank] = restricted_argmax(logits[rows, positions - 1], answer_ids).to(labels.device)
    return out


def answers_correct(predicted: Tensor, answers: Tensor) -> Tensor:
    """``[B]`` bool: every answer token right (``answers`` -100 after each row's answer)."""
    width = answers.shape[1]
    if predicted.shape[1] < width:
        predicted = torch.nn.functional.pad(predicted, (0, width - predicted.shape[1]), value=IGNORE_INDEX - 1)
    return ((predicted[:, :width] == answers) | (answers == IGNORE_INDEX)).all(1)


def _suppressed(model: torch.nn.Module, answer_ids: Tensor | None) -> list[int] | None:
    if answer_ids is None:
        return None
    vocabulary = int(model.get_input_embeddings().weight.shape[0])
    return sorted(set(range(vocabulary)) - set(answer_ids.tolist()))


def generate_answers(
    model: torch.nn.Module, prompt: dict, length: int, answer_ids: Tensor | None = None, pad_token_id: int = 0
) -> Tensor:
    """``[B, length]``: greedy ``generate`` after the prompt batch (tokens outside ``answer_ids`` suppressed);
    rows that stopped early are filled with -101 (never an answer token)."""
    output = model.generate(
        **mllm_inputs(model, prompt, generation=True),
        max_new_tokens=length,
        do_sample=False,
        suppress_tokens=_suppressed(model, answer_ids),
        pad_token_id=pad_token_id,
    )
    new = output[:, prompt["input_ids"].shape[1] :]
    if new.shape[1] < length:
        new = torch.nn.functional.pad(new, (0, length - new.shape[1]), value=IGNORE_INDEX - 1)
    return new


def pad_token_id_of(data: Any, model: torch.nn.Module | None = None) -> int:
    """The pad id prompts are re-padded with: the data's, its tokenizer's, else the model's generation config's."""
    for source in (data, getattr(data, "tokenizer", None)):
        value = getattr(source, "pad_token_id", None)
        if value is not None:
            return int(value)
    value = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    return 0 if value is None else int(value)


def answer_ids_of(data: Any) -> Tensor | None:
    """The data's closed answer vocabulary (``answer_token_ids``) as a tensor, or ``None`` (every token)."""
    ids = getattr(data, "answer_token_ids", None)
    return None if ids is None else torch.as_tensor(list(ids), dtype=torch.long)


def _evaluation_split(data: Any) -> tuple[Dataset, Any]:
    """The test split and its collate function from a data module, or a split and its collator."""
    from lightning.pytorch import LightningDataModule

    if isinstance(data, LightningDataModule):
        data.setup("test")
        dataset = getattr(data, "test_dataset", None)
        if dataset is None:
            raise ValueError(f"{type(data).__name__} built no test_dataset in setup('test')")
        return dataset, getattr(data, "collate_fn", None) or data.test_dataloader().collate_fn
    if hasattr(data, "collator"):
        return data, data.collator()
    tokenizer = getattr(data, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"{type(data).__name__}: give a VQA data module, or a split with collator() or a tokenizer")
    return data, VQACollator(tokenizer.pad_token_id)


@torch.no_grad()
def answer_accuracy(
    model: torch.nn.Module,
    dataset: Any,
    batch_size: int = 64,
    generate: bool = True,
    max_samples: int | None = None,
) -> dict:
    """Accuracy of ``model`` on a VQA test split by a forward on the prompt and by ``generate``.

    Args:
        model: a LLaVA or Qwen2-VL ``...ForConditionalGeneration`` (pruning hooks may be attached); it is
            put in eval mode and restored afterwards.
        dataset: a VQA data module (its test split and collate function) or a split (its ``collator()``)
            whose tokenizer and image-token count match the model; batches follow the VQA batch contract.
        batch_size: samples per forward.
        generate: also run greedy ``generate`` for as many tokens as the longest answer of the batch (tokens
            outside the data's ``answer_token_ids`` suppressed).
        max_samples: evaluate the first ``max_samples`` samples only.

    Returns:
        ``{"accuracy", "generate_accuracy" (None without ``generate``), "agreement"`` (fraction of samples
        where both predictions are the same tokens; None without ``generate``), ``"per_type"``
        (question type -> forward accuracy, when batches carry ``question_type``), ``"num_samples"}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    split, collate = _evaluation_split(dataset)
    count = len(split) if max_samples is None else min(max_samples, len(split))
    if count < 1:
        raise ValueError(f"nothing to evaluate: dataset has {len(split)} samples, max_samples={max_samples}")
    family = model_family(model)
    answer_ids = answer_ids_of(dataset) if hasattr(dataset, "answer_token_ids") else answer_ids_of(split)
    pad = pad_token_id_of(dataset, model)
    names: Sequence[str] = tuple(
        getattr(dataset, "question_type_names", None) or getattr(split, "question_type_names", ())
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros(max(1, len(names)))
    seen = torch.zeros(max(1, len(names)))
    hits = generated_correct = agree = 0
    subset = torch.utils.data.Subset(split, range(count))
    try:
        for number, batch in enumerate(DataLoader(subset, batch_size=batch_size, collate_fn=collate)):
            batch = {key: value.to(device) if isinstance(value, Tensor) else value for key, value in batch.items()}
            if number == 0:
                check_vqa_batch(batch, family, image_token_id=visual_token_id(model, batch))
            prompt, answers = split_answers(batch, pad)
            logits = model(**mllm_inputs(model, prompt)).logits[:, -1]
            predicted = restricted_argmax(logits, answer_ids).unsqueeze(1)
            if answers.shape[1] > 1:  # later tokens: the teacher-forced pass at each label position
                full = model(**mllm_inputs(model, batch)).logits
                predicted = torch.cat([predicted, teacher_forced_answers(full, batch["labels"], answer_ids)[:, 1:]], 1)
            hit = answers_correct(predicted, answers).float().cpu()
            hits += int(hit.sum())
            if names and "question_type" in batch:
                kinds = batch["question_type"].cpu()
                correct.index_add_(0, kinds, hit)
                seen.index_add_(0, kinds, torch.ones_like(hit))
            if generate:
                chosen = generate_answers(model, prompt, answers.shape[1], answer_ids, pad)
                generated_correct += int(answers_correct(chosen, answers).sum())
                same = (chosen == predicted) | (answers == IGNORE_INDEX)
                agree += int(same.all(1).sum())
    finally:
        model.train(was_training)
    per_type = {name: float(correct[i] / seen[i]) for i, name in enumerate(names) if seen[i] > 0}
    return {
        "accuracy": hits / count,
        "generate_accuracy": generated_correct / count if generate else None,
        "agreement": agree / count if generate else None,
        "per_type": per_type,
        "num_samples": count,
    }
