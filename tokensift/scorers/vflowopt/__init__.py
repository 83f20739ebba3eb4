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
    "entropy_prior",
    "global_token_attention",
    "patch_entropy",
]
