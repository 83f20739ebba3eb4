"""Self-describing scorer artifacts: ``tokensift.json`` + ``scorer.safetensors`` + a model card.

Nothing is pickled: weights are safetensors, everything else JSON. A directory is written under a
temporary name and renamed into place, so a crash never leaves half an artifact behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from tokensift.io import atomic_directory
from tokensift.scorers.base import TokenMethod
from tokensift.scorers.registry import get_method_class

FORMAT = "tokensift-artifact"
FORMAT_VERSION = 1
MANIFEST = "tokensift.json"
WEIGHTS = "scorer.safetensors"
# fingerprint fields that decide whether a scorer can run on a model at all
STRUCTURAL_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size")


@dataclass
class Artifact:
    method: TokenMethod
    manifest: dict
    path: Path | None = None

    @property
    def default_budget(self) -> dict:
        return dict(self.manifest.get("default_budget") or {})


class FingerprintMismatch(ValueError):
    pass


def save_artifact(
    method: TokenMethod,
    fingerprint: dict,
    out_dir: str | os.PathLike,
    default_budget: dict | None = None,
    extra: dict | None = None,
    overwrite: bool = False,
    add_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``method`` (config + weights) as an artifact directory; returns its path.

    ``add_files(directory)`` writes further files (a LoRA adapter folder, a fine-tuned backbone) into the
    directory before it is renamed into place, so they appear with the rest or not at all.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"artifact directory {out} exists; pass overwrite=True (--overwrite) to replace it.")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method.name,
        "kind": method.kind,
        "config": dataclasses.asdict(method.config),
        "sites": list(method.config.sites or []),
        "default_budget": default_budget or {"keep_ratio": 0.5},
        "backbone": fingerprint,
        **(extra or {}),
    }
    with atomic_directory(out) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
        save_file(state, tmp / WEIGHTS, metadata={"format": FORMAT, "method": method.name})
        if add_files is not None:
            add_files(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(_model_card(manifest))
    return out


def load_artifact(path: str | os.PathLike) -> Artifact:
    path = Path(path)
    manifest_path, weights_path = path / MANIFEST, path / WEIGHTS
    for required in (manifest_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"{path} is not a tokensift artifact: {required.name} is missing "
                "(create one with `tokensift export CKPT OUT_DIR`)."
            )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}.")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses artifact format version {manifest['format_version']}; this tokensift reads up to "
            f"{FORMAT_VERSION}. Upgrade tokensift."
        )
    cls = get_method_class(manifest["method"])
    method = cls(cls.config_class.from_dict(manifest["config"]))
    method.load_state_dict(load_file(weights_path))
    method.eval()
    return Artifact(method=method, manifest=manifest, path=path)


def check_fingerprint(manifest: dict, fingerprint: dict, strict: bool = True) -> list[str]:
    """Raise if the model is structurally different; with ``strict`` also if its config or weights differ."""
    recorded = manifest.get("backbone", {})
    structural = [f for f in STRUCTURAL_FIELDS if f in recorded and recorded[f] != fingerprint.get(f)]
    soft = [f for f in ("config_hash", "weights_digest") if f in recorded and recorded[f] != fingerprint.get(f)]
    if structural:
        detail = ", ".join(f"{f}: artifact {recorded[f]!r} vs model {fingerprint.get(f)!r}" for f in structural)
        raise FingerprintMismatch(f"this artifact was trained on a different backbone ({detail}).")
    if soft and strict:
        detail = ", ".join(f"{f}: artifact {recorded[f]!r} vs model {fingerprint.get(f)!r}" for f in soft)
        raise FingerprintMismatch(
            f"the model differs from the artifact's backbone ({detail}); pass strict=False to apply it anyway."
        )
    return soft


def _model_card(manifest: dict) -> str:
    fp = manifest["backbone"]
    lines = [
        f"# tokensift artifact: {manifest['method']}",
        "",
        f"A {manifest['kind']} token scorer for a frozen `{fp.get('model_class')}` "
        f"({fp.get('model_type')}, hidden {fp.get('hidden_size')}, {fp.get('num_hidden_layers')} layers).",
        "",
        "```python",
        "import tokensift as ts",
        # the default budget's own knob: keep_ratio / keep_count, or an exit method's threshold
        f"handle = ts.apply(model, 'path/to/this/dir', {_budget_arguments(manifest['default_budget'])})",
        "```",
        "",
        f"- sites: {', '.join(manifest['sites'])}",
        f"- default budget: {manifest['default_budget']}",
    ]
    if manifest.get("adapter"):
        lines.append(f"- LoRA adapter (peft folder `{manifest['adapter']}/`): `ts.apply` loads it before the scorer")
    if manifest.get("backbone_weights"):
        lines.append(
            f"- the backbone was fine-tuned with the scorer: load it from `{manifest['backbone_weights']}/` "
            "(`from_pretrained`) and apply the scorer to that model"
        )
    if "trained_keep_ratio_range" in manifest:
        lines.append(f"- trained over keep ratios {manifest['trained_keep_ratio_range']}")
    for name, value in sorted((manifest.get("metrics") or {}).items()):
        lines.append(f"- {name}: {value}")
    return "\n".join(lines) + "\n"


def _budget_arguments(budget: dict) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in budget.items()) or "keep_ratio=0.5"
