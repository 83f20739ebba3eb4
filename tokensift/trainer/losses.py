"""The objectives' terms: the image scorer's task + budget + distillation terms, each weighted and returned by
name for logging, and the per-sample answer-token terms of trainers on a multimodal LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # labels of tokens that are not scored (transformers' convention)


@dataclass
class LossWeights:
    """Weights of the objective (DynamicViT's defaults: task 1, budget 2, logits KL 0.5, token MSE 0.5)."""

    task: float = 1.0
    budget: float = 2.0
    distill: float = 0.5
    tokens: float = 0.5
    temperature: float = 1.0


def scorer_objective(
    logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor,
    tokens: Tensor,
    teacher_tokens: Tensor,
    records: list,
    weights: LossWeights,
    budget_term: bool | None = None,
) -> dict[str, Tensor]:
    """Loss terms of one mask-mode step, as DynamicViT's ``DistillDiffPruningLoss_dynamic`` (``mse_token``).

    - task: cross-entropy of the pruned model's logits;
    - budget: per sample, (kept fraction at site s − the site's target)², averaged over the batch and the
      sites. Only when the method keeps a variable count (``threshold`` selection): where every site keeps
      exactly the budget's count (``topk``, what inference keeps) the kept fraction does not depend on the
      scorer, the term would be a constant, and it is left out (no key). ``budget_term`` says which (the
      trainer passes ``not method.keeps_budget_count``); ``None`` reads it from the records
      (``SiteRecord.exact_count``);
    - distill: KL(teacher ‖ student) on temperature-scaled logits (teacher = same frozen model, unpruned);
    - tokens: MSE between student and teacher final tokens over the *patch* tokens the student kept
      (DynamicViT distils ``x[:, 1:]``: [CLS] / registers are not part of it), mean over tokens and channels.
    """
    task = F.cross_entropy(logits, labels)
    distill = distillation_kl(logits, teacher_logits, weights.temperature)
    # which tokens count is a hard, non-differentiable choice (as DynamicViT's boolean mask): a gradient
    # through it would teach the scorer to drop exactly the tokens pruning perturbs most
    last = records[-1]
    kept = last.policy.detach() > 0.5
    if last.protected is not None:
        kept = kept & ~last.protected.to(kept.device)
    kept = kept.to(tokens.dtype).unsqueeze(-1)
    token_error = ((tokens - teacher_tokens) ** 2 * kept).sum() / (kept.sum() * tokens.shape[-1]).clamp_min(1.0)
    terms = {"task": task, "distill": distill, "tokens": token_error}
    loss = weights.task * task + weights.distill * distill + weights.tokens * token_error
    if budget_term is None:
        budget_term = not all(getattr(r, "exact_count", False) for r in records)
    if budget_term:
        budget = torch.stack([((r.keep_fraction - r.target) ** 2).mean() for r in records]).mean()
        terms["budget"] = budget
        loss = loss + weights.budget * budget
    return {"loss": loss, **terms}


def distillation_kl(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher ‖ student) on temperature-scaled logits, times ``temperature²`` (batch mean)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(logits / t, dim=-1),
        F.log_softmax(teacher_logits / t, dim=-1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)


def removal_objective(logits: Tensor, labels: Tensor, teacher_logits: Tensor | None, weights: LossWeights) -> dict:
    """Loss terms of a step that removes tokens (gather mode, ``train_by_removal``): task cross-entropy and, when
    ``teacher_logits`` is given (``weights.distill > 0``), the logits KL of :func:`scorer_objective`.

    No budget term: every site keeps the budget's exact count. No token MSE: the teacher's final tokens would have
    to be cached per sample (``[N, D]`` each; ViT-Tiny: 151 KB, 190 GB for ImageNet-1k) or recomputed, which is the
    teacher pass the cache saves; ``ScorerTrainer`` refuses ``weights.tokens > 0`` on this path.
    """
    task = F.cross_entropy(logits, labels)
    if teacher_logits is None:
        return {"loss": weights.task * task, "task": task}
    distill = distillation_kl(logits, teacher_logits, weights.temperature)
    return {"loss": weights.task * task + weights.distill * distill, "task": task, "distill": distill}


def answer_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``[B]`` mean cross-entropy over each sample's answer tokens (0 for a sample without any).

    ``labels`` ``[B, L]`` is ``-100`` except the answer tokens, and ``labels[:, t]`` is predicted by
    ``logits[:, t - 1]`` (transformers' causal-LM convention); logits ``[B, L, V]`` are scored in float32.
    """
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    return (per_token * scored).sum(1) / scored.sum(1).clamp(min=1)


def answer_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """``[B]`` fraction of each sample's answer tokens predicted right (argmax), as :func:`answer_loss` shifts."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    right = (logits[:, :-1].argmax(-1) == targets) & scored
    return right.sum(1) / scored.sum(1).clamp(min=1)


def answered(labels: Tensor) -> Tensor:
    """``[B]`` bool: the sample has at least one answer token (the others carry no answer term)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(1)
