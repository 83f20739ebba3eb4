"""``tokensift show``: the model's own processor on a user's images, the method applied, the kept patches drawn."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, ViTConfig, ViTForImageClassification, ViTImageProcessor

import tokensift as ts
from tokensift.backbones import adapt, load_backbone
from tokensift.backbones.vqa import mllm_inputs
from tokensift.cli import main
from tokensift.export import save_artifact
from tokensift.scorers.dynamicvit import DynamicViTMethod
from tokensift.show import chat_prompt, show

TINY_VIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=4)
PATCHES = (32 // 4) ** 2
LABELS = {0: "cat", 1: "dog", 2: "fox"}


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    """A tiny ViT classifier and its ViTImageProcessor in one save_pretrained folder."""
    path = tmp_path_factory.mktemp("show") / "vit"
    torch.manual_seed(0)
    label2id = {name: index for index, name in LABELS.items()}
    config = ViTConfig(**TINY_VIT, image_size=32, num_labels=3, id2label=LABELS, label2id=label2id)
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def user_images(tmp_path_factory) -> list[Path]:
    """Two photos of different sizes and formats, as a user would have them."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    png, jpeg = root / "wide.png", root / "tall.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(png)
    Image.fromarray(rng.integers(0, 256, (90, 30, 3), dtype=np.uint8)).save(jpeg, quality=90)
    return [png, jpeg]


def kept_by_hand(model, method, pixel_values: torch.Tensor, keep_ratio: float, sites=None) -> list[list[int]]:
    """The kept patches read straight off ``ts.apply``'s handle ([CLS] at original index 0)."""
    with torch.no_grad(), ts.apply(model, method, keep_ratio=keep_ratio, sites=sites) as handle:
        model(pixel_values=pixel_values)
        kept = handle.kept_orig_index
    return [sorted(int(i) - 1 for i in row if i >= 1) for row in kept]


def processed(model_dir: Path, images: list[Path]) -> torch.Tensor:
    processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    return processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]


def test_cli_draws_a_training_free_method(vit_dir, user_images, tmp_path, capsys):
    out = tmp_path / "kept.png"
    args = ["--model", str(vit_dir), "--method", "l2norm", "--keep-ratio", "0.25", "--out", str(out)]
    main(["show", *args, "--images", *map(str, user_images)])
    assert f"tokens kept per image: {math.ceil(0.25 * PATCHES)}/{PATCHES}, 16/{PATCHES}" in capsys.readouterr().out
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.width > 100 and figure.height > 100
    assert not list(tmp_path.glob(".kept*")), "no temporary file left behind"

    figure_path, kept = show(str(vit_dir), "l2norm", [str(p) for p in user_images], keep_ratio=0.25, out=str(out))
    assert figure_path == out
    expected = kept_by_hand(load_backbone(str(vit_dir)).eval(), "l2norm", processed(vit_dir, user_images), 0.25)
    assert kept == expected and all(len(row) == 16 for row in kept)
    assert kept[0] != kept[1], "two different images keep different patches"


def test_exported_learned_artifact(vit_dir, user_images, tmp_path):
    model = load_backbone(str(vit_dir)).eval()
    torch.manual_seed(3)
    artifact = save_artifact(DynamicViTMethod.for_backbone(adapt(model)), adapt(model).fingerprint(), tmp_path / "a")
    _, kept = show(str(vit_dir), f"dynamicvit:{artifact}", [str(p) for p in user_images], 0.5, str(tmp_path / "k.png"))
    expected = kept_by_hand(model, artifact, processed(vit_dir, user_images), 0.5)
    assert kept == expected and all(len(row) == PATCHES // 2 for row in kept)
    # the bare artifact folder names the method too
    _, again = show(str(vit_dir), str(artifact), [str(p) for p in user_images], 0.5, str(tmp_path / "k2.png"))
    assert again == kept


def test_sites_place_a_training_free_method(vit_dir, user_images, tmp_path, capsys):
    images, out = [str(p) for p in user_images], str(tmp_path / "k.png")
    main(
        [
            "show",
            "--model",
            str(vit_dir),
            "--method",
            "cls_attention",
            "--sites",
            "vit.0",
            "--out",
            out,
            "--images",
            *images,
        ]
    )
    assert "tokens kept per image: 16/64, 16/64" in capsys.readouterr().out
    _, at_first = show(str(vit_dir), "cls_attention", images, 0.25, out, sites=["vit.0"])
    _, at_default = show(str(vit_dir), "cls_attention", images, 0.25, out)
    model, pixel_values = load_backbone(str(vit_dir)).eval(), processed(vit_dir, user_images)
    assert at_first == kept_by_hand(model, "cls_attention", pixel_values, 0.25, sites=["vit.0"])
    assert at_default == kept_by_hand(model, "cls_attention", pixel_values, 0.25)
    assert at_first != at_default, "the site changes what is kept"


def test_layer_skip_artifact_is_refused(vit_dir, user_images, tmp_path):
    from tokensift.scorers.das import DASMethod

    model = load_backbone(str(vit_dir)).eval()
    method, fingerprint = DASMethod.for_backbone(adapt(model)), adapt(model).fingerprint()
    artifact = save_artifact(method, fingerprint, tmp_path / "das", default_budget={"skip_layers": 1})
    with pytest.raises(ValueError, match=r"method: das skips whole layers and keeps every token"):
        show(str(vit_dir), f"das:{artifact}", [str(user_images[0])], 0.25, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA from the recipe (one short epoch): it saves the LlavaProcessor that show needs."""
    from tokensift.backbones.pretrain_mllm import pretrain_mllm
    from tokensift.data.digit_vqa import DigitVQADataModule

    data = DigitVQADataModule(batch_size=16, train_samples=16, val_samples=16, test_samples=16, seed=1)
    tiny = dict(vision_hidden_size=32, vision_layers=1, text_hidden_size=32, text_layers=2)
    quiet = dict(enable_progress_bar=False, enable_model_summary=False, logger=False)
    out, _ = pretrain_mllm(tmp_path_factory.mktemp("mllm") / "llava", data, trainer_kwargs=quiet, **tiny)
    # the recipe's processor reads canvases of the model's size as they are; a user's photos need resizing
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    size = data.image_size
    processor.image_processor.do_resize, processor.image_processor.size = True, {"height": size, "width": size}
    processor.save_pretrained(out)
    return out


def test_llava_with_a_question(llava_dir, user_images, tmp_path, capsys):
    from tokensift.backbones.loading import load_mllm_backbone

    question = "is there a 3 ?"
    out = tmp_path / "llava.png"
    args = ["--model", str(llava_dir), "--method", "visionzip", "--keep-ratio", "0.25", "--out", str(out)]
    main(["show", *args, "--question", question, "--images", *map(str, user_images)])
    assert out.is_file() and "tokens kept per image" in capsys.readouterr().out
    _, kept = show(str(llava_dir), "visionzip", [str(p) for p in user_images], 0.25, str(out), question=question)

    model = load_mllm_backbone(str(llava_dir))
    processor = AutoProcessor.from_pretrained(llava_dir, local_files_only=True)
    prompt = chat_prompt(processor, question)
    for path, shown in zip(user_images, kept, strict=True):
        encoded = processor(images=[Image.open(path).convert("RGB")], text=[prompt], return_tensors="pt")
        visual = (encoded["input_ids"][0] == model.config.image_token_id).nonzero().flatten().tolist()
        with torch.no_grad(), ts.apply(model, "visionzip", keep_ratio=0.25) as handle:
            model(**mllm_inputs(model, encoded))
            survivors = set(handle.kept_orig_index[0].tolist())
        expected = [rank for rank, position in enumerate(visual) if position in survivors]
        assert shown == expected and len(shown) == math.ceil(0.25 * len(visual))


def test_llava_needs_a_question_and_a_processor(llava_dir, user_images, tmp_path):
    images = [str(user_images[0])]
    with pytest.raises(ValueError, match=r"question: .* multimodal LLM.*--question"):
        show(str(llava_dir), "visionzip", images, 0.25, str(tmp_path / "x.png"))
    bare = tmp_path / "bare"
    from tokensift.backbones.loading import load_mllm_backbone

    load_mllm_backbone(str(llava_dir)).save_pretrained(bare)
    with pytest.raises(ValueError, match=r"model: .*no multimodal processor.*processor\.save_pretrained"):
        show(str(bare), "visionzip", images, 0.25, str(tmp_path / "x.png"), question="is there a 3 ?")
    processor = AutoProcessor.from_pretrained(llava_dir, local_files_only=True)
    processor.image_processor.do_resize = False
    processor.save_pretrained(bare)
    with pytest.raises(ValueError, match=r"model: .*makes 40x70 pixel values .* reads 64x64.*do_resize = True"):
        show(str(bare), "visionzip", images, 0.25, str(tmp_path / "x.png"), question="is there a 3 ?")
    with pytest.raises(ValueError, match=r"method: 'l2norm' prunes vision-transformer blocks only"):
        show(str(llava_dir), "l2norm", images, 0.25, str(tmp_path / "x.png"), question="is there a 3 ?")


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2-VL from the recipe: a tokenizer and an image processor, no Qwen2VLProcessor (no torchvision)."""
    from tokensift.backbones.pretrain_mllm import pretrain_mllm
    from tokensift.data.digit_vqa import DigitVQADataModule

    data = DigitVQADataModule(batch_size=16, train_samples=16, val_samples=16, test_samples=16, seed=1)
    tiny = dict(vision_hidden_size=32, vision_layers=1, text_hidden_size=32, text_layers=2)
    quiet = dict(enable_progress_bar=False, enable_model_summary=False, logger=False)
    out, _ = pretrain_mllm(
        tmp_path_factory.mktemp("mllm") / "qwen2_vl", data, family="qwen2_vl", trainer_kwargs=quiet, **tiny
    )
    # the recipe's processor reads canvases as they are; a user's photos are resized to about the canvas's area
    image_processor = AutoImageProcessor.from_pretrained(out, local_files_only=True)
    image_processor.do_resize = True
    image_processor.save_pretrained(out)
    return out


def test_qwen2_vl_without_a_processor_class(qwen2_vl_dir, user_images, tmp_path):
    """Each user image gets its own token grid from the folder's image processor; the placeholders are expanded
    to one per LM token (t·h·w / 2²), as Qwen2VLProcessor would, and show keeps what the handle keeps."""
    from tokensift.backbones.loading import Qwen2VLImagePrompts, load_mllm_backbone, load_mllm_processor

    processor = load_mllm_processor(str(qwen2_vl_dir))
    assert isinstance(processor, Qwen2VLImagePrompts)
    question = "is there a 3 ?"
    out = tmp_path / "qwen.png"
    _, kept = show(str(qwen2_vl_dir), "visionzip", [str(p) for p in user_images], 0.25, str(out), question=question)
    assert out.is_file()
    model = load_mllm_backbone(str(qwen2_vl_dir))
    prompt = chat_prompt(processor, question)
    for path, shown in zip(user_images, kept, strict=True):
        encoded = processor(images=[Image.open(path).convert("RGB")], text=[prompt], return_tensors="pt")
        visual = (encoded["input_ids"][0] == model.config.image_token_id).nonzero().flatten().tolist()
        assert len(visual) == int(encoded["image_grid_thw"].prod()) // 4
        with torch.no_grad(), ts.apply(model, "visionzip", keep_ratio=0.25) as handle:
            model(**mllm_inputs(model, encoded))
            survivors = set(handle.kept_orig_index[0].tolist())
        expected = [rank for rank, position in enumerate(visual) if position in survivors]
        assert shown == expected and len(shown) == math.ceil(0.25 * len(visual))
    image = Image.open(user_images[0]).convert("RGB")
    with pytest.raises(ValueError, match=r"text: the prompts hold more .* placeholders than the 1 images"):
        processor(images=[image], text=[prompt + " " + processor.image_token])
    with pytest.raises(ValueError, match=r"images: 2 images but fewer .* placeholders"):
        processor(images=[image, image], text=[prompt])


def test_argument_errors_name_the_field_and_the_fix(vit_dir, user_images, tmp_path):
    images = [str(p) for p in user_images]
    out = str(tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"images: .*missing\.png.* is not a file"):
        show(str(vit_dir), "l2norm", [str(tmp_path / "missing.png")], 0.25, out)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(ValueError, match=r"images: .*broken\.png.* not an image PIL can read"):
        show(str(vit_dir), "l2norm", [str(broken)], 0.25, out)
    for ratio in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"keep_ratio: .* in \(0, 1\]"):
            show(str(vit_dir), "l2norm", images, ratio, out)
    with pytest.raises(ValueError, match=r"question: .* image classifier.*drop --question"):
        show(str(vit_dir), "l2norm", images, 0.25, out, question="what is it?")
    with pytest.raises(ValueError, match=r"method: unknown method 'nope'"):
        show(str(vit_dir), "nope", images, 0.25, out)
    with pytest.raises(ValueError, match=r"method: 'das' is a learned scorer"):
        show(str(vit_dir), "das", images, 0.25, out)
    with pytest.raises(ValueError, match=r"out: .*\.png"):
        show(str(vit_dir), "l2norm", images, 0.25, str(tmp_path / "x.jpg"))
    without_processor = tmp_path / "no_processor"
    load_backbone(str(vit_dir)).save_pretrained(without_processor)
    with pytest.raises(ValueError, match=r"model: .*no image processor.*processor\.save_pretrained"):
        show(str(without_processor), "l2norm", images, 0.25, out)
    assert not (tmp_path / "x.png").exists(), "no figure for a refused request"


def test_main_reports_a_bad_keep_ratio(vit_dir, user_images, tmp_path):
    args = ["--model", str(vit_dir), "--method", "l2norm", "--keep-ratio", "2", "--out", str(tmp_path / "x.png")]
    with pytest.raises(ValueError, match="keep_ratio"):
        main(["show", *args, "--images", str(user_images[0])])
