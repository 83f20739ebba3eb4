"""``cacovid``: CaCoVID's token-combination policy and ``GRPOTrainer``, on tiny LLaVA / Qwen2-VL models.

The RL arithmetic (``tokensift.trainer.rl``) against hand-computed cases; ``repeat_samples`` against batches built
sample by sample; the policy layer against the LLM's first decoder layer it is copied from; the sampling mode;
a short GRPO fit that trains the policy, exports it and applies it (``keep_ratio=1`` exact, 0.25 the top tokens).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from test_mllm_video import make_qwen_video_batch
from tiny_mllm import MLLM_FAMILIES, build_tiny_mllm, image_token_id, make_batch, make_molmo2_batch

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.cli import main
from tokensift.data.contract import repeat_samples
from tokensift.scorers.base import top_k_mask
from tokensift.scorers.cacovid import CaCoVIDConfig, CaCoVIDMethod
from tokensift.scorers.learned import sample_without_replacement
from tokensift.trainer import GRPOTrainer
from tokensift.trainer.rl import (
    balance_weights,
    clipped_policy_loss,
    combination_log_prob,
    group_advantages,
)

ROOT = Path(__file__).resolve().parents[1]


# -- sampling without replacement --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probs", "counts", "candidates"),
    [
        ([[0.4, 0.3, 0.2, 0.1, 0.0, 0.0]], [3], None),
        ([[0.4, 0.3, 0.2, 0.1, 0.0, 0.0]], [5], None),  # more than the positive ones: a zero-probability one too
        ([[0.4, 0.3, 0.2, 0.1, 0.5, 0.5]], [6], [[1, 1, 1, 1, 0, 0]]),  # capped at the candidates
        ([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [0.9, 0.05, 0.05, 0.0, 0.0, 0.0]], [0, 2], None),
    ],
)
def test_sampling_without_replacement_draws_exact_counts_among_candidates(probs, counts, candidates):
    probs = torch.tensor(probs).repeat(50, 1)
    counts = torch.tensor(counts).repeat(50)
    candidates = None if candidates is None else torch.tensor(candidates).bool().repeat(50, 1)
    mask = sample_without_replacement(
        probs, counts, torch.rand(probs.shape, generator=torch.Generator().manual_seed(0)), candidates
    )
    allowed = torch.ones_like(mask) if candidates is None else candidates
    assert mask.dtype == torch.bool and not bool((mask & ~allowed).any())
    assert torch.equal(mask.sum(1), torch.minimum(counts, allowed.sum(1)))  # a mask holds no duplicates by form
    positive = (probs > 0) & allowed
    # zero-probability candidates only once every positive one is in
    short = mask.sum(1) < positive.sum(1)
    assert not bool((mask & ~positive)[short].any())


def successive_inclusion(probs: list[float], k: int) -> list[float]:
    """Exact inclusion probability of each item under torch.multinomial(probs, k, replacement=False)."""
    inclusion = [0.0] * len(probs)
    for order in itertools.permutations(range(len(probs)), k):
        p, left = 1.0, 1.0
        for item in order:
            p *= probs[item] / left
            left -= probs[item]
        for item in order:
            inclusion[item] += p
    return inclusion


def test_sampling_inclusion_frequencies_follow_successive_draws_as_multinomial():
    probs = [0.5, 0.25, 0.15, 0.07, 0.03]
    rows = 40000
    weights = torch.tensor(probs).repeat(rows, 1)
    uniform = torch.rand(weights.shape, generator=torch.Generator().manual_seed(1))
    mask = sample_without_replacement(weights, torch.full((rows,), 2), uniform)
    ours = mask.float().mean(0)
    exact = torch.tensor(successive_inclusion(probs, 2))
    generator = torch.Generator().manual_seed(2)
    theirs = torch.zeros(len(probs))  # CaCoVID's own draw
    for row in torch.multinomial(weights[:8000], 2, replacement=False, generator=generator):
        theirs[row] += 1
    theirs /= 8000
    torch.testing.assert_close(ours, exact, atol=0.01, rtol=0)
    torch.testing.assert_close(theirs, exact, atol=0.02, rtol=0)
    assert not torch.allclose(exact, torch.tensor(probs) * 2, atol=0.05)  # not the naive k·p


# -- log-probabilities, weights, advantages, the clipped objective ------------------------------------------------


def test_combination_log_prob_and_balance_weights_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0), -math.log(3.0), 5.0]])
    mask = torch.tensor([[True, False, True, False]])
    candidates = torch.tensor([[True, True, True, False]])
    # kept: log p; dropped: log(1 - p); p = 0.5, 0.75, 0.25; the non-candidate counts 0
    expected = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25), 0.0]])
    torch.testing.assert_close(combination_log_prob(logits, mask, candidates), expected)
    # kept fraction 2/3: kept tokens weigh 1/3, dropped 2/3
    torch.testing.assert_close(balance_weights(mask, candidates), torch.tensor([[1 / 3, 2 / 3, 1 / 3, 0.0]]))


@pytest.mark.parametrize(
    ("ratio", "advantage", "loss", "gradient"),
    [
        (1.5, 1.0, -1.28, 0.0),  # above 1 + eps_high with A > 0: clipped, no gradient
        (0.5, 1.0, -0.5, -0.5),  # below 1 - eps_low with A > 0: the unclipped term is the min
        (1.5, -1.0, 1.5, 1.5),  # above with A < 0: unclipped
        (0.5, -1.0, 0.8, 0.0),  # below with A < 0: clipped at 0.8
        (1.1, 2.0, -2.2, -2.2),  # inside the range
    ],
)
def test_clipped_policy_loss_by_hand(ratio, advantage, loss, gradient):
    old = torch.tensor([[-1.0, -2.0]])
    log_probs = (old + torch.tensor([[math.log(ratio), 0.0]])).requires_grad_(True)
    weights = torch.tensor([[1.0, 0.0]])  # only the first token counts
    value = clipped_policy_loss(log_probs, old, torch.tensor([advantage]), weights, 0.2, 0.28)
    value.backward()
    torch.testing.assert_close(value, torch.tensor(loss), atol=1e-5, rtol=0)
    # d(-ratio·A)/d log_prob = -ratio·A where unclipped
    torch.testing.assert_close(log_probs.grad, torch.tensor([[gradient, 0.0]]), atol=1e-5, rtol=0)


def test_clipped_policy_loss_weights_rows_then_averages_them():
    old = torch.zeros(2, 3)
    log_probs = torch.tensor([[0.0, math.log(1.1), 0.0], [0.0, 0.0, 0.0]])
    weights = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 2.0]])
    value = clipped_policy_loss(log_probs, old, torch.tensor([1.0, -0.5]), weights)
    row0 = -(1.0 * 1.0 + 3.0 * 1.1) / (4.0 + 1e-7)
    row1 = 0.5
    torch.testing.assert_close(value, torch.tensor((row0 + row1) / 2))


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    means = torch.tensor([0.25] * 4 + [0.5] * 4)
    group_std = torch.tensor([0.5] * 4 + [math.sqrt(1 / 3)] * 4)  # unbiased, per group
    advantages, std = group_advantages(rewards, 4, "group")
    torch.testing.assert_close(advantages, (rewards - means) / (group_std + 1e-4))
    torch.testing.assert_close(std, group_std)
    batch_std = math.sqrt((3 * 0.625**2 + 5 * 0.375**2) / 7)
    advantages, std = group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(advantages, (rewards - means) / (batch_std + 1e-4))
    wider = torch.tensor([0.0, 2.0, 0.0, 2.0])  # another rank's rewards join the batch std
    advantages, std = group_advantages(rewards, 4, "batch", batch_rewards=torch.cat([rewards, wider]))
    torch.testing.assert_close(std, torch.cat([rewards, wider]).std().expand(8))
    advantages, _ = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(advantages, rewards - means)
    same = group_advantages(torch.ones(4), 4, "group")[0]
    assert torch.equal(same, torch.zeros(4))  # an all-right group teaches nothing
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, 4, "global")


# -- repeat_samples ----------------------------------------------------------------------------------------------


def qwen_ids() -> dict:
    return dict(image_token_id=image_token_id("qwen2_vl"), video_token_id=61, spatial_merge_size=2)


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl", "qwen2_vl-video"])
def test_repeat_samples_equals_the_batch_built_sample_by_sample(kind):
    batch = make_qwen_video_batch() if kind == "qwen2_vl-video" else make_batch(kind)
    ids = qwen_ids() if kind.startswith("qwen") else dict(image_token_id=image_token_id("llava"))
    inputs = batch.inputs()
    inputs["labels"] = inputs["input_ids"].clone()
    inputs["index"] = torch.arange(batch.size) + 10
    repeated = repeat_samples(inputs, 3, **ids)
    order = [i for i in range(batch.size) for _ in range(3)]
    expected = batch.inputs(order)
    expected["labels"] = expected["input_ids"].clone()
    expected["index"] = torch.tensor(order) + 10
    assert repeated.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(repeated[key], value), key


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_repeated_rows_compute_what_each_sample_computes(family):
    model = build_tiny_mllm(family)
    batch = make_batch(family)
    ids = qwen_ids() if family == "qwen2_vl" else dict(image_token_id=image_token_id("llava"))
    with torch.no_grad():
        repeated = model(**repeat_samples(batch.inputs(), 2, **ids)).logits
        for i in range(batch.size):
            alone = model(**batch.sample(i)).logits[0]
            for copy in range(2):
                torch.testing.assert_close(repeated[2 * i + copy, -alone.shape[0] :], alone, atol=1e-4, rtol=1e-4)


def test_repeat_samples_refuses_layouts_it_cannot_split():
    with pytest.raises(ValueError, match="Molmo2"):
        repeat_samples(make_molmo2_batch("image").inputs(), 2)
    with pytest.raises(ValueError, match="spatial_merge_size"):
        repeat_samples(make_batch("qwen2_vl").inputs(), 2, image_token_id=image_token_id("qwen2_vl"))
    with pytest.raises(ValueError, match="image_token_id"):
        repeat_samples(make_batch("llava").inputs(), 2)  # its images are not one per sample
    with pytest.raises(ValueError, match="times"):
        repeat_samples(make_batch("llava").inputs(), 0)


# -- the policy --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_policy_layer_is_the_llms_first_layer_run_bidirectionally(family):
    adapter = adapt(build_tiny_mllm(family))
    method = CaCoVIDMethod.for_backbone(adapter)
    first = adapter.layers[0].state_dict()
    assert method.layer.state_dict().keys() == first.keys()
    assert all(torch.equal(method.layer.state_dict()[k], v) for k, v in first.items())
    hidden = torch.randn(2, 7, adapter.hidden_size)
    positions = torch.arange(7).expand(2, -1)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :2] = False
    bias = torch.zeros(2, 1, 7, 7).masked_fill(~valid[:, None, None, :], float("-inf"))
    lm_positions = positions.unsqueeze(0).expand(3, -1, -1) if family == "qwen2_vl" else positions
    rotary = adapter.language_model.rotary_emb(hidden, lm_positions)
    theirs = adapter.layers[0](hidden, attention_mask=bias, position_embeddings=rotary, position_ids=lm_positions)
    angles = positions.float().unsqueeze(-1) * method.inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    torch.testing.assert_close(method.layer(hidden, (angles.cos(), angles.sin()), bias), theirs)
    untouched = CaCoVIDMethod.for_backbone(adapter, CaCoVIDConfig(init_from_llm=False))
    assert not torch.equal(untouched.layer.self_attn.q_proj.weight, first["self_attn.q_proj.weight"])


def capture_selects(method: CaCoVIDMethod) -> list:
    """Record every ``select`` call's state, counts and result on ``method``."""
    calls = []
    select = method.select

    def recording(state, num_keep):
        keep = select(state, num_keep)
        calls.append((state, num_keep, keep))
        return keep

    method.select = recording
    return calls


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_sampling_mode_draws_counts_reproducibly_and_records_the_rollout(family):
    torch.manual_seed(0)
    model = build_tiny_mllm(family)
    method = CaCoVIDMethod.for_backbone(adapt(model))
    inputs = make_batch(family).inputs()
    rows = inputs["input_ids"].shape[0]
    masks = []
    for index in (torch.arange(rows), torch.arange(rows), torch.arange(rows) + 100):
        with ts.apply(model, method, keep_ratio=0.5) as handle, method.sampling() as rollouts, torch.no_grad():
            handle.set_samples(index, draw=(0, 3))
            model(**inputs)
        (rollout,) = rollouts
        visual = rollout.inputs.visual
        assert torch.equal(rollout.mask & visual, rollout.mask)
        assert torch.equal(rollout.mask.sum(1), handle.last_records[0].target.to(rollout.mask.device))
        torch.testing.assert_close(method.keep_logits(rollout.inputs), rollout.logits)  # recomputes the draw's logits
        masks.append(rollout.mask)
    assert torch.equal(masks[0], masks[1])  # a function of (sample, draw)
    assert not torch.equal(masks[0], masks[2])  # other samples draw otherwise
    assert method.sampling_rollouts is None
    greedy = torch.arange(rows) % 2 == 0  # these rows keep the policy's top-k, the others sample as before
    with ts.apply(model, method, keep_ratio=0.5) as handle, method.sampling(greedy) as rollouts, torch.no_grad():
        handle.set_samples(torch.arange(rows), draw=(0, 3))
        model(**inputs)
    (rollout,) = rollouts
    ranked = rollout.logits.masked_fill(~rollout.inputs.visual, float("-inf")).argsort(1, descending=True)
    top = torch.zeros_like(ranked).scatter(1, ranked, torch.arange(ranked.shape[1]).expand_as(ranked))
    top = rollout.inputs.visual & (top < rollout.mask.sum(1, keepdim=True))
    assert torch.equal(rollout.mask[greedy], top[greedy])
    assert torch.equal(rollout.mask[~greedy], masks[0][~greedy])


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_a_prompts_copies_share_one_policy_pass_and_draw_different_combinations(family):
    torch.manual_seed(0)
    model = build_tiny_mllm(family)
    method = CaCoVIDMethod.for_backbone(adapt(model))
    ids = qwen_ids() if family == "qwen2_vl" else dict(image_token_id=image_token_id("llava"))
    copies = 6
    inputs = repeat_samples(make_batch(family).inputs(), copies, **ids)
    rows = inputs["input_ids"].shape[0]
    greedy = torch.arange(rows) % copies == 0
    sampling = method.sampling(greedy, group_size=copies)
    policy_rows = []
    watch = method.layer.register_forward_pre_hook(lambda module, args: policy_rows.append(args[0].shape[0]))
    with ts.apply(model, method, keep_ratio=0.5) as handle, torch.no_grad(), sampling as rollouts:
        handle.set_samples(torch.arange(rows), draw=(0, 1))
        model(**inputs)
    (rollout,) = rollouts
    method.keep_logits(rollout.inputs, copies)
    watch.remove()
    assert policy_rows == [rows // copies] * 2  # the rollout and a PPO epoch's recomputation: one row per prompt
    # the policy ran on each prompt's first copy only; its inputs are the same in every copy, so are the logits
    hidden = rollout.inputs.hidden
    assert torch.equal(hidden, hidden[::copies].repeat_interleave(copies, dim=0))
    assert torch.equal(rollout.logits, rollout.logits[::copies].repeat_interleave(copies, dim=0))
    assert torch.equal(method.keep_logits(rollout.inputs, copies), rollout.logits)  # what the PPO epochs recompute
    # running it on every row gives the same up to the float rounding of a GEMM of another height (LLaVA: 1.5e-8)
    torch.testing.assert_close(method.keep_logits(rollout.inputs), rollout.logits, atol=1e-6, rtol=0)
    for prompt in range(rows // copies):
        masks = rollout.mask[prompt * copies : (prompt + 1) * copies]
        sampled = {tuple(m.tolist()) for m in masks[1:]}
        assert len(sampled) > 1, "the sampled copies of one prompt drew one combination"
        assert sampled != {tuple(masks[0].tolist())}, "the sampled copies are the top-k row"
    with pytest.raises(ValueError, match="group_size"):
        method.keep_logits(rollout.inputs, 4)


def test_nan_policy_logits_stop_the_rollout_instead_of_drawing_at_random():
    model = build_tiny_mllm("llava")
    method = CaCoVIDMethod.for_backbone(adapt(model))
    with torch.no_grad():
        method.head[-1].weight.fill_(float("nan"))
    failing = pytest.raises(FloatingPointError, match=r"cacovid scores .* NaN")
    with ts.apply(model, method, keep_ratio=0.5), method.sampling(), torch.no_grad(), failing:
        model(**make_batch("llava").inputs())


def test_analytic_flops_charge_the_products_that_run():
    """FlopCounterMode counts matrix products (not the CPU SDPA kernel, norms or softmax): cacovid's count minus
    random's is its projections, MLP and token head, the head on every packed token."""
    from torch.utils.flop_counter import FlopCounterMode

    from tokensift.flops import SiteShape

    torch.manual_seed(0)
    model = build_tiny_mllm("llava")
    method = CaCoVIDMethod.for_backbone(adapt(model))
    inputs = make_batch("llava").sample(0)  # 6 text + 16 visual tokens
    counted = {}
    for name, chosen in (("random", "random"), ("cacovid", method)):
        with ts.apply(model, chosen, keep_ratio=0.25), FlopCounterMode(display=False) as counter, torch.no_grad():
            model(**inputs)
        counted[name] = counter.get_total_flops()
    cfg = method.config
    n, d, h, kv, e = 22, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    site = SiteShape("pre_llm", n, 16, 4, d, h, e, kv)
    not_counted = 3 * site.normalize(n, d) + 2 * site.matmul(n, e, n) * h + 6.0 * h * n * n
    assert counted["cacovid"] - counted["random"] == method.analytic_flops(site) - not_counted
    widths = [d, d // 2, d // 4, d // 8, max(2, d // 16), 2]
    head = sum(2 * n * a * b for a, b in itertools.pairwise(widths))
    projections, mlp = 2 * n * d * e * (2 * h + 2 * kv), 2 * n * d * 3 * cfg.intermediate_size
    assert counted["cacovid"] - counted["random"] == projections + mlp + head


# -- GRPO fit, export, apply -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_mllms(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for family in MLLM_FAMILIES:
        path = tmp_path_factory.mktemp(f"cacovid_{family}")
        build_tiny_mllm(family).save_pretrained(path)
        paths[family] = str(path)
    return paths


@pytest.mark.parametrize(("family", "beta"), [("llava", 0.0), ("qwen2_vl", 0.04)])
def test_grpo_fit_trains_the_policy_exports_and_applies(saved_mllms, family, beta, tmp_path):
    from test_mllm_trainer import labelled_batch, logged

    L.seed_everything(0)
    module = GRPOTrainer(
        saved_mllms[family],
        num_generations=4,
        keep_ratio_range=(0.3, 0.5),
        eval_keep_ratios=[0.5],
        beta=beta,
        num_iterations=2,
        lr=1e-2,
        warmup_fraction=0.0,
    )
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    before = {k: v.clone() for k, v in module.method.state_dict().items()}
    batch = labelled_batch(module, family)
    trainer = L.Trainer(
        max_epochs=1,
        logger=L.pytorch.loggers.CSVLogger(tmp_path / "runs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=1,
    )
    loader = torch.utils.data.DataLoader([batch] * 3, batch_size=None)
    trainer.fit(module, loader, torch.utils.data.DataLoader([batch], batch_size=None))
    assert len(logged(trainer, "train/loss")) == 3 and all(0 <= r <= 1 for r in logged(trainer, "train/reward"))
    assert bool(logged(trainer, "train/kl")) == (beta > 0)
    assert any(not torch.equal(v, before[k]) for k, v in module.method.state_dict().items()), "the policy trained"
    assert all(torch.equal(v, frozen[k]) for k, v in module.backbone.state_dict().items()), "frozen backbone"
    assert logged(trainer, "val/acc_full") == [1.0]

    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    out = tmp_path / "artifact"
    main(["export", str(checkpoint), str(out)])
    assert ts.load(out).default_budget == {"keep_ratio": 0.5}
    model, inputs = module.backbone, module.model_inputs(batch)
    module.handle.remove()
    with torch.no_grad():
        unpruned = model(**inputs).logits
    with ts.apply(model, str(out), keep_ratio=1.0), torch.no_grad():
        assert torch.equal(model(**inputs).logits, unpruned)
    with ts.apply(model, str(out), keep_ratio=0.25) as handle, torch.no_grad():
        calls = capture_selects(handle.method)
        model(**inputs)
    ((state, num_keep, keep),) = calls
    scores = handle.method.score(state)
    assert torch.equal(keep, top_k_mask(scores, state, num_keep))  # the policy's top tokens by probability
    assert torch.equal((keep & state.prunable).sum(1), num_keep)


def test_grpo_trains_on_qwen2_vl_video_batches(saved_mllms, tmp_path):
    """Video batches (packed ``pixel_values_videos``): every frame's tokens are one pool of the token mode."""
    L.seed_everything(0)
    module = GRPOTrainer(saved_mllms["qwen2_vl"], num_generations=3, keep_ratio_range=(0.2, 0.4), lr=1e-2)
    batch = make_qwen_video_batch().inputs()
    with module.teacher():
        predicted = module.logits(module.model_inputs(batch))[:, -2].argmax(-1)
    batch["input_ids"][:, -1] = predicted
    batch["labels"] = torch.full_like(batch["input_ids"], -100)
    batch["labels"][:, -1] = predicted
    batch["index"] = torch.arange(batch["input_ids"].shape[0])
    before = {k: v.clone() for k, v in module.method.state_dict().items()}
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 2, batch_size=None))
    assert module.last_rewards.shape == (3 * 3,)
    assert any(not torch.equal(v, before[k]) for k, v in module.method.state_dict().items()), "the policy trained"


def fit_steps(module, batch, loader_batches: int, **trainer_options) -> L.Trainer:
    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **trainer_options,
    )
    trainer.fit(module, torch.utils.data.DataLoader([batch] * loader_batches, batch_size=None))
    return trainer


@pytest.mark.parametrize(
    ("trainer_options", "batches"),
    [(dict(max_steps=4), 2), (dict(max_epochs=1), 3)],  # max_steps counts optimizer steps: 2 per batch
    ids=["max_steps", "epochs"],
)
def test_the_schedule_steps_once_per_optimizer_step_and_reaches_its_end(saved_mllms, trainer_options, batches):
    from test_mllm_trainer import labelled_batch

    L.seed_everything(0)
    module = GRPOTrainer(
        saved_mllms["llava"],
        num_generations=2,
        num_iterations=2,
        lr=1e-2,
        warmup_fraction=0.25,
        keep_ratio_range=(0.3, 0.5),
    )
    trainer = fit_steps(module, labelled_batch(module, "llava"), 3, **trainer_options)
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == batches
    assert trainer.global_step == module.schedule_steps == 2 * batches
    assert module.lr_schedulers().last_epoch == 2 * batches
    groups = {group["name"]: group for group in module.optimizers().optimizer.param_groups}
    assert set(groups) == {"scorer", "policy_layer"}
    assert all(group["lr"] < 1e-12 for group in groups.values()), "the cosine decay ran to its end"


def test_the_pretrained_policy_layer_learns_at_a_tenth_of_the_rate(saved_mllms):
    module = GRPOTrainer(saved_mllms["llava"], num_generations=2, lr=1e-2)
    groups = {group["name"]: group for group in module.parameter_groups()}
    assert groups["policy_layer"]["lr"] == pytest.approx(1e-3) and groups["scorer"]["lr"] == 1e-2
    assert {id(p) for p in groups["policy_layer"]["params"]} == {id(p) for p in module.method.layer.parameters()}
    rest = {id(p) for p in module.method.parameters()} - {id(p) for p in module.method.layer.parameters()}
    assert {id(p) for p in groups["scorer"]["params"]} == rest and rest
    one = GRPOTrainer(saved_mllms["llava"], num_generations=2, lr=1e-2, layer_lr_factor=1.0).parameter_groups()
    assert {group["lr"] for group in one} == {1e-2}


def test_ppo_epochs_start_at_ratio_one_and_rows_without_answer_are_left_out(saved_mllms):
    from test_mllm_trainer import labelled_batch

    L.seed_everything(0)
    copies = 4
    module = GRPOTrainer(
        saved_mllms["llava"], num_generations=copies, num_iterations=2, lr=5e-2, keep_ratio_range=(0.3, 0.5)
    )
    batch = labelled_batch(module, "llava")
    batch["labels"][0] = -100  # sample 0 has no answer token
    calls = []
    keep_logits = module.method.keep_logits

    def recording(inputs, group_size=1):
        logits = keep_logits(inputs, group_size)
        if group_size > 1:  # the trainer's calls (the inner per-group call passes 1)
            calls.append((torch.is_grad_enabled(), logits.detach().clone(), inputs.visual))
        return logits

    module.method.keep_logits = recording
    fit_steps(module, batch, 1, max_steps=2)
    (rollout, first, second) = calls
    assert [grad for grad, _, _ in calls] == [False, True, True]
    assert torch.equal(first[1], rollout[1]), "the first PPO epoch's log-probabilities are the rollout's: ratio 1"
    visual = rollout[2]
    assert not torch.equal(second[1][visual], rollout[1][visual]), "the second epoch sees the updated policy"
    rows = batch["labels"].shape[0]
    assert module.last_rewards.shape == ((rows - 1) * copies,)  # sample 0's copies are not rewarded

    # the loss averages over the answered rows only: the unanswered rows' zero terms do not dilute it
    module.method.keep_logits = keep_logits
    sampled, rewards, _, answered_rows = module.rollout(batch)
    assert answered_rows.tolist() == [False] * copies + [True] * (rows - 1) * copies
    advantages, _ = group_advantages(rewards, copies)
    masked = module.policy_terms(sampled, advantages, answered_rows)["loss"]
    everything = module.policy_terms(sampled, advantages)["loss"]
    torch.testing.assert_close(masked * answered_rows.sum(), everything * answered_rows.numel())


def test_bad_arguments_name_the_field(saved_mllms):
    for kwargs, field in (
        (dict(num_generations=1), "num_generations"),
        (dict(num_iterations=0), "num_iterations"),
        (dict(scale_rewards="global"), "scale_rewards"),
        (dict(epsilon_high=1.5), "epsilon_high"),
        (dict(layer_lr_factor=0.0), "layer_lr_factor"),
        (dict(beta=-0.1), "beta"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(method="question_selector"), "learns from gradients"),
        (dict(method_options={"sites": ["llm.1"]}), "sites"),
        (dict(method_options={"head_depth": -1}), "head_depth"),
    ):
        with pytest.raises(ValueError, match=field):
            GRPOTrainer(saved_mllms["llava"], **kwargs)


def test_recipe_parses(capsys):
    from tokensift.fit_cli import TokensiftCLI

    with pytest.raises(SystemExit) as exit_info:
        TokensiftCLI(args=["fit", "-c", str(ROOT / "configs" / "cacovid_digit_vqa.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    assert "tokensift.trainer.GRPOTrainer" in capsys.readouterr().out
