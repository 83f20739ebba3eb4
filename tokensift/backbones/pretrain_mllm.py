"""Train a tiny multimodal LM from scratch on digit VQA and ``save_pretrained`` it: an MLLM that has learned
something, for token pruners to be measured on with real accuracy numbers.

No vision-language weights ship offline. This recipe builds a LLaVA (CLIP vision tower -> MLP projector
-> Llama LM) or a Qwen2-VL (its own vision tower with 2x2 patch merging -> Qwen2 LM) from config, with
the word-level vocabulary of :mod:`tokensift.data.digit_vqa`, and trains every weight end to end on the
task's answer token plus a word-embedding alignment of the image tokens (see :class:`MLLMPretrainer`).
The saved directory loads with ``from_pretrained(local_files_only=True)`` (:func:`load_mllm`) and holds
the tokenizer and image processor that rebuild the model's inputs from a raw canvas and a question (for
LLaVA also a ``LlavaProcessor``), plus ``tokensift_mllm.json``: the test accuracy by forward and by
``generate``, the text-only baseline it has to beat, the training time and the data options that rebuild
the evaluation split.

Usage::

    out, accuracy = pretrain_mllm("runs/mllm", DigitVQADataModule(), family="llava")
    model, tokenizer, image_processor, report = load_mllm(out)

Measured at the defaults by ``make demo-vqa`` (LLaVA: CLIP d64 x 2 layers, Llama d64 x 3 layers, 218k
parameters; one pass over 65,536 questions, 2,048 steps of batch 32; seed 0; one thread): test accuracy 68.75 %
(position 43.7 %, count 74.3 %, exists 89.1 %) against 28.7 % for the best text-only answerer, in 222 s; a
second run gave bit-identical weights.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import lightning as L
import torch

from tokensift.backbones.vqa import answer_accuracy, mllm_inputs
from tokensift.data.digit_vqa import IGNORE_INDEX, DigitVQA, DigitVQADataModule, build_image_processor
from tokensift.io import atomic_directory, check_replaceable
from tokensift.trainer.schedule import warmup_cosine

__all__ = [
    "FAMILIES",
    "REPORT",
    "MLLMPretrainer",
    "build_image_processor_for",
    "build_mllm",
    "load_mllm",
    "pretrain_mllm",
    "text_only_baseline",
]

REPORT = "tokensift_mllm.json"  # what the recipe measured, beside the weights
FAMILIES = ("llava", "qwen2_vl")
QWEN2_VL_MERGE = 2  # Qwen2-VL merges 2x2 vision patches into one LM token


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")


def build_mllm(
    family: str,
    data: DigitVQADataModule,
    *,
    vision_hidden_size: int = 64,
    vision_layers: int = 2,
    text_hidden_size: int = 64,
    text_layers: int = 3,
    num_attention_heads: int = 4,
):
    """A randomly initialised ``LlavaForConditionalGeneration`` or ``Qwen2VLForConditionalGeneration``
    whose vocabulary, image token and geometry match ``data``.

    LLaVA: a CLIP vision tower with ``data.patch_size`` patches (its [CLS] is dropped, strategy
    ``default``), so one LM image token per data patch. Qwen2-VL: vision patches of half the data patch,
    merged 2x2, so again one LM token per data patch (``data.num_image_tokens`` must equal
    ``data.num_patches`` for either), in raster order of the data's patch grid. MLP widths are twice the
    hidden sizes; the LM ties its input and output embeddings.
    """
    _check_family(family)
    for name, value in (
        ("vision_hidden_size", vision_hidden_size),
        ("text_hidden_size", text_hidden_size),
    ):
        if value % num_attention_heads:
            raise ValueError(f"{name} ({value}) must be divisible by num_attention_heads ({num_attention_heads})")
    if data.num_image_tokens != data.num_patches:
        raise ValueError(
            f"data.num_image_tokens ({data.num_image_tokens}) must equal data.num_patches ({data.num_patches}): "
            f"both families give one LM token per data patch; build the data module with num_image_tokens=None"
        )
    tokenizer = data.tokenizer
    special = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden_size,
        intermediate_size=2 * text_hidden_size,
        num_hidden_layers=text_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        **special,
    )
    if family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        vision = CLIPVisionConfig(
            hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size,
            num_hidden_layers=vision_layers,
            num_attention_heads=num_attention_heads,
            image_size=data.image_size,
            patch_size=data.patch_size,
            num_channels=data.num_channels,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**text),
            image_token_id=data.image_token_id,
            image_seq_length=data.num_image_tokens,
            vision_feature_layer=-1,  # the tower is tiny: its last layer is the most digit-aware
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            tie_word_embeddings=True,
        )
        model = LlavaForConditionalGeneration(config)
    else:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        if data.patch_size % QWEN2_VL_MERGE:
            raise ValueError(
                f"data.patch_size ({data.patch_size}) must be even for qwen2_vl: each LM token merges 2x2 "
                f"vision patches of patch_size / 2 pixels"
            )
        head_dim = text_hidden_size // num_attention_heads
        if head_dim % 2:
            raise ValueError(f"text_hidden_size / num_attention_heads ({head_dim}) must be even for rotary positions")
        half = head_dim // 2  # multimodal RoPE splits the rotary frequencies between time, height and width
        mrope_section = [half - 2 * (half // 3), half // 3, half // 3]
        vision = dict(
            depth=vision_layers,
            embed_dim=vision_hidden_size,
            hidden_size=text_hidden_size,
            num_heads=num_attention_heads,
            mlp_ratio=2,
            in_channels=data.num_channels,
            patch_size=data.patch_size // QWEN2_VL_MERGE,
            spatial_merge_size=QWEN2_VL_MERGE,
            temporal_patch_size=2,
        )
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section}
        config = Qwen2VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=data.image_token_id,
            # No video, and no vision start/end markers in this vocabulary: point them at unused ids.
            video_token_id=tokenizer.unk_token_id,
            vision_start_token_id=tokenizer.unk_token_id,
            vision_end_token_id=tokenizer.unk_token_id,
            tie_word_embeddings=True,
        )
        model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_image_processor_for(family: str, data: DigitVQADataModule):
    """The image processor that turns a raw canvas ([C, H, W], grey levels 0..16) into this family's
    ``pixel_values`` exactly as :class:`DigitVQA` and :func:`~tokensift.backbones.vqa.mllm_inputs` build them:
    normalised images for LLaVA, Qwen2-VL's flattened patches (and ``image_grid_thw``) for Qwen2-VL."""
    _check_family(family)
    image_processor = build_image_processor(data.num_channels)
    if family == "llava":
        return image_processor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = data.image_size**2
    return Qwen2VLImageProcessorPil(
        do_resize=False,
        do_rescale=True,
        rescale_factor=image_processor.rescale_factor,
        do_normalize=True,
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
        do_convert_rgb=False,
        patch_size=data.patch_size // QWEN2_VL_MERGE,
        merge_size=QWEN2_VL_MERGE,
        temporal_patch_size=2,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )


def _save_input_pipeline(family: str, data: DigitVQADataModule, out: Path) -> None:
    """Write the tokenizer and image processor; for LLaVA also a ``LlavaProcessor`` (``AutoProcessor``
    then rebuilds the prompt with its image tokens). ``Qwen2VLProcessor`` cannot be built without
    torchvision (it insists on a video processor), so Qwen2-VL gets the two parts only."""
    image_processor = build_image_processor_for(family, data)
    data.tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    if family == "llava":
        from transformers import LlavaProcessor

        LlavaProcessor(
            image_processor=image_processor,
            tokenizer=data.tokenizer,
            patch_size=data.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's [CLS], dropped by the "default" strategy
        ).save_pretrained(out)


def load_mllm(path: str | os.PathLike):
    """Load a directory written by :func:`pretrain_mllm`.

    Returns ``(model in eval mode, tokenizer, image processor, report)``; the report's ``data`` entry
    rebuilds the data module the model was trained and tested on (``DigitVQADataModule(**report["data"])``).
    """
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoTokenizer,
        LlavaForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    path = Path(path)
    if not (path / REPORT).is_file():
        raise FileNotFoundError(f"{path} holds no {REPORT}; pass a directory written by pretrain_mllm")
    classes = {"llava": LlavaForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}
    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    if model_type not in classes:
        raise ValueError(f"{path} holds a {model_type!r} model; expected one of {sorted(classes)}")
    model = classes[model_type].from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    return model, tokenizer, image_processor, json.loads((path / REPORT).read_text())


def text_only_baseline(train: DigitVQA, test: DigitVQA) -> float:
    """Accuracy on ``test`` of the best image-blind answerer learnable from ``train``: the most frequent
    training answer to each exact question text (falling back to the question type's most frequent)."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    by_type: dict[str, Counter] = defaultdict(Counter)
    for i in range(len(train)):
        spec = train.sample_spec(i)
        by_question[train.question(spec)][spec.answer] += 1
        by_type[spec.question_type][spec.answer] += 1
    hits = 0
    for i in range(len(test)):
        spec = test.sample_spec(i)
        votes = by_question.get(test.question(spec)) or by_type.get(spec.question_type) or Counter({"": 1})
        hits += votes.most_common(1)[0][0] == spec.answer
    return hits / len(test)


class MLLMPretrainer(L.LightningModule):
    """Trains every weight of a :func:`build_mllm` model on the answer token (cross-entropy over the
    vocabulary at the answer position; every other position is labelled -100), plus an alignment loss.

    Alignment loss (weight ``alignment_loss_weight``): each image token's LM input embedding (the
    projected vision feature) is scored against the LM's own word embeddings, and must pick the word of
    the digit inking its patch (among ``0``..``9``; background patches are skipped), the word for its
    canvas row half (``top`` / ``bottom``) and the one for its column half (``left`` / ``right``). So
    image tokens come to point where the question's words point, and, with tied embeddings, where the
    answer is read out. One answer token per sample is a weak, entangled signal for a vision tower
    trained from scratch on 2-4 digit scenes: at the default size a run without this term stayed at
    chance for 750 steps, and a run with an untied class probe only reached 54 % at 1,500 steps. Real
    LLaVAs start from a pretrained CLIP and a projector aligned to the LM's embeddings; this term does that
    job on the task's own training split. It adds no parameters, so the saved model is a plain HF model.

    ``val/acc`` is the answer accuracy read off the same teacher-forced forward: the logits one position
    before the answer, argmax over the answer words (causal attention makes this the prompt-only forward).
    """

    def __init__(
        self,
        family: str,
        data: DigitVQADataModule,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.05,
        alignment_loss_weight: float = 1.0,
        **model_kwargs,
    ):
        super().__init__()
        if alignment_loss_weight < 0:
            raise ValueError(f"alignment_loss_weight must be >= 0, got {alignment_loss_weight}")
        self.save_hyperparameters(ignore=["data"])
        self.model = build_mllm(family, data, **model_kwargs)
        self.image_token_id = data.image_token_id
        words = data.tokenizer.convert_tokens_to_ids
        self.register_buffer("answer_token_ids", torch.tensor(data.answer_token_ids), persistent=False)
        self.register_buffer("digit_word_ids", torch.tensor(words([str(d) for d in range(10)])), persistent=False)
        self.register_buffer("row_word_ids", torch.tensor(words(["top", "bottom"])), persistent=False)
        self.register_buffer("column_word_ids", torch.tensor(words(["left", "right"])), persistent=False)
        # One LM image token per data patch, in raster order, for both families (see build_mllm).
        row, column = torch.arange(data.num_patches) // data.grid_size, torch.arange(data.num_patches) % data.grid_size
        half = data.grid_size // 2  # the grid is even: quadrants are whole patches
        self.register_buffer("patch_row_half", (row >= half).long(), persistent=False)
        self.register_buffer("patch_column_half", (column >= half).long(), persistent=False)

    def alignment_loss(self, image_states: torch.Tensor, patch_classes: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of image tokens [B, P, D] against the word embeddings of their digit and quadrant."""
        words = self.model.get_input_embeddings().weight
        batch = image_states.shape[0]

        def choose(word_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logits = (image_states @ words[word_ids].T).flatten(0, 1)
            return torch.nn.functional.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE_INDEX)

        return (
            choose(self.digit_word_ids, patch_classes)
            + choose(self.row_word_ids, self.patch_row_half.expand(batch, -1))
            + choose(self.column_word_ids, self.patch_column_half.expand(batch, -1))
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        weight = self.hparams.alignment_loss_weight
        outputs = self.model(**mllm_inputs(self.model, batch), labels=batch["labels"], output_hidden_states=weight > 0)
        size = batch["input_ids"].shape[0]
        loss = outputs.loss
        self.log("train/answer_loss", loss, batch_size=size)
        if weight > 0:
            embeddings = outputs.hidden_states[0]  # the LM's input: image features spliced into the text
            image_states = embeddings[batch["input_ids"] == self.image_token_id].reshape(size, -1, embeddings.shape[-1])
            alignment = self.alignment_loss(image_states, batch["patch_classes"])
            self.log("train/alignment_loss", alignment, batch_size=size)
            loss = loss + weight * alignment
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.model(**mllm_inputs(self.model, batch)).logits
        answer_position = (batch["labels"] != IGNORE_INDEX).long().argmax(-1)
        rows = torch.arange(logits.shape[0], device=logits.device)
        scores = logits[rows, answer_position - 1][:, self.answer_token_ids]
        predicted = self.answer_token_ids[scores.argmax(-1)]
        accuracy = (predicted == batch["answer_id"]).float().mean()
        self.log("val/acc", accuracy, prog_bar=True, batch_size=logits.shape[0])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = warmup_cosine(optimizer, total, warmup_fraction=self.hparams.warmup_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def pretrain_mllm(
    out_dir: str | os.PathLike,
    data: DigitVQADataModule,
    max_epochs: int = 1,
    trainer_kwargs: dict | None = None,
    seed: int = 0,
    family: str = "llava",
    eval_batch_size: int = 128,
    torch_threads: int | None = 1,
    **model_kwargs,
) -> tuple[Path, float]:
    """Train a tiny ``family`` MLLM on ``data``'s train split and ``save_pretrained`` it to ``out_dir``.

    Args:
        out_dir: written atomically: model weights and config, the processor (tokenizer + image processor)
            and ``tokensift_mllm.json``. It must be absent, empty, or an earlier output of this function (it holds
            ``tokensift_mllm.json``); any other directory is refused before training.
        data: the digit-VQA data module (its geometry and vocabulary shape the model).
        max_epochs: passes over ``data``'s train split (the default data module's 65,536 samples at batch
            32 make one pass 2,048 steps).
        trainer_kwargs: extra ``lightning.Trainer`` arguments (e.g. ``limit_train_batches``).
        seed: seeds weights, data order and dropout; the same seed and data give the same model.
        family: ``llava`` or ``qwen2_vl``.
        eval_batch_size: batch size of the final test evaluation.
        torch_threads: intra-op threads while training and evaluating (restored afterwards). Float sums split
            over a different number of threads round differently, so the weights are bit-reproducible only at
            a fixed count: 1 by default (``None`` keeps the process's setting).
        **model_kwargs: :func:`build_mllm` sizes and :class:`MLLMPretrainer` ``lr`` / ``weight_decay`` /
            ``warmup_fraction`` / ``alignment_loss_weight``.

    Returns:
        ``(out_dir, test accuracy)``, the accuracy by a single forward on each test prompt.
    """
    _check_family(family)
    out = Path(out_dir)
    check_replaceable(out, REPORT, "trained MLLM")  # refuse a wrong path before training, not after
    threads_before = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        return _pretrain(out, data, max_epochs, trainer_kwargs, seed, family, eval_batch_size, model_kwargs)
    finally:
        torch.set_num_threads(threads_before)


def _pretrain(out, data, max_epochs, trainer_kwargs, seed, family, eval_batch_size, model_kwargs):
    L.seed_everything(seed, workers=True)
    module = MLLMPretrainer(family, data, **model_kwargs)
    trainer = L.Trainer(
        **{
            "max_epochs": max_epochs,
            "logger": False,
            "enable_checkpointing": False,
            "gradient_clip_val": 1.0,
            **(trainer_kwargs or {}),
        }
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_seconds = time.perf_counter() - started
    data.setup("test")
    model = module.model.eval()
    result = answer_accuracy(model, data.test_dataset, batch_size=eval_batch_size)
    baseline = text_only_baseline(data.train_dataset or data.build("train"), data.test_dataset)
    report = {
        "family": family,
        "test_accuracy": result["accuracy"],
        "test_generate_accuracy": result["generate_accuracy"],
        "forward_generate_agreement": result["agreement"],
        "test_accuracy_per_type": result["per_type"],
        "test_samples": result["num_samples"],
        "text_only_baseline": baseline,
        "train_seconds": round(train_seconds, 1),
        "train_steps": int(trainer.global_step),
        "max_epochs": max_epochs,
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "model": {key: value for key, value in module.hparams.items() if key != "family"},
        "data": {key: list(v) if isinstance(v, tuple) else v for key, v in dict(data.hparams).items()},
        "torch_threads": torch.get_num_threads(),
    }
    with atomic_directory(out, REPORT, "trained MLLM") as tmp:
        model.save_pretrained(tmp)
        _save_input_pipeline(family, data, tmp)
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
    return out, float(result["accuracy"])
