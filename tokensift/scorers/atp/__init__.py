from tokensift.scorers.atp.model import ATPConfig, ATPMethod, ATPStage

__all__ = ["ATPConfig", "ATPMethod", "ATPStage"]
