"""DAS (Wu et al., NeurIPS 2023, "Parameter and Computation Efficient Transfer Learning for Vision-Language
Pre-trained Models"; code DoubtedSteam/DAS): skip whole blocks, each replaced by a small adapter.

Every candidate block is an arm of a bandit with a score ``s_i``; ``sigmoid(s_i)`` is how likely a search step skips
it. Training (``tokensift.trainer.skip_module``) samples skip sets from those probabilities, rewards each sub-network
with ``exp(-loss)`` and moves the scores of the blocks it skipped by ``(r - b) · p (1 - p) · lr``
(``tokensift.trainer.rl.bandit_update``), while the adapters of the skipped blocks learn to stand in for them. At
inference ``skip_layers = n`` skips the ``n`` highest-scoring candidates (``skipped(n)``).

The replacing adapter is DAS's ``adapter_replace`` (down-projection → ReLU → up-projection, ``dim_replace`` wide,
with a residual), here with its own LayerNorm in front (DAS reuses the skipped block's ``input_layernorm``) and a
zero-initialised up-projection, so a fresh adapter is the identity: an untrained skip simply drops the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from tokensift.scorers.base import LayerSkipMethod, MethodConfig, cache_anchor_layers
from tokensift.scorers.learned import check_float, check_int
from tokensift.scorers.registry import register


@dataclass
class DASConfig(MethodConfig):
    """``hidden_size``, ``num_layers``, ``candidate_layers`` and ``dim_replace`` are filled from the backbone by
    ``DASMethod.for_backbone``. The search and fine-tuning fields are read by the trainer."""

    hidden_size: int | None = field(
        default=None, metadata={"help": "Width of the skipped blocks' hidden states; filled from the backbone."}
    )
    num_layers: int | None = field(
        default=None, metadata={"help": "Blocks of the backbone (ViT blocks / decoder layers); filled from it."}
    )
    skip_layers: int = field(
        default=1,
        metadata={"help": "k: the number of layers trained to be skipped (DAS: 4 of 32 for LLaVA-1.5-7B)."},
    )
    candidate_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Layers that may be skipped (default: all but the first and the last)."},
    )
    dim_replace: int | None = field(
        default=None,
        metadata={"help": "Bottleneck width of each replacing adapter (DAS: 256; default min(256, hidden / 2))."},
    )
    bandit_lr: float = field(default=0.1, metadata={"help": "Step size of the bandit's score update (DAS: 0.1)."})
    num_subnetworks: int = field(
        default=5,
        metadata={"help": "Distinct skip sets rewarded per search (DAS nas_step: 5; capped at how many exist)."},
    )
    search_interval: int = field(
        default=3, metadata={"help": "Steps between two bandit searches after warm-up (DAS: every 3rd step)."}
    )
    warmup_steps: int = field(
        default=100,
        metadata={
            "help": "Steps over which the sampled skip count ramps up to skip_layers before the first search "
            "(DAS: 1140 for LLaVA)."
        },
    )
    search_steps: int = field(
        default=300,
        metadata={
            "help": "Length of the search phase (warm-up included); afterwards the scores are fixed and the "
            "adapters of the top-scoring layers are fine-tuned."
        },
    )
    finetune_skip_spread: int = field(
        default=1,
        metadata={
            "help": "Fine-tuning skips n layers, n drawn uniformly from [k - spread, k + spread] (within "
            "[1, candidates]), so the artifact serves skip_layers = n near k with trained adapters."
        },
    )

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "dim_replace"):
            check_int(self, name, optional=True)
        check_int(self, "skip_layers")
        check_int(self, "num_subnetworks")
        check_int(self, "search_interval")
        check_int(self, "warmup_steps", minimum=0)
        check_int(self, "search_steps", minimum=0)
        check_int(self, "finetune_skip_spread", minimum=0)
        check_float(self, "bandit_lr")
        if self.search_steps < self.warmup_steps:
            raise ValueError(
                f"DASConfig.search_steps ({self.search_steps}) must be >= warmup_steps ({self.warmup_steps}): the "
                "search phase includes the warm-up."
            )
        if self.candidate_layers is not None:
            layers = self.candidate_layers
            if not isinstance(layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):
                raise ValueError(f"DASConfig.candidate_layers must be a list of layer indices, got {layers!r}.")
            self.candidate_layers = list(layers)
            if sorted(set(layers)) != list(layers) or not layers:
                raise ValueError(
                    f"DASConfig.candidate_layers must be distinct layer indices in increasing order, got {layers}."
                )
            if self.num_layers is not None and not all(0 <= i < self.num_layers for i in layers):
                raise ValueError(
                    f"DASConfig.candidate_layers {layers} must lie in 0 .. {self.num_layers - 1} (the backbone has "
                    f"{self.num_layers} layers)."
                )
            if self.skip_layers > len(layers):
                raise ValueError(
                    f"DASConfig.skip_layers is {self.skip_layers} but only {len(layers)} candidate_layers may be "
                    f"skipped ({layers}); lower skip_layers or add candidates."
                )


class ReplacingAdapter(nn.Module):
    """``x + up(ReLU(down(LayerNorm(x))))``, ``up`` zero-initialised: the identity until trained."""

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.down = nn.Linear(hidden_size, width)
        self.act = nn.ReLU()
        self.up = nn.Linear(width, hidden_size)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.up(self.act(self.down(self.norm(hidden))))

    def analytic_flops(self, tokens: int) -> float:
        """FLOPs on ``tokens`` hidden states: the two projections (2 per multiply-add); norm and ReLU left out, as
        ``tokensift.flops`` leaves them out of every block."""
        return float(tokens * 2 * 2 * self.down.in_features * self.down.out_features)


@register
class DASMethod(LayerSkipMethod):
    name = "das"
    kind = "learned"
    config_class = DASConfig
    description = "skip whole blocks chosen by a bandit, each replaced by a small trained adapter (DAS)"

    def __init__(self, config: DASConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if cfg.hidden_size is None or cfg.num_layers is None or cfg.candidate_layers is None or cfg.dim_replace is None:
            raise ValueError(
                "DASConfig needs hidden_size, num_layers, candidate_layers and dim_replace: build it with "
                "DASMethod.for_backbone(adapter), or load a trained one (ts.apply(model, 'path/to/artifact'))."
            )
        # the bandit's arms, one per candidate layer: saved with the adapters, never trained by gradient
        self.register_buffer("scores", torch.zeros(len(cfg.candidate_layers)))
        self.adapters = nn.ModuleList(ReplacingAdapter(cfg.hidden_size, cfg.dim_replace) for _ in cfg.candidate_layers)

    @classmethod
    def for_backbone(cls, adapter, config: DASConfig | None = None) -> DASMethod:
        # a copy: the caller's config may size a second backbone
        config = replace(config) if config is not None else DASConfig()
        if config.hidden_size is None:
            config.hidden_size = adapter.hidden_size
        if config.num_layers is None:
            config.num_layers = adapter.num_layers
        if config.candidate_layers is None:
            # a decoder's cache-anchor layers cannot be skipped (tokensift.skip): leave them out of the default
            anchors = cache_anchor_layers(adapter.text_config) if getattr(adapter, "is_multimodal", False) else set()
            config.candidate_layers = [i for i in range(1, adapter.num_layers - 1) if i not in anchors]
        if config.dim_replace is None:
            config.dim_replace = max(1, min(256, adapter.hidden_size // 2))
        config.__post_init__()  # candidate layers and skip_layers against the model's depth
        return cls(config)

    # -- LayerSkipMethod ------------------------------------------------------------------------
    @property
    def candidate_layers(self) -> list[int]:
        return list(self.config.candidate_layers)

    def probabilities(self) -> Tensor:
        """``[C]`` each candidate's skip probability, ``sigmoid(score)`` (DAS ``get_prob``)."""
        return torch.sigmoid(self.scores.float())

    def skip_order(self) -> list[int]:
        """Candidate layers by score, highest first (ties: the earlier layer first)."""
        order = sorted(range(len(self.candidate_layers)), key=lambda arm: (-float(self.scores[arm]), arm))
        return [self.candidate_layers[arm] for arm in order]

    def replacement(self, layer: int) -> nn.Module:
        return self.adapters[self.candidate_layers.index(layer)]

    def replacement_flops(self, layer: int, tokens: int) -> float:
        return self.replacement(layer).analytic_flops(tokens)

    def check_backbone(self, adapter) -> None:
        cfg = self.config
        for field_name, value in (("num_layers", adapter.num_layers), ("hidden_size", adapter.hidden_size)):
            if getattr(cfg, field_name) != value:
                raise ValueError(
                    f"das was built for a backbone with {field_name}={getattr(cfg, field_name)}; this one has "
                    f"{value}. Apply it to the backbone it was trained on."
                )
