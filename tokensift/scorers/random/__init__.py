from tokensift.scorers.random.model import RandomConfig, RandomMethod

__all__ = ["RandomConfig", "RandomMethod"]
