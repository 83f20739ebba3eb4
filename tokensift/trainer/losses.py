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
    """Loss terms of one mask-mode step.

    - task: cross-entropy of the pruned model's logits;
    - budget: per sample, (kept fraction at site s − the site's target)², averaged over sites;
    - distill: KL(teacher ‖ student) on temperature-scaled logits (teacher = same frozen model, unpruned);
    - tokens: MSE between student and teacher final tokens, over the tokens the student kept.
    """
    task = F.cross_entropy(logits, labels)
    budget = torch.stack([((r.keep_fraction - r.target) ** 2).mean() for r in records]).mean()
    t = weights.temperature
    distill = F.kl_div(
        F.log_softmax(logits / t, dim=-1),
        F.log_softmax(teacher_logits / t, dim=-1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)
    # which tokens count is a hard, non-differentiable choice (as DynamicViT's boolean mask): a gradient
    # through it would teach the scorer to drop exactly the tokens pruning perturbs most
    kept = (records[-1].policy.detach() > 0.5).to(tokens.dtype).unsqueeze(-1)
    token_error = ((tokens - teacher_tokens) ** 2 * kept).sum() / (kept.sum() * tokens.shape[-1]).clamp_min(1.0)
    loss = weights.task * task + weights.budget * budget + weights.distill * distill + weights.tokens * token_error
    return {"loss": loss, "task": task, "budget": budget, "distill": distill, "tokens": token_error}
