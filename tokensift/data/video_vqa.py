"""Video digit VQA: short videos of handwritten digits on a static cluttered background, questions whose answer
depends on *when* and *where* digits are, and the visual tokens each question needs.

The video counterpart of :mod:`tokensift.data.digit_vqa`, for video token reduction (STTS, HoliTom, ...): adjacent
frames share an identical background, so most visual tokens are redundant across time, as in real video, while the
answer lives in a few tokens of a few frames.

Scene. Each frame is a square canvas (default 84x84) cut into four quadrants. A static background of
``num_clutter`` stroke fragments (crops of other split digits at their 8x8 source scale) is identical in every
frame. Between ``min_digits`` and ``max_digits`` (default 2..3) quadrants each hold one real handwritten digit
(scikit-learn's ``load_digits``, upscaled by ``digit_scale``, default 2 -> 16x16 px), all of distinct classes,
each visible in a window of frames. Layers are composited with a pixel-wise max and normalised with ``x / 8 - 1``.
A video has ``min_frames..max_frames`` frames (drawn per sample, default 8..8), so a batch may hold videos of
different lengths.

Questions (``question_types``; every answer is one token, a number word ``0``..``16``):

* ``first``: "which digit appears first ?" -> the class of the digit that shows up first (onsets are distinct;
  after its onset a digit flickers, shown in each frame with probability 0.5, and is always in the last frame:
  the last frame alone shows them all, and the number of frames a digit shows in does not tell its onset).
  Oracle: that digit's ink in the frame it appears.
* ``last``: "which digit appears last ?" -> the class of the digit that shows up last. Oracle: as ``first``.
* ``moves``: "which digit moves ?" -> the class of the one digit that slides across its quadrant (by at least
  ``digit_size * 3 / 4`` px), the others stand still; all are visible throughout. Oracle: the mover's ink in
  every frame.
* ``count_frames``: "in how many frames is there a 3 ?" -> the length of the queried digit's window (uniform in
  ``1..frames``); the other digits are of other classes. Oracle: the queried digit's ink in every frame it shows.

Shuffling the frames changes ``first`` / ``last`` answers (:meth:`VideoDigitVQA.permuted_spec`) while the last frame
may stay the same; a single frame cannot tell which digit moved
(``single_frame=True`` keeps only the last frame: the single-frame baseline of a trained model).

Layouts (``family``), each the model processor's own, built here without torchvision:

* ``molmo2``: ``pixel_values_videos`` ``[frames, patches, patch * patch * C]`` (``Molmo2VideoProcessor``'s
  patches of ``patch_size`` px), ``video_token_pooling`` ``[tokens, pool * pool]`` (its ``arange_for_pooling``:
  one LLM token per ``pool_size x pool_size`` patch window, indices into the batch's flattened patches),
  ``video_grids`` ``[(frames, rows, cols)]`` per video; the prompt holds, per frame, ``<frame_start>``, one
  ``<image>`` (the model's ``image_patch_id``) per pooled token, ``<frame_end>`` (``Molmo2Processor`` with
  ``use_frame_special_tokens``, no column tokens); ``mm_token_type_ids`` is 1 at those three tokens, as the
  processor marks them.
* ``qwen2_vl``: ``pixel_values_videos`` ``[sum of t * h * w, C * 2 * p * p]`` and ``video_grid_thw`` (the
  video processor's layout: frames paired over the temporal patch of 2, an odd video padded by repeating its
  last frame, patches ordered by 2x2 merge window), one ``<video>`` per merged token, ``mm_token_type_ids`` 2 there.

The visual tokens of a sample appear in ``input_ids`` frame (temporal patch) by frame, each in raster order of
the token grid; ``oracle_mask`` follows that order (one entry per visual token, padded with ``False`` to the
batch's longest video) and marks the tokens holding ink of the digits the question needs.

Determinism and splits as :mod:`tokensift.data.digit_vqa`: source images split train / val / test by
:func:`~tokensift.data.digits.split_sources` (the background clutter comes from the split's sources too), and
sample ``i`` is drawn from ``default_rng([seed, split_id, i])``.
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
    ClutteredDigits,
    check_integers,
    is_int,
    load_sources,
    normalize,
    paste_max,
    split_sources,
    upscale,
)
from tokensift.data.vqa import (
    ANSWER_CUE,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    QWEN2_VL_MERGE,
    QWEN2_VL_TEMPORAL,
    VQACollator,
    VQADataModule,
    build_word_tokenizer,
    check_vqa_grid,
    encode_sample,
    vocabulary,
)

__all__ = [
    "ANSWER_WORDS",
    "FRAME_END",
    "FRAME_START",
    "MAX_FRAMES",
    "QUESTION_TYPES",
    "TEMPLATES",
    "VIDEO_FAMILIES",
    "VIDEO_TOKEN",
    "VideoDigit",
    "VideoDigitVQA",
    "VideoDigitVQADataModule",
    "VideoSpec",
    "VideoVQACollator",
    "build_video_tokenizer",
    "molmo2_video_inputs",
    "qwen2_vl_video_patches",
]

QUESTION_TYPES: tuple[str, ...] = ("first", "last", "moves", "count_frames")
"""Every question type; a sample's ``question_type`` field is its index here."""

VIDEO_FAMILIES: tuple[str, ...] = ("molmo2", "qwen2_vl")
"""Processor layouts a video batch is written in."""

MAX_FRAMES = 16
"""The longest video: ``count_frames`` answers are the words ``0``..``16``."""

ANSWER_WORDS: tuple[str, ...] = tuple(str(n) for n in range(max(NUM_CLASSES, MAX_FRAMES + 1)))
"""Every answer is one of these words (and so one token): digit classes and frame counts."""

VIDEO_TOKEN = "<video>"  # Qwen2-VL's video placeholder, one per merged token
FRAME_START, FRAME_END = "<frame_start>", "<frame_end>"  # Molmo2's frame markers around each frame's tokens
VIDEO_SLOT = "{video}"

TEMPLATES: dict[str, tuple[str, ...]] = {
    "first": (
        "{video} which digit appears first ?",
        "which digit appears first in {video} ?",
        "which digit appears first ? {video}",
    ),
    "last": (
        "{video} which digit appears last ?",
        "which digit appears last in {video} ?",
        "which digit appears last ? {video}",
    ),
    "moves": (
        "{video} which digit moves ?",
        "which digit moves in {video} ?",
        "which digit moves ? {video}",
    ),
    "count_frames": (
        "{video} in how many frames is there a {digit} ?",
        "in how many frames of {video} is there a {digit} ?",
        "in how many frames is there a {digit} ? {video}",
    ),
}
"""Question templates per type: ``{video}`` marks where the video goes, ``{digit}`` the queried class."""

QUADRANT_COUNT = 4
MOLMO2_POOL = 3  # Molmo2Processor's default pooling window over video patches
CLUTTER_SIZE = (3, 6)  # background fragments' side in source pixels
FLICKER = 0.5  # first / last questions: a digit shows in each frame between its onset and the last with this chance


def build_video_tokenizer():
    """The task's word-level tokenizer (:func:`tokensift.data.vqa.build_word_tokenizer`): special tokens,
    ``<image>``, the answer words, the placeholders ``<video>`` / ``<frame_start>`` / ``<frame_end>``, the
    template words. The same vocabulary serves both layouts."""
    texts = [t for templates in TEMPLATES.values() for t in templates]
    texts += [VIDEO_TOKEN, FRAME_START, FRAME_END, ANSWER_CUE]
    return build_word_tokenizer(vocabulary(ANSWER_WORDS, texts))


@dataclass(frozen=True)
class VideoDigit:
    """One digit of a video: ``source`` (global ``load_digits`` index), its ``quadrant``, its top-left corner
    ``positions[t] = (row, col)`` in each frame ``t``, and the frames it is visible in (``shown``, ascending)."""

    source: int
    quadrant: int
    positions: tuple[tuple[int, int], ...]
    shown: tuple[int, ...]

    @property
    def onset(self) -> int:
        return self.shown[0]

    @property
    def moves(self) -> bool:
        return len({self.positions[t] for t in self.shown}) > 1


@dataclass(frozen=True)
class VideoSpec:
    """Everything needed to render one video sample. ``query``: the asked class (``count_frames``), else -1;
    ``background``: ``(source, crop (row, col, h, w), pos (row, col))`` per clutter fragment."""

    question_type: str
    template: int
    query: int
    num_frames: int
    digits: tuple[VideoDigit, ...]
    background: tuple[tuple[int, tuple[int, int, int, int], tuple[int, int]], ...]


def _validate(
    *,
    frame_size: int,
    patch_size: int,
    pool_size: int,
    digit_scale: int,
    min_frames: int,
    max_frames: int,
    min_digits: int,
    max_digits: int,
    num_clutter: int,
    question_types: Sequence[str],
    num_channels: int,
    family: str,
    split_fractions: Sequence[float],
    seed: int,
) -> None:
    """Raise ``ValueError`` naming the offending field (and how to fix it) for an invalid configuration."""
    check_integers(
        (
            ("frame_size", frame_size, 2),
            ("patch_size", patch_size, 1),
            ("pool_size", pool_size, 1),
            ("digit_scale", digit_scale, 1),
            ("min_frames", min_frames, 1),
            ("max_frames", max_frames, 1),
            ("min_digits", min_digits, 1),
            ("max_digits", max_digits, 1),
            ("num_clutter", num_clutter, 0),
            ("num_channels", num_channels, 1),
            ("seed", seed, 0),
        )
    )
    if family not in VIDEO_FAMILIES:
        raise ValueError(f"family must be one of {list(VIDEO_FAMILIES)} (the video processor layout), got {family!r}")
    if family == "qwen2_vl":
        check_vqa_grid(frame_size, patch_size, None, "Qwen2-VL's 2x2 merge windows tile the frame", "frame_size")
        cell = QWEN2_VL_MERGE * patch_size
    else:
        cell = pool_size * patch_size
        if frame_size % cell:
            raise ValueError(
                f"frame_size ({frame_size}) must be a multiple of pool_size * patch_size ({cell}) so Molmo2's "
                f"pooling windows tile the frame; e.g. frame_size={(frame_size // cell + 1) * cell}"
            )
    if (frame_size // 2) % cell:
        raise ValueError(
            f"frame_size / 2 ({frame_size // 2}) must be a multiple of the visual token's cell ({cell} px) so each "
            f"quadrant is whole tokens; e.g. frame_size={2 * cell * ((frame_size // (2 * cell)) + 1)}"
        )
    digit_size = SOURCE_SIZE * digit_scale
    if digit_size > frame_size // 2:
        raise ValueError(
            f"digit_scale ({digit_scale}) makes digits {digit_size} px, larger than a quadrant "
            f"({frame_size // 2} px); lower digit_scale or raise frame_size to >= {2 * digit_size}"
        )
    if "moves" in question_types and frame_size // 2 - digit_size < 3 * digit_size // 4:
        raise ValueError(
            f"frame_size ({frame_size}) leaves a {digit_size}-px digit {frame_size // 2 - digit_size} px of travel in "
            f"its quadrant; 'moves' questions slide it >= {3 * digit_size // 4} px: raise frame_size to >= "
            f"{2 * (digit_size + 3 * digit_size // 4)}, lower digit_scale or drop 'moves' from question_types"
        )
    if not 1 <= min_digits <= max_digits <= QUADRANT_COUNT:
        raise ValueError(
            f"min_digits ({min_digits}) and max_digits ({max_digits}) must satisfy "
            f"1 <= min_digits <= max_digits <= {QUADRANT_COUNT} (one digit per quadrant)"
        )
    if not min_frames <= max_frames <= MAX_FRAMES:
        raise ValueError(
            f"min_frames ({min_frames}) and max_frames ({max_frames}) must satisfy min_frames <= max_frames <= "
            f"{MAX_FRAMES} (count answers are the words 0..{MAX_FRAMES})"
        )
    if isinstance(question_types, str) or not question_types:
        raise ValueError(f"question_types must be a non-empty list drawn from {list(QUESTION_TYPES)}")
    unknown = [q for q in question_types if q not in QUESTION_TYPES]
    if unknown or len(set(question_types)) != len(question_types):
        raise ValueError(
            f"question_types must be distinct names from {list(QUESTION_TYPES)}, got {list(question_types)}"
        )
    if ("first" in question_types or "last" in question_types) and min_frames < max_digits:
        raise ValueError(
            f"min_frames ({min_frames}) must be >= max_digits ({max_digits}): 'first' / 'last' questions give "
            "every digit its own onset frame; raise min_frames or lower max_digits"
        )
    if len(split_fractions) != 3 or any(not (f > 0) for f in split_fractions) or abs(sum(split_fractions) - 1) > 1e-6:
        raise ValueError(
            f"split_fractions must be 3 positive numbers summing to 1 (train, val, test), got {split_fractions!r}"
        )


def qwen2_vl_video_patches(
    frames: torch.Tensor,
    patch_size: int,
    merge_size: int = QWEN2_VL_MERGE,
    temporal_patch_size: int = QWEN2_VL_TEMPORAL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One video ``[T, C, H, W]`` -> Qwen2-VL's flattened video patches and its ``(t, h, w)`` grid.

    The layout of ``Qwen2VLVideoProcessor``: a video whose length is not a multiple of ``temporal_patch_size``
    is padded by repeating its last frame; patches are ordered by temporal patch, then merge window (row-major),
    then row-major within the window, each flattened as (C, temporal, patch, patch). A video of identical frames
    gives :func:`~tokensift.data.vqa.qwen2_vl_patches` of one frame. Returns ``(patches [t * h * w, C * temporal
    * p * p], grid_thw [3])``.
    """
    count, channels, height, width = frames.shape
    padding = -count % temporal_patch_size
    if padding:
        frames = torch.cat([frames, frames[-1:].expand(padding, -1, -1, -1)])
    grid_t = frames.shape[0] // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = frames.reshape(
        grid_t, temporal_patch_size, channels,
        grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size,
    )  # fmt: skip
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, gh/m, gw/m, m, m, C, temporal, p, p)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return flat, torch.tensor([grid_t, grid_h, grid_w], dtype=torch.long)


def molmo2_video_inputs(
    videos: Sequence[torch.Tensor], patch_size: int, pool_size: int = MOLMO2_POOL
) -> dict[str, torch.Tensor]:
    """Videos ``[T_i, C, H, W]`` (already normalised) -> Molmo2's video inputs, as ``Molmo2VideoProcessor`` lays
    them out for the same frames: ``pixel_values_videos [sum T_i, patches, p * p * C]``, ``video_token_pooling``
    ``[tokens, pool * pool]`` (indices into the flattened patches of every video, -1 padding, from transformers'
    own ``arange_for_pooling`` / ``batch_pixels_to_patches``) and ``video_grids [videos, 3]`` (frames, rows, cols)."""
    from transformers.models.molmo2.video_processing_molmo2 import arange_for_pooling, batch_pixels_to_patches

    patches, pooling, grids = [], [], []
    offset = 0
    for video in videos:
        count, _, height, width = video.shape
        frame_patches = batch_pixels_to_patches(video.permute(0, 2, 3, 1), patch_size)  # [T, n, p*p*C]
        per_frame = frame_patches.shape[1]
        grid = torch.arange(per_frame, dtype=torch.long).reshape(height // patch_size, width // patch_size)
        indices, rows, cols = arange_for_pooling(grid, pool_size, pool_size)
        frame_offsets = (offset + torch.arange(count) * per_frame).view(-1, 1, 1)
        pooling.append(torch.where(indices >= 0, indices + frame_offsets, indices).reshape(-1, indices.shape[-1]))
        patches.append(frame_patches)
        grids.append(torch.tensor([count, rows, cols], dtype=torch.long))
        offset += count * per_frame
    return {
        "pixel_values_videos": torch.cat(patches),
        "video_token_pooling": torch.cat(pooling),
        "video_grids": torch.stack(grids),
    }


class VideoDigitVQA(SeededSplitDataset):
    """One split of the video digit-VQA task, generated on the fly and deterministic from ``seed``.

    See the module docstring for the rules. Items are dicts::

        {"frames": float32 [T, C, H, W],     # x / 8 - 1; T = the video's frames (1 with single_frame)
         "input_ids" / "attention_mask" / "labels": int64 [L],  # the family's prompt, then the answer token
         "answer_id": int64 scalar,
         "oracle_mask": bool [P],            # per visual token, in input_ids order
         "token_classes": int64 [P],         # class of the digit inking each visual token, -100 elsewhere
         "question_type": int64 scalar, "num_frames": int64 scalar, "index": int64 scalar}

    Args:
        split: ``train``, ``val`` or ``test``.
        num_samples: split size (default 65536 / 512 / 1024).
        frame_size / patch_size: frame side and the vision tower's patch side in pixels.
        pool_size: Molmo2's pooling window (``pool_size x pool_size`` patches per LLM token); Qwen2-VL merges 2x2.
        digit_scale: integer upscaling of the 8x8 sources.
        min_frames / max_frames: frames per video, drawn uniformly per sample (1..16).
        min_digits / max_digits: digits per video, 1..4 (one per quadrant), of distinct classes.
        num_clutter: background stroke fragments (identical in every frame).
        question_types: subset of :data:`QUESTION_TYPES`, drawn uniformly.
        num_channels: grey replicated to this many channels.
        family: ``molmo2`` or ``qwen2_vl``: the prompt's placeholders (and the collator's layout).
        single_frame: keep only the last frame (same questions and answers): the single-frame baseline.
        align_digits: put a still digit (and a moving one's first and last position) inside one visual token's
            cell when it fits in one, else on the patch grid (default); ``False``: at any pixel.
        seed, split_fractions: as :class:`~tokensift.data.digit_vqa.DigitVQA`.
        tokenizer: default :func:`build_video_tokenizer`.
    """

    question_type_names = QUESTION_TYPES

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        *,
        frame_size: int = 84,
        patch_size: int = 7,
        pool_size: int = MOLMO2_POOL,
        digit_scale: int = 2,
        min_frames: int = 8,
        max_frames: int = 8,
        min_digits: int = 2,
        max_digits: int = 3,
        num_clutter: int = 6,
        question_types: Sequence[str] = QUESTION_TYPES,
        num_channels: int = 3,
        family: str = "molmo2",
        single_frame: bool = False,
        align_digits: bool = True,
        seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        tokenizer=None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if num_samples is None:
            num_samples = {"train": 65536, "val": 512, "test": 1024}[split]
        if not is_int(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        _validate(
            frame_size=frame_size,
            patch_size=patch_size,
            pool_size=pool_size,
            digit_scale=digit_scale,
            min_frames=min_frames,
            max_frames=max_frames,
            min_digits=min_digits,
            max_digits=max_digits,
            num_clutter=num_clutter,
            question_types=question_types,
            num_channels=num_channels,
            family=family,
            split_fractions=split_fractions,
            seed=seed,
        )
        self.split, self.split_id, self.num_samples = split, SPLITS[split], int(num_samples)
        self.frame_size = self.image_size = int(frame_size)
        self.patch_size, self.pool_size = int(patch_size), int(pool_size)
        self.digit_scale = int(digit_scale)
        self.digit_size = SOURCE_SIZE * self.digit_scale
        self.min_frames, self.max_frames = int(min_frames), int(max_frames)
        self.min_digits, self.max_digits = int(min_digits), int(max_digits)
        self.num_clutter = int(num_clutter)
        self.question_types = tuple(question_types)
        self.num_channels = int(num_channels)
        self.family = family
        self.single_frame = bool(single_frame)
        self.align_digits = bool(align_digits)
        self.seed = int(seed)
        self.split_fractions = tuple(float(f) for f in split_fractions)
        # the LLM token's cell: Molmo2 pools pool x pool patches per frame, Qwen2-VL merges 2x2 over 2 frames
        self.token_merge = QWEN2_VL_MERGE if family == "qwen2_vl" else self.pool_size
        self.temporal_patch = QWEN2_VL_TEMPORAL if family == "qwen2_vl" else 1
        self.token_cell = self.patch_size * self.token_merge
        self.grid_size = self.frame_size // self.token_cell
        self.tokens_per_frame = self.grid_size**2
        self.patches_per_frame = (self.frame_size // self.patch_size) ** 2
        self.tokenizer = build_video_tokenizer() if tokenizer is None else tokenizer
        vocab = self.tokenizer.get_vocab()
        missing = [w for w in (IMAGE_TOKEN, VIDEO_TOKEN, FRAME_START, FRAME_END, *ANSWER_WORDS) if w not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the task's tokens {missing}; pass build_video_tokenizer() or None")
        placeholder = VIDEO_TOKEN if family == "qwen2_vl" else IMAGE_TOKEN
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(placeholder)
        self.frame_token_ids = tuple(self.tokenizer.convert_tokens_to_ids([FRAME_START, FRAME_END]))
        self.answer_token_ids = self.tokenizer.convert_tokens_to_ids(list(ANSWER_WORDS))

        self.min_travel = 3 * self.digit_size // 4  # a moving digit slides at least this far
        corners = self.corner_offsets()
        if "moves" in self.question_types and corners.max() - corners.min() < self.min_travel:
            raise ValueError(
                f"align_digits leaves corners {corners.tolist()} in a quadrant: no room to slide a digit "
                f"{self.min_travel} px for 'moves' questions; set align_digits=False or raise frame_size"
            )
        images, labels = load_sources()
        self._images, self._labels = images, labels
        self.source_indices: np.ndarray = split_sources(self.seed, self.split_fractions)[split]
        split_labels = labels[self.source_indices]
        self._class_sources = [self.source_indices[split_labels == c] for c in range(NUM_CLASSES)]
        empty = [c for c, pool in enumerate(self._class_sources) if len(pool) == 0]
        if empty:
            raise ValueError(
                f"split_fractions {self.split_fractions} leave the {split} split no source image of class(es) "
                f"{empty}; raise the split's fraction"
            )

    # -- drawing -----------------------------------------------------------------------------------------------
    def sample_spec(self, index: int) -> VideoSpec:
        """Draw the (cheap) description of sample ``index``: question, digits and their frames, background."""
        rng = self.rng(index)
        question_type = self.question_types[int(rng.integers(len(self.question_types)))]
        template = int(rng.integers(len(TEMPLATES[question_type])))
        frames = int(rng.integers(self.min_frames, self.max_frames + 1))
        count = int(rng.integers(self.min_digits, self.max_digits + 1))
        quadrants = rng.choice(QUADRANT_COUNT, size=count, replace=False)
        query = -1
        if question_type in ("first", "last"):
            classes = rng.choice(NUM_CLASSES, size=count, replace=False)
            # distinct onsets; after its onset a digit flickers (each frame shown with probability FLICKER) but is
            # always in the last frame: the last frame shows every digit, and the count of frames a digit shows in
            # does not give its onset away
            starts = rng.choice(frames, size=count, replace=False)
            shown = []
            for start in starts.tolist():
                later = [t for t in range(start + 1, frames - 1) if rng.random() < FLICKER]
                shown.append(sorted({start, *later, frames - 1}))
            movers: set[int] = set()
        elif question_type == "moves":
            classes = rng.choice(NUM_CLASSES, size=count, replace=False)
            shown = [list(range(frames))] * count
            movers = {int(rng.integers(count))}
        else:  # count_frames: digit 0 is the queried class, seen in a window of uniform length 1..frames
            query = int(rng.integers(NUM_CLASSES))
            others = rng.choice(NUM_CLASSES - 1, size=count - 1, replace=False)
            classes = np.concatenate([[query], others + (others >= query)])
            length = int(rng.integers(1, frames + 1))
            begin = int(rng.integers(frames - length + 1))
            shown = [list(range(begin, begin + length))]
            for _ in range(count - 1):
                other_length = int(rng.integers(1, frames + 1))
                other_begin = int(rng.integers(frames - other_length + 1))
                shown.append(list(range(other_begin, other_begin + other_length)))
            movers = set()
        half, corners = self.frame_size // 2, self.corner_offsets()
        digits = []
        for k in range(count):
            source = int(rng.choice(self._class_sources[int(classes[k])]))
            quadrant = int(quadrants[k])
            origin = np.array([quadrant // 2 * half, quadrant % 2 * half])
            start_pos = rng.choice(corners, size=2)
            if k in movers:  # slide to a point at least 3/4 of a digit away, linearly over the video
                if max(abs(corners - start_pos[0]).max(), abs(corners - start_pos[1]).max()) < self.min_travel:
                    start_pos = np.array([corners.min(), corners.min()])  # a middle corner with no far end
                ends = [(r, c) for r in corners for c in corners if max(abs(r - start_pos[0]), abs(c - start_pos[1]))
                        >= self.min_travel]  # fmt: skip
                end_pos = np.array(ends[int(rng.integers(len(ends)))])
                steps = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
                path = [np.rint(start_pos + s * (end_pos - start_pos)).astype(int) for s in steps]
            else:
                path = [start_pos] * frames
            positions = tuple((int(origin[0] + p[0]), int(origin[1] + p[1])) for p in path)
            digits.append(VideoDigit(source, quadrant, positions, tuple(shown[k])))
        background = []
        lo, hi = CLUTTER_SIZE
        for _ in range(self.num_clutter):
            source = int(self.source_indices[int(rng.integers(len(self.source_indices)))])
            crop = ClutteredDigits._draw_crop(rng, self._images[source], lo, hi)
            row = int(rng.integers(self.frame_size - crop[2] + 1))
            col = int(rng.integers(self.frame_size - crop[3] + 1))
            background.append((source, crop, (row, col)))
        return VideoSpec(question_type, template, query, frames, tuple(digits), tuple(background))

    def corner_offsets(self) -> np.ndarray:
        """Where a digit's top-left corner may sit along each axis of its quadrant (offsets from the quadrant's
        corner). With ``align_digits``: inside one visual token's cell when a digit fits in one (Molmo2's 21-px
        pooled cell holds a 16-px digit whole), else on the patch grid; otherwise any pixel."""
        room = self.frame_size // 2 - self.digit_size
        if not self.align_digits:
            return np.arange(room + 1)
        if self.token_cell >= self.digit_size:
            cells = (self.frame_size // 2) // self.token_cell
            inside = np.arange(self.token_cell - self.digit_size + 1)
            return np.concatenate([c * self.token_cell + inside for c in range(cells)])
        return np.arange(0, room + 1, self.patch_size)

    def digit_class(self, digit: VideoDigit) -> int:
        return int(self._labels[digit.source])

    def _answer_digit(self, spec: VideoSpec) -> int | None:
        """Number of the digit the answer is about, or ``None`` when the video does not single one out (e.g. two
        onsets in one frame after :meth:`permuted_spec`)."""
        if spec.question_type in ("first", "last"):
            onsets = [d.onset for d in spec.digits]
            pick = min(onsets) if spec.question_type == "first" else max(onsets)
            chosen = [k for k, onset in enumerate(onsets) if onset == pick]
        elif spec.question_type == "moves":
            chosen = [k for k, d in enumerate(spec.digits) if d.moves]
        else:
            chosen = [k for k, d in enumerate(spec.digits) if self.digit_class(d) == spec.query]
        return chosen[0] if len(chosen) == 1 else None

    def answer(self, spec: VideoSpec) -> str:
        """The answer word, computed from what the spec's frames show (a :meth:`permuted_spec` gets its own);
        ``""`` when the video has no single answer."""
        k = self._answer_digit(spec)
        if k is None:
            return ""
        digit = spec.digits[k]
        return str(len(digit.shown)) if spec.question_type == "count_frames" else str(self.digit_class(digit))

    def relevant_frames(self, spec: VideoSpec) -> dict[int, tuple[int, ...]]:
        """``{digit number: frames}`` whose ink the question needs (the oracle): the answer digit at its onset
        (``first`` / ``last``) or in every frame it shows (``moves``, ``count_frames``)."""
        k = self._answer_digit(spec)
        if k is None:
            return {}
        digit = spec.digits[k]
        return {k: (digit.onset,) if spec.question_type in ("first", "last") else digit.shown}

    def permuted_spec(self, spec: VideoSpec, order: Sequence[int]) -> VideoSpec:
        """The same video with its frames re-ordered: frame ``t`` of the result is frame ``order[t]`` of ``spec``."""
        if sorted(order) != list(range(spec.num_frames)):
            raise ValueError(f"order must be a permutation of range({spec.num_frames}), got {list(order)}")
        digits = tuple(
            VideoDigit(
                d.source,
                d.quadrant,
                tuple(d.positions[o] for o in order),
                tuple(t for t, o in enumerate(order) if o in d.shown),
            )
            for d in spec.digits
        )
        return VideoSpec(spec.question_type, spec.template, spec.query, spec.num_frames, digits, spec.background)

    # -- rendering ---------------------------------------------------------------------------------------------
    def render(self, spec: VideoSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw float32 frames ``[T, H, W]`` (grey levels 0..16), the bool ink of the question's digits
        ``[T, H, W]`` and the class inking each pixel ``[T, H, W]`` (-100 where no digit has ink)."""
        size = self.frame_size
        background = np.zeros((size, size), dtype=np.float32)
        for k, (source, (row, col, height, width), pos) in enumerate(spec.background):
            paste_max(background, self._images[source][row : row + height, col : col + width], pos, f"clutter {k}")
        frames = np.repeat(background[None], spec.num_frames, axis=0)
        relevant = np.zeros(frames.shape, dtype=bool)
        classes = np.full(frames.shape, IGNORE_INDEX, dtype=np.int64)
        needed = self.relevant_frames(spec)
        for k, digit in enumerate(spec.digits):
            image = upscale(self._images[digit.source], self.digit_scale)
            ink = image > 0
            for t in digit.shown:
                row, col = digit.positions[t]
                paste_max(frames[t], image, (row, col), f"digit {k} in frame {t}")
                box = (t, slice(row, row + self.digit_size), slice(col, col + self.digit_size))
                classes[box][ink] = self.digit_class(digit)
                if t in needed.get(k, ()):
                    relevant[box] |= ink
        return frames, relevant, classes

    def _kept_frames(self, count: int) -> list[int]:
        return [count - 1] if self.single_frame else list(range(count))

    def _token_grid(self, per_frame: np.ndarray, reduce) -> np.ndarray:
        """Per-pixel maps ``[T, H, W]`` -> one value per visual token ``[P]`` in the model's order (frames padded
        and paired over Qwen2-VL's temporal patch; ``reduce`` combines a token's pixels)."""
        count = per_frame.shape[0]
        padding = -count % self.temporal_patch
        if padding:
            per_frame = np.concatenate([per_frame, np.repeat(per_frame[-1:], padding, axis=0)])
        cell, grid = self.token_cell, self.grid_size
        blocks = per_frame.reshape(-1, self.temporal_patch, grid, cell, grid, cell)
        return reduce(blocks.transpose(0, 2, 4, 1, 3, 5).reshape(-1, grid * grid, self.temporal_patch * cell * cell))

    def num_visual_tokens(self, num_frames: int) -> int:
        """LLM visual tokens of a video of ``num_frames`` frames (after ``single_frame``)."""
        kept = len(self._kept_frames(num_frames))
        return -(-kept // self.temporal_patch) * self.tokens_per_frame

    def question(self, spec: VideoSpec) -> str:
        """The question with one ``{video}`` slot where the template puts the video, then ``answer :``."""
        slot = {"digit": str(spec.query)} if spec.question_type == "count_frames" else {}
        return TEMPLATES[spec.question_type][spec.template].format(video=VIDEO_SLOT, **slot) + " " + ANSWER_CUE

    def video_tokens(self, num_frames: int) -> list[str]:
        """The video's placeholder tokens, as the processors expand them: Molmo2's frame markers around each
        frame's pooled tokens, or one run of Qwen2-VL video tokens."""
        if self.family == "qwen2_vl":
            return [VIDEO_TOKEN] * self.num_visual_tokens(num_frames)
        frame = [FRAME_START, *[IMAGE_TOKEN] * self.tokens_per_frame, FRAME_END]
        return frame * len(self._kept_frames(num_frames))

    def question_answer(self, index: int) -> tuple[str, str, str]:
        """``(question, answer, question type)`` of sample ``index`` without rendering it: what an image-blind
        answerer sees (:func:`~tokensift.backbones.pretrain_mllm.text_only_baseline`)."""
        spec = self.sample_spec(index)
        return self.question(spec), self.answer(spec), spec.question_type

    def item(self, spec: VideoSpec, index: int) -> dict[str, torch.Tensor]:
        """The item of ``spec`` (any spec, e.g. :meth:`reversed_spec` of a drawn one) numbered ``index``."""
        frames, relevant, classes = self.render(spec)
        kept = self._kept_frames(spec.num_frames)
        frames, relevant, classes = frames[kept], relevant[kept], classes[kept]
        oracle = self._token_grid(relevant, lambda block: block.any(-1)).reshape(-1)
        # a token's class: its most frequent digit class by ink pixels (digits sit in separate quadrants, so a
        # token holds at most one; -100 when it holds none)
        token_classes = self._token_grid(classes, lambda block: block.max(-1)).reshape(-1)
        question = self.question(spec).replace(VIDEO_SLOT, IMAGE_TOKEN)
        input_ids, labels = encode_sample(self.tokenizer, question, self.answer(spec), 1)
        video = torch.tensor(self.tokenizer.convert_tokens_to_ids(self.video_tokens(spec.num_frames)))
        at = int((input_ids == self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).nonzero()[0])
        input_ids = torch.cat([input_ids[:at], video, input_ids[at + 1 :]])
        labels = torch.cat([labels[:at], torch.full_like(video, IGNORE_INDEX), labels[at + 1 :]])
        pixels = torch.from_numpy(normalize(frames)).unsqueeze(1).repeat(1, self.num_channels, 1, 1)
        return {
            "frames": pixels,
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": labels,
            "answer_id": input_ids[-1].clone(),
            "oracle_mask": torch.from_numpy(oracle.copy()),
            "token_classes": torch.from_numpy(token_classes.copy()),
            "question_type": torch.tensor(QUESTION_TYPES.index(spec.question_type), dtype=torch.long),
            "num_frames": torch.tensor(len(kept), dtype=torch.long),
            "index": torch.tensor(self._check_index(index), dtype=torch.long),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.item(self.sample_spec(index), index)

    def collator(self, padding_side: str = "left", with_answer: bool = True) -> VideoVQACollator:
        """A collator of this split's items in its family's layout."""
        return VideoVQACollator(
            self.tokenizer.pad_token_id, padding_side, with_answer, self.family, self.patch_size, self.image_token_id,
            pool_size=self.pool_size, frame_token_ids=self.frame_token_ids,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_samples={self.num_samples}, family={self.family!r}, "
            f"frame_size={self.frame_size}, patch_size={self.patch_size}, frames={self.min_frames}..{self.max_frames}"
            f", digits={self.min_digits}..{self.max_digits}, question_types={list(self.question_types)}, "
            f"single_frame={self.single_frame}, seed={self.seed}, sources={len(self.source_indices)})"
        )


_RAGGED = ("frames", "oracle_mask", "token_classes")  # per-sample lengths: padded or packed by the collator


@dataclass(frozen=True)
class VideoVQACollator(VQACollator):
    """Pad :class:`VideoDigitVQA` items into a batch of the VQA batch contract in a video processor's layout.

    The text fields are padded as :class:`~tokensift.data.vqa.VQACollator` pads them (left by default). The
    frames become Molmo2's ``pixel_values_videos`` / ``video_token_pooling`` / ``video_grids`` or Qwen2-VL's
    ``pixel_values_videos`` / ``video_grid_thw`` (see the module docstring); ``mm_token_type_ids`` marks the
    visual tokens as each processor does; ``oracle_mask`` ``[B, P]`` is padded with ``False`` and
    ``token_classes`` with -100 after each row's visual tokens (``P``: the batch's most).
    """

    family: str = "molmo2"
    pool_size: int = MOLMO2_POOL
    frame_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.family not in VIDEO_FAMILIES:
            raise ValueError(f"family must be one of {list(VIDEO_FAMILIES)}, got {self.family!r}")
        if self.patch_size is None or self.image_token_id is None:
            raise ValueError("a video collator needs the patch_size and the image_token_id (the visual placeholder)")

    def __call__(self, samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        text = VQACollator(self.pad_token_id, self.padding_side, self.with_answer)
        batch = text([{k: v for k, v in s.items() if k not in _RAGGED} for s in samples])
        videos = [s["frames"] for s in samples]
        if self.family == "molmo2":
            batch.update(molmo2_video_inputs(videos, self.patch_size, self.pool_size))
            markers = torch.tensor([self.image_token_id, *self.frame_token_ids])
            batch["mm_token_type_ids"] = torch.isin(batch["input_ids"], markers).long()
        else:
            patches, grids = zip(*(qwen2_vl_video_patches(v, self.patch_size) for v in videos), strict=True)
            batch["pixel_values_videos"], batch["video_grid_thw"] = torch.cat(patches), torch.stack(grids)
            batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).long() * 2
        width = max(len(s["oracle_mask"]) for s in samples)
        batch["oracle_mask"] = torch.zeros(len(samples), width, dtype=torch.bool)
        batch["token_classes"] = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(samples):
            batch["oracle_mask"][row, : len(sample["oracle_mask"])] = sample["oracle_mask"]
            batch["token_classes"][row, : len(sample["token_classes"])] = sample["token_classes"]
        return batch


class VideoDigitVQADataModule(VQADataModule):
    """Lightning data module for video digit VQA (see :mod:`tokensift.data.video_vqa`).

    Buildable from YAML by ``LightningCLI`` / ``tokensift pretrain-mllm --data``::

        data:
          class_path: tokensift.data.VideoDigitVQADataModule
          init_args: {batch_size: 16, family: molmo2, min_frames: 6, max_frames: 8}

    Right after construction it exposes what a model config needs: ``tokenizer``, ``vocab_size``,
    ``image_token_id`` (the family's visual placeholder: ``<image>`` for Molmo2, ``<video>`` for Qwen2-VL),
    ``video_token_id`` (the same), ``frame_token_ids``, ``pad_token_id``, ``answer_token_ids``, ``image_size``
    (the frame side), ``patch_size`` (the tower's), ``pool_size``, ``num_channels``, ``grid_size`` /
    ``tokens_per_frame`` (the LLM token grid per frame or temporal patch), ``max_frames``; ``collate_fn``.
    """

    dataset_class = VideoDigitVQA
    raw_max_value = MAX_VALUE
    collator_class = VideoVQACollator

    def __init__(
        self,
        batch_size: int = 16,
        num_workers: int = 0,
        train_samples: int = 65536,
        val_samples: int = 512,
        test_samples: int = 1024,
        frame_size: int = 84,
        patch_size: int = 7,
        pool_size: int = MOLMO2_POOL,
        digit_scale: int = 2,
        min_frames: int = 8,
        max_frames: int = 8,
        min_digits: int = 2,
        max_digits: int = 3,
        num_clutter: int = 6,
        question_types: Sequence[str] = QUESTION_TYPES,
        num_channels: int = 3,
        family: str = "molmo2",
        single_frame: bool = False,
        align_digits: bool = True,
        padding_side: str = "left",
        seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers, train_samples, val_samples, test_samples, is_integer=is_int)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.save_hyperparameters()
        self._init_splits(batch_size, num_workers, pin_memory, seed, train_samples, val_samples, test_samples)
        self._dataset_kwargs = dict(
            frame_size=frame_size,
            patch_size=patch_size,
            pool_size=pool_size,
            digit_scale=digit_scale,
            min_frames=min_frames,
            max_frames=max_frames,
            min_digits=min_digits,
            max_digits=max_digits,
            num_clutter=num_clutter,
            question_types=tuple(question_types),
            num_channels=num_channels,
            family=family,
            single_frame=single_frame,
            align_digits=align_digits,
            seed=seed,
            split_fractions=tuple(split_fractions),
        )
        probe = self.dataset_class("test", 1, **self._dataset_kwargs)  # validates every option now
        self.padding_side, self.family, self.single_frame = padding_side, family, bool(single_frame)
        self.tokenizer = probe.tokenizer
        self.vocab_size = len(self.tokenizer)
        self.image_token_id = self.video_token_id = probe.image_token_id
        self.frame_token_ids = probe.frame_token_ids
        self.pad_token_id = self.tokenizer.pad_token_id
        self.answer_token_ids = list(probe.answer_token_ids)
        self.question_type_names = tuple(probe.question_type_names)
        self.image_size = probe.image_size
        self.patch_size, self.pool_size = probe.patch_size, probe.pool_size
        self.num_channels = probe.num_channels
        self.grid_size, self.tokens_per_frame = probe.grid_size, probe.tokens_per_frame
        self.patches_per_frame = probe.patches_per_frame
        self.min_frames, self.max_frames = probe.min_frames, probe.max_frames

    def collator(self, padding_side: str | None = None, with_answer: bool = True, family: str | None = None):
        """The collate function of this module's items (its padding side and family by default; the prompt's
        placeholders are the family's, so ``family`` can only name this module's own)."""
        if family not in (None, self.family):
            raise ValueError(
                f"family: this module's prompts hold {self.family}'s placeholders; build a "
                f"VideoDigitVQADataModule(family={family!r}) for {family}'s layout"
            )
        return VideoVQACollator(
            self.pad_token_id, padding_side or self.padding_side, with_answer, self.family, self.patch_size,
            self.image_token_id, pool_size=self.pool_size, frame_token_ids=self.frame_token_ids,
        )  # fmt: skip

    def video_frames(self, index: int, split: str = "test") -> torch.Tensor:
        """The frames ``[T, C, H, W]`` (normalised) the model sees for sample ``index`` of ``split`` (the bench's
        per-frame overlays)."""
        self.setup("test" if split == "test" else "fit")
        dataset = {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}.get(split)
        if dataset is None:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return dataset[index]["frames"]

    def alignment_targets(self, batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What each visual token should name (:class:`~tokensift.backbones.pretrain_mllm.MLLMPretrainer`'s
        alignment term): the class of the digit inking it (``0``..``9`` among the digit words; -100 on background
        and padding), ``[B, P]`` in the batch's visual-token order."""
        classes = batch["token_classes"]
        words = self.tokenizer.convert_tokens_to_ids([str(d) for d in range(NUM_CLASSES)])
        return [(torch.tensor(words, device=classes.device), classes)]
