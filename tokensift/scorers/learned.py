"""Differentiable keep decisions that learned methods share: Gumbel top-k, DynamicViT's binary Gumbel and a soft
top-k whose threshold keeps the count in sum (``soft_top_k``).

Both take the noise as a ``[B, N]`` uniform tensor (``TokenState.uniform(seed, stream)``), never a generator,
so a sample's draw is a function of the sample (see ``docs/design.md``, "Randomness is a function of the
sample"). Both return a hard 0/1 decision in the forward pass with a straight-through sigmoid gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-6


def logistic_noise(uniform: Tensor) -> Tensor:
    """``log u - log(1 - u)``: the difference of two Gumbels, the noise of a binary Gumbel-softmax."""
    u = uniform.clamp(_EPS, 1 - _EPS)
    return u.log() - (-u).log1p()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``[B, 1]`` mean of ``values`` over ``mask`` per row (0 for a row without any)."""
    weight = mask.to(values.dtype)
    return (values * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp_min(1.0)


def straight_through(soft: Tensor, hard: Tensor) -> Tensor:
    """``hard`` in the forward pass, ``soft``'s gradient in the backward pass."""
    hard = hard.to(soft.dtype)
    return hard - soft.detach() + soft


def binary_gumbel(logits: Tensor, uniform: Tensor, tau: float) -> Tensor:
    """DynamicViT's per-token hard decision: keep where ``logits + logistic noise > 0``.

    ``sigmoid((logits + noise) / tau)`` in the backward pass; the kept count varies with the scores.
    """
    perturbed = logits + logistic_noise(uniform).to(logits.dtype)
    soft = torch.sigmoid(perturbed / tau)
    return straight_through(soft, soft > 0.5)


def straight_through_top_k(logits: Tensor, candidates: Tensor, num_keep: Tensor, uniform: Tensor, tau: float) -> Tensor:
    """Gumbel top-k: per row keep exactly ``num_keep[b]`` of the noise-perturbed ``logits`` among ``candidates``.

    Args:
        logits: ``[B, N]`` keep logits (higher = keep).
        candidates: ``[B, N]`` bool, the tokens that may be kept (live visual / patch tokens).
        num_keep: ``[B]`` long, how many candidates each row keeps (clamped to ``[0, candidates]``).
        uniform: ``[B, N]`` noise in ``[0, 1)`` (``TokenState.uniform``).
        tau: temperature of the straight-through sigmoid.

    Returns ``[B, N]``: exactly ``num_keep[b]`` ones in the forward pass (by rank, so near-ties cannot miscount),
    0 for non-candidates; backward: ``sigmoid((perturbed - threshold) / tau)``, the threshold detached and halfway
    between the last kept and the first dropped perturbed logit (at most 1 below the last kept one).

    The logits are centred over the candidates first: top-k is blind to a shift of all logits but the sigmoid
    surrogate is not, and without centring the task loss (every extra token helps) grows every logit and
    trains the ranking backwards (``docs/design.md``, "Gumbel top-k with centred logits"); centred, the
    gradient sums to zero per row. For equal counts ``0 < k <= candidates`` this is DynamicViT's ``topk``
    selection, value for value.
    """
    if logits.shape != candidates.shape or logits.shape != uniform.shape:
        raise ValueError(
            f"straight_through_top_k: logits {tuple(logits.shape)}, candidates {tuple(candidates.shape)} and uniform "
            f"{tuple(uniform.shape)} must all be [B, N]."
        )
    rows, width = logits.shape
    num_keep = torch.as_tensor(num_keep, device=logits.device).long().reshape(-1)
    if num_keep.shape != (rows,):
        raise ValueError(f"straight_through_top_k: num_keep must be [B] = ({rows},), got {tuple(num_keep.shape)}.")
    logits = logits - masked_mean(logits, candidates)
    perturbed = logits + logistic_noise(uniform).to(logits.dtype)
    available = candidates.sum(dim=1)
    k = torch.minimum(num_keep.clamp_min(0), available)
    order = perturbed.detach().masked_fill(~candidates, float("-inf")).sort(dim=1, descending=True)
    ranked = order.values
    last = ranked.gather(1, (k - 1).clamp(0, width - 1).unsqueeze(1)).squeeze(1)
    following = ranked.gather(1, k.clamp(max=width - 1).unsqueeze(1)).squeeze(1)
    following = torch.where(k < width, following, torch.full_like(following, float("-inf")))
    threshold = (last + following.maximum(last - 1.0)) / 2
    threshold = torch.where(k == width, last - 1.0, threshold)  # every column kept: DynamicViT's 1 below
    threshold = torch.where(k == 0, ranked[:, 0] + 0.5, threshold)  # nothing kept: half above the best
    threshold = torch.where(available == 0, torch.zeros_like(threshold), threshold)  # no candidates: unused
    soft = torch.sigmoid((perturbed - threshold.detach().unsqueeze(1)) / tau)
    rank = torch.empty_like(order.indices)
    rank.scatter_(1, order.indices, torch.arange(width, device=logits.device).expand(rows, width))
    hard = candidates & (rank < k.unsqueeze(1))
    return torch.where(candidates, straight_through(soft, hard), torch.zeros_like(soft))


def soft_top_k(logits: Tensor, candidates: Tensor, num_keep: Tensor, tau: float, iterations: int = 40) -> Tensor:
    """A soft keep policy that keeps ``num_keep[b]`` tokens *in sum*: ``sigmoid((logits - θ_b) / tau)`` among
    ``candidates``, the threshold ``θ_b`` found by bisection so that the row sums to ``num_keep[b]`` (VisionSelector's
    differentiable top-k), 0 for non-candidates.

    The threshold's gradient is the implicit one: ``θ_b`` moves with the logits so the sum stays ``num_keep[b]``
    (``∂θ/∂l_j = σ'_j / Σ σ'``). Without it (a detached threshold) the task's gradient, which favours keeping every
    token, grows all logits alike and the relaxation hardens instead of ranking: on digit VQA a selector trained
    that way, and one trained with the straight-through Gumbel top-k, both ended below random, this one 19 points
    above it (``docs/methods.md``, ``question_selector``). Inference keeps the hard top-k of the same logits.
    """
    if logits.shape != candidates.shape:
        raise ValueError(f"soft_top_k: logits {tuple(logits.shape)} and candidates {tuple(candidates.shape)} differ.")
    target = torch.minimum(
        torch.as_tensor(num_keep, device=logits.device).reshape(-1, 1).float(), candidates.sum(1, keepdim=True).float()
    )
    detached = logits.detach().float()
    low = detached.masked_fill(~candidates, float("inf")).amin(1, keepdim=True) - 30.0 * tau
    high = detached.masked_fill(~candidates, float("-inf")).amax(1, keepdim=True) + 30.0 * tau
    empty = ~candidates.any(1, keepdim=True)
    low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
    for _ in range(iterations):
        middle = (low + high) / 2
        total = (torch.sigmoid((detached - middle) / tau) * candidates).sum(1, keepdim=True)
        above = total > target
        low, high = torch.where(above, middle, low), torch.where(above, high, middle)
    threshold = (low + high) / 2
    z = torch.sigmoid((detached - threshold) / tau)
    slope = z * (1 - z) * candidates
    weights = slope / slope.sum(1, keepdim=True).clamp_min(1e-12)
    threshold = threshold + (weights * (logits.float() - detached)).sum(1, keepdim=True)  # value θ, gradient ∂θ/∂l
    soft = torch.sigmoid((logits.float() - threshold) / tau).to(logits.dtype)
    return torch.where(candidates, soft, torch.zeros_like(soft))


# -- sampling a combination (a reward-trained policy's rollout, e.g. cacovid) ----------------------------


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


# -- config checks: every error names the field and the fix ----------------------------------------------


def check_int(config, name: str, minimum: int = 1, optional: bool = False) -> None:
    value = getattr(config, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fill = " (or null to fill it from the backbone)" if optional else ""
        raise ValueError(f"{type(config).__name__}.{name} must be an integer >= {minimum}{fill}, got {value!r}.")


def check_float(config, name: str, low: float = 0.0, high: float | None = None, low_open: bool = True) -> None:
    value = getattr(config, name)
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    below = number and (value <= low if low_open else value < low)
    if not number or value != value or below or (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{type(config).__name__}.{name} must be a number {bound}, got {value!r}.")


def check_bool(config, name: str) -> None:
    if not isinstance(getattr(config, name), bool):
        raise ValueError(f"{type(config).__name__}.{name} must be true or false, got {getattr(config, name)!r}.")


def check_choice(config, name: str, options: tuple[str, ...]) -> None:
    if getattr(config, name) not in options:
        value = getattr(config, name)
        raise ValueError(f"{type(config).__name__}.{name} must be one of {list(options)}, got {value!r}.")


def check_llm_sites(config, num_layers: int | None = None) -> None:
    """``config.sites``: None, or distinct ``llm.<k>`` names (k >= 1, below ``num_layers`` when known), in order."""
    sites = config.sites
    if sites is None:
        return
    name = type(config).__name__
    if not isinstance(sites, (list, tuple)) or not sites:
        raise ValueError(
            f"{name}.sites must be a non-empty list of llm.<k> sites (or null: the default), got {sites!r}."
        )
    layers = []
    for site in sites:
        index = site[4:] if isinstance(site, str) and site.startswith("llm.") else ""
        if not index.isdigit() or int(index) < 1:
            raise ValueError(f"{name}.sites holds {site!r}; this method runs at llm.<k> sites, k >= 1 (e.g. 'llm.2').")
        layers.append(int(index))
    if layers != sorted(set(layers)):
        raise ValueError(f"{name}.sites must be distinct and in layer order, got {list(sites)}.")
    if num_layers is not None and layers[-1] >= num_layers:
        raise ValueError(
            f"{name}.sites {list(sites)} must lie in llm.1 .. llm.{num_layers - 1} (the model has {num_layers} "
            "decoder layers)."
        )


# -- packing a sample's tokens of one kind into a padded batch --------------------------------------------


def pack_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's ``True`` positions of ``mask`` ``[B, N]``, ascending, packed to the left: ``index [B, M]`` and
    ``valid [B, M]`` (``M`` the largest count; padding entries of ``index`` point at arbitrary tokens)."""
    count = mask.sum(dim=1)
    width = int(count.max()) if count.numel() else 0
    index = (~mask).to(torch.uint8).argsort(dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < count.unsqueeze(1)
    return index, valid


def gather_tokens(values: Tensor, index: Tensor) -> Tensor:
    """``values [B, N, D]`` at ``index [B, M]``: ``[B, M, D]``."""
    return values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


def unpack(values: Tensor, index: Tensor, valid: Tensor, width: int) -> Tensor:
    """Packed ``values [B, M]`` back to ``[B, width]`` at ``index``; 0 everywhere else (differentiable)."""
    out = values.new_zeros(values.shape[0], width)
    return out.scatter_add(1, index, values * valid.to(values.dtype))


__all__ = [
    "binary_gumbel",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_llm_sites",
    "gather_tokens",
    "logistic_noise",
    "masked_mean",
    "pack_index",
    "sample_without_replacement",
    "straight_through",
    "straight_through_top_k",
    "unpack",
]
