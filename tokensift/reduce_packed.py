"""``vit.<i>`` sites in a vision tower that packs every image into one sequence (Qwen2-VL).

Qwen2-VL's tower runs all images and video frames of a call as one ``[patches, D]`` sequence, attention
separated per frame by ``cu_seqlens``, with 2-D rotary embeddings per patch, and its merger joins each run
of ``m × m`` consecutive patches into one LLM token. So the unit a method keeps or drops here is a *merge
group*, not a patch: the method sees one token per group (the mean of its patches' hidden states), each
image a row of a padded batch, and the budget counts each image's own groups. After the site every later
block gets the kept patches with their own rotary embeddings and new ``cu_seqlens``; the merger then joins
the kept groups, and its output is put back at full length so the model's own placeholder check passes.
Which LLM tokens survive is reported through ``on_kept`` per tower call; the multimodal handle drops the
others from the LLM's input.

In mask (training) mode nothing leaves the sequence: the method's ``keep_policy`` over the merge groups (one
padded row per image, the previous site's policy in ``state.policy``) becomes, for every later block, a key bias
per patch (each group's policy repeated over its ``m × m`` patches). The blocks attend frame by frame (one call
of the attention function per ``cu_seqlens`` chunk, in order), so each block's attention module gets one call
entry per chunk (``chunks``, see ``tokensift.attention``). The merger's output keeps its length, and the group
policy is reported per tower call through ``on_policy``: the multimodal handle makes it the LLM's key bias from
decoder layer 0. Flash attention runs the whole packed sequence in one call, with no mask: refused in mask mode.

A *frame-batched* tower (Molmo2) runs its frames / crops as a ``[frames, patches, D]`` batch without a mask, and its
adapter pools windows of patches that the processor names (``*_token_pooling``) into LLM tokens. There the unit is a
*pooled group* (one LLM token), one padded row per image or video, the budget per image / video. After a site the
kept patches of every frame form one segment each, packed first-fit-decreasing into fixed-length rows (one frame's
patches by default, ``row_length``) that later blocks attend block-diagonally, one block per original frame (a
``segments`` call entry, ``tokensift.attention``); before the adapter reads them, every recorded hidden state goes
back to ``[frames, patches, D]`` (dropped patches zero), and ``on_kept`` reports the surviving LLM tokens.

A decision carrying ``key_bias`` (STTS's ``log(score)``) defers its compaction by one block, in both towers: the next
block attends with that bias on each patch as a key (its group's value), differentiably, and the kept patches are
gathered after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokensift import attention as attn
from tokensift.backbones.mllm import IMAGE, VIDEO
from tokensift.budget import Budget
from tokensift.compact import (
    PACKINGS,
    PackedRows,
    check_decision,
    pack_rows,
    pack_tokens,
    packed_cu_seqlens,
    unpack_tokens,
)
from tokensift.scorers.base import KeepDecision, TokenMethod, check_site_input
from tokensift.state import SampleCounter, TokenState, checked_samples


@dataclass
class PackedSiteRecord:
    """What one site of a packed tower did in the last tower call."""

    site: str
    kept: Tensor  # [items] groups (LLM tokens) each image / video keeps after the site
    deferred: bool  # compaction waited one block (the decision carried a key bias)
    rows: int = 0  # frame-batched towers: packed rows after the compaction (0: a sequence-packed tower)
    row_length: int = 0
    padding: int = 0  # slots of those rows that no patch fills
    waste: float = 0.0  # padding / (rows * row_length)


@dataclass
class _Deferred:
    """A decision waiting for the block after its site: ``keep`` which patches stay, ``bias`` [current layout] the
    key bias of every patch in that block."""

    block: int
    keep: Tensor
    bias: Tensor
    record: PackedSiteRecord


@dataclass
class _FrameRun:
    """One call of a frame-batched tower (Molmo2): its frames, pooled groups and, once a site pruned, the packing."""

    frames: int
    patches: int
    kind: int  # IMAGE or VIDEO: a call encodes one or the other
    pooling: Tensor  # [G, K] flat patch index (frame * patches + patch) of each group's slots, -1 unused
    patch_group: Tensor  # [frames * patches] the group each patch belongs to, -1 none
    group_item: Tensor  # [G] image / video of each group
    item_groups: Tensor  # [items]
    item_start: Tensor  # [items]
    group_coords: Tensor  # [G, 3]
    live: Tensor  # [G] bool groups still in the sequence
    layout: PackedRows | None = None  # None: the tower's own [frames, patches] batch
    packed_outputs: list[tuple[Tensor, PackedRows]] | None = None  # block outputs in a packed layout
    segments: attn.Segments | None = None  # the layout's block-diagonal attention, for every later block
    deferred: _Deferred | None = None
    sample_index: Tensor | None = None
    draw: tuple[int, ...] = ()


@dataclass
class _TowerRun:
    """One tower call: its grid and, once a site pruned, which original patches are still in the sequence."""

    grids: list[tuple[int, int, int]]  # (t, h, w) in patches, per image / video
    group_image: Tensor  # [G] image of each merge group, in sequence order
    image_groups: Tensor  # [images] merge groups of each image (what the budget counts)
    image_start: Tensor  # [images] index of each image's first group
    group_coords: Tensor  # [G, 3] (t, h, w) of each group in its image's merged grid
    group_frame: Tensor  # [G] global frame index of each group (attention runs per frame)
    num_frames: int
    rotary: tuple[Tensor, Tensor] | None = None  # the unpruned (cos, sin) of every patch
    patch_index: Tensor | None = None  # [N'] original index of each patch left; None: nothing dropped yet
    cu_seqlens: Tensor | None = None
    policy: Tensor | None = None  # mask mode: [G] cumulative keep policy of each merge group
    patch_call: tuple[str, Tensor] | None = None  # mask mode: ("policy" | "policy_bias", [N] per patch)
    chunk_calls: tuple[Tensor, list[dict]] | None = None  # mask mode: a block's cu_seqlens, its chunks' call entries
    sample_index: Tensor | None = None  # [images] whose draw each image's random choices are
    draw: tuple[int, ...] = ()
    deferred: _Deferred | None = None


@dataclass
class FrameTower:
    """What a frame-batched tower's family tells the handle: ``watch(on_call)`` calls ``on_call(kind, pooling,
    grids)`` before each tower call and returns the function that stops it; ``layout(kind, pooling, grids)`` gives
    ``[items]`` groups per image / video and ``[G, 3]`` their (t, h, w) (``Molmo2Family``)."""

    watch: Callable[[Callable], Callable[[], None]]
    layout: Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]


def _check_nothing_deferred(run: _TowerRun | _FrameRun) -> None:
    """At the tower's end: a key bias meant for a block after the last one is a site placed too deep."""
    if run.deferred is not None:
        raise ValueError(
            f"{run.deferred.record.site} carries a key bias for block {run.deferred.block}, which this tower does "
            "not have; put the site before the tower's last block."
        )


class PackedTowerHandle:
    """Runs a method at ``vit.<i>`` sites of a packed tower; driven by the multimodal handle that owns it.

    ``frames``: a frame-batched tower (Molmo2); then ``merger`` and ``merge_size`` are unused, ``row_length`` is the
    packed rows' length (default: one frame's patches), ``packing`` how frames fill them (``"ffd"``: first-fit-
    decreasing, a frame never split; ``"contiguous"``: frame after frame, a frame may continue on the next row, only
    the last row padded; ``tokensift.compact.pack_rows``; the default, since both kernels read the rows end to end,
    so a frame split over two rows costs nothing, while first-fit-decreasing leaves 11% of the slots of one
    16-frame video at keep 0.5 empty (3-6% over four videos), all of them computed) and ``segment_kernel`` the
    block-diagonal attention's kernel (``"sdpa"``: one call of the model's kernel per frame segment; ``"flex"``:
    ``flex_attention``, compiled).
    """

    def __init__(
        self,
        tower: nn.Module,
        blocks: nn.ModuleList,
        merger: nn.Module | None,
        merge_size: int | None,
        method: TokenMethod,
        budget: Budget,
        sites: list[str],
        on_kept: Callable[[Tensor], None],
        attention_modules: list[nn.Module] | None = None,
        mode: str = "gather",
        on_policy: Callable[[Tensor], None] | None = None,
        frames: FrameTower | None = None,
        row_length: int | None = None,
        segment_kernel: str = "sdpa",
        packing: str = "contiguous",
    ):
        reason = (
            "merges tokens"
            if method.merges
            else "reads the site block's attention"
            if method.needs_attention or method.needs_keys
            else None
        )
        if reason is not None:
            raise ValueError(
                f"{method.name} {reason}, which a packed vision tower (Qwen2-VL, Molmo2) does not expose per image; "
                "use a selection method (random, l2norm, divprune, stts) at vit.<i>, or run it at pre_llm / llm.<k>."
            )
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
        if segment_kernel not in attn.SEGMENT_KERNELS:
            raise ValueError(f"segment_kernel must be one of {attn.SEGMENT_KERNELS}, got {segment_kernel!r}")
        if row_length is not None and (
            isinstance(row_length, bool) or not isinstance(row_length, int) or row_length < 1
        ):
            raise ValueError(f"row_length must be a positive number of slots (or None: one frame), got {row_length!r}")
        if frames is None and merge_size is None:
            raise ValueError("a sequence-packed tower (Qwen2-VL) needs its merge_size")
        self.method, self.budget, self.sites = method, budget, list(sites)
        self.merge_size = merge_size
        self.group = merge_size * merge_size if merge_size is not None else 0
        self.frames = frames
        self.row_length = row_length
        self.segment_kernel = segment_kernel
        self.packing = packing
        self.enabled = True
        self.last_records: list[PackedSiteRecord] = []
        self._tower = tower
        # each block's attention module (mask mode, packed rows and key biases hand it call entries); the caller wraps
        # their attention function
        self._attention = list(attention_modules) if attention_modules is not None else [None] * len(blocks)
        self._run: _TowerRun | None = None
        self._frame_run: _FrameRun | None = None
        self._next_call: tuple[int, Tensor, Tensor] | None = None  # frame-batched: the coming call's pooling
        self.mode = mode
        self._on_kept = on_kept
        self._on_policy = on_policy
        self._samples = SampleCounter()  # images of calls without set_samples, numbered in arrival order
        self._next_samples: tuple[Tensor | None, tuple[int, ...]] | None = None
        self._site_blocks = {int(site.split(".")[1]): site for site in self.sites}
        self._hooks = [tower.register_forward_pre_hook(self._start, with_kwargs=True)]
        for index, block in enumerate(blocks):
            self._hooks.append(block.register_forward_pre_hook(self._block_inputs(index), with_kwargs=True))
            self._hooks.append(block.register_forward_hook(self._after_block(index)))
        if frames is not None:
            if any(module is None for module in self._attention):
                raise ValueError("a frame-batched tower (Molmo2) needs its blocks' attention modules")
            self._stop_watching: Callable[[], None] | None = frames.watch(self._on_feature_call)
            self._hooks.append(tower.register_forward_hook(self._unpack_outputs))
        else:
            self._stop_watching = None
            self._hooks.append(merger.register_forward_hook(self._expand))

    @property
    def mode(self) -> str:
        """``gather`` (dropped merge groups leave the sequence) or ``mask`` (a key bias per patch, nothing dropped)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ("gather", "mask"):
            raise ValueError(f"mode must be 'gather' (inference) or 'mask' (training), got {value!r}")
        if value == "mask":
            if self.frames is not None:
                raise ValueError(
                    "mask (training) mode at vit.<i> sites of a frame-batched tower (Molmo2) is not supported; train "
                    "in gather mode (a method whose decision carries key_bias, such as stts, trains through it there)."
                )
            if any(module is None for module in self._attention):
                raise ValueError("mask mode at a packed vision tower needs its blocks' attention modules")
            self._check_kernel("mask (training) mode")
        self._mode = value

    def _check_kernel(self, what: str) -> None:
        name = attn.base_name(str(getattr(self._tower.config, "_attn_implementation", None)))
        if "flash" in name:
            raise ValueError(
                f"{what} at vit.<i> sites of a packed vision tower needs an attention kernel that runs frame by frame "
                f"(sdpa or eager); the tower uses {name!r}, which attends to the whole packed sequence in one call and "
                "takes no per-key bias. Load the model with attn_implementation='sdpa' (or set the tower's), or use "
                "gather mode with a method that carries no key bias."
            )

    def _check_wrapped(self) -> None:
        name = str(getattr(self._tower.config, "_attn_implementation", None))
        if not name.startswith(attn.PREFIX):
            raise ValueError(
                f"the tower's attention ({name!r}) is not tokensift's wrapper, so packed rows and key biases would be "
                "ignored; set tower.set_attn_implementation(tokensift.attention.wrapped_name(base)) (ts.apply does)."
            )

    def set_samples(self, index: Tensor | None, draw: int | tuple[int, ...] = ()) -> None:
        """Name the images of the next tower call (one per sample): their random draws follow the sample."""
        self._next_samples = checked_samples(index, draw)

    def call_items(self, args: tuple, kwargs: dict) -> int | None:
        """Images / videos the tower call with these arguments encodes (one per sample when each sample has one)."""
        if self.frames is not None:
            return None if self._next_call is None else int(self.frames.layout(*self._next_call)[0].numel())
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        return None if grid is None else int(grid.shape[0])

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._clear_calls()
        if self._stop_watching is not None:
            self._stop_watching()
            self._stop_watching = None
        self._run = self._frame_run = None

    def _clear_calls(self) -> None:
        """No call entry outlives the tower call it was for (a later unpruned call must not read packed rows)."""
        for module in self._attention:
            if module is not None:
                setattr(module, attn.CALL_ATTRIBUTE, None)

    # -- hooks --------------------------------------------------------------------------------------
    def _on_feature_call(self, kind: int, pooling: Tensor, grids: Tensor) -> None:
        self._next_call = (kind, pooling, grids)

    def _start(self, module: nn.Module, args: tuple, kwargs: dict):
        samples, self._next_samples = self._next_samples, None
        self.last_records = []
        if self.frames is not None:
            call, self._next_call = self._next_call, None
            pixels = kwargs.get("pixel_values", args[0] if args else None)
            self._frame_run = None if not self.enabled or call is None else self._new_frame_run(call, pixels)
            if self._frame_run is not None:
                self._check_wrapped()
                items = self._frame_run.item_groups.numel()
                self._frame_run.sample_index, self._frame_run.draw = self._sample_rows(samples, items, pixels.device)
            return
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self._run = None if not self.enabled or grid is None else self._new_run(grid)
        if self._run is not None:
            self._run.sample_index, self._run.draw = self._sample_rows(samples, len(self._run.grids), grid.device)

    def _sample_rows(self, samples, rows: int, device) -> tuple[Tensor, tuple[int, ...]]:
        index, draw = samples or (None, ())
        if index is None or index.numel() != rows:
            index = self._samples.take(rows, device)
        return index.to(device), draw

    def _new_frame_run(self, call: tuple[int, Tensor, Tensor], pixels: Tensor) -> _FrameRun:
        kind, pooling, grids = call
        frames, patches = int(pixels.shape[0]), int(pixels.shape[1])
        item_groups, coords = self.frames.layout(kind, pooling, grids)
        pooling = pooling.to(pixels.device).long()
        valid = pooling >= 0
        if bool((pooling >= frames * patches).any()):
            raise ValueError(
                f"the pooling indices name patch {int(pooling.max())} but the tower call has {frames} frames of "
                f"{patches} patches; pass the processor's pooling indices with the pixels they index."
            )
        if not bool(valid.any(1).all()):
            raise ValueError("a pooled group names no patch (a pooling row of -1 only); the processor never builds one")
        group_index = torch.arange(pooling.shape[0], device=pixels.device).unsqueeze(1).expand_as(pooling)
        owners = torch.bincount(pooling[valid], minlength=frames * patches)
        if bool((owners > 1).any()):
            raise ValueError(
                "pooled groups overlap (a patch is pooled by several LLM tokens); the frame-batched tower driver keeps "
                "or drops each patch with its one group (Molmo2's processor builds non-overlapping windows)."
            )
        patch_group = torch.full((frames * patches,), -1, dtype=torch.long, device=pixels.device)
        patch_group[pooling[valid]] = group_index[valid]
        item_groups = item_groups.to(pixels.device)
        return _FrameRun(
            frames=frames,
            patches=patches,
            kind=kind,
            pooling=pooling,
            patch_group=patch_group,
            group_item=torch.repeat_interleave(torch.arange(item_groups.numel(), device=pixels.device), item_groups),
            item_groups=item_groups,
            item_start=item_groups.cumsum(0) - item_groups,
            group_coords=coords.to(pixels.device),
            live=torch.ones(pooling.shape[0], dtype=torch.bool, device=pixels.device),
            packed_outputs=[],
        )

    def _new_run(self, grid_thw: Tensor) -> _TowerRun:
        m = self.merge_size
        images, coords, frames, frame = [], [], [], 0
        for image, (t, h, w) in enumerate(grid_thw.tolist()):
            grid_t, grid_h, grid_w = torch.meshgrid(
                torch.arange(t), torch.arange(h // m), torch.arange(w // m), indexing="ij"
            )  # the order the image processor lays the groups out in, and the merger emits them in
            count = t * (h // m) * (w // m)
            images.append(torch.full((count,), image))
            coords.append(torch.stack([grid_t, grid_h, grid_w], dim=-1).reshape(count, 3))
            frames.append(grid_t.reshape(count) + frame)
            frame += t
        device = grid_thw.device
        image_groups = torch.tensor([len(i) for i in images], device=device)
        return _TowerRun(
            grids=[tuple(g) for g in grid_thw.tolist()],
            group_image=torch.cat(images).to(device),
            image_groups=image_groups,
            image_start=image_groups.cumsum(0) - image_groups,
            group_coords=torch.cat(coords).to(device),
            group_frame=torch.cat(frames).to(device),
            num_frames=frame,
        )

    def _block_inputs(self, index: int):
        attention = self._attention[index]

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if attention is not None:  # nothing left from an earlier forward (a disabled handle's teacher pass)
                setattr(attention, attn.CALL_ATTRIBUTE, None)
            if self.frames is not None:
                run = self._frame_run
                if run is not None:
                    entry = {}
                    if run.layout is not None:  # packed rows: attention block-diagonal per original frame
                        entry["segments"] = run.segments
                    if run.deferred is not None and run.deferred.block == index:
                        entry["key_bias"] = run.deferred.bias
                    setattr(attention, attn.CALL_ATTRIBUTE, entry or None)
                return None
            run = self._run
            if run is None:
                return None
            if run.rotary is None:
                run.rotary = kwargs.get("position_embeddings")
            if run.patch_call is not None:  # mask mode, after a site: one call entry per frame chunk, in order
                self._check_kernel("mask (training) mode")
                setattr(attention, attn.CALL_ATTRIBUTE, {"chunks": iter(self._chunk_calls(run, kwargs))})
                return None
            deferred = run.deferred if run.deferred is not None and run.deferred.block == index else None
            if run.patch_index is None and deferred is None:
                return None
            if run.patch_index is not None:
                kwargs["position_embeddings"] = tuple(t[run.patch_index] for t in run.rotary)
                kwargs["cu_seqlens"] = run.cu_seqlens
                if kwargs.get("max_seqlen") is not None:  # flash attention reads it
                    kwargs["max_seqlen"] = int((run.cu_seqlens[1:] - run.cu_seqlens[:-1]).max())
            if deferred is not None:  # the site's key bias, chunk by chunk (one attention call per frame)
                self._check_kernel("a decision's key bias (deferred compaction)")
                cu_seqlens = kwargs.get("cu_seqlens")
                lengths = [deferred.bias.numel()] if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
                chunks = [{"key_bias": chunk.unsqueeze(0)} for chunk in deferred.bias.split(lengths)]
                setattr(attention, attn.CALL_ATTRIBUTE, {"chunks": iter(chunks)})
            return args, kwargs

        return hook

    def _after_block(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Tensor):
            if self.frames is not None:
                return self._after_frame_block(index, output)
            run = self._run
            if run is None:
                return None
            hidden, changed = output, False
            if run.deferred is not None and run.deferred.block == index:  # the block after a key-biased site
                hidden, run.deferred, changed = self._compact_sequence(run, hidden, run.deferred.keep), None, True
            site = self._site_blocks.get(index)
            if site is not None and self.mode == "mask":
                self._mask(run, site, index, hidden)
            elif site is not None:
                pruned = self._prune(run, site, index, hidden)
                if pruned is not None:
                    hidden, changed = pruned, True
            return hidden if changed else None

        return hook

    def _decide(self, state: TokenState, num_keep: Tensor) -> KeepDecision:
        check_site_input(state.hidden, state.valid, self.method.name, state.site)
        decision = self.method.reduce(state, num_keep)
        check_decision(decision, state, self.method.name)
        if decision.hidden is not None or decision.size is not None:
            raise ValueError(
                f"{self.method.name} merged tokens at {state.site}, which a packed vision tower does not take."
            )
        bias = decision.key_bias
        if bias is not None and (tuple(bias.shape) != tuple(decision.keep.shape) or not bias.is_floating_point()):
            raise ValueError(
                f"{self.method.name} at {state.site} returned a key_bias of {bias.dtype} {tuple(bias.shape)}; expected "
                f"a float tensor of the keep mask's shape {tuple(decision.keep.shape)}."
            )
        return decision

    def _prune(self, run: _TowerRun, site: str, layer: int, hidden: Tensor) -> Tensor | None:
        g = self.group
        patches = hidden.shape[0]
        patch_index = torch.arange(patches, device=hidden.device) if run.patch_index is None else run.patch_index
        groups = patch_index.view(-1, g)[:, 0] // g  # [G'] original group of each group still here
        image = run.group_image[groups]
        original = run.image_groups
        num_keep = self._num_keep(original, site)
        if bool((num_keep >= torch.bincount(image, minlength=len(run.grids))).all()):
            return None  # this budget drops nothing here
        state, slot = self._state(run, site, layer, hidden, groups, image, num_keep / original.clamp(min=1))
        decision = self._decide(state, num_keep)
        keep_group = (decision.keep & state.valid)[image, slot]
        record = PackedSiteRecord(
            site, torch.bincount(image[keep_group], minlength=len(run.grids)), decision.key_bias is not None
        )
        self.last_records.append(record)
        keep_patch = keep_group.repeat_interleave(g)
        if decision.key_bias is not None:  # the next block attends with it; compaction after that block
            bias = decision.key_bias[image, slot].repeat_interleave(g)
            run.deferred = _Deferred(layer + 1, keep_patch, bias, record)
            return None
        return self._compact_sequence(run, hidden, keep_patch)

    def _compact_sequence(self, run: _TowerRun, hidden: Tensor, keep_patch: Tensor) -> Tensor:
        patch_index = (
            torch.arange(hidden.shape[0], device=hidden.device) if run.patch_index is None else run.patch_index
        )
        run.patch_index = patch_index[keep_patch]
        run.cu_seqlens = packed_cu_seqlens(run.group_frame[run.patch_index // self.group], run.num_frames)
        return hidden[keep_patch]

    def _num_keep(self, image_groups: Tensor, site: str) -> Tensor:
        """``[images]`` groups each image / video keeps after ``site``: the budget on the item's own count."""
        counts = [self.budget.counts(self.sites, int(n))[site] for n in image_groups.tolist()]
        return torch.tensor(counts, device=image_groups.device)

    # -- frame-batched towers (Molmo2) ---------------------------------------------------------------
    def _after_frame_block(self, index: int, output: Tensor) -> Tensor | None:
        run = self._frame_run
        if run is None:
            return None
        hidden, changed = output, False
        if run.layout is not None:  # what transformers' output capture may have recorded, to unpack at the end
            run.packed_outputs.append((output, run.layout))
        if run.deferred is not None and run.deferred.block == index:  # the block after a key-biased site
            deferred, run.deferred = run.deferred, None
            hidden, changed = self._frame_compact(run, hidden, deferred.keep, deferred.record), True
        site = self._site_blocks.get(index)
        if site is not None:
            pruned = self._frame_site(run, site, index, hidden)
            if pruned is not None:
                hidden, changed = pruned, True
        if changed:
            run.packed_outputs.append((hidden, run.layout))
        return hidden if changed else None

    @staticmethod
    def _frame_flat(run: _FrameRun, hidden: Tensor) -> Tensor:
        """``[frames * patches, D]`` hidden states of every patch (dropped ones zero), whatever the layout."""
        full = hidden if run.layout is None else unpack_tokens(hidden, run.layout)
        return full.reshape(run.frames * run.patches, -1)

    def _frame_site(self, run: _FrameRun, site: str, layer: int, hidden: Tensor) -> Tensor | None:
        live = run.live.nonzero().flatten()
        item = run.group_item[live]
        items = run.item_groups.numel()
        num_keep = self._num_keep(run.item_groups, site)
        if bool((num_keep >= torch.bincount(item, minlength=items)).all()):
            return None  # this budget drops nothing here
        flat = self._frame_flat(run, hidden)
        keep_target = num_keep / run.item_groups.clamp(min=1)
        state, slot = self._frame_state(run, site, layer, flat, live, item, keep_target)
        decision = self._decide(state, num_keep)
        keep_group = torch.zeros_like(run.live)
        keep_group[live] = (decision.keep & state.valid)[item, slot]
        record = PackedSiteRecord(
            site, torch.bincount(run.group_item[keep_group], minlength=items), decision.key_bias is not None
        )
        self.last_records.append(record)
        if decision.key_bias is not None:  # each patch takes its group's bias as a key in the next block
            group_bias = decision.key_bias.new_zeros(run.live.numel()).index_put((live,), decision.key_bias[item, slot])
            patch_bias = torch.where(run.patch_group >= 0, group_bias[run.patch_group.clamp(min=0)], 0.0)
            patch_bias = patch_bias.view(run.frames, run.patches)
            bias = patch_bias if run.layout is None else pack_tokens(patch_bias, run.layout)
            run.deferred = _Deferred(layer + 1, keep_group, bias, record)
            return None
        return self._frame_compact(run, hidden, keep_group, record, flat)

    def _frame_compact(
        self, run: _FrameRun, hidden: Tensor, keep_group: Tensor, record: PackedSiteRecord, flat: Tensor | None = None
    ) -> Tensor:
        """The kept patches, each frame's one segment, packed into rows (``flat``: ``hidden`` unpacked, if at hand)."""
        flat = self._frame_flat(run, hidden) if flat is None else flat
        run.live = keep_group
        keep_patch = (run.patch_group >= 0) & keep_group[run.patch_group.clamp(min=0)]
        layout = pack_rows(keep_patch.view(run.frames, run.patches), self.row_length or run.patches, self.packing)
        run.layout = layout
        run.segments = attn.Segments(
            [tuple(span) for span in layout.spans.tolist()], layout.segment, self.segment_kernel
        )
        record.rows, record.row_length, record.padding, record.waste = (
            layout.rows,
            layout.length,
            layout.padding,
            layout.waste,
        )
        return pack_tokens(flat.view(run.frames, run.patches, -1), layout)

    def _frame_state(
        self, run: _FrameRun, site: str, layer: int, flat: Tensor, live: Tensor, item: Tensor, keep_target: Tensor
    ) -> tuple[TokenState, Tensor]:
        """One row per image / video, one token per live pooled group (the mean of its patches)."""
        index = run.pooling[live]
        valid = index >= 0
        patches = flat[index.clamp(min=0)] * valid.unsqueeze(-1).to(flat.dtype)  # [G', K, D]
        means = patches.sum(1) / valid.sum(1, keepdim=True).to(flat.dtype)
        grid = tuple(int(v) + 1 for v in run.group_coords[:, 1:].amax(0).tolist())
        return self._group_state(
            site,
            layer,
            means,
            live - run.item_start[item],
            item,
            run.group_coords[live],
            [run.kind] * run.item_groups.numel(),
            grid,
            keep_target,
            run.sample_index,
            run.draw,
            patches,
            valid,
        )

    def _unpack_outputs(self, module: nn.Module, args: tuple, output):
        """After the tower: every packed hidden state back to ``[frames, patches, D]`` (the adapter reads them by
        layer), and which LLM tokens of the call survived."""
        run, self._frame_run = self._frame_run, None
        if run is None:
            return None
        self._clear_calls()
        _check_nothing_deferred(run)
        if run.layout is None:
            return None  # nothing was dropped

        def unpacked(value):
            for packed, layout in run.packed_outputs:
                if value is packed:
                    return unpack_tokens(value, layout)
            return value

        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(None if h is None else unpacked(h) for h in output.hidden_states)
        last = unpacked(output.last_hidden_state)
        output.last_hidden_state = last
        # the model's pooler averages a frame's patches: over the kept ones here (a frame left with none reads zero)
        kept = (run.patch_group >= 0) & run.live[run.patch_group.clamp(min=0)]
        counts = kept.view(run.frames, run.patches).sum(1, keepdim=True).clamp(min=1).to(last.dtype)
        output.pooler_output = last.sum(1) / counts
        self._on_kept(run.live.clone())
        return output

    # -- mask mode (sequence-packed towers) -------------------------------------------------------------
    def _mask(self, run: _TowerRun, site: str, layer: int, hidden: Tensor) -> None:
        """Mask mode: the method's keep policy over every merge group (the previous one in ``state.policy``) becomes
        the cumulative group policy, and each later block's attention its key bias, chunk by chunk."""
        groups = torch.arange(run.group_image.numel(), device=hidden.device)
        image = run.group_image
        original = run.image_groups
        num_keep = self._num_keep(original, site)
        alive = image if run.policy is None else image[run.policy > 0]
        learned = self.method.kind == "learned"  # a learned policy acts at every budget (it trains there)
        if not learned and bool((num_keep >= torch.bincount(alive, minlength=len(run.grids))).all()):
            return  # this budget drops nothing here
        state, slot = self._state(run, site, layer, hidden, groups, image, num_keep / original.clamp(min=1))
        if run.policy is not None:
            previous = torch.ones(state.valid.shape, dtype=run.policy.dtype, device=hidden.device)
            state.policy = previous.index_put((image, slot), run.policy)
        check_site_input(state.hidden, state.valid, self.method.name, site)
        policy = self.method.keep_policy(state, num_keep)
        if policy.shape != state.valid.shape:
            raise ValueError(
                f"{self.method.name}.keep_policy returned {tuple(policy.shape)}, expected {tuple(state.valid.shape)}"
            )
        run.policy = policy[image, slot]
        patch_policy = run.policy.repeat_interleave(self.group)
        if attn.needs_policy_attention(patch_policy):  # straight-through zeros: the renormalised policy softmax
            run.patch_call = ("policy", patch_policy)
        else:
            run.patch_call = ("policy_bias", attn.policy_bias(patch_policy))
        run.chunk_calls = None

    @staticmethod
    def _chunk_calls(run: _TowerRun, kwargs: dict) -> list[dict]:
        """Mask mode: a block's attention call entries, one per chunk of its ``cu_seqlens`` (the order its attention
        function is called in), each with the patch policy (or bias) of that chunk's keys."""
        cu_seqlens = kwargs.get("cu_seqlens")
        if run.chunk_calls is None or run.chunk_calls[0] is not cu_seqlens:  # the same tensor for every block
            key, per_patch = run.patch_call
            lengths = [per_patch.numel()] if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            run.chunk_calls = (cu_seqlens, [{key: chunk.unsqueeze(0)} for chunk in per_patch.split(lengths)])
        return run.chunk_calls[1]

    def _state(
        self,
        run: _TowerRun,
        site: str,
        layer: int,
        hidden: Tensor,
        groups: Tensor,
        image: Tensor,
        keep_target: Tensor,
    ) -> tuple[TokenState, Tensor]:
        """One row per image, one token per merge group (mean of its patches); returns it with each group's slot."""
        patches = hidden.view(-1, self.group, hidden.shape[-1])
        m = self.merge_size
        # a tower call does not say whether it encodes images or videos; several frames mean a video
        kinds = [VIDEO if t > 1 else IMAGE for t, _, _ in run.grids]
        grid = (max(h for _, h, _ in run.grids) // m, max(w for _, _, w in run.grids) // m)
        return self._group_state(
            site,
            layer,
            patches.mean(dim=1),
            groups - run.image_start[image],
            image,
            run.group_coords[groups],
            kinds,
            grid,
            keep_target,
            run.sample_index,
            run.draw,
            patches,
            torch.ones(patches.shape[:2], dtype=torch.bool, device=hidden.device),
        )

    def _group_state(
        self,
        site: str,
        layer: int,
        means: Tensor,
        index_in_item: Tensor,
        item: Tensor,
        coords: Tensor,
        kinds: list[int],
        grid: tuple[int, int],
        keep_target: Tensor,
        sample_index: Tensor | None,
        draw: tuple[int, ...],
        patches: Tensor,
        patch_valid: Tensor,
    ) -> tuple[TokenState, Tensor]:
        """The site's state: one padded row per image / video, one token per group (``means`` ``[G', D]``, groups of
        an item contiguous and in order); returns it with each group's slot in its row."""
        num_items, dim, device = len(kinds), means.shape[-1], means.device
        per_item = torch.bincount(item, minlength=num_items)
        first = per_item.cumsum(0) - per_item
        slot = torch.arange(item.numel(), device=device) - first[item]
        width = int(per_item.max()) if item.numel() else 0
        rows = means.new_zeros(num_items, width, dim)
        rows[item, slot] = means
        valid = torch.zeros(num_items, width, dtype=torch.bool, device=device)
        valid[item, slot] = True
        orig_index = torch.full((num_items, width), -1, dtype=torch.long, device=device)
        orig_index[item, slot] = index_in_item
        row_coords = torch.full((num_items, width, 3), -1, dtype=torch.long, device=device)
        row_coords[item, slot] = coords
        kind = torch.tensor(kinds, device=device)
        image_id = torch.arange(num_items, device=device).unsqueeze(1).expand(-1, width)
        state = TokenState(
            hidden=rows,
            protected=torch.zeros_like(valid),
            orig_index=orig_index,
            size=valid.float(),
            grid=grid,
            num_prefix=0,
            site=site,
            layer=layer,
            keep_target=keep_target.float(),
            valid=valid,
            kind=kind.unsqueeze(1).expand(-1, width).masked_fill(~valid, 0),
            image_id=image_id.masked_fill(~valid, -1),
            coords=row_coords,
            sample_index=sample_index,
            draw=draw,
        )
        if self.method.needs_group_patches:  # STTS pools and compares each group's patches
            group_patches = patches.new_zeros(num_items, width, *patches.shape[1:])
            group_patches[item, slot] = patches
            group_valid = torch.zeros(num_items, width, patches.shape[1], dtype=torch.bool, device=device)
            group_valid[item, slot] = patch_valid
            state.group_patches, state.group_patch_valid = group_patches, group_valid
        return state, slot

    def _expand(self, module: nn.Module, args: tuple, output: Tensor):
        """Back to one row per merge group of the call (dropped ones zero), and report which ones are real."""
        run = self._run
        if run is not None:
            _check_nothing_deferred(run)
        if run is not None and run.policy is not None:  # mask mode: nothing dropped, the policy goes to the LLM
            if self._on_policy is not None:
                self._on_policy(run.policy)
            return None
        if run is None or run.patch_index is None:
            return None
        kept = run.patch_index.view(-1, self.group)[:, 0] // self.group
        full = output.new_zeros(run.group_image.numel(), output.shape[-1])
        full[kept] = output
        keep = torch.zeros(run.group_image.numel(), dtype=torch.bool, device=output.device)
        keep[kept] = True
        self._on_kept(keep)
        return full


__all__ = ["FrameTower", "PackedSiteRecord", "PackedTowerHandle"]
