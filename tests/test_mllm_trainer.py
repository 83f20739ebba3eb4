"""``MLLMScorerTrainer``: each learned multimodal method trained on a frozen tiny LLaVA / Qwen2-VL, table-driven.

A repeated, left-padded batch of mixed layouts (``tiny_mllm.make_batch``) whose answer is the unpruned model's
own next token: the objective falls, the backbone stays bit-identical, and the exported artifact applied with
``ts.apply`` gives what the trained method gives. The recipes under ``configs/`` parse.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny_mllm import MLLM_FAMILIES, build_tiny_mllm, make_batch

import tokensift as ts
from tokensift.cli import main
from tokensift.fit_cli import TokensiftCLI
from tokensift.trainer import MLLMScorerTrainer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16
METHODS = {
    "question_selector": {"width": 16},
    "dynamic_llava": {"sites": ["llm.2"]},
    "atp": {"sites": ["llm.1", "llm.3"]},
}
CASES = [(name, family) for name in METHODS for family in MLLM_FAMILIES]


@pytest.fixture(scope="module")
def saved_mllms(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for family in MLLM_FAMILIES:
        path = tmp_path_factory.mktemp(f"trainer_{family}")
        build_tiny_mllm(family).save_pretrained(path)
        paths[family] = str(path)
    return paths


def labelled_batch(module: MLLMScorerTrainer, family: str) -> dict:
    """The tiny batch with the unpruned model's next token as each sample's one-token answer."""
    batch = make_batch(family).inputs()
    with module.teacher():
        predicted = module.logits(module.model_inputs(batch))[:, -2].argmax(-1)
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][:, -1] = predicted
    batch["labels"] = torch.full_like(batch["input_ids"], -100)
    batch["labels"][:, -1] = predicted
    batch["index"] = torch.arange(batch["input_ids"].shape[0])
    return batch


def logged(trainer: L.Trainer, column: str) -> list[float]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


@pytest.mark.parametrize(("name", "family"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_each_learned_method_trains_on_the_frozen_mllm_and_exports(saved_mllms, name, family, tmp_path):
    L.seed_everything(0)
    module = MLLMScorerTrainer(
        saved_mllms[family],
        method=name,
        method_options=METHODS[name],
        keep_ratio_range=(0.3, 0.5),
        eval_keep_ratios=[0.5],
        lr=3e-2,
        warmup_fraction=0.0,
    )
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    before = {k: v.clone() for k, v in module.method.state_dict().items()}
    batch = labelled_batch(module, family)
    loader = torch.utils.data.DataLoader([batch] * STEPS, batch_size=None)
    trainer = L.Trainer(
        max_steps=STEPS,
        logger=L.pytorch.loggers.CSVLogger(tmp_path / "runs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=1,
    )
    trainer.fit(module, loader, torch.utils.data.DataLoader([batch], batch_size=None))
    losses = logged(trainer, "train/loss")
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert bool(logged(trainer, "train/budget")) == (name == "atp")  # only where the count is not fixed
    assert any(not torch.equal(v, before[k]) for k, v in module.method.state_dict().items()), "the method trained"
    assert all(torch.equal(v, frozen[k]) for k, v in module.backbone.state_dict().items()), "frozen backbone"
    assert logged(trainer, "val/acc_full") == [1.0]  # the answers are the unpruned model's own

    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    out = tmp_path / "artifact"
    main(["export", str(checkpoint), str(out)])
    artifact = ts.load(out)
    assert artifact.manifest["method"] == name and artifact.default_budget == {"keep_ratio": 0.5}
    model = module.backbone
    inputs = module.model_inputs(batch)
    module.handle.remove()
    with ts.apply(model, str(out), keep_ratio=0.4), torch.no_grad():
        from_disk = model(**inputs).logits
    module.method.eval()
    with ts.apply(model, module.method, keep_ratio=0.4), torch.no_grad():
        direct = model(**inputs).logits
    assert torch.equal(from_disk, direct)


def test_bad_trainer_arguments_name_the_field(saved_mllms):
    for kwargs, field in (
        (dict(method="fastv"), "training-free"),
        (dict(method="dynamicvit"), "vision towers"),
        (dict(eval_keep_ratios=[0]), "keep_ratio"),
        (dict(answer_weight=0, distill_weight=0), "answer_weight"),
        (dict(budget_weight=-1.0), "budget_weight"),
        (dict(keep_ratio_range=(0.5, 0.2)), "keep_ratio_range"),
        (dict(method="cacovid"), "GRPOTrainer"),  # trained by reward: tests/test_cacovid.py
    ):
        with pytest.raises(ValueError, match=field):
            MLLMScorerTrainer(saved_mllms["llava"], **kwargs)


@pytest.mark.parametrize(
    "recipe", ["question_selector_digit_vqa", "dynamic_llava_digit_vqa", "atp_digit_vqa", "stts_video_vqa"]
)
def test_recipes_parse(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TokensiftCLI(args=["fit", "-c", str(ROOT / "configs" / f"{recipe}.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    assert "tokensift.trainer.MLLMScorerTrainer" in capsys.readouterr().out


# -- scale-out: 2-process DDP on CPU reaches the weights of one process with the same global batches ----------
@pytest.fixture(scope="module")
def digit_vqa_llava(tmp_path_factory) -> Path:
    from tokensift.backbones.pretrain_mllm import pretrain_mllm
    from tokensift.data import DigitVQADataModule

    out = tmp_path_factory.mktemp("ddp_llava") / "llava"
    data = DigitVQADataModule(train_samples=64, val_samples=16, test_samples=16, batch_size=16)
    pretrain_mllm(out, data, trainer_kwargs={"limit_train_batches": 2}, eval_batch_size=16)
    return out


def fit_recipe(recipe: str, backbone: Path, data_class: str, data: dict, save_dir: Path, *extra: str) -> Path:
    """``tokensift fit`` of ``configs/<recipe>.yaml`` in a child process (Lightning's launcher re-runs it per rank),
    its data module ``scale_out_helpers.<data_class>`` with ``data`` as init args; returns its ``last.ckpt``."""
    from test_scale_out import CHILD_ENV, TESTS

    command = [
        sys.executable,
        str(TESTS / "scale_out_fit.py"),
        "fit",
        f"--config={ROOT / 'configs' / f'{recipe}.yaml'}",
        f"--model.init_args.backbone={backbone}",
        f"--data.class_path=scale_out_helpers.{data_class}",
        *(f"--data.init_args.{key}={value}" for key, value in data.items()),
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--seed_everything=0",
        *extra,
    ]
    result = subprocess.run(command, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return save_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def question_selector_fit(backbone: Path, save_dir: Path, batch_size: int, *extra: str) -> Path:
    data = dict(train_samples=64, val_samples=16, test_samples=16, batch_size=batch_size)
    return fit_recipe("question_selector_digit_vqa", backbone, "DistributedOrderDigitVQA", data, save_dir, *extra)


@pytest.mark.slow
def test_two_process_ddp_and_zero2_reach_the_single_process_weights(digit_vqa_llava, tmp_path):
    two = ("--trainer.devices=2",)
    ddp = question_selector_fit(digit_vqa_llava, tmp_path / "ddp", 8, *two, "--trainer.strategy=ddp")
    zero2 = question_selector_fit(digit_vqa_llava, tmp_path / "zero2", 8, *two, "--trainer.strategy=deepspeed_stage_2")
    single = question_selector_fit(digit_vqa_llava, tmp_path / "single", 16, "--trainer.devices=1")
    for name, path in (("ddp", ddp), ("zero2", zero2), ("single", single)):
        main(["export", str(path), str(tmp_path / f"{name}_artifact")])  # a ZeRO checkpoint is a directory
    ddp_state = ts.load(tmp_path / "ddp_artifact").method.state_dict()
    zero2_state = ts.load(tmp_path / "zero2_artifact").method.state_dict()
    single_state = ts.load(tmp_path / "single_artifact").method.state_dict()
    L.seed_everything(0)  # as the fits: the method starts from these weights
    start = MLLMScorerTrainer(str(digit_vqa_llava), method_options={"width": 32}).method.state_dict()
    assert any(not torch.equal(single_state[k], start[k]) for k in start), "the runs trained"
    # the last bias shifts every logit alike, which a top-k (soft or hard) ignores: its gradient is rounding noise
    # that Adam scales up to full steps, so it says nothing about the two runs
    blind = "scorer.head.2.bias"
    for key, value in single_state.items():
        if key != blind:
            torch.testing.assert_close(ddp_state[key], value, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(zero2_state[key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_the_second_vqa_task_trains_and_benches_through_the_cli(tmp_path):
    """Shape VQA (other visuals, question types and two-token answers) through the console commands only: a tiny
    LLaVA pretrained on it, the question selector fitted from the digit-VQA recipe with the data swapped, exported
    and benched beside random."""
    data = {"class_path": "tokensift.data.ShapeVQADataModule",
            "init_args": {"train_samples": 256, "val_samples": 32, "test_samples": 32, "batch_size": 32}}  # fmt: skip
    backbone = tmp_path / "shape_llava"
    main(["pretrain-mllm", "--out", str(backbone), "--data", json.dumps(data), "--eval_batch_size", "32",
          "--vision_hidden_size", "32", "--text_hidden_size", "32", "--text_layers", "2"])  # fmt: skip
    save_dir = tmp_path / "fit"
    main(["fit", f"--config={ROOT / 'configs' / 'question_selector_digit_vqa.yaml'}",
          f"--model.init_args.backbone={backbone}", "--model.init_args.method_options={\"width\": 8}",
          f"--data={json.dumps(data)}", "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1",
          f"--trainer.logger.init_args.save_dir={save_dir}"])  # fmt: skip
    run = save_dir / "lightning_logs" / "version_0"
    with open(run / "metrics.csv") as f:
        answer = [float(row["train/answer"]) for row in csv.DictReader(f) if row.get("train/answer")]
    assert answer and all(math.isfinite(v) for v in answer)
    artifact = tmp_path / "artifact"
    main(["export", str(run / "checkpoints" / "last.ckpt"), str(artifact)])
    out = tmp_path / "bench"
    methods = f"question_selector:{artifact},random"
    main(["bench", "--model", str(backbone), "--data", json.dumps(data),
          "--methods", methods, "--keep-ratios", "1,0.5", "--out", str(out)])  # fmt: skip
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["method"], r["keep_ratio"]) for r in rows} >= {("question_selector", 0.5), ("random", 0.5)}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


def test_lora_on_the_llm_trains_exports_and_applies(saved_mllms, tmp_path):
    """LoRA adapters on the LLM train with the selector; the artifact carries them as a peft folder and ts.apply
    loads them onto a fresh model, which then computes what the trained one computes."""
    L.seed_everything(0)
    module = MLLMScorerTrainer(
        saved_mllms["llava"],
        method_options={"width": 16},
        keep_ratio_range=(0.3, 0.5),
        eval_keep_ratios=[0.5],
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        lr=3e-2,
    )
    batch = labelled_batch(module, "llava")
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 4, batch_size=None))
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    out = tmp_path / "artifact"
    main(["export", str(checkpoint), str(out)])
    assert (out / "adapter").is_dir()
    inputs = module.model_inputs(batch)
    module.handle.set_budget(keep_ratio=0.4)
    module.handle.mode = "gather"
    module.eval()
    with torch.no_grad():
        trained = module.backbone(**inputs).logits
    fresh = build_tiny_mllm("llava").eval()
    with ts.apply(fresh, str(out), keep_ratio=0.4), torch.no_grad():
        from_disk = fresh(**inputs).logits
    torch.testing.assert_close(from_disk, trained, atol=1e-5, rtol=1e-5)
