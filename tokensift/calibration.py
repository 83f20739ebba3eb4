"""VFlowOpt's calibration: fit the pruning hyperparameters on a few of the user's own batches.

VFlowOpt (``llava_ov_opt_all.py`` ``generate_until``) treats the last token's final hidden state as the summary of
how visual information flowed through the model, and picks the pruning strategy whose pruned model keeps that
state closest (cosine similarity, summed over ~30 samples) to the unpruned model's, by Bayesian optimisation
(scikit-optimize, 300 calls) over a box of hyperparameters, with the last stage's ratio solved from a budget on the
average kept fraction over the pruned layers.

``calibrate`` does the same on ``vit.<i>`` sites: it fits ``global_threshold``, the entropy prior's weight ``alpha``
(VFlowOpt's ``alpha_v``, searched in ``[-1, 1]`` as the reference does) and the cumulative keep ratio of each site,
under the budget "mean kept fraction of patches over the tower blocks after the first site", by a
seeded search (random points, then Gaussian-process expected improvement with scikit-learn's regressor, the
model scikit-optimize uses) that maximises :func:`flow_similarity`.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor, nn

from tokensift import api
from tokensift.backbones import adapt
from tokensift.scorers.vflowopt.model import VFlowOptConfig, VFlowOptMethod

_VIT_SITE = re.compile(r"^vit\.(\d+)$")
_NOT_INPUTS = {"labels"}


def calibrate(
    model: nn.Module,
    batches: Iterable,
    budget: float,
    *,
    sites: list[str] | None = None,
    config: VFlowOptConfig | None = None,
    trials: int = 30,
    initial_trials: int = 10,
    threshold_range: tuple[float, float] = (0.0, 50.0),
    alpha_range: tuple[float, float] = (-1.0, 1.0),
    seed: int = 0,
    history: list | None = None,
) -> VFlowOptConfig:
    """Fit VFlowOpt's ``global_threshold``, ``alpha`` and per-site keep ratios to ``model`` on ``batches``.

    - ``model``: a vision backbone (ViT / CLIP / SigLIP) or LLaVA; it is left as it was (every candidate is applied
      and removed).
    - ``batches``: a few batches of the user's data: ``pixel_values`` tensors or mappings holding them (vision), the
      model's input mappings (LLaVA; ``labels`` is ignored). Each is run once unpruned and once per trial.
    - ``budget``: the mean kept fraction of the patches over the tower blocks after the first site,
      ``Σ_s r_s n_s / Σ_s n_s`` where the ``n_s`` blocks after site ``s`` (up to the next site, or the last block
      the output reads) run on the cumulative fraction ``r_s`` (VFlowOpt's budget on the average over its pruned
      layers; with one site, that site's keep ratio). Counts round up as every tokensift budget does.
    - ``sites``: the ``vit.<i>`` sites (default: ``config.sites``, else the method's default sites).
    - ``config``: the starting point (default ``VFlowOptConfig()``); its other fields are kept.
    - ``trials`` candidates are evaluated: the starting point (its threshold and alpha, schedule midpoints),
      ``initial_trials`` − 1 uniform random points, then points of maximal expected improvement under a Gaussian
      process fitted to the objective so far. ``threshold_range``: the box searched for ``global_threshold``
      (VFlowOpt: [0, 50]); ``alpha_range``: the box searched for ``alpha`` (VFlowOpt: [-1, 1]; ``(a, a)`` fixes it
      at ``a``, ``(0, 0)`` leaves the pixels unread). ``seed`` makes the search repeatable.
    - ``history``: a list to which each candidate's ``{"global_threshold", "alpha", "keep_ratios", "objective"}``
      is appended.

    Returns the candidate with the highest :func:`flow_similarity` (the earliest among equals) as a
    ``VFlowOptConfig`` with ``sites``, ``global_threshold``, ``alpha`` and ``keep_ratios`` set; apply it with
    ``ts.apply(model, VFlowOptMethod(config), keep_ratio=config.keep_ratios)``.
    """

    adapter = adapt(model)
    base = config if config is not None else VFlowOptConfig()
    if not isinstance(base, VFlowOptConfig):
        raise TypeError(f"calibrate: config must be a VFlowOptConfig, got {type(base).__name__}.")
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate: batches is empty; give a few batches of your own data.")
    _check_search(trials, initial_trials, threshold_range, alpha_range)
    sites = _ordered_sites(sites or base.sites or VFlowOptMethod(base).default_sites(adapter))
    stages = _stage_lengths(adapter, sites)
    patches = (adapter.vision_adapter if getattr(adapter, "is_multimodal", False) else adapter).num_patches()
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 1.0 / patches <= budget <= 1.0:
        raise ValueError(
            f"calibrate: budget must be a fraction in [1/{patches}, 1] (the mean kept fraction over the blocks after "
            f"the first site; every site keeps at least one of the {patches} patches), got {budget!r}."
        )

    readout = _Readout(model, adapter)
    try:
        inputs = [_model_inputs(adapter, model, batch) for batch in batches]
        references = [readout(batch) for batch in inputs]
        low, high = float(threshold_range[0]), float(threshold_range[1])
        alpha_low, alpha_high = float(alpha_range[0]), float(alpha_range[1])
        dims = 2 + len(sites) - 1
        rng = np.random.default_rng(seed)

        def decode(point: np.ndarray) -> tuple[float, float, dict[str, float]]:
            threshold = low + float(point[0]) * (high - low)
            alpha = alpha_low + float(point[1]) * (alpha_high - alpha_low)
            ratios = schedule(point[2:], stages, float(budget), 1.0 / patches)
            return threshold, alpha, dict(zip(sites, ratios, strict=True))

        def evaluate(point: np.ndarray) -> float:
            threshold, alpha, ratios = decode(point)
            candidate = replace(base, sites=list(sites), global_threshold=threshold, alpha=alpha, keep_ratios=ratios)
            value = flow_similarity(model, candidate, inputs, references, readout=readout)
            if history is not None:
                entry = {"global_threshold": threshold, "alpha": alpha, "keep_ratios": ratios, "objective": value}
                history.append(entry)
            return value

        def position(value: float, lo: float, hi: float) -> float:
            return (min(max(value, lo), hi) - lo) / (hi - lo) if hi > lo else 0.0

        start = [position(float(base.global_threshold), low, high), position(float(base.alpha), alpha_low, alpha_high)]
        first = np.array(start + [0.5] * (dims - 2))
        points, values = [first], [evaluate(first)]
        while len(points) < trials:
            if len(points) < initial_trials:
                point = rng.random(dims)
            else:
                point = _expected_improvement_point(np.stack(points), np.array(values), rng, seed)
            points.append(point)
            values.append(evaluate(point))
    finally:
        readout.remove()
    threshold, alpha, ratios = decode(points[int(np.argmax(values))])
    return replace(base, sites=list(sites), global_threshold=threshold, alpha=alpha, keep_ratios=ratios)


def flow_similarity(
    model: nn.Module,
    config: VFlowOptConfig,
    batches: list,
    references: list[Tensor] | None = None,
    *,
    readout=None,
) -> float:
    """VFlowOpt's objective: the mean over samples of the cosine similarity between the pruned and the unpruned
    model's final representation: the input of the classifier head (a vision classifier; else the tower's pooled
    output), or the language model's last hidden state at the last position (LLaVA: the state that predicts the
    next token, VFlowOpt's ``last_layer_last_token``).

    The pruned model is ``model`` with ``VFlowOptMethod(config)`` at ``config.sites`` and the budget
    ``config.keep_ratios``; ``batches`` are as for :func:`calibrate`; ``references`` (the unpruned
    representations, one ``[B, D]`` per batch) are computed when not given.
    """

    if config.keep_ratios is None:
        raise ValueError("flow_similarity: config.keep_ratios is None; give the per-site budget to evaluate.")
    adapter = adapt(model)
    own = readout is None
    readout = _Readout(model, adapter) if own else readout
    try:
        inputs = [_model_inputs(adapter, model, batch) for batch in batches]
        if references is None:
            references = [readout(batch) for batch in inputs]
        total, count = 0.0, 0
        with api.apply(model, VFlowOptMethod(config), keep_ratio=dict(config.keep_ratios)):
            for batch, reference in zip(inputs, references, strict=True):
                similarity = torch.nn.functional.cosine_similarity(readout(batch), reference, dim=-1)
                total += float(similarity.nan_to_num(0.0).sum())
                count += similarity.numel()
    finally:
        if own:
            readout.remove()
    return total / count


def schedule(fractions: np.ndarray, stages: list[int], budget: float, minimum: float) -> list[float]:
    """Cumulative keep ratios ``r_1 ≥ … ≥ r_S`` (each ``≥ minimum``) with ``Σ r_s n_s = budget · Σ n_s``.

    ``fractions`` (``S − 1`` numbers in ``[0, 1]``) place each ``r_s`` but the last within the interval that still
    lets the later sites meet the budget; the last is solved from it, as VFlowOpt solves its last stage's ratio.
    """
    remaining = budget * sum(stages)
    previous, ratios = 1.0, []
    for s, fraction in enumerate(fractions):
        later = sum(stages[s + 1 :])
        low = max(minimum, remaining / (stages[s] + later))
        high = max(low, min(previous, (remaining - minimum * later) / stages[s]))
        ratio = low + float(fraction) * (high - low)
        ratios.append(ratio)
        remaining -= ratio * stages[s]
        previous = ratio
    ratios.append(min(previous, max(minimum, remaining / stages[-1])))
    return ratios


# -- helpers --------------------------------------------------------------------------------------------
def _check_search(trials, initial_trials, threshold_range, alpha_range) -> None:
    for name, value in (("trials", trials), ("initial_trials", initial_trials)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"calibrate: {name} must be a positive integer, got {value!r}.")
    for name, box, floor in (("threshold_range", threshold_range, 0.0), ("alpha_range", alpha_range, -math.inf)):
        try:
            low, high = (float(v) for v in box)
        except (TypeError, ValueError):
            raise ValueError(f"calibrate: {name} must be (low, high), got {box!r}.") from None
        if not (math.isfinite(low) and math.isfinite(high) and floor <= low <= high):
            bound = "0 <= low <= high" if floor == 0.0 else "low <= high, both finite"
            raise ValueError(f"calibrate: {name} must satisfy {bound}, got {box!r}.")


def _ordered_sites(sites: list[str]) -> list[str]:
    if isinstance(sites, str) or not sites:
        raise ValueError(f"calibrate: sites must be a non-empty list of vit.<i> sites, got {sites!r}.")
    wrong = [s for s in sites if not isinstance(s, str) or not _VIT_SITE.match(s)]
    if wrong:
        raise ValueError(f"calibrate: VFlowOpt runs at vit.<i> sites; sites {wrong} are not of that form.")
    if len(set(sites)) != len(sites):
        raise ValueError(f"calibrate: sites must be distinct, got {sites}.")
    return sorted(sites, key=lambda s: int(_VIT_SITE.match(s).group(1)))


def _stage_lengths(adapter, sites: list[str]) -> list[int]:
    """Blocks run after each site: up to the next site, then up to the last block whose output is read."""
    if getattr(adapter, "is_multimodal", False):
        last = adapter.family.scored_tower_block(adapter.model)
        valid = adapter.family.last_vit_site(adapter.model)
    else:
        last, valid = adapter.num_layers - 1, adapter.num_layers - 2
    layers = [int(_VIT_SITE.match(s).group(1)) for s in sites]
    bad = [s for s, i in zip(sites, layers, strict=True) if i > valid]
    if bad:
        raise ValueError(f"calibrate: sites {bad} do not exist on this model; valid sites are vit.0 .. vit.{valid}.")
    return [b - a for a, b in zip(layers, [*layers[1:], last], strict=True)]


def _model_inputs(adapter, model: nn.Module, batch) -> dict:
    if isinstance(batch, Tensor):
        if getattr(adapter, "is_multimodal", False):
            raise ValueError("calibrate: a multimodal LLM's batches must be mappings of its inputs, not tensors.")
        return {"pixel_values": batch}
    if not isinstance(batch, Mapping):
        raise ValueError(f"calibrate: each batch must be a tensor of pixel_values or a mapping, got {type(batch)}.")
    if not getattr(adapter, "is_multimodal", False):
        if "pixel_values" not in batch:
            raise ValueError("calibrate: a vision model's batch mapping must hold 'pixel_values'.")
        return {"pixel_values": batch["pixel_values"]}
    accepted = inspect.signature(model.forward).parameters
    return {k: v for k, v in batch.items() if k in accepted and k not in _NOT_INPUTS}


class _Readout:
    """Runs the model on one batch and returns its final representation ``[B, D]`` (see ``flow_similarity``)."""

    def __init__(self, model: nn.Module, adapter):
        self.model, self._captured, self._hook = model, None, None
        if getattr(adapter, "is_multimodal", False):
            self._hook = adapter.language_model.register_forward_hook(self._last_position)
        elif isinstance(getattr(model, "classifier", None), nn.Module):
            self._hook = model.classifier.register_forward_pre_hook(self._head_input)

    def _last_position(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        self._captured = hidden[:, -1].detach().float()

    def _head_input(self, module, args):
        self._captured = args[0].detach().float()

    def __call__(self, inputs: dict) -> Tensor:
        self._captured = None
        with torch.no_grad():
            output = self.model(**inputs)
        if self._captured is not None:
            return self._captured
        pooled = getattr(output, "pooler_output", None)
        if pooled is None:
            raise ValueError(
                f"calibrate: {type(self.model).__name__} has no classifier head and returns no pooler_output: "
                "nothing to compare."
            )
        return pooled.detach().float()

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _expected_improvement_point(points: np.ndarray, values: np.ndarray, rng, seed: int) -> np.ndarray:
    """The point of a random pool with the largest expected improvement under a GP fitted to ``values``."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    dims = points.shape[1]
    kernel = ConstantKernel(1.0, (1e-3, 1e3)) * Matern([0.3] * dims, (1e-2, 1e1), nu=2.5) + WhiteKernel(
        1e-6, (1e-9, 1e-1)
    )
    gp = GaussianProcessRegressor(kernel, normalize_y=True, random_state=seed, n_restarts_optimizer=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notes on a handful of points
        gp.fit(points, values)
        pool = rng.random((512, dims))
        mean, std = gp.predict(pool, return_std=True)
    gain = mean - values.max() - 0.01 * (np.abs(values.max()) + 1e-12)
    z = torch.from_numpy(gain / np.maximum(std, 1e-12))
    improvement = gain * torch.special.ndtr(z).numpy() + std * torch.exp(-0.5 * z**2).numpy() / math.sqrt(2 * math.pi)
    return pool[int(np.argmax(improvement))]
