"""Default ``vit.<i>`` sites for methods that prune inside the vision tower, on a plain backbone or a multimodal LLM.

On a vision backbone the deepest site is ``vit.<L-2>`` (one block left to benefit); on a multimodal LLM it is the
block before the one whose output becomes the features (``MLLMFamily.last_vit_site``: LLaVA-1.5 reads CLIP's
hidden state ``-2``, so ``vit.21`` of 24 blocks).
"""

from __future__ import annotations


def deepest_vit_site(adapter) -> int:
    """Index of the deepest ``vit.<i>`` site of ``adapter`` (a ``VisionAdapter`` or an ``MLLMAdapter``)."""
    if getattr(adapter, "is_multimodal", False):
        deepest = adapter.family.last_vit_site(adapter.model)
        if deepest < 0:
            raise ValueError(
                f"{type(adapter.model).__name__}'s vision tower has no vit.<i> site before its feature layer; "
                "pass sites=[...] (ts.methods() lists each method's site kinds)."
            )
        return deepest
    return adapter.num_layers - 2


def spread_vit_sites(adapter, count: int) -> list[str]:
    """``count`` sites at equal depth fractions of the tower's sites (``VisionAdapter.spread_sites`` on any adapter)."""
    deepest = deepest_vit_site(adapter)
    layers = sorted({max(0, min(deepest, round((deepest + 2) * (s + 1) / (count + 1)) - 1)) for s in range(count)})
    return [f"vit.{i}" for i in layers]


def every_other_vit_site(adapter) -> list[str]:
    """Every second site, ending at the deepest: FlowCut's pruning layers (CLIP-L's 1, 3, …, 21 under LLaVA-1.5)."""
    return [f"vit.{i}" for i in range(deepest_vit_site(adapter) % 2, deepest_vit_site(adapter) + 1, 2)]
