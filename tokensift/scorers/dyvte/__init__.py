from tokensift.scorers.dyvte.model import DyVTEConfig, DyVTEMethod, ExitRouter, check_threshold

__all__ = ["DyVTEConfig", "DyVTEMethod", "ExitRouter", "check_threshold"]
