"""How sure the bench's accuracies are, and accuracy at equal cost.

- **Intervals.** Every accuracy comes with a percentile bootstrap interval over the test samples: ``resamples``
  draws of ``n`` sample indices with replacement (``numpy.random.default_rng(seed)``), the accuracy of each
  draw, and the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of those. One set of draws serves every
  row of a run (all rows score the same test samples), so two rows' replicates at the same draw are *paired*:
  a difference of accuracies gets its interval from the per-draw differences
  (:func:`paired_difference`), which is narrower than two separate intervals suggest when the methods err on
  the same samples.
- **Equal cost.** :func:`accuracy_at_flops` reads a method's accuracy at a given FLOPs ratio off its
  accuracy-vs-FLOPs-ratio curve over the budgets run, linearly between the two budgets that bracket it; the
  interval comes from the replicates interpolated the same way at the same draw. A FLOPs ratio outside the
  curve's range gets none (no extrapolation).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from tokensift.bench.specs import parse_fractions

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95
DEFAULT_FLOPS_RATIOS = (0.4, 0.5, 0.6, 0.7, 0.8)
_CHUNK = 64  # draws generated at once


def _correct_vector(correct) -> np.ndarray:
    array = np.asarray(correct, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError("correct: no samples to bootstrap over.")
    return array


def percentile_interval(replicates: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The ``level`` percentile interval of bootstrap ``replicates``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: {level!r} is outside (0, 1); e.g. 0.95 for a 95% interval.")
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(np.asarray(replicates, dtype=np.float64), [tail, 100.0 - tail])
    return float(low), float(high)


def check_bootstrap(resamples: int, seed: int) -> None:
    """Validate ``bootstrap_resamples`` / ``bootstrap_seed`` before a run spends anything."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 2:
        raise ValueError(f"bootstrap_resamples: must be an integer >= 2, got {resamples!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"bootstrap_seed: must be a non-negative integer, got {seed!r}.")


@dataclass
class Bootstrap:
    """One run's bootstrap draws: ``resamples`` × ``num_samples`` indices into the test samples."""

    num_samples: int
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    level: float = DEFAULT_LEVEL

    def __post_init__(self) -> None:
        check_bootstrap(self.resamples, self.seed)
        if self.num_samples < 1:
            raise ValueError("bootstrap: no test samples to resample.")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level: {self.level!r} is outside (0, 1); e.g. 0.95 for a 95% interval.")

    def _draws(self) -> Iterator[np.ndarray]:
        """The draws, ``_CHUNK`` at a time, regenerated from the seed on every call (the same ones each time, so
        replicates pair across rows without holding ``resamples × num_samples`` indices in memory)."""
        rng = np.random.default_rng(self.seed)
        for start in range(0, self.resamples, _CHUNK):
            size = min(_CHUNK, self.resamples - start)
            yield rng.integers(0, self.num_samples, size=(size, self.num_samples))

    def replicates(self, correct) -> np.ndarray:
        """``[resamples]`` accuracy of each draw, from a per-sample ``correct`` vector (0/1 or bool)."""
        correct = _correct_vector(correct)
        if correct.size != self.num_samples:
            raise ValueError(f"correct: {correct.size} samples, but the draws index {self.num_samples}.")
        return np.concatenate([correct[draws].mean(axis=1) for draws in self._draws()])

    def interval(self, correct) -> tuple[float, float]:
        return percentile_interval(self.replicates(correct), self.level)

    def describe(self) -> dict:
        return {
            "level": self.level,
            "resamples": self.resamples,
            "seed": self.seed,
            "method": "percentile bootstrap over the test samples (numpy default_rng(seed) draws of n indices with "
            "replacement); one set of draws for every row, so replicates pair across rows",
        }


def accuracy_interval(
    correct, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL
) -> dict:
    """Accuracy of a per-sample ``correct`` vector and its percentile bootstrap interval.

    Returns ``{"accuracy", "accuracy_low", "accuracy_high"}``.
    """
    correct = _correct_vector(correct)
    low, high = Bootstrap(correct.size, resamples, seed, level).interval(correct)
    return {"accuracy": float(correct.mean()), "accuracy_low": low, "accuracy_high": high}


def paired_difference(
    correct_a, correct_b, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL
) -> dict:
    """Accuracy of ``a`` minus accuracy of ``b`` on the *same* test samples, with a paired bootstrap interval.

    Both vectors are per-sample correctness in the same sample order; each draw resamples the samples once and
    scores both methods on it. Returns ``{"difference", "difference_low", "difference_high", "p_not_above_zero"}``
    (the last: the fraction of draws where ``a`` is not better, a one-sided bootstrap p-value for "a > b").
    """
    a, b = _correct_vector(correct_a), _correct_vector(correct_b)
    if a.size != b.size:
        raise ValueError(f"paired_difference: {a.size} vs {b.size} samples; pair the same test samples.")
    boot = Bootstrap(a.size, resamples, seed, level)
    return difference_of_replicates(float(a.mean() - b.mean()), boot.replicates(a) - boot.replicates(b), level)


def difference_of_replicates(difference: float, replicates: np.ndarray, level: float = DEFAULT_LEVEL) -> dict:
    low, high = percentile_interval(replicates, level)
    return {
        "difference": difference,
        "difference_low": low,
        "difference_high": high,
        "p_not_above_zero": float(np.mean(np.asarray(replicates) <= 0.0)),
    }


@dataclass
class CurvePoint:
    """One budget of a method: its FLOPs ratio, accuracy and bootstrap replicates (``None``: no interval)."""

    flops_ratio: float
    accuracy: float
    replicates: np.ndarray | None = None
    budget: str = ""


def interpolate_at(points: Sequence[CurvePoint], target: float) -> tuple[float, np.ndarray | None, str] | None:
    """Accuracy (and replicates, draw by draw) at FLOPs ratio ``target``, linear between the bracketing budgets.

    Returns ``(accuracy, replicates, between)`` with ``between`` naming the budgets used, or ``None`` when the
    curve does not reach ``target`` (below its cheapest or above its dearest budget).
    """
    ordered = sorted(points, key=lambda p: p.flops_ratio)
    if not ordered or not ordered[0].flops_ratio <= target <= ordered[-1].flops_ratio:
        return None
    exact = [p for p in ordered if p.flops_ratio == target]
    if exact:  # on a budget: that budget's numbers (several budgets with one FLOPs ratio: their mean)
        reps = [p.replicates for p in exact]
        replicates = None if any(r is None for r in reps) else np.mean(np.stack(reps), axis=0)
        return float(np.mean([p.accuracy for p in exact])), replicates, "/".join(p.budget for p in exact)
    upper = next(i for i, p in enumerate(ordered) if p.flops_ratio > target)
    lo, hi = ordered[upper - 1], ordered[upper]
    weight = (target - lo.flops_ratio) / (hi.flops_ratio - lo.flops_ratio)
    accuracy = (1.0 - weight) * lo.accuracy + weight * hi.accuracy
    replicates = None
    if lo.replicates is not None and hi.replicates is not None:
        replicates = (1.0 - weight) * lo.replicates + weight * hi.replicates
    return float(accuracy), replicates, f"{lo.budget}–{hi.budget}"


def accuracy_at_flops(
    points: Sequence[CurvePoint], targets: Sequence[float], level: float = DEFAULT_LEVEL
) -> list[dict | None]:
    """Per target FLOPs ratio: ``{"flops_ratio", "accuracy", "accuracy_low", "accuracy_high", "between"}`` read
    off the curve through ``points`` (see :func:`interpolate_at`), or ``None`` where the curve does not reach."""
    out: list[dict | None] = []
    for target in targets:
        found = interpolate_at(points, float(target))
        if found is None:
            out.append(None)
            continue
        accuracy, replicates, between = found
        low, high = (None, None) if replicates is None else percentile_interval(replicates, level)
        out.append(
            {
                "flops_ratio": float(target),
                "accuracy": accuracy,
                "accuracy_low": low,
                "accuracy_high": high,
                "between": between,
                "_replicates": replicates,
            }
        )
    return out


def parse_flops_ratios(flops_ratios: Sequence[float] | str | None) -> list[float]:
    """Target FLOPs ratios for the equal-cost table, each in (0, 1], ascending; ``None`` or empty: none."""
    if flops_ratios is None:
        return []
    meaning = "a FLOPs ratio is the pruned model's analytic FLOPs over the unpruned model's"
    return parse_fractions(flops_ratios, "flops_ratios", meaning=meaning, example="0.4,0.5,0.6", descending=False)


__all__ = [
    "DEFAULT_FLOPS_RATIOS",
    "Bootstrap",
    "CurvePoint",
    "accuracy_at_flops",
    "accuracy_interval",
    "check_bootstrap",
    "interpolate_at",
    "paired_difference",
    "parse_flops_ratios",
    "percentile_interval",
]
