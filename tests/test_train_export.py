"""Train a learned scorer through the CLI, export it, apply it: the foundation's end-to-end path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy
from transformers import ViTConfig, ViTForImageClassification

import tokensift as ts
from tokensift.backbones import load_backbone
from tokensift.budget import Budget
from tokensift.cli import TokensiftCLI, main
from tokensift.data import ClutteredDigitsDataModule
from tokensift.export import FingerprintMismatch, save_artifact
from tokensift.reduce import PruningHandle
from tokensift.scorers.dynamicvit import DynamicViTMethod
from tokensift.trainer import FrozenBackboneTrainer, ScorerTrainer

TINY_VIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=4)


def save_vit(path: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    config = ViTConfig(**(TINY_VIT | {"image_size": 32, "num_labels": 10} | overrides))
    ViTForImageClassification(config).save_pretrained(path)
    return path


def data_args(batch_size: int = 16, train: int = 256) -> list[str]:
    return [
        "--data.class_path=tokensift.data.ClutteredDigitsDataModule",
        "--data.init_args.canvas_size=32",
        "--data.init_args.clutter_size=[2,3]",
        "--data.init_args.num_clutter=3",
        f"--data.init_args.train_samples={train}",
        "--data.init_args.val_samples=32",
        "--data.init_args.test_samples=32",
        f"--data.init_args.batch_size={batch_size}",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short `tokensift fit` run shared by the tests below."""
    root = tmp_path_factory.mktemp("fit")
    backbone = save_vit(root / "backbone")
    before = {k: v.clone() for k, v in load_backbone(str(backbone)).state_dict().items()}
    cli = TokensiftCLI(
        args=[
            "fit",
            f"--model.backbone={backbone}",
            "--model.lr=3e-3",
            "--model.keep_ratio_range=[0.5,0.5]",
            # DynamicViT's own per-token decision: its budget term has something to learn here
            '--model.method_options={"selection": "threshold"}',
            "--trainer.max_epochs=2",
            "--trainer.log_every_n_steps=1",
            f"--trainer.logger.init_args.save_dir={root / 'runs'}",
            "--seed_everything=0",
            *data_args(),
        ]
    )
    return {"root": root, "backbone": backbone, "before": before, "cli": cli}


def last_checkpoint(cli) -> str:
    return str(Path(cli.trainer.checkpoint_callbacks[-1].dirpath) / "last.ckpt")


def logged(cli, column: str) -> list[float]:
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


def test_fit_loss_goes_down(trained):
    losses = logged(trained["cli"], "train/loss")
    assert len(losses) >= 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, (first, last)
    assert logged(trained["cli"], "val/acc_keep0_5"), "validation accuracy at the budget is logged"
    # `threshold` keeps a variable count (method.keeps_budget_count is false): the objective has a budget term
    assert len(logged(trained["cli"], "train/budget")) == len(losses)


def test_backbone_is_frozen_bit_identical(trained):
    module: ScorerTrainer = trained["cli"].model
    after = module.backbone.state_dict()
    assert all(torch.equal(trained["before"][k], after[k]) for k in trained["before"])
    assert not any(p.requires_grad for p in module.backbone.parameters())
    assert not module.backbone.training
    optimized = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.method.parameters()}


def test_checkpoint_leaves_out_backbone(trained):
    ckpt = torch.load(last_checkpoint(trained["cli"]), weights_only=True)
    assert ckpt["state_dict"] and not any(k.startswith("backbone.") for k in ckpt["state_dict"])
    assert ckpt["tokensift"]["method"] == "dynamicvit"


def test_export_and_apply_round_trip(trained, tmp_path):
    ckpt = last_checkpoint(trained["cli"])
    out = tmp_path / "artifact"
    main(["export", ckpt, str(out), "--keep_ratio=0.4"])
    manifest = json.loads((out / "tokensift.json").read_text())
    assert manifest["format_version"] == 1 and manifest["method"] == "dynamicvit"
    assert manifest["default_budget"] == {"keep_ratio": 0.4}
    assert manifest["backbone"]["model_type"] == "vit" and manifest["sites"] == ["vit.0", "vit.1", "vit.2"]
    assert not list(tmp_path.glob(".artifact.*")), "no temporary directory left behind"

    artifact = ts.load(out)
    trained_state = trained["cli"].model.method.state_dict()
    assert all(torch.equal(v, trained_state[k].cpu()) for k, v in artifact.method.state_dict().items())

    model = load_backbone(str(trained["backbone"]))
    pixel_values = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        unpruned = model(pixel_values=pixel_values).logits
        with ts.apply(model, out, keep_ratio=1.0):
            assert torch.equal(model(pixel_values=pixel_values).logits, unpruned)
        with ts.apply(model, out) as handle:  # the artifact's default budget
            model(pixel_values=pixel_values)
            assert handle.kept_orig_index.shape == (4, 1 + 26)  # ceil(0.4 * 64) patches + [CLS]
        with ts.apply(model, str(out), keep_count=8) as handle:  # budget chosen at inference time
            model(pixel_values=pixel_values)
            assert handle.kept_orig_index.shape == (4, 9)
        assert torch.equal(model(pixel_values=pixel_values).logits, unpruned)


def test_artifact_refuses_other_backbones(trained, tmp_path):
    ckpt = last_checkpoint(trained["cli"])
    out = tmp_path / "artifact"
    main(["export", ckpt, str(out)])
    wider = load_backbone(str(save_vit(tmp_path / "wider", hidden_size=48, intermediate_size=96)))
    with pytest.raises(FingerprintMismatch, match="hidden_size: artifact 32 vs model 48"):
        ts.apply(wider, out)
    retrained = load_backbone(str(save_vit(tmp_path / "other_weights", seed=1)))
    with pytest.raises(FingerprintMismatch, match="weights_digest"):
        ts.apply(retrained, out)
    ts.apply(retrained, out, strict=False).remove()


def test_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match=r"scorer\.safetensors is missing"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "tokensift.json").write_text("{}")
        ts.load(tmp_path / "half")


def test_crash_while_saving_leaves_nothing(tmp_path, monkeypatch):
    model = load_backbone(str(save_vit(tmp_path / "backbone")))
    method = DynamicViTMethod.for_backbone(ts.backbones.adapt(model))

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("tokensift.export.artifact.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(method, ts.backbones.adapt(model).fingerprint(), tmp_path / "artifact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone"]


def test_cli_reports_config_typos(tmp_path, capsys):
    backbone = save_vit(tmp_path / "backbone")
    with pytest.raises(SystemExit):
        TokensiftCLI(args=["fit", f"--model.backbone={backbone}", "--model.keep_ratio_rnge=[0.2,0.3]", *data_args()])
    assert "keep_ratio_rnge" in capsys.readouterr().err


def test_print_config_lists_the_recipe(tmp_path, capsys):
    backbone = save_vit(tmp_path / "backbone")
    with pytest.raises(SystemExit) as exit_info:
        TokensiftCLI(args=["fit", f"--model.backbone={backbone}", *data_args(), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "keep_ratio_range" in printed and "ClutteredDigitsDataModule" in printed and "RichProgressBar" in printed


def test_progress_bar_can_be_switched_off(tmp_path):
    """The default Rich bar steps aside instead of making Lightning refuse the flag."""
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

    backbone = save_vit(tmp_path / "backbone")
    cli = TokensiftCLI(
        args=[f"--model.backbone={backbone}", *data_args(train=32), "--trainer.enable_progress_bar=false"],
        run=False,
    )
    assert not any(isinstance(c, ProgressBar) for c in cli.trainer.callbacks)
    assert sum(isinstance(c, ModelCheckpoint) for c in cli.trainer.callbacks) == 2, "the other defaults stay"


def test_trainer_rejects_bad_settings(tmp_path):
    backbone = str(save_vit(tmp_path / "backbone"))
    with pytest.raises(ValueError, match="keep_ratio_range"):
        ScorerTrainer(backbone, keep_ratio_range=(0.8, 0.2))
    with pytest.raises(ValueError, match="training-free"):
        ScorerTrainer(backbone, method="tome")
    with pytest.raises(ValueError, match="has no option"):
        ScorerTrainer(backbone, method_options={"num_stagez": 2})
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_backbone(str(tmp_path / "nowhere" / "model"))


def test_topk_selection_keeps_exactly_the_budget_while_training(tmp_path):
    model = load_backbone(str(save_vit(tmp_path / "backbone")))
    method = DynamicViTMethod.for_backbone(ts.backbones.adapt(model))
    handle = ts.apply(model, method, keep_ratio=0.25, mode="mask")
    method.train()
    logits = model(pixel_values=torch.randn(4, 3, 32, 32)).logits
    counts = handle.site_counts()
    for record in handle.last_records:
        kept = record.policy[:, 1:].sum(dim=1)  # patches only
        assert torch.equal(kept, torch.full_like(kept, counts[record.site]))
    logits.sum().backward()
    assert all(p.grad is not None for p in method.parameters())


class TaskOnlyTrainer(FrozenBackboneTrainer):
    """The hook contract of FrozenBackboneTrainer on its own: a pruned-model cross-entropy, nothing else."""

    def __init__(self, backbone: str, lr: float = 1e-3):
        super().__init__(backbone, "dynamicvit", keep_ratio_range=(0.5, 0.5), lr=lr)
        self.save_hyperparameters()
        self.accuracy = MulticlassAccuracy(10, average="micro")

    def build_handle(self):
        return PruningHandle(self.adapter, self.method, Budget(keep_ratio=0.5), mode="mask")

    def training_loss(self, batch):
        self.prepare_pruned_pass(batch)
        return {"loss": torch.nn.functional.cross_entropy(self.logits(self.model_inputs(batch)), batch["labels"])}

    def validation_metrics(self, batch, stage):
        with self.teacher():
            self.accuracy.update(self.logits(self.model_inputs(batch)), batch["labels"])

    def log_validation_metrics(self, stage):
        self.log(f"{stage}/acc", self.accuracy.compute(), sync_dist=True)
        self.accuracy.reset()

    def default_budget(self):
        return {"keep_ratio": 0.5}


def test_a_subclass_writes_only_the_hooks(tmp_path):
    backbone = save_vit(tmp_path / "backbone")
    data = ClutteredDigitsDataModule(
        canvas_size=32, clutter_size=(2, 3), num_clutter=3, train_samples=32, val_samples=16, batch_size=16
    )
    module = TaskOnlyTrainer(str(backbone), lr=3e-3)
    initial = {k: v.clone() for k, v in module.method.state_dict().items()}
    trainer = L.Trainer(
        max_epochs=1, logger=L.pytorch.loggers.CSVLogger(tmp_path / "runs"), enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    assert any(not torch.equal(v, module.method.state_dict()[k]) for k, v in initial.items()), "the scorer trained"
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == ["scorer"]
    saved = torch.load(Path(trainer.checkpoint_callback.best_model_path), weights_only=True)
    assert saved["state_dict"] and all(k.startswith("method.") for k in saved["state_dict"]), "backbone left out"
    assert saved["tokensift"]["default_budget"] == {"keep_ratio": 0.5}
    assert saved["tokensift"]["trained_keep_ratio_range"] == [0.5, 0.5] and "tokensift_rng" in saved
    # the model card's training record: the data module's class path
    assert saved["tokensift"]["data_module"] == f"{type(data).__module__}.{type(data).__qualname__}"
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["train/keep_target"]) for r in rows if r.get("train/keep_target")] == [0.5, 0.5]
    assert any(r.get("val/acc") for r in rows)
