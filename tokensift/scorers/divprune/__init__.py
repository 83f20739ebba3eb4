from tokensift.scorers.divprune.model import DivPruneConfig, DivPruneMethod, max_min_diverse

__all__ = ["DivPruneConfig", "DivPruneMethod", "max_min_diverse"]
