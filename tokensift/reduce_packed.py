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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokensift import attention as attn
from tokensift.backbones.mllm import IMAGE, VIDEO
from tokensift.budget import Budget
from tokensift.compact import check_decision, packed_cu_seqlens
from tokensift.scorers.base import TokenMethod, check_site_input
from tokensift.state import SampleCounter, TokenState, checked_samples


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


class PackedTowerHandle:
    """Runs a method at ``vit.<i>`` sites of a packed tower; driven by the multimodal handle that owns it."""

    def __init__(
        self,
        tower: nn.Module,
        blocks: nn.ModuleList,
        merger: nn.Module,
        merge_size: int,
        method: TokenMethod,
        budget: Budget,
        sites: list[str],
        on_kept: Callable[[Tensor], None],
        attention_modules: list[nn.Module] | None = None,
        mode: str = "gather",
        on_policy: Callable[[Tensor], None] | None = None,
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
                f"{method.name} {reason}, which a packed vision tower (Qwen2-VL) does not expose per image; use a "
                "selection method (random, l2norm, divprune) at vit.<i>, or run it at pre_llm / llm.<k>."
            )
        self.method, self.budget, self.sites = method, budget, list(sites)
        self.group = merge_size * merge_size
        self.merge_size = merge_size
        self.enabled = True
        self._tower = tower
        # each block's attention module (mask mode hands it the policy); the caller wraps their attention function
        self._attention = list(attention_modules) if attention_modules is not None else [None] * len(blocks)
        self.mode = mode
        self._on_kept = on_kept
        self._on_policy = on_policy
        self._run: _TowerRun | None = None
        self._samples = SampleCounter()  # images of calls without set_samples, numbered in arrival order
        self._next_samples: tuple[Tensor | None, tuple[int, ...]] | None = None
        site_blocks = {int(site.split(".")[1]): site for site in self.sites}
        self._hooks = [tower.register_forward_pre_hook(self._start, with_kwargs=True)]
        for index, block in enumerate(blocks):
            self._hooks.append(block.register_forward_pre_hook(self._block_inputs(index), with_kwargs=True))
            if index in site_blocks:
                self._hooks.append(block.register_forward_hook(self._prune_after(site_blocks[index], index)))
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
            if any(module is None for module in self._attention):
                raise ValueError("mask mode at a packed vision tower needs its blocks' attention modules")
            self._check_kernel()
        self._mode = value

    def _check_kernel(self) -> None:
        name = attn.base_name(str(getattr(self._tower.config, "_attn_implementation", None)))
        if "flash" in name:
            raise ValueError(
                f"mask (training) mode at vit.<i> sites of a packed vision tower (Qwen2-VL) needs an attention kernel "
                f"that runs frame by frame (sdpa or eager); the tower uses {name!r}, which attends to the whole packed "
                "sequence in one call and takes no per-key bias. Load the model with attn_implementation='sdpa' (or "
                "set the tower's), or use gather mode."
            )

    def set_samples(self, index: Tensor | None, draw: int | tuple[int, ...] = ()) -> None:
        """Name the images of the next tower call (one per sample): their random draws follow the sample."""
        self._next_samples = checked_samples(index, draw)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._run = None

    # -- hooks --------------------------------------------------------------------------------------
    def _start(self, module: nn.Module, args: tuple, kwargs: dict):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        samples, self._next_samples = self._next_samples, None
        self._run = None if not self.enabled or grid is None else self._new_run(grid)
        if self._run is not None:
            index, draw = samples or (None, ())
            if index is None or index.numel() != len(self._run.grids):
                index = self._samples.take(len(self._run.grids), grid.device)
            self._run.sample_index, self._run.draw = index.to(grid.device), draw

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
            run = self._run
            if attention is not None:  # nothing left from an earlier forward (a disabled handle's teacher pass)
                setattr(attention, attn.CALL_ATTRIBUTE, None)
            if run is None:
                return None
            if run.rotary is None:
                run.rotary = kwargs.get("position_embeddings")
            if run.patch_call is not None:  # mask mode, after a site: one call entry per frame chunk, in order
                self._check_kernel()
                setattr(attention, attn.CALL_ATTRIBUTE, {"chunks": iter(self._chunk_calls(run, kwargs))})
                return None
            if run.patch_index is None:
                return None
            kwargs["position_embeddings"] = tuple(t[run.patch_index] for t in run.rotary)
            kwargs["cu_seqlens"] = run.cu_seqlens
            if kwargs.get("max_seqlen") is not None:  # flash attention reads it
                kwargs["max_seqlen"] = int((run.cu_seqlens[1:] - run.cu_seqlens[:-1]).max())
            return args, kwargs

        return hook

    def _prune_after(self, site: str, layer: int):
        def hook(module: nn.Module, args: tuple, output: Tensor):
            run = self._run
            if run is None:
                return None
            if self.mode == "mask":
                self._mask(run, site, layer, output)
                return None
            return self._prune(run, site, layer, output)

        return hook

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
        check_site_input(state.hidden, state.valid, self.method.name, site)
        decision = self.method.reduce(state, num_keep)
        check_decision(decision, state, self.method.name)
        if decision.hidden is not None or decision.size is not None:
            raise ValueError(f"{self.method.name} merged tokens at {site}, which a packed vision tower does not take.")
        keep = decision.keep & state.valid
        keep_patch = keep[image, slot].repeat_interleave(g)
        run.patch_index = patch_index[keep_patch]
        run.cu_seqlens = packed_cu_seqlens(run.group_frame[run.patch_index // g], run.num_frames)
        return hidden[keep_patch]

    def _num_keep(self, image_groups: Tensor, site: str) -> Tensor:
        """``[images]`` merge groups each image keeps after ``site``: the budget on the image's own count."""
        counts = [self.budget.counts(self.sites, int(n))[site] for n in image_groups.tolist()]
        return torch.tensor(counts, device=image_groups.device)

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
        num_images, dim = len(run.grids), hidden.shape[-1]
        per_image = torch.bincount(image, minlength=num_images)
        first = per_image.cumsum(0) - per_image
        slot = torch.arange(groups.numel(), device=hidden.device) - first[image]  # groups of an image are contiguous
        width = int(per_image.max())
        rows = hidden.new_zeros(num_images, width, dim)
        rows[image, slot] = hidden.view(-1, self.group, dim).mean(dim=1)
        valid = torch.zeros(num_images, width, dtype=torch.bool, device=hidden.device)
        valid[image, slot] = True
        orig_index = torch.full((num_images, width), -1, dtype=torch.long, device=hidden.device)
        orig_index[image, slot] = groups - run.image_start[image]  # the group's index within its image
        coords = torch.full((num_images, width, 3), -1, dtype=torch.long, device=hidden.device)
        coords[image, slot] = run.group_coords[groups]
        # a tower call does not say whether it encodes images or videos; several frames mean a video
        kind = torch.tensor([VIDEO if t > 1 else IMAGE for t, _, _ in run.grids], device=hidden.device)
        image_id = torch.arange(num_images, device=hidden.device).unsqueeze(1).expand(-1, width)
        m = self.merge_size
        state = TokenState(
            hidden=rows,
            protected=torch.zeros_like(valid),
            orig_index=orig_index,
            size=valid.float(),
            grid=(max(h for _, h, _ in run.grids) // m, max(w for _, _, w in run.grids) // m),
            num_prefix=0,
            site=site,
            layer=layer,
            keep_target=keep_target.float(),
            valid=valid,
            kind=kind.unsqueeze(1).expand(-1, width).masked_fill(~valid, 0),
            image_id=image_id.masked_fill(~valid, -1),
            coords=coords,
            sample_index=run.sample_index,
            draw=run.draw,
        )
        return state, slot

    def _expand(self, module: nn.Module, args: tuple, output: Tensor):
        """Back to one row per merge group of the call (dropped ones zero), and report which ones are real."""
        run = self._run
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


__all__ = ["PackedTowerHandle"]
