"""Shape VQA: questions about coloured, textured geometric shapes, with the patches each question needs.

A second VQA task (after :mod:`tokensift.data.digit_vqa`), built differently: RGB scenes of synthetic shapes
at any pixel position and size instead of handwritten digits in quadrants, questions about colour, count,
spatial relation and position, answers of one or two tokens, and its own question-dependent oracle mask.
Batches follow the VQA batch contract (:mod:`tokensift.data.contract`), so the MLLM recipe and ``tokensift bench``
take it as they take digit VQA.

Scene. An RGB canvas (default 64x64) with a noisy dark-grey background holds between ``min_shapes`` and
``max_shapes`` (default 2..4) shapes. Each has a kind (``kinds``, default disk, square, triangle, plus; the
silhouettes of :func:`tokensift.data.shapes.shape_alpha`), a colour (:data:`COLOURS`), a fill texture
(:data:`TEXTURES`: solid, striped, checked) and a side uniform in ``min_size..max_size`` pixels (default
10..20), at a uniform pixel position where its box overlaps no other shape's box (a 1-pixel gap). No two
shapes of a scene share both colour and kind, so "the red disk" names one shape. Silhouettes are
alpha-blended (4x4 supersampling); pixels are normalised with ``2 x / 255 - 1``.

Questions (``question_types``):

* ``colour``: "what colour is the disk ?" -> a colour word. The named kind appears once. Oracle: its patches.
* ``count``: "how many disk shapes are there ?" -> ``0``..``max_shapes``. Oracle: every shape of that kind;
  when there is none, every shape (ruling a kind out takes looking at each shape).
* ``relation``: "is the red disk left of the blue square ?" / "... above ..." -> ``yes`` / ``no``. The two
  boxes do not overlap along the asked axis, so the answer is never a matter of a pixel. Oracle: both shapes.
* ``where``: "where is the red disk ?" -> two tokens, ``top`` / ``bottom`` then ``left`` / ``right``: the
  canvas quadrant that holds the shape's whole box. Oracle: its patches.

Every template puts the image before, inside or after the question, and ends with ``answer :``. Answers are
balanced by construction (colour, count, yes / no and quadrant are drawn first and the scene built to match),
so an image-blind model cannot beat the per-question-type prior. The oracle mask marks the patches where a
relevant shape's silhouette covers any pixel (silhouette, not bounding box).

Determinism and splits: sample ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split_id, i])``
(:class:`~tokensift.data.base.SeededSplitDataset`) whatever the access order or worker; splits differ by their
split id (scenes are synthetic: there is no source image to keep apart).

Tokens: the word-level tokenizer and prompt encoding shared with digit VQA (:mod:`tokensift.data.vqa`), over
this task's vocabulary; one ``<image>`` per patch by default (``num_image_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tokensift.data.base import SeededSplitDataset, check_loader_args
from tokensift.data.digits import SPLITS, check_integers, is_int, patch_mask
from tokensift.data.shapes import SHAPES, shape_alpha
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

__all__ = [
    "ANSWER_WORDS",
    "COLOURS",
    "KINDS",
    "QUESTION_TYPES",
    "RELATIONS",
    "TEMPLATES",
    "TEXTURES",
    "PlacedShape",
    "ShapeVQA",
    "ShapeVQADataModule",
    "ShapeVQASpec",
    "build_tokenizer",
]

QUESTION_TYPES: tuple[str, ...] = ("colour", "count", "relation", "where")
"""Every question type; a sample's ``question_type`` field is its index here."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (50, 190, 70),
    "blue": (60, 105, 240),
    "yellow": (235, 215, 45),
    "purple": (170, 70, 215),
}
"""Colour names and their RGB fill (0..255)."""

KINDS: tuple[str, ...] = ("disk", "square", "triangle", "plus", "ring", "diamond")
"""Shape kinds a scene may draw from (silhouettes of :func:`tokensift.data.shapes.shape_alpha`)."""
DEFAULT_KINDS: tuple[str, ...] = ("disk", "square", "triangle", "plus")

TEXTURES: tuple[str, ...] = ("solid", "striped", "checked")
"""Fills: the colour everywhere, or every other 2-pixel row / 2x2 check at 55 % brightness."""

RELATIONS: tuple[str, ...] = ("left of", "above")
VERTICAL_WORDS, HORIZONTAL_WORDS = ("top", "bottom"), ("left", "right")
MAX_SHAPES = len(COLOURS)  # a count question's copies need distinct colours
ANSWER_WORDS: tuple[str, ...] = (
    *COLOURS,
    *(str(n) for n in range(MAX_SHAPES + 1)),
    "yes",
    "no",
    *VERTICAL_WORDS,
    *HORIZONTAL_WORDS,
)
"""Every answer token (a ``where`` answer is two of them: a vertical then a horizontal word)."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": (
        "{image} what colour is the {kind} ?",
        "what colour is the {kind} in {image} ?",
        "what colour is the {kind} ? {image}",
    ),
    "count": (
        "{image} how many {kind} shapes are there ?",
        "how many {kind} shapes are in {image} ?",
        "how many {kind} shapes are there ? {image}",
    ),
    "relation": (
        "{image} is the {first} {relation} the {second} ?",
        "is the {first} {relation} the {second} in {image} ?",
        "is the {first} {relation} the {second} ? {image}",
    ),
    "where": (
        "{image} where is the {first} ?",
        "where is the {first} in {image} ?",
        "where is the {first} ? {image}",
    ),
}
"""Question templates per type: ``{image}`` marks where the image goes; ``{kind}`` a kind; ``{first}`` /
``{second}`` a shape named by colour and kind (``red disk``); ``{relation}`` one of :data:`RELATIONS`."""

BACKGROUND = 40.0  # dark grey, plus uniform noise of BACKGROUND_NOISE
BACKGROUND_NOISE = 30.0
RAW_MAX = 255.0
TEXTURE_SHADE = 0.55
GAP = 1  # pixels between shape boxes
_PLACEMENT_TRIES = 50


def _vocabulary() -> list[str]:
    texts = [t for templates in TEMPLATES.values() for t in templates]
    texts += [*KINDS, *RELATIONS, *COLOURS, ANSWER_CUE]
    return vocabulary(ANSWER_WORDS, texts)


def build_tokenizer():
    """The task's word-level tokenizer (:func:`tokensift.data.vqa.build_word_tokenizer` over its vocabulary)."""
    return build_word_tokenizer(_vocabulary())


@dataclass(frozen=True)
class PlacedShape:
    """One shape of a scene: ``kind`` / ``colour`` / ``texture`` names, its side ``size`` and the canvas position
    ``pos = (row, col)`` of its box's top-left corner."""

    kind: str
    colour: str
    texture: str
    size: int
    pos: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    def box(self) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)``, exclusive bottom / right."""
        return self.pos[0], self.pos[1], self.pos[0] + self.size, self.pos[1] + self.size


@dataclass(frozen=True)
class ShapeVQASpec:
    """Everything needed to render one sample: the question (``template``, ``slots`` for its placeholders),
    the shapes, the answer text, the shapes the oracle covers (``relevant``) and the background's noise seed."""

    question_type: str
    template: int
    slots: tuple[tuple[str, str], ...]
    shapes: tuple[PlacedShape, ...]
    answer: str
    relevant: tuple[int, ...]
    noise_seed: int


def _validate(
    *,
    canvas_size: int,
    patch_size: int,
    min_size: int,
    max_size: int,
    min_shapes: int,
    max_shapes: int,
    kinds: Sequence[str],
    question_types: Sequence[str],
    num_image_tokens: int | None,
    seed: int,
) -> None:
    """Raise ``ValueError`` naming the offending field (and how to fix it) for an invalid configuration."""
    check_integers(
        (
            ("canvas_size", canvas_size, 8),
            ("patch_size", patch_size, 1),
            ("min_size", min_size, 4),
            ("max_size", max_size, 4),
            ("min_shapes", min_shapes, 1),
            ("max_shapes", max_shapes, 1),
            ("seed", seed, 0),
        )
    )
    check_vqa_grid(canvas_size, patch_size, num_image_tokens, "the grid splits into halves")
    if not min_size <= max_size <= canvas_size // 2 - GAP:
        raise ValueError(
            f"min_size ({min_size}) and max_size ({max_size}) must satisfy min_size <= max_size <= "
            f"canvas_size / 2 - {GAP} ({canvas_size // 2 - GAP}): a 'where' shape fits in one quadrant"
        )
    if not min_shapes <= max_shapes <= MAX_SHAPES:
        raise ValueError(
            f"min_shapes ({min_shapes}) and max_shapes ({max_shapes}) must satisfy 1 <= min_shapes <= max_shapes "
            f"<= {MAX_SHAPES} (a count question's copies need distinct colours)"
        )
    if max_shapes * (max_size + GAP) ** 2 > canvas_size**2 // 2:
        raise ValueError(
            f"{max_shapes} shapes of up to {max_size} px crowd a {canvas_size}-px canvas; lower max_shapes or "
            f"max_size, or raise canvas_size (at most half the canvas is boxes)"
        )
    if isinstance(kinds, str) or len(kinds) < 2 or len(set(kinds)) != len(kinds) or set(kinds) - set(KINDS):
        raise ValueError(f"kinds must be at least 2 distinct names from {list(KINDS)}, got {kinds!r}")
    if isinstance(question_types, str) or not question_types:
        raise ValueError(f"question_types must be a non-empty list drawn from {list(QUESTION_TYPES)}")
    unknown = [q for q in question_types if q not in QUESTION_TYPES]
    if unknown or len(set(question_types)) != len(question_types):
        raise ValueError(
            f"question_types must be distinct names from {list(QUESTION_TYPES)}, got {list(question_types)}"
        )
    if "relation" in question_types and min_shapes < 2:
        raise ValueError(f"min_shapes ({min_shapes}) must be >= 2 for 'relation' questions, which name two shapes")


class ShapeVQA(SeededSplitDataset):
    """One split of the shape-VQA task, generated on the fly and deterministic from ``seed``.

    See the module docstring for the rules. Items are dicts::

        {"pixel_values": float32 [3, canvas_size, canvas_size],  # 2 x / 255 - 1, in [-1, 1]
         "input_ids": int64 [L],        # <s>, prompt with num_image_tokens <image>, "answer :", the answer
         "attention_mask": int64 [L],   # all ones (padding happens in the collator)
         "labels": int64 [L],           # -100 everywhere but the answer's one or two tokens
         "oracle_mask": bool [num_patches],   # patches a shape this question is about covers
         "patch_colours": int64 [num_patches],  # index into COLOURS of the shape covering most of each patch, -100
         "patch_kinds": int64 [num_patches],    # index into KINDS of that shape, -100 on background
         "question_type": int64 scalar,  # index into QUESTION_TYPES
         "index": int64 scalar}          # the sample's index in the split

    Args:
        split: ``train``, ``val`` or ``test``.
        num_samples: split size (default 65536 / 512 / 1024, drawn on the fly).
        canvas_size / patch_size: canvas and patch side in pixels (canvas a multiple of 2 patches).
        min_size / max_size: shape sides in pixels (at most half the canvas minus a pixel).
        min_shapes / max_shapes: shapes per scene, 1..5 (2.. with ``relation`` questions).
        kinds: the shape kinds scenes draw from (a subset of :data:`KINDS`).
        question_types: subset of :data:`QUESTION_TYPES`, drawn uniformly.
        num_image_tokens: image placeholders in the prompt; default one per patch.
        seed: the task's seed.
        tokenizer: the tokenizer to encode prompts with; default :func:`build_tokenizer`.
    """

    question_type_names = QUESTION_TYPES
    num_channels = 3

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        *,
        canvas_size: int = 64,
        patch_size: int = 8,
        min_size: int = 10,
        max_size: int = 20,
        min_shapes: int = 2,
        max_shapes: int = 4,
        kinds: Sequence[str] = DEFAULT_KINDS,
        question_types: Sequence[str] = QUESTION_TYPES,
        num_image_tokens: int | None = None,
        seed: int = 0,
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
            min_size=min_size,
            max_size=max_size,
            min_shapes=min_shapes,
            max_shapes=max_shapes,
            kinds=kinds,
            question_types=question_types,
            num_image_tokens=num_image_tokens,
            seed=seed,
        )
        self.split, self.split_id = split, SPLITS[split]
        self.num_samples = int(num_samples)
        self.canvas_size = self.image_size = int(canvas_size)
        self.patch_size = int(patch_size)
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.min_shapes, self.max_shapes = int(min_shapes), int(max_shapes)
        self.kinds = tuple(kinds)
        self.question_types = tuple(question_types)
        self.grid_size = self.canvas_size // self.patch_size
        self.num_patches = self.grid_size**2
        self.num_image_tokens = self.num_patches if num_image_tokens is None else int(num_image_tokens)
        self.seed = int(seed)
        self.tokenizer = build_tokenizer() if tokenizer is None else tokenizer
        missing = [w for w in (IMAGE_TOKEN, *ANSWER_WORDS, *self.kinds) if w not in self.tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"tokenizer lacks the task's tokens {missing}; pass build_tokenizer() or None")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.answer_token_ids = self.tokenizer.convert_tokens_to_ids(list(ANSWER_WORDS))

    # -- the scene ------------------------------------------------------------------------------------
    def _descriptions(self, rng: np.random.Generator, question_type: str, count: int):
        """``(kind, colour)`` per shape, distinct pairs, built around the question; and the question's slots,
        answer and relevant shapes (indices)."""
        colours = list(COLOURS)
        if question_type in ("colour", "count"):
            kind = self.kinds[int(rng.integers(len(self.kinds)))]
            if question_type == "colour":  # the colour (the answer) first, the named kind once
                chosen = [colours[int(rng.integers(len(colours)))]]
            else:  # the count (the answer) first: that many shapes of the kind, in distinct colours
                copies = int(rng.integers(count + 1))
                chosen = [colours[int(c)] for c in rng.choice(len(colours), size=copies, replace=False)]
            pairs = [(kind, colour) for colour in chosen]
            others = [(k, c) for k in self.kinds if k != kind for c in colours]
            pairs += [others[int(j)] for j in rng.choice(len(others), size=count - len(chosen), replace=False)]
            holders = tuple(range(len(chosen)))
            if question_type == "colour":
                return pairs, (("kind", kind),), chosen[0], holders
            return pairs, (("kind", kind),), str(len(chosen)), holders or tuple(range(count))
        every = [(k, c) for k in self.kinds for c in colours]
        pairs = [every[int(j)] for j in rng.choice(len(every), size=count, replace=False)]
        return pairs, (), "", ()

    def _place(self, rng: np.random.Generator, sizes: list[int], fixed: dict[int, tuple[int, int, int, int]]):
        """Top-left corners: shape ``i`` uniform inside ``fixed[i]`` (``(top, left, bottom, right)`` bounds of
        its box) or the canvas, its box at least ``GAP`` pixels from every box placed before it. A shape that
        finds no room in ``_PLACEMENT_TRIES`` draws restarts the scene's placement (up to as many times)."""
        for _ in range(_PLACEMENT_TRIES):
            boxes: list[tuple[int, int, int, int]] = []
            for i, size in enumerate(sizes):
                top, left, bottom, right = fixed.get(i, (0, 0, self.canvas_size, self.canvas_size))
                for _ in range(_PLACEMENT_TRIES):
                    row = int(rng.integers(top, bottom - size + 1))
                    col = int(rng.integers(left, right - size + 1))
                    box = (row, col, row + size, col + size)
                    if all(
                        box[0] >= b[2] + GAP or b[0] >= box[2] + GAP or box[1] >= b[3] + GAP or b[1] >= box[3] + GAP
                        for b in boxes
                    ):
                        boxes.append(box)
                        break
                else:
                    break  # no room: start the scene's placement over
            if len(boxes) == len(sizes):
                return [(box[0], box[1]) for box in boxes]
        raise RuntimeError(
            f"could not place {len(sizes)} shapes of sizes {sizes} without overlap; lower max_shapes or max_size"
        )

    def sample_spec(self, index: int) -> ShapeVQASpec:
        """Draw the (cheap) description of sample ``index``: question, shapes, positions, answer."""
        rng = self.rng(index)
        question_type = self.question_types[int(rng.integers(len(self.question_types)))]
        template = int(rng.integers(len(TEMPLATES[question_type])))
        count = int(rng.integers(self.min_shapes, self.max_shapes + 1))
        pairs, slots, answer, relevant = self._descriptions(rng, question_type, count)
        sizes = [int(s) for s in rng.integers(self.min_size, self.max_size + 1, size=count)]
        textures = [TEXTURES[int(t)] for t in rng.integers(len(TEXTURES), size=count)]
        half = self.canvas_size // 2
        fixed: dict[int, tuple[int, int, int, int]] = {}
        if question_type == "where":  # shape 0's whole box in a quadrant drawn first
            quadrant = int(rng.integers(4))
            row, col = quadrant // 2, quadrant % 2
            fixed[0] = (row * half, col * half, row * half + half, col * half + half)
            answer = f"{VERTICAL_WORDS[row]} {HORIZONTAL_WORDS[col]}"
            relevant = (0,)
        if question_type == "relation":
            relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
            yes = bool(rng.random() < 0.5)
            axis = 1 if relation == "left of" else 0
            for _ in range(_PLACEMENT_TRIES):  # shapes 0 and 1 apart along the asked axis
                positions = self._place(rng, sizes, fixed)
                if (
                    positions[0][axis] + sizes[0] <= positions[1][axis]
                    or positions[1][axis] + sizes[1] <= positions[0][axis]
                ):
                    break
            else:
                raise RuntimeError("could not separate two shapes along an axis; lower max_size or max_shapes")
            before = 0 if positions[0][axis] < positions[1][axis] else 1  # the shape left of / above the other
            first, second = (before, 1 - before) if yes else (1 - before, before)
            slots = (("first", f"{pairs[first][1]} {pairs[first][0]}"), ("relation", relation),
                     ("second", f"{pairs[second][1]} {pairs[second][0]}"))  # fmt: skip
            answer, relevant = ("yes" if yes else "no"), (0, 1)
        else:
            positions = self._place(rng, sizes, fixed)
            if question_type == "where":
                slots = (("first", f"{pairs[0][1]} {pairs[0][0]}"),)
        shapes = tuple(
            PlacedShape(kind, colour, texture, size, pos)
            for (kind, colour), texture, size, pos in zip(pairs, textures, sizes, positions, strict=True)
        )
        noise_seed = int(rng.integers(2**31))
        return ShapeVQASpec(question_type, template, slots, shapes, answer, tuple(relevant), noise_seed)

    # -- pixels, masks, text -------------------------------------------------------------------------
    def alphas(self, spec: ShapeVQASpec) -> np.ndarray:
        """Float32 ``[num_shapes, H, W]``: each shape's silhouette coverage (0..1) on the canvas."""
        out = np.zeros((len(spec.shapes), self.canvas_size, self.canvas_size), dtype=np.float32)
        for k, shape in enumerate(spec.shapes):
            top, left, bottom, right = shape.box()
            out[k, top:bottom, left:right] = shape_alpha(SHAPES.index(shape.kind), shape.size)
        return out

    def render(self, spec: ShapeVQASpec) -> tuple[np.ndarray, np.ndarray]:
        """Raw float32 canvas ``[3, H, W]`` (0..255) and the bool oracle mask ``[num_patches]``."""
        noise = np.random.default_rng(spec.noise_seed).random((self.canvas_size, self.canvas_size), dtype=np.float32)
        canvas = np.repeat((BACKGROUND + BACKGROUND_NOISE * noise)[None], 3, axis=0)
        alphas = self.alphas(spec)
        rows, cols = np.mgrid[0 : self.canvas_size, 0 : self.canvas_size]
        for shape, alpha in zip(spec.shapes, alphas, strict=True):
            local_row, local_col = rows - shape.pos[0], cols - shape.pos[1]
            if shape.texture == "striped":
                shade = np.where((local_row // 2) % 2 == 1, TEXTURE_SHADE, 1.0)
            elif shape.texture == "checked":
                shade = np.where((local_row // 2 + local_col // 2) % 2 == 1, TEXTURE_SHADE, 1.0)
            else:
                shade = np.ones_like(alpha)
            fill = np.asarray(COLOURS[shape.colour], dtype=np.float32)[:, None, None] * shade[None]
            canvas = canvas * (1.0 - alpha[None]) + fill * alpha[None]
        relevant = alphas[list(spec.relevant)].max(0) > 0 if spec.relevant else np.zeros(canvas.shape[1:], bool)
        return canvas.astype(np.float32), patch_mask(relevant, self.patch_size)

    def patch_targets(self, spec: ShapeVQASpec) -> tuple[np.ndarray, np.ndarray]:
        """Int64 ``[num_patches]`` twice: the colour index and the kind index (:data:`COLOURS`, :data:`KINDS`) of
        the shape covering most of each patch, -100 where no shape covers any pixel."""
        p, g = self.patch_size, self.grid_size
        alphas = self.alphas(spec)
        cover = alphas.reshape(len(spec.shapes), g, p, g, p).sum(axis=(2, 4)).reshape(len(spec.shapes), -1)
        best = cover.argmax(0)
        empty = cover.max(0) <= 0
        colour_ids = np.array([list(COLOURS).index(s.colour) for s in spec.shapes])[best]
        kind_ids = np.array([KINDS.index(s.kind) for s in spec.shapes])[best]
        colour_ids[empty] = IGNORE_INDEX
        kind_ids[empty] = IGNORE_INDEX
        return colour_ids.astype(np.int64), kind_ids.astype(np.int64)

    def question(self, spec: ShapeVQASpec) -> str:
        """The question with a single ``<image>`` where the template puts the image, then ``answer :``."""
        return TEMPLATES[spec.question_type][spec.template].format(image=IMAGE_TOKEN, **dict(spec.slots)) + (
            " " + ANSWER_CUE
        )

    def question_answer(self, index: int) -> tuple[str, str, str]:
        """``(question, answer, question type)`` of sample ``index`` without rendering it (cheap)."""
        spec = self.sample_spec(index)
        return self.question(spec), spec.answer, spec.question_type

    def collator(self, padding_side: str = "left", with_answer: bool = True) -> VQACollator:
        """A collator of this split's items (LLaVA layout)."""
        return VQACollator(self.tokenizer.pad_token_id, padding_side, with_answer)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        spec = self.sample_spec(index)
        canvas, oracle = self.render(spec)
        colours, kinds = self.patch_targets(spec)
        input_ids, labels = encode_sample(self.tokenizer, self.question(spec), spec.answer, self.num_image_tokens)
        return {
            "pixel_values": torch.from_numpy(canvas / (RAW_MAX / 2) - 1.0),
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": labels,
            "oracle_mask": torch.from_numpy(oracle),
            "patch_colours": torch.from_numpy(colours),
            "patch_kinds": torch.from_numpy(kinds),
            "question_type": torch.tensor(QUESTION_TYPES.index(spec.question_type), dtype=torch.long),
            "index": torch.tensor(self._check_index(index), dtype=torch.long),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_samples={self.num_samples}, "
            f"canvas_size={self.canvas_size}, patch_size={self.patch_size}, sizes={self.min_size}..{self.max_size}, "
            f"shapes={self.min_shapes}..{self.max_shapes}, kinds={list(self.kinds)}, "
            f"question_types={list(self.question_types)}, num_image_tokens={self.num_image_tokens}, seed={self.seed})"
        )


class ShapeVQADataModule(VQADataModule):
    """Lightning data module for shape VQA (see :mod:`tokensift.data.shape_vqa`).

    Buildable from YAML by ``LightningCLI`` / ``tokensift bench --data`` / ``tokensift pretrain-mllm --data``::

        data:
          class_path: tokensift.data.ShapeVQADataModule
          init_args: {batch_size: 32, canvas_size: 64, question_types: [colour, where]}

    Exposes what a model config needs (``tokenizer``, ``vocab_size``, ``image_token_id``, ``pad_token_id``,
    ``answer_token_ids``, ``image_size``, ``patch_size``, ``num_channels``, ``num_patches``,
    ``num_image_tokens``, ``question_type_names``), ``collate_fn`` / ``collator(padding_side, with_answer)``,
    ``image_processor()`` and ``alignment_targets(batch)``. Batches follow the VQA batch contract
    (:mod:`tokensift.data.contract`); ``family="qwen2_vl"`` gives them Qwen2-VL's processor layout. Arguments
    are validated in ``__init__``.
    """

    dataset_class = ShapeVQA
    raw_max_value = RAW_MAX

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 0,
        train_samples: int = 65536,
        val_samples: int = 512,
        test_samples: int = 1024,
        canvas_size: int = 64,
        patch_size: int = 8,
        min_size: int = 10,
        max_size: int = 20,
        min_shapes: int = 2,
        max_shapes: int = 4,
        kinds: Sequence[str] = DEFAULT_KINDS,
        question_types: Sequence[str] = QUESTION_TYPES,
        num_image_tokens: int | None = None,
        padding_side: str = "left",
        seed: int = 0,
        pin_memory: bool = False,
        family: str = "llava",
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers, train_samples, val_samples, test_samples, is_integer=is_int)
        check_family(family)
        self.save_hyperparameters()
        self._init_splits(batch_size, num_workers, pin_memory, seed, train_samples, val_samples, test_samples)
        self._dataset_kwargs = dict(
            canvas_size=canvas_size,
            patch_size=patch_size,
            min_size=min_size,
            max_size=max_size,
            min_shapes=min_shapes,
            max_shapes=max_shapes,
            kinds=tuple(kinds),
            question_types=tuple(question_types),
            num_image_tokens=num_image_tokens,
            seed=seed,
        )
        self._init_vqa(padding_side, family)

    def alignment_targets(self, batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What each image token should name (the MLLM recipe's alignment term): ``(word ids [K], target index
        [B, P])`` per group: the colour and the kind of the shape covering the patch (-100 on background), the
        patch's row half (``top`` / ``bottom``) and column half (``left`` / ``right``)."""
        colours, kinds = batch["patch_colours"], batch["patch_kinds"]
        device, size = colours.device, colours.shape[0]
        words = self.tokenizer.convert_tokens_to_ids
        row_half, column_half = self.patch_halves(device)
        return [
            (torch.tensor(words(list(COLOURS)), device=device), colours),
            (torch.tensor(words(list(KINDS)), device=device), kinds),
            (torch.tensor(words(list(VERTICAL_WORDS)), device=device), row_half.expand(size, -1)),
            (torch.tensor(words(list(HORIZONTAL_WORDS)), device=device), column_half.expand(size, -1)),
        ]
