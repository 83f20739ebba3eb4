"""What the VQA tasks share: the word-level tokenizer, prompt encoding, the image processor, Qwen2-VL's
patch layout and the collator that pads samples into batches of the VQA batch contract
(:mod:`tokensift.data.contract`).

A task (:mod:`tokensift.data.digit_vqa`, :mod:`tokensift.data.shape_vqa`) brings its own scenes, questions and
vocabulary; the pieces here turn a question text with one ``<image>`` placeholder and an answer text into
``input_ids`` / ``labels`` (the answer's tokens labelled, -100 elsewhere), and a list of samples into a batch
with LLaVA's processor layout (images ``[B, C, H, W]``) or Qwen2-VL's (flattened patches + ``image_grid_thw``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from tokensift.data.base import SplitDataModule
from tokensift.data.digits import is_int

__all__ = [
    "ANSWER_CUE",
    "FAMILIES",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "QWEN2_VL_MERGE",
    "QWEN2_VL_TEMPORAL",
    "SPECIAL_TOKENS",
    "VQACollator",
    "VQADataModule",
    "build_image_processor",
    "build_word_tokenizer",
    "check_family",
    "check_vqa_grid",
    "encode_sample",
    "qwen2_vl_images",
    "qwen2_vl_patches",
    "vocabulary",
]

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
IGNORE_INDEX = -100  # label of every position but the answer (transformers' cross-entropy ignore index)
ANSWER_CUE = "answer :"  # ends every prompt, so the next token is the answer wherever the image sits
FAMILIES = ("llava", "qwen2_vl")
"""Processor layouts a VQA collator writes: LLaVA's images, or Qwen2-VL's flattened patches and grids."""
QWEN2_VL_MERGE = 2  # Qwen2-VL merges 2x2 vision patches into one LM token
QWEN2_VL_TEMPORAL = 2  # a still image is repeated over Qwen2-VL's temporal patch


def check_family(family: str, field: str = "family") -> str:
    if family not in FAMILIES:
        raise ValueError(f"{field} must be one of {list(FAMILIES)}, got {family!r}")
    return family


def vocabulary(answer_words: Sequence[str], texts: Iterable[str]) -> list[str]:
    """Special tokens, the image token, the answer words (contiguous ids), then every other word of ``texts``
    (``{slot}`` placeholders skipped) in order of first appearance."""
    words = [*SPECIAL_TOKENS.values(), IMAGE_TOKEN]
    for word in answer_words:
        if word not in words:
            words.append(word)
    for text in texts:
        for word in text.split():
            if not word.startswith("{") and word not in words:
                words.append(word)
    return words


@functools.cache
def _tokenizer_backend_json(words: tuple[str, ...]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {word: i for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    # WordPiece's decoder joins words with single spaces; nothing here carries its "##" prefix.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return backend.to_str()


def build_word_tokenizer(words: Sequence[str]):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (from :func:`vocabulary`).

    ``tokenizer(text)`` prepends ``<s>``; ``tokenizer.image_token`` / ``image_token_id`` name the image
    placeholder. Text whose words are separated by single spaces decodes back to itself
    (``decode(ids, skip_special_tokens=True)``); an unknown word becomes ``<unk>``. It round-trips through
    ``save_pretrained``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    words = tuple(words)
    missing = [w for w in (*SPECIAL_TOKENS.values(), IMAGE_TOKEN) if w not in words]
    if missing or len(set(words)) != len(words):
        raise ValueError(
            f"words must be distinct and hold {missing or 'the special tokens'}; build them with vocabulary()"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_backend_json(words)),
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=1024,
        **SPECIAL_TOKENS,
    )


def build_image_processor(num_channels: int, max_value: float):
    """A CLIP-style image processor that maps a raw canvas ([C, H, W], values 0..``max_value``) to
    ``2 x / max_value - 1``: ``x / max_value`` then ``(x - 0.5) / 0.5``; no resize, no crop, so a processor
    built on it (e.g. ``LlavaProcessor``) reproduces a task's ``pixel_values`` from its raw canvas."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        do_resize=False,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1.0 / max_value,
        do_normalize=True,
        image_mean=[0.5] * num_channels,
        image_std=[0.5] * num_channels,
        do_convert_rgb=False,
    )


def encode_sample(tokenizer, question: str, answer: str, num_image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of ``question`` (one ``<image>`` where the image goes) followed by ``answer``.

    The placeholder is repeated ``num_image_tokens`` times, glued together as ``LlavaProcessor`` expands it;
    ``labels`` is -100 everywhere but the answer's tokens (one or more), which it repeats."""
    text = question.replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens)
    prompt = tokenizer(text)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise ValueError(f"answer {answer!r} has no tokens; every sample needs at least one answer token")
    input_ids = torch.tensor(prompt + answer_ids, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[len(prompt) :] = input_ids[len(prompt) :]
    return input_ids, labels


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


def qwen2_vl_images(
    patches: torch.Tensor, grid_thw: torch.Tensor, channels: int, patch_size: int, merge_size: int
) -> list[torch.Tensor]:
    """The inverse of :func:`qwen2_vl_patches` (first temporal slice of each image): ``[C, H, W]`` per image."""
    images, start = [], 0
    for t, grid_h, grid_w in grid_thw.tolist():
        count = t * grid_h * grid_w
        flat = patches[start : start + count].reshape(t, grid_h // merge_size, grid_w // merge_size, merge_size,
                                                      merge_size, channels, -1, patch_size, patch_size)  # fmt: skip
        image = flat[0, :, :, :, :, :, 0].permute(4, 0, 2, 5, 1, 3, 6)  # (C, gh/m, m, p, gw/m, m, p)
        images.append(image.reshape(channels, grid_h * patch_size, grid_w * patch_size))
        start += count
    return images


@dataclass(frozen=True)
class VQACollator:
    """Pad VQA samples (``input_ids`` / ``attention_mask`` / ``labels`` of their own lengths, ``pixel_values``
    ``[C, H, W]`` and fixed-shape fields) into a batch of the VQA batch contract.

    ``padding_side="left"`` (default) puts padding before the prompt, so every row ends at the same column:
    the answer is the last columns, and a prompt-only batch (``with_answer=False``) ends where the answer's
    first token goes, as ``generate`` expects. ``"right"`` pads after the answer. Padded positions get
    ``pad_token_id``, attention 0 and label -100. With ``with_answer=False`` each row stops before its first
    labelled token and the batch has no ``labels``. Every other field the samples all carry is stacked.

    ``family="qwen2_vl"`` writes Qwen2-VL's processor layout: ``pixel_values`` as flattened patches of
    ``patch_size / 2`` pixels (merged 2x2 into one LM token per ``patch_size`` data patch, a still image
    repeated over the temporal patch of 2), ``image_grid_thw`` and ``mm_token_type_ids`` (1 at
    ``image_token_id``); ``"llava"`` keeps images ``[B, C, H, W]``.
    """

    pad_token_id: int
    padding_side: str = "left"
    with_answer: bool = True
    family: str = "llava"
    patch_size: int | None = None
    image_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        check_family(self.family)
        if self.family == "qwen2_vl" and (
            self.patch_size is None or self.patch_size % QWEN2_VL_MERGE or self.image_token_id is None
        ):
            raise ValueError(
                f"family='qwen2_vl' needs an even patch_size (got {self.patch_size}) and the image_token_id "
                f"(got {self.image_token_id}): each LM token merges 2x2 vision patches of patch_size / 2 pixels"
            )

    def _prompt_length(self, sample: dict[str, torch.Tensor]) -> int | None:
        if self.with_answer:
            return None
        answer = (sample["labels"] != IGNORE_INDEX).nonzero()
        return int(answer[0]) if len(answer) else None

    def __call__(self, samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        cuts = [self._prompt_length(s) for s in samples]
        rows = [s["input_ids"][:cut] for s, cut in zip(samples, cuts, strict=True)]
        length = max(len(r) for r in rows)
        batch_size = len(samples)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        for i, (sample, row, cut) in enumerate(zip(samples, rows, cuts, strict=True)):
            span = slice(length - len(row), length) if self.padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = row
            attention_mask[i, span] = sample["attention_mask"][:cut]
            labels[i, span] = sample["labels"][:cut]
        padded = ("input_ids", "attention_mask", "labels")
        shared = [key for key in samples[0] if key not in padded and all(key in s for s in samples)]
        batch = {key: torch.stack([s[key] for s in samples]) for key in shared}
        batch["input_ids"], batch["attention_mask"] = input_ids, attention_mask
        if self.with_answer:
            batch["labels"] = labels
        if self.family == "qwen2_vl":
            batch["pixel_values"], batch["image_grid_thw"] = qwen2_vl_patches(
                batch["pixel_values"], self.patch_size // QWEN2_VL_MERGE, QWEN2_VL_MERGE, QWEN2_VL_TEMPORAL
            )
            batch["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        return batch


class VQADataModule(SplitDataModule):
    """What the VQA data modules share: the derived sizes a model config needs, ``build`` / ``collator`` and the
    loaders' collate function. Subclasses set ``dataset_class`` and ``raw_max_value`` (the raw canvas range
    :meth:`image_processor` normalises), fill ``_dataset_kwargs`` and call :meth:`_init_vqa` from ``__init__``.
    """

    dataset_class: type
    raw_max_value: float
    collator_class: type = VQACollator

    def _init_vqa(self, padding_side: str, family: str) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.family = check_family(family)
        # Building a (cheap) one-sample test split validates every argument now and fixes the derived sizes.
        probe = self.dataset_class("test", 1, **self._dataset_kwargs)
        if family == "qwen2_vl" and probe.patch_size % QWEN2_VL_MERGE:
            raise ValueError(
                f"patch_size ({probe.patch_size}) must be even for family='qwen2_vl': each LM token merges 2x2 "
                "vision patches of patch_size / 2 pixels"
            )
        self.tokenizer = probe.tokenizer
        self.vocab_size = len(self.tokenizer)
        self.image_token_id = probe.image_token_id
        self.pad_token_id = self.tokenizer.pad_token_id
        self.answer_token_ids = list(probe.answer_token_ids)
        self.question_type_names = tuple(probe.question_type_names)
        self.image_size = probe.image_size
        self.patch_size = probe.patch_size
        self.num_channels = probe.num_channels
        self.grid_size = probe.grid_size
        self.num_patches = probe.num_patches
        self.num_image_tokens = probe.num_image_tokens

    def build(self, split: str, num_samples: int | None = None):
        """A split with this module's options (``num_samples`` defaults to the module's split size)."""
        size = self._num_samples[split] if num_samples is None else num_samples
        return self.dataset_class(split, size, tokenizer=self.tokenizer, **self._dataset_kwargs)

    def collator(self, padding_side: str | None = None, with_answer: bool = True, family: str | None = None):
        """The collate function of this module's items (its padding side and processor layout by default)."""
        return self.collator_class(
            self.pad_token_id,
            padding_side or self.padding_side,
            with_answer,
            family or self.family,
            self.patch_size,
            self.image_token_id,
        )

    @property
    def collate_fn(self):
        return self.collator()

    def image_processor(self):
        """The CLIP-style image processor that maps a raw canvas to this task's ``pixel_values``."""
        return build_image_processor(self.num_channels, self.raw_max_value)

    def patch_halves(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[num_patches]`` 0/1 per patch: its row in the bottom half of the grid, its column in the right half."""
        index = torch.arange(self.num_patches, device=device)
        half = self.grid_size // 2
        return (index // self.grid_size >= half).long(), (index % self.grid_size >= half).long()

    def _build(self, split: str):
        return self.build(split)

    def _collate(self):
        return self.collate_fn


def check_vqa_grid(canvas_size, patch_size, num_image_tokens, why: str, field: str = "canvas_size") -> None:
    """The checks every VQA canvas shares: ``num_image_tokens`` None or >= 1, and a canvas of whole halves of
    patches (``why`` says what the task needs them for; ``field`` is the canvas option's name); each error names the
    field and a value that works."""
    if num_image_tokens is not None and (not is_int(num_image_tokens) or num_image_tokens < 1):
        raise ValueError(f"num_image_tokens must be None (one per patch) or an integer >= 1, got {num_image_tokens!r}")
    if canvas_size % (2 * patch_size) != 0:
        raise ValueError(
            f"{field} ({canvas_size}) must be a multiple of 2 * patch_size ({2 * patch_size}) so {why}; "
            f"e.g. {field}={(canvas_size // (2 * patch_size) + 1) * 2 * patch_size}"
        )
