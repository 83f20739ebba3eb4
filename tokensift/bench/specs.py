"""Method specs of a benchmark run: what ``methods`` names (training-free, ``NAME:ARTIFACT_DIR``, the oracle)
and the keep ratios, validated before any expensive work."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import tokensift as ts
from tokensift.bench.oracle import OracleMethod
from tokensift.export.artifact import MANIFEST, Artifact
from tokensift.export.hub import looks_like_hub_id, resolve_artifact_dir
from tokensift.scorers import TokenMethod, build_method
from tokensift.scorers.base import is_skip_method

UNPRUNED = "unpruned"
ORACLE = "oracle"


@dataclass
class MethodSpec:
    """One ``methods`` entry: a registered training-free name, ``NAME:ARTIFACT_DIR``, or the oracle."""

    label: str  # the row's ``method`` field
    name: str
    kind: str  # "learned" | "training-free" | "oracle"
    entry: str
    artifact: Artifact | None = None

    def build(self) -> TokenMethod | Artifact:
        if self.kind == ORACLE:
            return OracleMethod()
        if self.artifact is not None:
            return self.artifact
        return build_method(self.name)


def _registered_names() -> dict[str, str]:
    return {name: info["kind"] for name, info in ts.methods().items()}


def _load_artifact_for(entry: str, name: str | None, path: Path) -> Artifact:
    if not (path / MANIFEST).is_file() and looks_like_hub_id(str(path)):
        try:  # a hub id: its snapshot in the local hub cache (or downloaded when online), as ts.apply resolves it
            path = resolve_artifact_dir(str(path))
        except (FileNotFoundError, ValueError) as error:
            raise FileNotFoundError(f"methods: {entry!r}: {error}") from None
    if not (path / MANIFEST).is_file():
        what = "does not exist" if not path.exists() else f"has no {MANIFEST}"
        raise FileNotFoundError(
            f"methods: the artifact {str(path)!r} in {entry!r} {what}; export one with "
            "`tokensift export CKPT OUT_DIR` and pass it as NAME:ARTIFACT_DIR."
        )
    artifact = ts.load(path)
    held = artifact.manifest.get("method")
    if name is not None and held != name:
        raise ValueError(
            f"methods: {entry!r} names {name!r} but {str(path)!r} holds a {held!r} scorer; write {held}:{path}."
        )
    return artifact


def parse_methods(methods: Sequence[str] | str) -> tuple[list[MethodSpec], bool]:
    """Validate ``methods`` (loading artifacts now); returns the specs and whether ``oracle`` was named."""
    if isinstance(methods, str):
        methods = methods.split(",")
    entries = [m.strip() for m in methods if m and m.strip()]
    known = _registered_names()
    free = sorted(n for n, k in known.items() if k == "training-free")
    learned = sorted(n for n, k in known.items() if k == "learned")
    specs: list[MethodSpec] = []
    oracle_requested = False
    for entry in entries:
        if entry in (UNPRUNED, ORACLE):
            oracle_requested |= entry == ORACLE
            continue  # always benchmarked (the oracle whenever batches carry an oracle_mask)
        name, sep, path = entry.partition(":")
        if sep:
            name, path = name.strip(), path.strip()
            if name not in known:
                raise ValueError(
                    f"methods: unknown method {name!r} in {entry!r}; learned scorers: {learned} "
                    "(give NAME:ARTIFACT_DIR)."
                )
            if not path:
                raise ValueError(f"methods: {entry!r} has no artifact path; write {name}:ARTIFACT_DIR.")
            artifact = _load_artifact_for(entry, name, Path(path))
            specs.append(MethodSpec(name, name, artifact.method.kind, entry, artifact))
        elif entry in known:
            if known[entry] == "learned":
                raise ValueError(
                    f"methods: {entry!r} is a learned scorer and needs its trained weights; "
                    f"write {entry}:ARTIFACT_DIR (an exported artifact directory)."
                )
            specs.append(MethodSpec(entry, entry, "training-free", entry))
        elif (Path(entry) / MANIFEST).is_file() or looks_like_hub_id(entry):
            artifact = _load_artifact_for(entry, None, Path(entry))
            name = artifact.manifest["method"]
            specs.append(MethodSpec(name, name, artifact.method.kind, entry, artifact))
        else:
            raise ValueError(
                f"methods: unknown method {entry!r}; training-free methods: {free}; learned scorers go as "
                f"NAME:ARTIFACT_DIR with NAME in {learned} (e.g. dynamicvit:runs/x/artifact)."
            )
    if not specs and not oracle_requested:
        raise ValueError(
            f"methods: nothing to benchmark; give comma-separated methods, e.g. random,l2norm or "
            f"dynamicvit:ARTIFACT_DIR (training-free: {free})."
        )
    seen: dict[str, int] = {}
    for spec in specs:
        seen[spec.label] = seen.get(spec.label, 0) + 1
    for spec in specs:
        if seen[spec.label] > 1 and spec.artifact is not None:
            # several artifacts of one method (e.g. seeds): name each row by its artifact folder
            # (the entry's last part, not the resolved folder's: a hub id's snapshot folder is a commit hash)
            spec.label = f"{spec.label}:{Path(spec.entry.partition(':')[2] or spec.entry).name}"
    tails = [s.label for s in specs]
    for spec in specs:
        if tails.count(spec.label) > 1:  # folders of the same name in different places
            spec.label = spec.entry
    labels = [s.label for s in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"methods: {duplicates} are listed more than once; list each method once.")
    return specs, oracle_requested


def skip_counts(artifact: Artifact, requested: list[int] | None = None) -> list[int]:
    """The skip counts a layer-skip artifact (das) is benched at, one row each: ``requested`` (``skip_layers``), else
    0 .. the highest it was fine-tuned for (``trained_skip_range``; its default budget's count at least). 0 runs every
    block, as keep ratio 1 does for a token method: the accuracy-vs-FLOPs curve then starts at the unpruned cost."""
    limit = len(artifact.method.candidate_layers)
    if requested is not None:
        too_many = [count for count in requested if count > limit]
        if too_many:
            raise ValueError(
                f"skip_layers: {too_many} exceed the {limit} layers the artifact {artifact.path} may skip "
                f"({artifact.method.candidate_layers}); give counts in 0 .. {limit}."
            )
        return list(requested)
    high = max(artifact.default_budget["skip_layers"], *artifact.manifest.get("trained_skip_range", [0]))
    return list(range(0, min(high, limit) + 1))


def bench_skip_spec(
    model, spec: MethodSpec, requested: list[int] | None, measure: Callable[[object], dict]
) -> list[dict]:
    """A layer-skip method (das) at each of its skip counts (:func:`skip_counts`): one row each, ``measure(handle)``
    with the count set, tagged with the artifact; no overlay column (every token stays)."""
    counts = skip_counts(spec.artifact, requested)
    handle = ts.apply(model, spec.build(), skip_layers=counts[0])
    rows = []
    try:
        for count in counts:
            handle.set_skip(count)
            row = measure(handle)
            row["artifact"] = str(spec.artifact.path)
            rows.append(row)
    finally:
        handle.remove()
    return rows


def rows_of_spec(spec: MethodSpec, budgets: Sequence, requested_skips: list[int] | None) -> int:
    """How many rows a bench measures for ``spec``: one per skip count for a layer-skip artifact
    (:func:`bench_skip_spec`), else one per budget (keep ratio, or threshold of an exit method)."""
    if spec.artifact is not None and is_skip_method(spec.artifact.method):
        return len(skip_counts(spec.artifact, requested_skips))
    return len(budgets)


def parse_skip_layers(skip_layers: Sequence[int] | str | None, specs: list[MethodSpec]) -> list[int] | None:
    """Skip counts for the layer-skip artifacts among ``specs`` (comma-separated or listed whole numbers >= 0,
    distinct, ascending), each checked against every such artifact; ``None``: each artifact's own
    (:func:`skip_counts`)."""
    if skip_layers is None:
        return None
    parts = [p.strip() for p in skip_layers.split(",") if p.strip()] if isinstance(skip_layers, str) else skip_layers
    counts = []
    for part in parts:
        if isinstance(part, bool) or not str(part).isdigit():
            raise ValueError(f"skip_layers: {part!r} is not a whole number of layers >= 0; give e.g. 0,1,2.")
        counts.append(int(part))
    if not counts:
        raise ValueError("skip_layers: give at least one skip count (e.g. 0,1,2), or leave it unset.")
    skipping = [spec for spec in specs if spec.artifact is not None and is_skip_method(spec.artifact.method)]
    if not skipping:
        raise ValueError(
            "skip_layers: the skip counts of layer-skip methods (das:ARTIFACT_DIR); methods names none, so leave "
            "skip_layers unset."
        )
    counts = sorted(set(counts))
    for spec in skipping:
        skip_counts(spec.artifact, counts)
    return counts


def parse_fractions(
    values: Sequence[float] | str,
    field: str,
    *,
    meaning: str,
    example: str,
    noun: str = "fractions",
    include_zero: bool = False,
    descending: bool = True,
) -> list[float]:
    """Comma-separated (or listed) numbers in (0, 1] (``include_zero``: [0, 1]), distinct and sorted, or a ValueError
    naming ``field``, the value, what such a number means and an ``example``."""
    parts = [p.strip() for p in values.split(",") if p.strip()] if isinstance(values, str) else list(values)
    interval = "[0, 1]" if include_zero else "(0, 1]"
    out = []
    for part in parts:
        try:
            value = float(part)
        except (TypeError, ValueError):
            raise ValueError(f"{field}: {part!r} is not a number; give {noun} such as {example}.") from None
        if math.isnan(value) or not (value >= 0.0 if include_zero else value > 0.0) or value > 1.0:
            raise ValueError(f"{field}: {value!r} is outside {interval}; {meaning}, e.g. {example}.")
        out.append(value)
    return sorted(set(out), reverse=descending)


def parse_keep_ratios(keep_ratios: Sequence[float] | str, field: str = "keep_ratios") -> list[float]:
    """Keep ratios in (0, 1], distinct, highest first; at least one."""
    meaning = "a keep ratio is the fraction of patch tokens kept (1 keeps all)"
    ratios = parse_fractions(keep_ratios, field, meaning=meaning, example="1,0.5,0.25,0.1")
    if not ratios:
        raise ValueError(f"{field}: give at least one keep ratio in (0, 1], e.g. 1,0.5,0.25,0.1.")
    return ratios


__all__ = [
    "ORACLE",
    "UNPRUNED",
    "MethodSpec",
    "bench_skip_spec",
    "parse_fractions",
    "parse_keep_ratios",
    "parse_methods",
    "parse_skip_layers",
    "rows_of_spec",
    "skip_counts",
]
