"""The benchmark's rows and what is read off them: intervals, accuracy at equal FLOPs, paired comparisons; the
files (``results.json``, ``results.csv``, ``matched_flops.csv``, ``site_sweep.csv``, ``pareto.png``) and the
console tables. Shared by the image and the multimodal-LLM benches.

Each measured row arrives with ``_correct`` (per test sample, 1 when the prediction is right, in the test
split's order), ``_times`` and ``_speedups``; :func:`summarize` turns ``_correct`` into the interval and the
tables, :func:`finalize_rows` the timings into medians and ratios.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from tokensift.bench.specs import UNPRUNED
from tokensift.bench.stats import (
    Bootstrap,
    CurvePoint,
    accuracy_at_flops,
    difference_of_replicates,
    percentile_interval,
)
from tokensift.io import write_text_atomic

FIELDS = (
    "method",
    "kind",
    "keep_ratio",
    "keep_count",
    "keep_count_sd",
    "num_patches",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "retention",
    "oracle_recall",
    "flops",
    "flops_backbone",
    "flops_scorer",
    "flops_ratio",
    "time_ms",
    "speedup",
    "peak_mem_bytes",
    "mem_ratio",
    "num_samples",
    "sites",
    "artifact",
    "threshold",
    "mean_exit_layer",
    "skip_layers",  # layer-skip methods (das): blocks replaced by adapters; keep_ratio is then empty
)
MATCHED_FIELDS = ("method", "kind", "flops_ratio", "accuracy", "accuracy_low", "accuracy_high", "between")
COMPARISON_FIELDS = (
    "learned",
    "baseline",
    "at",
    "value",
    "learned_accuracy",
    "baseline_accuracy",
    "difference",
    "difference_low",
    "difference_high",
    "p_not_above_zero",
)
MATCHED_FLOPS_NOTE = (
    "accuracy at each target FLOPs ratio, linear between the two budgets of the method's accuracy-vs-FLOPs-ratio "
    "curve that bracket it (intervals from the bootstrap replicates interpolated at the same draw); none outside "
    "the curve's range"
)
SWEEP_FIELDS = (
    "method",
    "site",
    "keep_ratio",
    "val_accuracy",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "oracle_recall",
    "flops_ratio",
    "best",
)


def _csv_text(rows: Sequence[Mapping], fields: Sequence[str] = FIELDS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {k: (" ".join(v) if isinstance(v, list) else ("" if v is None else v)) for k, v in row.items()}
        writer.writerow(flat)
    return buffer.getvalue()


def budget_label(row: Mapping) -> str:
    """``0.25`` for a keep ratio, ``t=0.5`` for an exit method's decision threshold, ``skip=2`` for a layer-skip
    method's skipped block count."""
    if row.get("threshold") is not None:
        return f"t={row['threshold']:g}"
    if row.get("skip_layers") is not None:
        return f"skip={row['skip_layers']}"
    return f"{row['keep_ratio']:g}"


def add_interval(row: dict, bootstrap: Bootstrap) -> dict:
    """``accuracy_low`` / ``accuracy_high`` (and the draws' ``_replicates``) from the row's ``_correct``."""
    replicates = bootstrap.replicates(row["_correct"])
    row["_replicates"] = replicates
    row["accuracy_low"], row["accuracy_high"] = percentile_interval(replicates, bootstrap.level)
    return row


def matched_flops(rows: Sequence[dict], targets: Sequence[float], level: float) -> list[dict]:
    """Every method (the unpruned model aside) at every target FLOPs ratio; ``accuracy`` is ``None`` where the
    method's budgets do not reach that ratio. Rows need ``_replicates`` (:func:`add_interval`)."""
    curves: dict[str, list[dict]] = {}
    for row in rows:
        if row["method"] != UNPRUNED and row.get("flops_ratio") is not None:
            curves.setdefault(row["method"], []).append(row)
    table = []
    for method, group in curves.items():
        points = [CurvePoint(r["flops_ratio"], r["accuracy"], r.get("_replicates"), budget_label(r)) for r in group]
        for target, found in zip(targets, accuracy_at_flops(points, targets, level), strict=True):
            entry = {"method": method, "kind": group[0]["kind"], "flops_ratio": float(target)}
            if found is None:
                entry.update(accuracy=None, accuracy_low=None, accuracy_high=None, between=None, _replicates=None)
            else:
                entry.update({k: found[k] for k in ("accuracy", "accuracy_low", "accuracy_high", "between")})
                entry["_replicates"] = found["_replicates"]
            table.append(entry)
    return table


def _comparison(learned: dict, baseline: dict, at: str, value: float, level: float) -> dict:
    difference = learned["accuracy"] - baseline["accuracy"]
    return {
        "learned": learned["method"],
        "baseline": baseline["method"],
        "at": at,
        "value": value,
        "learned_accuracy": learned["accuracy"],
        "baseline_accuracy": baseline["accuracy"],
        **difference_of_replicates(difference, learned["_replicates"] - baseline["_replicates"], level),
    }


def paired_comparisons(rows: Sequence[dict], matched: Sequence[dict], level: float) -> list[dict]:
    """Each learned method against the best training-free one (highest test accuracy there), paired draw by draw.

    At every keep ratio below 1 both ran (``at: keep_ratio``), and at every target FLOPs ratio both reach
    (``at: flops_ratio``, from the interpolated replicates). The baseline is picked on the test point estimate,
    which favours it, so an interval above zero is, if anything, conservative about the learned method.
    """
    out = []
    learned = [r for r in rows if r["kind"] == "learned" and r.get("threshold") is None]
    for row in learned:
        if row["keep_ratio"] is None or row["keep_ratio"] >= 1.0:
            continue
        rivals = [r for r in rows if r["kind"] == "training-free" and r.get("keep_ratio") == row["keep_ratio"]]
        if rivals:
            best = max(rivals, key=lambda r: r["accuracy"])
            out.append(_comparison(row, best, "keep_ratio", row["keep_ratio"], level))
    for entry in matched:
        if entry["kind"] != "learned" or entry["accuracy"] is None or entry["_replicates"] is None:
            continue
        rivals = [
            e
            for e in matched
            if e["kind"] == "training-free"
            and e["flops_ratio"] == entry["flops_ratio"]
            and e["accuracy"] is not None
            and e["_replicates"] is not None
        ]
        if rivals:
            best = max(rivals, key=lambda e: e["accuracy"])
            out.append(_comparison(entry, best, "flops_ratio", entry["flops_ratio"], level))
    return out


def summarize(rows: list[dict], bootstrap: Bootstrap, flops_ratios: Sequence[float]) -> dict:
    """Intervals on every row (in place) and the equal-cost and paired tables; call before :func:`finalize_rows`."""
    for row in rows:
        add_interval(row, bootstrap)
    matched = matched_flops(rows, flops_ratios, bootstrap.level)
    comparisons = paired_comparisons(rows, matched, bootstrap.level)
    return {"matched_flops": [_public(e, MATCHED_FIELDS) for e in matched], "comparisons": comparisons}


def _public(entry: Mapping, fields: Sequence[str]) -> dict:
    return {field: entry.get(field) for field in fields}


def finalize_rows(rows: list[dict]) -> list[dict]:
    """Turn the measured ``_times`` / ``_speedups`` into medians and add the ratios to ``rows[0]`` (unpruned);
    returns the rows with exactly the ``FIELDS`` columns."""
    base_acc, base_mem = rows[0]["accuracy"], rows[0]["peak_mem_bytes"]
    for row in rows:
        row["time_ms"] = statistics.median(row.pop("_times")) * 1e3
        row["speedup"] = statistics.median(row.pop("_speedups"))
        row["retention"] = row["accuracy"] / base_acc if base_acc > 0 else None
        mem = row["peak_mem_bytes"]
        row["mem_ratio"] = mem / base_mem if mem is not None and base_mem else None
    return [_public(row, FIELDS) for row in rows]


def write_results(
    out_dir: Path,
    rows: list[dict],
    metadata: dict,
    title: str,
    quiet: bool,
    summary: Mapping | None = None,
    site_sweep: Sequence[Mapping] | None = None,
) -> dict[str, Path]:
    """``results.json``, ``results.csv``, ``matched_flops.csv`` (with FLOPs targets), ``site_sweep.csv`` (with a
    sweep) and ``pareto.png``, each written under a temporary name, then renamed; unless ``quiet``, the tables
    on the console."""
    from tokensift.bench.plots import plot_pareto

    summary = dict(summary or {})
    matched = summary.get("matched_flops") or []
    payload = {"metadata": metadata, "rows": rows, **summary}
    if site_sweep is not None:
        payload["site_sweep"] = list(site_sweep)
    files = {
        "json": write_text_atomic(out_dir / "results.json", json.dumps(payload, indent=2) + "\n"),
        "csv": write_text_atomic(out_dir / "results.csv", _csv_text(rows)),
    }
    if matched:
        files["matched_flops"] = write_text_atomic(out_dir / "matched_flops.csv", _csv_text(matched, MATCHED_FIELDS))
    if site_sweep is not None:
        files["site_sweep"] = write_text_atomic(out_dir / "site_sweep.csv", _csv_text(site_sweep, SWEEP_FIELDS))
    files["pareto"] = plot_pareto(rows, out_dir / "pareto.png", title=title, matched=matched)
    if not quiet:
        print_report(rows, summary, site_sweep, title=f"tokensift bench · {title}")
    return files


# -- console --------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _fmt_interval(low: float | None, high: float | None, digits: int = 3) -> str:
    return "—" if low is None or high is None else f"{low:.{digits}f}–{high:.{digits}f}"


def _console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal and console.width < 120:
        console = Console(width=120)  # a pipe or a log file: do not squeeze the columns to 80
    return console


class RowProgress:
    """``tokensift bench``'s progress bar: one step per measured (method, budget) row and per site-sweep entry.

    A context manager around a bench; :meth:`start` gives the total once the rows are known (before that nothing
    shows), :meth:`advance` steps one finished row and names it. It draws on the console the tables print to and
    stays off with ``quiet`` and when that console is not a terminal: a log file or a pipe would collect every
    redraw. Transient, so the tables that follow stand alone.
    """

    def __init__(self, quiet: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = _console()
        self._progress = Progress(
            TextColumn("tokensift bench"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
            transient=True,
            disable=quiet or not console.is_terminal,
        )
        self._task = None

    def __enter__(self) -> RowProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._task is not None:
            self._progress.stop()

    def start(self, total: int) -> None:
        """Show the bar at 0 of ``total`` rows."""
        self._task = self._progress.add_task("", total=total)
        self._progress.start()

    def advance(self, row: Mapping) -> None:
        """One more row done: a measured row or a site-sweep entry (``method``, its ``site`` if any, budget)."""
        if self._task is None:
            raise RuntimeError("RowProgress.advance before start: start(total) once the rows are known.")
        site = f"@{row['site']}" if row.get("site") else ""
        self._progress.update(self._task, advance=1, description=f"{row['method']}{site} {budget_label(row)}")


def print_table(rows: Sequence[dict], title: str = "tokensift bench") -> None:
    from rich.table import Table

    table = Table(title=title)
    with_exits = any(row.get("mean_exit_layer") is not None for row in rows)
    columns = ["method", "budget", "acc", "acc 95% CI", "retention", "oracle_recall", "flops_ratio", "speedup"]
    for column in [*columns, "mem_ratio", *(["exit_layer"] if with_exits else [])]:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        cells = [
            row["method"],
            budget_label(row),
            _fmt(row["accuracy"], 4),
            _fmt_interval(row.get("accuracy_low"), row.get("accuracy_high")),
            _fmt(row["retention"]),
            _fmt(row["oracle_recall"]),
            _fmt(row["flops_ratio"]),
            _fmt(row["speedup"], 2, "×"),
            _fmt(row["mem_ratio"]),
        ]
        if with_exits:
            cells.append(_fmt(row.get("mean_exit_layer"), 2))
        table.add_row(*cells)
    _console().print(table)


def print_matched(matched: Sequence[Mapping]) -> None:
    """Methods × target FLOPs ratios: interpolated accuracy and its interval; ``—`` where a curve does not reach."""
    from rich.table import Table

    targets = sorted({e["flops_ratio"] for e in matched})
    table = Table(title="accuracy at equal FLOPs ratio (linear between budgets; 95% bootstrap interval)")
    table.add_column("method")
    for target in targets:
        table.add_column(f"flops {target:g}", justify="right")
    by_method: dict[str, dict[float, Mapping]] = {}
    for entry in matched:
        by_method.setdefault(entry["method"], {})[entry["flops_ratio"]] = entry
    for method, entries in by_method.items():
        cells = []
        for target in targets:
            entry = entries.get(target)
            if entry is None or entry["accuracy"] is None:
                cells.append("—")
            else:
                cells.append(
                    f"{entry['accuracy']:.3f} [{_fmt_interval(entry['accuracy_low'], entry['accuracy_high'], 2)}]"
                )
        table.add_row(method, *cells)
    _console().print(table)


def print_comparisons(comparisons: Sequence[Mapping]) -> None:
    from rich.table import Table

    table = Table(title="learned − best training-free, paired bootstrap over the same test samples")
    for column in ("learned", "baseline", "at", "learned acc", "baseline acc", "difference", "95% CI", "P(≤0)"):
        table.add_column(column, justify="left" if column in ("learned", "baseline", "at") else "right")
    for c in comparisons:
        table.add_row(
            c["learned"],
            c["baseline"],
            f"{'keep' if c['at'] == 'keep_ratio' else 'flops'} {c['value']:g}",
            _fmt(c["learned_accuracy"]),
            _fmt(c["baseline_accuracy"]),
            f"{c['difference']:+.3f}",
            f"{c['difference_low']:+.3f}–{c['difference_high']:+.3f}",
            _fmt(c["p_not_above_zero"]),
        )
    _console().print(table)


def print_site_sweep(sweep: Sequence[Mapping]) -> None:
    """One row per (method, keep ratio), one column per site: test accuracy (validation accuracy); ``*`` marks
    the site chosen on validation."""
    from rich.table import Table

    sites = sorted({e["site"] for e in sweep}, key=_site_order)
    table = Table(title="site sweep: test acc (val acc) per site; * = chosen on the validation split")
    table.add_column("method")
    table.add_column("keep", justify="right")
    for site in sites:
        table.add_column(site, justify="right")
    grouped: dict[tuple[str, float], dict[str, Mapping]] = {}
    for entry in sweep:
        grouped.setdefault((entry["method"], entry["keep_ratio"]), {})[entry["site"]] = entry
    for (method, ratio), entries in grouped.items():
        cells = []
        for site in sites:
            e = entries.get(site)
            if e is None:
                cells.append("—")
            else:
                cells.append(f"{'*' if e['best'] else ''}{e['accuracy']:.3f} ({e['val_accuracy']:.3f})")
        table.add_row(method, f"{ratio:g}", *cells)
    _console().print(table)


def _site_order(site: str) -> tuple:
    kind, _, index = site.partition(".")
    return (kind, int(index)) if index.isdigit() else (kind, -1)


def print_report(
    rows: Sequence[dict],
    summary: Mapping | None = None,
    site_sweep: Sequence[Mapping] | None = None,
    title: str = "tokensift bench",
) -> None:
    """The main table, then the equal-FLOPs table, the paired comparisons and the site sweep (those present)."""
    print_table(rows, title=title)
    summary = summary or {}
    if summary.get("matched_flops"):
        print_matched(summary["matched_flops"])
    if summary.get("comparisons"):
        print_comparisons(summary["comparisons"])
    if site_sweep:
        print_site_sweep(site_sweep)


__all__ = [
    "COMPARISON_FIELDS",
    "FIELDS",
    "MATCHED_FIELDS",
    "MATCHED_FLOPS_NOTE",
    "SWEEP_FIELDS",
    "RowProgress",
    "budget_label",
    "finalize_rows",
    "matched_flops",
    "paired_comparisons",
    "print_report",
    "print_table",
    "summarize",
    "write_results",
]
