from tokensift.scorers.dynamic_llava.model import DynamicLLaVAConfig, DynamicLLaVAMethod, VisionPredictor

__all__ = ["DynamicLLaVAConfig", "DynamicLLaVAMethod", "VisionPredictor"]
