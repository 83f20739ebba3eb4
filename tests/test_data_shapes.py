"""Tests for the textured-shapes task (tokensift.data.shapes) and a tiny run of it end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tokensift.data import TexturedShapes, TexturedShapesDataModule
from tokensift.data.shapes import SHAPES, blob_alpha, load_photos, shape_alpha, split_tiles, tile_grid

SMALL = dict(num_samples=24)


def _assert_items_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- silhouettes ---------------------------------------------------------------------------------------


def test_shape_alphas_are_distinct_and_sized():
    alphas = [shape_alpha(label, 20) for label in range(len(SHAPES))]
    for alpha in alphas:
        assert alpha.shape == (20, 20) and alpha.dtype == np.float32
        assert alpha.min() >= 0.0 and alpha.max() == 1.0
        assert alpha[0].max() < 1 and alpha[-1].max() < 1  # a margin inside the box
    for i in range(len(alphas)):
        for j in range(i + 1, len(alphas)):
            assert np.abs(alphas[i] - alphas[j]).sum() > 10, (SHAPES[i], SHAPES[j])
    disk = alphas[SHAPES.index("disk")]
    assert disk.sum() == pytest.approx(np.pi * (0.85 * 10) ** 2, rel=0.03)
    ring = alphas[SHAPES.index("ring")]
    assert ring[10, 10] == 0 and disk[10, 10] == 1  # the ring is hollow, the disk is not


def test_shape_rotation_turns_the_silhouette():
    square = shape_alpha(SHAPES.index("square"), 16)
    np.testing.assert_allclose(shape_alpha(SHAPES.index("square"), 16, 90.0), square, atol=1e-6)
    assert np.abs(shape_alpha(SHAPES.index("square"), 16, 15.0) - square).sum() > 3


def test_blob_alpha_is_about_sixty_percent_filled():
    field = np.random.default_rng(0).random((4, 4))
    alpha = blob_alpha(field, 16)
    assert alpha.shape == (16, 16)
    assert 0.55 <= alpha.mean() <= 0.65


# --- sources and splits --------------------------------------------------------------------------------


def test_photos_and_tiles():
    photos = load_photos()
    assert [p.shape for p in photos] == [(427, 640, 3), (427, 640, 3), (600, 512, 3)]
    assert all(p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1 for p in photos)
    grid = tile_grid(96)
    assert len(grid) == 4 * 6 + 4 * 6 + 6 * 5
    for photo, top, left in grid:
        height, width = photos[photo].shape[:2]
        assert top % 96 == 0 and left % 96 == 0 and top + 96 <= height and left + 96 <= width


def test_splits_disjoint_by_source_tile():
    tiles = split_tiles(0, (0.7, 0.15, 0.15), 96)
    sets = {name: set(idx.tolist()) for name, idx in tiles.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert set().union(*sets.values()) == set(range(len(tile_grid(96))))
    assert split_tiles(1, (0.7, 0.15, 0.15), 96)["test"].tolist() != tiles["test"].tolist()
    # every crop of every sample (background, object fill, distractor fills) lies inside a tile of its split
    for split in ("train", "val", "test"):
        ds = TexturedShapes(split, 40)
        assert ds.tiles.tolist() == tiles[split].tolist()
        for i in range(len(ds)):
            spec = ds.sample_spec(i)
            fills = [spec.background, spec.object_fill, *(fill for _, _, fill in spec.distractors)]
            for fill in fills:
                assert fill.tile in sets[split]
                assert min(fill.offset) >= 0 and max(fill.offset) + fill.size <= 96
            assert spec.object_fill.tile != spec.background.tile


def test_crop_reads_its_tile_pixels():
    ds = TexturedShapes("test", 4)
    spec = ds.sample_spec(0)
    photo, top, left = tile_grid(96)[spec.background.tile]
    row, col = top + spec.background.offset[0], left + spec.background.offset[1]
    source = load_photos()[photo][row : row + 64, col : col + 64]
    crop = ds.crop(spec.background)
    assert crop.shape == (64, 64, 3)
    assert any(np.array_equal(crop, np.rot90(s, k)) for s in (source, source[:, ::-1]) for k in range(4))


# --- samples -------------------------------------------------------------------------------------------


def test_item_shapes_dtypes_and_range():
    ds = TexturedShapes("train", **SMALL)
    item = ds[0]
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
    assert float(item["pixel_values"].min()) >= -1 and float(item["pixel_values"].max()) <= 1
    assert item["labels"].dtype == torch.long and 0 <= int(item["labels"]) < 8
    assert item["oracle_mask"].shape == (64,) and item["oracle_mask"].dtype == torch.bool
    assert int(item["index"]) == 0
    grey = TexturedShapes("train", num_channels=1, **SMALL)[0]["pixel_values"]
    assert grey.shape == (1, 64, 64)


def test_deterministic_across_instances_and_access_order():
    a = TexturedShapes("val", **SMALL)
    b = TexturedShapes("val", **SMALL)
    forward = [a[i] for i in range(len(a))]
    backward = [b[i] for i in reversed(range(len(b)))][::-1]
    for x, y in zip(forward, backward, strict=True):
        _assert_items_equal(x, y)
    other_seed = TexturedShapes("val", seed=1, **SMALL)[0]
    other_split = TexturedShapes("test", **SMALL)[0]
    assert not torch.equal(forward[0]["pixel_values"], other_seed["pixel_values"])
    assert not torch.equal(forward[0]["pixel_values"], other_split["pixel_values"])


@pytest.mark.parametrize(
    ("kwargs", "patches"),
    [
        ({}, (4, 4)),  # the default: a 16 px object on the 8 px patch grid covers exactly 2x2 patches
        ({"align_object": False, "object_size": (14, 20)}, (4, 9)),  # anywhere: 2x2 up to 3x3 patches
    ],
)
def test_oracle_mask_covers_exactly_the_object(kwargs, patches):
    ds = TexturedShapes("train", 64, **kwargs)
    sizes = []
    for i in range(len(ds)):
        spec = ds.sample_spec(i)
        with_object, mask = ds.render(spec)
        without, mask_again = ds.render(spec, with_object=False)
        np.testing.assert_array_equal(mask, mask_again)
        changed = np.abs(with_object - without).max(axis=-1) > 0  # the object's pixels
        grid = changed.reshape(8, 8, 8, 8).any(axis=(1, 3)).reshape(-1)
        # every pixel the object changed is in an oracle patch, and every oracle patch holds one
        np.testing.assert_array_equal(grid, mask)
        np.testing.assert_array_equal(ds[i]["oracle_mask"].numpy(), mask)
        sizes.append(int(mask.sum()))
        # distractor boxes never overlap the object's box
        (row, col), side = spec.object_pos, spec.object_fill.size
        for _, (r, c), fill in spec.distractors:
            assert r + fill.size <= row or r >= row + side or c + fill.size <= col or c >= col + side
    assert (min(sizes), max(sizes)) == patches
    aligned = [ds.sample_spec(i).object_pos for i in range(len(ds))]
    assert all(r % 8 == 0 and c % 8 == 0 for r, c in aligned) == ds.align_object


def test_object_is_visible_and_distractors_fainter():
    ds = TexturedShapes("test", 32)
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    exact = 0
    for i in range(len(ds)):
        spec = ds.sample_spec(i)
        with_object, _ = ds.render(spec)
        without, _ = ds.render(spec, with_object=False)
        alpha = shape_alpha(spec.label, spec.object_fill.size, spec.object_angle)
        (row, col), side = spec.object_pos, spec.object_fill.size
        inside = alpha == 1
        before = (without[row : row + side, col : col + side] @ luma)[inside].mean()
        after = (with_object[row : row + side, col : col + side] @ luma)[inside].mean()
        assert abs(after - before) > 0.2  # contrast 0.35 minus what clipping to [0, 1] takes
        # a fill's mean luminance sits `contrast` from its region's (unless clipping to [0, 1] moved it)
        background = ds.crop(spec.background)
        for (_, (r, c), fill), contrast in [
            *((d, ds.distractor_contrast) for d in spec.distractors),
            ((None, spec.object_pos, spec.object_fill), ds.contrast),
        ]:
            region = background[r : r + fill.size, c : c + fill.size]
            painted = ds.painted(region, fill, contrast)
            shift = abs(float((painted @ luma).mean() - (region @ luma).mean()))
            clipped = painted.min() == 0 or painted.max() == 1
            assert clipped or abs(shift - contrast) < 1e-4, (shift, contrast)
            exact += not clipped
    assert exact >= 32  # most fills are not clipped
    assert ds.distractor_contrast == 0.15 < ds.contrast == 0.35


def test_labels_cover_the_classes():
    ds = TexturedShapes("train", 400, num_classes=5)
    counts = np.bincount([ds.sample_spec(i).label for i in range(len(ds))], minlength=5)
    assert len(counts) == 5 and counts.min() > 50


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(num_classes=9), "num_classes"),
        (dict(num_classes=1), "num_classes"),
        (dict(num_channels=2), "num_channels"),
        (dict(canvas_size=60), "canvas_size"),
        (dict(object_size=(20, 14)), "object_size"),
        (dict(object_size=(14, 30)), "object_size"),
        (dict(tile_size=48), "tile_size"),
        (dict(contrast=0.0), "contrast"),
        (dict(max_rotation=90), "max_rotation"),
        (dict(split_fractions=(0.9, 0.05, 0.05), tile_size=300), "split_fractions"),
        (dict(num_samples=0), "num_samples"),
        (dict(distractor_contrast=0.7), "distractor_contrast"),
        (dict(align_object="yes"), "align_object"),
    ],
)
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TexturedShapes("train", **({"num_samples": 4} | kwargs))


# --- data module ---------------------------------------------------------------------------------------


def test_datamodule_batches_and_geometry():
    dm = TexturedShapesDataModule(batch_size=8, train_samples=16, val_samples=8, test_samples=8, seed=3)
    assert (dm.image_size, dm.patch_size, dm.num_channels, dm.num_classes, dm.num_patches) == (64, 8, 3, 8, 64)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 64, 64) and batch["oracle_mask"].shape == (8, 64)
    again = TexturedShapesDataModule(batch_size=8, train_samples=16, val_samples=8, test_samples=8, seed=3)
    again.setup()
    _assert_items_equal(batch, next(iter(again.test_dataloader())))
    train_a = [b["index"] for b in dm.train_dataloader()]
    train_b = [b["index"] for b in again.train_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(train_a, train_b, strict=True))
    with pytest.raises(ValueError, match="batch_size"):
        TexturedShapesDataModule(batch_size=0)
    with pytest.raises(ValueError, match="num_distractors"):
        TexturedShapesDataModule(num_distractors=-1)


# --- end to end through the public API ----------------------------------------------------------------

# 16 px patches and 8-12 px objects: a 4x4 grid where the object touches at most 2x2 patches
TINY_DATA = dict(train_samples=64, val_samples=16, test_samples=32, batch_size=16, patch_size=16, object_size=[8, 12])


@pytest.mark.slow
def test_pretrain_fit_bench_end_to_end(tmp_path):
    from tokensift.backbones.pretrain import REPORT, pretrain_backbone
    from tokensift.bench import run_bench
    from tokensift.cli import TokensiftCLI
    from tokensift.export.checkpoint import export

    recipe = Path(__file__).resolve().parents[1] / "configs" / "dynamicvit_shapes.yaml"
    backbone, accuracy = pretrain_backbone(
        tmp_path / "backbone",
        TexturedShapesDataModule(**TINY_DATA),
        max_epochs=1,
        trainer_kwargs={"enable_progress_bar": False, "enable_model_summary": False},
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
    )
    assert 0 <= accuracy <= 1 and json.loads((backbone / REPORT).read_text())["test_accuracy"] == accuracy
    cli = TokensiftCLI(
        args=[
            "fit",
            f"--config={recipe}",
            f"--model.backbone={backbone}",
            "--trainer.max_steps=3",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'scorer'}",
            *(f"--data.init_args.{key}={json.dumps(value)}" for key, value in TINY_DATA.items()),
        ]
    )
    assert cli.trainer.global_step == 3
    artifact = tmp_path / "artifact"
    export(Path(cli.trainer.checkpoint_callbacks[-1].dirpath) / "last.ckpt", artifact)
    result = run_bench(
        model_dir=backbone,
        data=TexturedShapesDataModule(**TINY_DATA),
        methods=f"dynamicvit:{artifact},random,l2norm,cls_attention,tome,divprune",
        keep_ratios="1,0.25",
        out=tmp_path / "bench",
        repeats=1,
        warmup=0,
        quiet=True,
    )
    rows = result["rows"]
    assert {row["method"] for row in rows} == {
        "unpruned",
        "dynamicvit",
        "random",
        "l2norm",
        "cls_attention",
        "tome",
        "divprune",
        "oracle",
    }
    oracle = next(r for r in rows if r["method"] == "oracle" and r["keep_ratio"] == 0.25)
    assert oracle["oracle_recall"] == 1.0  # 16 px patches: the object touches <= 4 of 16, keep 0.25 keeps 4
    assert all(r["num_samples"] == 32 for r in rows)
