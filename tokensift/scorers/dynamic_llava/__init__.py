from tokensift.scorers.dynamic_llava.model import DynamicLLaVAConfig, DynamicLLaVAMethod, TextPredictor, VisionPredictor

__all__ = ["DynamicLLaVAConfig", "DynamicLLaVAMethod", "TextPredictor", "VisionPredictor"]
