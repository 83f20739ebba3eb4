"""Tests for the digit-VQA task (tokensift.data.digit_vqa)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from tokensift.data.digit_vqa import (
    ANSWER_WORDS,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    QUESTION_TYPES,
    TEMPLATES,
    DigitPlacement,
    DigitVQA,
    DigitVQACollator,
    DigitVQADataModule,
    VQASpec,
    build_image_processor,
    build_tokenizer,
)
from tokensift.data.digits import normalize, split_sources, upscale

SMALL = dict(num_samples=48, seed=3)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.images.astype(np.float32), d.target


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _items_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _source_of_class(split: DigitVQA, cls: int, k: int = 0) -> int:
    return int(split._class_sources[cls][k])


# --- tokenizer -----------------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_save_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    text = "which digit is in the top left corner of <image> <image> ? answer : 7"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s> " + text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.replace(" <image>", "")
    assert tokenizer.image_token == IMAGE_TOKEN and tokenizer.image_token_id == ids[text.split().index("<image>") + 1]
    # placeholders glued together (as LlavaProcessor writes them) split into one token each
    glued = tokenizer("is there a 3 in " + IMAGE_TOKEN * 5 + " ?")["input_ids"]
    assert glued.count(tokenizer.image_token_id) == 5
    assert tokenizer("a zebra")["input_ids"][-1] == tokenizer.unk_token_id

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded(text)["input_ids"] == ids
    assert loaded.image_token_id == tokenizer.image_token_id and loaded.pad_token_id == tokenizer.pad_token_id
    assert loaded.get_vocab() == tokenizer.get_vocab()


def test_every_template_word_and_answer_is_in_the_vocabulary(tokenizer):
    vocab = tokenizer.get_vocab()
    assert all(word in vocab for word in ANSWER_WORDS)
    answer_ids = tokenizer.convert_tokens_to_ids(list(ANSWER_WORDS))
    assert answer_ids == list(range(answer_ids[0], answer_ids[0] + len(ANSWER_WORDS)))  # contiguous
    for templates in TEMPLATES.values():
        for template in templates:
            for word in template.split():
                assert word.startswith("{") or word in vocab, word


def test_image_processor_reproduces_normalize():
    raw = np.random.default_rng(0).integers(0, 17, size=(3, 16, 16)).astype(np.float32)
    pixels = build_image_processor(3)(images=[raw], return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(pixels, torch.from_numpy(normalize(raw)), atol=1e-6)


# --- hand-made scenes ----------------------------------------------------------------------------------


def test_hand_made_scene_answers_and_oracle_masks(digits):
    images, labels = digits
    ds = DigitVQA("train", 4, seed=0)
    three_a, three_b, seven = _source_of_class(ds, 3, 0), _source_of_class(ds, 3, 1), _source_of_class(ds, 7)
    # 64x64 canvas, 8-px patches (8x8 grid): a 3 at the top left (patches rows 0-1, cols 0-1), a 7 at the top
    # right shifted one patch (rows 1-2, cols 5-6), another 3 at the bottom right (rows 6-7, cols 6-7).
    placed = (
        DigitPlacement(three_a, 0, (0, 0)),
        DigitPlacement(seven, 1, (8, 40)),
        DigitPlacement(three_b, 3, (48, 48)),
    )

    def patches(rows, cols):
        return sorted(8 * r + c for r in rows for c in cols)

    def oracle(question_type, query, answer, relevant):
        spec = VQASpec(question_type, 0, query, placed, answer, relevant)
        canvas, mask = ds.render(spec)
        return canvas, np.flatnonzero(mask).tolist(), ds.question(spec)

    # The sources are real digits whose 8x8 images have ink in each quadrant, so an aligned 16-px digit
    # inks exactly its 2x2 block of patches.
    for source in (three_a, three_b, seven):
        image = images[source]
        assert all((image[r : r + 4, c : c + 4] > 0).any() for r in (0, 4) for c in (0, 4))

    canvas, mask, question = oracle("position", 1, "7", (1,))
    assert question == "<image> which digit is at the top right ? answer :"
    assert mask == patches((1, 2), (5, 6))
    expected = np.zeros((64, 64), dtype=np.float32)
    expected[0:16, 0:16] = upscale(images[three_a], 2)
    expected[8:24, 40:56] = upscale(images[seven], 2)
    expected[48:64, 48:64] = upscale(images[three_b], 2)
    np.testing.assert_array_equal(canvas, expected)
    assert ds.digit_classes(VQASpec("position", 0, 1, placed, "7", (1,))) == [3, 7, 3]
    assert int(labels[seven]) == 7

    classes = ds.patch_classes(VQASpec("position", 0, 1, placed, "7", (1,)))
    assert np.flatnonzero(classes == 3).tolist() == patches((0, 1), (0, 1)) + patches((6, 7), (6, 7))
    assert np.flatnonzero(classes == 7).tolist() == patches((1, 2), (5, 6))
    assert (classes[~np.isin(classes, (3, 7))] == IGNORE_INDEX).all()

    _, mask, _ = oracle("count", 3, "2", (0, 2))  # "how many 3s": both 3s
    assert mask == patches((0, 1), (0, 1)) + patches((6, 7), (6, 7))
    _, mask, _ = oracle("exists", 5, "no", (0, 1, 2))  # "is there a 5": no -> every digit had to be looked at
    assert mask == sorted(patches((0, 1), (0, 1)) + patches((1, 2), (5, 6)) + patches((6, 7), (6, 7)))


def _check_answer(ds: DigitVQA, spec: VQASpec) -> None:
    classes = ds.digit_classes(spec)
    if spec.question_type == "position":
        (asked,) = [k for k, d in enumerate(spec.digits) if d.quadrant == spec.query]
        assert spec.answer == str(classes[asked]) and spec.relevant == (asked,)
    else:
        holders = tuple(k for k, c in enumerate(classes) if c == spec.query)
        expected = str(len(holders)) if spec.question_type == "count" else ("yes" if holders else "no")
        assert spec.answer == expected
        assert spec.relevant == (holders or tuple(range(len(classes))))


def test_generated_answers_match_the_scene():
    ds = DigitVQA("val", 300, seed=1)
    seen = set()
    for i in range(len(ds)):
        spec = ds.sample_spec(i)
        _check_answer(ds, spec)
        seen.add((spec.question_type, spec.template))
        quadrants = [d.quadrant for d in spec.digits]
        assert len(set(quadrants)) == len(quadrants) and 2 <= len(quadrants) <= 4
        assert len({d.source for d in spec.digits}) == len(spec.digits)  # no source twice in a scene
        for d in spec.digits:  # inside its quadrant, on the patch grid
            top, left = d.quadrant // 2 * 32, d.quadrant % 2 * 32
            assert top <= d.pos[0] <= top + 16 and left <= d.pos[1] <= left + 16
            assert d.pos[0] % 8 == 0 and d.pos[1] % 8 == 0
    assert len(seen) == sum(len(t) for t in TEMPLATES.values())  # every template is used


def test_answers_are_balanced():
    ds = DigitVQA("train", 3000, seed=0)
    answers: dict[str, list[str]] = {q: [] for q in QUESTION_TYPES}
    for i in range(len(ds)):
        spec = ds.sample_spec(i)
        answers[spec.question_type].append(spec.answer)
    assert all(len(a) > 800 for a in answers.values())
    yes = answers["exists"].count("yes") / len(answers["exists"])
    assert 0.45 < yes < 0.55
    counts = np.bincount([int(a) for a in answers["count"]], minlength=5)
    assert counts.max() / len(answers["count"]) < 0.35  # no answer an image-blind model could bet on
    assert len(set(answers["position"])) == 10 and max(np.unique(answers["position"], return_counts=True)[1]) < 140


# --- items, determinism, splits ------------------------------------------------------------------------


def test_item_fields(tokenizer):
    ds = DigitVQA("test", **SMALL)
    for i in range(6):
        item, spec = ds[i], ds.sample_spec(i)
        assert set(item) == {
            "pixel_values",
            "input_ids",
            "attention_mask",
            "labels",
            "answer_id",
            "oracle_mask",
            "patch_classes",
            "question_type",
            "index",
        }
        assert int(item["index"]) == i and item["index"].dtype == torch.long
        assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
        assert item["oracle_mask"].shape == (64,) and item["oracle_mask"].dtype == torch.bool
        ids = item["input_ids"]
        assert int((ids == ds.image_token_id).sum()) == 64 and torch.equal(item["attention_mask"], torch.ones_like(ids))
        assert int(item["answer_id"]) == ids[-1] == tokenizer.convert_tokens_to_ids(spec.answer)
        assert (item["labels"][:-1] == IGNORE_INDEX).all() and item["labels"][-1] == ids[-1]
        assert QUESTION_TYPES[int(item["question_type"])] == spec.question_type
        text = tokenizer.decode(ids, skip_special_tokens=True)
        question_words = [w for w in ds.question(spec).split() if w != IMAGE_TOKEN]
        assert text == " ".join([*question_words, spec.answer])
        assert item["oracle_mask"].any()
        # every patch with digit ink names that digit's class; the oracle patches are among them
        classes = item["patch_classes"]
        assert classes.shape == (64,) and classes.dtype == torch.long
        assert set(classes[classes != IGNORE_INDEX].tolist()) == set(ds.digit_classes(spec))
        assert (classes[item["oracle_mask"]] != IGNORE_INDEX).all()
    canvas, mask = ds.render(ds.sample_spec(0))
    assert torch.equal(ds[0]["pixel_values"][1], torch.from_numpy(normalize(canvas)))
    assert torch.equal(ds[0]["oracle_mask"], torch.from_numpy(mask))


def test_image_position_in_prompt_varies_with_template():
    ds = DigitVQA("train", 200, seed=0)
    first_image = set()
    for i in range(len(ds)):
        ids = ds[i]["input_ids"]
        first_image.add(int(torch.nonzero(ids == ds.image_token_id)[0]))
    assert 1 in first_image  # right after <s>
    assert max(first_image) >= 8 and len(first_image) >= 4  # inside and after the question


def test_num_image_tokens_option():
    ds = DigitVQA("train", 4, num_image_tokens=16)
    assert int((ds[0]["input_ids"] == ds.image_token_id).sum()) == 16 and ds[0]["oracle_mask"].shape == (64,)


def test_determinism_and_access_order():
    a = DigitVQA("train", **SMALL)
    b = DigitVQA("train", **SMALL)
    forward = [a[i] for i in range(len(a))]
    backward = {i: b[i] for i in reversed(range(len(b)))}
    assert all(_items_equal(forward[i], backward[i]) for i in range(len(a)))
    assert _items_equal(a[5], a[-43])
    assert _items_equal(DigitVQA("train", 500, seed=3)[7], forward[7])  # independent of num_samples
    other_seed = DigitVQA("train", num_samples=48, seed=4)
    assert not all(torch.equal(forward[i]["pixel_values"], other_seed[i]["pixel_values"]) for i in range(4))
    assert not _items_equal(forward[0], DigitVQA("val", **SMALL)[0])


def test_determinism_across_dataloader_workers():
    ds = DigitVQA("test", 8, seed=5)
    collate = DigitVQACollator(ds.tokenizer.pad_token_id)
    direct = collate([ds[i] for i in range(8)])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    via_workers = list(loader)
    assert torch.equal(direct["pixel_values"], torch.cat([b["pixel_values"] for b in via_workers]))
    assert torch.equal(direct["answer_id"], torch.cat([b["answer_id"] for b in via_workers]))


def test_splits_disjoint_by_source():
    splits = {s: DigitVQA(s, 64, seed=11) for s in ("train", "val", "test")}
    sources = {s: set(ds.source_indices.tolist()) for s, ds in splits.items()}
    assert not sources["train"] & sources["val"] and not sources["train"] & sources["test"]
    assert not sources["val"] & sources["test"]
    assert sources["train"] | sources["val"] | sources["test"] == set(range(1797))
    assert splits["test"].source_indices.tolist() == split_sources(11)["test"].tolist()
    for s, ds in splits.items():
        for i in range(len(ds)):
            assert all(d.source in sources[s] for d in ds.sample_spec(i).digits)


# --- collation -----------------------------------------------------------------------------------------


def test_left_and_right_padding_collation():
    ds = DigitVQA("train", 40, seed=0)
    items = [ds[i] for i in range(40)]
    lengths = [len(it["input_ids"]) for it in items]
    assert len(set(lengths)) > 1  # templates differ in length, so padding happens
    pad = ds.tokenizer.pad_token_id
    left = DigitVQACollator(pad)(items)
    right = DigitVQACollator(pad, padding_side="right")(items)
    prompt = DigitVQACollator(pad, with_answer=False)(items)
    width = max(lengths)
    assert left["input_ids"].shape == right["input_ids"].shape == (40, width)
    assert prompt["input_ids"].shape == (40, width - 1) and "labels" not in prompt
    for i, (item, n) in enumerate(zip(items, lengths, strict=True)):
        assert torch.equal(left["input_ids"][i, width - n :], item["input_ids"])
        assert (left["input_ids"][i, : width - n] == pad).all() and (left["attention_mask"][i, : width - n] == 0).all()
        assert (left["labels"][i, : width - n] == IGNORE_INDEX).all()
        assert torch.equal(right["input_ids"][i, :n], item["input_ids"]) and (right["input_ids"][i, n:] == pad).all()
        assert torch.equal(right["labels"][i, :n], item["labels"]) and (right["attention_mask"][i, n:] == 0).all()
        assert torch.equal(prompt["input_ids"][i, width - n :], item["input_ids"][:-1])
    # left padding: the answer is the last column for every row, and the prompt is everything before it
    assert torch.equal(left["input_ids"][:, -1], left["answer_id"])
    assert torch.equal(left["labels"][:, -1], left["answer_id"]) and (left["labels"][:, :-1] == IGNORE_INDEX).all()
    assert torch.equal(prompt["input_ids"], left["input_ids"][:, :-1])
    assert left["pixel_values"].shape == (40, 3, 64, 64) and left["oracle_mask"].shape == (40, 64)
    assert torch.equal(left["patch_classes"], torch.stack([it["patch_classes"] for it in items]))
    with pytest.raises(ValueError, match="padding_side"):
        DigitVQACollator(pad, padding_side="middle")


# --- data module and validation ------------------------------------------------------------------------


def test_datamodule_batches_and_attributes():
    dm = DigitVQADataModule(batch_size=8, train_samples=16, val_samples=8, test_samples=8, seed=2)
    assert (dm.image_size, dm.patch_size, dm.num_patches, dm.num_image_tokens) == (64, 8, 64, 64)
    assert dm.vocab_size == len(dm.tokenizer) and dm.image_token_id == dm.tokenizer.image_token_id
    assert dm.answer_token_ids == dm.tokenizer.convert_tokens_to_ids(list(ANSWER_WORDS))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and torch.equal(batch["input_ids"][:, -1], batch["answer_id"])
    dm2 = DigitVQADataModule(batch_size=8, train_samples=16, val_samples=8, test_samples=8, seed=2)
    dm2.setup("fit")
    assert torch.equal(batch["input_ids"], next(iter(dm2.train_dataloader()))["input_ids"])  # seeded shuffle
    right = DigitVQADataModule(batch_size=8, padding_side="right", question_types=["count"])
    right.setup("validate")
    batch = next(iter(right.val_dataloader()))
    assert (batch["question_type"] == QUESTION_TYPES.index("count")).all()
    assert (batch["attention_mask"][:, 0] == 1).all()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(canvas_size=72), "canvas_size"),
        (dict(canvas_size=32, digit_scale=3), "digit_scale"),
        (dict(min_digits=3, max_digits=2), "min_digits"),
        (dict(max_digits=5), "max_digits"),
        (dict(question_types=["colour"]), "question_types"),
        (dict(question_types=[]), "question_types"),
        (dict(num_image_tokens=0), "num_image_tokens"),
        (dict(split="val", split_fractions=(0.98, 0.01, 0.01)), "split_fractions"),
        (dict(num_samples=0), "num_samples"),
        (dict(split="dev"), "split"),
    ],
)
def test_bad_dataset_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DigitVQA(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(batch_size=0), "batch_size"),
        (dict(padding_side="up"), "padding_side"),
        (dict(patch_size=6), "canvas_size"),
    ],
)
def test_bad_datamodule_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DigitVQADataModule(**kwargs)
