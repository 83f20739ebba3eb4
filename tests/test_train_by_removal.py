"""Training by removal: a keep decision with a key bias (STTS's deferred compaction) in gather mode, DynamicViT's
``train_by_removal`` and the trainer's teacher cache.

- the vision-tower handle adds ``KeepDecision.key_bias`` at the block after the site and removes the dropped tokens
  after that block, differentiably;
- a zero bias is a hard removal one block later; a blocking bias on the dropped tokens is a removal at the site;
- ``ScorerTrainer`` trains such a method in gather mode; the teacher's logits come from a per-sample cache (equal
  to a fresh teacher pass), or no teacher pass at all when distillation is off; changed inputs (augmentation)
  turn the cache off with a warning, or raise when it was required.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import torch
from conftest import NUM_PATCHES, build_tiny, make_pixel_values
from transformers import ViTConfig, ViTForImageClassification

import tokensift as ts
from tokensift.backbones import load_backbone
from tokensift.export.checkpoint import export
from tokensift.fit_cli import TokensiftCLI
from tokensift.scorers.base import KeepDecision, TokenMethod, top_k_mask
from tokensift.scorers.dynamicvit import DynamicViTConfig, DynamicViTMethod
from tokensift.scorers.dynamicvit.model import removal_key_bias
from tokensift.state import TokenState
from tokensift.trainer import ScorerTrainer
from tokensift.trainer.losses import LossWeights
from tokensift.trainer.module import TeacherCache

NO_TOKENS = LossWeights(tokens=0.0)
REMOVAL = {"train_by_removal": True}


class ByIndex(TokenMethod):
    """Keeps the patches with the highest ``(7 * orig_index) mod 17`` (a fixed, hidden-independent choice), with a key
    bias per ``bias`` mode: ``"none"`` (compact at the site), ``"zero"``, or ``"block"`` (-1e4 on dropped tokens)."""

    name = "by_index_test"

    def __init__(self, bias: str):
        super().__init__()
        self.bias = bias

    def score(self, state):
        return ((state.orig_index * 7) % 17).float()

    def reduce(self, state, num_keep):
        keep = top_k_mask(self.score(state), state, num_keep)
        if self.bias == "none":
            return KeepDecision(keep)
        zeros = torch.zeros(keep.shape, device=keep.device)
        return KeepDecision(keep, key_bias=zeros if self.bias == "zero" else zeros.masked_fill(~keep, -1e4))


def logits_with(model, method, site: str, pixel_values, keep_count: int = 6):
    with ts.apply(model, method, keep_count=keep_count, sites=[site]) as handle, torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
        kept = handle.kept_orig_index
    return logits, kept


@pytest.mark.parametrize("family", ["vit", "siglip"])
def test_zero_key_bias_is_a_hard_removal_after_the_next_block(family):
    model, x = build_tiny(family), make_pixel_values()
    deferred, kept = logits_with(model, ByIndex("zero"), "vit.0", x)
    later, kept_later = logits_with(model, ByIndex("none"), "vit.1", x)
    assert torch.equal(kept, kept_later)
    torch.testing.assert_close(deferred, later, rtol=1e-5, atol=1e-6)
    at_site, _ = logits_with(model, ByIndex("none"), "vit.0", x)
    assert not torch.allclose(deferred, at_site, atol=1e-4), "the next block must see the dropped tokens"


@pytest.mark.parametrize("family", ["vit", "clip"])
def test_blocking_key_bias_is_a_removal_at_the_site(family):
    model, x = build_tiny(family), make_pixel_values()
    blocked, kept = logits_with(model, ByIndex("block"), "vit.1", x)
    at_site, kept_at_site = logits_with(model, ByIndex("none"), "vit.1", x)
    assert torch.equal(kept, kept_at_site)
    torch.testing.assert_close(blocked, at_site, rtol=1e-5, atol=1e-6)


def test_a_bad_key_bias_is_refused():
    class Bad(ByIndex):
        def reduce(self, state, num_keep):
            decision = super().reduce(state, num_keep)
            return KeepDecision(decision.keep, key_bias=decision.key_bias[:, :-1])

    model = build_tiny("vit")
    with ts.apply(model, Bad("zero"), keep_count=6, sites=["vit.0"]), pytest.raises(ValueError, match="key_bias"):
        model(pixel_values=make_pixel_values())


def removal_method(model, **options) -> DynamicViTMethod:
    torch.manual_seed(0)
    config = DynamicViTConfig(train_by_removal=True, **options)
    return DynamicViTMethod.for_backbone(ts.backbones.adapt(model), config)


@pytest.mark.parametrize("gradient", ["kept_tokens", "next_block_bias"])
def test_gradients_reach_every_predictor_in_gather_mode(gradient):
    model, x = build_tiny("vit").requires_grad_(False), make_pixel_values()
    method = removal_method(model, removal_gradient=gradient)
    labels = torch.tensor([0, 1, 2])
    with ts.apply(model, method, keep_ratio=0.25) as handle:
        method.train()  # ts.apply puts a method in eval mode (inference)
        logits = model(pixel_values=x).logits
        records = handle.last_records
    # three sites (vit.0 .. vit.2), each compacted (next_block_bias: after its next block): fewer tokens each time
    assert [r.site for r in records] == ["vit.0", "vit.1", "vit.2"]
    counts = [r.kept_orig_index.shape[1] for r in records]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 1 + 4  # [CLS] + 0.25 of 16 patches
    torch.nn.functional.cross_entropy(logits, labels).backward()
    for stage, predictor in enumerate(method.predictors):
        grads = [p.grad for p in predictor.parameters()]
        assert all(g is not None for g in grads), f"stage {stage} got no gradient"
        assert sum(float(g.abs().sum()) for g in grads) > 0, f"stage {stage}'s gradient is zero"


class Replay(TokenMethod):
    """Keeps, at each site, the original tokens a recorded forward pass kept there (no bias)."""

    name = "replay_test"

    def __init__(self, kept: dict[str, torch.Tensor]):
        super().__init__()
        self.kept = kept

    def reduce(self, state, num_keep):
        kept = self.kept[state.site]
        return KeepDecision((state.orig_index.unsqueeze(-1) == kept.unsqueeze(1)).any(-1))


@pytest.mark.parametrize("family", ["vit", "clip"])
def test_kept_tokens_training_computes_the_pruned_inference_forward(family):
    model, x = build_tiny(family).requires_grad_(False), make_pixel_values()
    method = removal_method(model)
    with ts.apply(model, method, keep_ratio=0.25) as handle:
        method.train()
        handle.set_samples(torch.arange(3), draw=(0, 1))
        trained = model(pixel_values=x).logits
        kept = {r.site: r.kept_orig_index for r in handle.last_records}
    assert trained.requires_grad
    with ts.apply(model, Replay(kept), keep_ratio=0.25, sites=list(kept)), torch.no_grad():
        replayed = model(pixel_values=x).logits
    torch.testing.assert_close(trained.detach(), replayed, rtol=1e-5, atol=1e-5)


def test_removal_keeps_what_the_gumbel_top_k_keeps_and_evaluates_deterministically():
    model, x = build_tiny("vit"), make_pixel_values()
    method = removal_method(model)
    with ts.apply(model, method, keep_ratio=0.5) as handle:
        method.train()
        handle.set_samples(torch.arange(3), draw=(0, 5))
        model(pixel_values=x)
        kept = handle.kept_orig_index
        method.eval()  # inference: the plain top-k of the same logits, no bias, no noise
        with torch.no_grad():
            evaluated = model(pixel_values=x).logits
    assert kept.shape == (3, 1 + NUM_PATCHES // 2)
    with ts.apply(model, DynamicViTMethod(method.config), keep_ratio=0.5) as handle:
        handle.method.load_state_dict(method.state_dict())
        handle.method.eval()
        with torch.no_grad():
            assert torch.equal(model(pixel_values=x).logits, evaluated)


def test_tied_perturbed_logits_still_keep_the_budget_count(monkeypatch):
    model, x = build_tiny("vit").requires_grad_(False), make_pixel_values()
    method = removal_method(model)
    for predictor in method.predictors:  # every logit 0, every noise draw the same: all candidates tie
        torch.nn.init.zeros_(predictor.head[-1].weight)
        torch.nn.init.zeros_(predictor.head[-1].bias)
    monkeypatch.setattr(TokenState, "uniform", lambda self, seed, stream="": torch.full(self.protected.shape, 0.5))
    with ts.apply(model, method, keep_count=5) as handle:
        method.train()
        model(pixel_values=x)
        assert [r.kept_orig_index.shape[1] for r in handle.last_records][-1] == 1 + 5


def test_removal_key_bias_is_rescaled_to_e_minus_2_and_never_blocks():
    logits = torch.tensor([[5.0, -3.0, 0.5, 9.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    candidates = torch.tensor([[True, True, True, True, False], [True, True, True, True, False]])
    bias = removal_key_bias(logits, candidates)
    assert torch.allclose(bias[0, [3, 1]], torch.tensor([0.0, -2.0]), atol=1e-6)
    assert bias[0, 4] == 0 and bool((bias[0, :4] >= -2.0 - 1e-6).all())
    assert torch.equal(bias[0, :4].argsort(), logits[0, :4].argsort()), "a monotone function of the logits"
    assert torch.equal(bias[1], torch.zeros(5)), "equal scores: no bias"


def test_config_refuses_removal_with_threshold_selection():
    with pytest.raises(ValueError, match=r"train_by_removal.*selection: topk"):
        DynamicViTConfig(train_by_removal=True, selection="threshold")
    with pytest.raises(ValueError, match="train_by_removal must be true or false"):
        DynamicViTConfig(train_by_removal="yes")
    with pytest.raises(ValueError, match="removal_gradient must be 'kept_tokens' or 'next_block_bias'"):
        DynamicViTConfig(train_by_removal=True, removal_gradient="bias")


# -- the trainer and its teacher cache ----------------------------------------------------------------------------


def make_batch(index, seed: int = 0, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(batch, 3, 16, 16, generator=g),
        "labels": torch.randint(0, 3, (batch,), generator=g),
        "index": torch.as_tensor(index),
    }


def trainer(saved_tiny_vit, **kwargs) -> ScorerTrainer:
    kwargs.setdefault("method_options", REMOVAL)
    kwargs.setdefault("loss", NO_TOKENS)
    module = ScorerTrainer(saved_tiny_vit, **kwargs)
    module.log = lambda *a, **k: None  # no Lightning trainer attached
    return module.train()


def count_backbone_forwards(module: ScorerTrainer) -> list[int]:
    calls = [0]
    module.backbone.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_teacher_cache_returns_what_a_fresh_teacher_pass_computes(saved_tiny_vit):
    module = trainer(saved_tiny_vit)
    calls = count_backbone_forwards(module)
    first, second = make_batch([0, 1, 2, 3]), make_batch([2, 3, 4, 5], seed=1)
    second["pixel_values"][:2] = first["pixel_values"][2:]  # samples 2 and 3 again, with 4 and 5 new
    with module.teacher():
        fresh = module.logits({"pixel_values": second["pixel_values"]})
    module.teacher_logits(first, module.model_inputs(first))
    calls[0] = 0
    mixed = module.teacher_logits(second, module.model_inputs(second))
    assert calls[0] == 1, "one teacher pass, for the two samples not cached"
    torch.testing.assert_close(mixed, fresh, rtol=1e-5, atol=1e-6)
    calls[0] = 0
    again = module.teacher_logits(second, module.model_inputs(second))
    assert calls[0] == 0 and torch.equal(again, mixed), "every sample cached: no teacher pass"
    assert (module.teacher_cache.hits, module.teacher_cache.misses, len(module.teacher_cache)) == (6, 6, 6)


def test_a_step_skips_the_teacher_when_distillation_is_off(saved_tiny_vit):
    module = trainer(saved_tiny_vit, loss=LossWeights(distill=0.0, tokens=0.0))
    calls = count_backbone_forwards(module)
    terms = module.training_loss(make_batch([0, 1, 2, 3]))
    assert calls[0] == 1, "the student pass only"
    assert set(terms) == {"loss", "task"} and len(module.teacher_cache) == 0
    mask_path = trainer(saved_tiny_vit, method_options={}, loss=LossWeights(distill=0.0, tokens=0.0))
    calls = count_backbone_forwards(mask_path)
    mask_path.training_loss(make_batch([0, 1, 2, 3]))
    assert calls[0] == 1, "the mask path without teacher terms runs no teacher either"


def test_removal_step_runs_in_gather_mode_and_uses_the_cache(saved_tiny_vit):
    module = trainer(saved_tiny_vit)
    calls = count_backbone_forwards(module)
    batch = make_batch([0, 1, 2, 3])
    terms = module.training_loss(batch)
    assert set(terms) == {"loss", "task", "distill"} and calls[0] == 2
    assert all(r.kept_orig_index is not None and r.policy is None for r in module.handle.last_records)
    terms["loss"].backward()
    assert all(p.grad is not None for p in module.method.parameters())
    calls[0] = 0
    module.training_loss(batch)
    assert calls[0] == 1, "the second epoch's step: the student pass only"


def test_changed_inputs_turn_the_cache_off_or_raise(saved_tiny_vit):
    batch = make_batch([0, 1, 2, 3])
    flipped = dict(batch, pixel_values=batch["pixel_values"].flip(-1))  # an augmentation of the same samples
    module = trainer(saved_tiny_vit)
    module.teacher_logits(batch, module.model_inputs(batch))
    with pytest.warns(UserWarning, match=r"inputs of training sample\(s\) \[0, 1, 2, 3\] differ.*cache is off"):
        logits = module.teacher_logits(flipped, module.model_inputs(flipped))
    with module.teacher():
        fresh = module.logits({"pixel_values": flipped["pixel_values"]})
    assert torch.equal(logits, fresh) and len(module.teacher_cache) == 0
    calls = count_backbone_forwards(module)
    module.teacher_logits(batch, module.model_inputs(batch))
    assert calls[0] == 1 and len(module.teacher_cache) == 0, "off for the rest of the fit"

    required = trainer(saved_tiny_vit, teacher_cache=True)
    required.teacher_logits(batch, required.model_inputs(batch))
    with pytest.raises(ValueError, match=r"teacher_cache: true.*differ.*teacher_cache: false"):
        required.teacher_logits(flipped, required.model_inputs(flipped))
    same = make_batch([0, 1, 2, 3])  # the same samples rendered again: bit-identical, cached
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        required.teacher_logits(same, required.model_inputs(same))


def test_cache_signature_tolerates_rounding_only():
    cache = TeacherCache()
    x = torch.rand(2, 3, 32, 32)
    index = torch.tensor([7, 9])
    cache.store(index, cache.signatures(x), torch.randn(2, 5))
    hit, _ = cache.lookup(index, cache.signatures(x[[0, 1]].clone() * (1 + 1e-7)))
    assert bool(hit.all())
    noisy = x + 0.01 * torch.randn_like(x)
    with pytest.raises(ValueError, match=r"\[7, 9\]"):
        cache.lookup(index, cache.signatures(noisy))


def test_trainer_settings_that_cannot_work_are_refused(saved_tiny_vit):
    with pytest.raises(ValueError, match=r"loss.tokens is 0.5.*--model.loss.tokens 0"):
        ScorerTrainer(saved_tiny_vit, method_options=REMOVAL)
    with pytest.raises(ValueError, match=r"teacher_cache: true.*LoRA"):
        ScorerTrainer(
            saved_tiny_vit, method_options=REMOVAL, loss=NO_TOKENS, teacher_cache=True, backbone_lr_factor=0.01
        )
    with pytest.raises(ValueError, match=r"teacher_cache: true.*token-distillation"):
        ScorerTrainer(saved_tiny_vit, teacher_cache=True)
    with pytest.raises(ValueError, match="teacher_cache must be"):
        ScorerTrainer(saved_tiny_vit, teacher_cache="yes")
    module = trainer(saved_tiny_vit, teacher_cache=True)
    batch = make_batch([0, 1, 2, 3])
    del batch["index"]
    with pytest.raises(ValueError, match="no 'index'"):
        module.training_loss(batch)


def test_a_short_fit_lowers_the_loss_and_its_export_applies(tmp_path):
    torch.manual_seed(0)
    backbone = tmp_path / "backbone"
    vit = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=4)
    # wide initial weights: which tokens survive moves the logits enough for a few steps to show
    config = ViTConfig(**vit, image_size=32, num_labels=10, initializer_range=0.2)
    ViTForImageClassification(config).save_pretrained(backbone)
    cli = TokensiftCLI(
        args=[
            "fit",
            f"--model.backbone={backbone}",
            "--model.lr=1e-2",
            "--model.keep_ratio_range=[0.25,0.25]",
            '--model.method_options={"train_by_removal": true}',
            "--model.loss.tokens=0",
            "--trainer.max_epochs=8",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--seed_everything=0",
            "--data.class_path=tokensift.data.ClutteredDigitsDataModule",
            "--data.init_args.canvas_size=32",
            "--data.init_args.num_clutter=3",
            "--data.init_args.train_samples=32",
            "--data.init_args.val_samples=16",
            "--data.init_args.test_samples=16",
            "--data.init_args.batch_size=16",
        ]
    )
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
    module: ScorerTrainer = cli.model
    cache = module.teacher_cache
    assert (cache.misses, cache.hits, len(cache)) == (32, 7 * 32, 32), "each sample's teacher pass once"
    checkpoint = Path(cli.trainer.checkpoint_callbacks[-1].dirpath) / "last.ckpt"
    assert not any("teacher" in key for key in torch.load(checkpoint, weights_only=True)["state_dict"])

    artifact = export(checkpoint, tmp_path / "artifact")
    assert ts.load(artifact).method.config.train_by_removal
    model = load_backbone(str(backbone))
    x = torch.randn(4, 3, 32, 32)
    module.eval()
    module.handle.enabled, module.handle.mode = True, "gather"
    module.handle.set_budget(keep_ratio=0.5)
    with torch.no_grad():
        expected = module.logits({"pixel_values": x})
        with ts.apply(model, artifact, keep_ratio=0.5):
            applied = model(pixel_values=x).logits
    assert torch.equal(applied, expected)
