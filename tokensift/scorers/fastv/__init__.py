from tokensift.scorers.fastv.model import FastVConfig, FastVMethod

__all__ = ["FastVConfig", "FastVMethod"]
