from tokensift.scorers.pyramiddrop.model import PyramidDropConfig, PyramidDropMethod

__all__ = ["PyramidDropConfig", "PyramidDropMethod"]
