from tokensift.scorers.l2norm.model import L2NormConfig, L2NormMethod

__all__ = ["L2NormConfig", "L2NormMethod"]
