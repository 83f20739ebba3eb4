"""Dynamic-LLaVA's output-text predictor: generated tokens' KV entries evicted during ``generate()``.

On the tiny LLaVA / Qwen2-VL of ``tiny_mllm`` (a left-padded batch of 3 with mixed layouts):

- a predictor that keeps every entry gives exactly plain ``generate()`` (and, with visual pruning, exactly the vision
  predictor alone);
- one that drops a given set of (sample, step) entries gives the tokens of a reference that keeps every entry in the
  cache and masks the dropped ones out explicitly in the layers from the eviction layer on (so the physical
  eviction is the masking), and each sample alone gives what it gives in the batch; the same with visual pruning
  at another layer, and with beam search (the reference's decisions follow the beams);
- the cache really is shorter: each layer's entries counted;
- mask (training) mode with the same hard decisions on the teacher-forced answer gives the decoding logits, and a
  straight-through one trains the predictor through the frozen model; ``MLLMScorerTrainer`` adds its budget term.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny_mllm import MLLM_FAMILIES, build_tiny_mllm, image_token_id, make_batch

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.export.artifact import load_artifact, save_artifact
from tokensift.reduce_mllm import GeneratedTokens
from tokensift.scorers.dynamic_llava import DynamicLLaVAConfig, DynamicLLaVAMethod
from tokensift.trainer import MLLMScorerTrainer
from tokensift.trainer.mllm_module import generated_budget_error

NEW_TOKENS = 6
LAYER = 2  # the eviction layer (the tiny LLMs have 4 decoder layers)
# sample -> the generated steps whose KV entries are dropped (step 0: the first generated token)
DROPS = {0: {0, 2}, 1: {1}, 2: {0, 1, 3, 4}}


class DropSet(DynamicLLaVAMethod):
    """``dynamic_llava`` whose output-text decisions are a fixed set of (sample, step) pairs: ``DROPS``."""

    drops = DROPS

    def dropped(self, tokens: GeneratedTokens) -> torch.Tensor:
        out = torch.zeros_like(tokens.candidates)
        for row, sample in enumerate(tokens.sample_index.tolist()):
            for column, step in enumerate(tokens.step[row].tolist()):
                out[row, column] = step in self.drops.get(sample, ())
        return out & tokens.candidates

    def generated_keep(self, tokens: GeneratedTokens) -> torch.Tensor:
        return tokens.candidates & ~self.dropped(tokens)

    def generated_keep_policy(self, tokens: GeneratedTokens) -> torch.Tensor:
        return (~self.dropped(tokens)).float()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {family: build_tiny_mllm(family) for family in MLLM_FAMILIES}


def method_for(model, cls=DynamicLLaVAMethod, **options) -> DynamicLLaVAMethod:
    torch.manual_seed(0)
    config = DynamicLLaVAConfig(**{"text_predictor": True, "text_layer": LAYER, **options})
    return cls.for_backbone(adapt(model), config).eval()


def generate(model, inputs: dict, family: str, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            suppress_tokens=[image_token_id(family)],
            return_dict_in_generate=True,
            **kwargs,
        )


def new_tokens(out, inputs: dict) -> torch.Tensor:
    return out.sequences[:, inputs["input_ids"].shape[1] :]


class MaskedReference:
    """Decoding that keeps every KV entry and masks the dropped generated ones out of layers >= ``layer``, through
    pre-hooks registered after any handle's (so on top of the masks it builds). ``decide(hidden, rows, step)`` gives
    the ``[B]`` keep decision of the token fed at generated ``step``; beam search's reordering of the cache reorders
    the decisions with it."""

    def __init__(self, model, layer: int, decide):
        self.adapter, self.layer, self.decide = adapt(model), layer, decide
        self.decisions: torch.Tensor | None = None  # [B, steps so far]
        self.step = -1  # -1: the prefill
        self.hooks = [self.adapter.language_model.register_forward_pre_hook(self.on_lm, with_kwargs=True)]
        for index, block in enumerate(self.adapter.layers):
            self.hooks.append(block.register_forward_pre_hook(self.on_layer(index), with_kwargs=True))

    def on_lm(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        self.step = -1 if cache is None or cache.get_seq_length() == 0 else self.step + 1
        if self.step == -1:
            self.decisions = None
            if cache is not None and "reorder_cache" not in vars(cache):
                original = cache.reorder_cache

                def reorder(beam_idx):
                    original(beam_idx)
                    if self.decisions is not None:
                        self.decisions = self.decisions.index_select(0, beam_idx)

                cache.reorder_cache = reorder

    def on_layer(self, index: int):
        def hook(module, args, kwargs):
            if self.step < 0:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == self.layer:
                keep = self.decide(hidden, self.step).reshape(-1, 1)
                self.decisions = keep if self.decisions is None else torch.cat([self.decisions, keep], dim=1)
            if index < self.layer or self.decisions is None:
                return None
            cache = kwargs["past_key_values"]
            kv = cache.layers[index].get_seq_length() + 1
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones(hidden.shape[0], 1, 1, kv, dtype=torch.bool)
            dropped = torch.zeros(hidden.shape[0], kv, dtype=torch.bool)
            earlier = ~self.decisions[:, : self.step]  # the current token always sees itself
            dropped[:, kv - 1 - self.step : kv - 1] = earlier
            blocked = dropped[:, None, None, :]
            if mask.dtype == torch.bool:
                mask = mask & ~blocked
            else:
                mask = mask.masked_fill(blocked, torch.finfo(mask.dtype).min)
            kwargs["attention_mask"] = mask
            return args, kwargs

        return hook

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def drop_set_decider(samples: list[int]):
    def decide(hidden, step):
        return torch.tensor([step not in DROPS.get(s, ()) for s in samples])

    return decide


# -- keeping every entry is plain decoding ------------------------------------------------------------------


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_a_predictor_that_keeps_everything_is_plain_generate(models, family):
    model, inputs = models[family], make_batch(family).inputs()
    method = method_for(model)
    last = method.output_text_predictor.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([10.0, -10.0]))  # keep logit 20 for every token
    plain = generate(model, inputs, family)
    with ts.apply(model, method, keep_ratio=1.0) as handle:
        out = generate(model, inputs, family)
        record = handle.last_generated_records[0]
    assert torch.equal(out.sequences, plain.sequences)
    assert bool(record.keep.all()) and record.keep.shape == (3, NEW_TOKENS - 1)
    # with visual pruning: exactly the vision predictor alone
    vision_only = DynamicLLaVAMethod(DynamicLLaVAConfig(**{**vars(method.config), "text_predictor": False}))
    vision_only.load_state_dict(method.state_dict(), strict=False)
    with ts.apply(model, vision_only.eval(), keep_ratio=0.5):
        expected = generate(model, inputs, family)
    with ts.apply(model, method, keep_ratio=0.5):
        assert torch.equal(generate(model, inputs, family).sequences, expected.sequences)


# -- dropping entries is masking them ---------------------------------------------------------------------


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_dropped_entries_decode_as_if_masked_and_each_sample_alone_as_in_the_batch(models, family):
    model, batch = models[family], make_batch(family)
    inputs = batch.inputs()
    reference = MaskedReference(model, LAYER, drop_set_decider([0, 1, 2]))
    try:
        expected = new_tokens(generate(model, inputs, family), inputs)
    finally:
        reference.remove()
    method = method_for(model, DropSet)
    with ts.apply(model, method, keep_ratio=1.0) as handle:
        handle.set_samples(torch.arange(3))
        together = new_tokens(generate(model, inputs, family), inputs)
        record = handle.last_generated_records[0]
        alone = []
        for i in range(batch.size):
            handle.set_samples(torch.tensor([i]))
            alone.append(new_tokens(generate(model, batch.sample(i), family), batch.sample(i))[0])
    assert torch.equal(together, expected)
    for i in range(batch.size):
        assert torch.equal(together[i], alone[i]), f"sample {i}"
    decided = NEW_TOKENS - 1  # the last generated token is never fed back
    assert record.num.tolist() == [decided] * 3
    assert record.kept.tolist() == [decided - len({s for s in DROPS[i] if s < decided}) for i in range(3)]
    plain = new_tokens(generate(model, inputs, family), inputs)
    assert not torch.equal(plain, together) or family == "qwen2_vl"  # the random Qwen2-VL may not notice


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_eviction_after_visual_pruning_at_an_earlier_layer(models, family):
    """Visual tokens pruned at llm.1 (its own layout from there), generated entries evicted from layer 2: the same
    tokens as the vision predictor alone with the dropped entries masked, alone or in the batch."""
    model, batch = models[family], make_batch(family)
    inputs = batch.inputs()
    method = method_for(model, DropSet, sites=["llm.1"])
    vision_only = DynamicLLaVAMethod(DynamicLLaVAConfig(**{**vars(method.config), "text_predictor": False}))
    vision_only.load_state_dict(method.state_dict(), strict=False)
    with ts.apply(model, vision_only.eval(), keep_ratio=0.5) as handle:
        reference = MaskedReference(model, LAYER, drop_set_decider([0, 1, 2]))
        try:
            expected = new_tokens(generate(model, inputs, family), inputs)
        finally:
            reference.remove()
    with ts.apply(model, method, keep_ratio=0.5) as handle:
        handle.set_samples(torch.arange(3))
        together = new_tokens(generate(model, inputs, family), inputs)
        for i in range(batch.size):
            handle.set_samples(torch.tensor([i]))
            alone = new_tokens(generate(model, batch.sample(i), family), batch.sample(i))[0]
            assert torch.equal(together[i], alone), f"sample {i}"
    assert torch.equal(together, expected)


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_beam_search_evicts_per_beam(models, family):
    """The real predictor (random, about half its decisions drops): each beam decides on its own tokens, and beam
    search's reordering moves the evicted slots with the beams, as the masked reference's decisions."""
    model, inputs = models[family], make_batch(family).inputs()
    method = method_for(model)

    def tokens(hidden):
        return GeneratedTokens(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool), None, None, (), LAYER)

    logits = []

    def keep_all(hidden, step):
        with torch.no_grad():
            logits.append(method.generated_keep_logits(tokens(hidden)))
        return torch.ones(hidden.shape[0], dtype=torch.bool)

    reference = MaskedReference(model, LAYER, keep_all)
    try:
        generate(model, inputs, family, num_beams=3)
    finally:
        reference.remove()
    with torch.no_grad():  # centre the untrained predictor's keep logits on these tokens: about half are dropped
        method.output_text_predictor.mlp[-1].bias[0] -= torch.cat(logits).median()

    def decide(hidden, step):
        with torch.no_grad():
            return method.generated_keep(tokens(hidden))[:, 0]

    reference = MaskedReference(model, LAYER, decide)
    try:
        expected = generate(model, inputs, family, num_beams=3)
        expected_decisions = reference.decisions
    finally:
        reference.remove()
    with ts.apply(model, method, keep_ratio=1.0) as handle:
        out = generate(model, inputs, family, num_beams=3)
        keep = handle.last_generated_records[0].keep
    assert torch.equal(out.sequences, expected.sequences)
    assert 0 < int(keep.sum()) < keep.numel()  # the predictor kept some and dropped some
    assert torch.equal(keep, expected_decisions)


# -- the cache really is shorter ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_the_cache_holds_only_the_kept_entries(models, family):
    model, inputs = models[family], make_batch(family).inputs()
    prompt = inputs["input_ids"].shape[1]
    plain = generate(model, inputs, family).past_key_values
    with ts.apply(model, method_for(model, DropSet), keep_ratio=1.0) as handle:
        handle.set_samples(torch.arange(3))
        cache = generate(model, inputs, family).past_key_values
    decided = NEW_TOKENS - 1
    kept = [decided - len({s for s in DROPS[i] if s < decided}) for i in range(3)]  # 3, 4, 1: padded to 4
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [prompt + decided] * LAYER + [prompt + max(kept)] * (len(lengths) - LAYER)
    assert [layer.keys.shape[2] for layer in plain.layers] == [prompt + decided] * len(lengths)
    for layer in cache.layers:
        assert layer.values.shape == layer.keys.shape and torch.isfinite(layer.keys).all()
    size = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    assert size < sum(layer.keys.numel() + layer.values.numel() for layer in plain.layers)

    class DropAll(DynamicLLaVAMethod):
        def generated_keep(self, tokens):
            return torch.zeros_like(tokens.candidates)

    with ts.apply(model, method_for(model, DropAll), keep_ratio=1.0):
        cache = generate(model, inputs, family).past_key_values
    assert [layer.keys.shape[2] for layer in cache.layers] == [prompt + decided] * LAYER + [prompt] * 2


# -- training: the answer's policy in mask mode --------------------------------------------------------------


def with_answer(model, batch, family: str, tokens: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The prompts followed by ``tokens`` ``[B, T]`` (teacher forcing) and the answer mask."""
    inputs = batch.inputs()
    answer = torch.zeros(3, inputs["input_ids"].shape[1] + tokens.shape[1], dtype=torch.bool)
    answer[:, -tokens.shape[1] :] = True
    inputs["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], dim=1)
    if family == "qwen2_vl":
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_token_id(family)).long()
    return inputs, answer


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_mask_mode_with_the_same_decisions_gives_the_decoding_logits(models, family):
    model, batch = models[family], make_batch(family)
    inputs = batch.inputs()
    method = method_for(model, DropSet)
    with ts.apply(model, method, keep_ratio=0.5) as handle:
        handle.set_samples(torch.arange(3))
        out = generate(model, inputs, family, output_logits=True)
    decoded = torch.stack(out.logits, dim=1)  # [B, NEW_TOKENS, V]
    generated = new_tokens(out, inputs)
    teacher, answer = with_answer(model, batch, family, generated[:, :-1])
    with ts.apply(model, method, keep_ratio=0.5, mode="mask") as handle:
        handle.set_samples(torch.arange(3))
        handle.conceal(answer)
        with torch.no_grad():
            logits = model(**teacher).logits[:, -NEW_TOKENS:]
        record = handle.last_generated_records[0]
    torch.testing.assert_close(logits, decoded, atol=2e-4, rtol=2e-4)
    assert record.num.tolist() == [NEW_TOKENS - 1] * 3
    assert record.policy.shape == answer.shape and bool((record.policy[~answer] == 1).all())


def test_mask_mode_trains_the_output_text_predictor(models):
    model, batch = models["llava"], make_batch("llava")
    teacher, answer = with_answer(model, batch, "llava", torch.randint(3, 50, (3, 5), generator=torch.Generator()))
    method = method_for(model, text_min_length=3).train()
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with ts.apply(model, method, keep_ratio=0.5, mode="mask") as handle:
            handle.set_samples(torch.arange(3), draw=(0, 1))
            handle.conceal(answer)
            logits = model(**teacher).logits
            record = handle.last_generated_records[0]
            error = generated_budget_error(handle.last_generated_records)
            (logits.float().pow(2).mean() + error).backward()
    finally:
        for p, flag in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
    policy = record.policy.detach()
    assert bool(((policy == 0) | (policy == 1)).all()) and bool((policy[~answer] == 1).all())
    assert record.num.tolist() == [5, 5, 5] and record.target.tolist() == [2.5] * 3
    assert 0 < float(record.kept.detach().sum()) < 15, "the untrained predictor keeps some answer tokens"
    for name, param in method.output_text_predictor.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if name.endswith("weight"):
            assert float(param.grad.abs().sum()) > 0, name


def test_training_noise_of_a_sample_does_not_depend_on_its_batch(models):
    model = models["llava"]
    method = method_for(model, text_min_length=1).train()
    hidden = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(0))
    candidates = torch.zeros(3, 7, dtype=torch.bool)
    candidates[:, 3:] = True
    step = (candidates.long().cumsum(1) - 1).masked_fill(~candidates, -1)
    full = method.generated_keep_policy(GeneratedTokens(hidden, candidates, step, torch.arange(3), (0, 4), LAYER))
    for i in range(3):
        alone = GeneratedTokens(hidden[i : i + 1], candidates[i : i + 1], step[i : i + 1], torch.tensor([i]), (0, 4), 2)
        assert torch.equal(method.generated_keep_policy(alone), full[i : i + 1])
    # short answers are kept whole: no decision, no budget error
    short = method_for(model).train()  # text_min_length 50
    kept = short.generated_keep_policy(GeneratedTokens(hidden, candidates, step, torch.arange(3), (0, 4), LAYER))
    assert bool((kept == 1).all())
    assert short.generated_keep_target(torch.tensor([4, 60])).tolist() == [4.0, 30.0]


def test_the_trainer_adds_the_text_budget_term(tmp_path):
    model = build_tiny_mllm("llava")
    model.save_pretrained(tmp_path / "tiny")
    L.seed_everything(0)
    module = MLLMScorerTrainer(
        str(tmp_path / "tiny"),
        method="dynamic_llava",
        method_options={"sites": ["llm.2"], "text_predictor": True, "text_min_length": 2},
        keep_ratio_range=(0.3, 0.5),
        eval_keep_ratios=[0.5],
        lr=3e-2,
        warmup_fraction=0.0,
    )
    batch_data = make_batch("llava")
    teacher, answer = with_answer(module.backbone, batch_data, "llava", torch.tensor([[5, 6, 7, 8]] * 3))
    batch = {**teacher, "labels": torch.where(answer, teacher["input_ids"], -100), "index": torch.arange(3)}
    before = {k: v.clone() for k, v in module.method.output_text_predictor.state_dict().items()}
    steps = 6
    trainer = L.Trainer(
        max_steps=steps,
        logger=L.pytorch.loggers.CSVLogger(tmp_path / "runs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=0,
    )
    trainer.fit(module, torch.utils.data.DataLoader([batch] * steps, batch_size=None))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        values = [float(row["train/text_budget"]) for row in csv.DictReader(f) if row.get("train/text_budget")]
    assert len(values) == steps and all(math.isfinite(v) for v in values)
    after = module.method.output_text_predictor.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before), "the output-text predictor trained"
    assert module.method.has_unused_parameters


# -- configuration and artifacts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [({"text_keep_ratio": 0.0}, "text_keep_ratio"), ({"text_min_length": 0}, "text_min_length"),
     ({"text_layer": 0}, "text_layer"), ({"text_predictor": "yes"}, "text_predictor")],
)  # fmt: skip
def test_bad_text_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        DynamicLLaVAConfig.from_dict(options)


def test_text_layer_defaults_to_the_site_and_must_fit_the_model(models):
    adapter = adapt(models["llava"])
    method = DynamicLLaVAMethod.for_backbone(adapter, DynamicLLaVAConfig(text_predictor=True, layer=1))
    assert method.kv_eviction_layer == 1 and method.config.text_layer == 1
    assert DynamicLLaVAMethod.for_backbone(adapter).kv_eviction_layer is None
    with pytest.raises(ValueError, match="text_layer"):
        DynamicLLaVAMethod.for_backbone(adapter, DynamicLLaVAConfig(text_predictor=True, text_layer=4))


def test_multi_token_decoding_steps_are_refused(models):
    model, inputs = models["llava"], make_batch("llava").inputs()
    with ts.apply(model, method_for(model), keep_ratio=1.0), torch.no_grad():
        out = model(**inputs, use_cache=True)
        more = {"input_ids": torch.full((3, 2), 5), "past_key_values": out.past_key_values}
        more["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(3, 2, dtype=torch.long)], dim=1)
        with pytest.raises(ValueError, match="one token per"):
            model(**more)


def test_artifact_round_trip_keeps_the_output_text_predictor(models, tmp_path):
    model, inputs = models["llava"], make_batch("llava").inputs()
    method = method_for(model)
    save_artifact(method, adapt(model).fingerprint(), tmp_path / "artifact", default_budget={"keep_ratio": 0.5})
    loaded = load_artifact(tmp_path / "artifact")
    assert loaded.method.config == method.config and loaded.method.kv_eviction_layer == LAYER
    with ts.apply(model, method, keep_ratio=0.5) as handle:
        expected = generate(model, inputs, "llava").sequences
        kept = handle.last_generated_records[0].keep
    with ts.apply(model, tmp_path / "artifact") as handle:
        assert torch.equal(generate(model, inputs, "llava").sequences, expected)
        assert torch.equal(handle.last_generated_records[0].keep, kept)
