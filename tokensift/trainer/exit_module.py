"""The LightningModule that trains DyVTE's exit routers on a frozen multimodal LLM.

Each step picks a decoder layer ``k`` (uniformly from ``train_layers``) and runs the batch twice through
the same frozen model, no second copy of the weights: with its visual tokens (the handle disabled: the
teacher) and with every sample's visual tokens removed from layer ``k`` on (the handle with keep count 0
at ``llm.<k>``). A sample is labelled *exit* where the two agree on its answer tokens: the fraction of
answer positions with the same argmax is at least ``agreement_threshold`` and the exited pass's loss on
them is at most ``loss_factor`` times the full pass's. The router at layer ``k`` reads the text summary
(mean text state ⊕ last text state) that the pruned pass had at layer ``k``, which is the unpruned pass's
(layers before ``k`` see every token) and exactly what it reads at inference, and is trained with
cross-entropy on those labels.

Batches carry the model's inputs and ``labels`` ([B, L], -100 everywhere but the answer tokens, shifted
inside as for a causal LM: ``labels[:, t]`` is predicted at position ``t - 1``); how a batch becomes the
model's inputs is :meth:`tokensift.trainer.base.FrozenBackboneTrainer.model_inputs`, which owns the rest of the
plumbing too (backbone, optimiser, checkpoints, NaN stop).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from tokensift.budget import Budget
from tokensift.flops import last_prefill_flops
from tokensift.reduce_mllm import MLLMPruningHandle
from tokensift.scorers.dyvte import DyVTEMethod, check_threshold
from tokensift.trainer.base import FrozenBackboneTrainer
from tokensift.trainer.losses import IGNORE_INDEX, answer_accuracy, answer_loss, answered


def exit_labels(
    full_logits: Tensor,
    exit_logits: Tensor,
    labels: Tensor,
    agreement_threshold: float = 0.99,
    loss_factor: float = 1.03,
) -> dict[str, Tensor]:
    """DyVTE's label per sample: may its visual tokens exit?

    Args:
        full_logits, exit_logits: ``[B, L, V]`` logits of the unpruned pass and of the pass whose visual
            tokens left at the layer being labelled.
        labels: ``[B, L]`` target tokens, ``-100`` where not scored; ``labels[:, t]`` is predicted by
            ``logits[:, t - 1]`` (transformers' causal-LM convention).
        agreement_threshold: the fraction of a sample's answer positions whose argmax must agree.
        loss_factor: the exited pass's mean cross-entropy on the answer may be at most this times the full one's.

    Returns ``exit`` ([B] bool), ``scored`` ([B] bool: the sample has answer tokens; the others carry no
    label), ``agreement`` ([B], fraction of agreeing answer argmaxes), ``full_loss`` and ``exit_loss`` ([B]).
    """
    if full_logits.shape != exit_logits.shape or full_logits.shape[:2] != labels.shape:
        raise ValueError(
            f"full_logits {tuple(full_logits.shape)} and exit_logits {tuple(exit_logits.shape)} must be [B, L, V] "
            f"and labels {tuple(labels.shape)} [B, L]."
        )
    scored_positions = labels[:, 1:] != IGNORE_INDEX
    count = scored_positions.sum(1)
    full, exited = full_logits[:, :-1].float(), exit_logits[:, :-1].float()
    agree = (full.argmax(-1) == exited.argmax(-1)) & scored_positions
    agreement = agree.sum(1) / count.clamp(min=1)
    full_loss, exit_loss = answer_loss(full_logits, labels), answer_loss(exit_logits, labels)
    scored = count > 0
    exits = scored & (agreement >= agreement_threshold) & (exit_loss <= loss_factor * full_loss)
    return {"exit": exits, "scored": scored, "agreement": agreement, "full_loss": full_loss, "exit_loss": exit_loss}


class ExitRouterTrainer(FrozenBackboneTrainer):
    """Train DyVTE's exit routers on the frozen multimodal LLM ``backbone``.

    Args:
        backbone: a local ``save_pretrained`` directory (or hub name) of a LLaVA or Qwen2-VL model.
        method_options: ``DyVTEConfig`` fields (``router_width``, ``shared_router``, ``output``, ``sites``...);
            ``hidden_size``, ``num_layers`` and ``sites`` default to the backbone's.
        train_layers: the decoder layers ``k`` a step may label (default: every router layer); each must
            have a router.
        agreement_threshold: an *exit* label needs at least this fraction of answer argmaxes to agree (0.99).
        loss_factor: and the exited pass's answer loss at most this times the full pass's (1.03).
        val_layers: validation (and test) labels every sample at each of these layers and reports the routers'
            accuracy on them (``val/acc``, monitored; default: every router layer: one more forward per layer).
        eval_thresholds: validation (and test) also runs the model with the routers deciding at each of these
            thresholds and reports answer accuracy, agreement with the unpruned model, mean exit layer and
            the FLOPs ratio; the first is the artifact's default.
        lr, weight_decay, warmup_fraction: AdamW with linear warm-up then cosine decay.
        attn_implementation: the backbone's attention kernel ("sdpa" or "eager").
        seed: seeds the choice of layer per step.
    """

    multimodal = True
    method: DyVTEMethod

    def __init__(
        self,
        backbone: str,
        method_options: dict[str, Any] | None = None,
        train_layers: list[int] | None = None,
        agreement_threshold: float = 0.99,
        loss_factor: float = 1.03,
        val_layers: list[int] | None = None,
        eval_thresholds: list[float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_fraction: float = 0.05,
        attn_implementation: str = "sdpa",
        seed: int = 0,
    ):
        if isinstance(agreement_threshold, bool) or not 0.0 <= float(agreement_threshold) <= 1.0:
            raise ValueError(
                f"agreement_threshold must be a fraction in [0, 1] (DyVTE: 0.99), got {agreement_threshold!r}."
            )
        if isinstance(loss_factor, bool) or not float(loss_factor) > 0.0:
            raise ValueError(f"loss_factor must be > 0 (DyVTE: 1.03), got {loss_factor!r}.")
        eval_thresholds = list(eval_thresholds if eval_thresholds is not None else [0.5])
        if not eval_thresholds:
            raise ValueError("eval_thresholds is empty; give at least one exit threshold in [0, 1] (e.g. [0.5]).")
        eval_thresholds = [check_threshold(t, "eval_thresholds[]") for t in eval_thresholds]
        super().__init__(
            backbone,
            DyVTEMethod.name,
            method_options,
            lr=lr,
            weight_decay=weight_decay,
            warmup_fraction=warmup_fraction,
            attn_implementation=attn_implementation,
            seed=seed,
        )
        self.save_hyperparameters()
        router_layers = self.method.config.layers
        self.train_layers = _check_layers("train_layers", train_layers, router_layers)
        self.val_layers = _check_layers("val_layers", val_layers, router_layers)
        self.agreement_threshold, self.loss_factor = float(agreement_threshold), float(loss_factor)
        self.eval_thresholds = eval_thresholds
        self.train_router_acc = BinaryAccuracy()
        self.train_exit_label_rate = MeanMetric()
        self.eval_metrics = nn.ModuleDict({stage: _evaluation_metrics(eval_thresholds) for stage in ("val", "test")})

    # -- FrozenBackboneTrainer hooks ------------------------------------------------------------
    def build_handle(self) -> MLLMPruningHandle:
        # a dummy keep-ratio budget: the routers decide each sample's exit, the budget is their threshold
        return MLLMPruningHandle(self.adapter, self.method, Budget(keep_ratio=1.0))

    def training_loss(self, batch: dict) -> dict[str, Tensor] | None:
        inputs, labels = self.model_inputs(batch), batch["labels"]
        layer = self._rng.choice(self.train_layers)
        full_logits = self._forward(inputs, exit_layer=None)
        exit_logits, summary = self._forward_exiting(inputs, layer)
        if summary is None:  # no visual tokens in the batch: nothing to decide, nothing to learn
            return None
        target = exit_labels(full_logits, exit_logits, labels, self.agreement_threshold, self.loss_factor)
        scored = target["scored"]
        if not bool(scored.any()):
            raise ValueError("batch['labels'] marks no answer token (all -100): the exit label needs the answer.")
        logits = self.method.router_logits(*summary, layer)
        loss = _router_loss(logits, target["exit"], scored, self.method.config.output)
        predicted = self._predicted_exit(logits)
        batch_size = int(scored.sum())
        self.train_router_acc(predicted[scored], target["exit"][scored])
        self.train_exit_label_rate(target["exit"][scored].float())
        self.log("train/router_acc", self.train_router_acc, prog_bar=True, batch_size=batch_size)
        self.log("train/exit_label_rate", self.train_exit_label_rate, batch_size=batch_size)
        self.log("train/layer", float(layer), batch_size=batch_size)
        return {"loss": loss}

    def validation_metrics(self, batch: dict, stage: str) -> None:
        metrics = self.eval_metrics[stage]
        inputs, labels = self.model_inputs(batch), batch["labels"]
        full_logits = self._forward(inputs, exit_layer=None)
        scored = answered(labels)
        metrics["answer_acc_full"].update(answer_accuracy(full_logits, labels)[scored])
        for layer in self.val_layers:
            exit_logits, summary = self._forward_exiting(inputs, layer)
            if summary is None:
                return
            target = exit_labels(full_logits, exit_logits, labels, self.agreement_threshold, self.loss_factor)
            labelled = target["scored"]
            predicted = self._predicted_exit(self.method.router_logits(*summary, layer))
            metrics["router_acc"].update(predicted[labelled], target["exit"][labelled])
            metrics["exit_label_rate"].update(target["exit"][labelled].float())
        for threshold in self.eval_thresholds:
            at_threshold = metrics["thresholds"][_key(threshold)]
            self.method.threshold = threshold
            pruned_logits = self._forward(inputs, exit_layer=None, pruned=True)
            agreement = exit_labels(full_logits, pruned_logits, labels)["agreement"]
            at_threshold["answer_acc"].update(answer_accuracy(pruned_logits, labels)[scored])
            at_threshold["agreement"].update(agreement[scored])
            has_visual = self.handle.last_num_visual > 0  # a sample without visual tokens has nothing to exit
            at_threshold["exit_layer"].update(self.handle.exit_layers[has_visual].float())
            at_threshold["flops_ratio"].update(last_prefill_flops(self.handle)["per_sample_ratio"].float())

    def log_validation_metrics(self, stage: str) -> None:
        metrics = self.eval_metrics[stage]
        self.log(f"{stage}/acc", metrics["router_acc"].compute(), prog_bar=True, sync_dist=True)
        self.log(f"{stage}/exit_label_rate", metrics["exit_label_rate"].compute(), sync_dist=True)
        self.log(f"{stage}/answer_acc_full", metrics["answer_acc_full"].compute(), sync_dist=True)
        for name, at_threshold in metrics["thresholds"].items():
            for metric_name, metric in at_threshold.items():
                self.log(f"{stage}/{metric_name}_{name}", metric.compute(), sync_dist=True)
                metric.reset()
        for key in ("router_acc", "exit_label_rate", "answer_acc_full"):
            metrics[key].reset()

    def default_budget(self) -> dict:
        return {"threshold": self.eval_thresholds[0]}

    def artifact_extras(self) -> dict:
        return {
            "manifest_extra": {
                "trained_layers": list(self.train_layers),
                "exit_label_rule": {"agreement_threshold": self.agreement_threshold, "loss_factor": self.loss_factor},
            }
        }

    # -- helpers --------------------------------------------------------------------------------
    def _forward(self, inputs: dict, exit_layer: int | None, pruned: bool = False) -> Tensor:
        """Logits of one frozen pass: unpruned, every sample exiting at ``exit_layer``, or the routers deciding."""
        self.method.forced_exit_layer = exit_layer
        self.handle.enabled = pruned or exit_layer is not None
        try:
            with torch.no_grad():
                return self.logits(inputs)
        finally:
            self.method.forced_exit_layer = None
            self.handle.enabled = False  # a forward outside the trainer's own passes runs unpruned

    def _forward_exiting(self, inputs: dict, layer: int) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Logits with every sample's visual tokens gone from ``layer`` on, and the text summary at ``layer``."""
        self.method.forced_summary = None
        logits = self._forward(inputs, exit_layer=layer)
        summary, self.method.forced_summary = self.method.forced_summary, None
        return logits, summary

    def _predicted_exit(self, router_logits: Tensor) -> Tensor:
        if self.method.config.output == "two_way":
            return router_logits.argmax(-1) == 1
        return router_logits[:, 0] > 0


def _evaluation_metrics(thresholds: list[float]) -> nn.ModuleDict:
    """One stage's metrics: the routers' accuracy on the exit labels, the label rate, the unpruned answer accuracy,
    and per threshold the routers deciding: answer accuracy, agreement, mean exit layer, FLOPs ratio."""
    per_threshold = ("answer_acc", "agreement", "exit_layer", "flops_ratio")
    return nn.ModuleDict(
        {
            "router_acc": BinaryAccuracy(),
            "exit_label_rate": MeanMetric(),
            "answer_acc_full": MeanMetric(),
            "thresholds": nn.ModuleDict(
                {_key(t): nn.ModuleDict({name: MeanMetric() for name in per_threshold}) for t in thresholds}
            ),
        }
    )


def _router_loss(logits: Tensor, exits: Tensor, scored: Tensor, output: str) -> Tensor:
    """Cross-entropy of the router on the samples that carry a label."""
    if output == "two_way":
        return F.cross_entropy(logits[scored].float(), exits[scored].long())
    return F.binary_cross_entropy_with_logits(logits[scored, 0].float(), exits[scored].float())


def _check_layers(field: str, layers: list[int] | None, router_layers: list[int]) -> list[int]:
    if layers is None:
        return list(router_layers)
    layers = list(layers)
    if not layers:
        raise ValueError(f"{field} is empty; give decoder layers with a router ({router_layers}), or null for all.")
    unknown = [k for k in layers if isinstance(k, bool) or not isinstance(k, int) or k not in router_layers]
    if unknown:
        raise ValueError(f"{field} holds {unknown}, which have no router; routers sit at layers {router_layers}.")
    return sorted(set(layers))


def _key(threshold: float) -> str:
    return f"t{threshold:g}".replace(".", "_")
