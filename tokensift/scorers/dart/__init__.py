from tokensift.scorers.dart.model import DARTConfig, DARTMethod

__all__ = ["DARTConfig", "DARTMethod"]
