"""What a reward-trained policy's training step costs against the gradient-trained scorer on the same model and batch.

    .venv/bin/python benchmarks/policy_train_cost.py [--rounds 5] [--vit-batch-size 64] [--vqa-batch-size 16] [--tiny]

Each trainer is built from its recipe (``configs/*.yaml``, through ``tokensift fit``'s own LightningCLI, so the
options are the recipe's) and fitted by a Lightning ``Trainer`` on one fixed batch repeated:

- demo LLaVA (``runs/vqa/llava``): ``GRPOTrainer`` (cacovid, G = the recipe's 8 combinations per prompt) against
  ``MLLMScorerTrainer`` (question_selector);
- demo ViT (``runs/quickstart/backbone``): ``ReinforceTrainer`` (ia_red2) and ``LayerSkipTrainer`` (das) against
  ``ScorerTrainer`` (dynamicvit), both its recipes: mask mode with a teacher pass (``dynamicvit_digits.yaml``) and
  removal with the teacher's logits cached (``dynamicvit_digits_removal.yaml``).

A step is Lightning's whole step: forward(s), backward, optimizer step (GRPO: rollout + policy pass). The fits run
side by side in threads that take turns, so one round runs a turn of every trainer and a load change on shared
cores hits them alike; a turn is ``--steps-per-turn`` steps (default 3, the das recipe's ``search_interval``: one
bandit search per turn). das first runs its recipe's ``warmup_steps`` untimed, so what is timed is its search phase
(up to the recipe's ``search_steps``: 96 timed steps; after that its steps are plain fine-tuning ones).
Printed: the median over rounds of ms per step and of the per-round ratio to each reference. ``--tiny``: random-init
models of the demos' shapes and small batches instead of the demo folders (timings then say little; for smoke
tests).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VIT = "runs/quickstart/backbone"
LLAVA = "runs/vqa/llava"


class Turns(Callback):
    """Runs a fit one turn (``steps`` training steps) at a time, each when the main thread says ``go``, and times
    each turn after the ``untimed`` first steps (which run in the first turn)."""

    def __init__(self, steps: int, untimed: int = 0):
        self.steps, self.untimed = steps, untimed
        self.go, self.done = threading.Event(), threading.Event()
        self.count, self.started = 0, 0.0
        self.seconds_per_step: list[float] = []

    def _turn_boundary(self, count: int) -> bool:
        return count >= self.untimed and (count - self.untimed) % self.steps == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.count == 0 or (self.count > self.untimed and self._turn_boundary(self.count)):
            self.go.wait()
            self.go.clear()
        if self._turn_boundary(self.count):
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.count += 1
        if self.count > self.untimed and self._turn_boundary(self.count):
            self.seconds_per_step.append((time.perf_counter() - self.started) / self.steps)
            self.done.set()


@dataclass
class Run:
    """One trainer's fit in its own thread, driven turn by turn."""

    name: str
    module: L.LightningModule
    batch: dict
    turns: Turns
    total_steps: int
    error: BaseException | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> None:
        threads = torch.get_num_threads()

        def fit() -> None:
            torch.set_num_threads(threads)  # a new thread starts with OpenMP's default, not the main thread's
            trainer = L.Trainer(
                accelerator="cpu",
                devices=1,
                # max_steps counts optimizer steps: GRPO takes num_iterations of them per batch
                max_steps=self.total_steps * getattr(self.module, "num_iterations", 1),
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
                num_sanity_val_steps=0,
                callbacks=[self.turns],
            )
            loader = torch.utils.data.DataLoader([self.batch] * self.total_steps, batch_size=None)
            try:
                trainer.fit(self.module, train_dataloaders=loader)
            except BaseException as error:  # re-raised by the main thread, which would otherwise wait forever
                self.error = error
            finally:
                self.turns.done.set()

        self.thread = threading.Thread(target=fit, name=self.name, daemon=True)
        self.thread.start()

    def turn(self) -> None:
        self.turns.go.set()
        while not self.turns.done.wait(timeout=1.0):
            if not self.thread.is_alive():  # the fit ended before this turn: waiting longer would hang
                raise RuntimeError(f"{self.name}: the fit stopped before its turn ({self.turns.count} batches ran)")
        self.turns.done.clear()
        if self.error is not None:
            raise RuntimeError(f"{self.name}: the fit failed") from self.error


def from_recipe(recipe: str, backbone: str, data_options: dict) -> tuple[L.LightningModule, L.LightningDataModule]:
    """The recipe's model and data module as ``tokensift fit -c configs/<recipe>`` builds them, on ``backbone``."""
    from tokensift.fit_cli import TokensiftCLI

    args = [f"--config={CONFIGS / recipe}", f"--model.init_args.backbone={backbone}", "--trainer.logger=false"]
    args += [f"--data.init_args.{key}={value}" for key, value in data_options.items()]
    cli = TokensiftCLI(args=args, run=False)
    return cli.model, cli.datamodule


def first_batch(datamodule: L.LightningDataModule) -> dict:
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def tiny_backbones(folder: str) -> tuple[str, str]:
    """Models of the demos' shapes, untrained: the ViT (``BackboneClassifier``'s defaults) and the LLaVA
    (``pretrain_mllm``'s defaults, one training batch: it writes the processor the MLLM trainers load)."""
    from tokensift.backbones.pretrain import BackboneClassifier
    from tokensift.backbones.pretrain_mllm import pretrain_mllm
    from tokensift.data import DigitVQADataModule

    vit, llava = f"{folder}/vit", f"{folder}/llava"
    BackboneClassifier().model.save_pretrained(vit)
    data = DigitVQADataModule(batch_size=8, train_samples=8, val_samples=8, test_samples=8, padding_side="left")
    quiet = {"limit_train_batches": 1, "enable_progress_bar": False, "enable_model_summary": False}
    pretrain_mllm(llava, data, trainer_kwargs=quiet, eval_batch_size=8)
    return vit, llava


def report(runs: dict[str, Run], references: dict[str, Sequence[str]], title: str) -> None:
    print(f"\n== {title}")
    print(f"{'trainer':<58} {'ms/step':>9}  ratio (median of per-round ratios)")
    for name, run in runs.items():
        times = run.turns.seconds_per_step
        line = f"{name:<58} {statistics.median(times) * 1e3:9.1f}"
        ratios = []
        for reference in references.get(name, ()):
            per_round = [t / r for t, r in zip(times, runs[reference].turns.seconds_per_step, strict=True)]
            ratios.append(f"x{statistics.median(per_round):.2f} vs {reference}")
        print(line + ("  " + ", ".join(ratios) if ratios else "  (reference)"))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (a turn of every trainer each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--steps-per-turn", type=int, default=3, help="training steps per trainer per round")
    parser.add_argument("--vit-batch-size", type=int, default=None, help="images per step (default 64; --tiny 8)")
    parser.add_argument("--vqa-batch-size", type=int, default=None, help="prompts per step (default 16; --tiny 2)")
    parser.add_argument("--tiny", action="store_true", help="random-init demo-shaped models (smoke test)")
    args = parser.parse_args(argv)
    for name in ("rounds", "steps_per_turn"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be 0 or more, got {args.warmup}.")
    torch.set_num_threads(1)
    vit_batch = args.vit_batch_size or (8 if args.tiny else 64)
    vqa_batch = args.vqa_batch_size or (2 if args.tiny else 16)

    with tempfile.TemporaryDirectory() as tmp:
        vit, llava = tiny_backbones(tmp) if args.tiny else (VIT, LLAVA)
        for path, target in ((vit, "make demo"), (llava, "make demo-vqa")):
            if not Path(path).is_dir():
                raise SystemExit(f"{path} is missing: run `{target}` first, or pass --tiny.")
        small = {"train_samples": 64, "val_samples": 16, "test_samples": 16}
        vit_data = {"batch_size": vit_batch, **small}
        vqa_data = {"batch_size": vqa_batch, **small}
        recipes = {
            "MLLMScorerTrainer question_selector": ("question_selector_digit_vqa.yaml", llava, vqa_data),
            "GRPOTrainer cacovid (G=8)": ("cacovid_digit_vqa.yaml", llava, vqa_data),
            "ScorerTrainer dynamicvit, mask": ("dynamicvit_digits.yaml", vit, vit_data),
            "ScorerTrainer dynamicvit, removal (cached teacher)": ("dynamicvit_digits_removal.yaml", vit, vit_data),
            "ReinforceTrainer ia_red2": ("ia_red2_digits.yaml", vit, vit_data),
            "LayerSkipTrainer das (search phase)": ("das_digits.yaml", vit, vit_data),
        }
        batches: dict[str, dict] = {}
        runs: dict[str, Run] = {}
        for name, (recipe, backbone, data_options) in recipes.items():
            module, datamodule = from_recipe(recipe, backbone, data_options)
            # every trainer on a backbone steps on the same batch: the first recipe's
            batch = batches.setdefault(backbone, first_batch(datamodule))
            untimed = int(getattr(module.method.config, "warmup_steps", 0)) if name.startswith("LayerSkip") else 0
            turns = Turns(args.steps_per_turn, untimed)
            total = untimed + (args.warmup + args.rounds) * args.steps_per_turn
            runs[name] = Run(name, module, batch, turns, total)
        for run in runs.values():
            run.start()
        for _ in range(args.warmup):
            for run in runs.values():
                run.turn()
        for run in runs.values():  # the warm-up turns are not reported
            run.turns.seconds_per_step.clear()
        for _ in range(args.rounds):
            for run in runs.values():
                run.turn()
        for run in runs.values():
            run.thread.join()
            if run.error is not None:
                raise RuntimeError(f"{run.name}: the fit failed") from run.error

    threads = torch.get_num_threads()
    where = "random-init demo shapes (--tiny)" if args.tiny else f"{llava}, {vit}"
    print(
        f"\ntraining step cost, {where}; median of {args.rounds} rounds x {args.steps_per_turn} steps, {threads} thread"
    )
    names = list(runs)
    report(
        {name: runs[name] for name in names[:2]},
        {names[1]: [names[0]]},
        f"LLaVA, {vqa_batch} prompts per step",
    )
    report(
        {name: runs[name] for name in names[2:]},
        {name: names[2:4] for name in names[3:]} | {names[3]: [names[2]]},
        f"ViT, {vit_batch} images per step",
    )


if __name__ == "__main__":
    main()
