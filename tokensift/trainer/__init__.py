"""Lightning training of learned token scorers on frozen backbones."""

from tokensift.trainer.exit_module import ExitRouterTrainer, exit_labels
from tokensift.trainer.losses import LossWeights, scorer_objective
from tokensift.trainer.module import ScorerTrainer
from tokensift.trainer.strategies import DeepSpeedStrategy  # registers the deepspeed* names for CPU too

__all__ = ["DeepSpeedStrategy", "ExitRouterTrainer", "LossWeights", "ScorerTrainer", "exit_labels", "scorer_objective"]
