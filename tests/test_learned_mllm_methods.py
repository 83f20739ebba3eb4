"""Learned visual-token scorers for multimodal LLMs: ``question_selector``, ``dynamic_llava``, ``atp``, table-driven.

On a synthetic multimodal ``TokenState`` (mixed per-sample visual counts, text around the images, left padding):
the training policy's shape and values, exact per-sample counts for top-k, gradients reaching every scorer
parameter, text never dropped, per-sample noise independent of the batch. On the tiny LLaVA / Qwen2-VL of
``tiny_mllm``: an untrained method through ``ts.apply`` and ``generate()`` with left padding (a batch computes
what its samples compute alone), mask mode with gradients through the frozen model, an artifact round trip, the
question selector's FLOPs against the prefill's. Also ``straight_through_top_k`` against DynamicViT's formula.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from tiny_mllm import MLLM_FAMILIES, build_tiny_mllm, image_token_id, make_batch, visual_counts

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.export.artifact import load_artifact, save_artifact
from tokensift.flops import mllm_prefill_flops
from tokensift.scorers.atp import ATPConfig, ATPMethod
from tokensift.scorers.cacovid import CaCoVIDConfig, CaCoVIDMethod
from tokensift.scorers.dynamic_llava import DynamicLLaVAConfig, DynamicLLaVAMethod
from tokensift.scorers.learned import binary_gumbel, straight_through_top_k
from tokensift.scorers.question_selector import QuestionSelectorConfig, QuestionSelectorMethod
from tokensift.scorers.stts import STTSConfig  # vit.<i> on video: its own tests in test_stts.py
from tokensift.state import TokenState

D = 32
# name -> (build with hidden size D, the site of the synthetic state)
METHODS = {
    "question_selector": (lambda: QuestionSelectorMethod(QuestionSelectorConfig(hidden_size=D)), "pre_llm"),
    "dynamic_llava": (lambda: DynamicLLaVAMethod(DynamicLLaVAConfig(hidden_size=D, sites=["llm.2"])), "llm.2"),
    "dynamic_llava_threshold": (
        lambda: DynamicLLaVAMethod(DynamicLLaVAConfig(hidden_size=D, sites=["llm.2"], selection="threshold")),
        "llm.2",
    ),
    "atp": (lambda: ATPMethod(ATPConfig(hidden_size=D, sites=["llm.2"])), "llm.2"),
}
EXACT_COUNT = ("question_selector", "dynamic_llava")
SOFT = ("question_selector",)  # trains with soft_top_k: the budget's count holds in sum
# per sample: (text tokens before the image, visual tokens, text after); sample 2 has no visual tokens
LAYOUT = [(3, 5, 2), (1, 12, 3), (4, 0, 2), (2, 9, 1)]
NEW_TOKENS = 3


def build(name: str):
    torch.manual_seed(0)
    make, site = METHODS[name]
    return make(), site


def sample_rows(layout=LAYOUT, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample its hidden states ``[L, D]`` and kinds ``[L]`` (0 text, 1 image), unpadded."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for before, visual, after in layout:
        kinds = torch.tensor([0] * before + [1] * visual + [0] * after)
        rows.append((torch.randn(len(kinds), D, generator=generator) * 2, kinds))
    return rows


def make_state(rows, site: str, indices: list[int] | None = None, keep_ratio: float = 0.5) -> TokenState:
    """A left-padded multimodal state of the samples at ``indices`` (their sample_index is their position in rows)."""
    indices = list(range(len(rows))) if indices is None else indices
    chosen = [rows[i] for i in indices]
    b, n = len(chosen), max(len(k) for _, k in chosen)
    hidden = torch.zeros(b, n, D)
    kind = torch.zeros(b, n, dtype=torch.long)
    valid = torch.zeros(b, n, dtype=torch.bool)
    key = torch.full((b, n), -1, dtype=torch.long)
    for r, (h, k) in enumerate(chosen):
        length = len(k)
        hidden[r, n - length :], kind[r, n - length :], valid[r, n - length :] = h, k, True
        key[r, n - length :] = torch.arange(length)
    text = valid & (kind == 0)
    visual = (valid & (kind != 0)).sum(1)
    counts = num_keep_for(visual, keep_ratio)
    weights = text.float().unsqueeze(-1)
    return TokenState(
        hidden=hidden,
        protected=text,
        orig_index=torch.arange(n).expand(b, n),
        size=torch.ones(b, n),
        grid=(0, 0),
        num_prefix=0,
        site=site,
        layer=-1 if site == "pre_llm" else int(site.split(".")[1]),
        keep_target=counts.float() / visual.clamp(min=1).float(),
        valid=valid,
        kind=kind,
        text_mean=(hidden * weights).sum(1) / weights.sum(1).clamp(min=1),
        text_last=hidden[:, -1],
        sample_index=torch.tensor(indices),
        draw=(0, 5),
        token_key=key,
    )


def num_keep_for(visual: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    return torch.ceil(visual.float() * keep_ratio - 1e-6).long()


def visual_mask(state: TokenState) -> torch.Tensor:
    return state.valid & (state.kind != 0)


# -- the training policy on a synthetic state ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_policy_shape_values_text_and_counts(name):
    method, site = build(name)
    state = make_state(sample_rows(), site)
    num_keep = num_keep_for(visual_mask(state).sum(1), 0.5)
    policy = method.train().keep_policy(state, num_keep)
    assert policy.shape == state.valid.shape and policy.dtype.is_floating_point
    assert torch.isfinite(policy).all()
    if name in SOFT:
        assert bool(((policy >= 0) & (policy <= 1)).all())  # a soft decision, the count kept in sum
    else:
        assert bool(((policy == 0) | (policy == 1)).all())  # a hard decision in the forward pass
    assert bool((policy[state.protected] == 1).all())  # text and specials never dropped
    kept = (policy * visual_mask(state)).sum(1)
    assert float(kept[2].detach()) == 0  # the sample without visual tokens
    if name in EXACT_COUNT:
        torch.testing.assert_close(kept, num_keep.float(), atol=1e-3, rtol=0)
    kept = kept.round().long()
    if name == "atp":
        assert bool((kept[visual_mask(state).any(1)] >= 1).all())
        assert method.kept_counts[site].tolist() == kept.tolist()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_inference_select_keeps_text_and_the_budget(name):
    method, site = build(name)
    state = make_state(sample_rows(), site)
    num_keep = num_keep_for(visual_mask(state).sum(1), 0.5)
    with torch.no_grad():
        keep = method.eval().select(state, num_keep)
    assert keep.dtype == torch.bool and keep.shape == state.valid.shape
    assert bool(keep[state.protected].all())
    assert not bool(keep[~state.valid].any())
    kept = (keep & visual_mask(state)).sum(1)
    if name == "atp":
        margins = method.margins(state)
        rule = visual_mask(state) & (margins > 0)
        assert bool((keep & visual_mask(state))[rule].all())  # everything above the threshold is kept
        assert bool((kept[visual_mask(state).any(1)] >= 1).all()) and int(kept[2]) == 0
        assert method.kept_counts[site].tolist() == kept.tolist()
        assert method.visual_counts[site].tolist() == visual_mask(state).sum(1).tolist()
        # num_keep is not a count for atp: the budget reaches it only as the keep target
        assert torch.equal(method.select(state, torch.zeros_like(num_keep)), keep)
    else:
        assert kept.tolist() == num_keep.tolist()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_gradients_reach_every_scorer_parameter(name):
    method, site = build(name)
    state = make_state(sample_rows(), site)
    num_keep = num_keep_for(visual_mask(state).sum(1), 0.5)
    policy = method.train().keep_policy(state, num_keep)
    weights = torch.randn(policy.shape, generator=torch.Generator().manual_seed(3))
    (policy * weights).sum().backward()
    for param_name, param in method.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        assert float(param.grad.abs().sum()) > 0, param_name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_noise_and_decision_of_a_sample_do_not_depend_on_its_batch(name):
    method, site = build(name)
    method.train()
    rows = sample_rows()
    full = make_state(rows, site)
    policy = method.keep_policy(full, num_keep_for(visual_mask(full).sum(1), 0.5)).detach()
    for subset in ([1, 3], [3], [0, 2], [1]):
        part = make_state(rows, site, subset)
        sub = method.keep_policy(part, num_keep_for(visual_mask(part).sum(1), 0.5)).detach()
        for r, i in enumerate(subset):
            if name in SOFT:  # no noise; the scorer's batched matmuls may round differently in another batch
                torch.testing.assert_close(sub[r][part.valid[r]], policy[i][full.valid[i]], atol=1e-5, rtol=0)
            else:
                assert torch.equal(sub[r][part.valid[r]], policy[i][full.valid[i]]), (subset, i)
    # another draw (the next training step) is another decision for the noisy methods
    if name != "atp" and name not in SOFT:
        other = method.keep_policy(replace(full, draw=(0, 6)), num_keep_for(visual_mask(full).sum(1), 0.5))
        assert not torch.equal(other.detach(), policy)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_batch_without_visual_tokens_keeps_its_text(name):
    method, site = build(name)
    state = make_state(sample_rows([(3, 0, 2), (1, 0, 4)]), site)
    none = torch.zeros(2, dtype=torch.long)
    assert torch.equal(method.train().keep_policy(state, none), state.protected.float())
    assert torch.equal(method.eval().select(state, none), state.protected)


def test_dynamic_llava_anneals_its_temperature():
    method, _ = build("dynamic_llava")
    assert method.tau == pytest.approx(1.0)
    method.set_progress(1.0)
    assert method.tau == pytest.approx(0.1)
    method.set_progress(0.5)
    assert method.tau == pytest.approx(math.sqrt(0.1))
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="fraction"):
            method.set_progress(bad)
    assert method.config.budget_weight == 100.0 and method.keeps_budget_count
    threshold, _ = build("dynamic_llava_threshold")
    assert not threshold.keeps_budget_count


def test_atp_keeps_its_own_count_per_sample():
    method, site = build("atp")
    assert not method.keeps_budget_count and method.config.budget_weight > 0
    state = make_state(sample_rows(), site)
    with torch.no_grad():
        method.eval().select(state, num_keep_for(visual_mask(state).sum(1), 0.5))
    fractions = method.kept_fractions[site]
    assert fractions.shape == (4,) and bool(((fractions >= 0) & (fractions <= 1)).all())
    assert method.thresholds[site].shape == (4,)


# -- straight_through_top_k -----------------------------------------------------------------------------


def dynamicvit_topk(logits, prunable, uniform, num_keep: int, tau: float):
    """DynamicViT's ``keep_policy`` (``selection="topk"``) at commit 767bca5, equal counts, before ``protected``."""
    logits = logits - (logits * prunable).sum(1, keepdim=True) / prunable.sum(1, keepdim=True).clamp_min(1.0)
    u = uniform.clamp(1e-6, 1 - 1e-6)
    perturbed = logits + (u.log() - (-u).log1p())
    ranked = perturbed.masked_fill(~prunable, float("-inf")).sort(dim=1, descending=True).values
    low = ranked[:, num_keep].clamp_min(ranked[:, num_keep - 1] - 1.0) if num_keep < ranked.shape[1] else None
    threshold = (ranked[:, num_keep - 1] + low) / 2 if low is not None else ranked[:, -1] - 1.0
    soft = torch.sigmoid((perturbed - threshold.detach().unsqueeze(1)) / tau)
    return (soft > 0.5).to(soft.dtype) - soft.detach() + soft


@pytest.mark.parametrize(("width", "num_keep", "protected"), [(10, 3, 1), (10, 9, 1), (10, 10, 0), (16, 1, 2)])
def test_straight_through_top_k_is_dynamicvit_for_equal_counts(width, num_keep, protected):
    generator = torch.Generator().manual_seed(width + num_keep)
    logits = torch.randn(5, width, generator=generator).requires_grad_()
    uniform = torch.rand(5, width, generator=generator)
    candidates = torch.ones(5, width, dtype=torch.bool)
    candidates[:, :protected] = False
    reference = dynamicvit_topk(logits, candidates, uniform, num_keep, 0.7)
    ours = straight_through_top_k(logits, candidates, torch.full((5,), num_keep), uniform, 0.7)
    assert torch.equal(ours, reference * candidates)
    weights = torch.randn(5, width, generator=generator)
    (grad_ref,) = torch.autograd.grad((reference * candidates * weights).sum(), logits)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    assert torch.equal(grad_ours, grad_ref)


def test_straight_through_top_k_per_sample_counts_and_edges():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 8, generator=generator).requires_grad_()
    uniform = torch.rand(5, 8, generator=generator)
    candidates = torch.ones(5, 8, dtype=torch.bool)
    candidates[1, 5:] = False  # 5 candidates, asks for 7: keeps all 5
    candidates[3] = False  # no candidates
    num_keep = torch.tensor([0, 7, 3, 2, 8])
    out = straight_through_top_k(logits, candidates, num_keep, uniform, 1.0)
    assert out.sum(1).tolist() == [0, 5, 3, 0, 8]
    assert not bool(out[~candidates].any())
    # centred logits: a shift of a row's logits changes nothing, and its gradient sums to zero per row
    shifted = straight_through_top_k(logits + 5.0, candidates, num_keep, uniform, 1.0)
    assert torch.allclose(shifted, out)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert torch.allclose((grad * candidates).sum(1), torch.zeros(5), atol=1e-6)
    assert torch.isfinite(grad).all()


def test_binary_gumbel_keep_rate_is_the_sigmoid():
    logits = torch.tensor([2.0, 0.0, -1.0]).expand(40000, 3)
    rate = binary_gumbel(logits, torch.rand(40000, 3, generator=torch.Generator().manual_seed(0)), 0.5).mean(0)
    assert torch.allclose(rate, torch.sigmoid(logits[0]), atol=0.01)


# -- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_class", "options", "field"),
    [
        (QuestionSelectorConfig, {"width": 0}, "width"),
        (QuestionSelectorConfig, {"tau_end": -1.0}, "tau_end"),
        (QuestionSelectorConfig, {"relaxation": "hard"}, "relaxation"),
        (QuestionSelectorConfig, {"sites": ["llm.2"]}, "sites"),
        (DynamicLLaVAConfig, {"selection": "best"}, "selection"),
        (DynamicLLaVAConfig, {"tau_end": 0}, "tau_end"),
        (DynamicLLaVAConfig, {"width": 20}, "width"),
        (DynamicLLaVAConfig, {"num_blocks": 0}, "num_blocks"),
        (DynamicLLaVAConfig, {"sites": ["pre_llm"]}, "sites"),
        (DynamicLLaVAConfig, {"budget_weight": -1.0}, "budget_weight"),
        (ATPConfig, {"min_keep": -1}, "min_keep"),
        (ATPConfig, {"tau": "warm"}, "tau"),
        (ATPConfig, {"sites": ["llm.3", "llm.1"]}, "sites"),
        (STTSConfig, {"sites": ["vit.1", "vit.3"]}, "sites"),
        (STTSConfig, {"rescale_scope": "video"}, "rescale_scope"),
        (STTSConfig, {"aux_weight": -0.5}, "aux_weight"),
        (CaCoVIDConfig, {"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
        (CaCoVIDConfig, {"sites": ["llm.1"]}, "sites"),
    ],
)
def test_bad_config_names_the_field(config_class, options, field):
    with pytest.raises(ValueError, match=field):
        config_class.from_dict(options)


def test_config_fields_document_themselves():
    for config_class in (QuestionSelectorConfig, DynamicLLaVAConfig, ATPConfig, STTSConfig, CaCoVIDConfig):
        for f in config_class.__dataclass_fields__.values():
            if f.name != "sites":
                assert f.metadata.get("help"), f"{config_class.__name__}.{f.name}"


# -- on the tiny multimodal LLMs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, torch.nn.Module]:
    return {family: build_tiny_mllm(family) for family in MLLM_FAMILIES}


def for_model(name: str, model) -> object:
    torch.manual_seed(0)
    cls = {
        "question_selector": QuestionSelectorMethod,
        "dynamic_llava": DynamicLLaVAMethod,
        "atp": ATPMethod,
        "cacovid": CaCoVIDMethod,  # trained by reward (GRPOTrainer): inference paths only here, tests/test_cacovid.py
    }[name]
    return cls.for_backbone(adapt(model))


@pytest.mark.parametrize("name", ["question_selector", "dynamic_llava", "atp", "cacovid"])
def test_for_backbone_leaves_the_callers_config_as_given(tiny_models, name):
    cls = for_model(name, tiny_models["llava"]).__class__
    given = cls.config_class()
    method = cls.for_backbone(adapt(tiny_models["llava"]), given)
    assert given == cls.config_class() and method.config is not given and method.config.hidden_size is not None


def generate(model, inputs: dict, family: str) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=[image_token_id(family)]
        )
    return out[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("family", MLLM_FAMILIES)
@pytest.mark.parametrize("name", ["question_selector", "dynamic_llava", "atp", "cacovid"])
def test_apply_and_generate_with_left_padding(tiny_models, family, name):
    model, batch = tiny_models[family], make_batch(family)
    method = for_model(name, model)
    with ts.apply(model, method, keep_ratio=0.5) as handle:
        together = generate(model, batch.inputs(), family)
        visual = handle.visual_tokens_per_layer.clone()
        kept = {site: count.clone() for site, count in getattr(method, "kept_counts", {}).items()}
        alone = [generate(model, batch.sample(i), family) for i in range(batch.size)]
    assert together.shape == (batch.size, NEW_TOKENS)
    for i in range(batch.size):
        assert torch.equal(together[i], alone[i][0]), f"sample {i}"
    counts = torch.tensor(visual_counts(batch))
    layer = 0 if method.config.sites == ["pre_llm"] else int(method.config.sites[0].split(".")[1])
    assert visual[:, :layer].eq(counts.unsqueeze(1)).all()
    if name == "atp":  # its own count per sample, at least one, recorded for a bench
        last = kept[method.config.sites[-1]]
        assert last.tolist() == visual[:, -1].tolist() and bool((last >= 1).all())
    else:
        assert visual[:, layer].tolist() == num_keep_for(counts, 0.5).tolist()


@pytest.mark.parametrize("family", MLLM_FAMILIES)
@pytest.mark.parametrize("name", ["question_selector", "dynamic_llava", "atp"])
def test_mask_mode_trains_through_the_frozen_model(tiny_models, family, name):
    model, batch = tiny_models[family], make_batch(family)
    method = for_model(name, model).train()
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with ts.apply(model, method, keep_ratio=0.5, mode="mask"):
            model(**batch.inputs()).logits.float().pow(2).mean().backward()
    finally:
        for p, flag in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
    assert all(p.grad is not None for p in method.parameters())
    # every weight learns; a logit's final bias may not: top-k of centred logits is blind to it (exactly 0)
    assert all(float(p.grad.abs().sum()) > 0 for n, p in method.named_parameters() if n.endswith("weight"))


@pytest.mark.parametrize("name", ["question_selector", "dynamic_llava", "atp", "cacovid"])
def test_artifact_round_trip(tiny_models, tmp_path, name):
    model, batch = tiny_models["llava"], make_batch("llava")
    method = for_model(name, model)
    save_artifact(method, adapt(model).fingerprint(), tmp_path / name, default_budget={"keep_ratio": 0.5})
    loaded = load_artifact(tmp_path / name)
    assert loaded.method.config == method.config
    with ts.apply(model, method, keep_ratio=0.5):
        expected = generate(model, batch.inputs(), "llava")
    with ts.apply(model, tmp_path / name):  # the artifact's default budget
        assert torch.equal(generate(model, batch.inputs(), "llava"), expected)


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_question_selector_costs_under_two_percent_of_the_prefill(tiny_models, family):
    model, batch = tiny_models[family], make_batch(family)
    adapter = adapt(model)
    method = for_model("question_selector", model)
    counts = torch.tensor(visual_counts(batch))
    num_text = torch.tensor([len(row) for row in batch.rows]) - counts
    kept = num_keep_for(counts, 0.5)
    flops = mllm_prefill_flops(adapter, num_text, kept.unsqueeze(1).expand(-1, adapter.num_layers), method, counts)
    assert 0 < flops["scorer"] <= 0.02 * flops["unpruned"], flops["scorer"] / flops["unpruned"]
    # the formula counts what the scorer computes: its linears per token at least
    linears = sum(2 * m.in_features * m.out_features for m in method.modules() if isinstance(m, torch.nn.Linear))
    assert flops["scorer"] > linears


def test_dynamic_llava_predictor_sees_only_its_own_sample():
    """Masked attention over each sample's visual tokens: padding and other samples change no logit."""
    method, site = build("dynamic_llava")
    rows = sample_rows()
    full = make_state(rows, site)
    with torch.no_grad():
        logits = method.score(full)
        for i in range(len(rows)):
            alone = method.score(make_state(rows, site, [i]))
            assert torch.allclose(alone[0][make_state(rows, site, [i]).valid[0]], logits[i][full.valid[i]], atol=1e-5)


def test_untrained_question_selector_reads_the_question():
    """The same image with another question gets other scores (cross-attention to the text)."""
    method, site = build("question_selector")
    rows = sample_rows([(3, 6, 2), (3, 6, 2)])
    image = rows[0][0][3:9]
    rows[1][0][3:9] = image
    state = make_state(rows, site)
    with torch.no_grad():
        scores = method.score(state)
    visual = visual_mask(state)
    assert not torch.allclose(scores[0][visual[0]], scores[1][visual[1]])
    assert F.mse_loss(scores[0][visual[0]], scores[1][visual[1]]) > 0
