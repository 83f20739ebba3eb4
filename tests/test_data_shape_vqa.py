"""Tests for the shape-VQA task (tokensift.data.shape_vqa), the VQA batch contract (tokensift.data.contract) and
the MLLM recipe and bench on a data module other than digit VQA."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from tokensift.data import ShapeVQADataModule, check_vqa_batch
from tokensift.data.contract import VQABatchError, split_answers
from tokensift.data.shape_vqa import (
    ANSWER_WORDS,
    COLOURS,
    KINDS,
    QUESTION_TYPES,
    TEMPLATES,
    PlacedShape,
    ShapeVQA,
    ShapeVQASpec,
    build_tokenizer,
)
from tokensift.data.vqa import IGNORE_INDEX, IMAGE_TOKEN, VQACollator, qwen2_vl_images

SMALL = dict(num_samples=64, seed=3)
QUIET = dict(enable_progress_bar=False, enable_model_summary=False)
TINY = dict(vision_hidden_size=32, vision_layers=1, text_hidden_size=32, text_layers=1)
# a 32-px canvas of 4x4 patches, 2-3 shapes of 6-12 px: what the tiny LLaVA learns in seconds
SCENE = dict(canvas_size=32, min_size=6, max_size=12, min_shapes=2, max_shapes=3, seed=0)


def _items_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _patches(ink: np.ndarray, patch: int) -> set[int]:
    rows, cols = np.nonzero(ink)
    grid = ink.shape[1] // patch
    return {int(r // patch * grid + c // patch) for r, c in zip(rows, cols, strict=True)}


# --- tokens and items ----------------------------------------------------------------------------------


def test_vocabulary_holds_every_template_word_and_answer():
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    answer_ids = tokenizer.convert_tokens_to_ids(list(ANSWER_WORDS))
    assert answer_ids == list(range(answer_ids[0], answer_ids[0] + len(ANSWER_WORDS)))  # contiguous
    words = [w for templates in TEMPLATES.values() for t in templates for w in t.split() if not w.startswith("{")]
    assert all(w in vocab for w in [*words, *KINDS, *COLOURS, "left", "of", "above"])
    assert tokenizer.unk_token_id not in tokenizer("is the red disk left of the blue ring ? answer : no")["input_ids"]


def test_item_fields_and_answers_of_one_or_two_tokens():
    split = ShapeVQA("test", **SMALL)
    tokenizer = split.tokenizer
    lengths = set()
    for index in range(len(split)):
        item, spec = split[index], split.sample_spec(index)
        assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
        assert float(item["pixel_values"].min()) >= -1.0 and float(item["pixel_values"].max()) <= 1.0
        ids, labels = item["input_ids"], item["labels"]
        assert int((ids == split.image_token_id).sum()) == split.num_patches == 64
        answer = labels != IGNORE_INDEX
        assert torch.equal(labels[answer], ids[answer]) and bool(answer[-int(answer.sum()) :].all())
        assert tokenizer.decode(ids[answer]) == spec.answer
        lengths.add(int(answer.sum()))
        assert int(answer.sum()) == (2 if spec.question_type == "where" else 1)
        assert item["oracle_mask"].dtype == torch.bool and item["oracle_mask"].shape == (64,)
        assert QUESTION_TYPES[int(item["question_type"])] == spec.question_type and int(item["index"]) == index
        prompt = tokenizer.decode(ids[~answer], skip_special_tokens=True)
        assert prompt == split.question(spec).replace(f" {IMAGE_TOKEN}", "").replace(f"{IMAGE_TOKEN} ", "")
    assert lengths == {1, 2}


def test_answers_match_the_scene():
    split = ShapeVQA("train", 200, seed=5)
    seen = set()
    for index in range(len(split)):
        spec = split.sample_spec(index)
        slots, shapes = dict(spec.slots), spec.shapes
        seen.add(spec.question_type)
        assert len({s.name for s in shapes}) == len(shapes)  # colour + kind names one shape
        if spec.question_type == "colour":
            (shape,) = [s for s in shapes if s.kind == slots["kind"]]
            assert spec.answer == shape.colour
        elif spec.question_type == "count":
            assert spec.answer == str(sum(s.kind == slots["kind"] for s in shapes))
        elif spec.question_type == "where":
            (shape,) = [s for s in shapes if s.name == slots["first"]]
            top, left, bottom, right = shape.box()
            half = split.canvas_size // 2
            assert (bottom <= half or top >= half) and (right <= half or left >= half)  # the box is in a quadrant
            assert spec.answer == f"{'top' if bottom <= half else 'bottom'} {'left' if right <= half else 'right'}"
        else:
            (a,) = [s for s in shapes if s.name == slots["first"]]
            (b,) = [s for s in shapes if s.name == slots["second"]]
            axis = 1 if slots["relation"] == "left of" else 0
            assert spec.answer == ("yes" if a.box()[axis + 2] <= b.box()[axis] else "no")
            assert a.box()[axis + 2] <= b.box()[axis] or b.box()[axis + 2] <= a.box()[axis]  # never a pixel's call
        for i, s in enumerate(shapes):  # boxes apart by a pixel
            for t in shapes[i + 1 :]:
                (t0, l0, b0, r0), (t1, l1, b1, r1) = s.box(), t.box()
                assert t0 >= b1 + 1 or t1 >= b0 + 1 or l0 >= r1 + 1 or l1 >= r0 + 1
    assert seen == set(QUESTION_TYPES)


def test_answers_are_balanced():
    split = ShapeVQA("train", 2000, question_types=["relation", "where"], seed=0)
    answers = [split.question_answer(i)[1] for i in range(len(split))]
    yes = answers.count("yes") / (answers.count("yes") + answers.count("no"))
    quadrants = [a for a in answers if " " in a]
    assert 0.45 < yes < 0.55
    assert all(abs(quadrants.count(q) / len(quadrants) - 0.25) < 0.05 for q in set(quadrants))


# --- oracle mask -----------------------------------------------------------------------------------------


def test_oracle_mask_by_hand():
    """A 16-px canvas of 4-px patches (a 4x4 grid): a 4-px square filling patch 3, a 6-px square over rows 5-10
    and columns 9-14 (patches 6, 7, 10, 11) and an 8-px disk over rows 1-8 and columns 1-8, whose box reaches
    patch 10 by its corner pixel only, which the disk's silhouette leaves empty."""
    split = ShapeVQA("test", 1, canvas_size=16, patch_size=4, min_size=4, max_size=6, min_shapes=2, max_shapes=2)
    shapes = (
        PlacedShape("square", "red", "solid", 4, (0, 12)),
        PlacedShape("square", "blue", "striped", 6, (5, 9)),
        PlacedShape("disk", "green", "checked", 8, (1, 1)),
    )
    slots = (("first", "red square"), ("relation", "left of"), ("second", "blue square"))

    def spec(relevant):
        return ShapeVQASpec("relation", 0, slots, shapes, "no", relevant, noise_seed=0)

    def oracle(relevant):
        return set(np.flatnonzero(split.render(spec(relevant))[1]).tolist())

    disk = {0, 1, 2, 4, 5, 6, 8, 9}
    assert oracle((0,)) == {3}
    assert oracle((1,)) == {6, 7, 10, 11}
    assert oracle((2,)) == disk
    assert oracle((0, 1)) == {3, 6, 7, 10, 11}
    assert oracle((0, 1, 2)) == disk | {3, 7, 10, 11}
    alpha = split.alphas(spec((2,)))[2]
    assert alpha[8, 8] == 0 and alpha[4, 4] == 1 and alpha[8, 4] > 0  # the silhouette, not the box
    colours, kinds = split.patch_targets(spec((2,)))
    assert colours[3] == list(COLOURS).index("red") and kinds[3] == KINDS.index("square")
    assert colours[0] == list(COLOURS).index("green") and kinds[0] == KINDS.index("disk")
    assert colours[15] == kinds[15] == IGNORE_INDEX


def test_generated_oracle_masks_cover_the_question_shapes():
    split = ShapeVQA("val", 120, seed=2)
    for index in range(len(split)):
        spec = split.sample_spec(index)
        alphas = split.alphas(spec)
        expected = _patches(alphas[list(spec.relevant)].max(0) > 0, split.patch_size)
        assert set(np.flatnonzero(split[index]["oracle_mask"].numpy()).tolist()) == expected
        kind = dict(spec.slots).get("kind")
        if spec.question_type == "count" and spec.answer == "0":  # no shape of the kind: every shape
            assert spec.relevant == tuple(range(len(spec.shapes)))
        elif spec.question_type in ("colour", "count"):
            assert all(spec.shapes[i].kind == kind for i in spec.relevant)
        else:
            names = [dict(spec.slots)[k] for k in ("first", "second") if k in dict(spec.slots)]
            assert sorted(spec.shapes[i].name for i in spec.relevant) == sorted(names)


# --- determinism, padding, layouts -----------------------------------------------------------------------


def test_determinism_and_access_order():
    a, b = ShapeVQA("test", **SMALL), ShapeVQA("test", **SMALL)
    forward = [a[i] for i in range(8)]
    backward = [b[i] for i in reversed(range(8))][::-1]
    assert all(_items_equal(x, y) for x, y in zip(forward, backward, strict=True))
    assert _items_equal(a[-1], a[len(a) - 1])
    other_split, other_seed = ShapeVQA("val", **SMALL), ShapeVQA("test", num_samples=64, seed=4)
    assert not torch.equal(a[0]["pixel_values"], other_split[0]["pixel_values"])
    assert not torch.equal(a[0]["pixel_values"], other_seed[0]["pixel_values"])
    with pytest.raises(IndexError):
        a[64]


def test_left_and_right_padding():
    split = ShapeVQA("test", **SMALL)
    items = [split[i] for i in range(12)]
    pad = split.tokenizer.pad_token_id
    left, right = VQACollator(pad)(items), VQACollator(pad, padding_side="right")(items)
    prompts = VQACollator(pad, with_answer=False)(items)
    assert "labels" not in prompts and left["input_ids"].shape == right["input_ids"].shape
    lengths = [len(item["input_ids"]) for item in items]
    assert len(set(lengths)) > 1  # templates and answers differ in length
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(left["input_ids"][row, -n:], item["input_ids"]) and bool(
            (left["input_ids"][row, :-n] == pad).all()
        )
        assert (
            torch.equal(right["input_ids"][row, :n], item["input_ids"]) and int(right["attention_mask"][row].sum()) == n
        )
        answer = int((item["labels"] != IGNORE_INDEX).sum())
        assert torch.equal(prompts["input_ids"][row, -(n - answer) :], item["input_ids"][:-answer])
    # the prompt of a left- or right-padded batch is the prompt-only collation, answers in order
    for batch in (left, right):
        prompt, answers = split_answers(batch, pad)
        assert torch.equal(prompt["input_ids"], prompts["input_ids"])
        assert torch.equal(prompt["attention_mask"], prompts["attention_mask"])
        for row, item in enumerate(items):
            expected = item["labels"][item["labels"] != IGNORE_INDEX]
            assert answers[row, : len(expected)].tolist() == expected.tolist()
            assert bool((answers[row, len(expected) :] == IGNORE_INDEX).all())


def test_datamodule_batches_follow_the_contract_in_both_layouts():
    llava = ShapeVQADataModule(batch_size=6, train_samples=12, val_samples=6, test_samples=6, seed=1)
    qwen = ShapeVQADataModule(batch_size=6, train_samples=12, val_samples=6, test_samples=6, seed=1, family="qwen2_vl")
    for module in (llava, qwen):
        module.setup()
    images, patches = next(iter(llava.test_dataloader())), next(iter(qwen.test_dataloader()))
    check_vqa_batch(images, "llava", image_token_id=llava.image_token_id)
    check_vqa_batch(patches, "qwen2_vl", image_token_id=qwen.image_token_id, spatial_merge_size=2)
    check_vqa_batch(images, "qwen2_vl", image_token_id=llava.image_token_id)  # images: patched with the model's config
    assert images["pixel_values"].shape == (6, 3, 64, 64)
    assert patches["pixel_values"].shape == (6 * 16 * 16, 3 * 2 * 4 * 4)
    assert patches["image_grid_thw"].tolist() == [[1, 16, 16]] * 6
    assert torch.equal(patches["mm_token_type_ids"], (patches["input_ids"] == qwen.image_token_id).long())
    rebuilt = qwen2_vl_images(patches["pixel_values"], patches["image_grid_thw"], 3, 4, 2)
    assert torch.equal(torch.stack(rebuilt), images["pixel_values"])
    for key in ("input_ids", "labels", "oracle_mask", "index"):
        assert torch.equal(images[key], patches[key]), key
    batch = next(iter(llava.train_dataloader()))
    assert batch["input_ids"].shape[0] == 6 and set(llava.alignment_targets(batch)[0][1].shape) == {6, 64}
    processor = llava.image_processor()
    split = llava.test_dataset
    canvas, _ = split.render(split.sample_spec(0))
    encoded = processor(images=[canvas], return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(encoded, split[0]["pixel_values"], atol=1e-5)


# --- the contract's validator ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch():
    module = ShapeVQADataModule(batch_size=4, test_samples=4, seed=1)
    module.setup("test")
    return next(iter(module.test_dataloader())), module.image_token_id


def _broken(batch, **changes):
    out = {k: v.clone() for k, v in batch.items()}
    for key, value in changes.items():
        if value is None:
            del out[key]
        else:
            out[key] = value
    return out


def test_contract_validator_names_the_field_and_the_fix(batch):
    good, image = batch
    check_vqa_batch(good, "llava", image_token_id=image)
    labels = good["labels"].clone()
    shifted = good["labels"].clone()
    shifted[labels != IGNORE_INDEX] = 1  # not the input token there
    broken_run = good["labels"].clone()
    broken_run[0, 5] = good["input_ids"][0, 5]  # a labelled prompt token far from the answer
    cases = [
        (dict(labels=None), r"lacks \['labels'\]"),
        (dict(index=None), r"lacks \['index'\]"),
        (dict(input_ids=good["input_ids"].float()), r"batch\['input_ids'\] has dtype"),
        (dict(attention_mask=good["attention_mask"][:, 1:]), r"batch\['attention_mask'\] has shape"),
        (dict(labels=torch.full_like(labels, IGNORE_INDEX)), r"batch\['labels'\] rows \[0, 1, 2, 3\] mark no answer"),
        (dict(labels=shifted), r"differ from input_ids.*teacher forcing"),
        (dict(labels=broken_run), r"broken run"),
        (dict(pixel_values=good["pixel_values"].long()), r"batch\['pixel_values'\].*float"),
        (dict(pixel_values=good["pixel_values"][:2]), r"one image per sample"),
        (dict(oracle_mask=good["oracle_mask"].long()), r"batch\['oracle_mask'\] has dtype.*bool"),
        (dict(oracle_mask=good["oracle_mask"][:, :10]), r"oracle_mask'\] has 10 patches per row.*\[64\] image tokens"),
        (dict(index=good["index"][:2]), r"batch\['index'\]"),
    ]
    for changes, message in cases:
        with pytest.raises(VQABatchError, match=message):
            check_vqa_batch(_broken(good, **changes), "llava", image_token_id=image)
    with pytest.raises(VQABatchError, match=r"rows \[0, 1, 2, 3\] hold no image token"):
        check_vqa_batch(good, "llava", image_token_id=999)
    flat = good["pixel_values"].reshape(-1, 48)
    with pytest.raises(VQABatchError, match=r"no image_grid_thw.*give qwen2_vl the processor's flattened patches"):
        check_vqa_batch(_broken(good, pixel_values=flat), "qwen2_vl")
    grid = torch.tensor([[1, 16, 16]] * 4)
    with pytest.raises(VQABatchError, match=r"image_grid_thw holds 1024 patches"):
        check_vqa_batch(_broken(good, pixel_values=flat[:100], image_grid_thw=grid), "qwen2_vl")
    patched = _broken(good, pixel_values=flat, image_grid_thw=grid)
    check_vqa_batch(patched, "qwen2_vl", image_token_id=image, spatial_merge_size=2)  # 1024 patches, 2x2: 256 tokens
    with pytest.raises(VQABatchError, match=r"hold 256 image tokens but the grids merge into 64"):
        check_vqa_batch(patched, "qwen2_vl", image_token_id=image, spatial_merge_size=4)
    with pytest.raises(VQABatchError, match="dict of tensors"):
        check_vqa_batch([good], "llava")
    with pytest.raises(ValueError, match="family"):
        check_vqa_batch(good, "blip")
    prompt, _ = split_answers(good, 0)
    check_vqa_batch(prompt, "llava", image_token_id=image, require_labels=False)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kinds": ["disk", "hexagon"]}, "kinds"),
        ({"kinds": ["disk"]}, "kinds"),
        ({"question_types": ["texture"]}, "question_types"),
        ({"min_shapes": 1, "question_types": ["relation"]}, "min_shapes"),
        ({"max_shapes": 6}, "max_shapes"),
        ({"max_size": 32}, "max_size"),
        ({"canvas_size": 60}, "canvas_size"),
        ({"max_shapes": 5, "max_size": 28}, "crowd"),
        ({"padding_side": "middle"}, "padding_side"),
        ({"family": "blip"}, "family"),
        ({"family": "qwen2_vl", "patch_size": 5, "canvas_size": 60}, "patch_size"),
        ({"test_samples": 0}, "test_samples"),
    ],
)
def test_bad_datamodule_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ShapeVQADataModule(**kwargs)


# --- the MLLM recipe and the bench on shape VQA -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LLaVA trained for 512 steps on shape VQA's colour questions (about 20 s on one thread)."""
    from tokensift.backbones.pretrain_mllm import pretrain_mllm

    data = ShapeVQADataModule(
        batch_size=16, train_samples=2048, val_samples=16, test_samples=128, question_types=["colour"], **SCENE
    )
    out, accuracy = pretrain_mllm(
        tmp_path_factory.mktemp("shape_mllm") / "llava", data, max_epochs=4, trainer_kwargs=QUIET, lr=1e-2, **TINY
    )
    return out, accuracy, data


def test_pretrain_reaches_above_chance_on_shape_vqa(trained):
    from tokensift.backbones.pretrain_mllm import REPORT, load_mllm
    from tokensift.backbones.vqa import answer_accuracy

    out, accuracy, data = trained
    report = json.loads((out / REPORT).read_text())
    chance = 1 / len(COLOURS)  # colours are balanced by construction
    assert report["data_class"] == "tokensift.data.shape_vqa.ShapeVQADataModule" and report["train_steps"] == 512
    assert accuracy > chance + 0.15 and accuracy > report["text_only_baseline"] + 0.15, report
    assert report["forward_generate_agreement"] == 1.0 and report["test_accuracy_per_type"] == {"colour": accuracy}
    model, tokenizer, image_processor, _ = load_mllm(out)
    assert tokenizer.get_vocab() == data.tokenizer.get_vocab() and image_processor is not None
    # two-token answers: the forward reads the teacher-forced pass, generate decodes greedily
    where = ShapeVQADataModule(test_samples=24, question_types=["colour", "where"], **SCENE)
    result = answer_accuracy(model, where, batch_size=8)
    assert result["num_samples"] == 24 and set(result["per_type"]) == {"colour", "where"}
    assert 0 <= result["generate_accuracy"] <= 1 and 0 <= result["agreement"] <= 1


def test_bench_on_shape_vqa_with_two_token_answers(trained, tmp_path):
    from tokensift.backbones.pretrain_mllm import load_mllm
    from tokensift.backbones.vqa import answer_accuracy
    from tokensift.bench import run_bench

    out, _, _ = trained
    init_args = dict(batch_size=8, test_samples=16, question_types=["colour", "where"], **SCENE)
    data = {"class_path": "tokensift.data.ShapeVQADataModule", "init_args": init_args}
    result = run_bench(str(out), json.dumps(data), "random", (1.0, 0.25), out=tmp_path, repeats=1, warmup=0, quiet=True)
    rows = {(r["method"], r["keep_ratio"]): r for r in result["rows"]}
    assert set(rows) == {("unpruned", 1.0), ("random", 1.0), ("random", 0.25), ("oracle", 1.0), ("oracle", 0.25)}
    model = load_mllm(out)[0]
    reference = answer_accuracy(model, ShapeVQADataModule(**init_args), batch_size=8)
    assert rows[("unpruned", 1.0)]["accuracy"] == pytest.approx(reference["generate_accuracy"])
    assert rows[("random", 1.0)]["accuracy"] == rows[("unpruned", 1.0)]["accuracy"]
    assert rows[("oracle", 1.0)]["oracle_recall"] == 1.0 and rows[("random", 1.0)]["oracle_recall"] == 1.0
    assert rows[("oracle", 0.25)]["oracle_recall"] >= rows[("random", 0.25)]["oracle_recall"]
    assert rows[("random", 0.25)]["keep_count"] == 4 and rows[("unpruned", 1.0)]["num_patches"] == 16
    assert (tmp_path / "overlays.png").stat().st_size > 0


def test_pretrain_command_line(tmp_path):
    from tokensift.cli import main

    data = {
        "class_path": "tokensift.data.ShapeVQADataModule",
        "init_args": dict(train_samples=32, test_samples=8, **SCENE),
    }
    args = ["pretrain-mllm", "--out", str(tmp_path / "m"), "--data", json.dumps(data), "--batch-size", "16"]
    args += ["--enable-progress-bar", "false", *(f"--{k.replace('_', '-')}={v}" for k, v in TINY.items())]
    main(args)
    report = json.loads((tmp_path / "m" / "tokensift_mllm.json").read_text())
    assert report["train_steps"] == 2 and report["data"]["canvas_size"] == 32 and report["test_samples"] == 8


def test_qwen2_vl_trains_and_benches_on_processor_layout_batches(tmp_path):
    """Batches in Qwen2-VL's processor layout (flattened patches, image_grid_thw) train and bench a Qwen2-VL as
    images [B, C, H, W] do, which tokensift patches with the model's vision config: the same rows."""
    from tokensift.backbones.pretrain_mllm import load_mllm, pretrain_mllm
    from tokensift.backbones.vqa import answer_accuracy
    from tokensift.bench import run_bench

    options = dict(question_types=["colour", "where"], **SCENE)
    data = ShapeVQADataModule(batch_size=16, train_samples=64, test_samples=16, family="qwen2_vl", **options)
    out, accuracy = pretrain_mllm(tmp_path / "qwen", data, family="qwen2_vl", trainer_kwargs=QUIET, **TINY)
    model = load_mllm(out)[0]
    assert accuracy == answer_accuracy(model, data, batch_size=8)["accuracy"]
    results = {}
    for family in ("qwen2_vl", "llava"):
        init_args = dict(batch_size=8, test_samples=16, family=family, **options)
        spec = {"class_path": "tokensift.data.ShapeVQADataModule", "init_args": init_args}
        results[family] = run_bench(
            str(out), spec, "random", (1.0, 0.5), out=tmp_path / family, repeats=1, warmup=0, quiet=True
        )
    for layout, images in zip(results["qwen2_vl"]["rows"], results["llava"]["rows"], strict=True):
        for field in ("method", "keep_ratio", "accuracy", "oracle_recall", "keep_count", "flops_ratio"):
            assert layout[field] == images[field], field
    assert results["qwen2_vl"]["rows"][0]["num_patches"] == 16
    with pytest.raises(ValueError, match="family='llava'"):
        pretrain_mllm(tmp_path / "x", data, family="llava", **TINY)


class BareVQA(L.LightningDataModule):
    """A data module that is only its test loader: contract batches without oracle masks, and none of the VQA data
    modules' attributes (no tokenizer, answer vocabulary or image token id)."""

    def __init__(self, batch_size: int = 8):
        super().__init__()
        self.batch_size = batch_size
        self.inner = ShapeVQADataModule(batch_size=batch_size, test_samples=16, question_types=["colour"], **SCENE)

    def setup(self, stage=None):
        self.inner.setup("test")

    def test_dataloader(self):
        def strip(batch):
            return {k: v for k, v in batch.items() if k not in ("oracle_mask", "patch_colours", "patch_kinds")}

        return [strip(batch) for batch in self.inner.test_dataloader()]


def test_bench_takes_any_data_module_of_the_contract(trained, tmp_path):
    from tokensift.bench import run_bench

    out, _, _ = trained
    result = run_bench(str(out), BareVQA(), "random", (1.0, 0.5), out=tmp_path, repeats=1, warmup=0, quiet=True)
    rows = {(r["method"], r["keep_ratio"]): r for r in result["rows"]}
    assert set(rows) == {("unpruned", 1.0), ("random", 1.0), ("random", 0.5)}  # no oracle without oracle masks
    assert all(r["oracle_recall"] is None for r in result["rows"])
    assert rows[("random", 1.0)]["accuracy"] == rows[("unpruned", 1.0)]["accuracy"] > 0  # argmax over every token
    assert (tmp_path / "overlays.png").stat().st_size > 0


def test_text_only_baseline_reads_questions_cheaply_or_off_the_items():
    from tokensift.backbones.pretrain_mllm import text_only_baseline

    class ItemsOnly(torch.utils.data.Dataset):  # no question_answer(): the baseline reads rendered items
        def __init__(self, split):
            self.split, self.tokenizer = split, split.tokenizer

        def __len__(self):
            return len(self.split)

        def __getitem__(self, index):
            return self.split[index]

    train = ShapeVQA("train", 300, question_types=["relation", "colour"], seed=0)
    test = ShapeVQA("test", 100, question_types=["relation", "colour"], seed=0)
    cheap = text_only_baseline(train, test)
    assert text_only_baseline(ItemsOnly(train), ItemsOnly(test)) == cheap
    assert 0.2 < cheap < 0.6  # yes / no and five balanced colours: about the prior
