"""A fit that is killed or stopped resumes exactly; NaN stops it cleanly; checkpoints are never half-written.

The `tokensift fit` runs here are subprocesses (a SIGKILL has to kill a real process) on a tiny ViT and 64
cluttered digits: 4 steps per epoch, 2 epochs, `last.ckpt` every 3 steps as well as at each epoch end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from tokensift.data import ClutteredDigitsDataModule
from tokensift.trainer import ScorerTrainer
from tokensift.trainer.module import (
    AtomicCheckpointIO,
    LastCheckpoint,
    NonFiniteLossError,
    remove_stale_partial_files,
)

TESTS = Path(__file__).parent
DATA = [
    "--data.class_path=tokensift.data.ClutteredDigitsDataModule",
    "--data.init_args.canvas_size=32",
    "--data.init_args.clutter_size=[2,3]",
    "--data.init_args.num_clutter=3",
    "--data.init_args.train_samples=64",
    "--data.init_args.val_samples=16",
    "--data.init_args.test_samples=16",
    "--data.init_args.batch_size=16",
]
NOISE = (
    "LightningCLI's args parameter",  # args given twice
    "module(s) in eval mode",  # the frozen backbone, by design
    "FLOPs",  # `Total FLOPs: 0` in the model summary
    "not resumable",  # Lightning's mid-epoch resume warning
    "You have overridden",  # a hook Lightning would run in place of the data module's
)


class SignalAt(L.Callback):
    """Send ``signum`` to this very process when optimizer step ``step`` is about to run (mid-epoch)."""

    def __init__(self, step: int, signum: int = 9):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def save_vit(path: Path) -> Path:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=32
    )
    config.num_labels = 10
    ViTForImageClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return save_vit(tmp_path_factory.mktemp("reliability") / "vit")


def fit(backbone: Path, save_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "fit",
        "--seed_everything=0",
        f"--model.backbone={backbone}",
        "--trainer.max_epochs=2",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--checkpoint_every_n_steps=3",
        *DATA,
        *extra,
    ]
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    code = "import sys; from tokensift.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def checkpoint(save_dir: Path, version: int, name: str = "last.ckpt") -> dict:
    path = save_dir / "lightning_logs" / f"version_{version}" / "checkpoints" / name
    return torch.load(path, map_location="cpu", weights_only=True)


def no_partial_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial-" in p.name or p.suffix in (".tmp", ".part")]


@pytest.fixture(scope="module")
def uninterrupted(backbone, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("uninterrupted")
    result = fit(backbone, save_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return save_dir, result


@pytest.mark.slow
def test_plain_fit_prints_none_of_the_usual_noise(uninterrupted):
    _, result = uninterrupted
    for text in NOISE:
        assert text not in result.stderr, text
        assert text not in result.stdout, text
    assert "Trainable params" in result.stdout  # the summary itself is still there


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "at_step", "resumes_from", "returncode"),
    [
        (signal.SIGKILL, 7, 6, -signal.SIGKILL),  # killed in epoch 1; last.ckpt of step 6, mid-epoch
        (signal.SIGTERM, 2, 3, 128 + signal.SIGTERM),  # step 2 finishes, last.ckpt written at step 3 on the way out
    ],
    ids=["sigkill", "sigterm"],
)
def test_interrupted_fit_resumes_bitwise(backbone, uninterrupted, tmp_path, signum, at_step, resumes_from, returncode):
    reference_dir, _ = uninterrupted
    stopped = fit(
        backbone,
        tmp_path,
        "--trainer.callbacks+=test_reliability.SignalAt",
        f"--trainer.callbacks.step={at_step}",
        f"--trainer.callbacks.signum={int(signum)}",
    )
    assert stopped.returncode == returncode, stopped.stderr[-3000:]
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    saved = checkpoint(tmp_path, 0)
    assert saved["global_step"] == resumes_from
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] < 4  # mid-epoch
    resumed = fit(backbone, tmp_path, f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for text in NOISE:
        assert text not in resumed.stderr, text
    reference, final = checkpoint(reference_dir, 0), checkpoint(tmp_path, 1)
    assert final["global_step"] == reference["global_step"] == 8
    assert reference["state_dict"].keys() == final["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, final["state_dict"][key]), key
    for ref_state, state in zip(
        reference["optimizer_states"][0]["state"].values(), final["optimizer_states"][0]["state"].values(), strict=True
    ):
        assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    assert no_partial_files(tmp_path) == []


# -- NaN guard (in process) -----------------------------------------------------------------------------------
class Poison(L.Callback):
    """At ``step``, remember last.ckpt's bytes, then poison the scorer (``what="weights"``) or the batch."""

    def __init__(self, step: int, what: str):
        self.step, self.what = step, what
        self.before: bytes | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        self.before = Path(trainer.checkpoint_callback.best_model_path).read_bytes()
        if self.what == "weights":
            with torch.no_grad():
                pl_module.method.predictors[0].head[-1].bias.fill_(float("nan"))
        else:
            batch["pixel_values"][1, 0, 5, 5] = float("inf")


def tiny_fit(backbone: Path, root: Path, callback: L.Callback) -> tuple:
    module = ScorerTrainer(str(backbone), method_options={"num_stages": 2}, keep_ratio_range=(0.5, 0.5))
    data = ClutteredDigitsDataModule(
        canvas_size=32,
        clutter_size=(2, 3),
        num_clutter=3,
        train_samples=64,
        val_samples=16,
        test_samples=16,
        batch_size=16,
    )
    last = LastCheckpoint(every_n_train_steps=2, dirpath=root / "checkpoints")
    trainer = L.Trainer(
        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[last, callback], default_root_dir=root, num_sanity_val_steps=0,
    )  # fmt: skip
    return trainer, module, data


@pytest.mark.parametrize(("what", "names"), [("weights", "step 3"), ("batch", "batch['pixel_values']")])
def test_nan_stops_training_naming_the_step_and_keeps_the_last_checkpoint(backbone, tmp_path, what, names):
    poison = Poison(step=3, what=what)
    trainer, module, data = tiny_fit(backbone, tmp_path, poison)
    with pytest.raises(NonFiniteLossError, match="step 3") as error:
        trainer.fit(module, data)
    assert names in str(error.value)
    assert "last.ckpt" in str(error.value)  # names the checkpoint to resume from
    path = tmp_path / "checkpoints" / "last.ckpt"
    assert path.read_bytes() == poison.before  # not rewritten on the way out
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in saved["state_dict"].values() if v.is_floating_point())
    assert no_partial_files(tmp_path) == []


# -- atomic checkpoint files -------------------------------------------------------------------------------------
def test_a_failed_save_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    before = target.read_bytes()

    def dies_halfway(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_partial_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.ckpt.partial-{int(dead.stdout)}"
    live = tmp_path / f".last.ckpt.partial-{os.getppid()}"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    assert remove_stale_partial_files(tmp_path) == [stale]
    assert live.exists() and not stale.exists()


@pytest.mark.parametrize("every", [0, -3, 2.5, True])
def test_checkpoint_every_n_steps_must_be_a_positive_integer(every):
    with pytest.raises(ValueError, match="checkpoint_every_n_steps"):
        LastCheckpoint(every_n_train_steps=every)
