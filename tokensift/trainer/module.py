"""The LightningModule that trains a learned token scorer on a frozen image classifier.

One forward of the frozen backbone with the handle disabled is the teacher (no second copy of the
weights); the same backbone with the scorer in mask mode is the student. The optimizer sees the scorer,
and, when asked, LoRA adapters on the backbone's attention and the backbone itself, each in its own
learning-rate group; the backbone stays in eval mode (dropout off) whatever Lightning asks. All of that
plumbing is :class:`tokensift.trainer.base.FrozenBackboneTrainer`'s; this module says what a step computes.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from tokensift.budget import Budget
from tokensift.reduce import PruningHandle
from tokensift.trainer.base import FrozenBackboneTrainer, budget_key, checkpoint_blocks
from tokensift.trainer.losses import LossWeights, scorer_objective

# their home is tokensift.trainer.reliability; configs and scripts written before name them here
from tokensift.trainer.reliability import (  # noqa: F401
    AtomicCheckpointIO,
    LastCheckpoint,
    NonFiniteLossError,
    remove_stale_partial_files,
)


class ScorerTrainer(FrozenBackboneTrainer):
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
        eval_keep_ratios = list(eval_keep_ratios or [0.5, 0.25])
        for ratio in eval_keep_ratios:
            Budget(keep_ratio=ratio)  # validates
        super().__init__(
            backbone,
            method,
            method_options,
            keep_ratio_range=keep_ratio_range,
            lr=lr,
            weight_decay=weight_decay,
            warmup_fraction=warmup_fraction,
            attn_implementation=attn_implementation,
            seed=seed,
            lora=lora,
            lora_lr_factor=lora_lr_factor,
            backbone_lr_factor=backbone_lr_factor,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.save_hyperparameters()
        self.eval_keep_ratios = eval_keep_ratios
        self.loss_weights = loss or LossWeights()
        # after the handle's hooks: the tokens the head pools (mask mode: dropped ones replaced by the kept mean)
        self._final_tokens: Tensor | None = None
        self.adapter.final_token_module.register_forward_hook(self._grab_final_tokens)
        num_classes = int(self.backbone.config.num_labels)
        budgets = ["full", *eval_keep_ratios]
        # micro: the fraction of correct samples, what `tokensift bench` reports (torchmetrics defaults to macro)
        self.val_acc = nn.ModuleDict({budget_key(r): MulticlassAccuracy(num_classes, average="micro") for r in budgets})
        self.test_acc = nn.ModuleDict(
            {budget_key(r): MulticlassAccuracy(num_classes, average="micro") for r in budgets}
        )

    # -- FrozenBackboneTrainer hooks ------------------------------------------------------------
    def build_handle(self) -> PruningHandle:
        return PruningHandle(self.adapter, self.method, Budget(keep_ratio=self.keep_ratio_range[1]), mode="mask")

    def training_loss(self, batch: dict) -> dict[str, Tensor]:
        inputs, labels = self.model_inputs(batch), batch["labels"]
        with self.teacher():
            teacher_logits = self.logits(inputs)
            teacher_tokens = self._final_tokens
        self.prepare_pruned_pass(batch)
        self.method.train()
        logits = self.logits(inputs)
        return scorer_objective(
            logits=logits,
            labels=labels,
            teacher_logits=teacher_logits,
            tokens=self._final_tokens,
            teacher_tokens=teacher_tokens,
            records=self.handle.last_records,
            weights=self.loss_weights,
            budget_term=self.needs_budget_term,
        )

    def validation_metrics(self, batch: dict, stage: str) -> None:
        """Accuracy unpruned and at each ``eval_keep_ratios`` (hard top-k, gather mode)."""
        metrics = self.budget_metrics(stage)
        inputs, labels = self.model_inputs(batch), batch["labels"]
        self.handle.enabled = False
        metrics[budget_key("full")].update(self.logits(inputs), labels)
        self.handle.enabled, self.handle.mode = True, "gather"
        for ratio in self.eval_keep_ratios:
            self.handle.set_budget(keep_ratio=ratio)
            metrics[budget_key(ratio)].update(self.logits(inputs), labels)
        self.handle.mode = "mask"

    def default_budget(self) -> dict:
        return {"keep_ratio": self.eval_keep_ratios[0]}

    # -- helpers --------------------------------------------------------------------------------
    def _grab_final_tokens(self, module: nn.Module, args: tuple, output) -> None:
        self._final_tokens = output[0] if isinstance(output, tuple) else output


__all__ = ["ScorerTrainer", "checkpoint_blocks"]
