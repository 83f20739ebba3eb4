"""The LightningModules that train a layer-skip method (``das``) on a frozen backbone.

A step has two phases (``DASConfig.search_steps`` long, then the rest of the fit):

- search: the step skips a set of layers drawn from the bandit's probabilities (``sigmoid(score)``), ``k`` of them
  (ramped up over ``warmup_steps`` as DAS does), and trains those layers' adapters on the task loss. From
  ``warmup_steps`` on, every ``search_interval`` steps it also draws ``num_subnetworks`` distinct skip sets of the
  same size, scores each on the batch under ``torch.no_grad()`` with reward ``exp(-loss)``, takes the mean reward
  over every process as the baseline, and moves the scores (``tokensift.trainer.rl.bandit_step``); every process
  then holds the scores plus the mean of the processes' increments. A process whose batch has nothing to reward
  (an MLLM batch without answer tokens) still joins both all-reduces, with weight 0.
- fine-tuning: the scores stay; each step skips the ``n`` top-scoring layers, ``n`` drawn uniformly from
  ``[k - finetune_skip_spread, k + finetune_skip_spread]`` (within ``[1, candidates]``), and trains their
  adapters. ``ts.apply(model, artifact, skip_layers=n)`` for ``n`` in that range is thus served by trained adapters;
  outside it the adapters of the extra layers saw only the search phase.

Draws come from a generator seeded by ``(seed, step)``: every process draws the same skip sets without any
communication, and a resumed fit draws what the uninterrupted one would. Gradient accumulation is refused: every
micro-batch of a step would draw the same sets and search again (the bandit's step size times the accumulation).

``LayerSkipTrainer`` trains on an image classifier (cross-entropy on ``labels``, accuracy), ``MLLMLayerSkipTrainer``
on a multimodal LLM (answer cross-entropy, answer accuracy); both are :class:`LayerSkipTraining`, which holds the
phases, the bandit and the validation at several skip counts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from tokensift.scorers.base import LayerSkipMethod
from tokensift.scorers.das import DASMethod
from tokensift.skip import LayerSkipHandle
from tokensift.trainer.base import FrozenBackboneTrainer
from tokensift.trainer.losses import answer_accuracy, answer_loss, answered
from tokensift.trainer.rl import (
    bandit_step,
    mean_step_over_contributors,
    ramped_skip_count,
    reward_baseline,
    sample_distinct_skip_sets,
    sample_skip_set,
)


class LayerSkipTraining(FrozenBackboneTrainer):
    """The shared layer-skip trainer; a subclass says what the task loss and the per-sample correctness are.

    Args:
        backbone: a local ``save_pretrained`` directory (or hub name) of the frozen model.
        method_options: ``DASConfig`` fields (``skip_layers``, ``candidate_layers``, ``dim_replace``, ``bandit_lr``,
            ``num_subnetworks``, ``search_interval``, ``warmup_steps``, ``search_steps``, ``finetune_skip_spread``).
        eval_skip_layers: validation / test accuracy at each of these skip counts besides the trained ``k``
            (the top-scoring layers of the moment).
        lr, weight_decay, warmup_fraction: AdamW over the adapters, linear warm-up then cosine decay.
        attn_implementation: the backbone's attention kernel ("sdpa" or "eager").
        seed: the skip-set draws.
        gradient_checkpointing: recompute the kept blocks' activations during backward.
    """

    method: LayerSkipMethod
    handle: LayerSkipHandle
    trains_layer_skips = True

    def __init__(
        self,
        backbone: str,
        method_options: dict[str, Any] | None = None,
        eval_skip_layers: list[int] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_fraction: float = 0.05,
        attn_implementation: str = "sdpa",
        seed: int = 0,
        gradient_checkpointing: bool = False,
    ):
        super().__init__(
            backbone,
            DASMethod.name,
            method_options,
            lr=lr,
            weight_decay=weight_decay,
            warmup_fraction=warmup_fraction,
            attn_implementation=attn_implementation,
            seed=seed,
            gradient_checkpointing=gradient_checkpointing,
        )
        # not ``seed``: a data module's own ``seed`` would clash with it when Lightning merges the hyperparameters
        self.save_hyperparameters(ignore=["seed"])
        cfg = self.method.config
        counts = [cfg.skip_layers, *(eval_skip_layers or [])]
        for count in counts:
            self.method.check_skip_count(count, field="eval_skip_layers[]")
        self.eval_skip_layers = list(dict.fromkeys(counts))  # the trained k first: the artifact's default
        keys = ["full", *(skip_key(n) for n in self.eval_skip_layers)]
        self.val_acc = nn.ModuleDict({key: self.accuracy_metric() for key in keys})
        self.test_acc = nn.ModuleDict({key: self.accuracy_metric() for key in keys})
        self.train_skip_count = MeanMetric()

    # -- what a subclass says -------------------------------------------------------------------
    def has_reward_signal(self, batch: dict) -> bool:
        """False when the batch has nothing to learn from or reward (the step then only joins the search's
        all-reduces)."""
        return True

    def task_loss(self, batch: dict, inputs: dict) -> Tensor:
        """The scalar loss of one forward with the handle as it is."""
        raise NotImplementedError(f"{type(self).__name__} must implement task_loss(batch, inputs)")

    def update_accuracy(self, metric, batch: dict, inputs: dict) -> None:
        """Update ``metric`` with one forward's correctness, the handle as it is."""
        raise NotImplementedError(f"{type(self).__name__} must implement update_accuracy(metric, batch, inputs)")

    def accuracy_metric(self):
        raise NotImplementedError(f"{type(self).__name__} must implement accuracy_metric()")

    # -- FrozenBackboneTrainer hooks ------------------------------------------------------------
    def build_handle(self) -> LayerSkipHandle:
        return LayerSkipHandle(self.adapter, self.method, 0)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        accumulation = int(getattr(self.trainer, "accumulate_grad_batches", 1))
        if stage == "fit" and accumulation > 1:
            raise ValueError(
                f"{type(self).__name__} cannot accumulate gradients (trainer.accumulate_grad_batches="
                f"{accumulation}): every micro-batch of a step would draw the same skip sets and run its own bandit "
                "search. Set --trainer.accumulate_grad_batches 1 and raise the data's batch_size instead."
            )

    def training_loss(self, batch: dict) -> dict[str, Tensor] | None:
        cfg = self.method.config
        step = int(self.global_step)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rewarded = self.has_reward_signal(batch)
        inputs = self.model_inputs(batch) if rewarded else {}
        terms: dict[str, Tensor] = {}
        if step < cfg.search_steps:
            count = ramped_skip_count(cfg.skip_layers, step + 1, cfg.warmup_steps)
            probabilities = self.method.probabilities().cpu()
            arms = sample_skip_set(probabilities, count, generator)
            self.handle.set_layers(self.method.layers_of(arms))
            searching = step >= cfg.warmup_steps and (step - cfg.warmup_steps) % cfg.search_interval == 0
            if searching:
                # every process joins the search's all-reduces, one without a reward signal with weight 0
                terms["reward_baseline"] = self.search(batch, inputs, count, generator, rewarded)
                self.handle.set_layers(self.method.layers_of(arms))
        else:
            low, high = self.finetune_skip_range()
            count = int(torch.randint(low, high + 1, (1,), generator=generator))
            self.handle.set_skip(count)
        if not rewarded:
            return None  # nothing to learn: the step still takes part in DDP (zero_loss)
        self.method.train()
        loss = self.task_loss(batch, inputs)
        self.train_skip_count(float(count))
        self.log("train/skip_layers", self.train_skip_count, batch_size=self.logged_batch_size(batch))
        return {"loss": loss, **terms}

    def search(
        self, batch: dict, inputs: dict, count: int, generator: torch.Generator, rewarded: bool = True
    ) -> Tensor:
        """One bandit search on this batch: ``num_subnetworks`` distinct skip sets of ``count`` layers, each
        rewarded ``exp(-loss)``; the scores move by DAS's rule. ``rewarded=False``: this process has nothing to
        reward and only joins the all-reduces. Returns the baseline."""
        cfg = self.method.config
        probabilities = self.method.probabilities().cpu()
        skip_sets = sample_distinct_skip_sets(probabilities, count, cfg.num_subnetworks, generator)
        rewards = []
        if rewarded:
            self.method.eval()
            with torch.no_grad():
                for arms in skip_sets:
                    self.handle.set_layers(self.method.layers_of(arms))
                    rewards.append(torch.exp(-self.task_loss(batch, inputs).float()).cpu())
            self.method.train()
        rewards = torch.stack(rewards) if rewards else torch.zeros(0)
        baseline = reward_baseline(rewards, self.sum_over_processes)
        step = bandit_step(probabilities, skip_sets, rewards, baseline, cfg.bandit_lr) if rewarded else None
        step = mean_step_over_contributors(
            step if step is not None else torch.zeros_like(probabilities), rewarded, self.sum_over_processes
        )
        # each process rewarded its own batch: every one adds the mean of their increments (DAS all-reduces)
        scores = self.method.scores
        scores.copy_((scores.float() + step.to(scores.device)).to(scores.dtype))
        return torch.as_tensor(baseline, dtype=torch.float32)

    def sum_over_processes(self, value: Tensor) -> Tensor:
        """``value`` summed over every process of the fit (itself with one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value.to(self.device), reduce_op="sum").cpu()

    def finetune_skip_range(self) -> tuple[int, int]:
        """``(low, high)``: the skip counts fine-tuning draws from, ``k ± finetune_skip_spread`` within
        ``[1, candidates]``."""
        cfg = self.method.config
        low = max(1, cfg.skip_layers - cfg.finetune_skip_spread)
        high = min(len(self.method.candidate_layers), cfg.skip_layers + cfg.finetune_skip_spread)
        return low, high

    def validation_metrics(self, batch: dict, stage: str) -> None:
        """Accuracy unpruned and at each ``eval_skip_layers`` (the top-scoring layers skipped)."""
        metrics = self.budget_metrics(stage)
        inputs = self.model_inputs(batch)
        try:
            with torch.no_grad():
                self.handle.set_skip(0)
                self.update_accuracy(metrics["full"], batch, inputs)
                for count in self.eval_skip_layers:
                    self.handle.set_skip(count)
                    self.update_accuracy(metrics[skip_key(count)], batch, inputs)
        finally:
            self.handle.set_skip(0)

    def default_budget(self) -> dict:
        return {"skip_layers": self.method.config.skip_layers}

    def artifact_extras(self) -> dict:
        # only adapters that fine-tuning trained at those counts earn the claim: a fit that stopped within the
        # search phase (global_step <= search_steps) leaves it out
        if self._trainer is None or int(self.global_step) <= self.method.config.search_steps:
            return {}
        return {"manifest_extra": {"trained_skip_range": list(self.finetune_skip_range())}}


class LayerSkipTrainer(LayerSkipTraining):
    """Train ``das`` on a frozen image classifier (ViT / CLIP / SigLIP): cross-entropy on ``labels``."""

    def task_loss(self, batch: dict, inputs: dict) -> Tensor:
        return F.cross_entropy(self.logits(inputs), batch["labels"])

    def update_accuracy(self, metric, batch: dict, inputs: dict) -> None:
        metric.update(self.logits(inputs), batch["labels"])

    def accuracy_metric(self):
        # micro: the fraction of correct samples, as ScorerTrainer and `tokensift bench` report it
        return MulticlassAccuracy(int(self.backbone.config.num_labels), average="micro")


class MLLMLayerSkipTrainer(LayerSkipTraining):
    """Train ``das`` on a frozen LLaVA / Qwen2-VL's decoder layers: answer cross-entropy, answer accuracy."""

    multimodal = True

    def has_reward_signal(self, batch: dict) -> bool:
        return bool(answered(batch["labels"]).any())

    def task_loss(self, batch: dict, inputs: dict) -> Tensor:
        labels = batch["labels"]
        rows = answered(labels)
        if not bool(rows.any()):
            raise ValueError("batch['labels'] marks no answer token (all -100): das learns from the answer.")
        return answer_loss(self.logits(inputs), labels)[rows].mean()

    def update_accuracy(self, metric, batch: dict, inputs: dict) -> None:
        labels = batch["labels"]
        rows = answered(labels)
        if bool(rows.any()):
            metric.update(answer_accuracy(self.logits(inputs), labels)[rows])

    def accuracy_metric(self):
        return MeanMetric()


def skip_key(count: int) -> str:
    """The metric name of a skip count: ``skip2`` (``full``: nothing skipped)."""
    return f"skip{count}"


__all__ = ["LayerSkipTrainer", "LayerSkipTraining", "MLLMLayerSkipTrainer", "skip_key"]
