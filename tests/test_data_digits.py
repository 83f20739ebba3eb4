"""Tests for the cluttered-digits task (tokensift.data.digits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from tokensift.data import ClutteredDigits, ClutteredDigitsDataModule
from tokensift.data.digits import compose, normalize, split_sources, upscale

SMALL = dict(num_samples=16, patch_size=4, clutter_scale=2, align_target=False)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.images.astype(np.float32), d.target


def _assert_items_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- helpers -------------------------------------------------------------------------------------------


def test_upscale_is_nearest_neighbour():
    out = upscale(np.array([[1, 0], [0, 2]]), 2)
    np.testing.assert_array_equal(out, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]])


def test_normalize_range():
    np.testing.assert_allclose(normalize(np.array([0.0, 8.0, 16.0])), [-1.0, 0.0, 1.0])


def test_compose_hand_made_oracle_mask():
    # 8x8 canvas, 2x2 patches -> 4x4 grid, patch index = 4 * patch_row + patch_col.
    target = np.array([[0, 0, 5], [0, 0, 0], [7, 0, 0]], dtype=np.float32)
    clutter = [
        (np.full((2, 2), 16.0), (6, 0)),  # bottom-left patch 12: clutter only, not in the mask
        (np.array([[3.0]]), (1, 4)),  # under the target's 5: max keeps 5
        (np.array([[9.0]]), (3, 2)),  # over the target's 7: max gives 9
    ]
    canvas, mask = compose(8, 2, target, (1, 2), clutter)
    # Target ink at pixels (1, 4) -> patch (0, 2) = 2 and (3, 2) -> patch (1, 1) = 5. Its bounding box
    # (rows 1-3, cols 2-4) would also cover patches 1 and 6: the mask must follow ink, not the box.
    assert mask.dtype == np.bool_ and mask.shape == (16,)
    assert np.flatnonzero(mask).tolist() == [2, 5]
    expected = np.zeros((8, 8), dtype=np.float32)
    expected[1, 4] = 5
    expected[3, 2] = 9
    expected[6:8, 0:2] = 16
    np.testing.assert_array_equal(canvas, expected)


def test_compose_upscaled_target_spanning_patches():
    # A single ink pixel upscaled x2 placed at (3, 3) straddles four 4x4 patches of an 8x8 canvas.
    target = upscale(np.array([[0, 0], [0, 4]], dtype=np.float32), 2)  # ink at rows/cols 2..3
    _, mask = compose(8, 4, target, (2, 2))
    assert np.flatnonzero(mask).tolist() == [3]  # ink at canvas rows/cols 4..5 -> patch (1, 1)
    _, mask = compose(8, 4, target, (1, 1))
    assert np.flatnonzero(mask).tolist() == [0, 1, 2, 3]  # ink at rows/cols 3..4


def test_compose_rejects_out_of_canvas():
    with pytest.raises(ValueError, match="target"):
        compose(8, 2, np.ones((3, 3)), (6, 0))
    with pytest.raises(ValueError, match=r"clutter\[0\]"):
        compose(8, 2, np.ones((3, 3)), (0, 0), [(np.ones((2, 2)), (7, 7))])
    with pytest.raises(ValueError, match="patch_size"):
        compose(10, 4, np.ones((3, 3)), (0, 0))


# --- dataset -------------------------------------------------------------------------------------------


def test_item_shapes_and_dtypes():
    ds = ClutteredDigits("train", **SMALL)
    assert len(ds) == 16
    item = ds[0]
    assert set(item) == {"pixel_values", "labels", "oracle_mask", "index"}
    assert item["index"].dtype == torch.long and int(item["index"]) == 0 and int(ds[-1]["index"]) == len(ds) - 1
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
    assert item["labels"].shape == () and item["labels"].dtype == torch.long
    assert item["oracle_mask"].shape == (256,) and item["oracle_mask"].dtype == torch.bool
    x = item["pixel_values"]
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey replicated to channels
    assert 0 < int(item["oracle_mask"].sum()) <= 25  # a 16x16 target spans at most 5x5 4px patches

    ds = ClutteredDigits(
        "val",
        num_samples=4,
        canvas_size=32,
        patch_size=8,
        target_scale=1,
        num_channels=1,
        num_clutter=2,
        clutter_size=(3, 4),
    )
    item = ds[3]
    assert item["pixel_values"].shape == (1, 32, 32) and item["oracle_mask"].shape == (16,)
    assert ds.num_patches == 16 and ds.grid_size == 4 and ds.image_size == 32


def test_default_split_sizes():
    assert [len(ClutteredDigits(s)) for s in ("train", "val", "test")] == [4096, 512, 1024]


def test_determinism_same_seed_and_access_order():
    a = ClutteredDigits("train", seed=3, **SMALL)
    b = ClutteredDigits("train", seed=3, **SMALL)
    forward = [a[i] for i in range(16)]
    backward = {i: b[i] for i in reversed(range(16))}
    for i in range(16):
        _assert_items_equal(forward[i], backward[i])
    _assert_items_equal(a[5], a[-11])
    # item i does not depend on num_samples either (only on seed, split, i)
    _assert_items_equal(ClutteredDigits("train", seed=3, **(SMALL | {"num_samples": 100}))[7], forward[7])


def test_determinism_different_seed_or_split_differs():
    a = ClutteredDigits("train", seed=0, **SMALL)
    b = ClutteredDigits("train", seed=1, **SMALL)
    assert not np.array_equal(a.source_indices, b.source_indices)
    assert not all(torch.equal(a[i]["pixel_values"], b[i]["pixel_values"]) for i in range(4))
    v = ClutteredDigits("val", seed=0, **SMALL)
    assert not torch.equal(a[0]["pixel_values"], v[0]["pixel_values"])
    assert not torch.equal(a[0]["pixel_values"], a[1]["pixel_values"])


def test_determinism_across_dataloader_workers():
    ds = ClutteredDigits("test", num_samples=8, seed=5)
    direct = torch.stack([ds[i]["pixel_values"] for i in range(8)])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    via_workers = torch.cat([batch["pixel_values"] for batch in loader])
    assert torch.equal(direct, via_workers)


def test_splits_disjoint_by_source():
    splits = {s: ClutteredDigits(s, seed=11, **SMALL) for s in ("train", "val", "test")}
    sets = {s: set(ds.source_indices.tolist()) for s, ds in splits.items()}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    assert sets["train"] | sets["val"] | sets["test"] == set(range(1797))
    assert [len(sets[s]) for s in ("train", "val", "test")] == [1258, 270, 269]
    assert split_sources(11)["val"].tolist() == splits["val"].source_indices.tolist()
    for s, ds in splits.items():
        for i in range(len(ds)):
            spec = ds.sample_spec(i)
            assert ds.target_source(i) == spec.target_source
            assert spec.target_source in sets[s]
            for c in spec.clutter:  # clutter comes from the same split, never from the target image
                assert c.source in sets[s] and c.source != spec.target_source


def test_labels_match_target_source(digits):
    _, labels = digits
    ds = ClutteredDigits("train", num_samples=64, seed=2)
    got = [int(ds[i]["labels"]) for i in range(64)]
    assert got == [int(labels[ds.target_source(i)]) for i in range(64)]
    assert len(set(got)) >= 8  # targets are spread over classes


def test_item_matches_spec_rendered_by_compose(digits):
    images, _ = digits
    ds = ClutteredDigits("val", seed=4, **SMALL)
    for i in range(4):
        spec = ds.sample_spec(i)
        clutter = []
        for c in spec.clutter:
            r, col, h, w = c.crop
            clutter.append((upscale(images[c.source][r : r + h, col : col + w], 2), c.pos))
        canvas, mask = compose(64, 4, upscale(images[spec.target_source], 2), spec.target_pos, clutter)
        item = ds[i]
        assert torch.equal(item["pixel_values"][0], torch.from_numpy(normalize(canvas)))
        assert torch.equal(item["oracle_mask"], torch.from_numpy(mask))


def test_clutter_does_not_overlap_target_box():
    ds = ClutteredDigits("train", num_samples=64, seed=9, patch_size=4, clutter_scale=2, align_target=False)
    for i in range(64):
        spec = ds.sample_spec(i)
        tr, tc = spec.target_pos
        assert len(spec.clutter) == 6
        for c in spec.clutter:
            h, w = c.crop[2] * 2, c.crop[3] * 2
            assert 8 <= h <= 12 and 8 <= w <= 12
            r, col = c.pos
            assert 0 <= r <= 64 - h and 0 <= col <= 64 - w
            overlap = r < tr + 16 and tr < r + h and col < tc + 16 and tc < col + w
            assert not overlap


def test_oracle_mask_matches_target_ink(digits):
    images, _ = digits
    ds = ClutteredDigits("test", seed=1, **SMALL)
    for i in range(8):
        spec = ds.sample_spec(i)
        ink = np.zeros((64, 64), dtype=bool)
        r, c = spec.target_pos
        ink[r : r + 16, c : c + 16] = upscale(images[spec.target_source], 2) > 0
        expected = ink.reshape(16, 4, 16, 4).any(axis=(1, 3)).reshape(-1)
        assert ds[i]["oracle_mask"].numpy().tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(canvas_size=62), "canvas_size"),
        (dict(patch_size=0), "patch_size"),
        (dict(canvas_size=16, patch_size=4, target_scale=3), "target_scale"),
        (dict(clutter_size=(5, 4)), "clutter_size"),
        (dict(clutter_size=(4, 9)), "clutter_size"),
        (dict(canvas_size=32, clutter_size=(4, 8), clutter_scale=2), "clutter_size"),
        (dict(num_clutter=-1), "num_clutter"),
        (dict(num_channels=0), "num_channels"),
        (dict(split_fractions=(0.5, 0.5, 0.5)), "split_fractions"),
        (dict(num_samples=0), "num_samples"),
        (dict(split="validation"), "split"),
    ],
)
def test_bad_dataset_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ClutteredDigits(**kwargs)


def test_no_clutter_allowed_on_small_canvas():
    ds = ClutteredDigits("train", num_samples=4, canvas_size=16, patch_size=4, num_clutter=0)
    item = ds[0]
    assert item["pixel_values"].shape == (3, 16, 16) and ds.sample_spec(0).clutter == ()


# --- data module ---------------------------------------------------------------------------------------


def test_datamodule_setup_and_batches():
    dm = ClutteredDigitsDataModule(
        batch_size=8, train_samples=32, val_samples=16, test_samples=16, seed=7, patch_size=4
    )
    assert (dm.num_classes, dm.image_size, dm.patch_size) == (10, 64, 4)
    assert (dm.num_channels, dm.num_patches) == (3, 256)
    dm.setup("fit")
    assert dm.train_dataset is not None and dm.val_dataset is not None and dm.test_dataset is None
    dm.setup("test")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert batch["pixel_values"].shape == (8, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
        assert batch["labels"].shape == (8,) and batch["labels"].dtype == torch.long
        assert batch["oracle_mask"].shape == (8, 256) and batch["oracle_mask"].dtype == torch.bool
    # val/test are in order; train shuffling is seeded (same order for a fresh module with the same seed)
    assert torch.equal(
        next(iter(dm.val_dataloader()))["labels"],
        torch.stack([dm.val_dataset[i]["labels"] for i in range(8)]),
    )
    dm2 = ClutteredDigitsDataModule(
        batch_size=8, train_samples=32, val_samples=16, test_samples=16, seed=7, patch_size=4
    )
    dm2.setup("fit")
    assert torch.equal(
        next(iter(dm.train_dataloader()))["pixel_values"], next(iter(dm2.train_dataloader()))["pixel_values"]
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(batch_size=0), "batch_size"),
        (dict(num_workers=-1), "num_workers"),
        (dict(train_samples=0), "train_samples"),
        (dict(canvas_size=66), "canvas_size"),
        (dict(canvas_size=12, patch_size=4), "target_scale"),
    ],
)
def test_bad_datamodule_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ClutteredDigitsDataModule(**kwargs)


def test_datamodule_from_jsonargparse_config():
    jsonargparse = pytest.importorskip("jsonargparse")
    import lightning as L

    parser = jsonargparse.ArgumentParser()
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    cfg = parser.parse_object(
        {
            "data": {
                "class_path": "tokensift.data.ClutteredDigitsDataModule",
                "init_args": {"batch_size": 4, "canvas_size": 32, "patch_size": 8, "clutter_size": [3, 4]},
            }
        }
    )
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, ClutteredDigitsDataModule)
    assert (dm.batch_size, dm.image_size, dm.patch_size, dm.num_patches) == (4, 32, 8, 16)


def test_default_task_aligns_target_to_patches_and_draws_small_clutter():
    ds = ClutteredDigits("train", num_samples=32, seed=3)
    assert ds.clutter_scale == 1 and ds.align_target
    for i in range(32):
        spec = ds.sample_spec(i)
        assert spec.target_pos[0] % ds.patch_size == 0 and spec.target_pos[1] % ds.patch_size == 0
        # a 16-px target on an 8-px grid covers at most a 2x2 block of patches
        assert int(ds[i]["oracle_mask"].sum()) <= 4
