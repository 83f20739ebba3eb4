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
transformers reads the past length (positions, masks) from cache layer 0, and the mask sizes from the first cache
layer of each attention type (a sliding-window model's first sliding layer): those are refused too
(:func:`cache_anchor_layers`). Change the skipped set between ``generate()`` calls, not inside one (a layer
skipped at prefill has no cache to attend to when decoding).

A :class:`SkippedLayer` is not the block's class, so transformers' ``output_hidden_states`` / ``output_attentions``
(recorded by hooks on the block class) record nothing for a skipped block: with ``n`` blocks skipped the tuple has
``n`` entries fewer and the indices after a skipped block shift. Read per-layer hidden states only with
``enabled = False`` (or after ``remove()``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from tokensift import attention as attn
from tokensift.reduce_mllm import HANDLE_ATTRIBUTE
from tokensift.scorers.base import SITE_KIND, LayerSkipMethod, cache_anchor_layers, is_skip_method

# LayerSkipMethod, SITE_KIND, is_skip_method live with the other methods (scorers never import the reduction
# layer); they are re-exported here for the handle's users


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
        if not is_skip_method(method):
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
        if getattr(adapter, "is_multimodal", False):
            anchors = cache_anchor_layers(adapter.text_config)
            refused = [layer for layer in method.candidate_layers if layer in anchors]
            if refused:
                raise ValueError(
                    f"{method.name}: candidate_layers includes decoder layer(s) {refused}, which cannot be skipped: "
                    f"transformers reads the KV cache's past length and mask sizes from the first layer of each "
                    f"attention type (layers {sorted(anchors)} here), and a skipped layer caches nothing. Leave "
                    "them out of DASConfig.candidate_layers."
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


def skipped_site_labels(handle: LayerSkipHandle) -> list[str]:
    """A benchmark row's ``sites`` for a layer-skip handle: the skipped blocks, ``layer.<i>``."""
    return [f"layer.{layer}" for layer in handle.skipped_layers]


__all__ = [
    "SITE_KIND",
    "LayerSkipHandle",
    "LayerSkipMethod",
    "SkippedLayer",
    "cache_anchor_layers",
    "is_skip_method",
    "skipped_site_labels",
]
