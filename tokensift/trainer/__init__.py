"""Lightning training of learned token scorers on frozen backbones."""

from tokensift.trainer.base import FrozenBackboneTrainer
from tokensift.trainer.exit_module import ExitRouterTrainer, exit_labels
from tokensift.trainer.grpo_module import GRPOTrainer
from tokensift.trainer.losses import LossWeights, scorer_objective
from tokensift.trainer.mllm_module import MLLMScorerTrainer
from tokensift.trainer.module import ScorerTrainer
from tokensift.trainer.reinforce_module import ReinforceTrainer
from tokensift.trainer.reliability import LastCheckpoint, NonFiniteLossError
from tokensift.trainer.skip_module import LayerSkipTrainer, MLLMLayerSkipTrainer
from tokensift.trainer.strategies import DeepSpeedStrategy  # registers the deepspeed* names for CPU too

__all__ = [
    "DeepSpeedStrategy",
    "ExitRouterTrainer",
    "FrozenBackboneTrainer",
    "GRPOTrainer",
    "LastCheckpoint",
    "LayerSkipTrainer",
    "LossWeights",
    "MLLMLayerSkipTrainer",
    "MLLMScorerTrainer",
    "NonFiniteLossError",
    "ReinforceTrainer",
    "ScorerTrainer",
    "exit_labels",
    "scorer_objective",
]
