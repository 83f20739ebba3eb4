from tokensift.scorers.cacovid.model import CaCoVIDConfig, CaCoVIDMethod, PolicyInputs, Rollout

__all__ = ["CaCoVIDConfig", "CaCoVIDMethod", "PolicyInputs", "Rollout"]
