"""The hook driver of vision towers (ViT / CLIP / SigLIP): hooks on an unmodified backbone that run a method at
its sites.

- gather mode (inference): after a site's block the method decides what stays (a ``KeepDecision``, every sample
  keeping the budget's count) and the sequence *shrinks* (``tokensift.compact.compact_state``: gathered in
  ascending original order, merged values included); every later block runs on fewer tokens. A decision with a
  ``key_bias`` (STTS; DynamicViT's ``removal_gradient: next_block_bias``) defers the compaction by one block: the
  next block runs on every token with that bias added to each query's logits for its keys, and the sequence
  shrinks after it. The bias stays in the graph, so a loss on the pruned forward trains the scorer whose tokens it
  removes (every site has a next block: ``vit.<i>`` stops one block before the last). Training by removal (a
  learned method with ``removal_policy``, DynamicViT's ``train_by_removal``) defers the same way: its
  differentiable ``keep_policy`` enters the next block's policy attention, and the dropped tokens go after it.
- mask mode (training): the sequence keeps its length; the method's keep policy enters every later
  block's attention (``tokensift.attention``), and the head's pooling sees only kept tokens.

Both modes share the per-forward bookkeeping (original indices, merge sizes, policy) kept in ``_Run``.

What a method reads besides the hidden states, by the capabilities it declares (``TokenMethod``): the site block's
attention and head-averaged keys (``needs_attention`` / ``needs_keys``) and its values per head (``needs_values``),
captured by the attention wrapper; each token's pixel patch of the forward's ``pixel_values`` (``needs_pixels``);
and, for ``observes_every_block``, a call of ``method.observe(state)`` after every other block from the first while
the last site still has tokens to remove, with that block's captures (FlowCut's flow, accumulated at every block).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor, nn

from tokensift import attention as attn
from tokensift.backbones.vision import VisionAdapter
from tokensift.budget import Budget
from tokensift.compact import check_decision, compact_state
from tokensift.scorers.base import KeepDecision, TokenMethod, check_site_input
from tokensift.state import SampleCounter, TokenState, checked_samples

Mode = Literal["gather", "mask"]


@dataclass
class SiteRecord:
    """What happened at one site in the last forward pass (for losses, stats and overlays)."""

    site: str
    kept_orig_index: Tensor | None  # gather mode: [B, K] original indices of the survivors
    policy: Tensor | None  # mask mode: [B, N] cumulative keep decision (differentiable when learned)
    keep_fraction: Tensor  # [B] prunable tokens kept / prunable tokens in the unpruned input
    target: float  # the budget's cumulative keep fraction at this site
    hidden: Tensor | None = None  # gather mode: the survivors' hidden states right after the site
    protected: Tensor | None = None  # mask mode: [B, N] bool, [CLS] / registers (never pruned, not patches)
    # mask mode: the method kept exactly the budget's count (as at inference), so the kept fraction is no
    # function of the scorer and the objective has no budget term to train
    exact_count: bool = False


@dataclass
class _Deferred:
    """A site's keep decision whose compaction waits for the next block (``KeepDecision.key_bias``)."""

    site: str
    state: TokenState  # the site's state; its hidden states are replaced by the next block's output
    decision: KeepDecision
    target: float


@dataclass
class _Run:
    grid: tuple[int, int]
    protected: Tensor | None = None
    orig_index: Tensor | None = None
    size: Tensor | None = None
    policy: Tensor | None = None
    num_prefix: int = 0
    num_prunable: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    merged: bool = False  # some token stands for several: later blocks need ToMe's size bias
    capture: dict | None = None
    observing: bool = False  # the block now running is one the method observes (observes_every_block)
    pixel_values: Tensor | None = None  # the forward's input, kept for a method that needs_pixels
    patch_pixels: Tensor | None = None  # [B, N0, C, p·p] each original token's pixel patch ([CLS] zero), made once
    records: list[SiteRecord] = field(default_factory=list)
    sample_index: Tensor | None = None  # [B] what set_samples named, else the handle's running count
    draw: tuple[int, ...] = ()
    deferred: _Deferred | None = None  # gather mode: a decision to apply after the block now running
    key_bias: Tensor | None = None  # [B, N] the deferred decision's key bias, for the next block's attention only


class PruningHandle:
    """A method applied to a model. ``remove()`` (or leaving the ``with`` block) restores it exactly."""

    def __init__(
        self,
        adapter: VisionAdapter,
        method: TokenMethod,
        budget: Budget,
        sites: list[str] | None = None,
        mode: Mode = "gather",
    ):
        if mode not in ("gather", "mask"):
            raise ValueError(f"mode must be 'gather' (inference) or 'mask' (training), got {mode!r}")
        if mode == "mask" and method.merges:
            raise ValueError(f"{method.name} merges tokens and only runs in gather mode")
        self.adapter = adapter
        self.method = method
        self.budget = budget
        self.mode: Mode = mode
        self.enabled = True
        self.sites = list(sites or method.config.sites or method.default_sites(adapter))
        self._site_layers = {adapter.layer_of(site): site for site in self.sites}
        if len(self._site_layers) != len(self.sites):
            raise ValueError(f"sites must be distinct, got {self.sites}")
        self.sites = [self._site_layers[i] for i in sorted(self._site_layers)]
        budget.counts(self.sites, adapter.num_patches())  # a per-site budget must name these sites: fail before hooking
        if method.observes_every_block and not callable(getattr(method, "observe", None)):
            raise TypeError(f"{method.name} sets observes_every_block but has no observe(state) method")
        if attn.base_name(adapter.config._attn_implementation) != adapter.config._attn_implementation:
            raise ValueError("this model already has a tokensift method applied; remove() its handle first.")
        self._run: _Run | None = None
        self.last_records: list[SiteRecord] = []
        self._original_attn = adapter.config._attn_implementation
        adapter.tower.set_attn_implementation(attn.wrapped_name(self._original_attn))
        self._hooks = [adapter.tower.register_forward_pre_hook(self._start, with_kwargs=True)]
        last_site = max(self._site_layers)
        for index, layer in enumerate(adapter.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._before_layer(index), with_kwargs=True))
            after_site = index - 1 in self._site_layers  # where a decision with a key bias is compacted
            if index in self._site_layers or after_site or (method.observes_every_block and index < last_site):
                self._hooks.append(layer.register_forward_hook(self._after_layer(index)))
        self._hooks.append(adapter.final_token_module.register_forward_hook(self._pool_kept_only))
        self.model = adapter.model
        self._on_remove: list[Callable[[], object]] = []
        self._samples = SampleCounter()  # rows of forwards without set_samples, numbered in arrival order
        self._next_samples: tuple[Tensor | None, tuple[int, ...]] | None = None

    # -- public ---------------------------------------------------------------------------------
    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module in self.adapter.attention_modules:
            if hasattr(module, attn.CALL_ATTRIBUTE):
                delattr(module, attn.CALL_ATTRIBUTE)
        self.adapter.tower.set_attn_implementation(self._original_attn)
        while self._on_remove:
            self._on_remove.pop()()

    def on_remove(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` when ``remove()`` runs (``ts.apply`` unloads the LoRA adapter it loaded)."""
        self._on_remove.append(callback)

    def __enter__(self) -> PruningHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def set_budget(self, keep_ratio=None, keep_count=None) -> None:
        budget = Budget(keep_ratio=keep_ratio, keep_count=keep_count)
        budget.counts(self.sites, self.adapter.num_patches())  # fail now, not in the next forward's hooks
        self.budget = budget

    def set_samples(self, index: Tensor | None, draw: int | tuple[int, ...] = ()) -> None:
        """Name the rows of the next forward pass: ``index`` ``[B]``, each row's dataset index (``batch["index"]``
        of the tokensift data modules); ``draw`` tells draws of the same samples apart (a trainer: (seed, step)).

        Methods that draw noise (``random``, ``dynamicvit`` in training, the benchmark's oracle) make each
        sample's draw a function of (their seed, ``index``, ``draw``): a sample keeps its draw in any batch, at
        any batch size and on any rank. Applies to the next forward pass only; without it the rows are numbered
        in arrival order since the handle was made (``index=None`` with a ``draw`` keeps that numbering).
        """
        self._next_samples = checked_samples(index, draw)

    def site_counts(self, num_prunable: int | None = None) -> dict[str, int]:
        """Prunable tokens kept after each site for the current budget."""
        n = num_prunable or self.adapter.num_patches()
        return self.budget.counts(self.sites, n)

    @property
    def kept_orig_index(self) -> Tensor | None:
        """``[B, K]`` original indices of the tokens that survived the last site of the last forward."""
        records = [r for r in self.last_records if r.kept_orig_index is not None]
        return records[-1].kept_orig_index if records else None

    # -- hooks ----------------------------------------------------------------------------------
    def _start(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.enabled:
            self._run = None
            return None
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        self.adapter.check_pixel_values(pixel_values, bool(kwargs.get("interpolate_pos_encoding")))
        self._run = _Run(grid=self.adapter.grid_for(pixel_values))
        if self.method.needs_pixels:
            self._run.pixel_values = pixel_values
        self._run.sample_index, self._run.draw = self._next_samples or (None, ())
        self._next_samples = None
        self.last_records = self._run.records
        return None

    def _init_tokens(self, run: _Run, hidden: Tensor) -> None:
        b, n = hidden.shape[:2]
        run.num_prefix = n - run.grid[0] * run.grid[1]
        run.num_prunable = run.grid[0] * run.grid[1]
        run.orig_index = torch.arange(n, device=hidden.device).expand(b, n)
        run.protected = run.orig_index < run.num_prefix
        run.size = torch.ones(b, n, device=hidden.device, dtype=torch.float32)
        run.counts = self.budget.counts(self.sites, run.num_prunable)
        if run.sample_index is None:
            run.sample_index = self._samples.take(b, hidden.device)
        elif run.sample_index.shape[0] != b:
            raise ValueError(
                f"set_samples named {run.sample_index.shape[0]} samples but the forward pass has {b} rows; "
                "give one index per row of the batch."
            )
        run.sample_index = run.sample_index.to(hidden.device)

    def _before_layer(self, index: int):
        attention_module = self.adapter.attention_modules[index]

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            run = self._run
            call = {}
            if run is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                if run.orig_index is None:
                    self._init_tokens(run, hidden)
                if _attention_mask(args, kwargs) is not None and hidden.shape[1] != _full_length(run):
                    raise NotImplementedError("tokensift cannot yet shrink a vision tower that gets an attention mask")
                if run.policy is not None:  # mask mode; gather mode: the block before a removal-training compaction
                    call["policy"] = run.policy
                if run.merged:
                    call["key_bias"] = run.size.log()  # ToMe's proportional attention
                if run.key_bias is not None:  # the previous site's decision, compacted after this block
                    if tuple(run.key_bias.shape) != tuple(hidden.shape[:2]):
                        raise ValueError(
                            f"{self.method.name}'s key_bias covers {tuple(run.key_bias.shape)} tokens but block "
                            f"{index} gets {tuple(hidden.shape[:2])}"
                        )
                    bias = run.key_bias.float()
                    call["key_bias"] = bias if "key_bias" not in call else call["key_bias"] + bias
                    run.key_bias = None
                site = self._site_layers.get(index)
                method = self.method
                wants_capture = method.needs_attention or method.needs_keys or method.needs_values
                runs_site = site is not None and self._site_is_active(run, site)
                run.observing = not runs_site and self._observes(run, index)
                if (runs_site and wants_capture) or run.observing:
                    run.capture = call["capture"] = {}
                    if method.needs_values:
                        call["capture_values"] = True
            setattr(attention_module, attn.CALL_ATTRIBUTE, call or None)

        return hook

    def _site_is_active(self, run: _Run, site: str) -> bool:
        alive = _alive_prunable(run)
        return run.counts[site] < alive or (self.mode == "mask" and self.method.kind == "learned")

    def _observes(self, run: _Run, index: int) -> bool:
        """Block ``index`` is one the method observes: it asks for every block, and some site after this block still
        has tokens to remove (FlowCut scores every block while more tokens remain than its target)."""
        if not self.method.observes_every_block or index >= max(self._site_layers):
            return False
        return _alive_prunable(run) > min(run.counts.values())

    def _state(self, run: _Run, hidden: Tensor, index: int, site: str, capture: dict, target: float | None):
        """The ``TokenState`` of block ``index``'s output ``hidden`` with what the method asked the handle for."""
        patch_pixels = None
        if self.method.needs_pixels:
            if run.patch_pixels is None:
                run.patch_pixels = _patch_pixels(run, self.adapter.patch_size, hidden.dtype)
            by_token = run.orig_index[..., None, None].expand(-1, -1, *run.patch_pixels.shape[2:])
            patch_pixels = run.patch_pixels.gather(1, by_token)
        rows = hidden.shape[0]
        return TokenState(
            hidden=hidden,
            protected=run.protected,
            orig_index=run.orig_index,
            size=run.size,
            grid=run.grid,
            num_prefix=run.num_prefix,
            site=site,
            layer=index,
            policy=run.policy,
            attention=capture.get("attention"),
            keys=capture.get("keys"),
            values=capture.get("values"),
            patch_pixels=patch_pixels,
            keep_target=None if target is None else torch.full((rows,), target, device=hidden.device),
            sample_index=run.sample_index,
            draw=run.draw,
        )

    def _after_layer(self, index: int):
        site = self._site_layers.get(index)

        def hook(module: nn.Module, args: tuple, output):
            run = self._run
            if run is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            capture = run.capture or {}
            run.capture = None
            shrunk = run.deferred is not None
            if shrunk:  # the previous site's decision: its key bias was this block's, the compaction is now
                deferred, run.deferred = run.deferred, None
                state = replace(deferred.state, hidden=hidden)
                hidden = self._compact(run, state, deferred.decision, deferred.site, deferred.target)
                if capture:
                    raise ValueError(
                        f"{self.method.name} returned a key_bias at {deferred.site} and reads block {index}'s "
                        "attention, which covers the tokens before the deferred compaction: put its sites at least "
                        "two blocks apart, or return no key_bias."
                    )
            if run.observing:  # a block the method observes (a site with nothing to remove included)
                run.observing = False
                self.method.observe(self._state(run, hidden, index, f"vit.{index}", capture, None))
                return _with_hidden(output, hidden) if shrunk else None
            if site is None or not self._site_is_active(run, site):
                return _with_hidden(output, hidden) if shrunk else None
            count = run.counts[site]
            target = count / run.num_prunable
            state = self._state(run, hidden, index, site, capture, target)
            check_site_input(state.hidden, state.alive, self.method.name, site)
            num_keep = torch.full((hidden.shape[0],), count, dtype=torch.long, device=hidden.device)
            if self.mode == "mask":
                run.policy = self.method.keep_policy(state, num_keep)
                kept = (run.policy * (~run.protected).float()).sum(1)
                exact = self.method.keeps_budget_count
                record = SiteRecord(site, None, run.policy, kept / run.num_prunable, target, None, run.protected, exact)
                run.records.append(record)
                return None
            if self.method.training and self.method.removal_policy:
                self._remove_by_policy(run, state, num_keep, site, target)
                return _with_hidden(output, hidden) if shrunk else None
            decision = self.method.reduce(state, num_keep)
            check_decision(decision, state, self.method.name)
            if decision.key_bias is not None:  # compacted after the next block, which adds the bias
                _check_key_bias(decision.key_bias, state, self.method)
                run.deferred = _Deferred(site, state, decision, target)
                run.key_bias = decision.key_bias
                return _with_hidden(output, hidden) if shrunk else None
            return _with_hidden(output, self._compact(run, state, decision, site, target))

        return hook

    def _remove_by_policy(self, run: _Run, state: TokenState, num_keep: Tensor, site: str, target: float) -> None:
        """Gather mode, training a method that sets ``removal_policy``: its differentiable ``keep_policy`` decides,
        the next block runs on every token with that policy in its attention (DynamicViT's policy attention: the
        dropped tokens invisible to the others, with a gradient towards keeping them), and the dropped tokens are
        removed after it. So the kept tokens compute the pruned inference's forward pass, and the loss reaches
        every decision through that block."""
        policy = self.method.keep_policy(state, num_keep)
        keep = (policy.detach() > 0.5) & state.alive
        run.deferred = _Deferred(site, replace(state, policy=policy), KeepDecision(keep), target)
        run.policy = policy

    def _compact(self, run: _Run, state: TokenState, decision: KeepDecision, site: str, target: float) -> Tensor:
        """Shrink the sequence to ``decision``'s kept tokens (gather mode), record the site, return the survivors'
        hidden states."""
        reduced = compact_state(state, decision, f"{self.method.name} at site {site}")
        run.protected, run.orig_index, run.size = reduced.protected, reduced.orig_index, reduced.size
        run.policy = None  # removal training: the survivors' decisions stay in the graph, their policy is spent
        run.merged = run.merged or self.method.merges
        kept = (~reduced.protected).sum(1).float()
        run.records.append(SiteRecord(site, reduced.orig_index, None, kept / run.num_prunable, target, reduced.hidden))
        return reduced.hidden

    def _pool_kept_only(self, module: nn.Module, args: tuple, output):
        """Mask mode: give dropped tokens the mean of the kept ones, so a mean-pooling head sees only those."""
        run = self._run
        if run is None or run.policy is None or self.adapter.pooling not in ("mean_all", "mean_patches"):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        pooled = run.policy if self.adapter.pooling == "mean_all" else run.policy * (~run.protected).float()
        weights = pooled.to(hidden.dtype).unsqueeze(-1)
        mean = (hidden * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1e-6)
        filled = hidden * weights + mean * (1 - weights)
        keep_special = run.protected.unsqueeze(-1)
        filled = torch.where(keep_special, hidden, filled)
        return (filled, *output[1:]) if isinstance(output, tuple) else filled


def _patch_pixels(run: _Run, patch: int, dtype: torch.dtype) -> Tensor:
    """``[B, N0, C, p·p]`` each original token's ``p × p`` pixel patch of the forward's ``pixel_values`` (row-major
    over the patch grid as the patch embedding reads them; each channel's patch row by row), in ``dtype`` (the
    tower's); zero for the special tokens before the patches."""
    pixels = run.pixel_values.to(dtype)
    b, c = pixels.shape[:2]
    rows, cols = run.grid
    patches = pixels[:, :, : rows * patch, : cols * patch].unfold(2, patch, patch).unfold(3, patch, patch)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, rows * cols, c, patch * patch)
    prefix = patches.new_zeros(b, run.num_prefix, c, patch * patch)
    return torch.cat([prefix, patches], dim=1).to(run.orig_index.device)


def _with_hidden(output, hidden: Tensor):
    """A block's ``output`` (a tensor or a tuple led by one) with ``hidden`` as its hidden states."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _check_key_bias(key_bias: Tensor, state: TokenState, method: TokenMethod) -> None:
    """Raise a ValueError naming the method and site unless ``key_bias`` is a finite float ``[B, N]`` over the state's
    tokens (a blocked key is the next block's to decide by the keep mask, not by ``-inf``)."""
    shape = tuple(state.hidden.shape[:2])
    if not isinstance(key_bias, Tensor) or not key_bias.is_floating_point() or tuple(key_bias.shape) != shape:
        got = f"{key_bias.dtype} {tuple(key_bias.shape)}" if isinstance(key_bias, Tensor) else type(key_bias).__name__
        raise ValueError(f"{method.name} at site {state.site} returned a key_bias of {got}, expected float {shape}")
    if method.observes_every_block:
        raise ValueError(
            f"{method.name} observes every block and returned a key_bias at {state.site}: a deferred compaction "
            "would hand its next observation tokens that its accumulated evidence does not cover; return no key_bias."
        )
    if not bool(torch.isfinite(key_bias.detach()).all()):
        raise FloatingPointError(
            f"{method.name} at site {state.site} returned a key_bias with NaN / inf: the next block's attention "
            "would be undefined. Check the method's scores (log of a score of 0 is -inf)."
        )


def _alive_prunable(run: _Run) -> int:
    alive = ~run.protected
    if run.policy is not None:
        alive = alive & (run.policy > 0)
    return int(alive.sum(1).max())


def _full_length(run: _Run) -> int:
    return run.num_prefix + run.num_prunable


def _attention_mask(args: tuple, kwargs: dict) -> Tensor | None:
    return args[1] if len(args) > 1 else kwargs.get("attention_mask")


__all__ = ["Mode", "PruningHandle", "SiteRecord"]
