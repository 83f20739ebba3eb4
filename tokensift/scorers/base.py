"""The interface every token method implements, learned or training-free.

A method scores tokens (``score``), picks the survivors (``select``) and reduces the state (``reduce``:
gather, or merge for ToMe). In mask mode (training) it returns a keep ``policy`` instead of shrinking the
sequence. The defaults make a new scoring method one ``score`` function.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from tokensift.state import TokenState

Kind = Literal["learned", "training-free"]


@dataclass
class MethodConfig:
    """Options common to every method; a method's own config dataclass subclasses this one.

    ``sites``: where the method reduces tokens (``vit.<i>``); ``None`` picks the method's default.
    """

    sites: list[str] | None = None

    @classmethod
    def from_dict(cls, values: dict | None) -> MethodConfig:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no option {unknown}; its options are {sorted(known)}.")
        return cls(**values)


class TokenMethod(nn.Module):
    """Base class of every method. Subclasses set the class attributes and implement ``score``."""

    name: ClassVar[str]
    kind: ClassVar[Kind] = "training-free"
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    needs_attention: ClassVar[bool] = False  # attention probabilities of the site's block
    needs_keys: ClassVar[bool] = False  # head-averaged keys of the site's block
    merges: ClassVar[bool] = False  # reduces by merging (no mask-mode equivalent)
    num_default_sites: ClassVar[int] = 1
    description: ClassVar[str] = ""

    def __init__(self, config: MethodConfig | None = None):
        super().__init__()
        self.config = config if config is not None else self.config_class()

    def default_sites(self, adapter) -> list[str]:
        return adapter.spread_sites(self.num_default_sites)

    def score(self, state: TokenState) -> Tensor:
        """``[B, N]`` keep scores, higher = keep. Protected and dropped tokens are handled by ``select``."""
        raise NotImplementedError(f"{type(self).__name__} must implement score() or override select().")

    def select(self, state: TokenState, num_keep: int) -> Tensor:
        """``[B, num_keep + protected]`` indices of the survivors, ascending (original order kept)."""
        scores = self.score(state).float()
        return top_k_with_protected(scores, state, num_keep)

    def reduce(self, state: TokenState, num_keep: int) -> TokenState:
        return state.gather(self.select(state, num_keep))

    def keep_policy(self, state: TokenState, num_keep: int) -> Tensor:
        """Mask-mode decision ``[B, N]``: 1 for survivors, 0 otherwise (learned methods: differentiable)."""
        if self.merges:
            raise ValueError(f"{self.name} merges tokens, which has no mask-mode form; run it in gather mode.")
        index = self.select(state, num_keep)
        policy = torch.zeros_like(state.hidden[..., 0])
        policy.scatter_(1, index, 1.0)
        return policy if state.policy is None else policy * state.policy


def top_k_with_protected(scores: Tensor, state: TokenState, num_keep: int) -> Tensor:
    """Top ``num_keep`` prunable tokens by score plus every protected one, in ascending index order."""
    protected = state.protected & state.alive
    num_protected = int(protected[0].sum())
    if not bool((protected.sum(1) == num_protected).all()):
        raise ValueError("every sample must carry the same number of protected tokens")
    ranked = scores.masked_fill(~state.alive, float("-inf")).masked_fill(protected, float("inf"))
    index = ranked.topk(num_keep + num_protected, dim=1).indices
    return index.sort(dim=1).values


def num_prunable_alive(state: TokenState) -> int:
    """Prunable tokens still in play (the same for every sample of a batch at inference)."""
    return int(state.prunable.sum(1).max())
