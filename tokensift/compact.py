"""Compaction: a method's keep decision applied to a sequence, one function per layout.

A method decides which of a state's tokens stay (``tokensift.scorers.base.KeepDecision``: a ``[B, N]`` keep mask,
and the merged hidden states / sizes a merge wrote into kept tokens). What the sequence becomes depends on how the
backbone lays its tokens out, and that is all this module knows; the hook drivers (``tokensift.reduce`` for vision
towers, ``tokensift.reduce_mllm`` for multimodal LLMs, ``tokensift.reduce_packed`` for Qwen2-VL's packed tower)
call it and carry the result through their model.

- **equal counts** (a vision tower's ``[B, N, D]`` batch): every sample keeps the same number of tokens, and the
  kept ones are gathered in ascending order (``equal_count_index``, ``compact_state``).
- **padded** (a multimodal LLM's batch, samples of different lengths): each sample's kept slots, in ascending
  order, right-aligned with padding slots on the left (``padded_layout``), and the gathers over such a layout
  (``gather_tokens``, ``gather_last``, ``identity_index``).
- **packed** (one sequence of every image and frame, attention per frame through ``cu_seqlens``): the new chunk
  boundaries of the kept tokens (``packed_cu_seqlens``).
- **packed rows** (a frame-batched tower, Molmo2: ``[frames, patches]``): each frame's kept tokens one segment,
  segments first-fit-decreasing into fixed-length rows (``first_fit_decreasing``, ``pack_rows``), attention
  block-diagonal per segment; ``pack_tokens`` / ``unpack_tokens`` move values between the two layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tokensift.state import TokenState

if TYPE_CHECKING:
    from tokensift.scorers.base import KeepDecision


def check_decision(decision: KeepDecision, state: TokenState, method: str) -> None:
    """Raise a ValueError naming ``method`` and the site unless ``decision`` fits ``state``'s tokens."""
    keep, shape = decision.keep, tuple(state.hidden.shape[:2])
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != shape:
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep).__name__
        raise ValueError(f"{method} at site {state.site} returned a keep mask of {got}, expected bool {shape}")
    if decision.hidden is not None and decision.hidden.shape != state.hidden.shape:
        raise ValueError(
            f"{method} at site {state.site} returned hidden states of shape {tuple(decision.hidden.shape)}, "
            f"expected {tuple(state.hidden.shape)}"
        )
    if decision.size is not None and tuple(decision.size.shape) != shape:
        raise ValueError(
            f"{method} at site {state.site} returned sizes of shape {tuple(decision.size.shape)}, expected {shape}"
        )


# -- equal counts (vision towers) ---------------------------------------------------------------------------


def equal_count_index(keep: Tensor, who: str) -> Tensor:
    """``[B, K]`` ascending positions of the kept tokens of ``keep`` (``[B, N]`` bool), every sample keeping ``K``.

    A vision tower's batch shrinks to one length, so samples keeping different counts raise a ValueError
    naming ``who`` (the method and site).
    """
    counts = keep.sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(
            f"{who} kept {counts.tolist()} tokens per sample; a vision tower's batch shrinks to one length, so "
            "every sample must keep the same number of tokens there."
        )
    b, n = keep.shape
    width = int(counts[0]) if counts.numel() else 0
    return torch.arange(n, device=keep.device).expand(b, n)[keep].view(b, width)


def compact_state(state: TokenState, decision: KeepDecision, who: str) -> TokenState:
    """``state`` reduced to the kept tokens of ``decision`` (equal counts), their merged hidden states and sizes
    where the decision carries them: every per-token field gathered in ascending order."""
    source = state
    if decision.hidden is not None or decision.size is not None:
        source = replace(
            state,
            hidden=state.hidden if decision.hidden is None else decision.hidden,
            size=state.size if decision.size is None else decision.size,
        )
    return source.gather(equal_count_index(decision.keep, who))


# -- padded, right-aligned (multimodal LLMs) ----------------------------------------------------------------


def padded_layout(slot_orig: Tensor, slot_valid: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kept slots of a padded layout, each sample's in ascending order and right-aligned (padding on the left,
    so the last slot is every sample's last kept token).

    ``slot_orig`` ``[B, S]``: each slot's index in the unpruned input (-1 padding); ``slot_valid`` ``[B, S]`` bool;
    ``keep`` ``[B, S]`` bool, kept slots (valid ones only). Returns the new ``slot_orig`` and ``slot_valid``
    ``[B, S']`` and ``source`` ``[B, S']``, the old slot each new slot reads (padding slots read slot 0). When
    ``keep`` drops nothing, returns ``slot_orig`` and ``slot_valid`` themselves and an identity ``source``.
    """
    if bool((keep == slot_valid).all()):
        return slot_orig, slot_valid, identity_index(slot_orig)
    batch, slots = keep.shape
    positions = torch.arange(slots, device=keep.device).expand(batch, -1)
    kept_first = torch.where(keep, positions, positions + slots).argsort(dim=1)  # kept slots first, in order
    count = keep.sum(1)
    width = int(count.max())
    # right-align: the last slot of every sample is its last kept token, padding goes to the left
    offset = torch.arange(width, device=keep.device).unsqueeze(0) - (width - count).unsqueeze(1)
    valid = offset >= 0
    source = kept_first.gather(1, offset.clamp(min=0))
    return slot_orig.gather(1, source).masked_fill(~valid, -1), valid, source


def gather_tokens(values: Tensor, index: Tensor) -> Tensor:
    """``values[b, index[b, j]]`` for ``[B, N, D]`` values; padding slots (index -1) read token 0."""
    index = index.clamp(min=0)
    return values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


def identity_index(slot_orig: Tensor) -> Tensor:
    """The slot indices of the unpruned input's own layout (every slot, padding included, is its own token)."""
    return torch.arange(slot_orig.shape[1], device=slot_orig.device).expand_as(slot_orig)


def gather_last(values: Tensor, index: Tensor, batch: int) -> Tensor:
    """Gather position ids ``[..., B | 1, L]`` (1-D or M-RoPE) along their last axis."""
    index = index.clamp(min=0)
    values = values.expand(*values.shape[:-2], batch, values.shape[-1])
    return values.gather(-1, index.expand(*values.shape[:-2], *index.shape))


# -- packed (one sequence, attention chunks by cu_seqlens) --------------------------------------------------


def packed_cu_seqlens(frame_of_kept: Tensor, num_frames: int) -> Tensor:
    """``cu_seqlens`` (int32) of a packed sequence whose kept tokens, in order, belong to frames ``frame_of_kept``
    (``[N']`` long, non-decreasing); a frame left without tokens is no chunk."""
    lengths = torch.bincount(frame_of_kept, minlength=num_frames)
    boundaries = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    return boundaries.unique_consecutive().to(torch.int32)


def first_fit_decreasing(lengths: Tensor | list[int], capacity: int) -> tuple[Tensor, Tensor]:
    """Bin packing of segments into rows of ``capacity`` slots: longest first (ties: lower index first), each into
    the first row with room. Returns ``row`` and ``offset`` (``[n]`` long): where each segment starts; an empty
    segment gets row -1. A segment longer than ``capacity`` raises a ValueError (a frame is never split: its
    patches attend to each other, and a row is one attention call)."""
    lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
    if capacity < 1:
        raise ValueError(f"row length (capacity) must be at least 1, got {capacity}")
    if lengths.numel() and int(lengths.max()) > capacity:
        raise ValueError(
            f"a segment of {int(lengths.max())} tokens does not fit rows of {capacity} slots; set the row length to at "
            "least one frame's kept patches (the default is one frame's patches)."
        )
    row = torch.full_like(lengths, -1)
    offset = torch.zeros_like(lengths)
    used: list[int] = []  # slots filled in each row so far
    for item in sorted(range(lengths.numel()), key=lambda i: (-int(lengths[i]), i)):
        length = int(lengths[item])
        if length == 0:
            continue
        target = next((r for r, filled in enumerate(used) if filled + length <= capacity), len(used))
        if target == len(used):
            used.append(0)
        row[item], offset[item] = target, used[target]
        used[target] += length
    return row, offset


@dataclass
class PackedRows:
    """Where the kept tokens of a ``[frames, patches]`` layout sit in fixed-length rows (``pack_rows``).

    ``source`` ``[K]``: each kept token's flat index ``frame * patches + patch``, in ascending order; ``row`` and
    ``column`` ``[K]``: its slot. ``segment`` ``[rows, length]``: the frame of each slot (-1 padding), which is what
    attention separates; ``spans`` ``[S, 2]`` (start, end) of every segment in the rows read end to end (slot
    ``row * length + column``; a segment is contiguous there in either packing), for per-segment attention calls.
    """

    frames: int
    patches: int
    length: int
    source: Tensor
    row: Tensor
    column: Tensor
    segment: Tensor
    spans: Tensor

    @property
    def rows(self) -> int:
        return self.segment.shape[0]

    @property
    def padding(self) -> int:
        """Slots no token fills."""
        return self.rows * self.length - self.source.numel()

    @property
    def waste(self) -> float:
        """Padding slots over all slots (0 when nothing was packed)."""
        total = self.rows * self.length
        return self.padding / total if total else 0.0


PACKINGS = ("ffd", "contiguous")


def pack_rows(keep: Tensor, length: int, packing: str = "ffd") -> PackedRows:
    """The packed layout of the kept tokens ``keep`` (``[frames, patches]`` bool): each frame's kept tokens, in
    order, form one segment.

    ``packing="ffd"``: segments go first-fit-decreasing into rows of ``length`` slots, a segment never split (the
    reference's layout, whose dense attention mask is per row). ``"contiguous"``: segments follow each other frame by
    frame and the sequence is cut every ``length`` slots, so a segment may continue on the next row and only the last
    row has padding; attention that reads the rows end to end (``tokensift.attention.Segments``) needs no more.
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    frames, patches = keep.shape
    counts = keep.sum(1)
    source = keep.reshape(-1).nonzero().flatten()
    frame = source // patches
    if packing == "ffd":
        row_of, offset_of = first_fit_decreasing(counts, length)
        row_of, offset_of = row_of.to(keep.device), offset_of.to(keep.device)
        start_of = row_of * length + offset_of  # each segment's first slot, rows end to end
    else:
        if length < 1:
            raise ValueError(f"row length must be at least 1, got {length}")
        start_of = counts.cumsum(0) - counts
    rank = (keep.cumsum(1) - 1).reshape(-1)[source]  # position of the token among its frame's kept ones
    slot = start_of[frame] + rank
    row, column = slot // length, slot % length
    rows = int(row.max()) + 1 if source.numel() else 0
    segment = torch.full((rows, length), -1, dtype=torch.long, device=keep.device)
    segment[row, column] = frame
    used = (counts > 0).nonzero().flatten()
    spans = torch.stack([start_of[used], start_of[used] + counts[used]], dim=1)
    spans = spans[torch.argsort(spans[:, 0])]
    return PackedRows(frames, patches, length, source, row, column, segment, spans)


def pack_tokens(values: Tensor, layout: PackedRows) -> Tensor:
    """``[frames, patches, ...]`` values into the packed ``[rows, length, ...]`` layout (padding slots zero)."""
    flat = values.reshape(layout.frames * layout.patches, *values.shape[2:])
    out = flat.new_zeros(layout.rows, layout.length, *values.shape[2:])
    return out.index_put((layout.row, layout.column), flat[layout.source])


def unpack_tokens(packed: Tensor, layout: PackedRows) -> Tensor:
    """The packed ``[rows, length, ...]`` values back to ``[frames, patches, ...]``, dropped tokens zero."""
    flat = packed.new_zeros(layout.frames * layout.patches, *packed.shape[2:])
    flat = flat.index_put((layout.source,), packed[layout.row, layout.column])
    return flat.view(layout.frames, layout.patches, *packed.shape[2:])


__all__ = [
    "PACKINGS",
    "PackedRows",
    "check_decision",
    "compact_state",
    "equal_count_index",
    "first_fit_decreasing",
    "gather_last",
    "gather_tokens",
    "identity_index",
    "pack_rows",
    "pack_tokens",
    "packed_cu_seqlens",
    "padded_layout",
    "unpack_tokens",
]
