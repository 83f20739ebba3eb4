"""Cluttered digits: a small image task where only a few patches matter and the truth is known.

Each sample is a canvas (default 64x64) holding ONE target digit from scikit-learn's ``load_digits``
(1,797 real 8x8 handwritten digits, grey levels 0..16) upscaled by an integer factor (default 2, so
16x16) at a random position, plus a handful of *clutter* fragments: random crops of OTHER digit images
of the same split, upscaled by the same factor and pasted at random positions. The label is the class of
the target digit.

Why this task: a frozen ViT cuts the canvas into patches (tokens). Only the few tokens covering the target
digit carry the answer; clutter tokens look like digit strokes (they *are* digit strokes) and background
tokens carry nothing. A token-selection method therefore has to find the target among the clutter, and
how tokens are chosen matters for accuracy. Because the canvas is synthetic, we know exactly which tokens
matter: ``oracle_mask`` marks every patch that contains at least one non-zero pixel of the (upscaled)
target digit. That is ground truth for evaluating learned token scores (precision/recall of kept tokens,
accuracy with oracle tokens only, ...).

Generation rules (all deterministic from ``seed``):

* Sources are split by SOURCE image: the 1,797 images are permuted once with
  ``numpy.random.default_rng(seed)`` and cut into train/val/test (default 70/15/15 %). Targets and
  clutter of a split come only from that split's sources, so no source image appears in two splits.
* Sample ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split_id, i])`` (split ids:
  train 0, val 1, test 2), so it is identical whatever the access order, worker or process.
* The target source is uniform over the split's sources; its top-left corner is uniform over all
  positions where it fits in the canvas (not patch-aligned).
* Each clutter fragment comes from a source image different from the target's (same class allowed). Its
  crop size (height and width independently) is uniform in ``clutter_size`` (inclusive, in source
  pixels); the crop window is re-drawn (up to 10 times) until at least 25 % of its pixels are inked,
  else the inkiest window is kept. Fragments are upscaled by ``clutter_scale`` (default ``None``: the same
  factor as the target). A smaller ``clutter_scale`` (e.g. 1 with ``target_scale`` 2) draws clutter as
  small stroke fragments, so the target is recognisable as "the big digit" while clutter still puts ink
  in many patches; with equal scales a fragment can look like a whole digit and the task is much harder
  for a small ViT trained from scratch. The fragment is placed uniformly among the positions whose box does
  NOT overlap the target's box, so clutter never covers a target pixel (it may share a boundary patch
  with the target, and clutter fragments may overlap each other).
* Layers are composited with a pixel-wise maximum.
* Normalisation: ``x / 8 - 1`` over the raw 0..16 range, so background is -1 and full ink is +1. The
  single grey channel is replicated to ``num_channels`` channels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tokensift.data.base import SeededSplitDataset, SplitDataModule, check_loader_args

__all__ = [
    "SPLITS",
    "ClutterSpec",
    "ClutteredDigits",
    "ClutteredDigitsDataModule",
    "SampleSpec",
    "compose",
    "is_int",
    "load_sources",
    "normalize",
    "paste_max",
    "patch_mask",
    "split_sources",
    "upscale",
    "validate_config",
]

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
"""Split name -> split id used in the per-sample seed ``[seed, split_id, i]``."""

DEFAULT_NUM_SAMPLES: dict[str, int] = {"train": 4096, "val": 512, "test": 1024}
SOURCE_SIZE = 8  # load_digits images are 8x8
MAX_VALUE = 16.0  # load_digits grey levels are 0..16
NUM_CLASSES = 10
_CROP_TRIES = 10
_MIN_INK_FRACTION = 0.25


@functools.cache
def load_sources() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 source images (float32 [N, 8, 8], values 0..16) and their labels (int64 [N])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32)
    labels = np.asarray(digits.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of a 2-D array by an integer ``factor`` (each pixel -> factor x factor)."""
    image = np.asarray(image)
    if factor == 1:
        return image.copy()
    return np.kron(image, np.ones((factor, factor), dtype=image.dtype))


def normalize(canvas: np.ndarray) -> np.ndarray:
    """Map raw grey levels 0..16 to [-1, 1] via ``x / 8 - 1`` (background -> -1, full ink -> +1)."""
    return (np.asarray(canvas, dtype=np.float32) / (MAX_VALUE / 2) - 1.0).astype(np.float32)


def _is_python_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_int(value: object) -> bool:
    """True for Python and numpy integers, False for bools (which Python counts as integers)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_integers(fields: Sequence[tuple[str, object, int]]) -> None:
    """Raise ``ValueError`` naming the first ``(name, value, minimum)`` whose value is not an integer >= minimum."""
    for name, value, minimum in fields:
        if not is_int(value) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def paste_max(canvas: np.ndarray, layer: np.ndarray, pos: Sequence[int], what: str) -> None:
    """Composite ``layer`` into ``canvas`` in place (pixel-wise max) with its top-left corner at ``pos``.

    ``what`` names the layer in the error raised when it does not fit."""
    row, col = int(pos[0]), int(pos[1])
    height, width = layer.shape
    if row < 0 or col < 0 or row + height > canvas.shape[0] or col + width > canvas.shape[1]:
        raise ValueError(
            f"{what} of shape {layer.shape} at position {(row, col)} does not fit in a canvas of shape "
            f"{canvas.shape}; positions are (row, col) of the top-left corner"
        )
    region = canvas[row : row + height, col : col + width]
    np.maximum(region, layer, out=region)


def compose(
    canvas_size: int,
    patch_size: int,
    target: np.ndarray,
    target_pos: Sequence[int],
    clutter: Sequence[tuple[np.ndarray, Sequence[int]]] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Composite a target and clutter layers onto an empty square canvas and compute the oracle mask.

    Args:
        canvas_size: side of the square canvas in pixels; must be divisible by ``patch_size``.
        patch_size: side of a square patch (ViT token) in pixels.
        target: 2-D non-negative array (already upscaled), pasted with its top-left corner at
            ``target_pos`` = (row, col).
        target_pos: (row, col) of the target's top-left corner.
        clutter: sequence of ``(fragment, (row, col))``; fragments are 2-D non-negative arrays.

    Returns:
        ``(canvas, oracle_mask)``: ``canvas`` is float32 [canvas_size, canvas_size] in RAW units (no
        normalisation; all layers combined with a pixel-wise max over a zero background).
        ``oracle_mask`` is bool [(canvas_size // patch_size) ** 2], row-major over the patch grid, True
        for every patch containing at least one pixel where the target is > 0 (the target's ink, not its
        bounding box). Clutter never affects the mask.
    """
    if canvas_size <= 0 or patch_size <= 0 or canvas_size % patch_size != 0:
        raise ValueError(f"canvas_size ({canvas_size}) must be a positive multiple of patch_size ({patch_size})")
    target = np.asarray(target, dtype=np.float32)
    if target.ndim != 2:
        raise ValueError(f"target must be a 2-D array, got shape {target.shape}")
    canvas = np.zeros((canvas_size, canvas_size), dtype=np.float32)
    paste_max(canvas, target, target_pos, "target")
    oracle_mask = patch_mask(canvas > 0, patch_size)  # only the target has been pasted so far
    for k, (fragment, pos) in enumerate(clutter):
        fragment = np.asarray(fragment, dtype=np.float32)
        if fragment.ndim != 2:
            raise ValueError(f"clutter[{k}] must be a 2-D array, got shape {fragment.shape}")
        paste_max(canvas, fragment, pos, f"clutter[{k}]")
    return canvas, oracle_mask


def patch_mask(ink: np.ndarray, patch_size: int) -> np.ndarray:
    """Bool [(H // patch_size) * (W // patch_size)], row-major over the patch grid: True for every patch
    holding at least one True pixel of the bool [H, W] map ``ink`` (H and W multiples of ``patch_size``)."""
    height, width = ink.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"ink map of shape {ink.shape} is not a whole number of {patch_size}-pixel patches")
    grid = ink.reshape(height // patch_size, patch_size, width // patch_size, patch_size)
    return grid.any(axis=(1, 3)).reshape(-1)


def split_sources(
    seed: int, split_fractions: Sequence[float] = (0.7, 0.15, 0.15), num_sources: int | None = None
) -> dict[str, np.ndarray]:
    """Permute the source images once with ``default_rng(seed)`` and cut them into train/val/test.

    Returns split name -> sorted int64 array of global indices into ``load_digits()``. The train and val
    sizes are ``round(fraction * N)``; test gets the rest. The three arrays are disjoint and cover all N.
    """
    n = len(load_sources()[1]) if num_sources is None else num_sources
    perm = np.random.default_rng(seed).permutation(n)
    n_train = round(split_fractions[0] * n)
    n_val = round(split_fractions[1] * n)
    parts = (perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :])
    return {name: np.sort(part).astype(np.int64) for name, part in zip(SPLITS, parts, strict=True)}


def validate_config(
    *,
    canvas_size: int,
    patch_size: int,
    target_scale: int,
    num_clutter: int,
    clutter_size: Sequence[int],
    num_channels: int,
    split_fractions: Sequence[float],
    clutter_scale: int | None = None,
) -> None:
    """Raise ``ValueError`` naming the offending field (and how to fix it) for an invalid configuration."""
    check_integers(
        (
            ("canvas_size", canvas_size, 1),
            ("patch_size", patch_size, 1),
            ("target_scale", target_scale, 1),
            ("num_clutter", num_clutter, 0),
            ("num_channels", num_channels, 1),
        )
    )
    if clutter_scale is not None and (not is_int(clutter_scale) or clutter_scale < 1):
        raise ValueError(f"clutter_scale must be None (same as target_scale) or an integer >= 1, got {clutter_scale!r}")
    fragment_scale = target_scale if clutter_scale is None else clutter_scale
    if canvas_size % patch_size != 0:
        raise ValueError(
            f"canvas_size ({canvas_size}) must be divisible by patch_size ({patch_size}); pick a canvas_size "
            f"that is a multiple of patch_size, e.g. {(canvas_size // patch_size + 1) * patch_size}"
        )
    target_size = SOURCE_SIZE * target_scale
    if target_size > canvas_size:
        raise ValueError(
            f"target_scale ({target_scale}) makes the target {target_size}x{target_size} pixels, larger than "
            f"canvas_size ({canvas_size}); lower target_scale or raise canvas_size to >= {target_size}"
        )
    if len(clutter_size) != 2 or not all(is_int(v) for v in clutter_size):
        raise ValueError(f"clutter_size must be a pair of integers (min, max), got {clutter_size!r}")
    lo, hi = int(clutter_size[0]), int(clutter_size[1])
    if not 1 <= lo <= hi <= SOURCE_SIZE:
        raise ValueError(
            f"clutter_size must satisfy 1 <= min <= max <= {SOURCE_SIZE} (crop side in source pixels), "
            f"got {tuple(clutter_size)}"
        )
    if num_clutter > 0:
        room = (canvas_size - target_size + 1) // 2
        if hi * fragment_scale > room:
            raise ValueError(
                f"clutter_size max ({hi}) * clutter scale ({fragment_scale}) = {hi * fragment_scale} pixels is "
                f"too large to always place clutter beside the {target_size}x{target_size} target on a "
                f"{canvas_size}x{canvas_size} canvas (at most {room} px guaranteed); reduce clutter_size, "
                f"reduce clutter_scale/target_scale, raise canvas_size, or set num_clutter=0"
            )
    if len(split_fractions) != 3:
        raise ValueError(f"split_fractions must be 3 numbers (train, val, test), got {split_fractions!r}")
    if any(not (f > 0) for f in split_fractions) or abs(sum(split_fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split_fractions must be 3 positive numbers summing to 1 (train, val, test), got {tuple(split_fractions)}"
        )
    min_sources = 2 if num_clutter > 0 else 1
    for name, indices in split_sources(0, split_fractions).items():
        if len(indices) < min_sources:
            raise ValueError(
                f"split_fractions {tuple(split_fractions)} leave the {name} split with {len(indices)} source "
                f"image(s); it needs at least {min_sources}, so raise its fraction"
            )


@dataclass(frozen=True)
class ClutterSpec:
    """One clutter fragment: ``source`` (global index into ``load_digits``), the crop window in source
    pixels ``crop = (row, col, height, width)``, and the canvas position ``pos = (row, col)``."""

    source: int
    crop: tuple[int, int, int, int]
    pos: tuple[int, int]


@dataclass(frozen=True)
class SampleSpec:
    """Everything needed to render one sample: target source (global index), its canvas position, clutter."""

    target_source: int
    target_pos: tuple[int, int]
    clutter: tuple[ClutterSpec, ...]


class ClutteredDigits(SeededSplitDataset):
    """One split of the cluttered-digits task, generated on the fly and deterministic from ``seed``.

    See the module docstring for the generation rules. Items are dicts::

        {"pixel_values": float32 [num_channels, canvas_size, canvas_size],  # x / 8 - 1, in [-1, 1]
         "labels": int64 scalar,                                             # target digit class 0..9
         "oracle_mask": bool [num_patches],                                  # patches with target ink
         "index": int64 scalar}                                              # the sample's index in the split

    Attributes:
        source_indices: sorted int64 array of the global ``load_digits`` indices this split draws from.
        num_classes, image_size, patch_size, num_channels, grid_size, num_patches, target_size.
    """

    num_classes: int = NUM_CLASSES

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        *,
        canvas_size: int = 64,
        patch_size: int = 8,
        target_scale: int = 2,
        num_clutter: int = 6,
        clutter_size: tuple[int, int] = (4, 6),
        num_channels: int = 3,
        seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        clutter_scale: int | None = 1,
        align_target: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if num_samples is None:
            num_samples = DEFAULT_NUM_SAMPLES[split]
        if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        validate_config(
            canvas_size=canvas_size,
            patch_size=patch_size,
            target_scale=target_scale,
            num_clutter=num_clutter,
            clutter_size=clutter_size,
            num_channels=num_channels,
            split_fractions=split_fractions,
            clutter_scale=clutter_scale,
        )
        self.split = split
        self.split_id = SPLITS[split]
        self.num_samples = int(num_samples)
        self.canvas_size = self.image_size = int(canvas_size)
        self.patch_size = int(patch_size)
        self.target_scale = int(target_scale)
        self.target_size = SOURCE_SIZE * self.target_scale
        self.num_clutter = int(num_clutter)
        self.clutter_size = (int(clutter_size[0]), int(clutter_size[1]))
        self.clutter_scale = self.target_scale if clutter_scale is None else int(clutter_scale)
        self.align_target = bool(align_target)
        self.num_channels = int(num_channels)
        self.seed = int(seed)
        self.split_fractions = tuple(float(f) for f in split_fractions)
        self.grid_size = self.canvas_size // self.patch_size
        self.num_patches = self.grid_size**2

        images, labels = load_sources()
        self.source_indices: np.ndarray = split_sources(self.seed, self.split_fractions)[split]
        self._images = images  # global arrays (read-only); indexed with global source indices
        self._labels = labels

    def sample_spec(self, index: int) -> SampleSpec:
        """Draw the (cheap) description of sample ``index``: sources, crop windows and positions."""
        rng = self.rng(index)
        sources = self.source_indices
        n_src = len(sources)
        canvas, size = self.canvas_size, self.target_size
        t_local = int(rng.integers(n_src))
        if self.align_target:  # on the patch grid: each target patch holds the same part of the digit
            slots = (canvas - size) // self.patch_size + 1
            t_row, t_col = (int(v) * self.patch_size for v in rng.integers(0, slots, size=2))
        else:
            t_row, t_col = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
        lo, hi = self.clutter_size
        clutter = []
        for _ in range(self.num_clutter):
            c_local = int(rng.integers(n_src - 1))
            c_local += c_local >= t_local  # any source but the target's
            source = int(sources[c_local])
            crop = self._draw_crop(rng, self._images[source], lo, hi)
            frag_h, frag_w = crop[2] * self.clutter_scale, crop[3] * self.clutter_scale
            rows = np.arange(canvas - frag_h + 1)
            cols = np.arange(canvas - frag_w + 1)
            row_ok = (rows + frag_h <= t_row) | (rows >= t_row + size)
            col_ok = (cols + frag_w <= t_col) | (cols >= t_col + size)
            valid = np.flatnonzero(row_ok[:, None] | col_ok[None, :])  # box must not overlap target box
            flat = int(valid[rng.integers(len(valid))])
            clutter.append(ClutterSpec(source, crop, (flat // len(cols), flat % len(cols))))
        return SampleSpec(int(sources[t_local]), (t_row, t_col), tuple(clutter))

    @staticmethod
    def _draw_crop(rng: np.random.Generator, image: np.ndarray, lo: int, hi: int) -> tuple[int, int, int, int]:
        best, best_ink = None, -1.0
        for _ in range(_CROP_TRIES):
            height, width = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            row = int(rng.integers(SOURCE_SIZE - height + 1))
            col = int(rng.integers(SOURCE_SIZE - width + 1))
            ink = float((image[row : row + height, col : col + width] > 0).mean())
            if ink > best_ink:
                best, best_ink = (row, col, height, width), ink
            if ink >= _MIN_INK_FRACTION:
                break
        assert best is not None
        return best

    def render(self, spec: SampleSpec) -> tuple[np.ndarray, np.ndarray]:
        """Render a spec with :func:`compose`: raw float32 canvas [H, W] (0..16) and bool oracle mask."""
        target = upscale(self._images[spec.target_source], self.target_scale)
        clutter = []
        for c in spec.clutter:
            row, col, height, width = c.crop
            fragment = self._images[c.source][row : row + height, col : col + width]
            clutter.append((upscale(fragment, self.clutter_scale), c.pos))
        return compose(self.canvas_size, self.patch_size, target, spec.target_pos, clutter)

    def target_source(self, index: int) -> int:
        """Global ``load_digits`` index of the target digit of sample ``index``."""
        return self.sample_spec(index).target_source

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        spec = self.sample_spec(index)
        canvas, mask = self.render(spec)
        image = torch.from_numpy(normalize(canvas))
        return {
            "pixel_values": image.unsqueeze(0).repeat(self.num_channels, 1, 1),
            "labels": torch.tensor(int(self._labels[spec.target_source]), dtype=torch.long),
            "oracle_mask": torch.from_numpy(mask.copy()),
            "index": torch.tensor(self._check_index(index), dtype=torch.long),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_samples={self.num_samples}, "
            f"canvas_size={self.canvas_size}, patch_size={self.patch_size}, "
            f"target_scale={self.target_scale}, num_clutter={self.num_clutter}, "
            f"clutter_size={self.clutter_size}, clutter_scale={self.clutter_scale}, num_channels={self.num_channels}, "
            f"seed={self.seed}, sources={len(self.source_indices)})"
        )


class ClutteredDigitsDataModule(SplitDataModule):
    """Lightning data module for the cluttered-digits task (see :mod:`tokensift.data.digits`).

    Buildable from YAML by ``LightningCLI``::

        data:
          class_path: tokensift.data.ClutteredDigitsDataModule
          init_args: {batch_size: 64, canvas_size: 64, patch_size: 4, num_clutter: 6}

    ``num_classes``, ``image_size``, ``patch_size``, ``num_channels`` and ``num_patches`` are available
    right after construction, to build a matching ViT config. Arguments are validated in ``__init__``.
    ``setup`` is cheap: no I/O beyond scikit-learn's bundled digits; samples are generated on the fly.
    """

    num_classes: int = NUM_CLASSES

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        train_samples: int = 4096,
        val_samples: int = 512,
        test_samples: int = 1024,
        canvas_size: int = 64,
        patch_size: int = 8,
        target_scale: int = 2,
        num_clutter: int = 6,
        clutter_size: tuple[int, int] = (4, 6),
        num_channels: int = 3,
        seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        pin_memory: bool = False,
        clutter_scale: int | None = 1,
        align_target: bool = True,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers, train_samples, val_samples, test_samples, is_integer=_is_python_int)
        validate_config(
            canvas_size=canvas_size,
            patch_size=patch_size,
            target_scale=target_scale,
            num_clutter=num_clutter,
            clutter_size=clutter_size,
            num_channels=num_channels,
            split_fractions=split_fractions,
            clutter_scale=clutter_scale,
        )
        self.save_hyperparameters()
        self._init_splits(batch_size, num_workers, pin_memory, seed, train_samples, val_samples, test_samples)
        self.image_size = canvas_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.grid_size = canvas_size // patch_size
        self.num_patches = self.grid_size**2
        self._dataset_kwargs = dict(
            canvas_size=canvas_size,
            patch_size=patch_size,
            target_scale=target_scale,
            num_clutter=num_clutter,
            clutter_size=tuple(clutter_size),
            clutter_scale=clutter_scale,
            align_target=align_target,
            num_channels=num_channels,
            seed=seed,
            split_fractions=tuple(split_fractions),
        )

    def _build(self, split: str) -> ClutteredDigits:
        return ClutteredDigits(split, self._num_samples[split], **self._dataset_kwargs)
