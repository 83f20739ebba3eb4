from tokensift.scorers.ia_red2.model import IARed2Config, IARed2Method

__all__ = ["IARed2Config", "IARed2Method"]
