"""The LightningModule that trains a learned token scorer on a frozen image classifier.

One forward of the frozen backbone with the handle disabled is the teacher (no second copy of the
weights); the same backbone with the scorer in mask mode is the student. The optimizer sees the scorer,
and, when asked, LoRA adapters on the backbone's attention and the backbone itself, each in its own
learning-rate group; the backbone stays in eval mode (dropout off) whatever Lightning asks. All of that
plumbing is :class:`tokensift.trainer.base.FrozenBackboneTrainer`'s; this module says what a step computes.

A method that trains by removing tokens (DynamicViT's ``train_by_removal``) is trained in gather mode: its keep
decision shrinks the sequence after the next block (``PruningHandle``), so the student pass costs what a pruned
inference costs, plus one full-length block per site and one backward through the blocks after the first site.
The teacher's logits are then the only teacher output the objective reads, and a :class:`TeacherCache` computes
them once per training sample.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from tokensift.budget import Budget
from tokensift.reduce import PruningHandle
from tokensift.trainer.base import FrozenBackboneTrainer, budget_key, checkpoint_blocks
from tokensift.trainer.losses import LossWeights, removal_objective, scorer_objective

# their home is tokensift.trainer.reliability; configs and scripts written before name them here
from tokensift.trainer.reliability import (  # noqa: F401
    AtomicCheckpointIO,
    LastCheckpoint,
    NonFiniteLossError,
    remove_stale_partial_files,
)


class InputsChangedError(ValueError):
    """A sample's inputs differ from those its cached teacher output was computed on (augmentation)."""


class TeacherCache:
    """Each training sample's teacher logits, computed once and reused in later epochs, keyed by ``batch["index"]``.

    Valid only while the teacher is a fixed function of the sample: a frozen backbone without LoRA and a data module
    that renders sample ``i`` identically every epoch (the tokensift data modules: sample = f(seed, split, index)).
    Each entry keeps a signature of its inputs (random ±1 projections of the pixels and their L1 norm); a lookup
    whose inputs moved by more than float rounding (an augmented or re-rendered sample) raises
    :class:`InputsChangedError`. Rows live in growable tensors on the logits' device, one per sample index: the
    cache is per process (each DDP rank fills its own), never checkpointed (a resumed fit rebuilds it), and small
    (``classes`` floats per sample).
    """

    projections = 4
    tolerance = 1e-5  # of the inputs' L1 norm; float32 rounding of the projection is ~1e-7 of it

    def __init__(self) -> None:
        self.logits: Tensor | None = None  # [capacity, classes] float32
        self.signature: Tensor | None = None  # [capacity, projections + 1] float32
        self.filled: Tensor | None = None  # [capacity] bool
        self._directions: Tensor | None = None  # [features, projections] ±1
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return 0 if self.filled is None else int(self.filled.sum())

    def signatures(self, pixel_values: Tensor) -> Tensor:
        """``[B, projections + 1]`` per sample: ``pixels · d_j`` for fixed random ±1 directions, and ``‖pixels‖₁``."""
        flat = pixel_values.detach().flatten(1).float()
        if self._directions is None or self._directions.shape[0] != flat.shape[1]:
            generator = torch.Generator().manual_seed(0)
            signs = torch.randint(0, 2, (flat.shape[1], self.projections), generator=generator).float() * 2 - 1
            self._directions = signs.to(flat.device)
        return torch.cat([flat @ self._directions.to(flat.device), flat.abs().sum(1, keepdim=True)], dim=1)

    def lookup(self, index: Tensor, signature: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(hit [B] bool, logits [B, classes] or None)``: rows cached for ``index``, their logits (unset rows 0).

        Raises :class:`InputsChangedError` when a cached sample's ``signature`` differs from the stored one."""
        index = index.to(signature.device).long()
        if self.filled is None:
            return torch.zeros_like(index, dtype=torch.bool), None
        inside = index < self.filled.shape[0]
        rows = index.clamp(max=self.filled.shape[0] - 1)
        hit = inside & self.filled[rows]
        if not bool(hit.any()):
            return hit, None
        stored = self.signature[rows[hit]]
        moved = (stored - signature[hit]).abs().amax(1) > self.tolerance * stored[:, -1].clamp_min(1e-12)
        if bool(moved.any()):
            changed = index[hit][moved][:8].tolist()
            raise InputsChangedError(
                f"the inputs of training sample(s) {changed} differ from those their cached teacher logits were "
                "computed on (data augmentation, or a data module that renders a sample differently each epoch)"
            )
        logits = torch.zeros(index.shape[0], self.logits.shape[1], device=self.logits.device)
        logits[hit] = self.logits[rows[hit]]
        return hit, logits

    def store(self, index: Tensor, signature: Tensor, logits: Tensor) -> None:
        """Remember ``logits`` ``[B, classes]`` and the inputs' ``signature`` of samples ``index`` ``[B]``."""
        index = index.to(logits.device).long()
        needed = int(index.max()) + 1
        if self.filled is None:
            self.logits = logits.new_zeros(needed, logits.shape[1], dtype=torch.float32)
            self.signature = signature.new_zeros(needed, signature.shape[1], dtype=torch.float32)
            self.filled = torch.zeros(needed, dtype=torch.bool, device=logits.device)
        elif needed > self.filled.shape[0]:
            grow = max(needed, 2 * self.filled.shape[0]) - self.filled.shape[0]
            self.logits = torch.cat([self.logits, self.logits.new_zeros(grow, self.logits.shape[1])])
            self.signature = torch.cat([self.signature, self.signature.new_zeros(grow, self.signature.shape[1])])
            self.filled = torch.cat([self.filled, self.filled.new_zeros(grow)])
        self.logits[index] = logits.detach().float()
        self.signature[index] = signature.float().to(self.signature.device)
        self.filled[index] = True

    def clear(self) -> None:
        self.logits = self.signature = self.filled = None


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
        teacher_cache: reuse each training sample's teacher logits after its first epoch (``TeacherCache``, by
            ``batch["index"]``) when the objective reads nothing else of the teacher (``train_by_removal``, or
            ``loss.tokens: 0``). ``None`` (default): when possible, i.e. with distillation on, a frozen backbone
            without LoRA and batches carrying ``index``; a batch whose inputs changed since they were cached
            (augmentation) then turns it off with a warning. ``True``: required (a ValueError where it cannot
            be, or when inputs change); ``False``: a teacher pass every step. No teacher pass at all when the
            objective needs none (``loss.distill: 0`` and no token term).
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
        teacher_cache: bool | None = None,
    ):
        if teacher_cache not in (None, True, False):
            raise ValueError(f"teacher_cache must be true, false or null (automatic), got {teacher_cache!r}.")
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
        self.trains_by_removal = bool(self.method.trains_by_removal)
        if self.trains_by_removal and self.loss_weights.tokens != 0:
            raise ValueError(
                f"loss.tokens is {self.loss_weights.tokens} but {self.method.name} trains by removal "
                "(train_by_removal: true), whose objective has no token-distillation term (the teacher's final tokens "
                "are not cached: docs/methods.md); set --model.loss.tokens 0, or train_by_removal: false."
            )
        self.teacher_cache_option = teacher_cache
        self._check_teacher_cache()
        self.teacher_cache = TeacherCache()  # a plain attribute: per process, never in a checkpoint
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
        if self.trains_by_removal:
            teacher_logits = self.teacher_logits(batch, inputs) if self.loss_weights.distill != 0 else None
            self.prepare_pruned_pass(batch, mode="gather")
            self.method.train()
            return removal_objective(self.logits(inputs), labels, teacher_logits, self.loss_weights)
        if self.loss_weights.tokens == 0:  # the teacher's logits are all the objective reads: cached, or not run
            teacher_logits = self.teacher_logits(batch, inputs) if self.loss_weights.distill != 0 else None
            self.prepare_pruned_pass(batch)
            self.method.train()
            logits = self.logits(inputs)
            if teacher_logits is None:
                teacher_logits = logits.detach()  # a distillation term of weight 0
            return scorer_objective(
                logits=logits,
                labels=labels,
                teacher_logits=teacher_logits,
                tokens=self._final_tokens,
                teacher_tokens=self._final_tokens.detach(),  # a token term of weight 0
                records=self.handle.last_records,
                weights=self.loss_weights,
                budget_term=self.needs_budget_term,
            )
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

    # -- teacher ---------------------------------------------------------------------------------
    def teacher_cache_usable(self, batch: dict | None = None) -> str | None:
        """``None`` when the teacher's logits can be cached (for ``batch``, when given), else why not."""
        if self.lora_options or self.backbone_lr_factor is not None:
            return "the teacher is the backbone being trained (LoRA / backbone_lr_factor), so it changes every step"
        if batch is not None and batch.get("index") is None:
            return "the batches carry no 'index' (each sample's dataset index) to key the cache by"
        return None

    def _check_teacher_cache(self) -> None:
        if self.teacher_cache_option is not True:
            return
        why = self.teacher_cache_usable()
        if why is None and self.loss_weights.tokens != 0 and not self.trains_by_removal:
            why = "the token-distillation term (loss.tokens > 0) needs the teacher's final tokens every step"
        if why is not None:
            raise ValueError(f"teacher_cache: true, but {why}; set teacher_cache: null (automatic) or false.")

    def teacher_logits(self, batch: dict, inputs: dict) -> Tensor:
        """The unpruned backbone's logits for ``batch``: from the cache where this sample's are there, a teacher
        pass (``self.teacher()``) for the others, which are then cached."""
        why = "off" if self.teacher_cache_option is False else self.teacher_cache_usable(batch)
        if why is not None:
            if self.teacher_cache_option is True:
                raise ValueError(f"teacher_cache: true, but {why}; set teacher_cache: null (automatic) or false.")
            with self.teacher():
                return self.logits(inputs)
        cache, index = self.teacher_cache, batch["index"]
        signature = cache.signatures(inputs["pixel_values"])
        try:
            hit, cached = cache.lookup(index, signature)
        except InputsChangedError as error:
            if self.teacher_cache_option is True:
                raise ValueError(
                    f"teacher_cache: true, but {error}: cached teacher logits would be wrong. Set teacher_cache: false "
                    "for a data module that augments."
                ) from error
            warnings.warn(
                f"{error}; the teacher cache is off for the rest of this fit (a teacher pass every step).",
                stacklevel=2,
            )
            cache.clear()
            self.teacher_cache_option = False
            with self.teacher():
                return self.logits(inputs)
        cache.hits += int(hit.sum())
        cache.misses += int((~hit).sum())
        if bool(hit.all()):
            return cached
        miss = ~hit
        with self.teacher():
            fresh = self.logits({"pixel_values": inputs["pixel_values"][miss]}).float()  # float32, as cached
        cache.store(index.to(miss.device)[miss], signature[miss], fresh)
        if cached is None:
            return fresh
        cached[miss] = fresh
        return cached

    # -- helpers --------------------------------------------------------------------------------
    def _grab_final_tokens(self, module: nn.Module, args: tuple, output) -> None:
        self._final_tokens = output[0] if isinstance(output, tuple) else output


__all__ = ["InputsChangedError", "ScorerTrainer", "TeacherCache", "checkpoint_blocks"]
