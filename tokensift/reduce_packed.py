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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

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
        self._on_kept = on_kept
        self._run: _TowerRun | None = None
        self._samples = SampleCounter()  # images of calls without set_samples, numbered in arrival order
        self._next_samples: tuple[Tensor | None, tuple[int, ...]] | None = None
        site_blocks = {int(site.split(".")[1]): site for site in self.sites}
        self._hooks = [tower.register_forward_pre_hook(self._start, with_kwargs=True)]
        for index, block in enumerate(blocks):
            self._hooks.append(block.register_forward_pre_hook(self._block_inputs, with_kwargs=True))
            if index in site_blocks:
                self._hooks.append(block.register_forward_hook(self._prune_after(site_blocks[index], index)))
        self._hooks.append(merger.register_forward_hook(self._expand))

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

    def _block_inputs(self, module: nn.Module, args: tuple, kwargs: dict):
        run = self._run
        if run is None:
            return None
        if run.rotary is None:
            run.rotary = kwargs.get("position_embeddings")
        if run.patch_index is None:
            return None
        kwargs["position_embeddings"] = tuple(t[run.patch_index] for t in run.rotary)
        kwargs["cu_seqlens"] = run.cu_seqlens
        if kwargs.get("max_seqlen") is not None:  # flash attention reads it
            kwargs["max_seqlen"] = int((run.cu_seqlens[1:] - run.cu_seqlens[:-1]).max())
        return args, kwargs

    def _prune_after(self, site: str, layer: int):
        def hook(module: nn.Module, args: tuple, output: Tensor):
            run = self._run
            if run is None:
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
        num_keep = torch.tensor(
            [self.budget.counts(self.sites, int(n))[site] for n in original.tolist()], device=hidden.device
        )
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
