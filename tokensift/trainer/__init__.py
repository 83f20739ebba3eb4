"""Lightning training of learned token scorers on frozen backbones."""

from tokensift.trainer.losses import LossWeights, scorer_objective
from tokensift.trainer.module import ScorerTrainer

__all__ = ["LossWeights", "ScorerTrainer", "scorer_objective"]
