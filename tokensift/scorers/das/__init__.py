from tokensift.scorers.das.model import DASConfig, DASMethod, ReplacingAdapter

__all__ = ["DASConfig", "DASMethod", "ReplacingAdapter"]
