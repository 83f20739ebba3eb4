"""Tests for the tiny-MLLM recipe (tokensift.backbones.pretrain_mllm) and its evaluation (tokensift.backbones.vqa)."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tokensift.backbones.pretrain_mllm import (
    REPORT,
    build_image_processor_for,
    build_mllm,
    load_mllm,
    pretrain_mllm,
    text_only_baseline,
)
from tokensift.backbones.vqa import answer_accuracy, mllm_inputs, qwen2_vl_patches
from tokensift.data.digit_vqa import DigitVQA, DigitVQACollator, DigitVQADataModule

TINY = dict(vision_hidden_size=32, vision_layers=1, text_hidden_size=32, text_layers=1)
QUIET = dict(enable_progress_bar=False, enable_model_summary=False)


class LossRecorder(L.Callback):
    """The answer loss (cross-entropy at the answer token) of every training step."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/answer_loss"]))


def _data(**kwargs) -> DigitVQADataModule:
    options = dict(batch_size=16, train_samples=64, val_samples=16, test_samples=32, seed=1) | kwargs
    return DigitVQADataModule(**options)


@pytest.fixture(scope="module")
def trained_llava(tmp_path_factory):
    """A tiny LLaVA trained for 24 steps (6 epochs of 64 samples), saved; with its per-step losses."""
    recorder = LossRecorder()
    data = _data()
    out, accuracy = pretrain_mllm(
        tmp_path_factory.mktemp("mllm") / "llava",
        data,
        max_epochs=6,
        trainer_kwargs=QUIET | {"callbacks": [recorder]},
        seed=0,
        lr=5e-3,
        **TINY,
    )
    return out, accuracy, recorder.losses, data


def test_llava_loss_goes_down_and_artifact_round_trips(trained_llava):
    from transformers import AutoProcessor

    out, accuracy, losses, data = trained_llava
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    report = json.loads((out / REPORT).read_text())
    assert report["family"] == "llava" and report["test_accuracy"] == accuracy and report["train_steps"] == 24
    assert report["test_samples"] == 32 and 0 <= report["text_only_baseline"] <= 1

    model, tokenizer, image_processor, loaded_report = load_mllm(out)
    assert loaded_report == report and not model.training
    assert model.config.image_token_id == tokenizer.image_token_id == data.image_token_id
    assert tokenizer.get_vocab() == data.tokenizer.get_vocab()
    # the saved weights reproduce the recorded accuracy; forward and generate agree on every sample
    data.setup("test")
    result = answer_accuracy(model, data.test_dataset, batch_size=16)
    assert result["accuracy"] == pytest.approx(report["test_accuracy"])
    assert result["agreement"] == 1.0 and result["generate_accuracy"] == pytest.approx(result["accuracy"])
    assert set(result["per_type"]) <= {"position", "count", "exists"}

    # the saved processor rebuilds a sample's prompt and pixels from the raw canvas and the question text
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    dataset = data.test_dataset
    for index in range(3):
        spec = dataset.sample_spec(index)
        canvas, _ = dataset.render(spec)
        encoded = processor(images=[np.repeat(canvas[None], 3, 0)], text=[dataset.question(spec)], return_tensors="pt")
        item = dataset[index]
        assert torch.equal(encoded["input_ids"][0], item["input_ids"][:-1])
        assert torch.allclose(encoded["pixel_values"][0], item["pixel_values"], atol=1e-6)
    assert type(image_processor).__name__.startswith("CLIPImageProcessor")


def test_same_seed_gives_the_same_model(trained_llava, tmp_path):
    out, _, _, _ = trained_llava
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the recipe trains on its own fixed thread count, whatever the caller's is
    try:
        again, _ = pretrain_mllm(
            tmp_path / "again", _data(), max_epochs=6, trainer_kwargs=QUIET, seed=0, lr=5e-3, **TINY
        )
        assert torch.get_num_threads() == 2  # and gives the caller's back
    finally:
        torch.set_num_threads(threads)
    assert json.loads((again / REPORT).read_text())["torch_threads"] == 1
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_left_padding_does_not_change_the_answer_logits():
    torch.manual_seed(0)
    data = _data()
    model = build_mllm("llava", data, **TINY).eval()
    dataset = data.build("test", 8)
    lengths = [len(dataset[i]["input_ids"]) for i in range(8)]
    short, long = int(np.argmin(lengths)), int(np.argmax(lengths))
    assert lengths[short] < lengths[long]
    collate = DigitVQACollator(data.pad_token_id, with_answer=False)
    with torch.no_grad():
        alone = collate([dataset[short]])
        padded = collate([dataset[short], dataset[long]])
        alone_logits = model(**mllm_inputs(model, alone)).logits[0, -1]
        padded_logits = model(**mllm_inputs(model, padded)).logits[0, -1]
    assert torch.allclose(alone_logits, padded_logits, atol=1e-5)


def test_qwen2_vl_trains_saves_and_answers(tmp_path):
    data = _data(train_samples=32)
    out, accuracy = pretrain_mllm(
        tmp_path / "qwen", data, max_epochs=1, trainer_kwargs=QUIET, seed=0, family="qwen2_vl", **TINY
    )
    model, tokenizer, image_processor, report = load_mllm(out)
    assert report["family"] == "qwen2_vl" and model.config.model_type == "qwen2_vl"
    assert model.config.image_token_id == tokenizer.image_token_id == data.image_token_id
    assert report["forward_generate_agreement"] == 1.0 and report["test_accuracy"] == accuracy
    result = answer_accuracy(model, data.build("test"), batch_size=16, generate=False)
    assert result["accuracy"] == pytest.approx(accuracy) and result["agreement"] is None
    # the saved image processor and the recipe's own patching give the same vision input
    dataset = data.build("test", 2)
    canvas, _ = dataset.render(dataset.sample_spec(0))
    expected = image_processor(images=[np.repeat(canvas[None], 3, 0)], return_tensors="pt")
    vision = model.config.vision_config
    patches, grid = qwen2_vl_patches(
        dataset[0]["pixel_values"][None], vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    )
    assert torch.allclose(patches, expected["pixel_values"], atol=1e-6)
    assert torch.equal(grid, expected["image_grid_thw"])
    # one LM token per 2x2 merged window: as many as the prompt's image placeholders
    assert int(grid.prod()) // vision.spatial_merge_size**2 == data.num_image_tokens


def test_text_only_baseline_is_the_answer_prior():
    train = DigitVQA("train", 600, question_types=["exists"], seed=0)
    test = DigitVQA("test", 400, question_types=["exists"], seed=0, tokenizer=train.tokenizer)
    assert 0.4 < text_only_baseline(train, test) < 0.6  # yes / no are balanced whatever the question


def test_bad_recipe_arguments(tmp_path):
    data = _data()
    with pytest.raises(ValueError, match="family"):
        pretrain_mllm(tmp_path / "x", data, family="blip")
    with pytest.raises(ValueError, match="num_image_tokens"):
        build_mllm("llava", _data(num_image_tokens=16), **TINY)
    with pytest.raises(ValueError, match="num_attention_heads"):
        build_mllm("llava", data, vision_hidden_size=30)
    with pytest.raises(ValueError, match="family"):
        build_image_processor_for("blip", data)
    with pytest.raises(FileNotFoundError, match=REPORT):
        load_mllm(tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        mllm_inputs(torch.nn.Linear(1, 1), {"input_ids": None, "attention_mask": None})
    assert not (tmp_path / "x").exists()


def _video_data(family: str, **kwargs):
    from tokensift.data.video_vqa import VideoDigitVQADataModule

    options = dict(
        family=family, batch_size=8, train_samples=32, val_samples=8, test_samples=16, seed=1, min_frames=2,
        max_frames=4, max_digits=2, frame_size=42 if family == "molmo2" else 56,
        question_types=("first", "last", "count_frames"),
    )  # fmt: skip
    return VideoDigitVQADataModule(**(options | kwargs))


@pytest.mark.parametrize("family", ["molmo2", "qwen2_vl"])
def test_video_models_train_save_and_answer(tmp_path, family):
    from transformers import AutoTokenizer

    data = _video_data(family)
    recorder = LossRecorder()
    out, accuracy = pretrain_mllm(
        tmp_path / family, data, max_epochs=2, trainer_kwargs=QUIET | {"callbacks": [recorder]}, seed=0,
        family=family, vision_hidden_size=32, vision_layers=4, text_hidden_size=32, text_layers=1, eval_batch_size=8,
    )  # fmt: skip
    assert len(recorder.losses) == 8 and all(np.isfinite(recorder.losses))
    model, tokenizer, image_processor, report = load_mllm(out)
    assert model.config.model_type == family == report["family"] and image_processor is None
    assert report["data_class"].endswith("VideoDigitVQADataModule") and report["data"]["family"] == family
    assert report["test_accuracy"] == accuracy and report["forward_generate_agreement"] == 1.0
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(out, local_files_only=True).get_vocab()
    visual = model.config.video_token_id  # Molmo2: its image_patch_id; Qwen2-VL: its video token
    assert visual == data.image_token_id
    if family == "molmo2":
        assert model.config.adapter_config.vision_feature_layer == [-1]
        assert model.config.vision_config.num_hidden_layers == 4
    # the report's data options rebuild the test split the saved weights were scored on
    rebuilt = type(data)(**report["data"])
    result = answer_accuracy(model, rebuilt, batch_size=8)
    assert result["accuracy"] == pytest.approx(accuracy) and result["agreement"] == 1.0


def test_video_recipe_refuses_a_mismatched_family(tmp_path):
    with pytest.raises(ValueError, match="family"):
        build_mllm("qwen2_vl", _video_data("molmo2"), **TINY)
    with pytest.raises(ValueError, match="molmo2"):
        build_mllm("molmo2", _data(), **TINY)


@pytest.mark.parametrize("family", ["molmo2", "qwen2_vl"])
def test_video_recipe_configs_build_their_model(family):
    from pathlib import Path

    import yaml

    from tokensift.backbones.pretrain_mllm import pretrain_mllm_command
    from tokensift.data.resolve import resolve_datamodule

    path = Path(__file__).parent.parent / "configs" / f"pretrain_video_{family}.yaml"
    config = yaml.safe_load(path.read_text())
    unknown = set(config) - set(pretrain_mllm_command.__code__.co_varnames)
    assert not unknown and config["family"] == family == config["data"]["init_args"]["family"]
    data, _ = resolve_datamodule(config["data"])
    sizes = ("vision_hidden_size", "vision_layers", "text_hidden_size", "text_layers", "num_attention_heads")
    model = build_mllm(family, data, **{key: config[key] for key in sizes})
    assert data.image_size == 84 and data.patch_size == 7 and data.max_frames == 8
    if family == "molmo2":  # 144 patches per frame pooled 3x3 into 16 tokens; blocks after a vit.3 site
        assert model.config.vision_config.num_position_embeddings == 144 and data.tokens_per_frame == 16
        assert model.config.vision_config.num_hidden_layers > 4
    else:  # 2x2 merge over a temporal patch of 2: 36 tokens per frame pair
        assert model.config.vision_config.depth > 4 and data.tokens_per_frame == 36


def test_molmo2_visual_features_start_at_the_word_embeddings_scale():
    # at Molmo2's own init (0.02 everywhere) the adapter's output is ~1e-8 and a from-scratch model never learns
    data = _video_data("molmo2")
    torch.manual_seed(0)
    model = build_mllm("molmo2", data, vision_hidden_size=32, vision_layers=4, text_hidden_size=32, text_layers=1)
    batch = data.collate_fn([data.build("train")[i] for i in range(2)])
    with torch.no_grad():
        features = torch.cat(
            model.model.get_video_features(
                batch["pixel_values_videos"], batch["video_token_pooling"], batch["video_grids"]
            ).pooler_output
        )
    words = model.get_input_embeddings().weight
    assert features.norm(dim=-1).mean() > 0.2 * words.norm(dim=-1).mean()
    assert features.std(0).mean() > 1e-4
