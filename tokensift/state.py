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
    protected: Tensor  # bool: tokens never pruned: [CLS] / registers; text and special tokens at MLLM sites
    orig_index: Tensor  # long: index of the token in the unpruned sequence (merged tokens: their anchor)
    size: Tensor  # float: how many original tokens each token stands for (ToMe merges grow it)
    grid: tuple[int, int]  # patch grid (rows, cols) of the unpruned image
    num_prefix: int  # number of special tokens before the patches in the unpruned sequence
    site: str
    layer: int  # index of the block whose output this site is (MLLM: the LLM layer the site feeds, -1 pre_llm)
    policy: Tensor | None = None
    attention: Tensor | None = None  # [B, H, N, N] attention probabilities of the site's block (llm.<k>: of layer k-1)
    # [B, N, Dk] keys of the site's block averaged over heads; llm.<k>: layer k-1's key projection (all heads, no RoPE)
    keys: Tensor | None = None
    keep_target: Tensor | None = None  # [B] cumulative keep fraction this site aims for
    # -- multimodal LLM sites (pre_llm, llm.<k>); None on a vision tower ---------------------------------
    valid: Tensor | None = None  # bool: False for padding slots (samples of a batch keep different counts)
    kind: Tensor | None = None  # long: 0 text / special, 1 image, 2 video
    image_id: Tensor | None = None  # long: which image or video of the batch a visual token is from, -1 text
    coords: Tensor | None = None  # [B, N, 3] long: (t, h, w) of a visual token in its image's token grid
    tower_attention: Tensor | None = None  # [B, N] importance from the vision tower ([CLS] attention), on request
    tower_keys: Tensor | None = None  # [B, N, Dk] vision-tower keys of each visual token, on request
    text_mean: Tensor | None = None  # [B, D] mean hidden state of the text tokens at this site
    text_last: Tensor | None = None  # [B, D] hidden state of the last text token (the one that predicts next)

    @property
    def alive(self) -> Tensor:
        """Tokens still in play: all real ones in gather mode, those with a non-zero policy in mask mode."""
        alive = torch.ones_like(self.protected) if self.valid is None else self.valid
        if self.policy is None:
            return alive
        return alive & (self.policy > 0)

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
        for name in ("valid", "kind", "image_id", "tower_attention"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name).gather(1, index)
        for name in ("coords", "tower_keys"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value.gather(1, index.unsqueeze(-1).expand(-1, -1, value.shape[-1]))
        return replace(self, **fields)
