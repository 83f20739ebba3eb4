"""IA-RED²'s interpreters and the REINFORCE trainer: hierarchy, the RL arithmetic by hand, fit → export → apply,
the head maps and their bench figure."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import NUM_PATCHES, build_tiny, make_pixel_values
from transformers import ViTConfig, ViTForImageClassification

import tokensift as ts
from tokensift.backbones import adapt, load_backbone
from tokensift.bench import run_bench
from tokensift.budget import Budget
from tokensift.cli import main
from tokensift.data import ClutteredDigitsDataModule
from tokensift.reduce import PruningHandle
from tokensift.scorers.ia_red2 import IARed2Config, IARed2Method
from tokensift.trainer import ReinforceTrainer, ScorerTrainer
from tokensift.trainer.rl import bernoulli_log_prob, budget_reward, reinforce_loss

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA = dict(canvas_size=32, patch_size=4, clutter_size=(2, 3), num_clutter=2, batch_size=16)


def _masked_policies(method, model, pixel_values, keep_ratio=0.5, index=None):
    with PruningHandle(adapt(model), method, Budget(keep_ratio=keep_ratio), mode="mask") as handle:
        handle.set_samples(torch.arange(pixel_values.shape[0]) if index is None else index, draw=(0, 7))
        with torch.no_grad():
            model(pixel_values=pixel_values)
        return [record.policy for record in handle.last_records]


def test_default_sites_and_config_errors():
    method = IARed2Method.for_backbone(adapt(build_tiny("vit")))
    assert method.config.sites == ["vit.0", "vit.1", "vit.2"] and len(method.interpreters) == 3
    assert not method.keeps_budget_count  # the training draws keep a variable count
    with pytest.raises(ValueError, match=r"IARed2Config.num_heads must be an integer >= 1"):
        IARed2Config(num_heads=0)
    with pytest.raises(ValueError, match=r"IARed2Config.budget_conditioned must be true or false"):
        IARed2Config(budget_conditioned="yes")
    with pytest.raises(ValueError, match=r"for_backbone"):
        IARed2Method(IARed2Config())


@pytest.mark.parametrize("family", ["vit", "siglip"])
def test_training_draws_are_hierarchical_and_reproducible(family):
    model = build_tiny(family)
    method = IARed2Method.for_backbone(adapt(model)).train()
    x = make_pixel_values(batch=6)
    policies = _masked_policies(method, model, x)
    draws = method.take_draws()
    assert [d.site for d in draws] == method.config.sites
    prefix = 1 if family == "vit" else 0
    for earlier, later in itertools.pairwise(policies):
        assert bool(((later > 0) <= (earlier > 0)).all()), "a patch dropped at one site is dropped at every later one"
        assert set(torch.unique(later).tolist()) <= {0.0, 1.0}
    assert bool((policies[-1][:, prefix:] == 0).any()) and bool((policies[0][:, prefix:] == 1).any())
    if prefix:
        assert bool((policies[-1][:, 0] == 1).all()), "[CLS] always kept"
    # each site draws only over the patches still alive: those dropped earlier are no candidates
    for draw, previous in zip(draws[1:], policies, strict=False):
        assert bool((draw.candidates <= (previous > 0)).all())
        assert bool((draw.kept <= draw.candidates).all())
    # the draw is a function of (sample index, draw): the same rows in another batch order draw the same
    order = torch.tensor([3, 1, 5, 0, 2, 4])
    again = _masked_policies(method, model, x[order], index=order)
    assert torch.equal(again[-1], policies[-1][order])


def test_inference_is_hierarchical_and_keeps_the_top_probabilities():
    model = build_tiny("vit")
    torch.manual_seed(3)
    method = IARed2Method.for_backbone(adapt(model)).eval()
    x = make_pixel_values()
    with ts.apply(model, method, keep_ratio=0.25) as handle, torch.no_grad():
        model(pixel_values=x)
        kept = [set(r.kept_orig_index[b].tolist()) for r in handle.last_records for b in range(x.shape[0])]
        counts = handle.site_counts()
        first = handle.last_records[0]
        maps = method.head_maps()
    rows = x.shape[0]
    for b in range(rows):
        chain = kept[b::rows]
        assert all(later <= earlier for earlier, later in itertools.pairwise(chain))
    # the first site sees every patch: it keeps the top count by keep probability (the mean of the heads' maps)
    probability = maps["vit.0"].mean(1)
    top = probability.topk(counts["vit.0"], dim=1).indices + 1  # + [CLS]
    assert torch.equal(first.kept_orig_index[:, 1:], top.sort(1).values)
    assert math.ceil(0.25 * NUM_PATCHES) == counts[handle.sites[-1]]
    # head maps: [B, H, P] in [0, 1]; a patch dropped at vit.0 reads 0 at vit.1
    for site, heads in maps.items():
        assert heads.shape == (rows, method.config.num_heads, NUM_PATCHES), site
        assert bool((heads >= 0).all() and (heads <= 1).all())
    dropped = torch.ones(rows, NUM_PATCHES, dtype=torch.bool)
    dropped.scatter_(1, first.kept_orig_index[:, 1:] - 1, False)
    assert bool((maps["vit.1"].amax(1)[dropped] == 0).all()) and bool((maps["vit.1"].amax(1)[~dropped] > 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["vit", "clip", "siglip"])
def test_every_family_and_a_half_precision_tower(family, dtype):
    model = build_tiny(family).to(dtype)
    method = IARed2Method.for_backbone(adapt(model)).eval()  # float32 interpreters on the tower's states
    with ts.apply(model, method, keep_ratio=0.25) as handle, torch.no_grad():
        logits = model(pixel_values=make_pixel_values().to(dtype)).logits
        kept = handle.kept_orig_index
    prefix = 0 if family == "siglip" else 1
    assert kept.shape == (3, prefix + math.ceil(0.25 * NUM_PATCHES)) and bool(torch.isfinite(logits).all())
    assert sorted(method.head_maps()) == method.config.sites


def test_bernoulli_log_prob_by_hand():
    probs = torch.tensor([[0.8, 0.3, 0.5, 0.9], [0.2, 0.6, 0.1, 0.4]], requires_grad=True)
    actions = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)
    log_prob = bernoulli_log_prob(probs, actions, mask)
    expected = [math.log(0.8) + math.log(0.7) + math.log(0.1), math.log(0.8) + math.log(0.6) + math.log(0.1)]
    assert log_prob.tolist() == pytest.approx(expected, abs=1e-6)
    log_prob.sum().backward()
    # d/dp log p = 1/p for a kept entry, -1/(1-p) for a dropped one, 0 outside the mask
    assert probs.grad[0].tolist() == pytest.approx([1 / 0.8, -1 / 0.7, 0.0, -1 / 0.1], rel=1e-5)
    with pytest.raises(ValueError, match="must all be"):
        bernoulli_log_prob(probs[:, :2], actions, mask)


def test_reward_by_hand():
    correct = torch.tensor([True, False, True])
    kept = torch.tensor([[0.5, 0.25], [0.5, 0.25], [0.75, 0.1]])
    targets = torch.tensor([0.5, 0.2])
    reward = budget_reward(correct, kept, targets, wrong_penalty=0.5)
    # ((0.25 - 0.2) / 0.2)^2 = 0.0625; ((0.75 - 0.5) / 0.5)^2 = 0.25, ((0.1 - 0.2) / 0.2)^2 = 0.25
    assert reward.tolist() == pytest.approx([1 - 0.0625 / 2, -0.5, 1 - 0.25], abs=1e-6)
    with pytest.raises(ValueError, match="targets must be > 0"):
        budget_reward(correct, kept, torch.tensor([0.5, 0.0]), 0.5)


def test_reinforce_loss_and_baseline_by_hand():
    log_prob = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    reward = torch.tensor([1.0, -0.5, 0.5])
    baseline = reward.mean()  # 1/3
    loss = reinforce_loss(log_prob, reward, baseline)
    advantage = [2 / 3, -5 / 6, 1 / 6]
    assert float(loss.detach()) == pytest.approx(-(advantage[0] * -1 + advantage[1] * -2 + advantage[2] * -0.5) / 3)
    loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([-a / 3 for a in advantage])
    # a constant baseline moves the loss but not the expected gradient; the advantage carries no gradient
    shifted = torch.tensor(0.25, requires_grad=True)
    reinforce_loss(log_prob, reward, shifted).backward()
    assert shifted.grad is None


def _save_vit(path: Path) -> Path:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=4,
        num_labels=10,
        initializer_range=0.2,
    )
    ViTForImageClassification(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ia_red2")
    backbone = _save_vit(root / "backbone")
    module = ReinforceTrainer(str(backbone), keep_ratio_range=(0.25, 0.5), lr=0.01)
    initial = {k: v.clone() for k, v in module.method.state_dict().items()}
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    data = ClutteredDigitsDataModule(**DATA, train_samples=64, val_samples=16, test_samples=32)
    trainer = L.Trainer(
        max_epochs=2,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=data)
    ckpt = root / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    artifact = root / "artifact"
    main(["export", str(ckpt), str(artifact), "--keep_ratio=0.25"])
    return dict(root=root, backbone=backbone, module=module, initial=initial, frozen=frozen, artifact=artifact)


def test_fit_changes_the_interpreters_only(fitted):
    module = fitted["module"]
    after = module.method.state_dict()
    assert any(not torch.equal(fitted["initial"][k], after[k]) for k in after)
    assert all(torch.equal(fitted["frozen"][k], v) for k, v in module.backbone.state_dict().items())
    optimized = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.method.parameters()}
    logged = module.trainer.callback_metrics
    assert {"train/reward", "train/accuracy", "train/keep_fraction", "val/acc_keep0_25"} <= set(logged)


def test_a_step_trains_only_the_interpreters(fitted):
    module = fitted["module"]
    data = ClutteredDigitsDataModule(**DATA, train_samples=16, val_samples=16)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    terms = module.training_loss(batch)
    assert set(terms) == {"loss", "reward", "accuracy", "budget_deviation"}
    # the loss differentiates to the interpreters only, through the draws' log-probability
    module.method.zero_grad()
    terms["loss"].backward()
    assert all(p.grad is not None for p in module.method.parameters())
    assert not any(p.requires_grad for p in module.backbone.parameters())
    records = module.handle.last_records
    assert len(records) == 3 and all(r.policy.grad_fn is None for r in records)


def test_exported_artifact_applies_exactly_and_by_probability(fitted):
    artifact = ts.load(fitted["artifact"])
    assert artifact.manifest["method"] == "ia_red2"
    assert artifact.manifest["default_budget"] == {"keep_ratio": 0.25}
    model = load_backbone(str(fitted["backbone"]))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        unpruned = model(pixel_values=x).logits
        with ts.apply(model, fitted["artifact"], keep_ratio=1.0):
            assert torch.equal(model(pixel_values=x).logits, unpruned)
        with ts.apply(model, fitted["artifact"], keep_ratio=0.25) as handle:
            model(pixel_values=x)
            method = handle.method
            probability = method.head_maps()["vit.0"].mean(1)
            count = handle.site_counts()["vit.0"]
            top = probability.topk(count, dim=1).indices.sort(1).values + 1
            assert torch.equal(handle.last_records[0].kept_orig_index[:, 1:], top)
            assert handle.kept_orig_index.shape == (4, 1 + math.ceil(0.25 * 64))


def test_check_method_keeps_reward_and_gradient_training_apart(fitted):
    with pytest.raises(ValueError, match="dynamicvit' learns from gradients: train it with ScorerTrainer"):
        ReinforceTrainer(str(fitted["backbone"]), method="dynamicvit")
    with pytest.raises(ValueError, match=r"trained by reward .* ReinforceTrainer"):
        ScorerTrainer(str(fitted["backbone"]), method="ia_red2")
    with pytest.raises(ValueError, match="wrong_penalty must be a number >= 0"):
        ReinforceTrainer(str(fitted["backbone"]), wrong_penalty=-1)


def test_bench_draws_the_head_maps(fitted, tmp_path):
    out = tmp_path / "bench"
    result = run_bench(
        str(fitted["backbone"]),
        ClutteredDigitsDataModule(**DATA, test_samples=32),
        ["random", f"ia_red2:{fitted['artifact']}"],
        [1.0, 0.25],
        out=out,
        batch_size=None,
        timing_batches=1,
        repeats=1,
        warmup=0,
        overlay_ratio=0.25,
    )
    figure = out / "head_maps.png"
    assert figure.is_file() and figure.read_bytes()[:8] == PNG_MAGIC
    assert result["files"]["head_maps"] == str(figure)
    rows = [r for r in result["rows"] if r["method"] == "ia_red2"]
    assert [r["keep_ratio"] for r in rows] == [1.0, 0.25] and rows[0]["flops_scorer"] == 0 < rows[1]["flops_scorer"]
