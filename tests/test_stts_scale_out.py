"""STTS's recipe under two-process DDP on CPU reaches the weights of one process with the doubled batch.

STTS trains by removal (gather mode, the scorer's ``log(score)`` as the next block's key bias) with no random
draws, so once the samples are dealt alike (``scale_out_helpers.DistributedOrderVideoDigitVQA``) two ranks of
batch 4 average to the gradient of one rank of batch 8.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

import tokensift as ts
from tokensift.cli import main
from tokensift.trainer import MLLMScorerTrainer

VIDEO = dict(family="molmo2", frame_size=84, patch_size=7, min_frames=3, max_frames=4, max_digits=2)


@pytest.fixture(scope="module")
def video_molmo2(tmp_path_factory) -> Path:
    from tokensift.backbones.pretrain_mllm import pretrain_mllm
    from tokensift.data import VideoDigitVQADataModule

    out = tmp_path_factory.mktemp("ddp_video") / "molmo2"
    data = VideoDigitVQADataModule(train_samples=32, val_samples=8, test_samples=8, batch_size=8, **VIDEO)
    pretrain_mllm(
        out, data, family="molmo2", trainer_kwargs={"limit_train_batches": 2}, eval_batch_size=8,
        vision_hidden_size=32, vision_layers=5, text_hidden_size=32, text_layers=1,
    )  # fmt: skip
    return out


def stts_fit(backbone: Path, save_dir: Path, batch_size: int, *extra: str) -> Path:
    from test_mllm_trainer import fit_recipe

    data = dict(VIDEO, train_samples=16, val_samples=8, test_samples=8, batch_size=batch_size)
    return fit_recipe("stts_video_vqa", backbone, "DistributedOrderVideoDigitVQA", data, save_dir, *extra)


@pytest.mark.slow
def test_stts_recipe_two_process_ddp_reaches_the_single_process_weights(video_molmo2, tmp_path):
    ddp = stts_fit(video_molmo2, tmp_path / "ddp", 4, "--trainer.devices=2", "--trainer.strategy=ddp")
    single = stts_fit(video_molmo2, tmp_path / "single", 8, "--trainer.devices=1")
    for name, path in (("ddp", ddp), ("single", single)):
        main(["export", str(path), str(tmp_path / f"{name}_artifact")])
    ddp_state = ts.load(tmp_path / "ddp_artifact").method.state_dict()
    single_state = ts.load(tmp_path / "single_artifact").method.state_dict()
    L.seed_everything(0)  # as the fits: the scorer starts from these weights
    start = MLLMScorerTrainer(str(video_molmo2), method="stts", method_options={"sites": ["vit.3"]}).method
    start_state = start.state_dict()
    assert ddp_state.keys() == single_state.keys() == start_state.keys()
    assert any(not torch.equal(single_state[k], start_state[k]) for k in start_state), "the runs trained"
    # Adam turns a gradient's rounding difference (two half-batch sums vs one sum) into up to ~1% of a step of 1e-3
    # where the gradient is near zero; a wrong split or a missing all-reduce moves weights by whole steps
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state[key], value, atol=1e-4, rtol=1e-4)
