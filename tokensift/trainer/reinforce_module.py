"""``ReinforceTrainer``: a token-dropping policy trained by REINFORCE on a frozen image classifier (IA-RED²).

Each step runs the frozen ViT once in mask mode: at every site the method (``ia_red2``) draws a hard keep decision
per live patch from its keep probabilities, multiplied into the previous site's (a dropped patch stays dropped);
nothing is differentiated through the backbone, only the draws' log-probability through the interpreters. The
reward per sample (``tokensift.trainer.rl.budget_reward``) is ``1 − min(1, mean_s ((kept_s − t_s)/t_s)²)`` when the
pruned prediction is right (in ``[0, 1]``) and ``−wrong_penalty`` when it is wrong (below every right answer),
``t_s`` the budget's kept fraction at site ``s`` for the step's keep ratio (drawn from ``keep_ratio_range``, so one
artifact serves the range). Each sample's baseline is the mean reward of the other samples of the global batch
(leave-one-out, the sums all-reduced under DDP), and the loss ``−mean((r − b) · log π)`` (``rl.reinforce_loss``).
Validation (top-k by keep probability in gather mode at ``eval_keep_ratios``), export and the rest are
:class:`~tokensift.trainer.module.ScorerTrainer`'s.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor

from tokensift.trainer.module import ScorerTrainer
from tokensift.trainer.rl import (
    budget_deviation,
    budget_reward,
    combination_log_prob,
    leave_one_out_baseline,
    reinforce_loss,
)


class ReinforceTrainer(ScorerTrainer):
    """Train a sampling token policy (``ia_red2``) on the frozen ``backbone`` by REINFORCE with a leave-one-out
    baseline.

    Args:
        backbone, method, method_options, keep_ratio_range, eval_keep_ratios, lr, weight_decay, warmup_fraction,
            attn_implementation, seed: as :class:`ScorerTrainer` (``method``: a learned method whose training
            ``keep_policy`` draws its decisions and hands them over with ``take_draws()``).
        wrong_penalty: the reward ``−γ`` of a wrong prediction (BlockDrop's ``γ``, > 0); a right one earns
            ``1 − min(1, mean_s ((kept_s − t_s)/t_s)²)``.
    """

    trains_by_reward = True

    synced_terms = ("reward", "accuracy", "budget_deviation")

    def __init__(
        self,
        backbone: str,
        method: str = "ia_red2",
        method_options: dict[str, Any] | None = None,
        keep_ratio_range: tuple[float, float] = (0.25, 0.75),
        eval_keep_ratios: list[float] | None = None,
        wrong_penalty: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_fraction: float = 0.05,
        attn_implementation: str = "sdpa",
        seed: int = 0,
    ):
        if (
            isinstance(wrong_penalty, bool)
            or not isinstance(wrong_penalty, (int, float))
            or not (math.isfinite(wrong_penalty) and wrong_penalty > 0)
        ):
            raise ValueError(
                "wrong_penalty must be a finite number > 0 (the reward of a wrong prediction is its negative, below "
                f"every right one's [0, 1]; BlockDrop-style 0.5 is the default), got {wrong_penalty!r}."
            )
        super().__init__(
            backbone,
            method,
            method_options,
            keep_ratio_range=keep_ratio_range,
            eval_keep_ratios=eval_keep_ratios,
            lr=lr,
            weight_decay=weight_decay,
            warmup_fraction=warmup_fraction,
            attn_implementation=attn_implementation,
            seed=seed,
            teacher_cache=False,
        )
        self.wrong_penalty = float(wrong_penalty)
        # ScorerTrainer recorded its own arguments (loss, lora, ...), which this __init__ does not take: keep only
        # these, so load_from_checkpoint (and LightningCLI's instantiator) rebuilds the module. Not ``seed``, as the
        # other trainers: a data module's own ``seed`` would clash with it when Lightning merges the hyperparameters
        own = inspect.signature(ReinforceTrainer.__init__).parameters
        self.save_hyperparameters(ignore=["seed", *(name for name in self.hparams if name not in own)])

    def check_method(self, cls) -> None:
        super().check_method(cls)
        if not callable(getattr(cls, "take_draws", None)):
            raise ValueError(
                f"method {cls.name!r} hands over no Bernoulli draws (take_draws()); ReinforceTrainer trains "
                "vision-tower policies that draw each patch's keep decision in training mode and hand the draws over "
                "(ia_red2): give the method a take_draws() as tokensift/scorers/ia_red2/model.py does."
            )

    def training_loss(self, batch: dict) -> dict[str, Tensor]:
        inputs, labels = self.model_inputs(batch), batch["labels"]
        self.prepare_pruned_pass(batch)
        self.method.train()
        # the draws are hard and carry no gradient, so the frozen backbone's activations need no graph: only the
        # interpreters' probabilities do
        logits = self.logits(inputs).detach()
        draws = self.method.take_draws()
        log_prob = torch.stack([combination_log_prob(d.logits, d.kept, d.candidates).sum(1) for d in draws]).sum(0)
        correct = logits.argmax(-1) == labels
        records = self.handle.last_records
        kept = torch.stack([r.keep_fraction for r in records], dim=1).detach()
        targets = torch.tensor([r.target for r in records], device=kept.device)
        reward = budget_reward(correct, kept, targets, self.wrong_penalty)
        total, count = self.global_sum_and_count(reward)
        loss = reinforce_loss(log_prob, reward, leave_one_out_baseline(reward, total, count))
        deviation = budget_deviation(kept, targets)
        return {
            "loss": loss,
            "reward": reward.mean(),
            "accuracy": correct.float().mean(),
            "budget_deviation": deviation.mean(),
        }

    def global_sum_and_count(self, values: Tensor) -> tuple[Tensor, int]:
        """The sum of ``values`` ``[B]`` over the global batch (every rank's, all-reduced) and how many there are."""
        local = torch.stack([values.float().sum(), torch.tensor(float(values.numel()), device=values.device)])
        if self._trainer is not None:  # else a module stepped by hand, outside a Trainer
            local = self.trainer.strategy.reduce(local, reduce_op="sum")
        return local[0], int(local[1].item())


__all__ = ["ReinforceTrainer"]
