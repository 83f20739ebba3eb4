"""``stts``: Molmo2's spatio-temporal token scorer at ``vit.<i>``, trained by removal.

The method on hand-built states (videos of different lengths and an image in one padded batch): score shapes, the
rescale's range, the first frame kept whole, the count per video, the auxiliary loss against a hand computation, and
gradients through the key bias. Then through the public API on tiny Qwen2-VL and Molmo2 video models: a few steps
of ``MLLMScorerTrainer(method="stts")`` in gather mode (loss falls, backbone bit-identical), export and ``ts.apply``.
"""

from __future__ import annotations

import math

import pytest
import torch

from tokensift.backbones.mllm import IMAGE, VIDEO
from tokensift.scorers import get_method_class
from tokensift.scorers.stts import STTSConfig, STTSMethod
from tokensift.state import TokenState

D, HEADS, SIDE, P = 8, 2, 2, 4  # width, pooling heads, groups per frame side, patches per group
GROUPS = SIDE * SIDE


def tiny_method(**options) -> STTSMethod:
    torch.manual_seed(0)
    config = STTSConfig(hidden_size=D, num_heads=HEADS, head_dim=D // HEADS, mlp_dim=12, sites=["vit.1"], **options)
    return STTSMethod(config)


def video_state(frames: list[int], kinds: list[int] | None = None, seed: int = 0) -> TokenState:
    """One padded row per item with ``frames[b]`` frames of ``SIDE × SIDE`` groups of ``P`` patches, frame-major."""
    generator = torch.Generator().manual_seed(seed)
    kinds = kinds or [VIDEO if t > 1 else IMAGE for t in frames]
    width = max(frames) * GROUPS
    rows = len(frames)
    patches = torch.zeros(rows, width, P, D)
    coords = torch.full((rows, width, 3), -1, dtype=torch.long)
    valid = torch.zeros(rows, width, dtype=torch.bool)
    for b, t in enumerate(frames):
        first = torch.randn(GROUPS, P, D, generator=generator)
        # later frames: the first one plus a change that grows with the group's index (some groups barely move)
        drift = torch.linspace(0.0, 2.0, GROUPS).view(GROUPS, 1, 1)
        for f in range(t):
            step = first + f * drift * torch.randn(GROUPS, P, D, generator=generator)
            patches[b, f * GROUPS : (f + 1) * GROUPS] = step
        h, w = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
        coords[b, : t * GROUPS] = torch.stack(
            [torch.arange(t).repeat_interleave(GROUPS), h.reshape(-1).repeat(t), w.reshape(-1).repeat(t)], dim=-1
        )
        valid[b, : t * GROUPS] = True
    kind = torch.tensor(kinds).view(-1, 1).expand(-1, width).masked_fill(~valid, 0)
    return TokenState(
        hidden=patches.mean(2),
        protected=torch.zeros_like(valid),
        orig_index=torch.arange(width).expand(rows, -1).masked_fill(~valid, -1),
        size=valid.float(),
        grid=(SIDE, SIDE),
        num_prefix=0,
        site="vit.1",
        layer=1,
        valid=valid,
        kind=kind,
        coords=coords,
        group_patches=patches,
        group_patch_valid=valid.unsqueeze(-1).expand(-1, -1, P).clone(),
        keep_target=torch.full((rows,), 0.5),
    )


def test_scores_rescale_first_frame_and_count_per_video():
    method = tiny_method().eval()
    frames = [3, 5, 1]  # two videos of different lengths and an image
    state = video_state(frames)
    num_keep = torch.tensor([6, 9, 2])  # the budget's count per item (the image's is ignored: images stay whole)
    decision = method.reduce(state, num_keep)
    scores, rescaled = method.last_scores, method.last_rescaled
    assert scores.shape == decision.keep.shape == decision.key_bias.shape == state.valid.shape
    live = state.valid
    assert bool(((scores > 0) & (scores < 1))[live].all()) and bool((scores[~live] == 0).all())
    frame = state.coords[..., 0]
    for b, t in enumerate(frames):
        first = live[b] & (frame[b] == 0)
        later = live[b] & (frame[b] > 0)
        assert bool(decision.keep[b][first].all()), "the first frame stays whole"
        assert bool((decision.key_bias[b][first] == 0).all()), "no bias on the first frame"
        if t == 1:  # the image: every group kept, no bias
            assert int(decision.keep[b].sum()) == GROUPS and bool((decision.key_bias[b] == 0).all())
            continue
        assert int(decision.keep[b].sum()) == int(num_keep[b]), "the budget's count per video"
        kept_later = decision.keep[b] & later
        # the later frames' best raw scores are what stays
        assert float(scores[b][kept_later].min()) >= float(scores[b][later & ~decision.keep[b]].max())
        for f in range(1, t):  # each later frame min-max rescaled to [e^-2, 1]
            in_frame = rescaled[b][live[b] & (frame[b] == f)]
            raw = scores[b][live[b] & (frame[b] == f)]
            span = float(raw.max() - raw.min())  # the reference's + 1e-6 keeps the top just under 1
            top = math.exp(-2) + (1 - math.exp(-2)) * span / (span + 1e-6)
            assert math.isclose(float(in_frame.min()), math.exp(-2), rel_tol=1e-5)
            assert math.isclose(float(in_frame.max()), top, rel_tol=1e-4) and float(in_frame.max()) <= 1.0
        torch.testing.assert_close(decision.key_bias[b][later], rescaled[b][later].log())
    assert not bool(decision.keep[~live].any())


def test_budget_below_the_first_frame_keeps_the_first_frame_only():
    method = tiny_method().eval()
    state = video_state([4])
    decision = method.reduce(state, torch.tensor([1]))
    assert decision.keep[0].nonzero().flatten().tolist() == list(range(GROUPS))


def test_batch_equals_one_by_one():
    method = tiny_method().eval()
    frames, num_keep = [3, 5], torch.tensor([7, 10])
    state = video_state(frames)
    together = method.reduce(state, num_keep)
    for b, t in enumerate(frames):
        alone = method.reduce(_row(state, b), num_keep[b : b + 1])
        width = t * GROUPS
        assert torch.equal(alone.keep[0, :width], together.keep[b, :width])
        torch.testing.assert_close(alone.key_bias[0, :width], together.key_bias[b, :width])


def _row(state: TokenState, b: int) -> TokenState:
    """Row ``b`` of ``state`` alone, trimmed to its own width."""
    width = int(state.valid[b].sum())
    index = torch.arange(width).unsqueeze(0)
    single = {
        name: getattr(state, name)[b : b + 1]
        for name in ("hidden", "protected", "orig_index", "size", "valid", "kind", "coords", "group_patches")
    }
    single["group_patch_valid"] = state.group_patch_valid[b : b + 1]
    single["keep_target"] = state.keep_target[b : b + 1]
    return TokenState(**single, grid=state.grid, num_prefix=0, site=state.site, layer=state.layer).gather(index)


def test_auxiliary_loss_matches_a_hand_computation():
    method = tiny_method(aux_weight=0.5).train()
    frames = [3, 2]
    state = video_state(frames)
    with torch.enable_grad():
        method.reduce(state, torch.tensor([6, 5]))
        aux = method.auxiliary_losses()["temporal"]
    scores = method.last_scores
    errors = []
    for b, t in enumerate(frames):
        for f in range(1, t):
            for g in range(GROUPS):
                here = state.group_patches[b, f * GROUPS + g].flatten()
                before = state.group_patches[b, (f - 1) * GROUPS + g].flatten()
                cosine = float(here @ before / (here.norm() * before.norm()))
                errors.append((float(scores[b, f * GROUPS + g]) - (1 - cosine)) ** 2)
    assert math.isclose(float(aux.detach()), 0.5 * sum(errors) / len(errors), rel_tol=1e-5)
    assert method.auxiliary_losses() == {}, "read once per pass"
    aux.backward()
    assert method.scorer.mlp.w3.weight.grad.abs().sum() > 0


def test_no_auxiliary_loss_outside_training():
    method = tiny_method().eval()
    method.reduce(video_state([3]), torch.tensor([6]))
    assert method.auxiliary_losses() == {}


def test_gradients_reach_the_scorer_through_the_key_bias():
    """The key bias in an attention over the groups (what the next block does with it) carries the gradient."""
    method = tiny_method().train()
    state = video_state([4])
    decision = method.reduce(state, torch.tensor([8]))
    method.auxiliary_losses()
    hidden = state.hidden
    logits = hidden @ hidden.transpose(1, 2) / math.sqrt(D) + decision.key_bias.unsqueeze(1)
    out = logits.softmax(-1) @ hidden
    out[decision.keep].square().sum().backward()
    grads = {name: p.grad for name, p in method.named_parameters()}
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads.values()), [
        n for n, g in grads.items() if g is None or not bool(g.abs().sum() > 0)
    ]


def test_row_scope_rescales_each_row_of_groups():
    method = tiny_method(rescale_scope="row").eval()
    state = video_state([3])
    method.reduce(state, torch.tensor([6]))
    frame, row = state.coords[0, :, 0], state.coords[0, :, 1]
    for f in (1, 2):
        for r in range(SIDE):
            values = method.last_rescaled[0][(frame == f) & (row == r)]
            raw = method.last_scores[0][(frame == f) & (row == r)]
            span = float(raw.max() - raw.min())
            assert math.isclose(float(values.min()), math.exp(-2), rel_tol=1e-5)
            assert math.isclose(
                float(values.max()), math.exp(-2) + (1 - math.exp(-2)) * span / (span + 1e-6), rel_tol=1e-4
            )


def test_mask_mode_is_refused_and_bad_options_name_the_field():
    method = tiny_method()
    with pytest.raises(ValueError, match="trains by removal"):
        method.keep_policy(video_state([2]), torch.tensor([5]))
    for options, field in (
        (dict(sites=["vit.1", "vit.2"]), "sites"),
        (dict(sites=["llm.1"]), "sites"),
        (dict(rescale_min=1.0), "rescale_min"),
        (dict(rescale_scope="video"), "rescale_scope"),
        (dict(aux_weight=-1.0), "aux_weight"),
        (dict(mlp_dim=0), "mlp_dim"),
    ):
        with pytest.raises(ValueError, match=field):
            STTSConfig(**options)
    with pytest.raises(ValueError, match="for_backbone"):
        STTSMethod(STTSConfig())
    with pytest.raises(ValueError, match="group_patches"):
        state = video_state([2])
        state.group_patches = None
        tiny_method().reduce(state, torch.tensor([5]))


def test_registered_learned_vit_method_that_trains_by_removal():
    cls = get_method_class("stts")
    assert cls is STTSMethod and cls.kind == "learned" and cls.site_kinds == ("vit",)
    assert cls.trains_by_removal is True and cls.needs_group_patches is True


def test_analytic_flops_count_the_pooling_and_the_mlp():
    from tokensift.flops import SiteShape

    method = tiny_method()
    site = SiteShape(
        site="vit.1", tokens=16, prunable=16, keep=8, hidden=D, heads=HEADS, head_dim=D // HEADS, kv_heads=2
    )
    flops = method.analytic_flops(site)
    mlp = 2 * 16 * (2 * D * 12 + 12 * 12 + 12)
    assert flops > mlp and method.analytic_flops(SiteShape("vit.1", 0, 0, 0, D, HEADS, D // HEADS, 2)) == 0.0


# -- through the public API on tiny video models ---------------------------------------------------------------
STEPS = 16
VIDEO_FAMILIES = {
    # (data module options, tower blocks): frames of different lengths in one batch; STTS at vit.0 leaves the bias
    # block and one more after it
    "qwen2_vl": (dict(frame_size=56, patch_size=7, align_digits=False), 3),  # 56 px: no room for aligned moves
    "molmo2": (dict(frame_size=84, patch_size=7), 4),
}


@pytest.fixture(scope="module")
def video_backbones(tmp_path_factory) -> dict:
    from tokensift.backbones.pretrain_mllm import build_mllm
    from tokensift.data.video_vqa import VideoDigitVQADataModule

    built = {}
    for family, (options, blocks) in VIDEO_FAMILIES.items():
        data = VideoDigitVQADataModule(
            batch_size=3, train_samples=8, val_samples=4, test_samples=4, family=family, min_frames=3, max_frames=6,
            max_digits=2, **options,
        )  # fmt: skip
        model = build_mllm(
            family, data, vision_hidden_size=32, vision_layers=blocks, text_hidden_size=32, text_layers=2,
            num_attention_heads=2,
        )  # fmt: skip
        # a larger init than the default 0.02 (as tiny_mllm's): answers that depend on the frames, so removal matters
        for config in (model.config, model.config.text_config, model.config.vision_config):
            config.initializer_range = 0.2
        torch.manual_seed(0)
        model.apply(model._init_weights)
        path = tmp_path_factory.mktemp(f"stts_{family}")
        model.save_pretrained(path)
        data.setup("fit")
        built[family] = (str(path), next(iter(data.train_dataloader())), data)
    return built


def own_answer_batch(module, batch: dict) -> dict:
    """``batch`` with each sample's one answer token replaced by the unpruned model's own prediction there."""
    batch = dict(batch)
    answer = batch["labels"] != -100
    with module.teacher():
        logits = module.logits(module.model_inputs(batch))
    predicted = logits[:, :-1].argmax(-1)[answer[:, 1:]]
    batch["input_ids"] = batch["input_ids"].masked_scatter(answer, predicted)
    batch["labels"] = batch["labels"].masked_scatter(answer, predicted)
    return batch


@pytest.mark.parametrize("family", list(VIDEO_FAMILIES))
def test_a_batch_of_videos_computes_what_each_video_computes_alone(video_backbones, family):
    """Videos of different lengths, left-padded: each keeps its own first frame and count, as alone."""
    import tokensift as ts
    from tokensift.backbones import adapt
    from tokensift.backbones.loading import load_mllm_backbone
    from tokensift.trainer.base import MLLM_INPUTS

    path, _, data = video_backbones[family]
    model = load_mllm_backbone(path)
    items = [data.train_dataset[i] for i in range(3)]
    assert len({int(item["num_frames"]) for item in items}) > 1, "videos of different lengths"
    collate = data.collator()
    torch.manual_seed(0)
    method = STTSMethod.for_backbone(adapt(model), STTSConfig(sites=["vit.0"])).eval()

    def answer_logits(batch: dict) -> torch.Tensor:
        inputs = {key: batch[key] for key in MLLM_INPUTS if key in batch}
        with ts.apply(model, method, keep_ratio=0.5), torch.no_grad():
            return model(**inputs).logits[:, -2]

    together = answer_logits(collate(items))
    with torch.no_grad():
        batch = collate(items)
        unpruned = model(**{key: batch[key] for key in MLLM_INPUTS if key in batch}).logits[:, -2]
    assert not torch.allclose(unpruned, together, atol=1e-4), "the groups were removed"
    for row, item in enumerate(items):
        torch.testing.assert_close(answer_logits(collate([item]))[0], together[row], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(VIDEO_FAMILIES))
def test_the_answer_loss_reaches_the_scorer_only_through_the_key_bias(video_backbones, family, monkeypatch):
    """Gather mode on the real tower: the dropped groups leave after the next block, and the answer's gradient reaches
    every scorer parameter; with the bias flattened to 0 (a plain removal) none reaches it."""
    import tokensift as ts
    from tokensift.backbones import adapt
    from tokensift.backbones.loading import load_mllm_backbone
    from tokensift.trainer.base import MLLM_INPUTS
    from tokensift.trainer.losses import answer_loss

    path, batch, _ = video_backbones[family]
    model = load_mllm_backbone(path)
    model.requires_grad_(False)
    inputs = {key: batch[key] for key in MLLM_INPUTS if key in batch}
    torch.manual_seed(0)
    method = STTSMethod.for_backbone(adapt(model), STTSConfig(sites=["vit.0"], aux_weight=0.0))

    def answer_gradients() -> dict[str, torch.Tensor] | None:
        """Each scorer parameter's gradient of the answer loss; None when the loss does not depend on the scorer."""
        method.zero_grad()
        with ts.apply(model, method, keep_ratio=0.5):
            loss = answer_loss(model(**inputs).logits, batch["labels"]).mean()
        if not loss.requires_grad:
            return None
        loss.backward()
        return {name: p.grad for name, p in method.named_parameters()}

    grads = answer_gradients()
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads.values()), sorted(grads)
    videos = batch["num_frames"] > 1
    assert bool((method.last_scores > 0).sum(1)[videos].all()), "every video scored"
    monkeypatch.setattr(method, "rescale", lambda scores, state, layout: torch.ones_like(scores))
    assert answer_gradients() is None, "a plain removal: the scorer's ranking is no function the loss can follow"


@pytest.mark.parametrize("family", list(VIDEO_FAMILIES))
def test_stts_trains_by_removal_on_a_frozen_video_mllm_and_exports(video_backbones, family, tmp_path):
    import lightning as L

    import tokensift as ts
    from tokensift.cli import main
    from tokensift.trainer import MLLMScorerTrainer

    path, raw, _ = video_backbones[family]
    L.seed_everything(0)
    module = MLLMScorerTrainer(
        path,
        method="stts",
        method_options={"sites": ["vit.0"]},
        keep_ratio_range=(0.4, 0.6),
        eval_keep_ratios=[0.5],
        distill_weight=0.0,
        lr=3e-2,
        warmup_fraction=0.0,
    )
    assert module.handle.mode == "gather" and module.training_mode == "gather"
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    before = {k: v.clone() for k, v in module.method.state_dict().items()}
    batch = own_answer_batch(module, raw)
    forwards = []
    hook = module.backbone.register_forward_pre_hook(lambda *_: forwards.append(module.handle.enabled))
    loader = torch.utils.data.DataLoader([batch] * STEPS, batch_size=None)
    trainer = L.Trainer(
        max_steps=STEPS,
        logger=L.pytorch.loggers.CSVLogger(tmp_path / "runs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=0,
    )
    trainer.fit(module, loader)
    hook.remove()
    assert forwards == [True] * STEPS, "distill_weight 0: no teacher pass, one pruned pass per step"
    losses = logged(trainer, "train/loss")
    temporal = logged(trainer, "train/temporal")
    assert len(losses) == STEPS and len(temporal) == STEPS and not logged(trainer, "train/distill")
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert any(not torch.equal(v, before[k]) for k, v in module.method.state_dict().items()), "the method trained"
    assert all(torch.equal(v, frozen[k]) for k, v in module.backbone.state_dict().items()), "frozen backbone"

    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    out = tmp_path / "artifact"
    main(["export", str(checkpoint), str(out)])
    assert ts.load(out).manifest["method"] == "stts"
    model = module.backbone
    inputs = module.model_inputs(batch)
    module.handle.remove()
    with torch.no_grad():
        unpruned = model(**inputs).logits
    with ts.apply(model, str(out), keep_ratio=0.5), torch.no_grad():
        from_disk = model(**inputs).logits
    module.method.eval()
    with ts.apply(model, module.method, keep_ratio=0.5), torch.no_grad():
        direct = model(**inputs).logits
    assert torch.equal(from_disk, direct) and not torch.equal(direct, unpruned)
    with ts.apply(model, str(out), keep_ratio=1.0), torch.no_grad():
        assert torch.equal(model(**inputs).logits, unpruned), "keep_ratio=1 is exact"


def logged(trainer, column: str) -> list[float]:
    import csv
    from pathlib import Path

    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]
