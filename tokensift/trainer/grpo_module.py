"""``GRPOTrainer``: a token-combination policy (``cacovid``) trained by reward with GRPO on a frozen multimodal LLM.

One step per batch of prompts (Lightning manual optimisation):

1. each prompt is repeated ``num_generations`` (G) times into one batch (``tokensift.data.contract.repeat_samples``);
2. rollout, no graph: the handle in gather mode at a keep ratio drawn per step from ``keep_ratio_range``, the method
   in its sampling mode (``method.sampling()``): each row keeps ``num_keep`` tokens drawn without replacement from
   the policy, copy ``g`` of sample ``i`` named ``i·G + g`` so each copy draws its own noise, reproducibly;
3. reward per row: 1 when every answer token is the argmax (``losses.answer_accuracy``), else 0 (no cost per kept
   token: every combination keeps the budget's count, so such a cost is one constant per group and centring removes
   it); rows without an answer token are left out of the rewards, their statistics and the loss;
4. advantages ``(r − mean_group) / (std + 1e-4)`` with the std of the group (``scale_rewards: group``, CaCoVID),
   of every rank's rewards all-gathered (``batch``, TRL's) or none; the reward statistics logged are global;
5. ``num_iterations`` PPO epochs over the rollout: the per-token Bernoulli log-probabilities of the sampled masks
   recomputed with gradient, CaCoVID's clipped surrogate (``epsilon_low`` / ``epsilon_high``, kept and dropped
   tokens balanced by the mask's mean), plus ``beta`` × the k3 KL to the initial policy when ``beta > 0``;
   gradients clipped to ``max_grad_norm``; the LR schedule stepped after every optimizer step.

``max_steps`` (Lightning's ``global_step``) counts optimizer steps: ``num_iterations`` per batch, so ``max_steps=N``
runs ``N / num_iterations`` batches, and the LR schedule lays out that many optimizer steps (``_total_steps``).
The policy layer (a copy of the LLM's first, at ``lr × layer_lr_factor``) runs once per prompt, its logits shared by
the prompt's G copies.

Validation (inherited from ``MLLMScorerTrainer``): answer accuracy unpruned and in gather mode (top-k by the
policy's probability, the inference path) at each ``eval_keep_ratios``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor

from tokensift.data.contract import repeat_samples
from tokensift.scorers import TokenMethod
from tokensift.scorers.cacovid import Rollout
from tokensift.trainer.losses import answer_accuracy, answered
from tokensift.trainer.mllm_module import MLLMScorerTrainer
from tokensift.trainer.rl import (
    REWARD_SCALES,
    balance_weights,
    bernoulli_kl_penalty,
    clipped_policy_loss,
    combination_log_prob,
    group_advantages,
)


class GRPOTrainer(MLLMScorerTrainer):
    """Train a sampling token policy (``cacovid``) on a frozen LLaVA / Qwen2-VL with GRPO (LightningModule).

    Args:
        backbone: a ``save_pretrained`` directory of a LLaVA or Qwen2-VL model.
        method: a learned ``pre_llm`` method with a sampling mode (``cacovid``).
        method_options: fields of the method's config.
        num_generations: combinations sampled per prompt (G; CaCoVID: 32), >= 2.
        keep_ratio_range: each step draws its keep ratio uniformly from ``[low, high]``.
        eval_keep_ratios: validation / test accuracy at each (gather mode, top-k); the first is the default budget.
        scale_rewards: ``group`` (CaCoVID), ``batch`` (std of the global batch, all ranks) or ``none``.
        num_iterations: PPO epochs over one rollout (1: the ratio is 1 but its gradient is the policy gradient).
        epsilon_low, epsilon_high: the ratio's clip range ``[1 − low, 1 + high]`` (CaCoVID: 0.2 / 0.28).
        beta: weight of the KL to the initial policy (0: none kept).
        max_grad_norm: gradient-norm clip (CaCoVID: 5); null for none.
        top_k_first: each prompt's first combination is the policy's top-k, what inference keeps (CaCoVID's first
            token-mode sample); the other G − 1 are sampled.
        layer_lr_factor: the policy's decoder layer (a copy of the LLM's pretrained first layer) learns at
            ``lr × layer_lr_factor``, its norm and head at ``lr`` (CaCoVID: 0.1).
        lr, weight_decay, warmup_fraction: AdamW, linear warm-up then cosine decay per optimizer step.
        attn_implementation, seed: as ``MLLMScorerTrainer``.
    """

    trains_by_reward = True

    def __init__(
        self,
        backbone: str,
        method: str = "cacovid",
        method_options: dict[str, Any] | None = None,
        num_generations: int = 8,
        keep_ratio_range: tuple[float, float] = (0.05, 0.5),
        eval_keep_ratios: list[float] | None = None,
        scale_rewards: str = "group",
        num_iterations: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.28,
        beta: float = 0.0,
        max_grad_norm: float | None = 5.0,
        top_k_first: bool = True,
        layer_lr_factor: float = 0.1,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_fraction: float = 0.05,
        attn_implementation: str = "sdpa",
        seed: int = 0,
    ):
        if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
            raise ValueError(
                f"num_generations must be an integer >= 2 (a group needs two samples to compare), got "
                f"{num_generations!r}."
            )
        if isinstance(num_iterations, bool) or not isinstance(num_iterations, int) or num_iterations < 1:
            raise ValueError(f"num_iterations must be an integer >= 1, got {num_iterations!r}.")
        if scale_rewards not in REWARD_SCALES:
            raise ValueError(f"scale_rewards must be one of {list(REWARD_SCALES)}, got {scale_rewards!r}.")
        for name, value in (("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high)):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1) (CaCoVID: 0.2 / 0.28), got {value!r}.")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0 (0: no KL term), got {beta!r}.")
        if isinstance(layer_lr_factor, bool) or not isinstance(layer_lr_factor, (int, float)) or layer_lr_factor <= 0:
            raise ValueError(
                f"layer_lr_factor must be a number > 0 (CaCoVID: 0.1; 1: one learning rate), got {layer_lr_factor!r}."
            )
        if not isinstance(top_k_first, bool):
            raise ValueError(f"top_k_first must be true or false, got {top_k_first!r}.")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (CaCoVID: 5), or null for no clipping; got {max_grad_norm!r}.")
        super().__init__(
            backbone,
            method,
            method_options,
            keep_ratio_range=keep_ratio_range,
            eval_keep_ratios=eval_keep_ratios,
            distill_weight=0.0,
            lr=lr,
            weight_decay=weight_decay,
            warmup_fraction=warmup_fraction,
            attn_implementation=attn_implementation,
            seed=seed,
        )
        self.save_hyperparameters(ignore=["seed"])
        self.automatic_optimization = False
        self.num_generations, self.num_iterations = num_generations, num_iterations
        self.scale_rewards, self.beta, self.layer_lr_factor = scale_rewards, float(beta), float(layer_lr_factor)
        self.epsilon_low, self.epsilon_high = float(epsilon_low), float(epsilon_high)
        self.max_grad_norm, self.top_k_first = max_grad_norm, top_k_first
        # GRPO's KL anchor: the policy as it starts, frozen (not trained, not exported)
        self.reference_policy = copy.deepcopy(self.method).requires_grad_(False) if beta > 0 else None
        config = self.adapter.config
        self._token_ids = dict(
            image_token_id=getattr(config, "image_token_id", None),
            video_token_id=getattr(config, "video_token_id", None),
            spatial_merge_size=getattr(getattr(config, "vision_config", None), "spatial_merge_size", None),
        )
        # the last step's rewards on this rank and the std that scaled them (scale-out tests read them)
        self.last_rewards: Tensor | None = None
        self.last_reward_std: Tensor | None = None

    def check_method(self, cls: type[TokenMethod]) -> None:
        super().check_method(cls)
        if not callable(getattr(cls, "sampling", None)) or "pre_llm" not in cls.site_kinds:
            raise ValueError(
                f"method {cls.name!r} has no sampling() mode at pre_llm; GRPOTrainer trains policies that sample "
                "token combinations before the LLM in a sampling() context and record their rollouts: give the method "
                "pre_llm sites and a sampling() context as tokensift/scorers/cacovid/model.py does."
            )

    @property
    def training_mode(self) -> str:
        """Rollouts run as inference does: tokens gathered out (``gather``)."""
        return "gather"

    def training_loss(self, batch: dict) -> dict[str, Tensor] | None:
        raise RuntimeError("GRPOTrainer optimises manually: training_step runs the rollout and the PPO epochs.")

    # -- optimisation ------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """The base's groups, the policy's decoder layer split off ``scorer`` into ``policy_layer`` at
        ``lr × layer_lr_factor``: it starts as the LLM's pretrained layer (CaCoVID's ``create_optimizer`` gives it
        a tenth of the policy's rate)."""
        layer = getattr(self.method, "layer", None)
        if layer is None:
            return super().parameter_groups()
        in_layer = {id(p) for p in layer.parameters()}
        groups = []
        for group in super().parameter_groups():
            if group["name"] != "scorer":
                groups.append(group)
                continue
            rest = [p for p in group["params"] if id(p) not in in_layer]
            pretrained = [p for p in group["params"] if id(p) in in_layer]
            groups += [{**group, "params": rest}] if rest else []
            if pretrained:
                groups.append({"name": "policy_layer", "params": pretrained, "lr": self.lr * self.layer_lr_factor})
        return groups

    def _total_steps(self) -> int:
        """Optimizer steps of the fit, the LR schedule's length: ``num_iterations`` per batch. Under manual
        optimisation ``max_steps`` already counts optimizer steps, but ``estimated_stepping_batches`` counts batches
        when the epochs end the fit first."""
        estimate = super()._total_steps()  # refuses empty and endless loaders
        trainer, per_batch = self.trainer, self.num_iterations
        if trainer.max_epochs == -1 or trainer.num_training_batches == float("inf"):
            by_batches = estimate * per_batch  # bounded by max_steps only
        else:
            by_batches = math.ceil(trainer.num_training_batches) * max(trainer.max_epochs, 1) * per_batch
        if trainer.max_steps == -1:
            return by_batches
        # the fit stops after the batch that reaches max_steps: a whole batch's optimizer steps
        return min(by_batches, math.ceil(trainer.max_steps / per_batch) * per_batch)

    # -- one step ----------------------------------------------------------------------------------
    def name_rollouts(self, batch: dict) -> None:
        """Copy ``g`` of sample ``i`` is named ``i·G + g``: its own noise, a function of (seed, sample, copy,
        step) only; without ``index`` the handle counts rows (and ranks are told apart)."""
        index = batch.get("index")
        if index is None:
            self.handle.set_samples(None, draw=(self.seed, self.global_step, self.global_rank))
            return
        copies = torch.arange(self.num_generations, device=index.device)
        named = (index.long().unsqueeze(1) * self.num_generations + copies).reshape(-1)
        self.handle.set_samples(named, draw=(self.seed, self.global_step))

    def rollout(self, batch: dict) -> tuple[Rollout | None, Tensor, Tensor, Tensor]:
        """The G combinations of every prompt, run through the frozen model as one batch without a graph:
        ``(rollout or None, correct [R], kept fraction [R], answered [R])``; rows without an answer token count
        neither right nor wrong (``answered`` false)."""
        expanded = repeat_samples(batch, self.num_generations, **self._token_ids)
        inputs = self.model_inputs(expanded)  # conceals the answer from the policy
        self._step_keep_ratio = self.sample_keep_ratio()
        self.handle.enabled, self.handle.mode = True, "gather"
        self.handle.set_budget(keep_ratio=self._step_keep_ratio)
        self.name_rollouts(batch)
        self.method.train()
        rows = torch.arange(batch["input_ids"].shape[0] * self.num_generations)
        greedy = rows % self.num_generations == 0 if self.top_k_first else None
        with self.method.sampling(greedy, group_size=self.num_generations) as rollouts, torch.no_grad():
            logits = self.logits(inputs)
        labels = expanded["labels"]
        correct = (answer_accuracy(logits, labels) >= 1.0).float()
        rows = answered(labels)
        if len(rollouts) > 1:
            raise ValueError(f"{self.method.name} sampled at {len(rollouts)} sites; GRPOTrainer trains one (pre_llm).")
        if not rollouts:  # no visual token to drop (or the budget keeps them all): nothing was sampled
            return None, correct, torch.ones_like(correct), rows
        sampled = rollouts[0]
        visual = sampled.inputs.visual
        kept = (sampled.mask & visual).sum(1).float() / visual.sum(1).clamp_min(1).float()
        return sampled, correct, kept, rows

    def global_rewards(self, rewards: Tensor) -> Tensor:
        """Every rank's rewards, flattened (this rank's alone outside distributed runs)."""
        return self.all_gather(rewards).reshape(-1)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self.check_batch(batch)
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        try:
            sampled, rewards, kept, rows = self.rollout(batch)
        except FloatingPointError as error:  # NaN embeddings or logits at the site: say which step
            raise self._at_step(error) from error
        every_answered = self.global_rewards(rows).bool()
        every = self.global_rewards(rewards)[every_answered]
        every_kept = self.global_rewards(kept)[every_answered]
        # an unanswered prompt's copies all score 0: centred to 0, they only leave the batch std to the others
        advantages, std = group_advantages(
            rewards, self.num_generations, self.scale_rewards, batch_rewards=every if every.numel() > 1 else None
        )
        self.last_rewards, self.last_reward_std = rewards[rows].detach(), std[rows].detach()
        terms: dict[str, Tensor] = {}
        for _ in range(self.num_iterations):
            terms = self.policy_terms(sampled, advantages, rows)
            self._check_finite_loss(terms["loss"], terms)
            optimizer.zero_grad()
            self.manual_backward(terms["loss"])
            if self.max_grad_norm is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            schedule.step()  # per optimizer step, as _total_steps lays the schedule out
        self.log_step(terms, every, every_kept, batch)
        return terms["loss"].detach()

    def policy_terms(
        self, sampled: Rollout | None, advantages: Tensor, rows: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The clipped surrogate (and KL) of the sampled combinations under the current policy, with gradient,
        averaged over ``rows`` (``[R]`` bool, default all: the rows with an answer)."""
        if rows is None:
            rows = torch.ones_like(advantages, dtype=torch.bool)
        if sampled is None or not bool(rows.any()):
            loss = self.zero_loss()  # still reaches every weight: DDP ranks stay in step
            return {"loss": loss, "policy": loss.detach()}
        rows = rows.to(sampled.mask.device)
        mask, visual = sampled.mask[rows], sampled.inputs.visual[rows]
        weights = balance_weights(mask, visual)
        old = combination_log_prob(sampled.logits[rows], mask, visual)
        current = self.method.keep_logits(sampled.inputs, self.num_generations)[rows]
        log_probs = combination_log_prob(current, mask, visual)
        policy = clipped_policy_loss(log_probs, old, advantages[rows], weights, self.epsilon_low, self.epsilon_high)
        terms = {"loss": policy, "policy": policy}
        if self.reference_policy is not None:
            with torch.no_grad():
                reference = self.reference_policy.keep_logits(sampled.inputs, self.num_generations)[rows]
            terms["kl"] = bernoulli_kl_penalty(log_probs, combination_log_prob(reference, mask, visual), weights)
            terms["loss"] = policy + self.beta * terms["kl"]
        return terms

    def log_step(self, terms: dict[str, Tensor], rewards: Tensor, kept: Tensor, batch: dict) -> None:
        """``train/<term>`` of the last PPO epoch, and the rollout's global (all-gathered) statistics over the
        rows with an answer (none logged when no rank had one)."""
        batch_size = max(1, self.logged_batch_size(batch))
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)
        self.log("train/keep_target", self._step_keep_ratio, batch_size=batch_size)
        if not rewards.numel():
            return
        self.log("train/reward", rewards.mean(), batch_size=batch_size)
        if rewards.numel() > 1:
            self.log("train/reward_std", rewards.std(), batch_size=batch_size)
        self.log("train/accuracy", rewards.mean(), prog_bar=True, batch_size=batch_size)
        self.log("train/keep_fraction", kept.mean(), batch_size=batch_size)


__all__ = ["GRPOTrainer"]
