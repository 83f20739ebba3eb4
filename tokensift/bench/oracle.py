"""The benchmark's oracle: keep the target's patches first, then random others.

Not registered with ``ts.methods()``: it needs each batch's ground-truth ``oracle_mask`` ([B, P] bool,
row-major over the patch grid), which the benchmark sets on the instance (``oracle_mask``) before every
forward pass. It is the upper bound a token scorer can reach on a task whose relevant tokens are known.

The "random others" are a per-sample draw (``TokenState.uniform``): a function of (seed, sample index, token),
so every sample of the test set gets its own and the same at any batch size.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.state import SampleCounter, TokenState, with_sample_index


class OracleMethod(TokenMethod):
    """Oracle patches ranked first (all of them survive whenever the budget allows), then random, seeded."""

    name: ClassVar[str] = "oracle"
    kind: ClassVar[str] = "training-free"
    description: ClassVar[str] = "keep the ground-truth target patches first, then random others (benchmark only)"

    def __init__(self, config: MethodConfig | None = None, seed: int = 0):
        super().__init__(config)
        self.seed = seed
        self.oracle_mask: Tensor | None = None
        self._samples = SampleCounter()  # rows without a sample index: numbered in arrival order

    def score(self, state: TokenState) -> Tensor:
        if self.oracle_mask is None:
            raise RuntimeError("OracleMethod.oracle_mask is not set; assign the batch's [B, P] oracle mask first.")
        mask = self.oracle_mask.to(state.hidden.device).bool()
        if mask.shape[0] != state.hidden.shape[0]:
            raise ValueError(f"oracle_mask has {mask.shape[0]} rows; the batch has {state.hidden.shape[0]} images.")
        patch = state.orig_index - state.num_prefix
        on_target = mask.gather(1, patch.clamp(min=0, max=mask.shape[1] - 1)) & (patch >= 0)
        noise = with_sample_index(state, self._samples).uniform(self.seed, stream=self.name)  # per sample
        return on_target.float() * 2.0 + noise  # noise < 1: every target patch outranks every other one


class MLLMOracleMethod(TokenMethod):
    """The oracle before a multimodal LLM (``pre_llm``): each sample's visual tokens are the patches of its
    image in raster order, and the question's oracle patches ([B, P] ``oracle_mask``, set by the benchmark
    before every forward pass) rank first, then random others, seeded."""

    name: ClassVar[str] = "oracle"
    kind: ClassVar[str] = "training-free"
    description: ClassVar[str] = "keep the question's oracle patches first, then random others (benchmark only)"
    site_kinds: ClassVar[tuple[str, ...]] = ("pre_llm",)

    def __init__(self, config: MethodConfig | None = None, seed: int = 0):
        super().__init__(config)
        self.seed = seed
        self.oracle_mask: Tensor | None = None
        self._samples = SampleCounter()  # rows without a sample index: numbered in arrival order

    def score(self, state: TokenState) -> Tensor:
        if self.oracle_mask is None:
            raise RuntimeError("MLLMOracleMethod.oracle_mask is not set; assign the batch's [B, P] oracle mask first.")
        mask = self.oracle_mask.to(state.hidden.device).bool()
        visual = state.valid & (state.kind != 0)  # kind 0: text and special tokens
        counts = visual.sum(1)
        if mask.shape[0] != visual.shape[0] or mask.shape[1] != int(counts.max()):  # shorter videos: False-padded
            raise ValueError(
                f"oracle_mask is {tuple(mask.shape)} but the samples hold {counts.tolist()} visual tokens; the oracle "
                "needs one image or video per sample with one LLM token per oracle patch (padded to the longest)."
            )
        patch = (visual.long().cumsum(1) - 1).clamp(min=0, max=mask.shape[1] - 1)
        on_target = mask.gather(1, patch) & visual
        noise = with_sample_index(state, self._samples).uniform(self.seed, stream=self.name)  # per sample
        return on_target.float() * 2.0 + noise  # noise < 1: every oracle patch outranks every other one
