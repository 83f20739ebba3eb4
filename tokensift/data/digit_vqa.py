"""Digit VQA: questions about a canvas of handwritten digits, with the patches each question needs.

A small visual-question-answering task on which a multimodal LM (image tokens spliced into a text prompt)
can be trained from scratch on a CPU, and on which the truth about which image tokens matter is known
*per question*: what a text-conditioned token pruner can exploit and a text-agnostic one cannot.

Scene. The square canvas (default 64x64) is cut into four quadrants (top left, top right, bottom left,
bottom right). Between ``min_digits`` and ``max_digits`` (default 2..4) quadrants each hold one real
handwritten digit from scikit-learn's ``load_digits`` (the same 8x8 sources as
:mod:`tokensift.data.digits`), upscaled by ``digit_scale`` (default 2 -> 16x16) and placed inside its
quadrant, on the patch grid by default (``align_digits``; a 16-px digit on 8-px patches then covers a 2x2
block of patches). Layers are composited with a pixel-wise max and normalised with ``x / 8 - 1``, exactly
as the cluttered-digits task.

Questions (``question_types``; answers are single tokens: a digit ``0``..``9``, ``yes`` or ``no``):

* ``position``: "which digit is at the top left ?" -> the class of the digit in that (occupied) quadrant.
  Oracle: that digit's ink patches.
* ``count``: "how many times does 3 appear ?" -> ``0``..``max_digits``. Oracle: the ink patches of every
  3; when there is none, every digit's ink (ruling a class out takes looking at each digit).
* ``exists``: "is there a 3 ?" -> ``yes`` / ``no``. Oracle: as for ``count``.

Every question type has templates that put the image before, inside and after the question text, and
every prompt ends with ``answer :``; the answer token follows. The oracle mask marks patches holding at
least one ink pixel of the relevant digits (ink, not bounding box).

Answers are balanced by construction, not by rejection: the count / existence of the queried class is
drawn first (count uniform in ``0..num_digits``; ``yes`` with probability 1/2, then 1..num_digits copies)
and the scene is built to match; the other digits are drawn from the remaining classes. So an image-blind
model cannot beat a per-question-type prior (10 % for ``position``; see ``tokensift_mllm.json`` of a trained
model for the measured text-only baseline).

Determinism and splits (as :mod:`tokensift.data.digits`): source images are split train/val/test by
:func:`~tokensift.data.digits.split_sources` (no source image in two splits), and sample ``i`` of a split
is drawn from ``numpy.random.default_rng([seed, split_id, i])`` whatever the access order or worker. Within
one scene no source image appears twice.

Tokens. :func:`build_tokenizer` is a word-level ``PreTrainedTokenizerFast`` over a fixed vocabulary
(special tokens, the answer words, the template words) that round-trips through ``save_pretrained``. Its
``image_token`` (``<image>``) is the placeholder a LLaVA-style model replaces with image features; a
sample's prompt repeats it ``num_image_tokens`` times (default: one per patch) where the template puts the
image, as ``LlavaProcessor`` does for the same text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tokensift.data.base import SeededSplitDataset, check_loader_args
from tokensift.data.digits import (
    MAX_VALUE,
    NUM_CLASSES,
    SOURCE_SIZE,
    SPLITS,
    check_integers,
    is_int,
    load_sources,
    normalize,
    paste_max,
    patch_mask,
    split_sources,
    upscale,
)
from tokensift.data.vqa import (
    ANSWER_CUE,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    VQACollator,
    VQADataModule,
    build_word_tokenizer,
    check_family,
    check_vqa_grid,
    encode_sample,
    vocabulary,
)
from tokensift.data.vqa import build_image_processor as _build_image_processor

__all__ = [
    "ANSWER_WORDS",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "QUADRANTS",
    "QUESTION_TYPES",
    "TEMPLATES",
    "DigitPlacement",
    "DigitVQA",
    "DigitVQACollator",
    "DigitVQADataModule",
    "VQASpec",
    "build_image_processor",
    "build_tokenizer",
]

QUESTION_TYPES: tuple[str, ...] = ("position", "count", "exists")
"""Every question type; a sample's ``question_type`` field is its index here."""

QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
"""Quadrant names; quadrant ``q`` is at grid row ``q // 2`` and column ``q % 2``."""

ANSWER_WORDS: tuple[str, ...] = (*(str(d) for d in range(NUM_CLASSES)), "yes", "no")
"""Every answer is one of these words (and so one token)."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "position": (
        "{image} which digit is at the {where} ?",
        "which digit is in the {where} corner of {image} ?",
        "which digit is at the {where} ? {image}",
    ),
    "count": (
        "{image} how many times does {digit} appear ?",
        "how many {digit} digits are in {image} ?",
        "how many times does {digit} appear ? {image}",
    ),
    "exists": (
        "{image} is there a {digit} ?",
        "is there a {digit} in {image} ?",
        "is there a {digit} ? {image}",
    ),
}
"""Question templates per type: ``{image}`` marks where the image goes, ``{where}`` a quadrant name and
``{digit}`` the queried class."""

QUADRANT_COUNT = 4


def _vocabulary() -> list[str]:
    """Special tokens, the image token, the answer words (contiguous ids), then the other template words."""
    texts = [t for templates in TEMPLATES.values() for t in templates] + [*QUADRANTS, ANSWER_CUE]
    return vocabulary(ANSWER_WORDS, texts)


def build_tokenizer():
    """The task's word-level tokenizer: a ``PreTrainedTokenizerFast`` with a fixed vocabulary
    (:func:`tokensift.data.vqa.build_word_tokenizer`).

    ``tokenizer(text)`` prepends ``<s>``; ``tokenizer.image_token`` / ``image_token_id`` name the image
    placeholder. Text whose words are separated by single spaces decodes back to itself
    (``decode(ids, skip_special_tokens=True)``); an unknown word becomes ``<unk>``.
    """
    return build_word_tokenizer(_vocabulary())


def build_image_processor(num_channels: int = 3):
    """An image processor that maps a raw canvas (grey levels 0..16, [C, H, W]) to the task's pixel values.

    ``x / 16`` then ``(x - 0.5) / 0.5`` is ``x / 8 - 1``, the normalisation of :func:`normalize`; no resize,
    no crop, so a processor built on it (e.g. ``LlavaProcessor``) reproduces the dataset's ``pixel_values``.
    """
    return _build_image_processor(num_channels, MAX_VALUE)


@dataclass(frozen=True)
class DigitPlacement:
    """One digit of a scene: ``source`` (global ``load_digits`` index), its ``quadrant`` (index into
    :data:`QUADRANTS`) and the canvas position ``pos = (row, col)`` of its top-left corner."""

    source: int
    quadrant: int
    pos: tuple[int, int]


@dataclass(frozen=True)
class VQASpec:
    """Everything needed to render one sample.

    ``query`` is the asked quadrant (``position``) or the asked class (``count`` / ``exists``);
    ``relevant`` indexes the digits the oracle mask covers."""

    question_type: str
    template: int
    query: int
    digits: tuple[DigitPlacement, ...]
    answer: str
    relevant: tuple[int, ...]


def _validate(
    *,
    canvas_size: int,
    patch_size: int,
    digit_scale: int,
    min_digits: int,
    max_digits: int,
    question_types: Sequence[str],
    num_channels: int,
    num_image_tokens: int | None,
    split_fractions: Sequence[float],
    seed: int,
) -> None:
    """Raise ``ValueError`` naming the offending field (and how to fix it) for an invalid configuration."""
    check_integers(
        (
            ("canvas_size", canvas_size, 2),
            ("patch_size", patch_size, 1),
            ("digit_scale", digit_scale, 1),
            ("min_digits", min_digits, 1),
            ("max_digits", max_digits, 1),
            ("num_channels", num_channels, 1),
            ("seed", seed, 0),
        )
    )
    check_vqa_grid(canvas_size, patch_size, num_image_tokens, "every quadrant is whole patches")
    digit_size = SOURCE_SIZE * digit_scale
    if digit_size > canvas_size // 2:
        raise ValueError(
            f"digit_scale ({digit_scale}) makes digits {digit_size} px, larger than a quadrant "
            f"({canvas_size // 2} px); lower digit_scale or raise canvas_size to >= {2 * digit_size}"
        )
    if not min_digits <= max_digits <= QUADRANT_COUNT:
        raise ValueError(
            f"min_digits ({min_digits}) and max_digits ({max_digits}) must satisfy "
            f"1 <= min_digits <= max_digits <= {QUADRANT_COUNT} (one digit per quadrant)"
        )
    if isinstance(question_types, str) or not question_types:
        raise ValueError(f"question_types must be a non-empty list drawn from {list(QUESTION_TYPES)}")
    unknown = [q for q in question_types if q not in QUESTION_TYPES]
    if unknown or len(set(question_types)) != len(question_types):
        raise ValueError(
            f"question_types must be distinct names from {list(QUESTION_TYPES)}, got {list(question_types)}"
        )
    if len(split_fractions) != 3 or any(not (f > 0) for f in split_fractions) or abs(sum(split_fractions) - 1) > 1e-6:
        raise ValueError(
            f"split_fractions must be 3 positive numbers summing to 1 (train, val, test), got {split_fractions!r}"
        )


class DigitVQA(SeededSplitDataset):
    """One split of the digit-VQA task, generated on the fly and deterministic from ``seed``.

    See the module docstring for the generation rules. Items are dicts::

        {"pixel_values": float32 [num_channels, canvas_size, canvas_size],  # x / 8 - 1, in [-1, 1]
         "input_ids": int64 [L],        # <s>, prompt with num_image_tokens <image>, "answer :", the answer
         "attention_mask": int64 [L],   # all ones (padding happens in DigitVQACollator)
         "labels": int64 [L],           # -100 everywhere but the last position, which holds the answer id
         "answer_id": int64 scalar,     # the answer's token id (== input_ids[-1])
         "oracle_mask": bool [num_patches],  # patches holding ink of the digits this question needs
         "patch_classes": int64 [num_patches],  # class of the digit inking each patch, -100 elsewhere
         "question_type": int64 scalar,      # index into QUESTION_TYPES
         "index": int64 scalar}              # the sample's index in the split (per-sample randomness keys on it)

    Args:
        split: ``train``, ``val`` or ``test``.
        num_samples: split size (default 65536 / 512 / 1024; samples are drawn on the fly, so a large
            training split costs nothing until it is read).
        canvas_size / patch_size: canvas side and patch side in pixels (canvas a multiple of 2 patches).
        digit_scale: integer upscaling of the 8x8 sources.
        min_digits / max_digits: digits per scene, 1..4 (one per quadrant).
        question_types: subset of :data:`QUESTION_TYPES`, drawn uniformly.
        num_channels: grey replicated to this many channels.
        num_image_tokens: image placeholders in the prompt; default one per patch (LLaVA); a model that
            merges patches (Qwen2-VL merges 2x2) needs fewer.
        seed, split_fractions: as :class:`~tokensift.data.digits.ClutteredDigits`.
        align_digits: place digits on the patch grid (default) or at any pixel inside their quadrant.
        tokenizer: the tokenizer to encode prompts with; default :func:`build_tokenizer`.
    """

    question_type_names = QUESTION_TYPES

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        *,
        canvas_size: int = 64,
        patch_size: int = 8,
        digit_scale: int = 2,
        min_digits: int = 2,
        max_digits: int = 4,
        question_types: Sequence[str] = QUESTION_TYPES,
        num_channels: int = 3,
        num_image_tokens: int | None = None,
        seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        align_digits: bool = True,
        tokenizer=None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if num_samples is None:
            num_samples = {"train": 65536, "val": 512, "test": 1024}[split]
        if not is_int(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        _validate(
            canvas_size=canvas_size,
            patch_size=patch_size,
            digit_scale=digit_scale,
            min_digits=min_digits,
            max_digits=max_digits,
            question_types=question_types,
            num_channels=num_channels,
            num_image_tokens=num_image_tokens,
            split_fractions=split_fractions,
            seed=seed,
        )
        self.split = split
        self.split_id = SPLITS[split]
        self.num_samples = int(num_samples)
        self.canvas_size = self.image_size = int(canvas_size)
        self.patch_size = int(patch_size)
        self.digit_scale = int(digit_scale)
        self.digit_size = SOURCE_SIZE * self.digit_scale
        self.min_digits, self.max_digits = int(min_digits), int(max_digits)
        self.question_types = tuple(question_types)
        self.num_channels = int(num_channels)
        self.grid_size = self.canvas_size // self.patch_size
        self.num_patches = self.grid_size**2
        self.num_image_tokens = self.num_patches if num_image_tokens is None else int(num_image_tokens)
        self.seed = int(seed)
        self.split_fractions = tuple(float(f) for f in split_fractions)
        self.align_digits = bool(align_digits)
        self.tokenizer = build_tokenizer() if tokenizer is None else tokenizer
        missing = [w for w in (IMAGE_TOKEN, *ANSWER_WORDS) if w not in self.tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"tokenizer lacks the task's tokens {missing}; pass build_tokenizer() or None")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.answer_token_ids = self.tokenizer.convert_tokens_to_ids(list(ANSWER_WORDS))

        images, labels = load_sources()
        self._images, self._labels = images, labels
        self.source_indices: np.ndarray = split_sources(self.seed, self.split_fractions)[split]
        split_labels = labels[self.source_indices]
        self._class_sources = [self.source_indices[split_labels == c] for c in range(NUM_CLASSES)]
        scarce = [c for c, pool in enumerate(self._class_sources) if len(pool) < self.max_digits]
        if scarce:
            raise ValueError(
                f"split_fractions {self.split_fractions} leave the {split} split fewer than max_digits "
                f"({self.max_digits}) source images of class(es) {scarce}; raise the split's fraction"
            )

    def sample_spec(self, index: int) -> VQASpec:
        """Draw the (cheap) description of sample ``index``: question, digits, positions, answer."""
        rng = self.rng(index)
        question_type = self.question_types[int(rng.integers(len(self.question_types)))]
        template = int(rng.integers(len(TEMPLATES[question_type])))
        num_digits = int(rng.integers(self.min_digits, self.max_digits + 1))
        quadrants = np.sort(rng.choice(QUADRANT_COUNT, size=num_digits, replace=False))
        if question_type == "position":
            classes = rng.integers(NUM_CLASSES, size=num_digits)
            asked = int(rng.integers(num_digits))
            query, answer, relevant = int(quadrants[asked]), str(int(classes[asked])), (asked,)
        else:
            query = int(rng.integers(NUM_CLASSES))
            if question_type == "count":
                copies = int(rng.integers(num_digits + 1))
                answer = str(copies)
            else:
                present = bool(rng.random() < 0.5)
                copies = int(rng.integers(1, num_digits + 1)) if present else 0
                answer = "yes" if present else "no"
            classes = (query + rng.integers(1, NUM_CLASSES, size=num_digits)) % NUM_CLASSES  # never the query
            holders = np.sort(rng.choice(num_digits, size=copies, replace=False))
            classes[holders] = query
            relevant = tuple(int(h) for h in holders) if copies else tuple(range(num_digits))
        sources = np.empty(num_digits, dtype=np.int64)
        for cls in np.unique(classes):  # distinct source images within a scene
            slots = np.flatnonzero(classes == cls)
            sources[slots] = rng.choice(self._class_sources[int(cls)], size=len(slots), replace=False)
        half = self.canvas_size // 2
        step = self.patch_size if self.align_digits else 1
        offsets = rng.integers((half - self.digit_size) // step + 1, size=(num_digits, 2)) * step
        digits = tuple(
            DigitPlacement(int(source), int(q), (int(q // 2 * half + offsets[k, 0]), int(q % 2 * half + offsets[k, 1])))
            for k, (source, q) in enumerate(zip(sources, quadrants, strict=True))
        )
        return VQASpec(question_type, template, query, digits, answer, relevant)

    def render(self, spec: VQASpec) -> tuple[np.ndarray, np.ndarray]:
        """Raw float32 canvas [H, W] (grey levels 0..16) and the bool oracle mask [num_patches]."""
        canvas = np.zeros((self.canvas_size, self.canvas_size), dtype=np.float32)
        relevant_ink = np.zeros_like(canvas, dtype=bool)
        for k, digit in enumerate(spec.digits):
            image = upscale(self._images[digit.source], self.digit_scale)
            paste_max(canvas, image, digit.pos, f"digit {k}")
            if k in spec.relevant:
                row, col = digit.pos
                relevant_ink[row : row + self.digit_size, col : col + self.digit_size] |= image > 0
        return canvas, patch_mask(relevant_ink, self.patch_size)

    def patch_classes(self, spec: VQASpec) -> np.ndarray:
        """Int64 [num_patches]: the class of the digit inking each patch, -100 where no digit has ink.

        Digits sit in different quadrants and quadrants are whole patches, so no patch holds two digits.
        A dense, question-independent target (e.g. an auxiliary loss that makes image tokens say which
        digit they show)."""
        classes = np.full(self.num_patches, IGNORE_INDEX, dtype=np.int64)
        for digit in spec.digits:
            ink = np.zeros((self.canvas_size, self.canvas_size), dtype=bool)
            row, col = digit.pos
            ink[row : row + self.digit_size, col : col + self.digit_size] = (
                upscale(self._images[digit.source], self.digit_scale) > 0
            )
            classes[patch_mask(ink, self.patch_size)] = self._labels[digit.source]
        return classes

    def question(self, spec: VQASpec) -> str:
        """The question with a single ``<image>`` where the template puts the image, then ``answer :``
        (the text a processor such as ``LlavaProcessor`` expands, without the answer)."""
        slot = {"where": QUADRANTS[spec.query]} if spec.question_type == "position" else {"digit": str(spec.query)}
        return TEMPLATES[spec.question_type][spec.template].format(image=IMAGE_TOKEN, **slot) + " " + ANSWER_CUE

    def digit_classes(self, spec: VQASpec) -> list[int]:
        """Class of each digit of the scene, in ``spec.digits`` order."""
        return [int(self._labels[d.source]) for d in spec.digits]

    def question_answer(self, index: int) -> tuple[str, str, str]:
        """``(question, answer, question type)`` of sample ``index`` without rendering it (cheap): what an
        image-blind answerer sees (:func:`~tokensift.backbones.pretrain_mllm.text_only_baseline`)."""
        spec = self.sample_spec(index)
        return self.question(spec), spec.answer, spec.question_type

    def collator(self, padding_side: str = "left", with_answer: bool = True) -> DigitVQACollator:
        """A collator of this split's items (LLaVA layout)."""
        return DigitVQACollator(self.tokenizer.pad_token_id, padding_side, with_answer)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        spec = self.sample_spec(index)
        canvas, oracle = self.render(spec)
        input_ids, labels = encode_sample(self.tokenizer, self.question(spec), spec.answer, self.num_image_tokens)
        image = torch.from_numpy(normalize(canvas))
        return {
            "pixel_values": image.unsqueeze(0).repeat(self.num_channels, 1, 1),
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": labels,
            "answer_id": input_ids[-1].clone(),
            "oracle_mask": torch.from_numpy(oracle),
            "patch_classes": torch.from_numpy(self.patch_classes(spec)),
            "question_type": torch.tensor(QUESTION_TYPES.index(spec.question_type), dtype=torch.long),
            "index": torch.tensor(self._check_index(index), dtype=torch.long),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_samples={self.num_samples}, "
            f"canvas_size={self.canvas_size}, patch_size={self.patch_size}, digit_scale={self.digit_scale}, "
            f"digits={self.min_digits}..{self.max_digits}, question_types={list(self.question_types)}, "
            f"num_image_tokens={self.num_image_tokens}, seed={self.seed}, sources={len(self.source_indices)})"
        )


@dataclass(frozen=True)
class DigitVQACollator(VQACollator):
    """Pad :class:`DigitVQA` items into a batch (:class:`tokensift.data.vqa.VQACollator`).

    ``padding_side="left"`` (default) puts padding before the prompt, so every row ends at the same column:
    the answer is the last column and a prompt-only batch (``with_answer=False``) ends where the next
    token is the answer, as ``generate`` expects. ``"right"`` pads after the answer. Padded positions get
    ``pad_token_id``, attention 0 and label -100. With ``with_answer=False`` each row loses its last token
    (the answer) and the batch has no ``labels``. ``answer_id``, ``oracle_mask``, ``patch_classes``,
    ``question_type``, ``pixel_values`` and ``index`` (when the items carry it) are stacked;
    ``family="qwen2_vl"`` writes Qwen2-VL's patches and grids instead of images.
    """


class DigitVQADataModule(VQADataModule):
    """Lightning data module for digit VQA (see :mod:`tokensift.data.digit_vqa`).

    Buildable from YAML by ``LightningCLI``::

        data:
          class_path: tokensift.data.DigitVQADataModule
          init_args: {batch_size: 32, canvas_size: 64, patch_size: 8, question_types: [position, count]}

    Right after construction it exposes what a model config needs: ``tokenizer``, ``vocab_size``,
    ``image_token_id``, ``pad_token_id``, ``answer_token_ids``, ``image_size``, ``patch_size``,
    ``num_channels``, ``num_patches``, ``num_image_tokens``; and ``collate_fn`` /
    ``collator(padding_side, with_answer)`` for custom loaders. Arguments are validated in ``__init__``.
    Batches follow the VQA batch contract (:mod:`tokensift.data.contract`); ``family="qwen2_vl"`` gives them
    Qwen2-VL's processor layout (flattened patches, ``image_grid_thw``) instead of images ``[B, C, H, W]``.
    """

    dataset_class = DigitVQA
    raw_max_value = MAX_VALUE
    collator_class = DigitVQACollator

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 0,
        train_samples: int = 65536,
        val_samples: int = 512,
        test_samples: int = 1024,
        canvas_size: int = 64,
        patch_size: int = 8,
        digit_scale: int = 2,
        min_digits: int = 2,
        max_digits: int = 4,
        question_types: Sequence[str] = QUESTION_TYPES,
        num_channels: int = 3,
        num_image_tokens: int | None = None,
        padding_side: str = "left",
        seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        align_digits: bool = True,
        pin_memory: bool = False,
        family: str = "llava",
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers, train_samples, val_samples, test_samples, is_integer=is_int)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        check_family(family)
        self.save_hyperparameters()
        self._init_splits(batch_size, num_workers, pin_memory, seed, train_samples, val_samples, test_samples)
        self._dataset_kwargs = dict(
            canvas_size=canvas_size,
            patch_size=patch_size,
            digit_scale=digit_scale,
            min_digits=min_digits,
            max_digits=max_digits,
            question_types=tuple(question_types),
            num_channels=num_channels,
            num_image_tokens=num_image_tokens,
            seed=seed,
            split_fractions=tuple(split_fractions),
            align_digits=align_digits,
        )
        self._init_vqa(padding_side, family)

    def alignment_targets(self, batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What each image token should name (:class:`~tokensift.backbones.pretrain_mllm.MLLMPretrainer`'s
        alignment term): ``(candidate word ids [K], target index [B, P])`` per group: the digit inking the patch
        (``0``..``9``, -100 on background), the patch's row half (``top`` / ``bottom``) and column half
        (``left`` / ``right``)."""
        classes = batch["patch_classes"]
        device, size = classes.device, classes.shape[0]
        words = self.tokenizer.convert_tokens_to_ids
        row_half, column_half = self.patch_halves(device)
        return [
            (torch.tensor(words([str(d) for d in range(NUM_CLASSES)]), device=device), classes),
            (torch.tensor(words(["top", "bottom"]), device=device), row_half.expand(size, -1)),
            (torch.tensor(words(["left", "right"]), device=device), column_half.expand(size, -1)),
        ]
