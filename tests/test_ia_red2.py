"""IA-RED²'s interpreters and the REINFORCE trainer: hierarchy, the RL arithmetic by hand, fit → export → apply,
the head maps and their bench figure."""

from __future__ import annotations

import inspect
import itertools
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import NUM_PATCHES, build_tiny, make_pixel_values
from test_bench import save_backbone

import tokensift as ts
from tokensift.backbones import adapt, load_backbone
from tokensift.bench import run_bench
from tokensift.budget import Budget
from tokensift.cli import main
from tokensift.data import ClutteredDigitsDataModule
from tokensift.fit_cli import TokensiftCLI
from tokensift.reduce import PruningHandle
from tokensift.scorers import get_method_class
from tokensift.scorers.ia_red2 import IARed2Config, IARed2Method
from tokensift.state import TokenState
from tokensift.trainer import (
    GRPOTrainer,
    LayerSkipTrainer,
    MLLMLayerSkipTrainer,
    MLLMScorerTrainer,
    ReinforceTrainer,
    ScorerTrainer,
)
from tokensift.trainer.rl import (
    budget_deviation,
    budget_reward,
    combination_log_prob,
    leave_one_out_baseline,
    reinforce_loss,
)

ROOT = Path(__file__).resolve().parents[1]
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
    # the draw handed to the trainer is what the handle applied at its site: the patches it kept are the policy's
    for draw, policy in zip(draws, policies, strict=True):
        assert torch.equal(draw.kept[:, prefix:], policy[:, prefix:] > 0), draw.site
        assert torch.equal(draw.candidates[:, :prefix], torch.zeros_like(draw.candidates[:, :prefix]))
    # the draw is a function of (sample index, draw): the same rows in another batch order draw the same
    order = torch.tensor([3, 1, 5, 0, 2, 4])
    again = _masked_policies(method, model, x[order], index=order)
    assert torch.equal(again[-1], policies[-1][order])


def test_inference_is_hierarchical_and_keeps_the_top_probabilities():
    model = build_tiny("vit")
    torch.manual_seed(3)
    method = IARed2Method.for_backbone(adapt(model)).eval()
    x = make_pixel_values()
    with ts.apply(model, method, keep_ratio=0.25) as handle, torch.no_grad(), method.recording_head_maps():
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
    with ts.apply(model, method, keep_ratio=0.25) as handle, torch.no_grad(), method.recording_head_maps():
        logits = model(pixel_values=make_pixel_values().to(dtype)).logits
        kept = handle.kept_orig_index
    prefix = 0 if family == "siglip" else 1
    assert kept.shape == (3, prefix + math.ceil(0.25 * NUM_PATCHES)) and bool(torch.isfinite(logits).all())
    assert sorted(method.head_maps()) == method.config.sites


def test_head_maps_are_recorded_on_request_and_belong_to_that_pass():
    model = build_tiny("vit")
    torch.manual_seed(4)
    method = IARed2Method.for_backbone(adapt(model)).eval()
    first, second = make_pixel_values(batch=3, seed=1), make_pixel_values(batch=2, seed=2)
    with ts.apply(model, method, keep_ratio=0.25) as handle, torch.no_grad():
        model(pixel_values=first)
        assert method.head_maps() == {}, "nothing is recorded outside recording_head_maps()"
        with method.recording_head_maps():
            model(pixel_values=first)
        maps_first = method.head_maps()
        with method.recording_head_maps():
            model(pixel_values=second)
        maps_second = method.head_maps()
        with method.recording_head_maps():  # two passes in one recording: the maps are the last pass's
            model(pixel_values=first)
            model(pixel_values=second)
        assert all(torch.equal(maps_second[site], m) for site, m in method.head_maps().items())
        handle.set_budget(keep_ratio=1.0)
        with method.recording_head_maps():  # keep ratio 1: no site runs, so no maps (not the last pass's)
            model(pixel_values=first)
        assert method.head_maps() == {}
    assert sorted(maps_first) == sorted(maps_second) == method.config.sites
    assert maps_first["vit.0"].shape[0] == 3 and maps_second["vit.0"].shape[0] == 2
    fresh = IARed2Method.for_backbone(adapt(model)).eval()
    fresh.load_state_dict(method.state_dict())
    with ts.apply(model, fresh, keep_ratio=0.25), torch.no_grad(), fresh.recording_head_maps():
        model(pixel_values=second)
    assert all(torch.equal(fresh.head_maps()[site], m) for site, m in maps_second.items())


def test_head_maps_place_each_patch_on_its_own_cell():
    """A compacted state of [CLS] and a few patches: each patch's probability lands on its original cell, [CLS] on
    none (it used to be clamped onto patch 0's cell, and which of the two writes won was up to the scatter: the
    second row, [CLS] after patch 0, makes it lose), dropped patches read 0."""
    method = IARed2Method.for_backbone(adapt(build_tiny("vit"))).eval()
    hidden = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(0))
    orig_index = torch.tensor([[0, 1, 6, 16], [1, 3, 0, 9]])  # [CLS] = 0; patch p = p + 1
    protected = orig_index == 0
    state = TokenState(
        hidden=hidden,
        protected=protected,
        orig_index=orig_index,
        size=torch.ones(2, 4),
        grid=(4, 4),
        num_prefix=1,
        site="vit.1",
        layer=1,
        keep_target=torch.full((2,), 0.25),
    )
    with method.recording_head_maps():
        probs = method.head_probabilities(state)
    maps = method.head_maps()["vit.1"]
    expected = torch.zeros(2, method.config.num_heads, 16)
    for b, n in (~protected).nonzero().tolist():
        expected[b, :, orig_index[b, n] - 1] = probs[b, :, n]
    assert torch.equal(maps, expected)
    assert bool((maps[:, :, 0] > 0).all()), "patch 0 is live in both rows and keeps its own probability"


def test_head_probability_errors_say_the_fix():
    method = IARed2Method.for_backbone(adapt(build_tiny("vit")))
    state = TokenState(
        hidden=torch.zeros(1, 3, 32),
        protected=torch.tensor([[True, False, False]]),
        orig_index=torch.arange(3).unsqueeze(0),
        size=torch.ones(1, 3),
        grid=(4, 4),
        num_prefix=1,
        site="vit.3",
        layer=3,
    )
    with pytest.raises(ValueError, match=r"not at 'vit.3': apply it with the sites it was built for"):
        method.head_probabilities(state)
    state.site = "vit.0"
    with pytest.raises(ValueError, match=r"keep target .*: run it through a PruningHandle / ts.apply"):
        method.head_probabilities(state)


def test_combination_log_prob_is_the_bernoulli_log_prob_by_hand():
    """The one per-token Bernoulli log-probability both RL trainers use: ia_red2 sums it per row."""
    probs = torch.tensor([[0.8, 0.3, 0.5, 0.9], [0.2, 0.6, 0.1, 0.4]])
    logits = torch.logit(probs).requires_grad_()
    actions = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)
    log_prob = combination_log_prob(logits, actions, mask).sum(1)
    expected = [math.log(0.8) + math.log(0.7) + math.log(0.1), math.log(0.8) + math.log(0.6) + math.log(0.1)]
    assert log_prob.tolist() == pytest.approx(expected, abs=1e-6)
    log_prob.sum().backward()
    # d/dl log sigmoid(l) = 1 - p for a kept entry, d/dl log(1 - sigmoid(l)) = -p for a dropped one, 0 off the mask
    assert logits.grad[0].tolist() == pytest.approx([1 - 0.8, -0.3, 0.0, -0.9], abs=1e-6)
    # a saturated probability stays exact in logits (probabilities clamped at 1e-6 would read log 1e-6 = -13.8)
    saturated = combination_log_prob(torch.tensor([[40.0]]), torch.tensor([[False]]), torch.tensor([[True]]))
    assert float(saturated) == pytest.approx(-40.0, rel=1e-6)
    with pytest.raises(ValueError, match="must all be"):
        combination_log_prob(logits[:, :2], actions, mask)


def test_the_draws_logit_is_that_of_the_heads_mean_probability():
    model = build_tiny("vit")
    method = IARed2Method.for_backbone(adapt(model)).train()
    with method.recording_head_maps():
        _masked_policies(method, model, make_pixel_values())
    draw = method.take_draws()[0]
    mean_probability = method.head_maps()["vit.0"].mean(1)  # vit.0 sees every patch in place
    probability = torch.sigmoid(draw.logits[:, 1:]).detach()
    assert torch.allclose(probability, mean_probability, atol=1e-6)


def test_reward_by_hand_and_right_always_outranks_wrong():
    correct = torch.tensor([True, False, True, True])
    kept = torch.tensor([[0.5, 0.25], [0.5, 0.25], [0.75, 0.1], [1.0, 1.0]])
    targets = torch.tensor([0.5, 0.2])
    # ((0.25 - 0.2) / 0.2)^2 = 0.0625; ((0.75 - 0.5) / 0.5)^2 = 0.25, ((0.1 - 0.2) / 0.2)^2 = 0.25;
    # (1 / 0.5 - 1)^2 = 1, (1 / 0.2 - 1)^2 = 16: mean 8.5, capped at 1
    assert budget_deviation(kept, targets).tolist() == pytest.approx([0.0625 / 2, 0.0625 / 2, 0.25, 8.5])
    reward = budget_reward(correct, kept, targets, wrong_penalty=0.5)
    assert reward.tolist() == pytest.approx([1 - 0.0625 / 2, -0.5, 1 - 0.25, 0.0], abs=1e-6)
    # any kept fractions, any budget: a right answer earns [0, 1], above every wrong one
    generator = torch.Generator().manual_seed(0)
    kept = torch.rand(4096, 3, generator=generator)
    targets = torch.rand(4096, 3, generator=generator).clamp_min(1e-3)
    for penalty in (1e-3, 0.5, 5.0):
        right = budget_reward(torch.ones(4096, dtype=torch.bool), kept, targets, penalty)
        wrong = budget_reward(torch.zeros(4096, dtype=torch.bool), kept, targets, penalty)
        assert float(right.min()) >= 0.0 > float(wrong.max()) and float(right.max()) <= 1.0
    with pytest.raises(ValueError, match="targets must be > 0"):
        budget_reward(correct, kept[:4, :2], torch.tensor([0.5, 0.0]), 0.5)
    for penalty in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="wrong_penalty must be a finite number > 0"):
            budget_reward(correct, kept[:4, :2], torch.tensor([0.5, 0.2]), penalty)


def test_reinforce_loss_and_the_leave_one_out_baseline_by_hand():
    log_prob = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    reward = torch.tensor([1.0, -0.5, 0.5])
    # each sample's baseline is the mean of the other two: (0, 0.75, 0.25)
    baseline = leave_one_out_baseline(reward, reward.sum(), 3)
    assert baseline.tolist() == pytest.approx([0.0, 0.75, 0.25])
    # = count / (count - 1) times the advantage against the plain mean 1/3
    assert (reward - baseline).tolist() == pytest.approx([1.5 * (r - 1 / 3) for r in reward.tolist()])
    assert leave_one_out_baseline(reward[:1], reward[:1].sum(), 1).tolist() == [0.0]
    loss = reinforce_loss(log_prob, reward, baseline)
    advantage = [1.0, -1.25, 0.25]
    assert float(loss.detach()) == pytest.approx(-(advantage[0] * -1 + advantage[1] * -2 + advantage[2] * -0.5) / 3)
    loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([-a / 3 for a in advantage])
    # the advantage carries no gradient into the baseline
    shifted = torch.tensor(0.25, requires_grad=True)
    reinforce_loss(log_prob, reward, shifted).backward()
    assert shifted.grad is None
    # exactly, over both actions of one Bernoulli keep: any constant baseline leaves the expected gradient
    # d/dθ [p r1 + (1 - p) r0] = p (1 - p) (r1 - r0) unchanged
    theta = torch.tensor(0.3, requires_grad=True)
    rewards = torch.tensor([1.0, -0.5])  # kept, dropped
    for constant in (0.0, 0.7, -3.0):
        theta.grad = None
        log_pi = combination_log_prob(
            theta.expand(2, 1), torch.tensor([[True], [False]]), torch.ones(2, 1, dtype=torch.bool)
        )
        weight = 2 * log_pi.detach().exp()  # reinforce_loss averages the two rows; weigh each by its probability
        reinforce_loss((weight * log_pi).squeeze(1), rewards, constant).backward()
        p = torch.sigmoid(torch.tensor(0.3))
        assert float(-theta.grad) == pytest.approx(float(p * (1 - p) * 1.5), abs=1e-6)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ia_red2")
    backbone = save_backbone(root / "backbone")
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
            method = handle.method
            with method.recording_head_maps():
                model(pixel_values=x)
            probability = method.head_maps()["vit.0"].mean(1)
            count = handle.site_counts()["vit.0"]
            top = probability.topk(count, dim=1).indices.sort(1).values + 1
            assert torch.equal(handle.last_records[0].kept_orig_index[:, 1:], top)
            assert handle.kept_orig_index.shape == (4, 1 + math.ceil(0.25 * 64))


def test_the_checkpoint_loads_back(fitted, tmp_path):
    loaded = ReinforceTrainer.load_from_checkpoint(fitted["root"] / "last.ckpt")
    assert loaded.wrong_penalty == fitted["module"].wrong_penalty and loaded.hparams.keep_ratio_range == (0.25, 0.5)
    # only this trainer's own arguments (ScorerTrainer's loss / lora / ... are no arguments of it), not the seed
    assert set(loaded.hparams) <= set(inspect.signature(ReinforceTrainer.__init__).parameters) - {"seed"}
    trained = fitted["module"].method.state_dict()
    assert all(torch.equal(v, trained[k].cpu()) for k, v in loaded.method.state_dict().items())
    # the recipe through `tokensift fit` (a LightningCLI checkpoint, rebuilt by its instantiator)
    cli = TokensiftCLI(
        args=[
            "fit",
            f"--config={ROOT / 'configs' / 'ia_red2_digits.yaml'}",
            f"--model.backbone={fitted['backbone']}",
            "--model.wrong_penalty=0.25",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *(f"--data.init_args.{key}={json.dumps(value)}" for key, value in DATA.items()),
            "--data.init_args.train_samples=32",
            "--data.init_args.val_samples=16",
        ]
    )
    checkpoint = Path(cli.trainer.checkpoint_callbacks[-1].dirpath) / "last.ckpt"
    from_cli = ReinforceTrainer.load_from_checkpoint(checkpoint)
    assert from_cli.wrong_penalty == 0.25 and from_cli.method.config.width == 8


@pytest.mark.parametrize(
    ("trainer", "method", "message"),
    [
        # a training-free method first, with a learned one of the trainer's own sort
        (ReinforceTrainer, "random", r"'random' is training-free; ReinforceTrainer trains .* 'ia_red2'"),
        (GRPOTrainer, "random", r"'random' is training-free; GRPOTrainer trains .* 'cacovid'"),
        (LayerSkipTrainer, "random", r"'random' is training-free; LayerSkipTrainer trains .* 'das'"),
        (ScorerTrainer, "random", r"'random' is training-free; ScorerTrainer trains .* 'dynamicvit'"),
        # reward against gradient, each way
        (ScorerTrainer, "ia_red2", r"trained by reward .*: train it with tokensift.trainer.ReinforceTrainer"),
        (MLLMScorerTrainer, "cacovid", r"trained by reward .*: train it with tokensift.trainer.GRPOTrainer"),
        (ReinforceTrainer, "dynamicvit", r"learns from gradients: train it with tokensift.trainer.ScorerTrainer"),
        (GRPOTrainer, "question_selector", r"learns from gradients: train it with .*MLLMScorerTrainer"),
        # a reward policy on the other kind of backbone
        (ReinforceTrainer, "cacovid", r"runs inside a multimodal LLM .*: train it with tokensift.trainer.GRPOTrainer"),
        (GRPOTrainer, "ia_red2", r"vision towers only .*: train it with tokensift.trainer.ReinforceTrainer"),
        (ScorerTrainer, "question_selector", r"runs inside a multimodal LLM .*: train it with .*MLLMScorerTrainer"),
        # layer skips against tokens
        (ScorerTrainer, "das", r"skips whole layers: train it with tokensift.trainer.LayerSkipTrainer"),
        (LayerSkipTrainer, "dynamicvit", r"prunes tokens: train it with tokensift.trainer.ScorerTrainer"),
        (MLLMLayerSkipTrainer, "ia_red2", r"prunes tokens: train it with tokensift.trainer.ReinforceTrainer"),
        (MLLMLayerSkipTrainer, "cacovid", r"prunes tokens: train it with tokensift.trainer.GRPOTrainer"),
        # accepted
        (ReinforceTrainer, "ia_red2", None),
        (GRPOTrainer, "cacovid", None),
        (ScorerTrainer, "dynamicvit", None),
        (MLLMScorerTrainer, "question_selector", None),
        (LayerSkipTrainer, "das", None),
    ],
)
def test_check_method_names_the_trainer_to_use(trainer, method, message):
    # check_method reads class attributes only: an instance without a backbone is enough
    bare = trainer.__new__(trainer)
    if message is None:
        bare.check_method(get_method_class(method))
    else:
        with pytest.raises(ValueError, match=message):
            bare.check_method(get_method_class(method))


def test_reinforce_trainer_refuses_before_building(fitted):
    with pytest.raises(
        ValueError, match=r"runs inside a multimodal LLM .*: train it with tokensift.trainer.GRPOTrainer"
    ):
        ReinforceTrainer(str(fitted["backbone"]), method="cacovid")  # used to die on an AttributeError
    for penalty in (-1, 0, float("inf")):
        with pytest.raises(ValueError, match="wrong_penalty must be a finite number > 0"):
            ReinforceTrainer(str(fitted["backbone"]), wrong_penalty=penalty)


def test_bench_draws_the_head_maps_of_the_shown_images(fitted, tmp_path, monkeypatch):
    import tokensift.bench.plots as plots

    drawn = []
    draw = plots.plot_head_maps

    def recording_draw(images, labels, head_maps, *args, **kwargs):
        drawn.append((images, head_maps))
        return draw(images, labels, head_maps, *args, **kwargs)

    monkeypatch.setattr(plots, "plot_head_maps", recording_draw)
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
    # the figure shows the maps of the images it shows, at the overlay ratio, at every site
    [(images, head_maps)] = drawn
    model = load_backbone(str(fitted["backbone"]))
    with ts.apply(model, fitted["artifact"], keep_ratio=0.25) as handle, torch.no_grad():
        with handle.method.recording_head_maps():
            model(pixel_values=torch.from_numpy(images))
        expected = handle.method.head_maps()
    assert sorted(head_maps) == sorted(expected) == ["vit.0", "vit.1", "vit.2"]
    for site, maps in head_maps.items():
        assert maps.shape[0] == images.shape[0]
        assert torch.allclose(torch.from_numpy(maps), expected[site], atol=1e-6), site
