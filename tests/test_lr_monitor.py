"""``tokensift fit`` adds Lightning's LearningRateMonitor (per step) to a run that logs: an ``lr-AdamW/<group>``
column in metrics.csv that follows the warmup + cosine schedule; a recipe's own monitor is not doubled, and a run
with ``logger: false`` (where the monitor would raise) trains without one."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor

from tests.test_train_export import save_vit
from tokensift.fit_cli import TokensiftCLI

LR = 0.002
STEPS = 6


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return save_vit(tmp_path_factory.mktemp("lr_monitor") / "vit")


def _recipe(path: Path, backbone: Path, trainer: dict) -> Path:
    """A tiny version of configs/dynamicvit_digits.yaml."""
    recipe = {
        "seed_everything": 0,
        "model": {
            "backbone": str(backbone),
            "method": "dynamicvit",
            "keep_ratio_range": [0.25, 0.5],
            "eval_keep_ratios": [0.5],
            "lr": LR,
            "warmup_fraction": 0.5,
        },
        "data": {
            "class_path": "tokensift.data.ClutteredDigitsDataModule",
            "init_args": {"canvas_size": 32, "batch_size": 8, "train_samples": 48, "val_samples": 8, "test_samples": 8},
        },
        "trainer": {
            "max_steps": STEPS,
            "log_every_n_steps": 1,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            **trainer,
        },
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def _fit(recipe: Path) -> TokensiftCLI:
    return TokensiftCLI(args=["fit", "-c", str(recipe)])


def _monitors(cli: TokensiftCLI) -> list[LearningRateMonitor]:
    return [c for c in cli.trainer.callbacks if isinstance(c, LearningRateMonitor)]


def test_a_csv_run_logs_the_learning_rate_per_step(backbone, tmp_path):
    csv_logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}
    cli = _fit(_recipe(tmp_path / "recipe.yaml", backbone, {"logger": csv_logger}))
    (monitor,) = _monitors(cli)
    assert monitor.logging_interval == "step"
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    # one AdamW group named "scorer" (ScorerTrainer.parameter_groups): Lightning names the column after both
    assert "lr-AdamW/scorer" in rows[0]
    lrs = [float(row["lr-AdamW/scorer"]) for row in rows if row.get("lr-AdamW/scorer")]
    assert len(lrs) == STEPS
    # warmup over the first half of the steps, then cosine down: the rate rises to lr, then falls
    peak = lrs.index(max(lrs))
    assert 0 < peak < STEPS - 1 and math.isclose(max(lrs), LR, rel_tol=0.05)
    assert lrs[:peak] == sorted(lrs[:peak]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)
    assert lrs[0] < LR / 2 and lrs[-1] < LR / 2


def test_a_recipe_monitor_is_kept_and_not_doubled(backbone, tmp_path):
    own = {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "epoch"}}
    csv_logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}
    cli = _fit(_recipe(tmp_path / "recipe.yaml", backbone, {"logger": csv_logger, "callbacks": [own]}))
    (monitor,) = _monitors(cli)
    assert monitor.logging_interval == "epoch"


def test_a_run_without_a_logger_trains_without_the_monitor(backbone, tmp_path):
    cli = _fit(_recipe(tmp_path / "recipe.yaml", backbone, {"logger": False, "default_root_dir": str(tmp_path)}))
    assert _monitors(cli) == [] and cli.trainer.logger is None
    assert cli.trainer.global_step == STEPS


def test_a_manually_optimised_trainer_logs_each_group(tmp_path):
    """GRPOTrainer steps its optimizer and schedule itself (manual optimisation), with two parameter groups."""
    import torch

    from tokensift.backbones.pretrain_mllm import pretrain_mllm
    from tokensift.data import DigitVQADataModule

    torch.set_num_threads(1)
    data = dict(batch_size=4, train_samples=16, val_samples=4, test_samples=4, seed=1)
    tiny = dict(vision_hidden_size=32, vision_layers=1, text_hidden_size=32, text_layers=2)
    quiet = dict(enable_progress_bar=False, enable_model_summary=False, logger=False)
    llava, _ = pretrain_mllm(tmp_path / "llava", DigitVQADataModule(**data), trainer_kwargs=quiet, **tiny)
    recipe = Path(__file__).resolve().parents[1] / "configs" / "cacovid_digit_vqa.yaml"
    cli = TokensiftCLI(
        args=[
            "fit",
            "-c",
            str(recipe),
            f"--model.init_args.backbone={llava}",
            "--model.init_args.num_generations=2",
            "--model.init_args.method_options.init_from_llm=false",
            *(f"--data.init_args.{key}={value}" for key, value in data.items()),
            "--trainer.max_steps=3",
            "--trainer.log_every_n_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]
    )
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    for group in ("scorer", "policy_layer"):  # the policy head, the copied LLM layer (GRPOTrainer.parameter_groups)
        lrs = [float(row[f"lr-AdamW/{group}"]) for row in rows if row.get(f"lr-AdamW/{group}")]
        assert len(lrs) == 3 and lrs[0] < max(lrs), (group, lrs)


def test_a_tensorboard_run_logs_the_same_curves(backbone, tmp_path):
    """``--trainer.logger`` TensorBoardLogger (the ``tensorboard`` extra): the event file holds the training loss and
    the per-step learning rate that a CSV run writes to metrics.csv, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path)}}
    cli = _fit(_recipe(tmp_path / "recipe.yaml", backbone, {"logger": board}))
    assert len(_monitors(cli)) == 1
    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lr-AdamW/scorer", "train/loss"} <= tags, tags
    lrs = [event.value for event in events.Scalars("lr-AdamW/scorer")]
    assert len(lrs) == STEPS and math.isclose(max(lrs), LR, rel_tol=0.05) and lrs[0] < LR / 2
    assert any(tag.startswith("val/") for tag in tags), tags
