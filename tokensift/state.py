"""The token state a method sees at a site: one home for everything a scorer or selector may read."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class TokenState:
    """Tokens of a batch at one site of a backbone.

    ``hidden`` is ``[B, N, D]``; every other per-token field is ``[B, N]``. In *gather* mode (inference)
    dropped tokens are gone and ``policy`` is ``None``; in *mask* mode (training) all tokens stay and
    ``policy`` holds each token's keep decision (1 kept, 0 dropped, differentiable for learned scorers).
    """

    hidden: Tensor
    protected: Tensor  # bool: special tokens ([CLS], registers) that are never pruned
    orig_index: Tensor  # long: index of the token in the unpruned sequence (merged tokens: their anchor)
    size: Tensor  # float: how many original tokens each token stands for (ToMe merges grow it)
    grid: tuple[int, int]  # patch grid (rows, cols) of the unpruned image
    num_prefix: int  # number of special tokens before the patches in the unpruned sequence
    site: str
    layer: int  # index of the block whose output this site is
    policy: Tensor | None = None
    attention: Tensor | None = None  # [B, H, N, N] attention probabilities of the site's block, on request
    keys: Tensor | None = None  # [B, N, Dk] keys of the site's block averaged over heads, on request
    keep_target: Tensor | None = None  # [B] cumulative keep fraction this site aims for

    @property
    def alive(self) -> Tensor:
        """Tokens still in play: all of them in gather mode, those with a non-zero policy in mask mode."""
        if self.policy is None:
            return torch.ones_like(self.protected)
        return self.policy > 0

    @property
    def prunable(self) -> Tensor:
        return self.alive & ~self.protected

    def gather(self, index: Tensor) -> TokenState:
        """Keep the tokens at ``index`` ([B, K], ascending) in every per-token field."""
        d = self.hidden.shape[-1]
        fields = {
            "hidden": self.hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, d)),
            "protected": self.protected.gather(1, index),
            "orig_index": self.orig_index.gather(1, index),
            "size": self.size.gather(1, index),
            "attention": None,
            "keys": None,
        }
        if self.policy is not None:
            fields["policy"] = self.policy.gather(1, index)
        return replace(self, **fields)
