from tokensift.scorers.stts.model import STTSConfig, STTSMethod, TemporalTokenScorer

__all__ = ["STTSConfig", "STTSMethod", "TemporalTokenScorer"]
