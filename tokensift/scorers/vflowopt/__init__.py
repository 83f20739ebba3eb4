from tokensift.scorers.vflowopt.calibrate import calibrate, flow_similarity, schedule
from tokensift.scorers.vflowopt.model import (
    VFlowOptConfig,
    VFlowOptMethod,
    entropy_prior,
    global_token_attention,
    patch_entropy,
)

__all__ = [
    "VFlowOptConfig",
    "VFlowOptMethod",
    "calibrate",
    "entropy_prior",
    "flow_similarity",
    "global_token_attention",
    "patch_entropy",
    "schedule",
]
