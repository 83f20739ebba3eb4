"""The token state a method sees at a site: one home for everything a scorer or selector may read."""

from __future__ import annotations

import zlib
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
    # [B, N, Dk] keys of the site's block averaged over heads; llm.<k>: layer k-1's keys (all kv heads, with RoPE)
    keys: Tensor | None = None
    # [B, Hkv, N, Dh] vit.<i>, on request (``needs_values``): the site block's values, per key/value head, as the
    # attention call received them (FlowCut's value norms and per-head value similarity)
    values: Tensor | None = None
    # [B, N, C, p·p] vit.<i>, on request (``needs_pixels``): each token's pixel patch of the tower's input (rows of
    # the patch in order, in the hidden states' dtype); 0 for [CLS] / registers (VFlowOpt's patch entropy)
    patch_pixels: Tensor | None = None
    keep_target: Tensor | None = None  # [B] cumulative keep fraction this site aims for
    # -- multimodal LLM sites (pre_llm, llm.<k>); None on a vision tower ---------------------------------
    valid: Tensor | None = None  # bool: False for padding slots (samples of a batch keep different counts)
    kind: Tensor | None = None  # long: 0 text / special, 1 image, 2 video
    image_id: Tensor | None = None  # long: which image or video of the batch a visual token is from, -1 text
    coords: Tensor | None = None  # [B, N, 3] long: (t, h, w) of a visual token in its image's token grid
    # [B, N, P, D] vit.<i> on a packed tower, on request (``needs_group_patches``): the patches of each group (Qwen2-VL:
    # its m×m merge group; Molmo2: its pooling window, in the pooling index order), zero at padded slots (STTS's
    # attention pooling and temporal cosine read them); ``group_patch_valid`` [B, N, P] bool: which slots are patches
    group_patches: Tensor | None = None
    group_patch_valid: Tensor | None = None
    tower_attention: Tensor | None = None  # [B, N] importance from the vision tower ([CLS] attention), on request
    tower_keys: Tensor | None = None  # [B, N, Dk] vision-tower keys of each visual token, on request
    text_mean: Tensor | None = None  # [B, D] mean hidden state of the text tokens at this site
    text_last: Tensor | None = None  # [B, D] hidden state of the last text token (the one that predicts next)
    # [B, H, N] llm.<k>, on request: the last text token's attention over the slots computed by layer k itself
    # (its input norm, q / k projections and RoPE on the site's input, causal and padding masks): PyramidDrop
    query_attention: Tensor | None = None
    # [B, N, D] llm.<k>, on request: ``hidden`` through the LM's final norm (DART's similarity space)
    normed_hidden: Tensor | None = None
    # -- who the rows are, for per-sample randomness (``uniform``) --------------------------------------
    sample_index: Tensor | None = None  # [B] long: each row's dataset index (or its arrival number); see uniform()
    draw: tuple[int, ...] = ()  # which draw of these samples: a trainer's (seed, step); () at inference
    # [B, N] long: each token's identity within its own sample, the same in any batch (None: ``orig_index``);
    # multimodal sites: its position in the sample's own unpruned sequence, padding not counted
    token_key: Tensor | None = None

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
            "values": None,
            "query_attention": None,
            "normed_hidden": None,
        }
        if self.policy is not None:
            fields["policy"] = self.policy.gather(1, index)
        for name in ("valid", "kind", "image_id", "tower_attention", "token_key"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name).gather(1, index)
        for name in ("coords", "tower_keys", "patch_pixels", "group_patches", "group_patch_valid"):
            value = getattr(self, name)
            if value is not None:
                by_token = index.view(*index.shape, *[1] * (value.dim() - 2)).expand(-1, -1, *value.shape[2:])
                fields[name] = value.gather(1, by_token)
        return replace(self, **fields)

    def uniform(self, seed: int, stream: str = "") -> Tensor:
        """``[B, N]`` float32 noise in ``[0, 1)``, one value per token: a hash of (``seed``, ``stream``,
        ``draw``, ``site``, the row's ``sample_index``, the token's ``token_key``) and of nothing else.

        So a sample gets the same draw whatever batch it is in, whichever rank holds it and however the
        batch was split, and another sample (or another ``draw``, e.g. the next training step) gets an
        independent one. Integer arithmetic on the tokens' device, no generator state involved.
        """
        if self.sample_index is None:
            raise ValueError(
                "TokenState.sample_index is None: per-sample noise needs each row's sample index; handles fill it "
                "(handle.set_samples(index) or their running count), a method without one uses a SampleCounter."
            )
        rows = self.hidden.shape[0]
        if self.sample_index.shape != (rows,):
            raise ValueError(
                f"TokenState.sample_index has shape {tuple(self.sample_index.shape)}; expected ({rows},), "
                "one index per row of the batch."
            )
        key = self.orig_index if self.token_key is None else self.token_key
        prefix = _hash_ints(
            seed, zlib.crc32(stream.encode()), zlib.crc32(self.site.encode()), len(self.draw), *self.draw
        )
        return keyed_uniform(prefix, self.sample_index.to(key.device), key)


class SampleCounter:
    """Numbers rows in the order they arrive (0, 1, 2, … across calls) when a batch carries no sample index.

    A loader that reads a dataset in order (a test split, no shuffling) then gives each sample its dataset
    index whatever the batch size; calls never reuse a number, so row ``b`` of every batch is not the same
    draw. ``reset()`` starts again from 0.
    """

    def __init__(self) -> None:
        self.seen = 0

    def take(self, rows: int, device: torch.device | str | None = None) -> Tensor:
        index = torch.arange(self.seen, self.seen + rows, device=device)
        self.seen += rows
        return index

    def reset(self) -> None:
        self.seen = 0


def checked_samples(index, draw) -> tuple[Tensor | None, tuple[int, ...]]:
    """``handle.set_samples``' arguments as a ``[B]`` long tensor (or None) and a tuple, or a ValueError naming them."""
    if index is not None:
        index = torch.as_tensor(index)
        if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool or bool((index < 0).any()):
            raise ValueError(
                f"set_samples: index must be a 1-D tensor of non-negative integer sample indices (one per row, "
                f"e.g. batch['index']), got {index.dtype} {tuple(index.shape)}."
            )
        index = index.long()
    draw = (draw,) if isinstance(draw, int) and not isinstance(draw, bool) else tuple(draw)
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in draw):
        raise ValueError(f"set_samples: draw must be non-negative integers (e.g. (seed, step)), got {draw!r}.")
    return index, draw


def with_sample_index(state: TokenState, counter: SampleCounter) -> TokenState:
    """``state`` itself when it knows its samples, else with the next numbers of ``counter`` as their index."""
    if state.sample_index is not None:
        return state
    return replace(state, sample_index=counter.take(state.hidden.shape[0], state.hidden.device))


# -- counter-based noise --------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """``x * c mod 2**32`` for uint32 values held in int64 (tensors or ints) without overflowing 64 bits."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    """A 32-bit integer hash with good avalanche (C. Wellons' ``lowbias32``)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _combine(h, value):
    """Fold a non-negative 63-bit ``value`` (int or int64 tensor) into the 32-bit hash ``h``."""
    h = _mix32(h ^ _mix32((value & _MASK32) ^ 0x9E3779B9))
    return _mix32(h ^ _mix32(((value >> 32) & _MASK32) ^ 0x85EBCA6B))


def _hash_ints(*values: int) -> int:
    h = 0x2545F491
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"noise keys must be non-negative integers, got {value!r}")
        h = _combine(h, value)
    return h


def keyed_uniform(prefix: int, sample_index: Tensor, key: Tensor) -> Tensor:
    """``[B, N]`` float32 in ``[0, 1)``: a hash of (``prefix``, ``sample_index[b]``, ``key[b, n]``) per token.

    Keys below 0 (padding slots) are hashed like any other and their values are meaningless.
    """
    if bool((sample_index < 0).any()):
        raise ValueError(f"sample indices must be >= 0, got {sample_index.tolist()}")
    sample = sample_index.long().view(-1, 1)
    h = _combine(torch.full_like(sample, prefix), sample)
    h = _combine(h.expand_as(key), key.long() & 0x7FFFFFFFFFFFFFFF)
    return (h >> 8).to(torch.float32) / float(1 << 24)
