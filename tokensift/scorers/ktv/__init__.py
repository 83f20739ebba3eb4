from tokensift.scorers.ktv.model import KTVConfig, KTVMethod

__all__ = ["KTVConfig", "KTVMethod"]
