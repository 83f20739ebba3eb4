from tokensift.scorers.visionzip.model import VisionZipConfig, VisionZipMethod

__all__ = ["VisionZipConfig", "VisionZipMethod"]
