"""Layer skipping: whole blocks replaced by small trainable adapters, next to token reduction.

Token methods keep every block and shrink the sequence; a layer-skip method keeps the sequence and removes blocks.
A :class:`LayerSkipMethod` (``das``) owns one small adapter per block it may skip and an order of the blocks by how
safely they can go; :class:`LayerSkipHandle` swaps each skipped block in ``adapter.layers`` (a vision tower's blocks
or a multimodal LLM's decoder layers) for a :class:`SkippedLayer`, which runs the adapter on the hidden states
*instead of* the block. ``remove()`` puts the very same block objects back, so the model is bit-for-bit what it was.

Every block family tokensift adapts (ViT / CLIP / SigLIP layers, Llama / Qwen2 / Qwen2-VL / Molmo2 decoder layers)
returns a bare hidden-states tensor in transformers 5.x, so a skipped block returns one too. A skipped decoder layer
computes no keys and values, so it writes nothing to a KV cache: its cache layer stays empty through prefill and
every decoding step, while the layers it does not skip cache as usual. Layer 0 of a decoder is never skipped:
transformers reads the past length (positions, masks) from cache layer 0. Change the skipped set between
``generate()`` calls, not inside one (a layer skipped at prefill has no cache to attend to when decoding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from torch import Tensor, nn

from tokensift import attention as attn
from tokensift.reduce_mllm import HANDLE_ATTRIBUTE
from tokensift.scorers.base import Method

SITE_KIND = "layers"  # what ts.methods() lists as a layer-skip method's sites


class LayerSkipMethod(Method):
    """Base of methods that skip whole blocks: which blocks to skip for a count, and what replaces each one.

    Subclasses implement ``candidate_layers`` (the blocks that may be skipped), ``skip_order`` (those blocks,
    the first to skip first) and ``replacement(layer)`` (the module that runs instead of block ``layer``).
    """

    skips_layers: ClassVar[bool] = True
    site_kinds: ClassVar[tuple[str, ...]] = (SITE_KIND,)
    # the adapters of the blocks a step does not skip get no gradient: DDP has to look for them
    has_unused_parameters: ClassVar[bool] = True

    @property
    def candidate_layers(self) -> list[int]:
        raise NotImplementedError(f"{type(self).__name__} must implement candidate_layers")

    def skip_order(self) -> list[int]:
        """The candidate layers, the one to skip first first."""
        raise NotImplementedError(f"{type(self).__name__} must implement skip_order()")

    def replacement(self, layer: int) -> nn.Module:
        """The module run in place of block ``layer`` (hidden states in, hidden states out)."""
        raise NotImplementedError(f"{type(self).__name__} must implement replacement(layer)")

    def replacement_flops(self, layer: int, tokens: int) -> float:
        """FLOPs of ``replacement(layer)`` on ``tokens`` hidden states (``tokensift.flops`` charges it in place of the
        block)."""
        raise NotImplementedError(f"{type(self).__name__} must implement replacement_flops(layer, tokens)")

    def check_skip_count(self, skip_layers: int, field: str = "skip_layers") -> int:
        """``skip_layers`` as an int in ``[0, len(candidate_layers)]``, or a ValueError naming ``field``."""
        limit = len(self.candidate_layers)
        if isinstance(skip_layers, bool) or not isinstance(skip_layers, int) or not 0 <= skip_layers <= limit:
            raise ValueError(
                f"{field} must be a whole number of layers in [0, {limit}] ({self.name} may skip layers "
                f"{self.candidate_layers}), got {skip_layers!r}."
            )
        return skip_layers

    def skipped(self, skip_layers: int) -> list[int]:
        """The ``skip_layers`` layers skipped first (``skip_order``'s head), in layer order."""
        count = self.check_skip_count(skip_layers)
        return sorted(self.skip_order()[:count])

    def check_backbone(self, adapter) -> None:
        """Raise unless the method was built for a backbone of this shape (a ValueError naming the field)."""


class SkippedLayer(nn.Module):
    """Runs ``replacement`` on the hidden states in place of a block, and returns what the block returns (a tensor).

    The replacement is held without registering it: the backbone's parameters, state dict and freezing stay as
    they were, and the method that owns the adapter (trained, moved, saved with it) stays its only owner.
    """

    def __init__(self, replacement: nn.Module, layer: int):
        super().__init__()
        object.__setattr__(self, "replacement", replacement)
        self.layer = layer

    def forward(self, *args, **kwargs) -> Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        parameter = next(self.replacement.parameters(), None)
        if parameter is None:
            return self.replacement(hidden)
        # the adapter computes in its own dtype (float32 next to a bf16 model), as DAS's `.type_as(residual)`
        return self.replacement(hidden.to(parameter.dtype)).to(hidden.dtype)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, replacement={type(self.replacement).__name__}"


class LayerSkipHandle:
    """A layer-skip method applied to a model: ``skip_layers`` of its blocks run the method's adapters instead.

    ``adapter`` is a ``VisionAdapter`` (vision-tower blocks) or an ``MLLMAdapter`` (the LLM's decoder layers).
    ``set_skip(n)`` skips the method's first ``n`` layers (``method.skipped(n)``); ``set_layers(layers)`` an explicit
    set (training). ``remove()`` (or leaving the ``with`` block) restores the original block objects.
    """

    def __init__(self, adapter, method: LayerSkipMethod, skip_layers: int = 0):
        if not getattr(method, "skips_layers", False):
            raise TypeError(
                f"LayerSkipHandle takes a layer-skip method (das); {type(method).__name__} reduces tokens: apply it "
                "with ts.apply(model, method, keep_ratio=...)."
            )
        model = adapter.model
        if getattr(model, HANDLE_ATTRIBUTE, None) is not None:
            raise ValueError("this model already has a tokensift method applied; remove() its handle first.")
        implementation = getattr(adapter.config, "_attn_implementation", None)  # a ViT token handle wraps it
        if implementation is not None and attn.base_name(implementation) != implementation:
            raise ValueError("this model already has a tokensift method applied; remove() its handle first.")
        method.check_backbone(adapter)
        self.adapter = adapter
        self.method = method
        self.model = model
        if getattr(adapter, "is_multimodal", False) and 0 in method.candidate_layers:
            raise ValueError(
                f"{method.name}: candidate_layers includes decoder layer 0, which cannot be skipped (the KV cache's "
                "past length is read from its layer 0); give layers 1 .. num_layers-1."
            )
        self._originals: list[nn.Module] = list(adapter.layers)
        self._replacements = {
            layer: SkippedLayer(method.replacement(layer), layer) for layer in method.candidate_layers
        }
        self._skipped: list[int] = []
        self._enabled = True
        self._on_remove: list[Callable[[], object]] = []
        setattr(model, HANDLE_ATTRIBUTE, self)
        try:
            self.set_skip(skip_layers)
        except Exception:
            self.remove()
            raise

    # -- public ---------------------------------------------------------------------------------
    @property
    def skip_layers(self) -> int:
        """How many layers are skipped (while ``enabled``)."""
        return len(self._skipped)

    @property
    def skipped_layers(self) -> list[int]:
        """The layers skipped (while ``enabled``), in layer order."""
        return list(self._skipped)

    @property
    def enabled(self) -> bool:
        """Off: every block runs (the unchanged model, e.g. a benchmark's back-to-back unpruned pass); the skipped set
        is kept and returns when it is switched on again."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        self._place()

    def set_skip(self, skip_layers: int) -> None:
        """Skip the method's first ``skip_layers`` layers (0: the unchanged model)."""
        self.set_layers(self.method.skipped(skip_layers))

    def set_layers(self, layers: Sequence[int]) -> None:
        """Skip exactly ``layers`` (each a candidate layer of the method), run every other block."""
        chosen = sorted(int(layer) for layer in layers)
        unknown = [layer for layer in chosen if layer not in self._replacements]
        if unknown or len(set(chosen)) != len(chosen):
            raise ValueError(
                f"layers {list(layers)} must be distinct candidate layers of {self.method.name}: "
                f"{self.method.candidate_layers}."
            )
        self._skipped = chosen
        self._place()

    def _place(self) -> None:
        """Put each skipped block's ``SkippedLayer`` (while enabled) or the original block into ``adapter.layers``."""
        skipped = set(self._skipped) if self._enabled else set()
        for index, original in enumerate(self._originals):
            wanted = self._replacements[index] if index in skipped else original
            if self.adapter.layers[index] is not wanted:
                self.adapter.layers[index] = wanted

    def remove(self) -> None:
        for index, original in enumerate(self._originals):
            if self.adapter.layers[index] is not original:
                self.adapter.layers[index] = original
        self._skipped = []
        if getattr(self.model, HANDLE_ATTRIBUTE, None) is self:
            delattr(self.model, HANDLE_ATTRIBUTE)
        while self._on_remove:
            self._on_remove.pop()()

    def on_remove(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` when ``remove()`` runs."""
        self._on_remove.append(callback)

    def original_layer(self, index: int) -> nn.Module:
        """Block ``index`` as the model had it (the FLOPs model reads its linears while it is swapped out)."""
        return self._originals[index]

    def __enter__(self) -> LayerSkipHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def is_skip_method(method: object) -> bool:
    """True for a layer-skip method (class or instance): its budget is ``skip_layers``, not a keep ratio."""
    return bool(getattr(method, "skips_layers", False))


__all__ = ["SITE_KIND", "LayerSkipHandle", "LayerSkipMethod", "SkippedLayer", "is_skip_method"]
