"""The LightningModule that trains a learned token scorer on a frozen backbone.

One forward of the frozen backbone with the handle disabled is the teacher (no second copy of the
weights); the same backbone with the scorer in mask mode is the student. The optimizer sees the scorer,
and, when asked, LoRA adapters on the backbone's attention and the backbone itself, each in its own
learning-rate group; the backbone stays in eval mode (dropout off) whatever Lightning asks.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
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
RNG_KEY = "tokensift_rng"


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN or infinite loss or gradient; training stops before the weights change."""


class ReliableTraining:
    """What both trainers (``ScorerTrainer``, ``ExitRouterTrainer``) do for crash-safe, exactly resumable fits.

    - Checkpoint files are written atomically (:class:`AtomicCheckpointIO`).
    - Random state: the per-batch sampler ``self._rng`` and the global torch / numpy / Python generators go
      into every checkpoint and come back on resume, so a run resumed from a mid-epoch checkpoint draws what
      the uninterrupted run drew.
    - NaN guard: a non-finite loss (checked before backward) or gradient (checked before the optimizer step)
      raises :class:`NonFiniteLossError` naming the step, so the weights never take a NaN update and the last
      checkpoint stays the last good one; a checkpoint of non-finite trained weights is refused.
    - The frozen backbone is in eval mode by design: Lightning's warning about eval-mode modules at the
      start of fit is given only for other modules.
    """

    _rng: random.Random

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
        """Lightning's check (``FitLoop._warn_if_modules_in_eval_mode``) without the frozen backbone."""
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
                    f"the last checkpoint is the last good one ({_last_checkpoint(self.trainer)}). Fix the data."
                )

    def _at_step(self, error: Exception) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"step {self.trainer.global_step} (epoch {self.current_epoch}): {error} Training stopped before this "
            f"step changed any weight; the last checkpoint is the last good one ({_last_checkpoint(self.trainer)})."
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

    def _check_finite_loss(self, loss: torch.Tensor, terms: dict[str, torch.Tensor] | None = None) -> None:
        if bool(torch.isfinite(loss.detach()).all()):
            return
        detail = ""
        if terms:
            detail = " (" + ", ".join(f"{name}={float(value):.4g}" for name, value in terms.items()) + ")"
        raise NonFiniteLossError(
            f"train/loss is {float(loss):.4g} at step {self.trainer.global_step} (epoch {self.current_epoch}, "
            f"batch {self.trainer.fit_loop.epoch_loop.batch_idx}){detail}: training stopped before this step "
            f"changed any weight, so the last checkpoint is the last good one ({_last_checkpoint(self.trainer)}). "
            "Resume from it with a lower --model.lr, or check the batch for NaN / inf inputs."
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
                        f"checkpoint is the last good one ({_last_checkpoint(self.trainer)}). Resume from it with "
                        "a lower --model.lr or gradient clipping (--trainer.gradient_clip_val)."
                    )

    def _save_reliability_state(self, checkpoint: dict) -> None:
        for key, value in checkpoint["state_dict"].items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise NonFiniteLossError(
                    f"refusing to checkpoint non-finite weights ({key}) at step {self.trainer.global_step}; the "
                    f"previous checkpoint ({_last_checkpoint(self.trainer)}) is left as it was."
                )
        checkpoint[RNG_KEY] = {"sampler": self._rng.getstate(), "global": _global_rng_state()}

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

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(RNG_KEY)
        if state is None:
            return  # a checkpoint from before random state was saved: resumes, not bit for bit
        self._rng.setstate(_as_random_state(state["sampler"]))
        _set_global_rng_state(state["global"])


_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a hidden ``.<name>.partial-<pid>`` file beside it, fsync, then rename it over.

    A reader (``--ckpt_path``, ``tokensift export``) sees the previous complete file or the new complete file,
    never a half-written one, whatever kills the process. (Lightning's own save stages the file in the system
    temp directory, and a move from another filesystem is a copy.) A partial file left by a killed run is
    removed by the next save into the same directory or by a resume from it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}.")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partial_files(target.parent)
        partial = target.parent / f".{target.name}.partial-{os.getpid()}"
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)


def remove_stale_partial_files(directory: Path) -> list[Path]:
    """Delete ``.<name>.partial-<pid>`` files in ``directory`` whose writer is gone; return what was deleted."""
    removed = []
    for path in directory.glob(".*.partial-*") if directory.is_dir() else []:
        match = _PARTIAL.match(path.name)
        if match and not _process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes one checkpoint at a time: an older partial file of its own is stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: written at every epoch end, every ``every_n_train_steps`` optimizer steps when set, and when
    the run is stopped with SIGTERM (after the step in progress), so a killed fit resumes from where it stopped
    with ``--ckpt_path .../last.ckpt``. Other exceptions (a NaN loss) write nothing: the file stays the last good
    state. (Lightning's ``ModelCheckpoint`` takes steps or epochs, not both.)
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        filename: str = "last",
        save_on_exception: bool = True,
        **kwargs,
    ):
        if every_n_train_steps is not None and (
            isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int) or every_n_train_steps < 1
        ):
            raise ValueError(
                "checkpoint_every_n_steps (LastCheckpoint.every_n_train_steps) must be a positive integer or null, "
                f"got {every_n_train_steps!r}."
            )
        super().__init__(filename=filename, save_on_exception=save_on_exception, **kwargs)
        self.every_n_steps = every_n_train_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every = self.every_n_steps
        if every and trainer.global_step % every == 0 and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)


def _as_random_state(state) -> tuple:
    """``random.Random.getstate()`` back from a checkpoint (tuples may come back as lists)."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _global_rng_state() -> dict:
    """torch's, CUDA's, numpy's and Python's global generators, in types torch's weights-only loader reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_random_state(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _last_checkpoint(trainer) -> str:
    callbacks = trainer.checkpoint_callbacks
    paths = [getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "") for cb in callbacks]
    paths = sorted({p for p in paths if p})
    return ", ".join(paths) if paths else "none written yet"


class ScorerTrainer(ReliableTraining, L.LightningModule):
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
        _check_optimizer_args(lr, weight_decay, warmup_fraction)
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
        self._install_reliability()
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
        total = self._total_steps()
        schedule = warmup_cosine(optimizer, total, warmup_fraction=self.hparams.warmup_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._check_batch(batch)
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        with torch.no_grad():
            self.handle.enabled = False
            teacher_logits = self.adapter.logits(pixel_values)
            teacher_tokens = self._final_tokens
        keep_ratio = self._rng.uniform(*self.keep_ratio_range)
        self.handle.enabled, self.handle.mode = True, "mask"
        self.handle.set_budget(keep_ratio=keep_ratio)
        # each sample's Gumbel noise is a function of (seed, its dataset index, step), not of its row or rank,
        # so any split of the global batch over processes trains alike; without an index, rows are counted
        index = batch.get("index")
        draw = (self.hparams.seed, self.global_step) + (() if index is not None else (self.global_rank,))
        self.handle.set_samples(index, draw=draw)
        self.method.train()
        try:
            logits = self.adapter.logits(pixel_values)
        except FloatingPointError as error:  # NaN scores or hidden states at a site: say which step
            raise self._at_step(error) from error
        terms = scorer_objective(
            logits=logits,
            labels=labels,
            teacher_logits=teacher_logits,
            tokens=self._final_tokens,
            teacher_tokens=teacher_tokens,
            records=self.handle.last_records,
            weights=self.loss_weights,
        )
        self._check_finite_loss(terms["loss"], terms)
        batch_size = labels.shape[0]
        for name, value in terms.items():
            # the budget statistics are averaged over ranks: each rank alone sees a fraction of the batch
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size, sync_dist=name == "budget")
        kept = torch.stack([r.keep_fraction.mean() for r in self.handle.last_records]).mean()
        self.log("train/keep_fraction", kept, batch_size=batch_size, sync_dist=True)
        self.log("train/keep_target", keep_ratio, batch_size=batch_size)
        return terms["loss"]

    def _check_batch(self, batch: Any) -> None:
        """Every batch (fit, validate, test): a dict with ``pixel_values`` this backbone takes, and ``labels``.

        Called from the steps rather than as ``on_before_batch_transfer``, which Lightning warns about on every
        fit that passes a data module."""
        missing = [key for key in ("pixel_values", "labels") if not isinstance(batch, dict) or key not in batch]
        if missing:
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(
                f"ScorerTrainer needs batches that are dicts with 'pixel_values' and 'labels'; the data module's "
                f"batch has no {missing} (got {got}). Make its dataset return those keys."
            )
        try:
            self.adapter.check_pixel_values(batch["pixel_values"])
        except ValueError as error:
            raise ValueError(
                f"batch {error} The data module's images do not fit the backbone {self.hparams.backbone!r}: "
                "make them that size and channel count (e.g. --data.init_args.canvas_size / num_channels)."
            ) from error

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
        self._save_reliability_state(checkpoint)

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
        self._check_batch(batch)
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


def _key(ratio) -> str:
    return "full" if ratio == "full" else f"keep{ratio:g}".replace(".", "_")
