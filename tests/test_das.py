"""DAS layer skipping: the bandit's arithmetic, the skip handle's exactness on ViTs and multimodal LLMs (generate with a
KV cache included), a short fit that moves the scores and trains the adapters, export and ``ts.apply``."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny_mllm import build_tiny_mllm, image_token_id, make_batch
from transformers import ViTConfig, ViTForImageClassification

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.backbones.loading import load_mllm_backbone
from tokensift.backbones.pretrain_mllm import pretrain_mllm
from tokensift.bench.runner import run_bench
from tokensift.bench.seeds import fold_seeds
from tokensift.cli import main
from tokensift.data import ClutteredDigitsDataModule, DigitVQADataModule
from tokensift.export import save_artifact
from tokensift.fit_cli import TokensiftCLI
from tokensift.flops import block_flops, mllm_skip_prefill_flops, unpruned_flops, vit_skip_flops
from tokensift.scorers.base import cache_anchor_layers
from tokensift.scorers.das import DASConfig, DASMethod
from tokensift.skip import SkippedLayer
from tokensift.trainer import ScorerTrainer
from tokensift.trainer.rl import (
    bandit_update,
    mean_step_over_contributors,
    ramped_skip_count,
    reward_baseline,
    sample_distinct_skip_sets,
    sample_skip_set,
)
from tokensift.trainer.skip_module import LayerSkipTrainer, MLLMLayerSkipTrainer

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=4)


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**TINY_VIT, image_size=32, num_labels=10)).eval()


def trained_looking(method: DASMethod, seed: int = 1) -> DASMethod:
    """Non-zero up-projections (a fresh adapter is the identity, which would hide a wrong adapter) and scores."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in method.adapters:
            adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=generator) * 0.5)
        method.scores.copy_(torch.randn(method.scores.shape, generator=generator))
    return method.eval()


# -- the bandit (tokensift.trainer.rl) ------------------------------------------------------------------------
def test_bandit_update_matches_a_hand_computed_case():
    scores = torch.tensor([0.0, 1.0, -1.0, 2.0])
    probabilities = torch.sigmoid(scores)
    sets = [torch.tensor([0, 1]), torch.tensor([1, 3])]
    rewards = torch.tensor([0.6, 0.2])
    baseline = 0.4
    new = bandit_update(scores, probabilities, sets, rewards, baseline, lr=0.1)
    p = probabilities.tolist()
    slope = [q * (1 - q) for q in p]
    expected = [
        0.0 + 0.1 * 0.2 * slope[0],  # only in set 0 (advantage +0.2)
        1.0 + 0.1 * 0.2 * slope[1] + 0.1 * (-0.2) * slope[1],  # in both: the two cancel
        -1.0,  # never skipped
        2.0 + 0.1 * (-0.2) * slope[3],  # only in set 1 (advantage -0.2)
    ]
    assert torch.allclose(new, torch.tensor(expected), atol=1e-7, rtol=0)
    assert new[1] == pytest.approx(1.0, abs=1e-7) and new[2] == -1.0


def test_skip_count_ramps_as_das_and_sets_are_distinct_draws_of_the_probabilities():
    assert [ramped_skip_count(4, step, 8) for step in range(1, 9)] == [2, 3, 4, 4, 4, 4, 4, 4]
    assert ramped_skip_count(3, 1, 0) == 3
    probabilities = torch.tensor([0.9, 0.8, 1e-9, 0.7, 0.6])
    generator = torch.Generator().manual_seed(0)
    sets = sample_distinct_skip_sets(probabilities, 2, 5, generator)
    assert len(sets) == 5 and len({tuple(s.tolist()) for s in sets}) == 5
    for skip_set in sets:
        assert skip_set.tolist() == sorted(set(skip_set.tolist())) and len(skip_set) == 2
        assert 2 not in skip_set.tolist()  # a (nearly) zero-probability arm is not drawn
    # only C(3, 2) = 3 sets exist: asking for 5 returns those 3
    capped = sample_distinct_skip_sets(torch.tensor([0.5, 0.5, 0.5]), 2, 5, generator)
    assert sorted(tuple(s.tolist()) for s in capped) == [(0, 1), (0, 2), (1, 2)]
    assert sample_skip_set(probabilities, 0, generator).numel() == 0
    # same generator state, same draw (every process draws the same sets from (seed, step))
    draws = [sample_skip_set(probabilities, 3, torch.Generator().manual_seed(7)).tolist() for _ in range(2)]
    assert draws[0] == draws[1]


def test_reward_baseline_is_the_mean_over_processes():
    rewards = torch.tensor([0.2, 0.4, 0.9])
    assert reward_baseline(rewards).item() == pytest.approx(0.5)
    other_rank = torch.tensor([0.2, 2.0])  # a second process's reward sum and count, as an all-reduce (sum) adds it
    reduced = reward_baseline(rewards, lambda local: local + other_rank)
    assert reduced.item() == pytest.approx((1.5 + 0.2) / 5)
    assert reward_baseline(torch.zeros(0)).item() == 0.0  # nobody rewarded: no baseline, and no division by 0


def _baseline_on_rank(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:

        def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
            value = value.clone()
            dist.all_reduce(value)
            return value

        # rank 1's batch has nothing to reward (an MLLM batch without answer tokens): it joins with weight 0
        rewards = torch.tensor([0.2, 0.4]) if rank == 0 else torch.zeros(0)
        baseline = reward_baseline(rewards, all_reduce_sum)
        step = torch.tensor([0.3, -0.1]) if rank == 0 else torch.zeros(2)
        mean_step = mean_step_over_contributors(step, rank == 0, all_reduce_sum)
        results[rank] = (float(baseline), mean_step.tolist())
    finally:
        dist.destroy_process_group()


def test_reward_baseline_all_reduces_over_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_baseline_on_rank, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    # the rank with rewards alone sets the baseline and the step (a mean of means would halve both)
    expected = (pytest.approx(0.3), pytest.approx([0.3, -0.1]))
    assert dict(results) == {0: expected, 1: expected}


# -- the handle -----------------------------------------------------------------------------------------------
def test_skip_zero_is_bit_exact_and_remove_restores_modules_and_outputs():
    model = tiny_vit()
    adapter = adapt(model)
    method = trained_looking(DASMethod.for_backbone(adapter))
    pixels = torch.randn(3, 3, 32, 32)
    originals = list(adapter.layers)
    with torch.no_grad():
        reference = model(pixel_values=pixels).logits
        with ts.apply(model, method, skip_layers=0) as handle:
            assert torch.equal(model(pixel_values=pixels).logits, reference)
            handle.set_skip(2)
            assert all(isinstance(adapter.layers[i], SkippedLayer) for i in handle.skipped_layers)
            assert not torch.equal(model(pixel_values=pixels).logits, reference)
            with pytest.raises(ValueError, match="already has a tokensift method"):
                ts.apply(model, method, skip_layers=1)
            with pytest.raises(ValueError, match="already has a tokensift method"):
                ts.apply(model, "random", keep_ratio=0.5)  # a token handle on a model with blocks swapped
        assert [id(m) for m in adapter.layers] == [id(m) for m in originals]
        assert torch.equal(model(pixel_values=pixels).logits, reference)
        assert "skipped" not in str(model.state_dict().keys())
    # a token method can be applied again afterwards, and a skip on top of it is refused
    with ts.apply(model, "random", keep_ratio=0.5), pytest.raises(ValueError, match="already has a tokensift"):
        ts.apply(model, method, skip_layers=1)


def test_skipping_a_layer_is_running_its_adapter_in_place_of_the_block_by_hand():
    model = tiny_vit()
    adapter = adapt(model)
    method = trained_looking(DASMethod.for_backbone(adapter))
    pixels = torch.randn(2, 3, 32, 32)
    skip = method.skipped(1)
    assert skip == [method.skip_order()[0]]
    with torch.no_grad():
        hidden = model.vit.embeddings(pixels)
        for index, block in enumerate(adapt(model).layers):
            hidden = method.replacement(index)(hidden) if index in skip else block(hidden)
        by_hand = model.classifier(model.vit.layernorm(hidden)[:, 0])
        with ts.apply(model, method, skip_layers=1):
            skipped = model(pixel_values=pixels).logits
    assert torch.allclose(skipped, by_hand, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_generate_with_a_skipped_decoder_layer_keeps_the_cache_consistent(family):
    model = build_tiny_mllm(family)
    inputs = make_batch(family).inputs()
    method = trained_looking(DASMethod.for_backbone(adapt(model), DASConfig(skip_layers=2)))
    options = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[image_token_id(family)])
    with torch.no_grad():
        reference = model.generate(**inputs, **options)
        reference_logits = model(**inputs).logits
        with ts.apply(model, method, skip_layers=2) as handle:
            assert handle.skipped_layers == method.skipped(2) and 0 not in handle.skipped_layers
            cached = model.generate(**inputs, **options, use_cache=True)
            uncached = model.generate(**inputs, **options, use_cache=False)  # every step recomputes the prefix
            handle.set_skip(0)
            assert torch.equal(model(**inputs).logits, reference_logits)
        assert torch.equal(cached, uncached)
        assert not torch.equal(cached, reference)
        assert torch.equal(model.generate(**inputs, **options), reference)


# -- bad input --------------------------------------------------------------------------------------------------
def test_bad_input_names_the_field():
    model = tiny_vit()
    adapter = adapt(model)
    method = DASMethod.for_backbone(adapter)
    with pytest.raises(ValueError, match="skip_layers must be a whole number of layers in \\[0, 2\\]"):
        ts.apply(model, method, skip_layers=3)
    with pytest.raises(ValueError, match="keep_ratio= does not apply to das"):
        ts.apply(model, method, keep_ratio=0.5)
    with pytest.raises(ValueError, match="das needs a budget: pass skip_layers"):
        ts.apply(model, method)
    with pytest.raises(ValueError, match="skip_layers= is the budget of layer-skip methods"):
        ts.apply(model, "random", skip_layers=1)
    with pytest.raises(ValueError, match="das is a learned method"):
        ts.apply(model, "das", skip_layers=1)
    with pytest.raises(ValueError, match="candidate_layers"):
        DASMethod.for_backbone(adapter, DASConfig(candidate_layers=[1, 4]))
    with pytest.raises(ValueError, match="skip_layers is 3 but only 2 candidate_layers"):
        DASMethod.for_backbone(adapter, DASConfig(skip_layers=3))
    with pytest.raises(ValueError, match="search_steps"):
        DASConfig(warmup_steps=10, search_steps=5)
    llava = build_tiny_mllm("llava")
    with pytest.raises(ValueError, match=r"decoder layer\(s\) \[0\]"):
        ts.apply(llava, DASMethod.for_backbone(adapt(llava), DASConfig(candidate_layers=[0, 1])), skip_layers=1)
    wider = DASMethod(DASConfig(hidden_size=48, num_layers=4, candidate_layers=[1, 2], dim_replace=8))
    with pytest.raises(ValueError, match="hidden_size=48; this one has 32"):
        ts.apply(llava, wider, skip_layers=1)
    listed = ts.methods()["das"]
    assert listed["kind"] == "learned" and listed["sites"] == ["layer.<i>"]


# -- training, export, apply ------------------------------------------------------------------------------------
def fit(module, batches: list[dict], tmp_path: Path, steps: int) -> L.Trainer:
    loader = torch.utils.data.DataLoader(batches * steps, batch_size=None)
    trainer = L.Trainer(
        max_steps=steps,
        logger=L.pytorch.loggers.CSVLogger(tmp_path / "runs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=1,
    )
    trainer.fit(module, loader, torch.utils.data.DataLoader(batches[:1], batch_size=None))
    return trainer


SEARCH = {"skip_layers": 1, "num_subnetworks": 2, "search_interval": 1, "warmup_steps": 2, "search_steps": 8}


def test_fit_moves_the_scores_trains_the_adapters_and_exports(tmp_path):
    backbone = tmp_path / "vit"
    tiny_vit().save_pretrained(backbone)
    with pytest.raises(ValueError, match=r"skips whole layers: train it with .*LayerSkipTrainer"):
        ScorerTrainer(str(backbone), method="das")
    with pytest.raises(ValueError, match="eval_skip_layers"):
        LayerSkipTrainer(str(backbone), method_options=SEARCH, eval_skip_layers=[3])
    L.seed_everything(0)
    module = LayerSkipTrainer(str(backbone), method_options=SEARCH, eval_skip_layers=[2], lr=1e-2, warmup_fraction=0)
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    adapters = {k: v.clone() for k, v in module.method.adapters.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(8, 3, 32, 32, generator=generator), "labels": torch.arange(8) % 10}
    trainer = fit(module, [batch], tmp_path, steps=12)
    assert not torch.equal(module.method.scores, torch.zeros(2)), "the bandit moved the scores"
    assert all(not torch.equal(v, adapters[k]) for k, v in module.method.adapters.state_dict().items() if "up." in k)
    assert all(torch.equal(v, frozen[k]) for k, v in module.backbone.state_dict().items()), "frozen backbone"
    metrics = trainer.logged_metrics
    assert {"val/acc_full", "val/acc_skip1", "val/acc_skip2", "train/reward_baseline"} <= set(metrics)

    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    out = tmp_path / "artifact"
    main(["export", str(checkpoint), str(out)])
    artifact = ts.load(out)
    assert artifact.default_budget == {"skip_layers": 1} and artifact.manifest["trained_skip_range"] == [1, 2]
    assert torch.equal(artifact.method.scores, module.method.scores)
    with pytest.raises(ValueError, match="not --keep_ratio"):
        main(["export", str(checkpoint), str(tmp_path / "other"), "--keep_ratio", "0.5"])
    model = module.backbone
    module.handle.remove()
    pixels = batch["pixel_values"]
    module.method.eval()
    with torch.no_grad():
        for count in (1, 2):
            with ts.apply(model, str(out), skip_layers=count) as handle:
                assert handle.skipped_layers == module.method.skipped(count)
                from_disk = model(pixel_values=pixels).logits
            with ts.apply(model, module.method, skip_layers=count):
                assert torch.equal(model(pixel_values=pixels).logits, from_disk)
        with ts.apply(model, f"das:{out}") as handle:  # the artifact's default budget
            assert handle.skip_layers == 1


def test_fit_refuses_accumulation_and_claims_no_trained_range_before_finetuning(tmp_path):
    backbone = tmp_path / "vit"
    tiny_vit().save_pretrained(backbone)
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32, generator=generator), "labels": torch.arange(4)}
    module = LayerSkipTrainer(str(backbone), method_options=SEARCH)
    loader = torch.utils.data.DataLoader([batch] * 4, batch_size=None)
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        L.Trainer(max_steps=2, accumulate_grad_batches=2, **quiet).fit(module, loader)
    trainer = fit(module, [batch], tmp_path, steps=4)  # search_steps is 8: the fit ends inside the search
    assert module.artifact_extras() == {}
    trainer.save_checkpoint(tmp_path / "search.ckpt")
    main(["export", str(tmp_path / "search.ckpt"), str(tmp_path / "artifact")])
    assert "trained_skip_range" not in ts.load(tmp_path / "artifact").manifest


def six_block_vit_trainer(tmp_path: Path, **options) -> LayerSkipTrainer:
    """A LayerSkipTrainer on a 6-block tiny ViT (candidate blocks 1 .. 4)."""
    backbone = tmp_path / "vit6"
    torch.manual_seed(0)
    config = ViTConfig(**(TINY_VIT | {"num_hidden_layers": 6}), image_size=32, num_labels=10)
    ViTForImageClassification(config).save_pretrained(backbone)
    return LayerSkipTrainer(str(backbone), method_options=options)


def test_finetuning_skips_prefixes_of_the_skip_order(tmp_path):
    options = {"skip_layers": 2, "warmup_steps": 0, "search_steps": 0, "finetune_skip_spread": 1}
    module = six_block_vit_trainer(tmp_path, **options)
    module.method.scores.copy_(torch.tensor([0.1, 2.0, -1.0, 0.5]))  # order: layers 2, 4, 1, 3
    assert module.method.skip_order() == [2, 4, 1, 3]
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([1, 2])}
    counts = set()
    for seed in range(12):  # the count is drawn from (seed, step)
        module.seed = seed
        module.training_loss(batch)
        count = module.handle.skip_layers
        counts.add(count)
        assert module.handle.skipped_layers == sorted([2, 4, 1, 3][:count])
    assert counts == {1, 2, 3}  # k ± spread


def test_bandit_ranks_a_near_identity_block_first(tmp_path):
    module = six_block_vit_trainer(tmp_path, skip_layers=1, num_subnetworks=4, bandit_lr=1.0)
    block = module.adapter.layers[3]
    with torch.no_grad():  # block 3 adds nothing to the residual stream: skipping it costs nothing
        for linear in (block.attention.o_proj, block.mlp.fc2):
            linear.weight.mul_(1e-4)
            linear.bias.zero_()
        module.backbone.classifier.weight.mul_(50)  # confident: a skipped block that matters flips answers
    pixels = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        labels = module.backbone(pixel_values=pixels).logits.argmax(-1)
    batch = {"pixel_values": pixels, "labels": labels}
    inputs = module.model_inputs(batch)
    for step in range(3):
        module.search(batch, inputs, 1, torch.Generator().manual_seed(step))  # C(4, 1): every block rewarded
    assert module.method.skip_order()[0] == 3
    assert int(module.method.scores.argmax()) == module.method.candidate_layers.index(3)


def test_for_backbone_copies_the_config_and_skips_no_cache_anchor_layer():
    config = DASConfig(skip_layers=1)
    small = DASMethod.for_backbone(adapt(tiny_vit()), config)
    wide = ViTForImageClassification(ViTConfig(**(TINY_VIT | {"hidden_size": 48}), image_size=32, num_labels=10))
    assert DASMethod.for_backbone(adapt(wide), config).config.hidden_size == 48
    assert config.hidden_size is None and small.config.hidden_size == 32
    # a sliding-window decoder sizes its masks from the first layer of each attention type: never skipped
    llava = build_tiny_mllm("llava")
    text = adapt(llava).text_config
    text.layer_types = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert cache_anchor_layers(text) == {0, 2}
    assert DASMethod.for_backbone(adapt(llava)).candidate_layers == [1]
    method = DASMethod.for_backbone(adapt(llava), DASConfig(candidate_layers=[1, 2]))
    with pytest.raises(ValueError, match=r"decoder layer\(s\) \[2\]"):
        ts.apply(llava, method, skip_layers=1)


def test_mllm_fit_exports_and_applies(tmp_path):
    path = tmp_path / "llava"
    build_tiny_mllm("llava").save_pretrained(path)
    L.seed_everything(0)
    module = MLLMLayerSkipTrainer(str(path), method_options=SEARCH | {"skip_layers": 1}, lr=1e-2, warmup_fraction=0)
    batch = make_batch("llava").inputs()
    with torch.no_grad():
        predicted = module.logits(module.model_inputs(batch))[:, -2].argmax(-1)
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][:, -1] = predicted
    batch["labels"] = torch.full_like(batch["input_ids"], -100)
    batch["labels"][:, -1] = predicted
    trainer = fit(module, [batch], tmp_path, steps=10)
    losses = trainer.logged_metrics
    assert math.isfinite(float(losses["train/loss"]))
    assert not torch.equal(module.method.scores, torch.zeros(2))
    # the epoch-end validation ran on the final scores and adapters: its skip-1 accuracy is this batch's, by hand
    inputs = module.model_inputs(batch)
    module.method.eval()
    with torch.no_grad():
        module.handle.set_skip(1)
        by_hand = (module.logits(inputs)[:, -2].argmax(-1) == predicted).float().mean()
        module.handle.set_skip(0)
    assert float(losses["val/acc_skip1"]) == pytest.approx(float(by_hand))
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    main(["export", str(checkpoint), str(tmp_path / "artifact")])
    model = module.backbone
    module.handle.remove()
    with torch.no_grad():
        with ts.apply(model, str(tmp_path / "artifact"), skip_layers=2) as handle:
            assert handle.skipped_layers == [1, 2]
            from_disk = model(**inputs).logits
        with ts.apply(model, module.method, skip_layers=2):
            assert torch.equal(model(**inputs).logits, from_disk)
        assert not torch.equal(model(**inputs).logits, from_disk), "two skipped layers change the output"


def test_mllm_batch_without_answers_joins_both_search_all_reduces(tmp_path):
    path = tmp_path / "llava"
    build_tiny_mllm("llava").save_pretrained(path)
    options = {"skip_layers": 1, "num_subnetworks": 2, "search_interval": 1, "warmup_steps": 0, "search_steps": 4}
    module = MLLMLayerSkipTrainer(str(path), method_options=options)
    calls = []

    def counting_sum(value):
        calls.append(value.clone())
        return value  # one process: the sum is the value

    module.sum_over_processes = counting_sum
    batch = make_batch("llava").inputs()
    batch["labels"] = torch.full_like(batch["input_ids"], -100)  # no answer token: nothing to learn or reward
    assert module.training_loss(batch) is None
    # the two collectives every other rank runs at this search step: (reward sum, count), then (increments, 1 | 0)
    assert [c.tolist() for c in calls] == [[0.0, 0.0], [0.0, 0.0, 0.0]]
    assert torch.equal(module.method.scores, torch.zeros(2)), "weight 0: nothing moves"
    calls.clear()
    batch["labels"][:, -1] = batch["input_ids"][:, -1]
    assert module.training_loss(batch)["loss"].requires_grad
    assert len(calls) == 2 and calls[0][1] == 2 and calls[1][-1] == 1  # two rewards, one contributing process


# -- FLOPs and the bench ------------------------------------------------------------------------------------------
def test_flops_remove_the_skipped_blocks_and_charge_their_adapters():
    model = tiny_vit()
    adapter = adapt(model)
    method = trained_looking(DASMethod.for_backbone(adapter))
    tokens = 1 + adapter.num_patches()  # [CLS] + 64 patches
    with ts.apply(model, method, skip_layers=0) as handle:
        assert vit_skip_flops(adapter, handle)["ratio"] == 1.0
        handle.set_skip(1)
        flops = vit_skip_flops(adapter, handle)
        block = block_flops(tokens, 32, 64)
        adapter_flops = tokens * 2 * 2 * 32 * method.config.dim_replace  # down + up projections
        assert flops["scorer"] == adapter_flops
        assert flops["total"] == pytest.approx(unpruned_flops(adapter) - block + adapter_flops)
        handle.enabled = False  # every block runs again, the skip set kept
        assert vit_skip_flops(adapter, handle)["ratio"] == 1.0 and handle.skipped_layers == method.skipped(1)
    llava = build_tiny_mllm("llava")
    method = DASMethod.for_backbone(adapt(llava))
    with ts.apply(llava, method, skip_layers=2) as handle:
        flops = mllm_skip_prefill_flops(handle, torch.tensor([5, 9]), torch.tensor([16, 32]))
        layer = handle.original_layer(1)
        linear = sum(2 * m.in_features * m.out_features for m in layer.modules() if isinstance(m, torch.nn.Linear))
        per_layer = [n * linear + 4 * n * n * 32 for n in (21, 41)]  # width: 4 heads x 8
        assert flops["unpruned"] == pytest.approx(4 * sum(per_layer))
        assert flops["llm"] == pytest.approx(2 * sum(per_layer))
        adapters = 2 * sum(n * 4 * 32 * method.config.dim_replace for n in (21, 41))  # two layers skipped
        assert flops["scorer"] == pytest.approx(adapters)


def test_bench_reports_one_row_per_skip_count_on_the_equal_flops_table(tmp_path):
    backbone = tmp_path / "vit"
    tiny_vit().save_pretrained(backbone)
    model = tiny_vit()
    adapter = adapt(model)
    method = trained_looking(DASMethod.for_backbone(adapter, DASConfig(skip_layers=1)))
    artifact = save_artifact(
        method,
        adapter.fingerprint(),
        tmp_path / "das",
        default_budget={"skip_layers": 1},
        extra={"trained_skip_range": [1, 2]},
    )
    data = ClutteredDigitsDataModule(canvas_size=32, patch_size=4, num_clutter=2, test_samples=16, batch_size=16)
    result = run_bench(
        str(backbone),
        data,
        [f"das:{artifact}", "random"],
        [1.0, 0.5],
        out=tmp_path / "out",
        batch_size=None,
        repeats=1,
        warmup=0,
        flops_ratios="0.6,0.8",
    )
    rows = [row for row in result["rows"] if row["method"] == "das"]
    assert [row["skip_layers"] for row in rows] == [0, 1, 2]
    assert rows[0]["flops_ratio"] == 1.0 and rows[0]["accuracy"] == result["rows"][0]["accuracy"]
    assert rows[0]["flops_ratio"] > rows[1]["flops_ratio"] > rows[2]["flops_ratio"]
    assert all(row["keep_ratio"] is None and row["oracle_recall"] == 1.0 for row in rows)  # every token stays
    assert rows[2]["sites"] == [f"layer.{i}" for i in method.skipped(2)]
    matched = {(m["method"], m["flops_ratio"]) for m in result["matched_flops"] if m["accuracy"] is not None}
    assert ("das", 0.8) in matched
    header, *lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
    column = header.split(",").index("skip_layers")
    assert [line.split(",")[column] for line in lines if line.startswith("das,")] == ["0", "1", "2"]


def test_mllm_bench_rows_per_skip_count(tmp_path):
    data = dict(batch_size=8, train_samples=16, val_samples=8, test_samples=16, seed=1)
    tiny = dict(vision_hidden_size=32, vision_layers=1, text_hidden_size=32, text_layers=3)
    quiet = dict(enable_progress_bar=False, enable_model_summary=False)
    model_dir, _ = pretrain_mllm(tmp_path / "llava", DigitVQADataModule(**data), trainer_kwargs=quiet, **tiny)
    model = load_mllm_backbone(str(model_dir))
    adapter = adapt(model)
    method = trained_looking(DASMethod.for_backbone(adapter, DASConfig(candidate_layers=[1, 2])))
    artifact = save_artifact(method, adapter.fingerprint(), tmp_path / "das", default_budget={"skip_layers": 1})
    options = dict(out=tmp_path / "out", batch_size=None, repeats=1, warmup=0, flops_ratios="0.7")
    for methods, skip_layers, match in (
        (["random"], "1", "methods names none"),
        ([f"das:{artifact}"], "0,3", r"\[3\] exceed the 2 layers"),
        ([f"das:{artifact}"], "1,x", "'x' is not a whole number"),
    ):
        with pytest.raises(ValueError, match=match):
            run_bench(str(model_dir), DigitVQADataModule(**data), methods, [1.0], skip_layers=skip_layers, **options)
    result = run_bench(
        str(model_dir),
        DigitVQADataModule(**data),
        [f"das:{artifact}", "random"],
        [1.0, 0.5],
        skip_layers="2,0",  # the artifact's default would be 0, 1
        **options,
    )
    rows = [row for row in result["rows"] if row["method"] == "das"]
    assert [row["skip_layers"] for row in rows] == [0, 2]
    unpruned = result["rows"][0]
    assert rows[0]["accuracy"] == unpruned["accuracy"] and rows[0]["flops_ratio"] == pytest.approx(1.0)
    # the vision tower runs as before; two of 3 decoder layers become adapters
    assert 0.3 < rows[1]["flops_ratio"] < 0.9 and rows[1]["sites"] == ["layer.1", "layer.2"]


@pytest.mark.parametrize("recipe", ["das_digits", "das_digit_vqa"])
def test_recipes_parse(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TokensiftCLI(args=["fit", "-c", str(ROOT / "configs" / f"{recipe}.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    assert "LayerSkipTrainer" in capsys.readouterr().out


def test_molmo2_decoder_layers_skip_with_a_consistent_cache():
    from tiny_mllm import build_tiny_molmo2, make_molmo2_batch

    model = build_tiny_molmo2()
    inputs = make_molmo2_batch("image").inputs()
    method = trained_looking(DASMethod.for_backbone(adapt(model), DASConfig(skip_layers=2)))
    assert method.candidate_layers == [1, 2]
    options = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        reference_logits = model(**inputs).logits
        with ts.apply(model, method, skip_layers=2) as handle:
            skipped_logits = model(**inputs).logits
            cached = model.generate(**inputs, **options, use_cache=True)
            uncached = model.generate(**inputs, **options, use_cache=False)
            handle.set_skip(0)
            assert torch.equal(model(**inputs).logits, reference_logits)
    assert torch.equal(cached, uncached)
    assert not torch.allclose(skipped_logits, reference_logits)


def test_hidden_states_hold_one_entry_fewer_per_skipped_block():
    # documented in tokensift.skip and ts.apply: transformers records hidden states by hooks on the block class
    model = tiny_vit()
    method = DASMethod.for_backbone(adapt(model))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert len(model(pixel_values=pixels, output_hidden_states=True).hidden_states) == 5
        with ts.apply(model, method, skip_layers=2) as handle:
            assert len(model(pixel_values=pixels, output_hidden_states=True).hidden_states) == 3
            handle.enabled = False
            assert len(model(pixel_values=pixels, output_hidden_states=True).hidden_states) == 5


def test_seed_folding_keeps_skip_rows_and_splits_artifacts_by_config(tmp_path):
    adapter = adapt(tiny_vit())
    artifacts = {}
    for label, skip in (("seed0", 1), ("seed1", 1), ("k2a", 2), ("k2b", 2)):
        method = DASMethod.for_backbone(adapter, DASConfig(skip_layers=skip))
        budget = {"skip_layers": skip}
        artifacts[label] = save_artifact(method, adapter.fingerprint(), tmp_path / label, default_budget=budget)

    def row(label, skip, accuracy):
        return {"method": f"das:{label}", "kind": "learned", "keep_ratio": None, "skip_layers": skip,
                "accuracy": accuracy, "flops_ratio": 1 - 0.2 * skip, "artifact": str(artifacts[label])}  # fmt: skip

    rows = [row("seed0", 0, 0.9), row("seed0", 1, 0.8), row("seed1", 0, 0.9), row("seed1", 1, 0.6)]
    rows += [row("k2a", 1, 0.5), row("k2b", 1, 0.7)]
    result = {"rows": rows, "matched_flops": [], "comparisons": []}
    out = tmp_path / "bench"
    out.mkdir()
    folded = fold_seeds(dict(result), out, quiet=True)["seeds"]
    by = {(e["method"], e["skip_layers"]): e for e in folded["skips"]}
    # the two configs (skip_layers 1 and 2) are two methods, each with two seeds, not one method with four
    assert set(by) == {("das (learned, skip_layers=1)", 0), ("das (learned, skip_layers=1)", 1),
                       ("das (learned, skip_layers=2)", 1)}  # fmt: skip
    assert by[("das (learned, skip_layers=1)", 1)]["accuracy"]["mean"] == pytest.approx(0.7)
    assert by[("das (learned, skip_layers=2)", 1)]["flops_ratio"] == pytest.approx(0.8)
    text = (out / "summary.md").read_text()
    assert "| das (learned, skip_layers=1) | 1 | 0.700 ± 0.141 (2 seeds) | 0.800 |" in text
    # a later run with nothing to fold leaves no summary of the earlier one behind
    fold_seeds({"rows": rows[:2], "matched_flops": [], "comparisons": []}, out, quiet=True)
    assert not (out / "summary.md").exists() and not (out / "summary.json").exists()
