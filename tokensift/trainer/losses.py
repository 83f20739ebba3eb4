"""The scorer objective: task + budget + distillation terms, each weighted, returned by name for logging."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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
) -> dict[str, Tensor]:
    """Loss terms of one mask-mode step, as DynamicViT's ``DistillDiffPruningLoss_dynamic`` (``mse_token``).

    - task: cross-entropy of the pruned model's logits;
    - budget: per sample, (kept fraction at site s − the site's target)², averaged over the batch and the
      sites. Only when some site keeps a variable count (``threshold`` selection): where every site keeps
      exactly the budget's count (``topk``, what inference keeps; ``SiteRecord.exact_count``) the kept
      fraction does not depend on the scorer, the term would be a constant, and it is left out (no key);
    - distill: KL(teacher ‖ student) on temperature-scaled logits (teacher = same frozen model, unpruned);
    - tokens: MSE between student and teacher final tokens over the *patch* tokens the student kept
      (DynamicViT distils ``x[:, 1:]``: [CLS] / registers are not part of it), mean over tokens and channels.
    """
    task = F.cross_entropy(logits, labels)
    t = weights.temperature
    distill = F.kl_div(
        F.log_softmax(logits / t, dim=-1),
        F.log_softmax(teacher_logits / t, dim=-1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)
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
    if not all(getattr(r, "exact_count", False) for r in records):
        budget = torch.stack([((r.keep_fraction - r.target) ** 2).mean() for r in records]).mean()
        terms["budget"] = budget
        loss = loss + weights.budget * budget
    return {"loss": loss, **terms}
