"""Train a tiny multimodal LM from scratch on a VQA task (digit VQA, shape VQA or any data module of the VQA
batch contract) and ``save_pretrained`` it: an MLLM that has learned something, for token pruners to be
measured on with real accuracy numbers.

No vision-language weights ship offline. This recipe builds a LLaVA (CLIP vision tower -> MLP projector
-> Llama LM) or a Qwen2-VL (its own vision tower with 2x2 patch merging -> Qwen2 LM) from config, with
the data module's word-level vocabulary, and trains every weight end to end on the task's answer tokens
plus, when the data module names targets for it, a word-embedding alignment of the image tokens (see
:class:`MLLMPretrainer`). Any data module whose batches follow the VQA batch contract
(:mod:`tokensift.data.contract`) and that exposes the model-building attributes works:
:class:`~tokensift.data.DigitVQADataModule`, :class:`~tokensift.data.ShapeVQADataModule`.
The saved directory loads with ``from_pretrained(local_files_only=True)`` (:func:`load_mllm`) and holds
the tokenizer and image processor that rebuild the model's inputs from a raw canvas and a question (for
LLaVA also a ``LlavaProcessor``), plus ``tokensift_mllm.json``: the test accuracy by forward and by
``generate``, the text-only baseline it has to beat, the training time and the data options that rebuild
the evaluation split.

Video: on a video data module (:class:`~tokensift.data.VideoDigitVQADataModule`, one video per sample) the recipe
builds a Qwen2-VL (video patches merged 2x2 over a temporal patch of 2) or a Molmo2 (``Molmo2ForConditionalGeneration``:
its ViT per frame, the adapter pooling 3x3 patch windows read from the last tower block, its LM) and trains it the
same way, the alignment term naming the digit in each visual token; ``configs/pretrain_video_molmo2.yaml`` and
``configs/pretrain_video_qwen2_vl.yaml`` are the recipes. The video processors need torchvision, so the saved folder
holds the tokenizer only; the report's data options rebuild the inputs with the data module's collator.

Usage::

    out, accuracy = pretrain_mllm("runs/mllm", DigitVQADataModule(), family="llava")
    model, tokenizer, image_processor, report = load_mllm(out)

or from the command line, with the data module named by class path (and init args)::

    tokensift pretrain-mllm --out runs/shape_llava --data tokensift.data.ShapeVQADataModule

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
from typing import Any

import lightning as L
import torch

from tokensift.backbones.vqa import answer_accuracy, answer_ids_of, answers_correct, mllm_inputs, teacher_forced_answers
from tokensift.data.contract import answer_tokens, check_vqa_batch
from tokensift.data.resolve import resolve_datamodule
from tokensift.data.vqa import FAMILIES, IGNORE_INDEX, IMAGE_TOKEN, QWEN2_VL_MERGE, QWEN2_VL_TEMPORAL, check_family
from tokensift.io import atomic_directory, check_replaceable
from tokensift.schedule import warmup_cosine

__all__ = [
    "FAMILIES",
    "REPORT",
    "MLLMPretrainer",
    "build_image_processor_for",
    "build_mllm",
    "load_mllm",
    "pretrain_mllm",
    "pretrain_mllm_command",
    "text_only_baseline",
]

REPORT = "tokensift_mllm.json"  # what the recipe measured, beside the weights
MODEL_DATA_ATTRIBUTES = (
    "tokenizer",
    "image_token_id",
    "image_size",
    "patch_size",
    "num_channels",
    "num_patches",
    "num_image_tokens",
)
"""What :func:`build_mllm` reads off a data module to shape the model (the batches follow the VQA contract)."""
VIDEO_DATA_ATTRIBUTES = (
    "tokenizer",
    "image_token_id",
    "image_size",
    "patch_size",
    "num_channels",
    "max_frames",
    "tokens_per_frame",
    "family",
)
"""What :func:`build_mllm` reads off a video data module (:class:`~tokensift.data.video_vqa.VideoDigitVQADataModule`):
frames of ``image_size`` px cut into ``patch_size`` patches, ``family``'s layout, the visual placeholder."""
MLLM_FAMILIES = (*FAMILIES, "molmo2")
"""Families :func:`build_mllm` builds: LLaVA and Qwen2-VL on image or video data, Molmo2 on video data."""


def _check_family(family: str) -> None:
    if family not in MLLM_FAMILIES:
        check_family(family)  # names the image families


def is_video_data(data: Any) -> bool:
    """Whether ``data`` gives one video per sample (it names its longest video: ``max_frames``)."""
    return hasattr(data, "max_frames")


def _check_model_data(data: Any) -> None:
    if is_video_data(data):
        missing = [name for name in VIDEO_DATA_ATTRIBUTES if not hasattr(data, name)]
        if missing:
            raise ValueError(
                f"data: {type(data).__name__} lacks {missing}, which shape a video model; give a video data module "
                "such as tokensift.data.VideoDigitVQADataModule"
            )
        return
    missing = [name for name in MODEL_DATA_ATTRIBUTES if not hasattr(data, name)]
    if missing:
        raise ValueError(
            f"data: {type(data).__name__} lacks {missing}, which shape the model (vocabulary, image token, canvas, "
            "patches); give a VQA data module such as tokensift.data.DigitVQADataModule or ShapeVQADataModule "
            "(the VQA batch contract: tokensift.data.contract)"
        )


def build_mllm(
    family: str,
    data: Any,
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
    _check_model_data(data)
    for name, value in (
        ("vision_hidden_size", vision_hidden_size),
        ("text_hidden_size", text_hidden_size),
    ):
        if value % num_attention_heads:
            raise ValueError(f"{name} ({value}) must be divisible by num_attention_heads ({num_attention_heads})")
    if is_video_data(data):
        return _finish(
            _build_video_mllm(
                family,
                data,
                vision_hidden_size=vision_hidden_size,
                vision_layers=vision_layers,
                text_hidden_size=text_hidden_size,
                text_layers=text_layers,
                num_attention_heads=num_attention_heads,
            ),
            data.tokenizer,
        )
    if family == "molmo2":
        raise ValueError(
            f"family='molmo2' is built for video data (Molmo2's video layout); {type(data).__name__} gives images: "
            "use tokensift.data.VideoDigitVQADataModule(family='molmo2') or family='llava' / 'qwen2_vl'"
        )
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
            temporal_patch_size=QWEN2_VL_TEMPORAL,
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
    return _finish(model, tokenizer)


def _finish(model, tokenizer):
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _text_config(tokenizer, hidden_size: int, layers: int, heads: int, max_positions: int) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _build_video_mllm(
    family: str,
    data: Any,
    *,
    vision_hidden_size: int,
    vision_layers: int,
    text_hidden_size: int,
    text_layers: int,
    num_attention_heads: int,
):
    """A random-init Qwen2-VL or Molmo2 for a video data module: the tower cuts frames of ``data.image_size`` px
    into ``data.patch_size`` patches (Qwen2-VL merges 2x2 over a temporal patch of 2, Molmo2 pools
    ``data.pool_size``-square windows per frame), one LLM token per placeholder the data writes."""
    if data.family != family:
        raise ValueError(
            f"data: its prompts carry {data.family}'s video placeholders but family is {family!r}; build the data "
            f"module with family={family!r}"
        )
    tokenizer = data.tokenizer
    unused = tokenizer.unk_token_id  # markers this vocabulary has no word for point at an id never in a prompt
    # visual tokens of the longest video plus its frame markers and the question
    max_positions = 2 ** int(data.max_frames * (data.tokens_per_frame + 2) + 64).bit_length()
    text = _text_config(tokenizer, text_hidden_size, text_layers, num_attention_heads, max_positions)
    head_dim = text_hidden_size // num_attention_heads
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        if head_dim % 2:
            raise ValueError(f"text_hidden_size / num_attention_heads ({head_dim}) must be even for rotary positions")
        half = head_dim // 2
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
        }
        vision = dict(
            depth=vision_layers,
            embed_dim=vision_hidden_size,
            hidden_size=text_hidden_size,
            num_heads=num_attention_heads,
            mlp_ratio=2,
            in_channels=data.num_channels,
            patch_size=data.patch_size,
            spatial_merge_size=QWEN2_VL_MERGE,
            temporal_patch_size=QWEN2_VL_TEMPORAL,
        )
        config = Qwen2VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),  # no still images in a video prompt
            video_token_id=data.image_token_id,
            vision_start_token_id=unused,
            vision_end_token_id=unused,
            tie_word_embeddings=True,
        )
        return Qwen2VLForConditionalGeneration(config)
    from transformers import Molmo2Config, Molmo2ForConditionalGeneration

    if vision_layers < 1:
        raise ValueError(f"vision_layers must be >= 1, got {vision_layers}")
    vision_head_dim = vision_hidden_size // num_attention_heads
    frame_start, frame_end = data.frame_token_ids
    config = Molmo2Config(
        vision_config=dict(
            hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size,
            num_hidden_layers=vision_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_attention_heads,
            head_dim=vision_head_dim,
            image_size=[data.image_size, data.image_size],
            patch_size=data.patch_size,
            num_channels=data.num_channels,
        ),
        adapter_config=dict(
            # the last block only: every tower block then feeds the LLM, so a vit.<i> site prunes real work
            vision_feature_layer=[-1],
            hidden_size=vision_hidden_size,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_attention_heads,
            head_dim=vision_head_dim,
            intermediate_size=2 * text_hidden_size,
            text_hidden_size=text_hidden_size,
        ),
        text_config=dict(text, head_dim=head_dim, additional_vocab_size=0),
        image_patch_id=data.image_token_id,
        frame_start_token_id=frame_start,
        frame_end_token_id=frame_end,
        image_start_token_id=unused,
        image_end_token_id=unused,
        low_res_image_start_token_id=unused,
        tie_word_embeddings=True,
    )
    model = Molmo2ForConditionalGeneration(config)
    # Molmo2 initialises every projection at initializer_range (0.02): through the tower's patch embedding and the
    # adapter's five chained projections (pooling attention's v / o, the projector's gate / up / down) that leaves
    # visual features of ~1e-8 that hardly differ between tokens, and gradients as small, so a model trained from
    # scratch never learned to look (its alignment loss sat at ln 10). PyTorch's default fan-in init of the tower's
    # and the adapter's linear layers gives features of the word embeddings' order.
    for part in (model.model.vision_tower, model.model.multi_modal_projector):
        for module in part.modules():
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()
    return model


def build_image_processor_for(family: str, data: Any):
    """The image processor that turns a raw canvas ([C, H, W], e.g. digit VQA's grey levels 0..16) into this
    family's ``pixel_values`` exactly as the data module and :func:`~tokensift.backbones.vqa.mllm_inputs` build
    them: normalised images for LLaVA (the data module's ``image_processor()``), Qwen2-VL's flattened patches
    (and ``image_grid_thw``) for Qwen2-VL. ``None`` when the data module has no ``image_processor``."""
    _check_family(family)
    if not callable(getattr(data, "image_processor", None)):
        return None
    image_processor = data.image_processor()
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
        temporal_patch_size=QWEN2_VL_TEMPORAL,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )


def _save_input_pipeline(family: str, data: Any, out: Path) -> None:
    """Write the tokenizer and image processor; for LLaVA also a ``LlavaProcessor`` (``AutoProcessor``
    then rebuilds the prompt with its image tokens). ``Qwen2VLProcessor`` cannot be built without
    torchvision (it insists on a video processor), so Qwen2-VL gets the two parts only. A data module without
    ``image_processor()`` gets the tokenizer only."""
    data.tokenizer.save_pretrained(out)
    if is_video_data(data):  # the video processors need torchvision: the data module's collator rebuilds inputs
        return
    image_processor = build_image_processor_for(family, data)
    if image_processor is None:
        return
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

    Returns ``(model in eval mode, tokenizer, image processor or None, report)``; the report's ``data`` entry
    rebuilds the data module the model was trained and tested on (its class path ``report["data_class"]``,
    e.g. ``DigitVQADataModule(**report["data"])``).
    """
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoTokenizer,
        LlavaForConditionalGeneration,
        Molmo2ForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    path = Path(path)
    if not (path / REPORT).is_file():
        raise FileNotFoundError(f"{path} holds no {REPORT}; pass a directory written by pretrain_mllm")
    classes = {
        "llava": LlavaForConditionalGeneration,
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "molmo2": Molmo2ForConditionalGeneration,
    }
    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    if model_type not in classes:
        raise ValueError(f"{path} holds a {model_type!r} model; expected one of {sorted(classes)}")
    model = classes[model_type].from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    has_processor = (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True) if has_processor else None
    return model, tokenizer, image_processor, json.loads((path / REPORT).read_text())


def _question_answers(split: Any):
    """``(question, answer, question type)`` per sample: the split's cheap ``question_answer(i)`` when it has
    one, else read off each rendered item (the prompt's tokens with each run of image tokens as one marker)."""
    if callable(getattr(split, "question_answer", None)):
        yield from (split.question_answer(i) for i in range(len(split)))
        return
    image_token = split.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for i in range(len(split)):
        item = split[i]
        ids, labels = item["input_ids"].tolist(), item["labels"]
        start = int((labels != IGNORE_INDEX).nonzero()[0])
        prompt = [t for k, t in enumerate(ids[:start]) if t != image_token or k == 0 or ids[k - 1] != image_token]
        kind = item.get("question_type")
        yield (
            tuple(prompt),
            tuple(labels[start:][labels[start:] != IGNORE_INDEX].tolist()),
            (None if kind is None else int(kind)),
        )


def text_only_baseline(train: Any, test: Any) -> float:
    """Accuracy on ``test`` of the best image-blind answerer learnable from ``train``: the most frequent
    training answer to each exact question text (falling back to the question type's most frequent)."""
    by_question: dict[Any, Counter] = defaultdict(Counter)
    by_type: dict[Any, Counter] = defaultdict(Counter)
    for question, answer, kind in _question_answers(train):
        by_question[question][answer] += 1
        by_type[kind][answer] += 1
    hits = 0
    for question, answer, kind in _question_answers(test):
        votes = by_question.get(question) or by_type.get(kind) or Counter({"": 1})
        hits += votes.most_common(1)[0][0] == answer
    return hits / len(test)


class MLLMPretrainer(L.LightningModule):
    """Trains every weight of a :func:`build_mllm` model on the answer tokens (cross-entropy over the
    vocabulary at each answer position; every other position is labelled -100), plus an alignment loss.

    Alignment loss (weight ``alignment_loss_weight``; only when the data module has ``alignment_targets``):
    each image token's LM input embedding (the projected vision feature) is scored against the LM's own word
    embeddings, and must pick, in each group the data module names, the word of its patch. Digit VQA's groups:
    the digit inking the patch (among ``0``..``9``; background patches are skipped), the canvas row half
    (``top`` / ``bottom``) and the column half (``left`` / ``right``); shape VQA's: the colour and kind of the
    shape covering it, and the halves. So image tokens come to point where the question's words point, and,
    with tied embeddings, where the answer is read out. One answer token per sample is a weak, entangled
    signal for a vision tower trained from scratch on 2-4 digit scenes: at the default size a run without this
    term stayed at chance for 750 steps, and a run with an untied class probe only reached 54 % at 1,500
    steps. Real LLaVAs start from a pretrained CLIP and a projector aligned to the LM's embeddings; this term
    does that job on the task's own training split. It adds no parameters, so the saved model is a plain HF
    model.

    ``val/acc`` is the answer accuracy read off the same teacher-forced forward: the logits one position
    before each answer token, argmax over the answer words (causal attention makes the first one the
    prompt-only forward's); a sample counts when all its answer tokens are right.
    """

    def __init__(
        self,
        family: str,
        data: Any,
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
        answer_ids = answer_ids_of(data)
        self.register_buffer("answer_token_ids", answer_ids, persistent=False)  # None: every token
        self._alignment_targets = getattr(data, "alignment_targets", None)
        self._checked = False

    @property
    def uses_alignment(self) -> bool:
        return self.hparams.alignment_loss_weight > 0 and callable(self._alignment_targets)

    def alignment_loss(
        self, image_states: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Cross-entropy of image tokens against the word embeddings of each group's words, summed over groups.

        ``image_states``: ``[B, P, D]``, or ``[N, D]``, every row's visual tokens in order (rows of different
        counts, e.g. videos of different lengths); ``targets``: ``(word ids [K], target index)`` per group, the
        index ``[B, P]`` or ``[N]`` alike (-100 skipped)."""
        words = self.model.get_input_embeddings().weight

        def choose(word_ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            logits = (image_states @ words[word_ids].T).reshape(-1, len(word_ids))
            return torch.nn.functional.cross_entropy(logits, target.reshape(-1), ignore_index=IGNORE_INDEX)

        losses = [choose(word_ids, target) for word_ids, target in targets]
        return sum(losses[1:], losses[0])

    def _check(self, batch: dict) -> None:
        if not self._checked:
            check_vqa_batch(batch, self.hparams.family, image_token_id=self.image_token_id)
            self._checked = True

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._check(batch)
        align = self.uses_alignment
        outputs = self.model(**mllm_inputs(self.model, batch), labels=batch["labels"], output_hidden_states=align)
        size = batch["input_ids"].shape[0]
        loss = outputs.loss
        self.log("train/answer_loss", loss, batch_size=size)
        if align:
            embeddings = outputs.hidden_states[0]  # the LM's input: image features spliced into the text
            is_image = batch["input_ids"] == self.image_token_id
            image_states = embeddings[is_image]  # [N, D]: each row's visual tokens, row after row
            # targets are [B, P_max], each row's tokens first: keep the first count_b entries of row b
            counts = is_image.sum(1, keepdim=True)
            targets = [
                (word_ids, target[torch.arange(target.shape[1], device=target.device) < counts])
                for word_ids, target in self._alignment_targets(batch)
            ]
            alignment = self.alignment_loss(image_states, targets)
            self.log("train/alignment_loss", alignment, batch_size=size)
            loss = loss + self.hparams.alignment_loss_weight * alignment
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._check(batch)
        logits = self.model(**mllm_inputs(self.model, batch)).logits
        labels = batch["labels"]
        predicted = teacher_forced_answers(logits, labels, self.answer_token_ids)
        accuracy = answers_correct(predicted, answer_tokens(labels)).float().mean()
        self.log("val/acc", accuracy, prog_bar=True, batch_size=logits.shape[0])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = warmup_cosine(optimizer, total, warmup_fraction=self.hparams.warmup_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def pretrain_mllm(
    out_dir: str | os.PathLike,
    data: Any,
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
        data: a VQA data module (batches of the VQA batch contract, :mod:`tokensift.data.contract`, and the
            model-building attributes :data:`MODEL_DATA_ATTRIBUTES`: its geometry and vocabulary shape the
            model), e.g. ``DigitVQADataModule()`` or ``ShapeVQADataModule()``; or what names one: a
            ``{class_path, init_args}`` mapping or its JSON text, a YAML file, a class path
            (:func:`tokensift.data.resolve.resolve_datamodule`).
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
    data, _ = resolve_datamodule(data)
    _check_model_data(data)
    if getattr(data, "family", family) != family and family == "llava":
        raise ValueError(
            f"data: its batches carry {data.family}'s processor layout but family is {family!r}; build the data "
            "module with family='llava' (Qwen2-VL also reads llava's images)"
        )
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
    result = answer_accuracy(model, data, batch_size=eval_batch_size)
    if getattr(data, "train_dataset", None) is None:
        data.setup("fit")
    baseline = text_only_baseline(data.train_dataset, data.test_dataset)
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
        "data_class": f"{type(data).__module__}.{type(data).__qualname__}",
        "data": {key: list(v) if isinstance(v, tuple) else v for key, v in dict(getattr(data, "hparams", {})).items()},
        "torch_threads": torch.get_num_threads(),
    }
    with atomic_directory(out, REPORT, "trained MLLM") as tmp:
        model.save_pretrained(tmp)
        _save_input_pipeline(family, data, tmp)
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
    return out, float(result["accuracy"])


def pretrain_mllm_command(
    out: str,
    data: str | dict = "tokensift.data.DigitVQADataModule",
    family: str = "llava",
    max_epochs: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    eval_batch_size: int = 128,
    torch_threads: int | None = 1,
    vision_hidden_size: int = 64,
    vision_layers: int = 2,
    text_hidden_size: int = 64,
    text_layers: int = 3,
    num_attention_heads: int = 4,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    warmup_fraction: float = 0.05,
    alignment_loss_weight: float = 1.0,
    enable_progress_bar: bool = True,
) -> dict:
    """Train a tiny LLaVA / Qwen2-VL (image or video data) or Molmo2 (video data) from scratch on a VQA data module
    and save it to ``out``. ``--config configs/pretrain_video_molmo2.yaml`` reads every option from a YAML file.

    Args:
        out: output folder (model, tokenizer, image processor, tokensift_mllm.json); absent, empty or an
            earlier output of this command.
        data: the data module: a class path built with its defaults (tokensift.data.ShapeVQADataModule), a YAML
            file with class_path / init_args (or a `tokensift fit` config's data: section), or that mapping as
            JSON text ('{"class_path": "tokensift.data.ShapeVQADataModule", "init_args": {"canvas_size": 32}}'), or
            in a --config file that mapping itself. Its batches must follow the VQA batch contract
            (tokensift.data.contract).
        family: llava or qwen2_vl; molmo2 on video data (tokensift.data.VideoDigitVQADataModule).
        max_epochs: passes over the train split.
        batch_size: overrides the data module's batch size.
        seed: seeds weights, data order and dropout.
        eval_batch_size: batch size of the final test evaluation.
        torch_threads: intra-op threads while training (1: bit-reproducible weights).
        vision_hidden_size, vision_layers, text_hidden_size, text_layers, num_attention_heads: model sizes.
        lr, weight_decay, warmup_fraction, alignment_loss_weight: the optimiser and the alignment term.
        enable_progress_bar: Lightning's progress bar.

    Returns the saved report (tokensift_mllm.json).
    """
    module, _ = resolve_datamodule(data, batch_size)
    folder, _ = pretrain_mllm(
        out,
        module,
        max_epochs=max_epochs,
        trainer_kwargs={"enable_progress_bar": enable_progress_bar},
        seed=seed,
        family=family,
        eval_batch_size=eval_batch_size,
        torch_threads=torch_threads,
        vision_hidden_size=vision_hidden_size,
        vision_layers=vision_layers,
        text_hidden_size=text_hidden_size,
        text_layers=text_layers,
        num_attention_heads=num_attention_heads,
        lr=lr,
        weight_decay=weight_decay,
        warmup_fraction=warmup_fraction,
        alignment_loss_weight=alignment_loss_weight,
    )
    report = json.loads((Path(folder) / REPORT).read_text())
    print(
        f"{family} on {report['data_class']}: test accuracy {report['test_accuracy']:.4f} (generate "
        f"{report['test_generate_accuracy']:.4f}), text-only baseline {report['text_only_baseline']:.4f}; "
        f"saved to {folder}"
    )
    return report
