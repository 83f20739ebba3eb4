"""The site sweep: where a training-free method prunes matters as much as which method it is, so the bench can
run each training-free method at every ``vit.<i>`` site (or a given list) and pick, per keep ratio, the site
with the best accuracy on the data module's *validation* split; the test split only reports.

Ties on validation accuracy go to the cheaper site (lower FLOPs ratio, i.e. the earlier block), then to the
earlier site in the list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_SITE = re.compile(r"^vit\.\d+$")
ALL = "all"


def parse_sweep_sites(value: bool | str | Sequence[str] | None) -> str | list[str] | None:
    """``False`` / ``None`` / ``""``: no sweep; ``True`` / ``"all"`` / ``"true"``: every ``vit.<i>`` the model
    allows; ``"vit.2,vit.3"`` or a list: those sites."""
    if value is None or value is False:
        return None
    if value is True:
        return ALL
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "false", "none", "no", "0"):
            return None
        if text.lower() in (ALL, "true", "yes", "1"):
            return ALL
        value = [part for part in text.split(",")]
    sites = [str(site).strip() for site in value if str(site).strip()]
    bad = [site for site in sites if not _SITE.match(site)]
    if bad or not sites:
        raise ValueError(
            f"sweep_sites: {bad or value!r} are not vit.<i> sites; give true (every block) or a list such as "
            "vit.2,vit.3,vit.4."
        )
    return list(dict.fromkeys(sites))


def resolve_sweep_sites(requested: str | list[str], valid: Sequence[str]) -> list[str]:
    """The sites to sweep on a model whose usable sites are ``valid`` (in block order)."""
    if requested == ALL:
        return list(valid)
    unknown = [site for site in requested if site not in valid]
    if unknown:
        raise ValueError(f"sweep_sites: {unknown} do not exist on this model; its sites are {list(valid)}.")
    return sorted(requested, key=lambda s: int(s.split(".")[1]))


def choose_best_sites(entries: Sequence[dict]) -> dict[tuple[str, float], str]:
    """Per (method, keep ratio), the site with the highest ``val_accuracy`` (ties: lower ``flops_ratio``, then the
    earlier entry). Marks each entry's ``best`` and returns ``{(method, keep_ratio): site}``."""
    best: dict[tuple[str, float], Mapping] = {}
    for entry in entries:
        key = (entry["method"], entry["keep_ratio"])
        held = best.get(key)
        if held is None or (entry["val_accuracy"], -entry["flops_ratio"]) > (
            held["val_accuracy"],
            -held["flops_ratio"],
        ):
            best[key] = entry
    for entry in entries:
        entry["best"] = best[(entry["method"], entry["keep_ratio"])] is entry
    return {key: entry["site"] for key, entry in best.items()}


def best_site_label(label: str) -> str:
    """The row label of a method run at its validation-chosen site."""
    return f"{label}@best_site"


__all__ = ["best_site_label", "choose_best_sites", "parse_sweep_sites", "resolve_sweep_sites"]
