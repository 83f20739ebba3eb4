"""``MLLMScorerTrainer``: a learned visual-token method trained on a frozen multimodal LLM by its answer loss.

The method (``question_selector`` at ``pre_llm``, ``dynamic_llava`` / ``atp`` at ``llm.<k>``, or any learned method
with multimodal sites) runs in mask mode: its keep policy enters every later layer's attention as a key bias, the
sequence keeps its length, text is never masked (``tokensift.reduce_mllm``). A method that trains by removal
(``trains_by_removal``: ``stts`` at ``vit.<i>``) runs in gather mode instead, as at inference: its keep decision's
key bias acts at the next block and the dropped tokens leave after it, so the student pass costs a pruned forward.
One step:

- the teacher: the same weights with the handle off, no graph (no second copy of the model);
- the student: a keep ratio drawn per step from ``keep_ratio_range`` (one artifact serves that range), the policy;
- the objective: ``answer`` cross-entropy on the answer tokens (``labels`` ≠ -100), ``distill`` KL(teacher ‖
  student) on the same positions, and a ``budget`` term (kept fraction vs target, squared, per sample and site)
  only where the method's count is not fixed (``method.keeps_budget_count`` false: ``atp``, ``threshold``
  selections), weighted by the method's own ``budget_weight`` when its config has one; and, for a method that
  evicts generated tokens' KV (``dynamic_llava`` with ``text_predictor``), whose policy then covers the answer tokens
  too, ``text_budget``: each answer's kept fraction vs the method's target, squared, with the same weight;
  and the method's own terms of the pass (``auxiliary_losses()``, already weighted: ``stts``'s ``temporal``). With
  ``distill_weight`` 0 the teacher pass is skipped.

Validation and test report answer accuracy unpruned and in gather mode (the inference path, hard top-k) at each
``eval_keep_ratios``. Data: any module whose batches carry the model's processor outputs (``input_ids``,
``attention_mask``, ``pixel_values`` and the family's extras), ``labels`` and ``index`` (README, "Bring your own
VQA data").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from tokensift.budget import Budget
from tokensift.reduce_mllm import MLLMPruningHandle
from tokensift.scorers import TokenMethod
from tokensift.trainer.base import FrozenBackboneTrainer, budget_key
from tokensift.trainer.losses import IGNORE_INDEX, answer_accuracy, answer_loss, answered


class MLLMScorerTrainer(FrozenBackboneTrainer):
    """Train a learned visual-token method on a frozen LLaVA / Qwen2-VL (LightningModule).

    Args:
        backbone: a ``save_pretrained`` directory of a LLaVA or Qwen2-VL model (or a hub name).
        method: a learned method with ``pre_llm`` / ``llm.<k>`` sites (``question_selector``, ``dynamic_llava``,
            ``atp``), or one that trains by removal at ``vit.<i>`` (``stts``, in gather mode).
        method_options: fields of the method's config (``sites``, widths, temperatures, ...).
        keep_ratio_range: each step draws its keep ratio uniformly from ``[low, high]``.
        eval_keep_ratios: validation / test accuracy at each of these (gather mode); the first is the artifact's
            default budget and ``<stage>/acc`` is their mean.
        answer_weight: weight of the answer cross-entropy.
        distill_weight: weight of KL(teacher ‖ student) on the answer positions; 0 skips the teacher pass.
        budget_weight: weight of the budget term where it applies; ``None``: the method's ``budget_weight``
            (``dynamic_llava``: 100, ``atp``: 2), else 2.
        temperature: of the distillation's softmaxes.
        lr, weight_decay, warmup_fraction: AdamW with linear warm-up then cosine decay.
        attn_implementation: the backbone's attention kernel ("sdpa" or "eager"); mask mode keeps it.
        seed: the keep-ratio draws and the methods' per-sample noise.
        lora, lora_lr_factor: LoRA adapters on the LLM trained with the method (``peft.LoraConfig`` fields).
        gradient_checkpointing: recompute the decoder layers' activations during backward.
    """

    multimodal = True

    def __init__(
        self,
        backbone: str,
        method: str = "question_selector",
        method_options: dict[str, Any] | None = None,
        keep_ratio_range: tuple[float, float] = (0.05, 0.5),
        eval_keep_ratios: list[float] | None = None,
        answer_weight: float = 1.0,
        distill_weight: float = 1.0,
        budget_weight: float | None = None,
        temperature: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_fraction: float = 0.05,
        attn_implementation: str = "sdpa",
        seed: int = 0,
        lora: dict[str, Any] | None = None,
        lora_lr_factor: float = 1.0,
        gradient_checkpointing: bool = False,
    ):
        eval_keep_ratios = list(eval_keep_ratios or [0.25, 0.1])
        for ratio in eval_keep_ratios:
            Budget(keep_ratio=ratio)  # validates
        for name, value in (("answer_weight", answer_weight), ("distill_weight", distill_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}.")
        if answer_weight == 0 and distill_weight == 0:
            raise ValueError("answer_weight and distill_weight are both 0: nothing would train the method.")
        if budget_weight is not None and not budget_weight >= 0:
            raise ValueError(f"budget_weight must be >= 0 (or null: the method's own), got {budget_weight!r}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}.")
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
            gradient_checkpointing=gradient_checkpointing,
        )
        # not ``seed``: a data module's own ``seed`` (which fixes the task, not the run) would clash with it when
        # Lightning merges the two hyperparameter sets; the run's seed lives in the checkpoint's random state
        self.save_hyperparameters(ignore=["seed"])
        self.eval_keep_ratios = eval_keep_ratios
        self.answer_weight, self.distill_weight, self.temperature = answer_weight, distill_weight, temperature
        self.budget_weight = (
            budget_weight if budget_weight is not None else getattr(self.method.config, "budget_weight", 2.0)
        )
        budgets = ["full", *eval_keep_ratios]
        self.val_acc = nn.ModuleDict({budget_key(r): MeanMetric() for r in budgets})
        self.test_acc = nn.ModuleDict({budget_key(r): MeanMetric() for r in budgets})

    # -- FrozenBackboneTrainer hooks ------------------------------------------------------------
    def check_method(self, cls: type[TokenMethod]) -> None:
        super().check_method(cls)
        removal = getattr(cls, "trains_by_removal", False) is True  # a class attribute, not a config option
        if not {"pre_llm", "llm"} & set(cls.site_kinds) and not removal:
            raise ValueError(
                f"method {cls.name!r} runs in vision towers only (sites {list(cls.site_kinds)}); MLLMScorerTrainer "
                "trains methods at pre_llm / llm.<k> (question_selector, dynamic_llava, atp) and methods that train "
                "by removal at vit.<i> (stts)."
            )

    @property
    def training_mode(self) -> str:
        """The handle's mode in the student pass: ``gather`` for a method that trains by removing tokens (its keep
        decision's next-block key bias carries the gradient: ``stts``), else ``mask``."""
        return "gather" if self.method.trains_by_removal else "mask"

    def build_handle(self) -> MLLMPruningHandle:
        budget = Budget(keep_ratio=self.keep_ratio_range[1])
        return MLLMPruningHandle(self.adapter, self.method, budget, mode=self.training_mode)

    def training_loss(self, batch: dict) -> dict[str, Tensor] | None:
        labels = batch["labels"]
        rows = answered(labels)
        if not bool(rows.any()):
            return None
        inputs = self.model_inputs(batch)
        teacher = None
        if self.distill_weight > 0:  # without distillation nothing reads the unpruned pass: skip it
            with self.teacher():
                teacher = self.logits(inputs)
        self.prepare_pruned_pass(batch, mode=self.training_mode)
        self.method.train()
        self.method.set_progress(min(1.0, self.global_step / self.schedule_steps) if self.schedule_steps else 0.0)
        self.method.auxiliary_losses()  # drop anything an earlier forward left (the terms below are this pass's)
        logits = self.logits(inputs)
        answer = answer_loss(logits, labels)[rows].mean()
        terms = {"answer": answer}
        loss = self.answer_weight * answer
        if teacher is not None:
            terms["distill"] = answer_distillation(logits, teacher, labels, self.temperature)[rows].mean()
            loss = loss + self.distill_weight * terms["distill"]
        # the method's own terms of this pass, already weighted (stts: its temporal regression)
        for name, value in self.method.auxiliary_losses().items():
            terms[name] = value
            loss = loss + value
        if self.needs_budget_term:
            terms["budget"] = budget_error(self.handle.last_records)
            loss = loss + self.budget_weight * terms["budget"]
        if self.handle.last_generated_records:  # the answer tokens' KV policy (a variable count)
            terms["text_budget"] = generated_budget_error(self.handle.last_generated_records)
            loss = loss + self.budget_weight * terms["text_budget"]
        return {"loss": loss, **terms}

    def validation_metrics(self, batch: dict, stage: str) -> None:
        """Answer accuracy unpruned and at each ``eval_keep_ratios`` (gather mode: hard top-k, the inference path)."""
        metrics = self.budget_metrics(stage)
        labels = batch["labels"]
        rows = answered(labels)
        if not bool(rows.any()):
            return
        inputs = self.model_inputs(batch)
        with self.teacher():
            metrics[budget_key("full")].update(answer_accuracy(self.logits(inputs), labels)[rows])
        self.handle.mode = "gather"
        try:
            for ratio in self.eval_keep_ratios:
                self.handle.set_budget(keep_ratio=ratio)
                self.name_samples(batch)
                metrics[budget_key(ratio)].update(answer_accuracy(self.logits(inputs), labels)[rows])
        finally:
            self.handle.mode = self.training_mode

    def default_budget(self) -> dict:
        return {"keep_ratio": self.eval_keep_ratios[0]}


def answer_distillation(logits: Tensor, teacher: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """``[B]`` mean KL(teacher ‖ student) over each sample's answer positions (the logits that predict a label),
    on temperature-scaled softmaxes in float32, times ``temperature²``; 0 for a sample without an answer."""
    scored = labels[:, 1:] != IGNORE_INDEX
    student = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    target = F.log_softmax(teacher[:, :-1].float() / temperature, dim=-1)
    per_token = (target.exp() * (target - student)).sum(-1) * temperature**2
    return (per_token * scored).sum(1) / scored.sum(1).clamp(min=1)


def budget_error(records: list) -> Tensor:
    """Mean over sites and samples with visual tokens of (kept fraction − target fraction)²."""
    errors = []
    for record in records:
        has_visual = record.num_visual > 0
        if not bool(has_visual.any()):
            continue
        total = record.num_visual.clamp(min=1).float()
        kept, target = record.kept_visual.float() / total, record.target.float() / total
        errors.append(((kept - target.to(kept.device)) ** 2)[has_visual].mean())
    if not errors:  # no sample had visual tokens: nothing to keep, nothing to miss
        return torch.zeros(())
    return torch.stack(errors).mean()


def generated_budget_error(records: list) -> Tensor:
    """Mean over records and samples with answer tokens of ((kept − target) / answer tokens)², as Dynamic-LLaVA's
    output-text mask loss (an answer the method keeps whole has target = kept, so adds 0)."""
    errors = []
    for record in records:
        scored = record.num > 0
        if not bool(scored.any()):
            continue
        total = record.num.clamp(min=1).float()
        kept, target = record.kept.float() / total, record.target.to(record.kept.device).float() / total
        errors.append(((kept - target) ** 2)[scored].mean())
    if not errors:
        return torch.zeros(())
    return torch.stack(errors).mean()


__all__ = ["MLLMScorerTrainer", "answer_distillation", "budget_error", "generated_budget_error"]
