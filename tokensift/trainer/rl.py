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


def bernoulli_log_prob(probs: Tensor, actions: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` log-probability of independent Bernoulli ``actions`` (``[B, N]`` bool, 1 = kept) under ``probs``
    (``[B, N]``), summed over the entries in ``mask`` (``[B, N]`` bool); differentiable in ``probs``.

    ``probs`` are clamped to ``[1e-6, 1 - 1e-6]`` so a saturated probability gives a finite log-probability."""
    if probs.shape != actions.shape or probs.shape != mask.shape:
        raise ValueError(
            f"bernoulli_log_prob: probs {tuple(probs.shape)}, actions {tuple(actions.shape)} and mask "
            f"{tuple(mask.shape)} must all be [B, N]."
        )
    p = probs.float().clamp(1e-6, 1 - 1e-6)
    per_entry = torch.where(actions.bool(), p.log(), (-p).log1p())
    return (per_entry * mask.to(per_entry.dtype)).sum(1)


def budget_reward(correct: Tensor, kept: Tensor, targets: Tensor, wrong_penalty: float) -> Tensor:
    """``[B]`` reward of a token-dropping draw: ``1 − mean_s ((kept_s − t_s) / t_s)²`` when the prediction is right,
    ``−wrong_penalty`` when it is wrong (BlockDrop's form, with the kept fraction measured against the budget's).

    Args:
        correct: ``[B]`` bool, the pruned model's prediction equals the label.
        kept: ``[B, S]`` kept fraction of the patches after each of the ``S`` sites.
        targets: ``[S]`` (or ``[B, S]``) the budget's kept fraction there (> 0).
        wrong_penalty: ``γ`` ≥ 0.
    """
    targets = torch.as_tensor(targets, dtype=torch.float32, device=kept.device)
    if bool((targets <= 0).any()):
        raise ValueError(f"budget_reward: targets must be > 0, got {targets.tolist()}.")
    deviation = (((kept.float() - targets) / targets) ** 2).mean(-1)
    return torch.where(correct.bool(), 1.0 - deviation, torch.full_like(deviation, -float(wrong_penalty)))


def reinforce_loss(log_prob: Tensor, reward: Tensor, baseline: Tensor | float) -> Tensor:
    """REINFORCE with a baseline: ``−mean_b((r_b − baseline) · log π(a_b))``; the advantage carries no gradient.

    Its gradient is the score-function estimate of ``−∇ E[r]``; the baseline lowers its variance without biasing it
    (when it does not depend on the sample's own action, e.g. a moving average, or a batch mean over many samples).
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


def reward_baseline(rewards: Tensor, all_reduce_mean=None) -> Tensor:
    """The bandit's baseline: the mean reward of this process's sub-networks, averaged over processes by
    ``all_reduce_mean`` (a callable, e.g. ``lambda t: strategy.reduce(t, reduce_op="mean")``; ``None``: one process)."""
    local = rewards.float().mean()
    return local if all_reduce_mean is None else all_reduce_mean(local)


def bandit_update(
    scores: Tensor, probabilities: Tensor, skip_sets: list[Tensor], rewards: Tensor, baseline: Tensor | float, lr: float
) -> Tensor:
    """DAS's score update: for every sub-network ``k`` and every arm ``i`` it skipped,
    ``score_i += (r_k − b) · p_i (1 − p_i) · lr``, with ``p`` the probabilities the sets were drawn from (the
    derivative of ``sigmoid(score_i)``). Returns the new scores ``[C]``."""
    step = torch.zeros_like(scores, dtype=torch.float32)
    slope = (probabilities * (1 - probabilities)).float()
    for skip_set, reward in zip(skip_sets, rewards, strict=True):
        advantage = (reward.float() - torch.as_tensor(baseline, dtype=torch.float32)).to(step.device)
        step.index_add_(0, skip_set.to(step.device), advantage * slope[skip_set] * lr)
    return (scores.float() + step).to(scores.dtype)


# -- GRPO over token combinations (cacovid) ---------------------------------------------------------------

_ADVANTAGE_EPS = 1e-4  # CaCoVID's (and TRL's) epsilon under the reward std
REWARD_SCALES = ("group", "batch", "none")


def sample_without_replacement(
    probs: Tensor, counts: Tensor, uniform: Tensor, candidates: Tensor | None = None
) -> Tensor:
    """``[R, N]`` bool: per row ``counts[r]`` distinct columns, drawn one after another, each with probability
    proportional to ``probs`` among the columns not drawn yet: ``torch.multinomial(probs, k, replacement=False)``'s
    scheme (CaCoVID samples its token combinations so), from the given noise instead of a generator.

    Exponential races (Efraimidis–Spirakis): column ``n`` finishes at ``−log(u_n) / p_n``; the ``counts[r]``
    earliest win, which is the successive draw's distribution. Zero-probability candidates finish after every
    positive one (a row asked for more than it has positive columns takes them at random); non-candidates never.

    Args:
        probs: ``[R, N]`` non-negative weights (need not sum to 1).
        counts: ``[R]`` how many columns each row draws (clamped to its candidates).
        uniform: ``[R, N]`` noise in ``[0, 1)`` (``TokenState.uniform``).
        candidates: ``[R, N]`` bool, the columns that may be drawn (default: all).
    """
    if probs.shape != uniform.shape or (candidates is not None and candidates.shape != probs.shape):
        raise ValueError(
            f"sample_without_replacement: probs {tuple(probs.shape)}, uniform {tuple(uniform.shape)} and "
            f"candidates {None if candidates is None else tuple(candidates.shape)} must all be [R, N]."
        )
    if bool((probs < 0).any()) or not bool(torch.isfinite(probs).all()):
        raise ValueError("sample_without_replacement: probs must be finite and >= 0.")
    rows = probs.shape[0]
    counts = torch.as_tensor(counts, device=probs.device).long().reshape(-1)
    if counts.shape != (rows,):
        raise ValueError(f"sample_without_replacement: counts must be [R] = ({rows},), got {tuple(counts.shape)}.")
    candidates = torch.ones_like(probs, dtype=torch.bool) if candidates is None else candidates.bool()
    wait = -uniform.double().clamp_min(2.0**-40).log()  # Exp(1)
    positive = candidates & (probs > 0)
    finish = torch.where(positive, wait / probs.double().clamp_min(1e-300), 1e300 * (1.0 + wait))
    finish = finish.masked_fill(~candidates, float("inf"))
    rank = finish.argsort(dim=1).argsort(dim=1)
    take = torch.minimum(counts.clamp_min(0), candidates.sum(1))
    return candidates & (rank < take.unsqueeze(1))


def combination_log_prob(logits: Tensor, mask: Tensor, candidates: Tensor) -> Tensor:
    """``[R, N]`` per-token Bernoulli log-probabilities of a sampled combination: ``log p`` where the token was
    kept, ``log(1 − p)`` where it was dropped (``p = sigmoid(logit)``, CaCoVID's two-way ``log_softmax``), 0 off
    ``candidates``. Their row sum is the combination's log-probability under independent keeps; CaCoVID takes the
    PPO ratio per token instead (:func:`clipped_policy_loss`)."""
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
    :func:`clipped_policy_loss` averages (GRPO's / CaCoVID's penalty term)."""
    delta = reference_log_probs.float().detach() - log_probs.float()
    per_token = delta.exp() - delta - 1.0
    weights = weights.float().detach()
    return ((per_token * weights).sum(1) / (weights.sum(1) + 1e-7)).mean()
