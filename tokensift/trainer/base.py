"""``FrozenBackboneTrainer``: what every tokensift trainer does around a frozen backbone.

A tokensift trainer trains a small module (a token scorer, exit routers) on a backbone whose own weights stay as
they were: it loads and freezes the backbone, fingerprints it, optionally adds LoRA adapters or unfreezes it at a
lower learning rate, builds the method and the pruning handle, and owns the optimiser, the schedule, the
per-strategy options, the checkpoint contents and the NaN stop. A subclass says what one step computes.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tokensift.backbones import MLLMAdapter, adapt
from tokensift.backbones import load_backbone as load_vision_backbone
from tokensift.backbones.loading import load_mllm_backbone
from tokensift.backbones.lora import add_lora, is_lora_parameter, lora_modules
from tokensift.backbones.vqa import mllm_inputs, padded_position_ids
from tokensift.schedule import warmup_cosine
from tokensift.scorers import TokenMethod, get_method_class
from tokensift.scorers.registry import methods as registered_methods
from tokensift.trainer.losses import IGNORE_INDEX, answered
from tokensift.trainer.reliability import (
    RNG_KEY,
    AtomicCheckpointIO,
    NonFiniteLossError,
    as_random_state,
    global_rng_state,
    last_checkpoint_paths,
    remove_stale_partial_files,
    set_global_rng_state,
)

CHECKPOINT_KEY = "tokensift"
# keys of a multimodal batch that are the model's own inputs (a Qwen2-VL batch with patches and grids passes as is)
MLLM_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "mm_token_type_ids",
    "position_ids",
    "pixel_values_videos",  # videos: Qwen2-VL's patches and grids, Molmo2's frames, pooling indices and grids
    "video_grid_thw",
    "video_token_pooling",
    "video_grids",
    "image_token_pooling",  # Molmo2's images
    "image_grids",
    "image_num_crops",
)


class FrozenBackboneTrainer(L.LightningModule):
    """A LightningModule that trains ``method`` on a frozen backbone; subclasses say what one step computes.

    Owned here (a subclass writes none of it):

    - the backbone: loaded (an image classifier, or a multimodal LLM when ``multimodal``), frozen and kept in
      eval mode, fingerprinted before LoRA or ZeRO-3 change what ``named_parameters`` shows; LoRA adapters
      (``lora``), an unfrozen backbone (``backbone_lr_factor``), activation checkpointing of its blocks;
    - the method (any learned method of the registry, ``check_method`` may refuse more) and the handle
      (``build_handle``);
    - the optimiser: AdamW over ``parameter_groups()`` (``scorer``, ``lora``, ``backbone``), linear warm-up then
      cosine decay per step;
    - per-strategy options (``setup``): ``exclude_frozen_parameters`` under DeepSpeed, ``find_unused_parameters``
      under DDP only when ``has_unused_parameters()``;
    - randomness: ``self._rng`` (``random.Random(seed)``) draws what a step samples (keep ratio, layer) and is
      checkpointed with the global generators; ``name_samples`` gives the handle each row's dataset index and
      ``draw=(seed, step)``, so a sample's noise is the same on any rank and in any batch;
    - checkpoints: the frozen backbone left out (LoRA and a trained backbone kept), the artifact metadata under
      ``"tokensift"`` (``artifact_metadata``), random state under ``"tokensift_rng"``, written atomically; the
      train loader's mid-epoch state re-applied on resume;
    - the NaN stop: a non-finite input, loss or gradient raises :class:`NonFiniteLossError` naming the step
      before any weight changes;
    - the Lightning steps: ``training_step`` checks the batch, calls ``training_loss``, checks and logs its
      terms (``train/<term>``; ``train/keep_fraction`` and ``train/keep_target`` when the step sampled a keep
      ratio); ``validation_step`` / ``test_step`` call ``validation_metrics``; the epoch ends call
      ``log_validation_metrics``.

    Hooks a subclass implements:

    - ``build_handle()`` -> the pruning handle on ``self.adapter`` / ``self.method`` (called at the end of
      ``__init__``);
    - ``training_loss(batch)`` -> ``{"loss": ..., <term>: ...}``: every entry is logged as ``train/<term>``
      (``budget`` averaged over ranks, ``synced_terms``); ``None`` when the batch has nothing to learn (the step
      then returns ``zero_loss()``, so DDP ranks stay in step). It may ``self.log`` more (metrics as module
      attributes, torchmetrics);
    - ``validation_metrics(batch, stage)``: update the metrics of ``stage`` (``"val"`` / ``"test"``);
    - ``log_validation_metrics(stage)``: compute, log (``sync_dist=True``) and reset them; ``<stage>/acc`` is
      what the default checkpoint callback monitors;
    - ``default_budget()`` -> the artifact's default budget; ``artifact_extras()`` -> more checkpoint metadata
      (optional); ``check_method(cls)`` (optional) refuses a method the subclass cannot train.

    Helpers for the hooks: ``model_inputs(batch)`` and ``logits(inputs)`` (one forward of the backbone, whatever
    its kind), ``teacher()`` (the same weights with the handle off and no graph), ``prepare_pruned_pass(batch)``
    (samples the step's keep ratio, the handle in mask mode at it, ``name_samples``), ``needs_budget_term``
    (``not method.keeps_budget_count``), ``logged_batch_size(batch)``.

    ``ScorerTrainer`` (image classifiers) and ``ExitRouterTrainer`` (DyVTE) are the two subclasses. A scorer
    trainer on a frozen multimodal LLM is one more, short one:

    - ``multimodal = True``; its ``__init__`` checks its own arguments (``eval_keep_ratios``, loss weights), calls
      ``super().__init__(backbone, method, method_options, keep_ratio_range=..., lr=..., ..., lora=...)``, then
      ``self.save_hyperparameters()`` and builds its metrics (answer accuracy per eval budget, torchmetrics);
    - ``check_method(cls)``: ``super().check_method(cls)``, and a method with ``pre_llm`` / ``llm`` sites;
    - ``build_handle()``: ``MLLMPruningHandle(self.adapter, self.method, Budget(keep_ratio=high), mode="mask")``;
    - ``training_loss(batch)``: ``inputs = self.model_inputs(batch)``; ``with self.teacher(): teacher =
      self.logits(inputs)`` (the unpruned answer distribution, same weights); ``self.prepare_pruned_pass(batch)``;
      ``logits = self.logits(inputs)``; the terms: answer cross-entropy (``losses.answer_loss`` over
      ``losses.answered`` samples), KL to ``teacher`` on the answer positions, and the budget term (each record's
      ``keep_fraction`` vs its target, which on an ``MLLMSiteRecord`` is a count: ``target / num_visual``) only
      where ``self.needs_budget_term``; ``None`` for a batch without visual tokens;
    - ``validation_metrics(batch, stage)``: answer accuracy (``losses.answer_accuracy``) unpruned
      (``with self.teacher()``) and in gather mode at each eval keep ratio; ``log_validation_metrics(stage)``;
    - ``default_budget()``: ``{"keep_ratio": eval_keep_ratios[0]}``.

    Args (subclasses pass them on; see ``ScorerTrainer`` for their meaning): ``backbone``, ``method``,
    ``method_options``, ``keep_ratio_range`` (``None``: the steps sample no keep ratio), ``lr``, ``weight_decay``,
    ``warmup_fraction``, ``attn_implementation``, ``seed``, ``lora``, ``lora_lr_factor``, ``backbone_lr_factor``,
    ``gradient_checkpointing``.
    """

    strict_loading = False  # checkpoints leave out the frozen backbone; it is rebuilt from `backbone`
    multimodal: ClassVar[bool] = False  # the backbone is a multimodal LLM (LLaVA, Qwen2-VL), not an image classifier
    synced_terms: ClassVar[tuple[str, ...]] = ("budget",)  # loss terms averaged over ranks when logged
    trains_layer_skips: ClassVar[bool] = False  # trains a layer-skip method (das) rather than a token method
    trains_by_reward: ClassVar[bool] = False  # trains policies whose sampled decisions have no gradient

    def __init__(
        self,
        backbone: str,
        method: str,
        method_options: dict[str, Any] | None = None,
        *,
        keep_ratio_range: tuple[float, float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_fraction: float = 0.05,
        attn_implementation: str = "sdpa",
        seed: int = 0,
        lora: dict[str, Any] | None = None,
        lora_lr_factor: float = 1.0,
        backbone_lr_factor: float | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if keep_ratio_range is not None:
            low, high = keep_ratio_range
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"keep_ratio_range must satisfy 0 < low <= high <= 1, got {keep_ratio_range}.")
            keep_ratio_range = (float(low), float(high))
        if not lora_lr_factor > 0:
            raise ValueError(f"lora_lr_factor must be > 0, got {lora_lr_factor}.")
        _check_optimizer_args(lr, weight_decay, warmup_fraction)
        if backbone_lr_factor is not None and not backbone_lr_factor > 0:
            raise ValueError(
                f"backbone_lr_factor must be > 0 (DynamicViT: 0.01), or null to keep the backbone frozen; "
                f"got {backbone_lr_factor}."
            )
        self.backbone_name = backbone
        self.keep_ratio_range = keep_ratio_range
        self.lr, self.weight_decay, self.warmup_fraction = lr, weight_decay, warmup_fraction
        self.seed = seed
        self.backbone = self.load_backbone(backbone, attn_implementation)
        self.adapter = adapt(self.backbone)
        if self.multimodal and not isinstance(self.adapter, MLLMAdapter):
            raise ValueError(
                f"backbone {backbone!r} is not a multimodal LLM; {type(self).__name__} needs LLaVA or Qwen2-VL."
            )
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
        self.method: TokenMethod = self.build_method(method, method_options)
        self.handle = self.build_handle()
        self._rng = random.Random(seed)
        self._step_keep_ratio: float | None = None
        self.schedule_steps: int | None = None  # optimizer steps of the fit, once configure_optimizers ran

    # -- hooks: what a subclass says ------------------------------------------------------------
    def build_handle(self):
        """The pruning handle of ``self.method`` on ``self.adapter`` (``PruningHandle`` / ``MLLMPruningHandle``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_handle()")

    def training_loss(self, batch: dict) -> dict[str, Tensor] | None:
        """``{"loss": total, <term>: value, ...}`` of one step (each logged as ``train/<term>``), or ``None`` when
        the batch has nothing to learn."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_loss(batch)")

    def validation_metrics(self, batch: dict, stage: str) -> None:
        """Update the metrics of ``stage`` (``"val"`` or ``"test"``) with one batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement validation_metrics(batch, stage)")

    def budget_metrics(self, stage: str) -> nn.ModuleDict:
        """The per-budget accuracy metrics of ``stage`` (``val_acc`` or ``test_acc``, keyed by :func:`budget_key`)."""
        return self.val_acc if stage == "val" else self.test_acc

    def log_validation_metrics(self, stage: str) -> None:
        """Compute, log (``<stage>/...``, ``sync_dist=True``) and reset the metrics of ``stage``.

        By default for trainers that keep accuracy per budget in ``val_acc`` / ``test_acc`` (``nn.ModuleDict`` keyed
        by :func:`budget_key`): ``<stage>/acc_<budget>`` each, and ``<stage>/acc``, the mean over the pruned budgets
        (what the checkpoint callback monitors). ``compute()`` gathers every rank's state, so each rank logs the
        whole set's value; ``sync_dist`` only averages those equal values (and keeps Lightning from warning).
        """
        metrics = self.budget_metrics(stage)
        values = {name: metric.compute() for name, metric in metrics.items()}
        for name, value in values.items():
            self.log(f"{stage}/acc_{name}", value, prog_bar=name != "full", sync_dist=True)
        pruned = [value for name, value in values.items() if name != "full"]
        self.log(f"{stage}/acc", torch.stack(pruned).mean(), sync_dist=True)
        for metric in metrics.values():
            metric.reset()

    def default_budget(self) -> dict:
        """The artifact's default budget (``{"keep_ratio": r}``, ``{"threshold": t}``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement default_budget()")

    def artifact_extras(self) -> dict:
        """More fields of the checkpoint's ``tokensift`` entry (e.g. ``manifest_extra``); none by default."""
        return {}

    def check_method(self, cls: type[TokenMethod]) -> None:
        """Refuse a method this trainer cannot train, with a ValueError naming the trainer that can (``trainer_for``):
        a training-free method; a layer-skip method (das) outside the layer-skip trainers, or a token method inside
        them; a method trained by reward (``trained_by_reward``: a sampled token decision trained by policy
        gradient, cacovid, ia_red2) outside the reward trainers, or a gradient-trained one inside them; a method
        that runs only inside a multimodal LLM on an image classifier; a reward-trained one on the other kind of
        backbone than its trainer's. Subclasses refuse more after ``super().check_method(cls)``."""
        if cls.kind != "learned":
            learned = [n for n in sorted(registered_methods()) if self._trainable(get_method_class(n))]
            raise ValueError(
                f"method {cls.name!r} is training-free; {type(self).__name__} trains a learned method such as "
                f"{' or '.join(repr(n) for n in learned) or 'dynamicvit'}."
            )
        use = f"train it with tokensift.trainer.{trainer_for(cls)}"
        if getattr(cls, "skips_layers", False) != self.trains_layer_skips:
            raise ValueError(
                f"method {cls.name!r} skips whole layers: {use}."
                if self.trains_layer_skips is False
                else f"{type(self).__name__} trains layer-skip methods (das); {cls.name!r} prunes tokens: {use}."
            )
        if self.trains_layer_skips:
            return
        if cls.trained_by_reward != self.trains_by_reward:
            raise ValueError(
                f"method {cls.name!r} is trained by reward (its sampled keep decision has no gradient): {use}."
                if cls.trained_by_reward
                else f"{type(self).__name__} trains reward-trained policies (cacovid, ia_red2); {cls.name!r} learns "
                f"from gradients: {use}."
            )
        if not self.multimodal and "vit" not in cls.site_kinds:
            raise ValueError(
                f"method {cls.name!r} runs inside a multimodal LLM (sites {list(cls.site_kinds)}); "
                f"{type(self).__name__} trains on image classifiers: {use}."
            )
        if self.multimodal and cls.trained_by_reward and not {"pre_llm", "llm"} & set(cls.site_kinds):
            raise ValueError(
                f"method {cls.name!r} runs in vision towers only (sites {list(cls.site_kinds)}); "
                f"{type(self).__name__} trains policies inside a multimodal LLM: {use}."
            )

    def _trainable(self, cls: type[TokenMethod]) -> bool:
        """Whether ``cls`` is a learned method of this trainer's sort (what a training-free method's error suggests)."""
        if cls.kind != "learned" or getattr(cls, "skips_layers", False) != self.trains_layer_skips:
            return False
        if self.trains_layer_skips:
            return True
        kinds = {"vit"}
        if self.multimodal:  # MLLMScorerTrainer also trains a vision-tower method by removal (stts); GRPOTrainer: no
            kinds = {"pre_llm", "llm"} if self.trains_by_reward else {"vit", "pre_llm", "llm"}
        return cls.trained_by_reward == self.trains_by_reward and _learned_on(cls, kinds)

    # -- construction ---------------------------------------------------------------------------
    def load_backbone(self, backbone: str, attn_implementation: str) -> nn.Module:
        """The backbone from a local ``save_pretrained`` directory or a hub name, by the trainer's kind."""
        if self.multimodal:
            return load_mllm_backbone(backbone, attn_implementation=attn_implementation)
        return load_vision_backbone(backbone, attn_implementation=attn_implementation)

    def build_method(self, name: str, options: dict[str, Any] | None) -> TokenMethod:
        """The registered method ``name`` with its config fields ``options``, sized for the backbone."""
        cls = get_method_class(name)
        self.check_method(cls)
        return cls.for_backbone(self.adapter, cls.config_class.from_dict(options))

    # -- Lightning hooks ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenBackboneTrainer:
        super().train(mode)
        self.backbone.eval()  # frozen means frozen: dropout stays off during fit
        for layer in self._lora_layers:
            layer.train(mode)  # the adapters train: their dropout follows Lightning
        return self

    def setup(self, stage: str) -> None:
        self._install_reliability()
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            # the frozen backbone is rebuilt from `backbone`: ZeRO checkpoints keep only what trains
            strategy.exclude_frozen_parameters = True
        elif isinstance(strategy, DDPStrategy) and self.has_unused_parameters():
            # costs a graph traversal per step, so only when some parameter may get no gradient
            strategy._ddp_kwargs.setdefault("find_unused_parameters", True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.lr, weight_decay=self.weight_decay)
        self.schedule_steps = self._total_steps()  # read each step (set_progress): Lightning recomputes it per call
        schedule = warmup_cosine(optimizer, self.schedule_steps, warmup_fraction=self.warmup_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self.check_batch(batch)
        self._step_keep_ratio = None
        try:
            terms = self.training_loss(batch)
        except NonFiniteLossError:
            raise
        except FloatingPointError as error:  # NaN scores or hidden states at a site: say which step
            raise self._at_step(error) from error
        if terms is None:
            return self.zero_loss()
        self._check_finite_loss(terms["loss"], terms)
        batch_size = self.logged_batch_size(batch)
        for name, value in terms.items():
            # rank-local statistics (the budget's kept fractions) are averaged over ranks
            sync = name in self.synced_terms
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size, sync_dist=sync)
        records = getattr(self.handle, "last_records", None)  # none on a layer-skip handle
        if self._step_keep_ratio is not None and records:
            kept = torch.stack([r.keep_fraction.mean() for r in records]).mean()
            self.log("train/keep_fraction", kept, batch_size=batch_size, sync_dist=True)
            self.log("train/keep_target", self._step_keep_ratio, batch_size=batch_size)
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.check_batch(batch)
        self.validation_metrics(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.check_batch(batch)
        self.validation_metrics(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.log_validation_metrics("val")

    def on_test_epoch_end(self) -> None:
        self.log_validation_metrics("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        for key in [k for k in state if k.startswith("backbone.") and k not in trained]:
            del state[key]  # frozen and reloadable: keeps checkpoints scorer-sized (LoRA weights stay)
        checkpoint[CHECKPOINT_KEY] = self.artifact_metadata()
        for key, value in state.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise NonFiniteLossError(
                    f"refusing to checkpoint non-finite weights ({key}) at step {self.trainer.global_step}; the "
                    f"previous checkpoint ({last_checkpoint_paths(self.trainer)}) is left as it was."
                )
        checkpoint[RNG_KEY] = {"sampler": self._rng.getstate(), "global": global_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(RNG_KEY)
        if state is None:
            return  # a checkpoint from before random state was saved: resumes, not bit for bit
        self._rng.setstate(as_random_state(state["sampler"]))
        set_global_rng_state(state["global"])

    def on_train_start(self) -> None:
        # Lightning restores a resumable train loader's state only when it builds the loader after the loops
        # were restored; ``estimated_stepping_batches`` (the LR schedule) builds it before, so the saved state
        # would be dropped and a mid-epoch resume would replay the epoch's first batches. The loader's
        # iterator has not drawn a batch yet here.
        fit_loop = self.trainer.fit_loop
        states = getattr(fit_loop, "_combined_loader_states_to_load", None)
        if states and fit_loop._combined_loader is not None:
            fit_loop._combined_loader._load_state_dicts(states)
            fit_loop._combined_loader_states_to_load = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Refuse a batch with NaN / inf in a floating-point input before it reaches the weights."""
        if not isinstance(batch, dict):
            return
        for key, value in batch.items():
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                rows = (~torch.isfinite(value)).flatten(1).any(1).nonzero().flatten().tolist() if value.dim() else []
                raise NonFiniteLossError(
                    f"batch[{key!r}] holds NaN / inf (rows {rows[:8]}) at step {self.trainer.global_step} (epoch "
                    f"{self.current_epoch}, batch {batch_idx}): training stopped before it changed any weight; "
                    f"the last checkpoint is the last good one ({last_checkpoint_paths(self.trainer)}). Fix the "
                    "data."
                )

    def on_before_optimizer_step(self, optimizer) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 loss scaling: inf gradients are expected and the scaler skips those steps
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None and not bool(torch.isfinite(parameter.grad).all()):
                    name = {id(p): n for n, p in self.named_parameters()}.get(id(parameter), "?")
                    raise NonFiniteLossError(
                        f"the gradient of {name} is not finite at step {self.trainer.global_step} "
                        f"(epoch {self.current_epoch}): training stopped before the optimizer step, so the last "
                        f"checkpoint is the last good one ({last_checkpoint_paths(self.trainer)}). Resume from it "
                        "with a lower --model.lr or gradient clipping (--trainer.gradient_clip_val)."
                    )

    # -- optimisation ---------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """AdamW groups: scorer at ``lr``, LoRA at ``lr·lora_lr_factor``, backbone at ``lr·backbone_lr_factor``."""
        lr = self.lr
        lora = [p for n, p in self.backbone.named_parameters() if p.requires_grad and is_lora_parameter(n)]
        backbone = [p for n, p in self.backbone.named_parameters() if p.requires_grad and not is_lora_parameter(n)]
        groups = [
            {"name": "scorer", "params": [p for p in self.method.parameters() if p.requires_grad], "lr": lr},
            {"name": "lora", "params": lora, "lr": lr * self.lora_lr_factor},
            {"name": "backbone", "params": backbone, "lr": lr * (self.backbone_lr_factor or 0.0)},
        ]
        return [group for group in groups if group["params"]]

    def has_unused_parameters(self) -> bool:
        """True when a step may leave a trainable parameter without gradient (DDP must then look for them).

        A method says so itself (e.g. one router trained per step); an unfrozen backbone may hold weights
        its classifier never reads (CLIP's post-layernorm under a mean-pooling head).
        """
        return bool(getattr(self.method, "has_unused_parameters", False)) or self.backbone_lr_factor is not None

    def zero_loss(self) -> Tensor:
        """A zero loss that reaches every trainable weight: a step with nothing to learn still takes part in DDP's
        gradient all-reduce (a skipped step would stall the other ranks)."""
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    # -- helpers for the hooks ------------------------------------------------------------------
    def check_batch(self, batch: Any) -> None:
        """Every batch (fit, validate, test) is a dict with what the trainer reads: ``pixel_values`` this backbone
        takes and ``labels``; on a multimodal LLM, ``labels`` ``[B, L]`` (-100 except the answer tokens).

        Called from the steps rather than as ``on_before_batch_transfer``, which Lightning warns about on every
        fit that passes a data module."""
        name = type(self).__name__
        if self.multimodal:
            if not isinstance(batch, dict) or batch.get("labels") is None:
                raise ValueError(
                    f"{name} needs batches with 'labels' ([B, L], -100 except the answer tokens): it learns from "
                    "the answer; build the data module with answers (digit VQA: with_answer=True)."
                )
            return
        missing = [key for key in ("pixel_values", "labels") if not isinstance(batch, dict) or key not in batch]
        if missing:
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(
                f"{name} needs batches that are dicts with 'pixel_values' and 'labels'; the data module's "
                f"batch has no {missing} (got {got}). Make its dataset return those keys."
            )
        try:
            self.adapter.check_pixel_values(batch["pixel_values"])
        except ValueError as error:
            raise ValueError(
                f"batch {error} The data module's images do not fit the backbone {self.backbone_name!r}: "
                "make them that size and channel count (e.g. --data.init_args.canvas_size / num_channels)."
            ) from error

    def logged_batch_size(self, batch: dict) -> int:
        """The samples a step's logged values average over: every image; on a multimodal LLM, the samples with an
        answer token."""
        if self.multimodal:
            return int(answered(batch["labels"]).sum())
        return int(batch["labels"].shape[0])

    def model_inputs(self, batch: dict) -> dict:
        """The backbone's forward arguments from a batch.

        Image classifier: ``pixel_values``. Multimodal LLM: a LLaVA batch, digit VQA's
        (:mod:`tokensift.data.digit_vqa`) included, passes as is, with padding-aware ``position_ids`` added when
        it has none; a Qwen2-VL batch passes as is when it holds ``image_grid_thw``, and a digit-VQA one (images
        ``[B, C, H, W]``) becomes patches and grids through :func:`tokensift.backbones.vqa.mllm_inputs`.
        """
        if not self.multimodal:
            return {"pixel_values": batch["pixel_values"]}
        # a teacher-forced batch holds its answer; the method chooses before any answer exists at inference, so it
        # must not read it (the model still does): the handle conceals the label tokens from the method's state
        labels = batch.get("labels")
        if hasattr(self.handle, "conceal"):  # token handles; a layer-skip handle reads no tokens
            self.handle.conceal(None if labels is None else labels != IGNORE_INDEX)
        if self.adapter.family.multimodal_rope and "image_grid_thw" not in batch and "video_grid_thw" not in batch:
            return mllm_inputs(self.backbone, batch)  # digit-VQA images -> Qwen2-VL's patches and grids
        inputs = {key: batch[key] for key in MLLM_INPUTS if key in batch}
        mask = inputs.get("attention_mask")
        if not self.adapter.family.multimodal_rope and "position_ids" not in inputs and mask is not None:
            # left padding: number positions from each sample's first real token, as generate() does, so the
            # trained module sees the hidden states it will read at inference
            inputs["position_ids"] = padded_position_ids(mask)
        return inputs

    def logits(self, inputs: dict) -> Tensor:
        """One forward of the backbone with the handle as it is: ``[B, classes]``, or ``[B, L, V]`` on an MLLM."""
        if self.multimodal:
            return self.backbone(**inputs, use_cache=False).logits
        return self.adapter.logits(inputs["pixel_values"])

    @contextmanager
    def teacher(self) -> Iterator[None]:
        """Within the block the backbone is its own teacher: the handle off, no graph (no second copy of the
        weights: LoRA and a trained backbone included). The handle's switch is as before afterwards."""
        enabled = self.handle.enabled
        self.handle.enabled = False
        try:
            with torch.no_grad():
                yield
        finally:
            self.handle.enabled = enabled

    def sample_keep_ratio(self) -> float:
        """This step's keep ratio, uniform in ``keep_ratio_range`` (one scorer serves every budget in it)."""
        if self.keep_ratio_range is None:
            raise ValueError(f"{type(self).__name__} samples no keep ratio: it was built without keep_ratio_range.")
        return self._rng.uniform(*self.keep_ratio_range)

    def prepare_pruned_pass(self, batch: dict, mode: str = "mask") -> float:
        """Set the handle up for this step's pruned (student) pass and return its keep ratio: a sampled keep
        ratio, ``mode`` (``"mask"``; ``"gather"`` for a method that trains by removing tokens), and the batch's
        samples named (``name_samples``). Logged after the step as ``train/keep_target`` with what was kept
        (``train/keep_fraction``)."""
        keep_ratio = self.sample_keep_ratio()
        self.handle.enabled, self.handle.mode = True, mode
        self.handle.set_budget(keep_ratio=keep_ratio)
        self.name_samples(batch)
        self._step_keep_ratio = keep_ratio
        return keep_ratio

    def name_samples(self, batch: dict) -> None:
        """Name the rows of the next forward: ``batch["index"]`` and ``draw=(seed, step)``.

        Each sample's noise (Gumbel, ``random``) is then a function of (seed, its dataset index, step), not of its
        row or rank, so any split of the global batch over processes trains alike; without an index, rows are
        counted (and the rank told apart)."""
        index = batch.get("index")
        draw = (self.seed, self.global_step) + (() if index is not None else (self.global_rank,))
        self.handle.set_samples(index, draw=draw)

    @property
    def needs_budget_term(self) -> bool:
        """The objective needs a budget term: the method keeps a variable count in training (DynamicViT's
        ``threshold``); with the budget's exact count the kept fraction is no function of the scorer."""
        return not self.method.keeps_budget_count

    def artifact_metadata(self) -> dict:
        """What ``tokensift export`` needs to write the artifact (the checkpoint's ``tokensift`` entry)."""
        meta = {
            "method": self.method.name,
            "config": asdict(self.method.config),
            "fingerprint": self.backbone_fingerprint,
            "backbone": self.backbone_name,
            "lora": self.lora_options,
            "backbone_trained": self.backbone_lr_factor is not None,
            "multimodal": self.multimodal,  # export rebuilds a LoRA / trained backbone with the matching loader
        }
        if self.keep_ratio_range is not None:
            meta["trained_keep_ratio_range"] = list(self.keep_ratio_range)
        datamodule = getattr(self._trainer, "datamodule", None)  # the model card's training data record
        if datamodule is not None:
            meta["data_module"] = f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"
        meta["default_budget"] = self.default_budget()
        return meta | self.artifact_extras()

    # -- reliability ----------------------------------------------------------------------------
    def _install_reliability(self) -> None:
        """Atomic checkpoint files and the eval-mode check; called from ``setup``."""
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # DeepSpeed and custom plugins write their own way
            strategy.checkpoint_io = AtomicCheckpointIO()
        if self.trainer.ckpt_path and os.path.isfile(self.trainer.ckpt_path):
            remove_stale_partial_files(Path(self.trainer.ckpt_path).parent)
        fit_loop = getattr(self.trainer, "fit_loop", None)
        if fit_loop is not None and hasattr(fit_loop, "_warn_if_modules_in_eval_mode"):
            fit_loop._warn_if_modules_in_eval_mode = self._warn_if_unexpected_eval_modules

    def _warn_if_unexpected_eval_modules(self) -> None:
        """Lightning's check (``FitLoop._warn_if_modules_in_eval_mode``) without the frozen backbone, in eval mode
        by design."""
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn
        from lightning.pytorch.utilities.warnings import PossibleUserWarning

        frozen = {id(module) for module in self.backbone.modules() if not module.training}
        others = [name for name, module in self.named_modules() if not module.training and id(module) not in frozen]
        if others:
            rank_zero_warn(
                f"Found {len(others)} module(s) in eval mode at the start of training besides the frozen "
                f"backbone: {others[:5]}. Their dropout / batch-norm statistics stay in inference mode.",
                category=PossibleUserWarning,
            )

    def _at_step(self, error: Exception) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"step {self.trainer.global_step} (epoch {self.current_epoch}): {error} Training stopped before this "
            f"step changed any weight; the last checkpoint is the last good one "
            f"({last_checkpoint_paths(self.trainer)})."
        )

    def _total_steps(self) -> int:
        """Optimizer steps of the whole fit (the LR schedule's length); a ValueError when there are none."""
        total = self.trainer.estimated_stepping_batches
        if total == 0:
            raise ValueError(
                "the data module's train_dataloader yields no batches (an empty training split, or "
                "limit_train_batches=0), so there is nothing to train: give it samples (e.g. "
                "--data.init_args.train_samples) or run `tokensift validate` instead."
            )
        if total == float("inf"):
            raise ValueError(
                "the train_dataloader has no length, so the LR schedule cannot be laid out: set --trainer.max_steps."
            )
        return int(total)

    def _check_finite_loss(self, loss: Tensor, terms: dict[str, Tensor] | None = None) -> None:
        if bool(torch.isfinite(loss.detach()).all()):
            return
        detail = ""
        if terms:
            detail = " (" + ", ".join(f"{name}={float(value):.4g}" for name, value in terms.items()) + ")"
        raise NonFiniteLossError(
            f"train/loss is {float(loss):.4g} at step {self.trainer.global_step} (epoch {self.current_epoch}, "
            f"batch {self.trainer.fit_loop.epoch_loop.batch_idx}){detail}: training stopped before this step "
            f"changed any weight, so the last checkpoint is the last good one "
            f"({last_checkpoint_paths(self.trainer)}). Resume from it with a lower --model.lr, or check the batch "
            "for NaN / inf inputs."
        )


def _learned_on(cls: type[TokenMethod], site_kinds: set[str]) -> bool:
    return cls.kind == "learned" and bool(set(cls.site_kinds) & site_kinds)


def trainer_for(cls: type[TokenMethod]) -> str:
    """The ``tokensift.trainer`` class (or classes, by backbone) that trains the learned method ``cls``."""
    if getattr(cls, "skips_layers", False):
        return "LayerSkipTrainer (image classifiers) or MLLMLayerSkipTrainer (multimodal LLMs)"
    if getattr(cls, "decides_exits", False):
        return "ExitRouterTrainer"
    if cls.trained_by_reward:
        return "ReinforceTrainer (image classifiers)" if "vit" in cls.site_kinds else "GRPOTrainer (multimodal LLMs)"
    if "vit" not in cls.site_kinds:
        return "MLLMScorerTrainer (multimodal LLMs)"
    return "ScorerTrainer (image classifiers) or MLLMScorerTrainer (multimodal LLMs)"


def budget_key(ratio) -> str:
    """The metric name of a budget: ``"full"`` (unpruned) or ``keep<r>`` with ``.`` as ``_`` (``keep0_25``)."""
    return "full" if ratio == "full" else f"keep{ratio:g}".replace(".", "_")


def _check_optimizer_args(lr: float, weight_decay: float, warmup_fraction: float) -> None:
    """ValueErrors naming ``lr`` / ``weight_decay`` / ``warmup_fraction`` (torch would say "Invalid learning rate")."""

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not number(lr) or not 0 < lr < float("inf"):
        raise ValueError(f"lr must be a positive finite learning rate (e.g. 1e-3), got {lr!r}.")
    if not number(weight_decay) or not 0 <= weight_decay < 1:
        raise ValueError(f"weight_decay must be in [0, 1) (AdamW's decoupled decay, e.g. 0.05), got {weight_decay!r}.")
    if not number(warmup_fraction) or not 0 <= warmup_fraction < 1:
        raise ValueError(f"warmup_fraction must be in [0, 1) (share of steps warming up), got {warmup_fraction!r}.")


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
