"""One learned method trained with several seeds, reported as one row: mean ± spread over the training runs.

A bench row's bootstrap interval says how sure the accuracy is on *this* test set for *this* trained scorer;
it says nothing about how much another training run would move it. ``summarize_seeds`` folds the rows of the
runs of one method (benched side by side, each ``NAME:ARTIFACT``) into one row per budget, with the mean, the
sample standard deviation and the range over seeds, next to the training-free rows and their intervals, and
counts at each budget how many seeds beat the best training-free method with a paired interval above zero.
A layer-skip method's rows (``skip_layers``, no keep ratio) fold per skip count. Artifacts of one method trained
with different method configs are different methods, not seeds: they fold separately.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path


def _spread(values: Sequence[float]) -> dict:
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize_seeds(result: Mapping, groups: Mapping[str, Sequence[str]]) -> dict:
    """Fold ``result`` (what :func:`tokensift.bench.run_bench` returns) over the seeds of each learned method.

    Args:
        result: ``run_bench``'s return value (``rows``, ``matched_flops``, ``comparisons``).
        groups: a learned method's display name → the row labels of its seeded runs (``rows[i]["method"]``).

    Returns:
        ``{"budgets": [...], "skips": [...], "matched_flops": [...], "wins": [...]}``: per (method, keep ratio), per
        (method, skip count) of layer-skip methods and per (method, FLOPs target) either a seeded spread
        (``seeds``) or a single run's interval; ``wins``: per learned
        method and comparison point, how many seeds are above the best training-free method with a 95% paired
        interval above zero, and the mean difference.
    """
    label_of = {label: name for name, labels in groups.items() for label in labels}
    missing = sorted({label for labels in groups.values() for label in labels} - {r["method"] for r in result["rows"]})
    if missing:
        raise ValueError(f"groups: no bench rows for {missing}; the labels must be rows[i]['method'] of the bench.")

    def fold(entries: Sequence[Mapping], key: str) -> list[dict]:
        out, seeded = [], {}
        for entry in entries:
            name = label_of.get(entry["method"])
            if name is None:
                out.append(dict(entry) | {key: round(entry[key], 6)})
            else:  # targets parsed from text (0.7 vs 0.7000000000000001) are one column
                seeded.setdefault((name, round(entry[key], 6)), []).append(entry)
        for (name, at), runs in seeded.items():
            row = {"method": name, "kind": runs[0]["kind"], key: at, "seeds": len(runs)}
            for field in {"accuracy", "oracle_recall", "flops_ratio", "speedup"} - {key}:
                values = [r[field] for r in runs if r.get(field) is not None]
                if values and field in runs[0]:
                    row[field] = _spread(values) if field == "accuracy" else statistics.fmean(values)
            out.append(row)
        return out

    budgets = fold([r for r in result["rows"] if r.get("keep_ratio") is not None], "keep_ratio")
    skips = fold([r for r in result["rows"] if r.get("skip_layers") is not None], "skip_layers")
    matched = fold([m for m in result.get("matched_flops") or [] if m.get("accuracy") is not None], "flops_ratio")
    wins = {}
    for comparison in result.get("comparisons") or []:
        name = label_of.get(comparison["learned"])
        if name is None:
            continue
        entry = wins.setdefault((name, comparison["at"], round(comparison["value"], 6)), [])
        entry.append(comparison)
    win_rows = [
        {
            "method": name,
            "at": at,
            "value": value,
            "seeds": len(runs),
            "seeds_above": sum(1 for c in runs if c["difference_low"] > 0),
            "seeds_below": sum(1 for c in runs if c["difference_high"] < 0),
            "mean_difference": statistics.fmean(c["difference"] for c in runs),
            "baselines": sorted({c["baseline"] for c in runs}),
        }
        for (name, at, value), runs in wins.items()
    ]
    return {"budgets": budgets, "skips": skips, "matched_flops": matched, "wins": win_rows}


def _accuracy_text(entry: Mapping) -> str:
    accuracy = entry.get("accuracy")
    if isinstance(accuracy, Mapping):
        return f"{accuracy['mean']:.3f} ± {accuracy['std']:.3f} ({accuracy['n']} seeds)"
    if accuracy is None:
        return "—"
    low, high = entry.get("accuracy_low"), entry.get("accuracy_high")
    return f"{accuracy:.3f} [{low:.3f}, {high:.3f}]" if low is not None and high is not None else f"{accuracy:.3f}"


def markdown_tables(summary: Mapping) -> str:
    """The summary as Markdown tables (what README's demo tables are pasted from)."""
    budgets = summary["budgets"]
    ratios = sorted({e["keep_ratio"] for e in budgets if e["keep_ratio"] < 1.0}, reverse=True)
    methods = list(dict.fromkeys(e["method"] for e in budgets))
    by = {(e["method"], e["keep_ratio"]): e for e in budgets}
    lines = [
        "| method | "
        + " | ".join(f"keep {r:g}" for r in ratios)
        + " | oracle recall / FLOPs ratio @"
        + (f"{ratios[len(ratios) // 2]:g}" if ratios else "—")
        + " |",
        "|---|" + "---|" * (len(ratios) + 1),
    ]
    middle = ratios[len(ratios) // 2] if ratios else None
    for method in methods:
        if (method, 1.0) in by and not any((method, r) in by for r in ratios):  # the unpruned model: every budget
            cells = [_accuracy_text(by[(method, 1.0)])] * len(ratios)
        else:
            cells = [_accuracy_text(by[(method, r)]) if (method, r) in by else "—" for r in ratios]
        mid = by.get((method, middle), by.get((method, 1.0)))
        tail = "—"
        if mid is not None and mid.get("flops_ratio") is not None:
            recall = mid.get("oracle_recall")
            tail = f"{recall:.3f} / {mid['flops_ratio']:.3f}" if recall is not None else f"— / {mid['flops_ratio']:.3f}"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {tail} |")
    skips = summary.get("skips") or []
    if skips:
        lines += ["", "| method | skip_layers | accuracy | FLOPs ratio |", "|---|---|---|---|"]
        for entry in skips:
            flops = entry.get("flops_ratio")
            flops_text = "—" if flops is None else f"{flops:.3f}"
            lines.append(f"| {entry['method']} | {entry['skip_layers']} | {_accuracy_text(entry)} | {flops_text} |")
    matched = summary["matched_flops"]
    if matched:
        targets = sorted({e["flops_ratio"] for e in matched})
        at = {(e["method"], e["flops_ratio"]): e for e in matched}
        lines += [
            "",
            "| method | " + " | ".join(f"FLOPs {t:g}" for t in targets) + " |",
            "|---|" + "---|" * len(targets),
        ]
        for method in dict.fromkeys(e["method"] for e in matched):
            lines.append(
                f"| {method} | "
                + " | ".join(_accuracy_text(at[(method, t)]) if (method, t) in at else "—" for t in targets)
                + " |"
            )
    wins = summary["wins"]
    if wins:
        header = (
            "| learned | at | best training-free there | mean difference | seeds above (95% paired) | seeds below |"
        )
        lines += ["", header, "|---|---|---|---|---|---|"]
        for w in wins:
            at = "keep" if w["at"] == "keep_ratio" else "FLOPs"
            lines.append(
                f"| {w['method']} | {at} {w['value']:g} | {', '.join(w['baselines'])} | {w['mean_difference']:+.3f} | "
                f"{w['seeds_above']}/{w['seeds']} | {w['seeds_below']}/{w['seeds']} |"
            )
    return "\n".join(lines)


def _artifact_config(row: Mapping) -> dict | None:
    """The method config in the manifest of the row's artifact (``None``: no artifact folder on the row)."""
    from tokensift.export.artifact import MANIFEST

    folder = row.get("artifact")
    if not folder or not (Path(folder) / MANIFEST).is_file():
        return None
    return json.loads((Path(folder) / MANIFEST).read_text()).get("config")


def seed_groups(result: Mapping) -> dict[str, list[str]]:
    """The learned methods benched with several artifacts of one method config (each row labelled ``NAME:FOLDER``,
    e.g. one per training seed): ``"NAME (learned)"`` → their row labels, in bench order. Artifacts of one name
    whose configs differ group per config, named by the fields that differ (``"das (learned, skip_layers=2)"``);
    a config with one artifact is not a group. Rows without an ``artifact`` folder group by name alone."""
    by_name: dict[str, dict[str, dict | None]] = {}
    for row in result["rows"]:
        if row.get("kind") == "learned":
            by_name.setdefault(row["method"].split(":")[0], {}).setdefault(row["method"], _artifact_config(row))
    groups = {}
    for name, configs in by_name.items():
        variants: dict[str, list[str]] = {}
        for label, config in configs.items():
            variants.setdefault(json.dumps(config, sort_keys=True), []).append(label)
        keys = [json.loads(key) or {} for key in variants]
        differing = sorted(
            {field for config in keys for field in config if len({json.dumps(c.get(field)) for c in keys}) > 1}
        )
        for config, labels in zip(keys, variants.values(), strict=True):
            if len(labels) > 1:
                detail = "".join(f", {field}={config.get(field)}" for field in differing)
                groups[f"{name} (learned{detail})"] = labels
    return groups


def fold_seeds(result: dict, out_dir: Path, quiet: bool) -> dict:
    """``result`` with its seeded learned methods folded (``result["seeds"]``, :func:`summarize_seeds` over
    :func:`seed_groups`), written as ``summary.md`` / ``summary.json`` next to the bench's files and printed unless
    ``quiet``; unchanged when no method has several artifacts."""
    from tokensift.io import write_text_atomic

    groups = seed_groups(result)
    if not groups:
        for stale in ("summary.md", "summary.json"):  # an earlier run's summary would read as this run's
            (out_dir / stale).unlink(missing_ok=True)
        return result
    summary = summarize_seeds(result, groups)
    tables = markdown_tables(summary)
    files = result.setdefault("files", {})
    files["summary_md"] = str(write_text_atomic(out_dir / "summary.md", tables + "\n"))
    files["summary_json"] = str(write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n"))
    if not quiet:
        print(f"\nseeds folded ({', '.join(f'{n}: {len(v)}' for n, v in groups.items())}):\n\n{tables}")
    return result | {"seeds": summary}
