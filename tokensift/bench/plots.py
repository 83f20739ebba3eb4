"""The benchmark's figures: an accuracy/compute Pareto plot and kept-token overlays (matplotlib, Agg)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never open a window
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from tokensift.io import atomic_file

UNPRUNED = "unpruned"
ORACLE = "oracle"


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG under a temporary name, then rename it into place."""
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _method_style(method: str, kind: str, index: int) -> dict:
    if method == ORACLE:
        return {"color": "0.35", "linestyle": "--", "marker": "D", "linewidth": 1.5}
    color = plt.get_cmap("tab10")(index % 10)
    if method.endswith("@best_site"):  # a training-free method at its validation-chosen site (site sweep)
        return {"color": color, "linestyle": "-.", "marker": "^", "linewidth": 1.5}
    if kind == "learned":
        return {"color": color, "linestyle": "-", "marker": "o", "linewidth": 2.6}
    return {"color": color, "linestyle": "-", "marker": "s", "linewidth": 1.5}


def _budget(row: dict) -> float:
    """The row's budget: an exit method's decision threshold, else its keep ratio (both: 1 = unpruned); a layer-skip
    method's minus its skipped block count (fewer skipped: larger)."""
    if row.get("skip_layers") is not None:
        return -row["skip_layers"]
    return row["threshold"] if row.get("threshold") is not None else row["keep_ratio"]


def _budget_text(row: dict) -> str:
    if row.get("skip_layers") is not None:
        return f"skip={row['skip_layers']}"
    return f"t={row['threshold']:g}" if row.get("threshold") is not None else f"{row['keep_ratio']:g}"


def plot_pareto(rows: Sequence[dict], path: Path, title: str = "", matched: Sequence[dict] | None = None) -> Path:
    """Accuracy vs analytic FLOPs ratio (left) and vs measured wall-clock speedup (right), one line per method.

    Rows with ``accuracy_low`` / ``accuracy_high`` get their 95% interval as a vertical bar. ``matched`` (the
    bench's ``matched_flops`` entries) marks each method's interpolated accuracy at the target FLOPs ratios on
    the left panel: hollow markers with their interval, over dotted vertical lines at the targets.
    """
    matched_by_method: dict[str, list[dict]] = {}
    for entry in matched or []:
        if entry.get("accuracy") is not None:
            matched_by_method.setdefault(entry["method"], []).append(entry)
    unpruned = next((r for r in rows if r["method"] == UNPRUNED), None)
    methods: dict[str, list[dict]] = {}
    for row in rows:
        if row["method"] != UNPRUNED:
            methods.setdefault(row["method"], []).append(row)
    with_speed = any(r.get("speedup") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if with_speed else 1, figsize=(13 if with_speed else 7.5, 5.2), squeeze=False)
    panels = [("flops_ratio", "FLOPs ratio (analytic, incl. scorer; unpruned = 1)")]
    if with_speed:
        panels.append(("speedup", "wall-clock speedup vs unpruned (×, median)"))
    for ax, (field, xlabel) in zip(axes[0], panels, strict=True):
        for index, (name, group) in enumerate(methods.items()):
            # in budget order, so each line traces the method's keep-ratio sweep
            group = sorted(group, key=lambda r: -_budget(r))
            points = [(r[field], r["accuracy"], _budget_text(r)) for r in group if r.get(field) is not None]
            if not points:
                continue
            xs, ys, _ = zip(*points, strict=True)
            style = _method_style(name, group[0].get("kind", ""), index)
            ax.plot(xs, ys, label=f"{name} ({group[0].get('kind', '')})", markersize=6, alpha=0.9, **style)
            _interval_bars(ax, [r for r in group if r.get(field) is not None], field, style["color"])
            if field == "flops_ratio" and name in matched_by_method:
                marks = matched_by_method[name]
                ax.plot(
                    [e["flops_ratio"] for e in marks],
                    [e["accuracy"] for e in marks],
                    linestyle="none",
                    marker="o",
                    markersize=9,
                    markerfacecolor="none",
                    markeredgecolor=style["color"],
                    markeredgewidth=1.4,
                    zorder=4,
                )
                _interval_bars(ax, marks, "flops_ratio", style["color"], width=2.4)
            if field == "flops_ratio":
                for x, y, budget in points:
                    ax.annotate(
                        budget,
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=7,
                        color=style["color"],
                    )
        if unpruned is not None and unpruned.get(field) is not None:
            ax.plot(
                [unpruned[field]],
                [unpruned["accuracy"]],
                marker="*",
                markersize=18,
                color="gold",
                markeredgecolor="black",
                linestyle="none",
                label="unpruned",
                zorder=5,
            )
            ax.axhline(unpruned["accuracy"], color="0.6", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        if field == "flops_ratio":
            for target in sorted({e["flops_ratio"] for e in matched or []}):
                ax.axvline(target, color="0.75", linestyle=":", linewidth=0.9, zorder=0)
            ax.set_xlim(left=0)
            ax.set_title(
                "accuracy vs compute (labels: keep ratio; t= exit threshold)"
                + ("\nbars: 95% bootstrap interval · hollow: interpolated at equal FLOPs" if matched else "")
            )
        else:
            ax.set_title("accuracy vs measured speed")
        accuracies = [r["accuracy"] for r in rows]
        accuracies += [r[k] for r in rows for k in ("accuracy_low", "accuracy_high") if r.get(k) is not None]
        low, high = min(accuracies), max(accuracies)
        pad = max(0.02, 0.08 * (high - low))
        ax.set_ylim(max(0.0, low - pad), min(1.02, high + pad))
    handles, labels = axes[0][0].get_legend_handles_labels()
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    # hung below the figure (savefig's tight bounding box takes it in): however many rows it needs, it never
    # covers the axes' labels
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 5), frameon=False, bbox_to_anchor=(0.5, 0.0))
    return save_figure(fig, path)


def _interval_bars(ax, points: Sequence[dict], field: str, color, width: float = 1.0) -> None:
    """Vertical bars from ``accuracy_low`` to ``accuracy_high`` at each point's ``field``."""
    bars = [(p[field], p["accuracy_low"], p["accuracy_high"]) for p in points if p.get("accuracy_low") is not None]
    if bars:
        xs, lows, highs = zip(*bars, strict=True)
        ax.vlines(xs, lows, highs, colors=[color], linewidth=width, alpha=0.55, zorder=3)


def to_display(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``[C, H, W]`` float → an image imshow can draw (min-max scaled; grey when the channels agree)."""
    image = image.astype(np.float32)
    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    if image.shape[0] == 1 or np.allclose(image, image[:1]):
        return image[0], "gray"
    return np.transpose(image[:3], (1, 2, 0)), None


def per_pixel(per_patch: np.ndarray, grid: tuple[int, int], height: int, width: int) -> np.ndarray:
    """``[P]`` (or ``[rows, cols]``) values per patch → ``[height, width]``, each patch's value over its pixels."""
    cells = np.ones((height // grid[0], width // grid[1]), dtype=np.float32)
    return np.kron(np.asarray(per_patch, dtype=np.float32).reshape(grid), cells)


def plot_overlays(
    images: np.ndarray,
    labels: Sequence[int | str],
    oracle_masks: np.ndarray | None,
    columns: Sequence[dict],
    grid: tuple[int, int],
    path: Path,
    title: str = "",
    row_titles: Sequence[str] | None = None,
    outline: str = "box",
) -> Path:
    """A grid of images × methods; dropped patches are dimmed, the target's patches outlined.

    ``images`` is ``[R, C, H, W]``; ``oracle_masks`` ``[R, P]`` bool (or ``None``); each column is a dict with
    ``title``, ``kept`` (``[R, P]`` bool), ``preds`` (``[R]``, class ids or answer words) and optionally
    ``notes`` (``[R]`` strings added under the prediction); the first column shows the plain images with the
    unpruned model's ``preds``. ``row_titles`` (e.g. each VQA question) label the rows; ``outline`` is
    ``box`` (one box around all oracle patches: one target) or ``patches`` (each oracle patch: several
    digits a question needs).
    """
    if outline not in ("box", "patches"):
        raise ValueError(f"outline must be 'box' or 'patches', got {outline!r}")
    rows = images.shape[0]
    ncols = len(columns)
    fig, axes = plt.subplots(rows, ncols, figsize=(2.15 * ncols, 2.35 * rows), squeeze=False)
    height, width = images.shape[-2:]
    ph, pw = height / grid[0], width / grid[1]
    for r in range(rows):
        display, cmap = to_display(images[r])
        oracle = None if oracle_masks is None else oracle_masks[r].reshape(grid)
        for c, column in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(display, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            kept = column.get("kept")
            if kept is not None:
                dropped = ~kept[r].reshape(grid)
                shade = np.zeros((height, width, 4), dtype=np.float32)
                shade[..., :3] = (0.05, 0.1, 0.35)
                shade[..., 3] = per_pixel(dropped, grid, height, width) * 0.72
                ax.imshow(shade, interpolation="nearest")
            if oracle is not None and oracle.any():
                rr, cc = np.nonzero(oracle)
                if outline == "box":
                    boxes = [(cc.min(), rr.min(), cc.max() - cc.min() + 1, rr.max() - rr.min() + 1)]
                else:
                    boxes = [(c_, r_, 1, 1) for r_, c_ in zip(rr, cc, strict=True)]
                for left, top, box_w, box_h in boxes:
                    ax.add_patch(
                        Rectangle(
                            (left * pw - 0.5, top * ph - 0.5),
                            box_w * pw,
                            box_h * ph,
                            fill=False,
                            edgecolor="#ff3b30",
                            linewidth=1.6 if outline == "box" else 0.9,
                        )
                    )
            pred = column["preds"][r]
            correct = str(pred) == str(labels[r])
            note = f"pred {pred} {'✓' if correct else '✗'}"
            if kept is not None and oracle is not None and oracle.any():
                recall = float((kept[r].reshape(grid) & oracle).sum() / oracle.sum())
                note += f"  recall {recall:.2f}"
            if column.get("notes") is not None and column["notes"][r]:
                note += f"\n{column['notes'][r]}"
            ax.set_xlabel(note, fontsize=8, color="#1a7f37" if correct else "#c62828")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column["title"], fontsize=9)
            if c == 0:
                label = f"answer {labels[r]}" if row_titles is not None else f"label {labels[r]}"
                if row_titles is not None:
                    label = "\n".join(textwrap.wrap(row_titles[r], 26)) + f"\n→ {label}"
                ax.set_ylabel(label, fontsize=8 if row_titles is not None else 9)
    caption = (
        "blue tint: dropped patches (ToMe: merged away) · red box: the target's (oracle) patches"
        if outline == "box"
        else "blue tint: dropped visual tokens · red squares: the patches the question needs (oracle)"
    )
    fig.suptitle(f"{title}\n{caption}" if title else caption, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_head_maps(
    images: np.ndarray,
    labels: Sequence[int | str],
    head_maps: dict[str, np.ndarray],
    grid: tuple[int, int],
    path: Path,
    title: str = "",
) -> Path:
    """A grid of images × (site, head): each head's keep probability over the patches (``ia_red2``'s interpretation).

    ``images`` is ``[R, C, H, W]``; ``head_maps`` maps each site to ``[R, heads, P]`` probabilities in ``[0, 1]`` over
    the original patch grid (0 for patches dropped before the site); the first column shows the plain images.
    """
    rows = images.shape[0]
    panels = [(site, head) for site, maps in head_maps.items() for head in range(maps.shape[1])]
    fig, axes = plt.subplots(rows, 1 + len(panels), figsize=(1.7 * (1 + len(panels)), 1.85 * rows), squeeze=False)
    height, width = images.shape[-2:]
    shown = None
    for r in range(rows):
        display, cmap = to_display(images[r])
        axes[r][0].imshow(display, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        axes[r][0].set_ylabel(f"label {labels[r]}", fontsize=9)
        for c, (site, head) in enumerate(panels, start=1):
            ax = axes[r][c]
            grey = display if display.ndim == 2 else display.mean(-1)
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            keep = per_pixel(head_maps[site][r, head], grid, height, width)
            shown = ax.imshow(keep, cmap="magma", vmin=0, vmax=1, alpha=0.75, interpolation="nearest")
            if r == 0:
                ax.set_title(f"{site} · head {head}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("image", fontsize=8)
    if shown is not None:
        fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6, label="keep probability")
    caption = "each interpreter head's keep probability per patch (0: dropped at an earlier site)"
    fig.suptitle(f"{title}\n{caption}" if title else caption, fontsize=10)
    return save_figure(fig, path)


__all__ = ["plot_head_maps", "plot_overlays", "plot_pareto", "save_figure"]
