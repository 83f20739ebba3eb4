"""DyVTE exit routers on tiny random-init LLaVA and Qwen2-VL: labels, training, inference, export, FLOPs.

Checks: the exit-label rule on hand-made logits (shift, agreement, loss factor); a few training steps on
a batch whose labels depend on the text move the router and lower its loss; threshold 1 is the unpruned
model exactly and threshold 0 is every sample's visual tokens removed at the first router layer; in a
mixed batch each sample exits at the first layer its router says so and computes what it computes alone;
export -> load -> apply; the analytic FLOPs by hand; bad configuration names its field.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny_mllm import (
    BOS,
    LLAVA_IMAGE_TOKEN,
    LLAVA_PATCHES,
    MLLM_FAMILIES,
    PAD,
    build_tiny_mllm,
    image_token_id,
    make_batch,
    visual_counts,
)
from transformers import AutoModelForImageTextToText

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.cli import TokensiftCLI, main
from tokensift.flops import (
    decoder_layer_shapes,
    exit_visual_per_layer,
    last_prefill_flops,
    mllm_prefill_flops,
)
from tokensift.scorers.base import TokenMethod
from tokensift.scorers.dyvte import DyVTEConfig, DyVTEMethod
from tokensift.trainer import ExitRouterTrainer, exit_labels

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 3
NUM_LAYERS = 4  # tiny_mllm's decoder depth: router sites llm.1 .. llm.3


@pytest.fixture(scope="module")
def saved_mllms(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for family in MLLM_FAMILIES:
        path = tmp_path_factory.mktemp(f"dyvte_{family}")
        build_tiny_mllm(family).save_pretrained(path)
        paths[family] = str(path)
    return paths


def load(saved_mllms, family: str) -> torch.nn.Module:
    return AutoModelForImageTextToText.from_pretrained(saved_mllms[family], local_files_only=True).eval()


def routers(model, seed: int = 0, **options) -> DyVTEMethod:
    torch.manual_seed(seed)
    return DyVTEMethod.for_backbone(adapt(model), DyVTEConfig(router_width=16, **options)).eval()


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs: dict):
    """Greedy continuation with its per-step logits; the image placeholder is suppressed."""
    family = "llava" if model.config.model_type == "llava" else "qwen2_vl"
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            suppress_tokens=[image_token_id(family)],
            return_dict_in_generate=True,
            output_logits=True,
        )


def continuation(result, inputs: dict) -> torch.Tensor:
    return result.sequences[:, inputs["input_ids"].shape[1] :]


class DropVisualAt(TokenMethod):
    """Reference: every sample's visual tokens leave at this method's one site (a keep count of 0)."""

    name = "drop_visual_at"
    site_kinds = ("llm",)

    def select(self, state, num_keep):
        return state.alive & state.protected


class RecordingDyVTE(DyVTEMethod):
    """DyVTE that keeps each router layer's exit logits of the last prefill."""

    def score(self, state):
        exit_logit = super().score(state)
        self.seen[state.layer] = exit_logit
        return exit_logit


# -- the label rule ----------------------------------------------------------------------------------------


def _answer_logit(loss: float) -> float:
    """Logit ``a`` of the answer in ``[a, 0, 0, 0]`` whose cross-entropy is ``loss``: log(1 + 3 e^-a) = loss."""
    return -math.log((math.exp(loss) - 1) / 3)


def test_exit_label_rule_on_hand_made_logits():
    vocab, length = 4, 4
    full = torch.zeros(6, length, vocab)
    exited = torch.zeros(6, length, vocab)
    labels = torch.full((6, length), -100)
    # the answer (token 0) sits at the last position and is predicted at position length-2
    labels[:, -1] = 0
    full[:, -2, 0] = _answer_logit(1.0)
    exited[:, -2, 0] = _answer_logit(1.0)  # sample 0: identical -> exit
    exited[1, -2, 0] = _answer_logit(1.02)  # within 1.03x the full loss -> exit
    exited[2, -2, 0] = _answer_logit(1.05)  # worse than 1.03x -> stay
    exited[3, -2, 0], exited[3, -2, 2] = 0.0, 5.0  # another argmax (and a far higher loss) -> stay
    exited[4, -1] = torch.tensor([0.0, 0.0, 9.0, 0.0])  # what the last position predicts is no answer's: ignored
    labels[5] = -100  # no answer token: no label
    result = exit_labels(full, exited, labels)
    assert result["exit"].tolist() == [True, True, False, False, True, False]
    assert result["scored"].tolist() == [True] * 5 + [False]
    torch.testing.assert_close(result["full_loss"][:5], torch.ones(5))
    torch.testing.assert_close(result["exit_loss"][1], torch.tensor(1.02))
    # sample 2 exits once the loss factor allows 5 % more; sample 3's argmax never agrees
    looser = exit_labels(full, exited, labels, loss_factor=1.06)["exit"]
    assert looser.tolist() == [True, True, True, False, True, False]


def test_exit_label_needs_the_agreement_fraction():
    # two answer tokens; the exited pass gets the second one's argmax wrong: agreement 1/2
    full = torch.zeros(1, 4, 3)
    full[0, 1, 0] = full[0, 2, 1] = 4.0
    exited = full.clone()
    exited[0, 2] = torch.tensor([0.0, 4.0, 4.5])
    labels = torch.tensor([[-100, -100, 0, 1]])
    strict = exit_labels(full, exited, labels, loss_factor=100.0)
    assert strict["agreement"].tolist() == [0.5] and strict["exit"].tolist() == [False]
    assert exit_labels(full, exited, labels, agreement_threshold=0.5, loss_factor=100.0)["exit"].tolist() == [True]


# -- training ----------------------------------------------------------------------------------------------


def _llava_batch(rows: list[list[int]], pixels: list[torch.Tensor]) -> dict:
    length = max(len(r) for r in rows)
    batch = dict(
        input_ids=torch.tensor([[PAD] * (length - len(r)) + r for r in rows]),
        attention_mask=torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows]),
    )
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    return batch


def text_dependent_batch(module: ExitRouterTrainer, layer: int) -> tuple[dict, torch.Tensor]:
    """A batch whose exit labels at ``layer`` are "exit" exactly for the prompts without an image.

    The answer is what the unpruned model predicts, so a sample without visual tokens always exits; of the
    samples with an image, those whose answer the exit at ``layer`` changes are kept.
    """
    generator = torch.Generator().manual_seed(2)
    rows, pixels, has_image = [], [], []
    for i in range(12):
        words = torch.randint(3, 50, (4,), generator=generator).tolist()
        if i % 2 == 0:
            rows.append([BOS, *[LLAVA_IMAGE_TOKEN] * LLAVA_PATCHES, *words])
            pixels.append(torch.randn(3, 16, 16, generator=generator))
        else:
            rows.append([BOS, *words, 5, 6])
        has_image.append(i % 2 == 0)

    def labelled(keep: list[int]) -> tuple[dict, torch.Tensor]:
        image_rows = [i for i in keep if has_image[i]]
        batch = _llava_batch([rows[i] for i in keep], [pixels[image_rows.index(i)] for i in image_rows])
        inputs = module.model_inputs(batch)
        full = module._forward(inputs, exit_layer=None)
        batch["labels"] = torch.full_like(batch["input_ids"], -100)
        batch["labels"][:, -1] = full[:, -2].argmax(-1)
        exited, _ = module._forward_exiting(inputs, layer)
        return batch, exit_labels(full, exited, batch["labels"])["exit"]

    every = list(range(len(rows)))
    _, exits = labelled(every)
    keep = [i for i in every if not has_image[i] or not exits[i]]
    batch, exits = labelled(keep)
    assert sum(has_image[i] for i in keep) >= 2, "the construction needs image samples whose answer the exit changes"
    assert exits.tolist() == [not has_image[i] for i in keep]
    return batch, exits


@pytest.fixture(scope="module")
def trained(saved_mllms, tmp_path_factory):
    """A few steps on one repeated batch whose labels depend on the text (one router, at llm.1)."""
    root = tmp_path_factory.mktemp("dyvte_fit")
    L.seed_everything(0)
    module = ExitRouterTrainer(saved_mllms["llava"], method_options={"router_width": 32, "sites": ["llm.1"]}, lr=1e-2)
    batch, exits = text_dependent_batch(module, layer=1)
    before = {k: v.clone() for k, v in module.method.state_dict().items()}
    loader = torch.utils.data.DataLoader([batch] * 24, batch_size=None)
    trainer = L.Trainer(
        max_steps=24,
        logger=L.pytorch.loggers.CSVLogger(root / "runs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=1,
    )
    trainer.fit(module, loader, torch.utils.data.DataLoader([batch], batch_size=None))
    checkpoint = root / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    return {"module": module, "trainer": trainer, "batch": batch, "exits": exits, "before": before, "ckpt": checkpoint}


def logged(trainer, column: str) -> list[float]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


def test_training_moves_the_router_and_lowers_its_loss(trained):
    module, trainer = trained["module"], trained["trainer"]
    after = module.method.state_dict()
    changed = [k for k in after if not torch.equal(after[k], trained["before"][k])]
    assert changed and set(changed) == set(after)
    losses = logged(trainer, "train/loss")
    assert len(losses) == 24 and losses[-1] < 0.2 * losses[0]
    assert logged(trainer, "train/exit_label_rate")[-1] == pytest.approx(trained["exits"].float().mean().item())
    assert logged(trainer, "train/router_acc")[-1] == 1.0
    # validation: the router now predicts every label; at threshold 0.5 the image samples keep their tokens
    # (the samples without visual tokens have nothing to exit and do not count in the mean exit layer)
    assert logged(trainer, "val/acc")[-1] == 1.0
    assert logged(trainer, "val/agreement_t0_5")[-1] == 1.0
    assert logged(trainer, "val/exit_layer_t0_5")[-1] == NUM_LAYERS
    assert not module.backbone.training and not any(p.requires_grad for p in module.backbone.parameters())


def test_test_stage_reports_what_validation_reports(trained):
    """`tokensift test` on the routers: the validation metrics, under test/, on the same batch and weights."""
    module, batch = trained["module"], trained["batch"]
    tester = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    (results,) = tester.test(module, torch.utils.data.DataLoader([batch], batch_size=None), verbose=False)
    for name in ("acc", "exit_label_rate", "answer_acc_full", "agreement_t0_5", "exit_layer_t0_5", "flops_ratio_t0_5"):
        assert results[f"test/{name}"] == pytest.approx(logged(trained["trainer"], f"val/{name}")[-1]), name


def test_export_load_apply_round_trip(trained, saved_mllms, tmp_path):
    out = tmp_path / "artifact"
    main(["export", str(trained["ckpt"]), str(out)])
    artifact = ts.load(out)
    assert artifact.manifest["method"] == "dyvte" and artifact.manifest["kind"] == "learned"
    assert artifact.default_budget == {"threshold": 0.5}
    assert artifact.manifest["trained_layers"] == [1] and artifact.manifest["sites"] == ["llm.1"]
    module = trained["module"]
    assert artifact.manifest["backbone"] == module.backbone_fingerprint
    for name, value in module.method.state_dict().items():
        assert torch.equal(artifact.method.state_dict()[name], value)
    model, batch = load(saved_mllms, "llava"), trained["batch"]
    inputs = {k: v for k, v in module.model_inputs(batch).items()}
    with ts.apply(model, f"dyvte:{out}") as handle:  # the artifact's default threshold
        from_disk = logits(model, inputs)
        exit_layers = handle.exit_layers
    # the image prompts keep their visual tokens to the end; the others had none (exit layer 0)
    assert exit_layers.tolist() == [0 if exits else NUM_LAYERS for exits in trained["exits"].tolist()]
    with ts.apply(model, copy.deepcopy(module.method), threshold=0.5):
        assert torch.equal(logits(model, inputs), from_disk)
    # the budget knob on export: a threshold, never a keep ratio
    main(["export", str(trained["ckpt"]), str(tmp_path / "t25"), "--threshold", "0.25"])
    assert ts.load(tmp_path / "t25").default_budget == {"threshold": 0.25}
    with pytest.raises(ValueError, match="threshold"):
        main(["export", str(trained["ckpt"]), str(tmp_path / "kr"), "--keep_ratio", "0.5"])
    with pytest.raises(ValueError, match="fastv"):
        ts.apply(model, f"fastv:{out}")


# -- inference ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MLLM_FAMILIES)
def test_threshold_one_never_exits_and_is_the_unpruned_model(saved_mllms, family):
    model, batch = load(saved_mllms, family), make_batch(family)
    inputs = batch.inputs()
    unpruned, unpruned_generated = logits(model, inputs), generate(model, inputs)
    with ts.apply(model, routers(model), threshold=1.0) as handle:
        assert torch.equal(logits(model, inputs), unpruned)
        assert handle.exit_layers.tolist() == [NUM_LAYERS] * batch.size
        generated = generate(model, inputs)
    assert torch.equal(generated.sequences, unpruned_generated.sequences)
    for step, unpruned_step in zip(generated.logits, unpruned_generated.logits, strict=True):
        assert torch.equal(step, unpruned_step)


@pytest.mark.parametrize("family", MLLM_FAMILIES)
@pytest.mark.parametrize("sites", [None, ["llm.2", "llm.3"]])
def test_threshold_zero_exits_every_sample_at_the_first_router_layer(saved_mllms, family, sites):
    model, batch = load(saved_mllms, family), make_batch(family)
    inputs = batch.inputs()
    first = 1 if sites is None else 2
    with ts.apply(model, DropVisualAt(), keep_ratio=0.5, sites=[f"llm.{first}"]):
        expected, expected_generated = logits(model, inputs), generate(model, inputs)
    with ts.apply(model, routers(model, sites=sites), threshold=0.0) as handle:
        torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=1e-5)
        assert handle.exit_layers.tolist() == [first] * batch.size
        generated = generate(model, inputs)
        assert [r.site for r in handle.last_records] == [f"llm.{first}"]  # later routers find nothing to drop
    assert torch.equal(generated.sequences, expected_generated.sequences)
    for step, expected_step in zip(generated.logits, expected_generated.logits, strict=True):
        torch.testing.assert_close(step, expected_step, atol=1e-5, rtol=1e-5)


def _mixed_threshold(exit_logits: torch.Tensor) -> tuple[float, list[int]]:
    """A threshold under which the samples exit at different layers, well away from every router's logit.

    ``exit_logits`` is ``[B, router layers]`` from a run where nobody exited (what each router sees before
    its sample exits). Returns the threshold and each sample's expected exit layer.
    """
    for threshold in torch.linspace(0.05, 0.95, 91).tolist():
        cut = math.log(threshold / (1 - threshold))
        if bool(((exit_logits - cut).abs() < 0.02).any()):
            continue  # too close to call across batch / single-sample numerics
        exits = exit_logits >= cut
        layers = [1 + int(row.float().argmax()) if bool(row.any()) else NUM_LAYERS for row in exits]
        if len(set(layers)) > 1:
            return threshold, layers
    raise AssertionError(f"no threshold mixes exits for these router logits: {exit_logits}")


@pytest.mark.parametrize("family, options", [("llava", {}), ("qwen2_vl", {"shared_router": True, "output": "logit"})])
def test_mixed_batch_exits_per_sample_and_equals_each_sample_alone(saved_mllms, family, options):
    model, batch = load(saved_mllms, family), make_batch(family)
    torch.manual_seed(3)
    method = RecordingDyVTE.for_backbone(adapt(model), DyVTEConfig(router_width=16, **options)).eval()
    method.seen = {}
    with ts.apply(model, method, threshold=1.0):
        logits(model, batch.inputs())
    threshold, expected_layers = _mixed_threshold(torch.stack([method.seen[k] for k in (1, 2, 3)], dim=1))
    with ts.apply(model, method, threshold=threshold) as handle:
        together = generate(model, batch.inputs())
        assert handle.exit_layers.tolist() == expected_layers
        n = visual_counts(batch)
        assert handle.visual_tokens_per_layer.tolist() == [
            [n[b] if layer < expected_layers[b] else 0 for layer in range(NUM_LAYERS)] for b in range(batch.size)
        ]
        tokens = continuation(together, batch.inputs())
        for i in range(batch.size):
            alone = generate(model, batch.sample(i))
            assert handle.exit_layers.tolist() == [expected_layers[i]]
            assert torch.equal(tokens[i], continuation(alone, batch.sample(i))[0])
            for step_together, step_alone in zip(together.logits, alone.logits, strict=True):
                torch.testing.assert_close(step_together[i], step_alone[0], atol=1e-4, rtol=1e-4)


# -- FLOPs -------------------------------------------------------------------------------------------------


def test_prefill_flops_of_exits_by_hand(saved_mllms):
    model = load(saved_mllms, "llava")
    adapter = adapt(model)
    # q, o: 32x32; k, v: 32x16 (2 of 4 heads); gated MLP: three 32x64 linears; 2 FLOPs per multiply-add
    per_token = 2 * (2 * 32 * 32 + 2 * 32 * 16) + 2 * 3 * 32 * 64
    assert decoder_layer_shapes(adapter) == [(per_token, 32)] * NUM_LAYERS

    def layer(n: int) -> float:
        return per_token * n + 4 * n * n * 32

    num_text, num_visual = torch.tensor([5, 7]), torch.tensor([16, 32])
    exit_layers = torch.tensor([2, NUM_LAYERS])
    visual = exit_visual_per_layer(num_visual, exit_layers, NUM_LAYERS)
    assert visual.tolist() == [[16, 16, 0, 0], [32, 32, 32, 32]]
    method = routers(model)
    result = mllm_prefill_flops(adapter, num_text, visual, method)
    router_call = 2 * (64 * 16 + 16 * 2)  # Linear(2d -> h), Linear(h -> 2)
    # sample 0 meets the routers at llm.1 and llm.2 (its exit); sample 1 at all three
    scorer = 2 * (router_call + 5 * 32) + 3 * (router_call + 7 * 32)
    llm = 2 * layer(21) + 2 * layer(5) + 4 * layer(39)
    unpruned = 4 * layer(21) + 4 * layer(39)
    assert result["llm"] == llm and result["scorer"] == scorer and result["unpruned"] == unpruned
    assert result["ratio"] == pytest.approx((llm + scorer) / unpruned)
    assert result["per_sample_ratio"][1] > 1.0  # never exiting costs the routers on top
    # the handle reports the same from its last prefill
    batch = make_batch("llava")
    with ts.apply(model, method, threshold=0.0) as handle:
        logits(model, batch.inputs())
        from_handle = last_prefill_flops(handle)
        by_hand = mllm_prefill_flops(
            adapter,
            handle.last_num_text,
            exit_visual_per_layer(torch.tensor(visual_counts(batch)), torch.ones(batch.size, dtype=torch.long), 4),
            method,
        )
    assert from_handle["total"] == by_hand["total"] and from_handle["ratio"] < 0.6
    with pytest.raises(ValueError, match="must not grow"):
        mllm_prefill_flops(adapter, num_text, torch.tensor([[0, 16, 16, 16], [1, 1, 1, 1]]))


# -- configuration -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, field",
    [
        ({"output": "three_way"}, "output"),
        ({"router_width": 0}, "router_width"),
        ({"sites": ["vit.1"]}, "sites"),
        ({"sites": ["llm.3", "llm.1"]}, "sites"),
        ({"sites": ["llm.4"]}, "sites"),  # the model has layers 0 .. 3
        ({"shared_router": "yes"}, "shared_router"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_method_config_names_the_field(saved_mllms, options, field):
    model = load(saved_mllms, "llava")
    with pytest.raises(ValueError, match=field):
        DyVTEMethod.for_backbone(adapt(model), DyVTEConfig.from_dict(options))


@pytest.mark.parametrize(
    "method, kwargs, needle",
    [
        ("dyvte", {"threshold": 1.5}, "threshold must be an exit probability"),
        ("dyvte", {"keep_ratio": 0.5}, "threshold="),
        ("dyvte", {}, "needs threshold="),
        ("fastv", {"threshold": 0.5}, "threshold= is the budget of exit methods"),
    ],
)
def test_bad_apply_arguments_name_the_budget_knob(saved_mllms, method, kwargs, needle):
    model = load(saved_mllms, "llava")
    method = routers(model) if method == "dyvte" else method
    with pytest.raises(ValueError, match=needle):
        ts.apply(model, method, **kwargs)
    assert getattr(model, "_tokensift_handle", None) is None


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"agreement_threshold": 1.5}, "agreement_threshold"),
        ({"loss_factor": 0.0}, "loss_factor"),
        ({"train_layers": [0]}, "train_layers"),
        ({"train_layers": [2], "method_options": {"sites": ["llm.1"]}}, "train_layers"),
        ({"val_layers": []}, "val_layers"),
        ({"eval_thresholds": [0.5, 2.0]}, "eval_thresholds"),
        ({"method_options": {"router_width": -1}}, "router_width"),
    ],
)
def test_bad_trainer_arguments_name_the_field(saved_mllms, kwargs, field):
    with pytest.raises(ValueError, match=field):
        ExitRouterTrainer(saved_mllms["llava"], **kwargs)


def test_a_batch_without_visual_tokens_trains_nothing_but_keeps_every_rank_in_step(saved_mllms):
    module = ExitRouterTrainer(saved_mllms["llava"], method_options={"router_width": 8})
    batch = _llava_batch([[BOS, 7, 8, 9], [BOS, 10, 11]], [])
    batch["labels"] = torch.full_like(batch["input_ids"], -100)
    batch["labels"][:, -1] = 3
    loss = module.training_step(batch, 0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()  # reaches every router, so DDP finds no unused parameter on this rank
    assert all(p.grad is not None and not bool(p.grad.any()) for p in module.method.parameters())


def test_vision_backbone_is_refused_by_the_exit_trainer(saved_tiny_vit):
    with pytest.raises(ValueError, match="multimodal LLM"):
        ExitRouterTrainer(saved_tiny_vit)


def test_digit_vqa_recipe_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        TokensiftCLI(args=["fit", "-c", str(ROOT / "configs" / "dyvte_digit_vqa.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "tokensift.trainer.ExitRouterTrainer" in printed and "DigitVQADataModule" in printed
