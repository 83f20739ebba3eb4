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
inside as for a causal LM: ``labels[:, t]`` is predicted at position ``t - 1``). A LLaVA batch, digit
VQA's (:mod:`tokensift.data.digit_vqa`) included, passes as is, with padding-aware ``position_ids`` added
when it has none; a Qwen2-VL batch passes as is when it holds ``image_grid_thw``, and a digit-VQA one
(images ``[B, C, H, W]``) becomes patches and grids through :func:`tokensift.backbones.vqa.mllm_inputs`.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from tokensift.backbones import MLLMAdapter, adapt
from tokensift.backbones.loading import load_mllm_backbone
from tokensift.backbones.vqa import mllm_inputs, padded_position_ids
from tokensift.budget import Budget
from tokensift.flops import last_prefill_flops
from tokensift.reduce_mllm import MLLMPruningHandle
from tokensift.scorers.dyvte import DyVTEConfig, DyVTEMethod, check_threshold
from tokensift.trainer.module import ReliableTraining, _check_optimizer_args
from tokensift.trainer.schedule import warmup_cosine

CHECKPOINT_KEY = "tokensift"
IGNORE_INDEX = -100
# keys of a batch that are the model's own inputs (a Qwen2-VL batch with patches and grids passes as is)
_MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "position_ids")


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
    targets = labels[:, 1:]
    scored_positions = targets != IGNORE_INDEX
    full, exited = full_logits[:, :-1].float(), exit_logits[:, :-1].float()
    count = scored_positions.sum(1)
    safe_targets = targets.clamp(min=0)
    agree = (full.argmax(-1) == exited.argmax(-1)) & scored_positions
    agreement = agree.sum(1) / count.clamp(min=1)

    def answer_loss(logits: Tensor) -> Tensor:
        per_token = F.cross_entropy(logits.transpose(1, 2), safe_targets, reduction="none")
        return (per_token * scored_positions).sum(1) / count.clamp(min=1)

    full_loss, exit_loss = answer_loss(full), answer_loss(exited)
    scored = count > 0
    exits = scored & (agreement >= agreement_threshold) & (exit_loss <= loss_factor * full_loss)
    return {"exit": exits, "scored": scored, "agreement": agreement, "full_loss": full_loss, "exit_loss": exit_loss}


class ExitRouterTrainer(ReliableTraining, L.LightningModule):
    """Train DyVTE's exit routers on the frozen multimodal LLM ``backbone``.

    Args:
        backbone: a local ``save_pretrained`` directory (or hub name) of a LLaVA or Qwen2-VL model.
        method_options: ``DyVTEConfig`` fields (``router_width``, ``shared_router``, ``output``, ``sites``...);
            ``hidden_size``, ``num_layers`` and ``sites`` default to the backbone's.
        train_layers: the decoder layers ``k`` a step may label (default: every router layer); each must
            have a router.
        agreement_threshold: an *exit* label needs at least this fraction of answer argmaxes to agree (0.99).
        loss_factor: and the exited pass's answer loss at most this times the full pass's (1.03).
        val_layers: validation labels every sample at each of these layers and reports the routers' accuracy
            on them (``val/acc``, monitored; default: every router layer: one more forward per layer).
        eval_thresholds: validation also runs the model with the routers deciding at each of these
            thresholds and reports answer accuracy, agreement with the unpruned model, mean exit layer and
            the FLOPs ratio; the first is the artifact's default.
        lr, weight_decay, warmup_fraction: AdamW with linear warm-up then cosine decay.
        attn_implementation: the backbone's attention kernel ("sdpa" or "eager").
        seed: seeds the choice of layer per step.
    """

    strict_loading = False  # checkpoints leave out the frozen backbone; it is rebuilt from `backbone`

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
        super().__init__()
        if isinstance(agreement_threshold, bool) or not 0.0 <= float(agreement_threshold) <= 1.0:
            raise ValueError(
                f"agreement_threshold must be a fraction in [0, 1] (DyVTE: 0.99), got {agreement_threshold!r}."
            )
        if isinstance(loss_factor, bool) or not float(loss_factor) > 0.0:
            raise ValueError(f"loss_factor must be > 0 (DyVTE: 1.03), got {loss_factor!r}.")
        _check_optimizer_args(lr, weight_decay, warmup_fraction)
        eval_thresholds = list(eval_thresholds if eval_thresholds is not None else [0.5])
        if not eval_thresholds:
            raise ValueError("eval_thresholds is empty; give at least one exit threshold in [0, 1] (e.g. [0.5]).")
        eval_thresholds = [check_threshold(t, "eval_thresholds[]") for t in eval_thresholds]
        self.save_hyperparameters()
        self.backbone = load_mllm_backbone(backbone, attn_implementation=attn_implementation)
        self.adapter = adapt(self.backbone)
        if not isinstance(self.adapter, MLLMAdapter):
            raise ValueError(f"backbone {backbone!r} is not a multimodal LLM; exit routers need LLaVA or Qwen2-VL.")
        _freeze(self.backbone)
        self.backbone_fingerprint = self.adapter.fingerprint()
        config = DyVTEConfig.from_dict(method_options)
        self.method = DyVTEMethod.for_backbone(self.adapter, config)
        router_layers = self.method.config.layers
        self.train_layers = _check_layers("train_layers", train_layers, router_layers)
        self.val_layers = _check_layers("val_layers", val_layers, router_layers)
        self.agreement_threshold, self.loss_factor = float(agreement_threshold), float(loss_factor)
        self.eval_thresholds = eval_thresholds
        self.handle = MLLMPruningHandle(self.adapter, self.method, Budget(keep_ratio=1.0))
        self._rng = random.Random(seed)
        self.train_router_acc = BinaryAccuracy()
        self.train_exit_label_rate = MeanMetric()
        self.val_router_acc = BinaryAccuracy()
        self.val_exit_label_rate = MeanMetric()
        self.val_answer_acc_full = MeanMetric()
        self.val_at_threshold = nn.ModuleDict(
            {
                _key(t): nn.ModuleDict(
                    {
                        "answer_acc": MeanMetric(),
                        "agreement": MeanMetric(),
                        "exit_layer": MeanMetric(),
                        "flops_ratio": MeanMetric(),
                    }
                )
                for t in self.eval_thresholds
            }
        )

    # -- Lightning hooks ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ExitRouterTrainer:
        super().train(mode)
        self.backbone.eval()  # frozen means frozen: dropout stays off during fit
        return self

    def setup(self, stage: str) -> None:
        self._install_reliability()
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            strategy.exclude_frozen_parameters = True  # the backbone is rebuilt from `backbone`
        elif isinstance(strategy, DDPStrategy) and self.method.has_unused_parameters:
            # one router gets a gradient per step; DDP must look for the others
            strategy._ddp_kwargs.setdefault("find_unused_parameters", True)

    def configure_optimizers(self):
        params = [p for p in self.method.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self._total_steps()
        schedule = warmup_cosine(optimizer, total, warmup_fraction=self.hparams.warmup_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        inputs, labels = self.model_inputs(batch), _labels(batch)
        layer = self._rng.choice(self.train_layers)
        full_logits = self._forward(inputs, exit_layer=None)
        exit_logits, summary = self._forward_exiting(inputs, layer)
        if summary is None:  # no visual tokens in the batch: nothing to decide, nothing to learn
            # a zero loss on every router rather than a skipped step, which would stall the other DDP ranks
            return sum(p.sum() for p in self.method.parameters()) * 0.0
        target = exit_labels(full_logits, exit_logits, labels, self.agreement_threshold, self.loss_factor)
        scored = target["scored"]
        if not bool(scored.any()):
            raise ValueError("batch['labels'] marks no answer token (all -100): the exit label needs the answer.")
        logits = self.method.router_logits(*summary, layer)
        loss = _router_loss(logits, target["exit"], scored, self.method.config.output)
        self._check_finite_loss(loss)
        predicted = self._predicted_exit(logits)
        batch_size = int(scored.sum())
        self.train_router_acc(predicted[scored], target["exit"][scored])
        self.train_exit_label_rate(target["exit"][scored].float())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/router_acc", self.train_router_acc, prog_bar=True, batch_size=batch_size)
        self.log("train/exit_label_rate", self.train_exit_label_rate, batch_size=batch_size)
        self.log("train/layer", float(layer), batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        inputs, labels = self.model_inputs(batch), _labels(batch)
        full_logits = self._forward(inputs, exit_layer=None)
        answer = labels[:, 1:] != IGNORE_INDEX
        self.val_answer_acc_full.update(_answer_accuracy(full_logits, labels)[answer.any(1)])
        for layer in self.val_layers:
            exit_logits, summary = self._forward_exiting(inputs, layer)
            if summary is None:
                return
            target = exit_labels(full_logits, exit_logits, labels, self.agreement_threshold, self.loss_factor)
            scored = target["scored"]
            predicted = self._predicted_exit(self.method.router_logits(*summary, layer))
            self.val_router_acc.update(predicted[scored], target["exit"][scored])
            self.val_exit_label_rate.update(target["exit"][scored].float())
        for threshold in self.eval_thresholds:
            metrics = self.val_at_threshold[_key(threshold)]
            self.method.threshold = threshold
            pruned_logits = self._forward(inputs, exit_layer=None, pruned=True)
            scored = answer.any(1)
            agreement = exit_labels(full_logits, pruned_logits, labels)["agreement"]
            metrics["answer_acc"].update(_answer_accuracy(pruned_logits, labels)[scored])
            metrics["agreement"].update(agreement[scored])
            has_visual = self.handle.last_num_visual > 0  # a sample without visual tokens has nothing to exit
            metrics["exit_layer"].update(self.handle.exit_layers[has_visual].float())
            metrics["flops_ratio"].update(last_prefill_flops(self.handle)["per_sample_ratio"].float())

    def on_validation_epoch_end(self) -> None:
        self.log("val/acc", self.val_router_acc.compute(), prog_bar=True, sync_dist=True)
        self.log("val/exit_label_rate", self.val_exit_label_rate.compute(), sync_dist=True)
        self.log("val/answer_acc_full", self.val_answer_acc_full.compute(), sync_dist=True)
        for name, metrics in self.val_at_threshold.items():
            for metric_name, metric in metrics.items():
                self.log(f"val/{metric_name}_{name}", metric.compute(), sync_dist=True)
                metric.reset()
        for metric in (self.val_router_acc, self.val_exit_label_rate, self.val_answer_acc_full):
            metric.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("backbone.")]:
            del state[key]  # frozen and reloadable: keeps checkpoints router-sized
        checkpoint[CHECKPOINT_KEY] = self.artifact_metadata()
        self._save_reliability_state(checkpoint)

    # -- helpers --------------------------------------------------------------------------------
    def artifact_metadata(self) -> dict:
        """What ``tokensift export`` needs to write the artifact (the checkpoint's ``tokensift`` entry)."""
        return {
            "method": self.method.name,
            "config": asdict(self.method.config),
            "fingerprint": self.backbone_fingerprint,
            "backbone": self.hparams.backbone,
            "lora": None,
            "backbone_trained": False,
            "default_budget": {"threshold": self.eval_thresholds[0]},
            "manifest_extra": {
                "trained_layers": list(self.train_layers),
                "exit_label_rule": {"agreement_threshold": self.agreement_threshold, "loss_factor": self.loss_factor},
            },
        }

    def model_inputs(self, batch: dict) -> dict:
        """The model's forward arguments from a batch (see the module docstring)."""
        if self.adapter.family.multimodal_rope and "image_grid_thw" not in batch:
            return mllm_inputs(self.backbone, batch)  # digit-VQA images -> Qwen2-VL's patches and grids
        inputs = {key: batch[key] for key in _MODEL_INPUTS if key in batch}
        mask = inputs.get("attention_mask")
        if not self.adapter.family.multimodal_rope and "position_ids" not in inputs and mask is not None:
            # left padding: number positions from each sample's first real token, as generate() does, so the
            # routers train on the hidden states they will read at inference
            inputs["position_ids"] = padded_position_ids(mask)
        return inputs

    def _forward(self, inputs: dict, exit_layer: int | None, pruned: bool = False) -> Tensor:
        """Logits of one frozen pass: unpruned, every sample exiting at ``exit_layer``, or the routers deciding."""
        self.method.forced_exit_layer = exit_layer
        self.handle.enabled = pruned or exit_layer is not None
        try:
            with torch.no_grad():
                return self.backbone(**inputs, use_cache=False).logits
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


def _router_loss(logits: Tensor, exits: Tensor, scored: Tensor, output: str) -> Tensor:
    """Cross-entropy of the router on the samples that carry a label."""
    if output == "two_way":
        return F.cross_entropy(logits[scored].float(), exits[scored].long())
    return F.binary_cross_entropy_with_logits(logits[scored, 0].float(), exits[scored].float())


def _answer_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """``[B]`` fraction of each sample's answer tokens predicted right (argmax)."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    right = (logits[:, :-1].argmax(-1) == targets) & scored
    return right.sum(1) / scored.sum(1).clamp(min=1)


def _labels(batch: dict) -> Tensor:
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(
            "exit-router batches need 'labels' ([B, L], -100 except the answer tokens): the exit label compares "
            "answers; build the data module with answers (digit VQA: with_answer=True)."
        )
    return labels


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


def _freeze(model: nn.Module) -> None:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def _key(threshold: float) -> str:
    return f"t{threshold:g}".replace(".", "_")
