"""Train a small ViT classifier from scratch and ``save_pretrained`` it: the embedded default's backbone.

No pretrained vision weights ship offline, and a frozen backbone must know its task before a scorer can
learn which of its tokens matter. This recipe is also the "full fine-tune" reference when timing the
scorer's training cost against updating every backbone weight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy
from transformers import ViTConfig, ViTForImageClassification

from tokensift.io import atomic_directory, check_replaceable
from tokensift.schedule import warmup_cosine

REPORT = "tokensift_backbone.json"  # what the recipe measured, beside the weights


class BackboneClassifier(L.LightningModule):
    """A ``ViTForImageClassification`` trained end to end (every weight updates)."""

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,
        num_channels: int = 3,
        num_labels: int = 10,
        hidden_size: int = 64,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 128,
        lr: float = 3e-3,
        weight_decay: float = 0.05,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        config = ViTConfig(
            image_size=image_size,
            patch_size=patch_size,
            num_channels=num_channels,
            num_labels=num_labels,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.model = ViTForImageClassification(config)
        self.val_acc = MulticlassAccuracy(num_labels, average="micro")
        self.test_acc = MulticlassAccuracy(num_labels, average="micro")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(pixel_values=batch["pixel_values"]).logits
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"], label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_acc.update(self.model(pixel_values=batch["pixel_values"]).logits, batch["labels"])
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=batch["labels"].shape[0])

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.test_acc.update(self.model(pixel_values=batch["pixel_values"]).logits, batch["labels"])
        self.log("test/acc", self.test_acc, batch_size=batch["labels"].shape[0])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        schedule = warmup_cosine(optimizer, int(self.trainer.estimated_stepping_batches), warmup_fraction=0.05)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def pretrain_backbone(
    out_dir: str | os.PathLike,
    data: L.LightningDataModule,
    max_epochs: int = 4,
    trainer_kwargs: dict | None = None,
    seed: int = 0,
    **model_kwargs,
) -> tuple[Path, float]:
    """Train a ViT on ``data`` and ``save_pretrained`` it to ``out_dir`` (atomically).

    ``out_dir`` must be absent, empty, or an earlier output of this function (it holds ``tokensift_backbone.json``);
    any other directory is refused before training, so its files are never deleted.

    The ViT's geometry follows the data module (``image_size``, ``patch_size``, ``num_channels``,
    ``num_classes``). Returns the directory and the unpruned test accuracy.
    """
    out = Path(out_dir)
    check_replaceable(out, REPORT, "trained backbone")  # refuse a wrong path before training, not after
    L.seed_everything(seed, workers=True)  # the demo's backbone is the same on every fresh run
    geometry = {
        "image_size": data.image_size,
        "patch_size": data.patch_size,
        "num_channels": data.num_channels,
        "num_labels": data.num_classes,
    }
    module = BackboneClassifier(**geometry, **model_kwargs)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        **(trainer_kwargs or {}),
    )
    trainer.fit(module, datamodule=data)
    accuracy = float(trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"])
    with atomic_directory(out, REPORT, "trained backbone") as tmp:
        module.model.save_pretrained(tmp)
        (tmp / REPORT).write_text(json.dumps({"test_accuracy": accuracy, "max_epochs": max_epochs}, indent=2))
    return out, accuracy
