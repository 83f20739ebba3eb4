"""Bad input everywhere a user can give it: each case raises a named exception type whose message names the
field, and leaves nothing behind (the model unhooked, no checkpoint / artifact / bench folder written).

Artifact and manifest cases (truncated safetensors, manifest fields, wrong method or model) are in
test_artifact_safety.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import build_tiny, make_pixel_values
from tiny_mllm import BOS, build_tiny_mllm, make_batch
from torch import nn
from torch.utils.data import DataLoader
from transformers import ViTConfig, ViTForImageClassification

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.cli import main
from tokensift.data import ClutteredDigitsDataModule, DigitVQADataModule


def hooks(model: nn.Module) -> int:
    """tokensift's hooks on ``model`` (transformers installs output-capturing hooks of its own and keeps them)."""
    return sum(
        str(getattr(hook, "__module__", "")).startswith("tokensift")
        for m in model.modules()
        for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    )


def assert_untouched(model: nn.Module, attn: str) -> None:
    assert hooks(model) == 0
    assert adapt(model).config._attn_implementation == attn
    assert getattr(model, "_tokensift_handle", None) is None


# -- ts.apply on a vision backbone ------------------------------------------------------------------------------
APPLY_CASES = [
    # (id, method, kwargs, exception, text the message must contain)
    ("unknown-method", "nope", {"keep_ratio": 0.5}, ValueError, "unknown method 'nope'"),
    ("method-wrong-type", 3, {"keep_ratio": 0.5}, TypeError, "method must be"),
    ("learned-method-by-name", "dynamicvit", {"keep_ratio": 0.5}, ValueError, "learned method"),
    ("llm-method-on-vit", "fastv", {"keep_ratio": 0.5}, ValueError, "multimodal LLM"),
    ("keep-ratio-zero", "l2norm", {"keep_ratio": 0}, ValueError, "keep_ratio"),
    ("keep-ratio-above-one", "l2norm", {"keep_ratio": 1.5}, ValueError, "keep_ratio"),
    ("keep-ratio-negative", "l2norm", {"keep_ratio": -0.1}, ValueError, "keep_ratio"),
    ("keep-ratio-nan", "l2norm", {"keep_ratio": math.nan}, ValueError, "keep_ratio"),
    ("keep-ratio-string", "l2norm", {"keep_ratio": "0.5"}, ValueError, "keep_ratio"),
    ("keep-ratio-bool", "l2norm", {"keep_ratio": True}, ValueError, "keep_ratio"),
    ("keep-count-zero", "l2norm", {"keep_count": 0}, ValueError, "keep_count"),
    ("keep-count-float", "l2norm", {"keep_count": 2.5}, ValueError, "keep_count"),
    ("ratio-and-count", "l2norm", {"keep_ratio": 0.5, "keep_count": 3}, ValueError, "keep_count"),
    ("no-budget", "l2norm", {}, ValueError, "keep_ratio"),
    ("per-site-unknown-site", "l2norm", {"keep_ratio": {"vit.7": 0.5}}, ValueError, "vit.7"),
    ("unknown-site", "l2norm", {"keep_ratio": 0.5, "sites": ["vit.9"]}, ValueError, "site 'vit.9'"),
    ("last-block-site", "l2norm", {"keep_ratio": 0.5, "sites": ["vit.3"]}, ValueError, "site 'vit.3'"),
    ("site-garbage", "l2norm", {"keep_ratio": 0.5, "sites": ["block1"]}, ValueError, "site 'block1'"),
    ("duplicate-sites", "l2norm", {"keep_ratio": 0.5, "sites": ["vit.1", "vit.1"]}, ValueError, "distinct"),
    ("sites-a-string", "l2norm", {"keep_ratio": 0.5, "sites": "vit.1"}, TypeError, "sites must be a list"),
    ("sites-empty", "l2norm", {"keep_ratio": 0.5, "sites": []}, ValueError, "sites=[]"),
    ("sites-not-names", "l2norm", {"keep_ratio": 0.5, "sites": [1]}, TypeError, "sites must be site names"),
    ("mode-unknown", "l2norm", {"keep_ratio": 0.5, "mode": "train"}, ValueError, "mode"),
    ("merge-in-mask-mode", "tome", {"keep_ratio": 0.5, "mode": "mask"}, ValueError, "gather"),
    ("threshold-on-pruner", "l2norm", {"keep_ratio": 0.5, "threshold": 0.5}, ValueError, "threshold="),
    ("unknown-option", "l2norm", {"keep_ratio": 0.5, "bogus": 1}, ValueError, "bogus"),
]


@pytest.mark.parametrize(
    ("method", "kwargs", "error", "text"), [c[1:] for c in APPLY_CASES], ids=[c[0] for c in APPLY_CASES]
)
def test_apply_refuses_bad_arguments(tiny_vit, method, kwargs, error, text):
    with pytest.raises(error) as raised:
        ts.apply(tiny_vit, method, **kwargs)
    assert text in str(raised.value)
    assert_untouched(tiny_vit, "sdpa")


@pytest.mark.parametrize("model", ["vit", nn.Linear(4, 4), None], ids=["a-string", "a-linear-layer", "none"])
def test_apply_refuses_an_unsupported_model(model):
    with pytest.raises(TypeError, match=r"no adapter for .*supported models"):
        ts.apply(model, "l2norm", keep_ratio=0.5)


def test_apply_refuses_a_second_handle_and_leaves_the_first(tiny_vit):
    pixel_values = make_pixel_values()
    with ts.apply(tiny_vit, "l2norm", keep_ratio=0.5) as handle:
        with pytest.raises(ValueError, match=r"already has a tokensift method applied; remove\(\)"):
            ts.apply(tiny_vit, "tome", keep_ratio=0.5)
        tiny_vit(pixel_values=pixel_values)
        assert handle.kept_orig_index.shape == (3, 1 + 8)
    assert_untouched(tiny_vit, "sdpa")


# -- images the handle is given ----------------------------------------------------------------------------------
PIXEL_CASES = [
    ("wrong-size", torch.randn(2, 3, 32, 32), "32x32 px; this model takes 16x16"),
    ("wrong-channels", torch.randn(2, 1, 16, 16), "1 channels"),
    ("no-batch-dim", torch.randn(3, 16, 16), "[batch, 3, 16, 16]"),
]


@pytest.mark.parametrize(("pixels", "text"), [c[1:] for c in PIXEL_CASES], ids=[c[0] for c in PIXEL_CASES])
def test_forward_refuses_images_the_model_does_not_take(tiny_model, pixels, text):
    attn = adapt(tiny_model).config._attn_implementation
    with ts.apply(tiny_model, "l2norm", keep_ratio=0.5), pytest.raises(ValueError) as raised:
        tiny_model(pixel_values=pixels)
    assert "pixel_values" in str(raised.value) and text in str(raised.value)
    assert_untouched(tiny_model, attn)


@pytest.mark.parametrize("method", ["l2norm", "tome", "divprune", "cls_attention", "random"])
def test_nan_pixels_never_keep_tokens_silently(method):
    model = build_tiny("vit")
    pixels = make_pixel_values()
    pixels[1, 0, 3, 3] = math.nan
    with ts.apply(model, method, keep_ratio=0.5), pytest.raises(FloatingPointError) as raised:
        model(pixel_values=pixels)
    message = str(raised.value)
    assert method in message and "vit.1" in message and "sample(s) [1]" in message and "pixel_values" in message


def test_nan_scores_of_a_learned_method_raise_naming_method_and_site(tiny_vit):
    from tokensift.scorers.dynamicvit import DynamicViTMethod

    method = DynamicViTMethod.for_backbone(adapt(tiny_vit))
    with torch.no_grad():
        method.predictors[1].head[-1].bias.fill_(math.nan)
    with ts.apply(tiny_vit, method, keep_ratio=0.5), pytest.raises(FloatingPointError) as raised:
        tiny_vit(pixel_values=make_pixel_values())
    site = method.config.sites[1]
    assert f"dynamicvit scores at site {site} are NaN" in str(raised.value)


# -- multimodal LLMs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_mllm_batch_without_visual_tokens_runs_unpruned(family):
    model = build_tiny_mllm(family)
    ids = torch.tensor([[BOS, 5, 6, 7], [BOS, 8, 9, 10]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        reference = model(**inputs).logits
        for method in ("fastv", "visionzip"):
            with ts.apply(model, method, keep_ratio=0.25):
                assert torch.equal(model(**inputs).logits, reference)  # nothing to prune, nothing pruned


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_mllm_nan_pixels_raise_at_the_first_site(family):
    model = build_tiny_mllm(family)
    before = hooks(model)
    inputs = make_batch(family).inputs()
    inputs["pixel_values"] = inputs["pixel_values"].clone()
    inputs["pixel_values"].view(-1)[3] = math.nan
    with torch.no_grad(), ts.apply(model, "visionzip", keep_ratio=0.5), pytest.raises(FloatingPointError) as raised:
        model(**inputs)
    assert "visionzip at site pre_llm" in str(raised.value) and "sample(s) [0]" in str(raised.value)
    assert hooks(model) == before


@pytest.mark.parametrize(
    ("sites", "error", "text"),
    [
        ("llm.1", TypeError, "sites must be a list"),
        (["llm.99"], ValueError, "llm.99"),
        (["llm.1", "llm.1"], ValueError, "distinct"),
    ],
    ids=["a-string", "unknown", "duplicate"],
)
def test_mllm_apply_refuses_bad_sites(sites, error, text):
    model = build_tiny_mllm("llava")
    before = hooks(model)
    with pytest.raises(error, match=text):
        ts.apply(model, "fastv", keep_ratio=0.5, sites=sites)
    assert hooks(model) == before


@pytest.mark.parametrize("method", ["fastv", "dart", "d2pruner"])
def test_mllm_default_site_beyond_a_shallow_model_names_the_option(method):
    from tiny_mllm import TEXT_CONFIG
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = build_tiny_mllm("llava").config
    config.text_config.num_hidden_layers = 2  # default site llm.2 is past the last decoder layer (llm.1)
    model = LlavaForConditionalGeneration(config).eval()
    with pytest.raises(ValueError) as raised:
        ts.apply(model, method, keep_ratio=0.5)
    assert f"{method}'s default sites ['llm.2']" in str(raised.value) and "layer" in str(raised.value)
    assert TEXT_CONFIG["num_hidden_layers"] == 4 and hooks(model) == 0
    with ts.apply(model, method, keep_ratio=0.5, sites=["llm.1"]):  # the fix the message gives
        model(**make_batch("llava").inputs())


# -- tokensift fit / export / bench ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bad_input") / "vit"
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=32
    )
    config.num_labels = 10
    ViTForImageClassification(config).save_pretrained(path)
    return path


def fit_args(vit_dir: Path, save_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        f"--model.backbone={vit_dir}",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--data.class_path=tokensift.data.ClutteredDigitsDataModule",
        "--data.init_args.canvas_size=32",
        "--data.init_args.clutter_size=[2,3]",
        "--data.init_args.num_clutter=3",
        "--data.init_args.train_samples=32",
        "--data.init_args.val_samples=16",
        "--data.init_args.test_samples=16",
        "--data.init_args.batch_size=16",
        *extra,
    ]


FIT_CASES = [
    # (id, extra args, message text, whether the run starts (config.yaml written) before the error)
    ("keep-range-reversed", ["--model.keep_ratio_range=[0.8,0.2]"], "keep_ratio_range", False),
    ("keep-range-zero", ["--model.keep_ratio_range=[0,0.5]"], "keep_ratio_range", False),
    ("training-free-method", ["--model.method=tome"], "training-free", False),
    ("unknown-method", ["--model.method=nope"], "unknown method 'nope'", False),
    ("missing-backbone", ["--model.backbone=/nonexistent/vit"], "backbone", False),
    ("eval-ratio-out-of-range", ["--model.eval_keep_ratios=[1.5]"], "keep_ratio", False),
    ("method-option-unknown", ['--model.method_options={"bogus": 1}'], "bogus", False),
    ("lr-negative", ["--model.lr=-1"], "lr must be", False),
    ("weight-decay-above-one", ["--model.weight_decay=2"], "weight_decay", False),
    ("checkpoint-every-zero", ["--checkpoint_every_n_steps=0"], "checkpoint_every_n_steps", False),
    ("batch-size-zero", ["--data.init_args.batch_size=0"], "batch_size", False),
    ("empty-train-split", ["--data.init_args.train_samples=0"], "train_samples", False),
    ("images-too-large", ["--data.init_args.canvas_size=64"], "canvas_size", True),
    ("images-one-channel", ["--data.init_args.num_channels=1"], "channels", True),
]


@pytest.mark.parametrize(("extra", "text", "starts"), [c[1:] for c in FIT_CASES], ids=[c[0] for c in FIT_CASES])
def test_fit_refuses_bad_arguments_and_writes_no_checkpoint(vit_dir, tmp_path, extra, text, starts):
    save_dir = tmp_path / "runs"
    with pytest.raises(ValueError) as raised:
        main(fit_args(vit_dir, save_dir, *extra))
    assert text in str(raised.value)
    assert "Union subtypes" not in str(raised.value)  # the class's own message, not jsonargparse's wrapper
    assert list(save_dir.rglob("*.ckpt")) == []
    if not starts:
        assert not save_dir.exists()


class EmptyData(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader([], batch_size=4)

    def val_dataloader(self):
        return DataLoader([], batch_size=4)


class NoLabels(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader([{"pixel_values": torch.zeros(3, 32, 32)}] * 4, batch_size=2)

    def val_dataloader(self):
        return self.train_dataloader()


@pytest.mark.parametrize(
    ("data", "text"),
    [(EmptyData, "yields no batches"), (NoLabels, "'labels'")],
    ids=["empty-data-module", "batches-without-labels"],
)
def test_fit_refuses_data_it_cannot_train_on(vit_dir, tmp_path, data, text):
    from tokensift.trainer import ScorerTrainer

    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=text):
        trainer.fit(ScorerTrainer(str(vit_dir)), data())
    assert list(tmp_path.rglob("*.ckpt")) == []


def test_export_of_a_file_that_is_not_a_checkpoint_writes_nothing(tmp_path):
    junk = tmp_path / "notes.ckpt"
    junk.write_text("these are not weights")
    with pytest.raises(ValueError, match=r"notes\.ckpt is not a.* torch checkpoint"):
        main(["export", str(junk), str(tmp_path / "artifact")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.ckpt"]


def test_export_of_a_missing_checkpoint_writes_nothing(tmp_path):
    out = tmp_path / "artifact"
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*does not exist"):
        main(["export", str(tmp_path / "missing.ckpt"), str(out)])
    assert not out.exists()


BENCH_CASES = [
    ("unknown-method", ["--methods=nope"], ValueError, "methods: unknown method 'nope'"),
    ("keep-ratio-out-of-range", ["--methods=l2norm", "--keep_ratios=1.5"], ValueError, "keep_ratios"),
    ("keep-ratio-not-a-number", ["--methods=l2norm", "--keep_ratios=abc"], ValueError, "keep_ratios"),
    ("missing-artifact", ["--methods=dynamicvit:/nonexistent/art"], FileNotFoundError, "methods: the artifact"),
    ("images-of-another-size", ["--methods=l2norm"], ValueError, "canvas_size"),
]


@pytest.mark.parametrize(("extra", "error", "text"), [c[1:] for c in BENCH_CASES], ids=[c[0] for c in BENCH_CASES])
def test_bench_refuses_bad_arguments_and_writes_nothing(vit_dir, tmp_path, extra, error, text):
    out = tmp_path / "bench"
    args = ["bench", f"--model={vit_dir}", "--data=tokensift.data.ClutteredDigitsDataModule", f"--out={out}", *extra]
    with pytest.raises(error) as raised:
        main(args)
    assert text in str(raised.value)
    assert not out.exists() or not any(out.iterdir())


# -- data modules ------------------------------------------------------------------------------------------------
DATA_CASES = [
    (ClutteredDigitsDataModule, {"batch_size": 2.5}, "batch_size"),
    (ClutteredDigitsDataModule, {"batch_size": "8"}, "batch_size"),
    (ClutteredDigitsDataModule, {"canvas_size": 30}, "canvas_size"),
    (ClutteredDigitsDataModule, {"num_clutter": -1}, "num_clutter"),
    (ClutteredDigitsDataModule, {"clutter_size": (3, 2)}, "clutter_size"),
    (ClutteredDigitsDataModule, {"num_channels": 0}, "num_channels"),
    (ClutteredDigitsDataModule, {"num_workers": -1}, "num_workers"),
    (ClutteredDigitsDataModule, {"val_samples": 0}, "val_samples"),
    (DigitVQADataModule, {"min_digits": 4, "max_digits": 2}, "digits"),
    (DigitVQADataModule, {"question_types": ["colour"]}, "question_types"),
    (DigitVQADataModule, {"padding_side": "middle"}, "padding_side"),
    (DigitVQADataModule, {"test_samples": 0}, "test_samples"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"), DATA_CASES, ids=[f"{c[0].__name__}-{next(iter(c[1]))}" for c in DATA_CASES]
)
def test_data_modules_refuse_bad_arguments(cls, kwargs, field):
    with pytest.raises(ValueError) as raised:
        cls(**kwargs)
    assert field in str(raised.value)
