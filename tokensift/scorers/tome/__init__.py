from tokensift.scorers.tome.model import ToMeConfig, ToMeMethod, bipartite_merge

__all__ = ["ToMeConfig", "ToMeMethod", "bipartite_merge"]
