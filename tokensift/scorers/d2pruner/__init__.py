from tokensift.scorers.d2pruner.model import (
    D2PrunerConfig,
    D2PrunerMethod,
    debiased_importance,
    greedy_independent_sets,
)

__all__ = ["D2PrunerConfig", "D2PrunerMethod", "debiased_importance", "greedy_independent_sets"]
