"""Reward-trained selections: the policy-gradient and bandit arithmetic shared by the RL trainers.

Each function is one piece of an objective (sampling a combination, its log-probability, advantages, a clipped
surrogate, a bandit update), written once here and used by the Lightning modules that train token policies
(``cacovid``: GRPO, ``ia_red2``: REINFORCE) and layer-skip bandits (``das``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# -- REINFORCE with a baseline (ia_red2) ------------------------------------------------------------------


def budget_deviation(kept: Tensor, targets: Tensor) -> Tensor:
    """``[B]`` how far a draw's kept fractions are from the budget's: ``mean_s ((kept_s − t_s) / t_s)²``.

    Args:
        kept: ``[B, S]`` kept fraction of the patches after each of the ``S`` sites.
        targets: ``[S]`` (or ``[B, S]``) the budget's kept fraction there (> 0).
    """
    targets = torch.as_tensor(targets, dtype=torch.float32, device=kept.device)
    if bool((targets <= 0).any()):
        raise ValueError(
            f"budget_deviation: targets must be > 0 (the budget's kept fraction at each site), got {targets.tolist()}."
        )
    return (((kept.float() - targets) / targets) ** 2).mean(-1)


def budget_reward(correct: Tensor, kept: Tensor, targets: Tensor, wrong_penalty: float) -> Tensor:
    """``[B]`` reward of a token-dropping draw: ``1 − min(1, budget_deviation)`` when the prediction is right,
    ``−wrong_penalty`` when it is wrong (BlockDrop's form, with the kept fraction measured against the budget's).

    The deviation is capped at 1 so a right answer earns ``[0, 1]`` and always outranks a wrong one (``−γ < 0``),
    however far its kept fractions are from the budget: uncapped, keeping about 2.2× the budget and being right
    would score below being wrong, and the policy would learn to answer wrong rather than keep too much.

    Args:
        correct: ``[B]`` bool, the pruned model's prediction equals the label.
        kept: ``[B, S]`` kept fraction of the patches after each of the ``S`` sites.
        targets: ``[S]`` (or ``[B, S]``) the budget's kept fraction there (> 0).
        wrong_penalty: ``γ`` > 0, finite.
    """
    if not (math.isfinite(wrong_penalty) and wrong_penalty > 0):
        raise ValueError(
            f"budget_reward: wrong_penalty must be a finite number > 0 (a wrong answer's reward is its negative, "
            f"below every right answer's), got {wrong_penalty!r}."
        )
    deviation = budget_deviation(kept, targets).clamp(max=1.0)
    return torch.where(correct.bool(), 1.0 - deviation, torch.full_like(deviation, -float(wrong_penalty)))


def leave_one_out_baseline(rewards: Tensor, total: Tensor | float, count: int) -> Tensor:
    """``[B]`` each sample's baseline: the mean reward of the *other* ``count − 1`` samples of the global batch,
    ``(total − r_b) / (count − 1)``, with ``total`` the global batch's reward sum (every rank's). A baseline that
    does not depend on the sample's own draw leaves the policy gradient unbiased; the plain batch mean includes it
    (its gradient is scaled by ``1 − 1/count``). One sample alone has no other: baseline 0."""
    if count < 1:
        raise ValueError(f"leave_one_out_baseline: count must be >= 1 (the global batch size), got {count}.")
    if count == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    total = torch.as_tensor(total, dtype=torch.float32, device=rewards.device)
    return (total - rewards.float()) / (count - 1)


def reinforce_loss(log_prob: Tensor, reward: Tensor, baseline: Tensor | float) -> Tensor:
    """REINFORCE with a baseline: ``−mean_b((r_b − baseline_b) · log π(a_b))``; the advantage carries no gradient.

    Its gradient estimates ``−∇ E[r]`` without bias when ``baseline_b`` does not depend on sample ``b``'s own
    action (a constant, a moving average, :func:`leave_one_out_baseline`); the plain batch mean does (through
    ``r_b``), which biases the estimate by the factor ``1 − 1/B``.
    """
    if log_prob.shape != reward.shape:
        raise ValueError(f"reinforce_loss: log_prob {tuple(log_prob.shape)} and reward {tuple(reward.shape)} differ.")
    advantage = (reward.float() - torch.as_tensor(baseline, dtype=torch.float32, device=reward.device)).detach()
    return -(advantage * log_prob.float()).mean()


# -- layer-skip bandit (DAS) -------------------------------------------------------------------------------------


def ramped_skip_count(target: int, step: int, warmup_steps: int) -> int:
    """Layers a DAS search step skips: ``target · step · 2 // warmup_steps + 1``, at most ``target`` (DAS's ramp,
    ``step`` counted from 1): a fresh network loses one layer at a time while the adapters learn to stand in."""
    if warmup_steps <= 0:
        return target
    return min(target, target * step * 2 // warmup_steps + 1)


def sample_skip_set(probabilities: Tensor, count: int, generator: torch.Generator | None = None) -> Tensor:
    """``count`` distinct arms drawn by ``torch.multinomial`` without replacement, weighted by ``probabilities``
    ([C], each arm's sigmoid skip probability), sorted ascending (DAS ``torch.sort(torch.multinomial(prob, k))``)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=probabilities.device)
    drawn = torch.multinomial(probabilities.float(), count, replacement=False, generator=generator)
    return drawn.sort().values


def sample_distinct_skip_sets(
    probabilities: Tensor, count: int, num_sets: int, generator: torch.Generator | None = None
) -> list[Tensor]:
    """``num_sets`` pairwise different skip sets of ``count`` arms each (:func:`sample_skip_set`, redrawn while a set
    repeats, as DAS does), capped at the number of such sets there are (``C choose count``)."""
    possible = math.comb(int(probabilities.shape[0]), count)
    sets: list[Tensor] = []
    seen: set[tuple[int, ...]] = set()
    while len(sets) < min(num_sets, possible):
        drawn = sample_skip_set(probabilities, count, generator)
        key = tuple(drawn.tolist())
        if key not in seen:
            seen.add(key)
            sets.append(drawn)
    return sets


def reward_baseline(rewards: Tensor, all_reduce_sum=None) -> Tensor:
    """The bandit's baseline: the mean reward of every process's sub-networks. Each process contributes its reward
    sum and count, summed over processes by ``all_reduce_sum`` (a callable on a ``[2]`` tensor, e.g.
    ``lambda t: strategy.reduce(t, reduce_op="sum")``; ``None``: one process), so a process with no rewards (an empty
    ``rewards``) joins the collective with weight 0. 0 when no process has a reward."""
    totals = torch.stack([rewards.float().sum(), torch.tensor(float(rewards.numel()))])
    if all_reduce_sum is not None:
        totals = all_reduce_sum(totals)
    return totals[0] / totals[1].clamp(min=1.0)


def bandit_step(
    probabilities: Tensor, skip_sets: list[Tensor], rewards: Tensor, baseline: Tensor | float, lr: float
) -> Tensor:
    """DAS's score increment ``[C]``: for every sub-network ``k`` and every arm ``i`` it skipped,
    ``(r_k − b) · p_i (1 − p_i) · lr``, with ``p`` the probabilities the sets were drawn from (the derivative of
    ``sigmoid(score_i)``)."""
    step = torch.zeros(probabilities.shape, dtype=torch.float32, device=probabilities.device)
    slope = (probabilities * (1 - probabilities)).float()
    for skip_set, reward in zip(skip_sets, rewards, strict=True):
        advantage = (reward.float() - torch.as_tensor(baseline, dtype=torch.float32)).to(step.device)
        step.index_add_(0, skip_set.to(step.device), advantage * slope[skip_set] * lr)
    return step


def bandit_update(
    scores: Tensor, probabilities: Tensor, skip_sets: list[Tensor], rewards: Tensor, baseline: Tensor | float, lr: float
) -> Tensor:
    """DAS's score update on one process: ``scores + bandit_step(...)``. Returns the new scores ``[C]``."""
    step = bandit_step(probabilities, skip_sets, rewards, baseline, lr).to(scores.device)
    return (scores.float() + step).to(scores.dtype)


def mean_step_over_contributors(step: Tensor, contributed: bool, all_reduce_sum=None) -> Tensor:
    """The score increment averaged over the processes that rewarded sub-networks this search (DAS averages the
    processes' updated scores): every process calls it, one without rewards with ``contributed=False`` (its zero
    step then weighs nothing). ``all_reduce_sum`` sums a tensor over processes (``None``: one process)."""
    packed = torch.cat([step.float().flatten(), torch.tensor([float(contributed)], device=step.device)])
    if all_reduce_sum is not None:
        packed = all_reduce_sum(packed)
    return (packed[:-1] / packed[-1].clamp(min=1.0)).view_as(step)


# -- GRPO over token combinations (cacovid) ---------------------------------------------------------------

_ADVANTAGE_EPS = 1e-4  # CaCoVID's (and TRL's) epsilon under the reward std
REWARD_SCALES = ("group", "batch", "none")


def combination_log_prob(logits: Tensor, mask: Tensor, candidates: Tensor) -> Tensor:
    """``[R, N]`` per-token Bernoulli log-probabilities of a sampled combination: ``log p`` where the token was
    kept, ``log(1 − p)`` where it was dropped (``p = sigmoid(logit)``, CaCoVID's two-way ``log_softmax``), 0 off
    ``candidates``. Their row sum is the combination's log-probability under independent keeps (ia_red2's
    REINFORCE sums it so); CaCoVID takes the PPO ratio per token instead (:func:`clipped_policy_loss`). Logits, not
    probabilities: ``logsigmoid`` stays finite and exact where a probability saturates to 0 or 1 in float32."""
    if logits.shape != mask.shape or logits.shape != candidates.shape:
        raise ValueError(
            f"combination_log_prob: logits {tuple(logits.shape)}, mask {tuple(mask.shape)} and candidates "
            f"{tuple(candidates.shape)} must all be [R, N]."
        )
    logits = logits.float()
    per_token = torch.where(mask.bool(), F.logsigmoid(logits), F.logsigmoid(-logits))
    return per_token * candidates.to(per_token.dtype)


def balance_weights(mask: Tensor, candidates: Tensor) -> Tensor:
    """``[R, N]`` CaCoVID's per-token loss weights: with ``m`` the row's kept fraction, a kept token weighs
    ``1 − m`` and a dropped one ``m``, so the few kept and the many dropped tokens of a combination weigh alike in
    sum; 0 off ``candidates``."""
    candidates = candidates.bool()
    kept = (mask.bool() & candidates).float()
    fraction = kept.sum(1, keepdim=True) / candidates.sum(1, keepdim=True).clamp_min(1)
    return torch.where(mask.bool(), 1.0 - fraction, fraction) * candidates.float()


def group_advantages(
    rewards: Tensor, group_size: int, scale: str = "group", batch_rewards: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """GRPO's advantages of ``rewards`` ``[R]``, rows in consecutive groups of ``group_size`` (one prompt's
    samples): ``(r − mean_group) / (std + 1e-4)``, and the ``std`` used (``[R]``, one value per row).

    ``scale``: ``"group"`` the group's std (CaCoVID), ``"batch"`` the std of ``batch_rewards`` (every rank's
    rewards, all-gathered: TRL's ``scale_rewards="batch"``; default ``rewards``), ``"none"`` no division. Stds
    are unbiased (``torch.std``), as both references.
    """
    if scale not in REWARD_SCALES:
        raise ValueError(f"group_advantages: scale must be one of {list(REWARD_SCALES)}, got {scale!r}.")
    if group_size < 2 or rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"group_advantages: rewards {tuple(rewards.shape)} must be [R] with R a multiple of group_size "
            f"{group_size} >= 2."
        )
    grouped = rewards.float().view(-1, group_size)
    centred = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred, torch.ones_like(centred)
    if scale == "group":
        std = grouped.std(1, keepdim=True).expand_as(grouped).reshape(-1)
    else:
        pool = rewards if batch_rewards is None else batch_rewards
        std = pool.float().reshape(-1).std().expand_as(centred)
    return centred / (std + _ADVANTAGE_EPS), std


def clipped_policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    weights: Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
) -> Tensor:
    """PPO's clipped surrogate per token, averaged as CaCoVID averages it.

    ``ratio = exp(log_probs − old_log_probs)`` per token; the token's loss ``−min(ratio · A, clip(ratio, 1 − ε_low,
    1 + ε_high) · A)`` with its row's advantage ``A``; each row's weighted mean (``weights``, e.g.
    :func:`balance_weights`; ``Σ w l / (Σ w + 1e-7)``), then the mean over rows.

    Args:
        log_probs: ``[R, N]`` per-token log-probabilities under the current policy (with gradient).
        old_log_probs: ``[R, N]`` the same under the policy that sampled (no gradient).
        advantages: ``[R]``.
        weights: ``[R, N]`` (0 where a token does not count).
    """
    if log_probs.shape != old_log_probs.shape or log_probs.shape != weights.shape:
        raise ValueError(
            f"clipped_policy_loss: log_probs {tuple(log_probs.shape)}, old_log_probs {tuple(old_log_probs.shape)} "
            f"and weights {tuple(weights.shape)} must all be [R, N]."
        )
    if advantages.shape != log_probs.shape[:1]:
        raise ValueError(f"clipped_policy_loss: advantages must be [R] = ({log_probs.shape[0]},).")
    ratio = (log_probs.float() - old_log_probs.float().detach()).exp()
    advantage = advantages.float().detach().unsqueeze(1)
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -torch.minimum(ratio * advantage, clipped * advantage)
    weights = weights.float().detach()
    return ((per_token * weights).sum(1) / (weights.sum(1) + 1e-7)).mean()


def bernoulli_kl_penalty(log_probs: Tensor, reference_log_probs: Tensor, weights: Tensor) -> Tensor:
    """The k3 estimate of KL(π ‖ π_ref) per token, ``exp(ref − lp) − (ref − lp) − 1``, averaged as
    :func:`clipped_policy_loss` averages: GRPO's penalty with ``π_ref`` the policy as training started (what
    ``GRPOTrainer`` passes). CaCoVID's code has the same form but anchors to a constant Bernoulli(0.5)
    (``reference_log_probs = log 0.5``), and its runs weigh it 0."""
    delta = reference_log_probs.float().detach() - log_probs.float()
    per_token = delta.exp() - delta - 1.0
    weights = weights.float().detach()
    return ((per_token * weights).sum(1) / (weights.sum(1) + 1e-7)).mean()
