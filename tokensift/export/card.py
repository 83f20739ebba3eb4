"""The artifact's model card (``README.md``) in the Hub's card format: YAML metadata, then a Markdown body.

The metadata (``huggingface_hub.ModelCardData``) is what the Hub indexes: ``library_name: tokensift``, tags
naming the method and its kind, ``base_model`` when the backbone was a hub id. The body records what a user
needs to trust the scorer: the backbone's fingerprint, the method's config, the budgets it was trained for,
the training data and steps, and, when given, the ``tokensift bench`` rows measured for this artifact.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

CARD = "README.md"
# the fingerprint's per-block digests are long and only matter to the mismatch message, not to a reader
_FINGERPRINT_HIDDEN = ("weights_groups",)


_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]*")


def check_license(license: str) -> str:
    """A Hub license identifier: lower-case letters, digits, ``.``, ``-``, ``+`` (``apache-2.0``, ``cc-by-4.0``)."""
    if not isinstance(license, str) or not _LICENSE.fullmatch(license):
        raise ValueError(
            f"license={license!r} is not a Hub license identifier: give a lower-case one such as 'apache-2.0', "
            "'mit' or 'cc-by-4.0' (https://huggingface.co/docs/hub/repositories-licenses), or 'other'"
        )
    return license


def card_license(card_path: str | os.PathLike) -> str | None:
    """The license in an existing card's metadata, so rewriting the card keeps it."""
    path = Path(card_path)
    return ModelCard.load(path).data.license if path.is_file() else None


def model_card_text(
    manifest: Mapping, bench_rows: Sequence[Mapping] | None = None, license: str | None = None
) -> str:
    """The card of the artifact described by ``manifest``, with a table of ``bench_rows`` and the Hub ``license``
    identifier (``apache-2.0``, ``mit``, ``other``, ...) when given."""
    if license is not None:
        check_license(license)
    fp = manifest["backbone"]
    skips = "skip_layers" in manifest["default_budget"]
    what = "layer-skip method (whole blocks replaced by adapters)" if skips else "token scorer"
    data = ModelCardData(
        library_name="tokensift",
        tags=["tokensift", "token-pruning", manifest["method"], manifest["kind"]],
        base_model=manifest.get("base_model"),
        license=license,
    )
    lines = [
        f"# tokensift artifact: {manifest['method']}",
        "",
        f"A {manifest['kind']} {what} for a frozen `{fp.get('model_class')}` "
        f"({fp.get('model_type')}, hidden {fp.get('hidden_size')}, {fp.get('num_hidden_layers')} layers).",
        "",
        "```python",
        "import tokensift as ts",
        # the default budget's own knob: keep_ratio / keep_count, or an exit method's threshold
        f"handle = ts.apply(model, 'path/to/this/dir', {_budget_arguments(manifest['default_budget'])})",
        "# or the hub id of the repo holding this card, 'org/name', once downloaded into the hub cache",
        "```",
        "",
        f"- candidate layers: {manifest['config'].get('candidate_layers')}"
        if skips
        else f"- sites: {', '.join(manifest['sites'])}",
        f"- default budget: {manifest['default_budget']}",
    ]
    if manifest.get("base_model"):
        lines.append(f"- base model: `{manifest['base_model']}`")
    if manifest.get("adapter"):
        lines.append(f"- LoRA adapter (peft folder `{manifest['adapter']}/`): `ts.apply` loads it before the scorer")
    if manifest.get("backbone_weights"):
        lines.append(
            f"- the backbone was fine-tuned with the scorer: load it from `{manifest['backbone_weights']}/` "
            "(`from_pretrained`) and apply the scorer to that model"
        )
    if "trained_keep_ratio_range" in manifest:
        lines.append(f"- trained over keep ratios {manifest['trained_keep_ratio_range']}")
    if "trained_skip_range" in manifest:
        lines.append(f"- adapters fine-tuned for skip_layers {manifest['trained_skip_range']}")
    if "data_module" in manifest:
        lines.append(f"- training data: `{manifest['data_module']}`")
    if "global_step" in manifest:
        lines.append(f"- training steps: {manifest['global_step']}")
    for name, value in sorted((manifest.get("metrics") or {}).items()):
        lines.append(f"- {name}: {value}")
    shown = {k: v for k, v in fp.items() if k not in _FINGERPRINT_HIDDEN}
    lines += [
        "",
        "## Base model fingerprint",
        "",
        "`ts.apply` refuses a backbone whose structure differs, and (unless `strict=False`) one whose config or "
        "weights digest differs.",
        "",
        "```json",
        json.dumps(shown, indent=2, sort_keys=True),
        "```",
        "",
        f"## Method config ({manifest['method']})",
        "",
        "```json",
        json.dumps(manifest["config"], indent=2, sort_keys=True),
        "```",
    ]
    if bench_rows:
        lines += ["", "## Benchmark (`tokensift bench`)", "", *_bench_table(bench_rows)]
    card = ModelCard.from_template(
        data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n", body="\n".join(lines)
    )
    return str(card).rstrip("\n") + "\n"


def bench_rows_for(results_path: str | os.PathLike, artifact_dir: str | os.PathLike) -> list[dict]:
    """The rows of a ``tokensift bench`` ``results.json`` measured with the artifact at ``artifact_dir``, plus the
    unpruned row they are relative to.

    A row belongs to the artifact when its ``artifact`` field names the same folder, read relative to the current
    directory (where bench ran) or to the results file's folder.
    """
    results_path = Path(results_path)
    try:
        payload = json.loads(results_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"bench results {results_path} cannot be read ({error}); give the results.json that "
            "`tokensift bench` wrote."
        ) from None
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if not isinstance(rows, list):
        raise ValueError(
            f"bench results {results_path} has no 'rows' list; give the results.json of `tokensift bench`."
        )
    target = Path(artifact_dir).resolve()

    def same_folder(folder: object) -> bool:
        if not isinstance(folder, str):
            return False
        return any((base / folder).resolve() == target for base in (Path.cwd(), results_path.parent))

    mine = [dict(row) for row in rows if same_folder(row.get("artifact"))]
    if not mine:
        labels = sorted({str(row.get("artifact")) for row in rows if row.get("artifact")})
        raise ValueError(
            f"no row of {results_path} was measured with the artifact {artifact_dir} (its rows' 'artifact' fields: "
            f"{labels or 'none'}); run `tokensift bench` with this artifact, or give its results.json."
        )
    unpruned = [dict(row) for row in rows if row.get("kind") == "none"]
    return unpruned[:1] + mine


def _bench_table(rows: Sequence[Mapping]) -> list[str]:
    header = "| method | budget | accuracy (interval) | retention | FLOPs ratio | speedup | samples |"
    out = [header, "|---|---|---|---|---|---|---|"]
    for row in rows:
        interval = (
            f" [{row['accuracy_low']:.4f}, {row['accuracy_high']:.4f}]"
            if row.get("accuracy_low") is not None and row.get("accuracy_high") is not None
            else ""
        )
        out.append(
            f"| {row.get('method')} | {_budget_label(row)} | {_number(row.get('accuracy'))}{interval} | "
            f"{_number(row.get('retention'))} | {_number(row.get('flops_ratio'))} | {_number(row.get('speedup'), 2)}x"
            f" | {row.get('num_samples', '')} |"
        )
    out += [
        "",
        "Retention is accuracy over the unpruned model's; the interval is the bench's bootstrap percentile interval.",
    ]
    return out


def _budget_label(row: Mapping) -> str:
    for knob in ("threshold", "skip_layers", "keep_ratio", "keep_count"):
        if row.get(knob) is not None:
            return f"{knob}={row[knob]:g}"
    return ""


def _number(value: object, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _budget_arguments(budget: dict) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in budget.items()) or "keep_ratio=0.5"
