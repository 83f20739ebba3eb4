"""cacovid's GRPO under two-process DDP on CPU: with ``scale_rewards: batch`` both ranks scale their advantages by
the same std, that of both ranks' rewards together (all-gathered), as one process with the whole batch would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def digit_vqa_llava(tmp_path_factory) -> Path:
    from tokensift.backbones.pretrain_mllm import pretrain_mllm
    from tokensift.data import DigitVQADataModule

    out = tmp_path_factory.mktemp("ddp_cacovid") / "llava"
    # long enough to answer some questions right (~19 %): a model that answers none gives every rank reward 0
    data = DigitVQADataModule(train_samples=1024, val_samples=16, test_samples=64, batch_size=16)
    pretrain_mllm(out, data, trainer_kwargs={"limit_train_batches": 64}, eval_batch_size=16)
    return out


def test_two_ranks_scale_advantages_by_the_std_of_the_global_batch(digit_vqa_llava, tmp_path):
    from test_mllm_trainer import fit_recipe

    records = tmp_path / "records"
    recorder = {"class_path": "scale_out_helpers.RecordRewardStatistics", "init_args": {"out_dir": str(records)}}
    data = dict(train_samples=24, val_samples=8, test_samples=8, batch_size=4)
    fit_recipe(
        "cacovid_digit_vqa", digit_vqa_llava, "DistributedOrderDigitVQA", data, tmp_path / "ddp",
        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.limit_val_batches=0",
        "--model.init_args.scale_rewards=batch", "--model.init_args.num_generations=4",
        f"--trainer.callbacks+={json.dumps(recorder)}",
    )  # fmt: skip
    ranks = [[json.loads(line) for line in (records / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 24 prompts, 4 per rank and step
    local_differs = False
    for first, second in zip(*ranks, strict=True):
        assert first["step"] == second["step"]
        union = torch.tensor(first["rewards"] + second["rewards"]).std()
        for record in (first, second):
            torch.testing.assert_close(torch.tensor(record["std"]), union.expand(len(record["std"])))
        local = torch.tensor(first["rewards"]).std()
        local_differs |= not torch.isclose(local, union)
    assert local_differs, "each rank's own std would have passed too: the test cannot tell them apart"
