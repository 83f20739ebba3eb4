"""das's bandit under two-process DDP on CPU: each rank rewards the skip sets on its own batch, and every rank ends
each search with the same scores (the baseline and the score increments are all-reduced)."""

from __future__ import annotations

import json
import os

import torch
from lightning.pytorch.callbacks import Callback


class RecordSkipScores(Callback):
    """After every step, each rank appends the bandit's scores and a digest of its batch to ``<out_dir>/rank<r>.jsonl``
    (run in the fit's child processes: tests/ is importable there)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {
            "step": trainer.global_step,
            "scores": pl_module.method.scores.tolist(),
            "labels": batch["labels"].tolist(),
        }
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def test_two_ranks_end_every_search_with_identical_scores(tmp_path):
    from test_mllm_trainer import fit_recipe
    from test_train_export import save_vit

    backbone = save_vit(tmp_path / "vit", num_hidden_layers=5)  # 3 candidate blocks: 1, 2, 3
    records = tmp_path / "records"
    recorder = {"class_path": "test_das_scale_out.RecordSkipScores", "init_args": {"out_dir": str(records)}}
    data = dict(canvas_size=32, num_clutter=2, train_samples=48, val_samples=8, test_samples=8, batch_size=8)
    options = {
        "skip_layers": 1,
        "dim_replace": 8,
        "num_subnetworks": 3,
        "search_interval": 1,
        "warmup_steps": 0,
        "search_steps": 2,
        "bandit_lr": 1.0,
    }
    fit_recipe(
        "das_digits", backbone, "DistributedOrderDigits", data, tmp_path / "ddp",
        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.limit_val_batches=0",
        f"--model.init_args.method_options={json.dumps(options)}", "--model.init_args.eval_skip_layers=[]",
        f"--trainer.callbacks+={json.dumps(recorder)}",
    )  # fmt: skip
    ranks = [[json.loads(line) for line in (records / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 48 samples, 8 per rank and step
    for first, second in zip(*ranks, strict=True):
        assert first["step"] == second["step"]
        assert first["labels"] != second["labels"], "the ranks must reward different batches"
        assert first["scores"] == second["scores"]
    assert torch.tensor(ranks[0][-1]["scores"]).abs().sum() > 0, "the searches moved the scores"
