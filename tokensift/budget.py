"""Budgets: how many prunable tokens survive each site, chosen at inference time."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

BudgetValue = float | int | Mapping[str, float] | Mapping[str, int] | None


@dataclass(frozen=True)
class Budget:
    """``keep_ratio`` or ``keep_count``, for the whole model or per site.

    A single ``keep_ratio`` is the fraction of the original prunable tokens left after the *last* site;
    earlier sites follow a geometric schedule (site ``s`` of ``S`` keeps ``keep_ratio ** (s / S)``), as
    DynamicViT's ρ, ρ², ρ³. A mapping gives each site's cumulative fraction (or count) explicitly.
    """

    keep_ratio: float | Mapping[str, float] | None = None
    keep_count: int | Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if self.keep_ratio is not None and self.keep_count is not None:
            raise ValueError("Give either keep_ratio or keep_count, not both.")
        if self.keep_ratio is None and self.keep_count is None:
            raise ValueError("A budget needs keep_ratio (a fraction in (0, 1]) or keep_count (a token count).")
        for site, ratio in _items(self.keep_ratio):
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
                where = f"keep_ratio[{site!r}]" if site else "keep_ratio"
                raise ValueError(f"{where} must be in (0, 1], got {ratio!r}; 1.0 keeps every token.")
        for site, count in _items(self.keep_count):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                where = f"keep_count[{site!r}]" if site else "keep_count"
                raise ValueError(f"{where} must be a positive integer, got {count!r}.")

    def ratios(self, sites: Sequence[str], num_prunable: int) -> dict[str, float]:
        """Cumulative keep fraction after each site (in site order), each never above the previous one."""
        return {site: count / num_prunable for site, count in self.counts(sites, num_prunable).items()}

    def counts(self, sites: Sequence[str], num_prunable: int) -> dict[str, int]:
        """Prunable tokens kept after each site: at least one, never more than the site before kept."""
        if isinstance(self.keep_count, Mapping):
            raw = self._per_site(self.keep_count, sites, "keep_count")
        else:
            ratio = self.keep_ratio if self.keep_count is None else min(1.0, self.keep_count / num_prunable)
            fractions = self._per_site(ratio, sites, "keep_ratio")
            raw = {site: math.ceil(fraction * num_prunable - 1e-6) for site, fraction in fractions.items()}
            if self.keep_count is not None:
                raw[sites[-1]] = self.keep_count
        out, previous = {}, num_prunable
        for site in sites:
            previous = max(1, min(previous, raw[site]))
            out[site] = previous
        return out

    @staticmethod
    def _per_site(value, sites: Sequence[str], field: str) -> dict:
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(sites))
            if unknown:
                raise ValueError(f"{field} names unknown sites {unknown}; this method runs at sites {list(sites)}.")
            missing = [s for s in sites if s not in value]
            if missing:
                raise ValueError(f"{field} has no value for sites {missing}; give every site of {list(sites)}.")
            return {s: value[s] for s in sites}
        n = len(sites)
        return {site: float(value) ** ((i + 1) / n) for i, site in enumerate(sites)}


def _items(value) -> list:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return list(value.items())
    return [("", value)]
