"""Textured shapes: a second image task where only a few patches matter, built from photographs.

Each sample is an RGB canvas (default 64x64) whose background is a crop of a real photograph, holding ONE
small *shape* (disk, square, triangle, plus, ring, diamond, frame, x) filled with a crop of another
photograph, at a random position and size with a small random rotation, plus a few *distractor blobs*:
irregular smooth regions filled the same way. The label is the shape's class.

How it differs from cluttered digits (:mod:`tokensift.data.digits`): the background is not empty (every
patch carries photographic texture, colour and edges, so "has ink" or "has high norm" does not point at the
object), the object is defined by its silhouette, not by its content (its fill is a random texture), and the
distractors carry the same kind of fill as the object (fainter by default), so a selector has to find the
*shape*, not any foreign texture.

Sources: scikit-learn's two bundled sample photographs (``china.jpg``, ``flower.jpg``, 427x640) and
matplotlib's bundled ``grace_hopper.jpg`` (600x512): no download. Each photograph is cut into a grid of
disjoint ``tile_size`` x ``tile_size`` tiles (default 96; the remainder at the right and bottom edges is
unused), and the tiles are split between train / val / test; every pixel of a sample (background,
object fill, distractor fills) comes from tiles of its own split, so no source pixel is in two splits.

Generation rules (all deterministic from ``seed``):

* The tile list (photographs in the order above, tiles row-major) is permuted once with
  ``numpy.random.default_rng(seed)`` and cut into train/val/test by ``split_fractions``.
* Sample ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split_id, i])`` (train 0, val 1,
  test 2), so it is identical whatever the access order, worker or process.
* The class is uniform over ``num_classes`` (the first ``num_classes`` of :data:`SHAPES`).
* Background: a uniform tile of the split, a uniform ``canvas_size`` crop inside it, one of the 8 symmetries
  of the square (rotations by 90 degrees, with or without a flip).
* Object: side ``s`` uniform in ``object_size`` (inclusive, pixels; default 16, two patches), top-left corner
  uniform over the patch-grid positions where the ``s`` x ``s`` box fits (``align_object``, the default), or
  over every pixel position (``align_object=False``: a small ViT trained from scratch learns that variant far
  more slowly), rotation uniform in ``±max_rotation`` degrees; its silhouette is
  rendered with 4x4 supersampling into an alpha map in [0, 1] over the box. Its fill is an ``s`` x ``s`` crop
  of a different tile of the split (with a symmetry), recentred so that its mean luminance is ``contrast``
  away from the background's under the box (darker on a bright background, brighter on a dark one) with its
  deviations halved, then clipped to [0, 1]: the object is always visible, its texture is kept.
* Distractors: ``num_distractors`` blobs, each of side uniform in ``object_size``, whose silhouette is a
  4x4 random field upsampled bilinearly and thresholded at its 40th percentile (irregular, about 60 %
  filled), placed uniformly (any pixel position) among the positions whose box does NOT overlap the object's
  box, filled like the object from any tile of the split but the background's, with ``distractor_contrast``
  (default 0.15; ``None``: the object's ``contrast``). Blobs may overlap each other.
* Layers are alpha-composited over the background: distractors in order, then the object.
* ``oracle_mask`` marks every patch holding at least one pixel where the object's alpha is > 0.
* Normalisation: ``(x - 0.5) / 0.5`` per channel, so pixel values are in [-1, 1]. ``num_channels=1`` gives
  the luminance (ITU-R 601 weights) instead of RGB.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tokensift.data.base import SeededSplitDataset, SplitDataModule, check_loader_args
from tokensift.data.digits import SPLITS, check_integers, is_int, patch_mask

__all__ = [
    "PHOTOS",
    "SHAPES",
    "FillSpec",
    "ShapeSampleSpec",
    "TexturedShapes",
    "TexturedShapesDataModule",
    "blob_alpha",
    "load_photos",
    "shape_alpha",
    "split_tiles",
    "tile_grid",
]

PHOTOS: tuple[str, ...] = ("china.jpg", "flower.jpg", "grace_hopper.jpg")
"""The source photographs: scikit-learn's two sample images and matplotlib's sample photograph."""
SHAPES: tuple[str, ...] = ("disk", "square", "triangle", "plus", "ring", "diamond", "frame", "x")
"""Class names, in label order."""
DEFAULT_NUM_SAMPLES: dict[str, int] = {"train": 4096, "val": 512, "test": 1024}
SUPERSAMPLE = 4
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_BLOB_GRID = 4
_BLOB_QUANTILE = 40.0
ALIGN_OBJECT = True
DISTRACTOR_CONTRAST: float | None = 0.15


@functools.cache
def load_photos() -> tuple[np.ndarray, ...]:
    """The source photographs in :data:`PHOTOS` order, float32 [H, W, 3] in [0, 1], read-only."""
    import matplotlib.cbook
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photos = [load_sample_image(name) for name in PHOTOS[:2]]
    with Image.open(matplotlib.cbook.get_sample_data(PHOTOS[2], asfileobj=False)) as image:
        photos.append(np.asarray(image.convert("RGB")))
    out = []
    for photo in photos:
        array = np.asarray(photo, dtype=np.float32) / 255.0
        array.setflags(write=False)
        out.append(array)
    return tuple(out)


def tile_grid(tile_size: int) -> np.ndarray:
    """Every tile of every photograph: int64 [T, 3] rows ``(photo, top, left)``, photographs in order,
    tiles row-major; tiles are disjoint ``tile_size`` squares (edge remainders unused)."""
    rows = []
    for p, photo in enumerate(load_photos()):
        height, width = photo.shape[:2]
        for top in range(0, height - tile_size + 1, tile_size):
            for left in range(0, width - tile_size + 1, tile_size):
                rows.append((p, top, left))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def split_tiles(seed: int, fractions: Sequence[float], tile_size: int) -> dict[str, np.ndarray]:
    """Indices into :func:`tile_grid` of each split: one seeded permutation cut by ``fractions``, each sorted."""
    n = len(tile_grid(tile_size))
    order = np.random.default_rng(seed).permutation(n)
    n_train = round(float(fractions[0]) * n)
    n_val = round(float(fractions[1]) * n)
    cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {name: np.sort(idx).astype(np.int64) for name, idx in cuts.items()}


def _box_coords(size: int, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled coordinates of a ``size`` box in [-1, 1], rotated by ``-angle`` (so the shape turns by it)."""
    n = size * SUPERSAMPLE
    axis = (np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0
    v, u = np.meshgrid(axis, axis, indexing="ij")  # v: down, u: right
    theta = np.deg2rad(angle_deg)
    cos, sin = np.cos(theta), np.sin(theta)
    return cos * u + sin * v, -sin * u + cos * v


def _downsample(inside: np.ndarray, size: int) -> np.ndarray:
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def shape_alpha(label: int, size: int, angle_deg: float = 0.0) -> np.ndarray:
    """Alpha map float32 [size, size] in [0, 1] of shape ``SHAPES[label]`` turned by ``angle_deg`` degrees."""
    u, v = _box_coords(size, angle_deg)
    a, b = np.abs(u), np.abs(v)
    name = SHAPES[label]
    if name == "disk":
        inside = u**2 + v**2 <= 0.85**2
    elif name == "square":
        inside = np.maximum(a, b) <= 0.72
    elif name == "triangle":  # apex up, base down; vertices (0, -0.85), (±0.85, 0.65)
        inside = (v <= 0.65) & (v >= -0.85 + 1.5 / 0.85 * a)
    elif name == "plus":
        inside = ((a <= 0.28) & (b <= 0.85)) | ((b <= 0.28) & (a <= 0.85))
    elif name == "ring":
        r2 = u**2 + v**2
        inside = (r2 <= 0.85**2) & (r2 >= 0.45**2)
    elif name == "diamond":
        inside = a + b <= 0.92
    elif name == "frame":
        inside = (np.maximum(a, b) <= 0.78) & (np.maximum(a, b) >= 0.42)
    elif name == "x":
        inside = ((np.abs(u + v) <= 0.38) | (np.abs(u - v) <= 0.38)) & (np.maximum(a, b) <= 0.75)
    else:  # pragma: no cover - SHAPES and this chain are edited together
        raise ValueError(f"unknown shape {name!r}")
    return _downsample(inside, size)


def blob_alpha(field: np.ndarray, size: int) -> np.ndarray:
    """Alpha map float32 [size, size] of an irregular blob: the small random ``field`` (e.g. 4x4) upsampled
    bilinearly to the supersampled box and thresholded at its 40th percentile."""
    field = np.asarray(field, dtype=np.float64)
    n = size * SUPERSAMPLE
    grid = field.shape[0]
    pos = (np.arange(n) + 0.5) / n * (grid - 1)  # sample positions in field coordinates, edges included
    lo = np.clip(np.floor(pos).astype(int), 0, grid - 2)
    frac = pos - lo
    rows = field[lo] * (1 - frac)[:, None] + field[lo + 1] * frac[:, None]  # [n, grid]
    up = rows[:, lo] * (1 - frac)[None, :] + rows[:, lo + 1] * frac[None, :]  # [n, n]
    return _downsample(up > np.percentile(up, _BLOB_QUANTILE), size)


def _symmetry(array: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 symmetries of the square: ``k % 4`` quarter turns, flipped left-right when ``k >= 4``."""
    out = np.rot90(array, k % 4, axes=(0, 1))
    return out[:, ::-1] if k >= 4 else out


@dataclass(frozen=True)
class FillSpec:
    """A texture crop: tile (index into :func:`tile_grid`), ``(row, col)`` offset inside it, side, symmetry."""

    tile: int
    offset: tuple[int, int]
    size: int
    symmetry: int


@dataclass(frozen=True)
class ShapeSampleSpec:
    """Everything needed to render one sample.

    ``label``: the object's class; ``background``: the canvas-sized crop; ``object_pos`` / ``object_angle`` /
    ``object_fill``: the object's top-left corner, rotation (degrees) and fill (its side is the fill's);
    ``distractors``: ``(blob field, position, fill)`` per blob.
    """

    label: int
    background: FillSpec
    object_pos: tuple[int, int]
    object_angle: float
    object_fill: FillSpec
    distractors: tuple[tuple[np.ndarray, tuple[int, int], FillSpec], ...]


def validate_config(
    *,
    canvas_size: int,
    patch_size: int,
    num_classes: int,
    object_size: Sequence[int],
    max_rotation: float,
    num_distractors: int,
    contrast: float,
    tile_size: int,
    num_channels: int,
    split_fractions: Sequence[float],
    distractor_contrast: float | None = None,
    align_object: bool = True,
) -> None:
    """Raise ``ValueError`` naming the offending field (and how to fix it) for an invalid configuration."""
    check_integers(
        (
            ("canvas_size", canvas_size, 1),
            ("patch_size", patch_size, 1),
            ("num_classes", num_classes, 2),
            ("num_distractors", num_distractors, 0),
            ("tile_size", tile_size, 1),
        )
    )
    if num_classes > len(SHAPES):
        raise ValueError(f"num_classes must be <= {len(SHAPES)} (the shapes {SHAPES}), got {num_classes}")
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 (luminance) or 3 (RGB), got {num_channels!r}")
    if canvas_size % patch_size != 0:
        raise ValueError(f"canvas_size ({canvas_size}) must be divisible by patch_size ({patch_size})")
    if tile_size < canvas_size:
        raise ValueError(f"tile_size ({tile_size}) must be >= canvas_size ({canvas_size}): a background is one crop")
    if len(object_size) != 2 or not all(is_int(v) for v in object_size):
        raise ValueError(f"object_size must be a pair of integers (min, max), got {object_size!r}")
    lo, hi = int(object_size[0]), int(object_size[1])
    if not 4 <= lo <= hi:
        raise ValueError(f"object_size must satisfy 4 <= min <= max (pixels), got {tuple(object_size)}")
    room = (canvas_size - hi) // 2  # a blob of side hi fits beside an object of side hi on some side
    if hi > canvas_size or (num_distractors > 0 and hi > room):
        raise ValueError(
            f"object_size max ({hi}) leaves no room for distractors beside the object on a {canvas_size}-pixel "
            f"canvas (at most {room}); lower object_size, raise canvas_size or set num_distractors=0"
        )
    if not 0 <= float(max_rotation) <= 45:
        raise ValueError(f"max_rotation must be in [0, 45] degrees, got {max_rotation!r}")
    if not 0 < float(contrast) <= 0.5:
        raise ValueError(f"contrast must be in (0, 0.5] (a luminance offset), got {contrast!r}")
    if distractor_contrast is not None and not 0 < float(distractor_contrast) <= 0.5:
        raise ValueError(f"distractor_contrast must be None (= contrast) or in (0, 0.5], got {distractor_contrast!r}")
    if not isinstance(align_object, bool):
        raise ValueError(f"align_object must be a bool, got {align_object!r}")
    if len(split_fractions) != 3 or any(not (f > 0) for f in split_fractions):
        raise ValueError(f"split_fractions must be 3 positive numbers (train, val, test), got {split_fractions!r}")
    if abs(sum(split_fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must sum to 1, got {tuple(split_fractions)}")
    for name, tiles in split_tiles(0, split_fractions, tile_size).items():
        if len(tiles) < 2:
            raise ValueError(
                f"split_fractions {tuple(split_fractions)} with tile_size {tile_size} leave the {name} split with "
                f"{len(tiles)} tile(s); it needs at least 2 (a background and a fill), so lower tile_size"
            )


class TexturedShapes(SeededSplitDataset):
    """One split of the textured-shapes task, generated on the fly and deterministic from ``seed``.

    See the module docstring for the rules. Items are dicts::

        {"pixel_values": float32 [num_channels, canvas_size, canvas_size],  # (x - 0.5) / 0.5, in [-1, 1]
         "labels": int64 scalar,                                             # the shape's class
         "oracle_mask": bool [num_patches],                                  # patches the object touches
         "index": int64 scalar}                                              # the sample's index in the split

    Attributes: ``tiles`` (sorted indices into :func:`tile_grid` this split draws from), ``num_classes``,
    ``image_size``, ``patch_size``, ``num_channels``, ``grid_size``, ``num_patches``.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        *,
        canvas_size: int = 64,
        patch_size: int = 8,
        num_classes: int = 8,
        object_size: tuple[int, int] = (16, 16),
        max_rotation: float = 15.0,
        num_distractors: int = 2,
        contrast: float = 0.35,
        tile_size: int = 96,
        num_channels: int = 3,
        seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        align_object: bool = ALIGN_OBJECT,
        distractor_contrast: float | None = DISTRACTOR_CONTRAST,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if num_samples is None:
            num_samples = DEFAULT_NUM_SAMPLES[split]
        if not is_int(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        validate_config(
            canvas_size=canvas_size,
            patch_size=patch_size,
            num_classes=num_classes,
            object_size=object_size,
            max_rotation=max_rotation,
            num_distractors=num_distractors,
            contrast=contrast,
            tile_size=tile_size,
            num_channels=num_channels,
            split_fractions=split_fractions,
            distractor_contrast=distractor_contrast,
            align_object=align_object,
        )
        self.split, self.split_id = split, SPLITS[split]
        self.num_samples = int(num_samples)
        self.canvas_size = self.image_size = int(canvas_size)
        self.patch_size = int(patch_size)
        self.num_classes = int(num_classes)
        self.object_size = (int(object_size[0]), int(object_size[1]))
        self.max_rotation = float(max_rotation)
        self.num_distractors = int(num_distractors)
        self.contrast = float(contrast)
        self.tile_size = int(tile_size)
        self.num_channels = int(num_channels)
        self.seed = int(seed)
        self.split_fractions = tuple(float(f) for f in split_fractions)
        self.align_object = bool(align_object)
        self.distractor_contrast = self.contrast if distractor_contrast is None else float(distractor_contrast)
        self.grid_size = self.canvas_size // self.patch_size
        self.num_patches = self.grid_size**2
        self._photos = load_photos()
        self._grid = tile_grid(self.tile_size)
        self.tiles: np.ndarray = split_tiles(self.seed, self.split_fractions, self.tile_size)[split]

    def _fill(self, rng: np.random.Generator, size: int, avoid: int | None) -> FillSpec:
        choices = self.tiles if avoid is None else self.tiles[self.tiles != avoid]
        tile = int(choices[rng.integers(len(choices))])
        row, col = (int(v) for v in rng.integers(0, self.tile_size - size + 1, size=2))
        return FillSpec(tile, (row, col), size, int(rng.integers(8)))

    def sample_spec(self, index: int) -> ShapeSampleSpec:
        """Draw the (cheap) description of sample ``index``: class, crops, positions, angles, blob fields."""
        rng = self.rng(index)
        canvas, (lo, hi) = self.canvas_size, self.object_size
        label = int(rng.integers(self.num_classes))
        background = self._fill(rng, canvas, None)
        size = int(rng.integers(lo, hi + 1))
        if self.align_object:  # the box's corner on the patch grid
            slots = (canvas - size) // self.patch_size + 1
            pos = tuple(int(v) * self.patch_size for v in rng.integers(0, slots, size=2))
        else:
            pos = tuple(int(v) for v in rng.integers(0, canvas - size + 1, size=2))
        angle = float(rng.uniform(-self.max_rotation, self.max_rotation))
        fill = self._fill(rng, size, background.tile)
        distractors = []
        for _ in range(self.num_distractors):
            side = int(rng.integers(lo, hi + 1))
            field = rng.random((_BLOB_GRID, _BLOB_GRID))
            places = np.arange(canvas - side + 1)
            row_ok = (places + side <= pos[0]) | (places >= pos[0] + size)
            col_ok = (places + side <= pos[1]) | (places >= pos[1] + size)
            valid = np.flatnonzero(row_ok[:, None] | col_ok[None, :])  # the blob's box misses the object's
            flat = int(valid[rng.integers(len(valid))])
            where = (flat // len(places), flat % len(places))
            distractors.append((field, where, self._fill(rng, side, background.tile)))
        return ShapeSampleSpec(label, background, pos, angle, fill, tuple(distractors))

    def crop(self, fill: FillSpec) -> np.ndarray:
        """The RGB crop float32 [size, size, 3] in [0, 1] a :class:`FillSpec` names."""
        photo, top, left = (int(v) for v in self._grid[fill.tile])
        row, col = top + fill.offset[0], left + fill.offset[1]
        return np.ascontiguousarray(
            _symmetry(self._photos[photo][row : row + fill.size, col : col + fill.size], fill.symmetry)
        )

    def painted(self, region: np.ndarray, fill: FillSpec, contrast: float) -> np.ndarray:
        """The fill's texture crop recentred ``contrast`` away from ``region``'s mean luminance (towards 0.5), its
        deviations halved, clipped to [0, 1]: what an object or blob shows over ``region``."""
        texture = self.crop(fill)
        under = float((region @ _LUMA).mean())
        target = under - contrast if under > 0.5 else under + contrast
        return np.clip(target + 0.5 * (texture - float((texture @ _LUMA).mean())), 0.0, 1.0)

    def _paint(
        self, canvas: np.ndarray, alpha: np.ndarray, fill: FillSpec, pos: tuple[int, int], contrast: float
    ) -> None:
        row, col = pos
        region = canvas[row : row + fill.size, col : col + fill.size]
        painted = self.painted(region, fill, contrast)
        region[...] = region * (1 - alpha[..., None]) + painted * alpha[..., None]

    def render(self, spec: ShapeSampleSpec, with_object: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Render a spec: RGB canvas float32 [H, W, 3] in [0, 1] and the bool oracle mask [num_patches].

        ``with_object=False`` leaves the object out (the mask is the same): the pixels that differ between the
        two renderings are exactly the object's.
        """
        canvas = self.crop(spec.background).copy()
        for field, where, fill in spec.distractors:
            self._paint(canvas, blob_alpha(field, fill.size), fill, where, self.distractor_contrast)
        alpha = shape_alpha(spec.label, spec.object_fill.size, spec.object_angle)
        if with_object:
            self._paint(canvas, alpha, spec.object_fill, spec.object_pos, self.contrast)
        full = np.zeros(canvas.shape[:2], dtype=bool)
        row, col = spec.object_pos
        full[row : row + alpha.shape[0], col : col + alpha.shape[1]] = alpha > 0
        return canvas, patch_mask(full, self.patch_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        spec = self.sample_spec(index)
        canvas, mask = self.render(spec)
        if self.num_channels == 1:
            canvas = (canvas @ _LUMA)[..., None]
        image = torch.from_numpy(np.ascontiguousarray(((canvas - 0.5) / 0.5).transpose(2, 0, 1), dtype=np.float32))
        return {
            "pixel_values": image,
            "labels": torch.tensor(spec.label, dtype=torch.long),
            "oracle_mask": torch.from_numpy(mask.copy()),
            "index": torch.tensor(self._check_index(index), dtype=torch.long),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_samples={self.num_samples}, "
            f"canvas_size={self.canvas_size}, patch_size={self.patch_size}, num_classes={self.num_classes}, "
            f"object_size={self.object_size}, num_distractors={self.num_distractors}, seed={self.seed}, "
            f"tiles={len(self.tiles)})"
        )


class TexturedShapesDataModule(SplitDataModule):
    """Lightning data module for the textured-shapes task (see :mod:`tokensift.data.shapes`).

    Buildable from YAML by ``LightningCLI``::

        data:
          class_path: tokensift.data.TexturedShapesDataModule
          init_args: {batch_size: 64, num_distractors: 2}

    ``num_classes``, ``image_size``, ``patch_size``, ``num_channels`` and ``num_patches`` are available right
    after construction, to build a matching ViT config (``pretrain_backbone`` reads them). Arguments are
    validated in ``__init__``; samples are generated on the fly from the bundled photographs.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        train_samples: int = 4096,
        val_samples: int = 512,
        test_samples: int = 1024,
        canvas_size: int = 64,
        patch_size: int = 8,
        num_classes: int = 8,
        object_size: tuple[int, int] = (16, 16),
        max_rotation: float = 15.0,
        num_distractors: int = 2,
        contrast: float = 0.35,
        tile_size: int = 96,
        num_channels: int = 3,
        seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        pin_memory: bool = False,
        align_object: bool = ALIGN_OBJECT,
        distractor_contrast: float | None = DISTRACTOR_CONTRAST,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers, train_samples, val_samples, test_samples, is_integer=is_int)
        self._dataset_kwargs = dict(
            canvas_size=canvas_size,
            patch_size=patch_size,
            num_classes=num_classes,
            object_size=tuple(object_size),
            max_rotation=max_rotation,
            num_distractors=num_distractors,
            contrast=contrast,
            tile_size=tile_size,
            num_channels=num_channels,
            seed=seed,
            split_fractions=tuple(split_fractions),
            distractor_contrast=distractor_contrast,
            align_object=align_object,
        )
        validate_config(**{k: v for k, v in self._dataset_kwargs.items() if k != "seed"})
        self.save_hyperparameters()
        self._init_splits(batch_size, num_workers, pin_memory, seed, train_samples, val_samples, test_samples)
        self.image_size = canvas_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.num_classes = num_classes
        self.grid_size = canvas_size // patch_size
        self.num_patches = self.grid_size**2

    def _build(self, split: str) -> TexturedShapes:
        return TexturedShapes(split, self._num_samples[split], **self._dataset_kwargs)
