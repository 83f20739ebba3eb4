"""The LightningModule that trains a learned token scorer on a frozen backbone.

One forward of the frozen backbone with the handle disabled is the teacher (no second copy of the
weights); the same backbone with the scorer in mask mode is the student. The optimizer sees the scorer,
and, when asked, LoRA adapters on the backbone's attention and the backbone itself, each in its own
learning-rate group; the backbone stays in eval mode (dropout off) whatever Lightning asks.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchmetrics.classification import MulticlassAccuracy

from tokensift.backbones import adapt, load_backbone
from tokensift.backbones.lora import add_lora, is_lora_parameter, lora_modules
from tokensift.budget import Budget
from tokensift.reduce import PruningHandle
from tokensift.scorers import TokenMethod, get_method_class
from tokensift.trainer.losses import LossWeights, scorer_objective
from tokensift.trainer.schedule import warmup_cosine

CHECKPOINT_KEY = "tokensift"


class ScorerTrainer(L.LightningModule):
    """Train ``method`` on the frozen ``backbone``.

    Args:
        backbone: a local ``save_pretrained`` directory or a hub name of a ViT / CLIP / SigLIP classifier.
        method: a learned method name (``dynamicvit``).
        method_options: the method's config fields (e.g. ``{"num_stages": 3, "hidden_ratio": 0.5}``).
        keep_ratio_range: each training batch samples its final keep ratio uniformly from this range, so
            one scorer serves any budget in it; ``[r, r]`` trains a fixed-ratio scorer.
        eval_keep_ratios: validation/test report accuracy at each of these (hard top-k, gather mode).
        loss: weights of the objective's terms.
        lr, weight_decay, warmup_fraction: AdamW with linear warm-up then cosine decay.
        attn_implementation: the backbone's attention kernel ("sdpa" or "eager").
        lora: ``peft.LoraConfig`` fields (``{r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}``): train
            LoRA adapters on the backbone's attention with the scorer; exported as a peft adapter folder.
        lora_lr_factor: the LoRA group's learning rate as a multiple of ``lr``.
        backbone_lr_factor: unfreeze the backbone and train it at ``lr`` times this (DynamicViT: 0.01);
            ``None`` keeps it frozen. The artifact then carries the fine-tuned backbone.
        gradient_checkpointing: recompute the backbone blocks' activations during backward instead of
            keeping them (less memory, one more block forward per step).
    """

    strict_loading = False  # checkpoints leave out the frozen backbone; it is rebuilt from `backbone`

    def __init__(
        self,
        backbone: str,
        method: str = "dynamicvit",
        method_options: dict[str, Any] | None = None,
        keep_ratio_range: tuple[float, float] = (0.25, 0.75),
        eval_keep_ratios: list[float] | None = None,
        loss: LossWeights | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
        attn_implementation: str = "sdpa",
        seed: int = 0,
        lora: dict[str, Any] | None = None,
        lora_lr_factor: float = 1.0,
        backbone_lr_factor: float | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        low, high = keep_ratio_range
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"keep_ratio_range must satisfy 0 < low <= high <= 1, got {keep_ratio_range}.")
        eval_keep_ratios = list(eval_keep_ratios or [0.5, 0.25])
        for ratio in eval_keep_ratios:
            Budget(keep_ratio=ratio)  # validates
        if not lora_lr_factor > 0:
            raise ValueError(f"lora_lr_factor must be > 0, got {lora_lr_factor}.")
        if backbone_lr_factor is not None and not backbone_lr_factor > 0:
            raise ValueError(
                f"backbone_lr_factor must be > 0 (DynamicViT: 0.01), or null to keep the backbone frozen; "
                f"got {backbone_lr_factor}."
            )
        self.save_hyperparameters()
        self.keep_ratio_range = (float(low), float(high))
        self.eval_keep_ratios = eval_keep_ratios
        self.loss_weights = loss or LossWeights()
        self.backbone = load_backbone(backbone, attn_implementation=attn_implementation)
        self.adapter = adapt(self.backbone)
        _freeze(self.backbone)
        # taken now: LoRA layers and ZeRO-3 partitioning (empty parameter shards) come later
        self.backbone_fingerprint = self.adapter.fingerprint()
        self.lora_options = dict(lora) if lora else None
        self.lora_lr_factor = float(lora_lr_factor)
        self.backbone_lr_factor = backbone_lr_factor
        if backbone_lr_factor is not None:
            self.backbone.requires_grad_(True)
        if self.lora_options:
            add_lora(self.backbone, self.lora_options)
        self._lora_layers = lora_modules(self.backbone) if self.lora_options else []
        if gradient_checkpointing:
            checkpoint_blocks(self.adapter.layers)
        cls = get_method_class(method)
        if cls.kind != "learned":
            raise ValueError(f"method {method!r} is training-free; train a learned method such as 'dynamicvit'.")
        config = cls.config_class.from_dict(method_options)
        self.method: TokenMethod = cls.for_backbone(self.adapter, config)
        self.handle = PruningHandle(self.adapter, self.method, Budget(keep_ratio=high), mode="mask")
        self._final_tokens: torch.Tensor | None = None
        self.adapter.final_token_module.register_forward_hook(self._grab_final_tokens)
        self._rng = random.Random(seed)
        num_classes = int(self.backbone.config.num_labels)
        budgets = ["full", *eval_keep_ratios]
        # micro: the fraction of correct samples, what `tokensift bench` reports (torchmetrics defaults to macro)
        self.val_acc = nn.ModuleDict({_key(r): MulticlassAccuracy(num_classes, average="micro") for r in budgets})
        self.test_acc = nn.ModuleDict({_key(r): MulticlassAccuracy(num_classes, average="micro") for r in budgets})

    # -- Lightning hooks ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ScorerTrainer:
        super().train(mode)
        self.backbone.eval()  # frozen means frozen: dropout stays off during fit
        for layer in self._lora_layers:
            layer.train(mode)  # the adapters train: their dropout follows Lightning
        return self

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            # the frozen backbone is rebuilt from `backbone`: ZeRO checkpoints keep only what trains
            strategy.exclude_frozen_parameters = True
        elif isinstance(strategy, DDPStrategy) and self.has_unused_parameters():
            # costs a graph traversal per step, so only when some parameter may get no gradient
            strategy._ddp_kwargs.setdefault("find_unused_parameters", True)

    def has_unused_parameters(self) -> bool:
        """True when a step may leave a trainable parameter without gradient (DDP must then look for them).

        A method says so itself (e.g. one router trained per step); an unfrozen backbone may hold weights
        its classifier never reads (CLIP's post-layernorm under a mean-pooling head).
        """
        return bool(getattr(self.method, "has_unused_parameters", False)) or self.backbone_lr_factor is not None

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: scorer at ``lr``, LoRA at ``lr·lora_lr_factor``, backbone at ``lr·backbone_lr_factor``."""
        lr = self.hparams.lr
        lora = [p for n, p in self.backbone.named_parameters() if p.requires_grad and is_lora_parameter(n)]
        backbone = [p for n, p in self.backbone.named_parameters() if p.requires_grad and not is_lora_parameter(n)]
        groups = [
            {"name": "scorer", "params": [p for p in self.method.parameters() if p.requires_grad], "lr": lr},
            {"name": "lora", "params": lora, "lr": lr * self.lora_lr_factor},
            {"name": "backbone", "params": backbone, "lr": lr * (self.backbone_lr_factor or 0.0)},
        ]
        return [group for group in groups if group["params"]]

    def configure_optimizers(self):
        groups = self.parameter_groups()
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = warmup_cosine(optimizer, total, warmup_fraction=self.hparams.warmup_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        with torch.no_grad():
            self.handle.enabled = False
            teacher_logits = self.adapter.logits(pixel_values)
            teacher_tokens = self._final_tokens
        keep_ratio = self._rng.uniform(*self.keep_ratio_range)
        self.handle.enabled, self.handle.mode = True, "mask"
        self.handle.set_budget(keep_ratio=keep_ratio)
        self.method.train()
        logits = self.adapter.logits(pixel_values)
        terms = scorer_objective(
            logits=logits,
            labels=labels,
            teacher_logits=teacher_logits,
            tokens=self._final_tokens,
            teacher_tokens=teacher_tokens,
            records=self.handle.last_records,
            weights=self.loss_weights,
        )
        batch_size = labels.shape[0]
        for name, value in terms.items():
            # the budget statistics are averaged over ranks: each rank alone sees a fraction of the batch
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size, sync_dist=name == "budget")
        kept = torch.stack([r.keep_fraction.mean() for r in self.handle.last_records]).mean()
        self.log("train/keep_fraction", kept, batch_size=batch_size, sync_dist=True)
        self.log("train/keep_target", keep_ratio, batch_size=batch_size)
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_acc, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_acc, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        for key in [k for k in state if k.startswith("backbone.") and k not in trained]:
            del state[key]  # frozen and reloadable: keeps checkpoints scorer-sized (LoRA weights stay)
        checkpoint[CHECKPOINT_KEY] = self.artifact_metadata()

    # -- helpers --------------------------------------------------------------------------------
    def artifact_metadata(self) -> dict:
        return {
            "method": self.method.name,
            "config": asdict(self.method.config),
            "fingerprint": self.backbone_fingerprint,
            "backbone": self.hparams.backbone,
            "lora": self.lora_options,
            "backbone_trained": self.backbone_lr_factor is not None,
            "trained_keep_ratio_range": list(self.keep_ratio_range),
            "default_budget": {"keep_ratio": self.eval_keep_ratios[0]},
        }

    def _evaluate(self, batch: dict, metrics: nn.ModuleDict, stage: str) -> None:
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        self.handle.enabled = False
        metrics[_key("full")].update(self.adapter.logits(pixel_values), labels)
        self.handle.enabled, self.handle.mode = True, "gather"
        for ratio in self.eval_keep_ratios:
            self.handle.set_budget(keep_ratio=ratio)
            metrics[_key(ratio)].update(self.adapter.logits(pixel_values), labels)
        self.handle.mode = "mask"

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy(self.val_acc, "val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy(self.test_acc, "test")

    def _log_accuracy(self, metrics: nn.ModuleDict, stage: str) -> None:
        """``<stage>/acc_<budget>`` per budget, and ``<stage>/acc``: the mean over pruned budgets (monitored)."""
        # compute() gathers every rank's counts, so each rank logs the whole set's accuracy; sync_dist only
        # averages those equal values (and keeps Lightning from warning about unsynced epoch-level logs)
        values = {name: metric.compute() for name, metric in metrics.items()}
        for name, value in values.items():
            self.log(f"{stage}/acc_{name}", value, prog_bar=name != "full", sync_dist=True)
        pruned = [v for name, v in values.items() if name != "full"]
        self.log(f"{stage}/acc", torch.stack(pruned).mean(), sync_dist=True)
        for metric in metrics.values():
            metric.reset()

    def _grab_final_tokens(self, module: nn.Module, args: tuple, output) -> None:
        self._final_tokens = output[0] if isinstance(output, tuple) else output


def checkpoint_blocks(layers: nn.ModuleList) -> None:
    """Make each block recompute its activations during backward instead of storing them.

    The block's ``forward`` is wrapped, not its ``__call__``: tokensift's pre- and post-block hooks (which
    read and update the pruning policy of this forward pass) then run once, outside the recomputation,
    and the recomputed block sees exactly the policy the original pass saw. Non-reentrant checkpointing
    keeps gradients to tensors the block reads from outside its arguments (that policy, LoRA weights).
    transformers' own ``gradient_checkpointing_enable`` is no substitute: it is off in eval mode, where a
    frozen backbone stays, and re-runs the hooks.
    """
    for layer in layers:

        def checkpointed(*args, _forward=layer.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed


def _freeze(model: nn.Module) -> None:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def _key(ratio) -> str:
    return "full" if ratio == "full" else f"keep{ratio:g}".replace(".", "_")
