"""Self-describing scorer artifacts: ``tokensift.json`` + ``scorer.safetensors`` + a model card.

Nothing is pickled: weights are safetensors, everything else JSON. The manifest is validated field by field
on write and on read (missing, unknown or mistyped fields, unknown methods, unsupported format versions are
refused with the field's name). A directory is written under a temporary name and swapped into place (the
old artifact renamed aside, deleted last), so a crash never leaves half an artifact behind, and only an
earlier artifact (a directory holding ``tokensift.json``) or an empty directory is ever replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tokensift.budget import Budget
from tokensift.export.card import CARD, bench_rows_for, card_license, check_license, model_card_text
from tokensift.export.hub import PICKLE_SUFFIXES, check_repo_id, resolve_artifact_dir, upload_folder
from tokensift.io import atomic_directory, check_replaceable, write_text_atomic
from tokensift.scorers.base import Method, is_skip_method
from tokensift.scorers.registry import get_method_class

FORMAT = "tokensift-artifact"
FORMAT_VERSION = 1
MANIFEST = "tokensift.json"
WEIGHTS = "scorer.safetensors"
# fingerprint fields that decide whether a scorer can run on a model at all
STRUCTURAL_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size")


@dataclass
class Artifact:
    method: Method
    manifest: dict
    path: Path | None = None

    @property
    def default_budget(self) -> dict:
        return dict(self.manifest.get("default_budget") or {})

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write this artifact to ``save_directory`` (the atomic writer :func:`save_artifact`); returns the path.

        The manifest's training record (steps, ranges, metrics) is kept; an adapter or fine-tuned backbone folder
        is copied from the directory the artifact was loaded from.
        """
        folders = [self.manifest[field] for field in ("adapter", "backbone_weights") if field in self.manifest]
        if folders and self.path is None:
            raise ValueError(
                f"this artifact names the folders {folders} but was not loaded from a directory; load it with "
                "Artifact.from_pretrained(path) so save_pretrained can copy them."
            )

        def copy_folders(directory: Path) -> None:
            for folder in folders:
                shutil.copytree(self.path / folder, directory / folder)

        extra = {k: v for k, v in self.manifest.items() if k not in _WRITER_FIELDS}
        return save_artifact(
            self.method,
            self.manifest["backbone"],
            save_directory,
            default_budget=self.default_budget,
            extra=extra,
            overwrite=overwrite,
            add_files=copy_folders if folders else None,
        )

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | os.PathLike,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
    ) -> Artifact:
        """An artifact from a local folder or a hub id ``org/name`` (:func:`from_pretrained`)."""
        return from_pretrained(id_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)

    def push_to_hub(
        self,
        repo_id: str,
        token: str | None = None,
        private: bool | None = None,
        commit_message: str = "Upload tokensift artifact",
    ):
        """Upload this artifact to the hub repo ``repo_id`` (see :func:`push_to_hub`)."""
        return push_to_hub(self, repo_id, token=token, private=private, commit_message=commit_message)


class FingerprintMismatch(ValueError):
    pass


class InvalidArtifact(ValueError):
    """An artifact directory whose manifest or weights are malformed; the message names the field or file."""


def save_artifact(
    method: Method,
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
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"artifact directory {out} exists; pass overwrite=True (--overwrite) to replace it.")
    check_replaceable(out, MANIFEST, "tokensift artifact")
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
    validate_manifest(manifest, "save_artifact")  # never write what load_artifact would refuse
    with atomic_directory(out, MANIFEST, "tokensift artifact") as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
        save_file(state, tmp / WEIGHTS, metadata={"format": FORMAT, "method": method.name})
        if add_files is not None:
            add_files(tmp)
        for folder in ("adapter", "backbone_weights"):
            if folder in manifest and not (tmp / manifest[folder]).is_dir():
                raise InvalidArtifact(
                    f"save_artifact: field {folder!r} names {manifest[folder]!r}, but add_files wrote no such folder."
                )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card_text(manifest))
    return out


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read an artifact directory: its manifest validated, its weights from safetensors (never pickle)."""
    path = Path(path)
    manifest_path, weights_path = path / MANIFEST, path / WEIGHTS
    for required in (manifest_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"{path} is not a tokensift artifact: {required.name} is missing "
                "(create one with `tokensift export CKPT OUT_DIR`)."
            )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidArtifact(f"{manifest_path} is not valid JSON ({error}); re-export the artifact.") from None
    validate_manifest(manifest, str(manifest_path))
    for folder in ("adapter", "backbone_weights"):
        if folder in manifest and not (path / manifest[folder]).is_dir():
            raise InvalidArtifact(
                f"{manifest_path}: field {folder!r} names the folder {manifest[folder]!r}, which is missing from "
                f"{path}; copy the whole artifact directory, or re-export it."
            )
    cls = get_method_class(manifest["method"])
    try:
        method = cls(cls.config_class.from_dict(manifest["config"]))
    except (TypeError, ValueError) as error:
        raise InvalidArtifact(f"{manifest_path}: field 'config' does not configure {cls.name}: {error}") from None
    method.load_state_dict(_read_weights(weights_path, manifest["method"], method))
    method.eval()
    return Artifact(method=method, manifest=manifest, path=path)


def _read_weights(weights_path: Path, name: str, method: Method) -> dict:
    fix = "re-export the artifact (`tokensift export CKPT OUT_DIR`) or copy the file again"
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise InvalidArtifact(f"{weights_path} is not a readable safetensors file ({error}); {fix}.") from None
    held = metadata.get("method")
    if held is not None and held != name:
        raise InvalidArtifact(
            f"{weights_path} holds {held} weights but the manifest's field 'method' says {name!r}; the files come "
            f"from different artifacts: {fix}."
        )
    expected = method.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:3]]
        raise InvalidArtifact(
            f"{weights_path} does not fit the {name} scorer its manifest's 'config' describes: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shapes {shapes}; {fix}."
        )
    return state


# -- manifest schema -------------------------------------------------------------------------------
_INT = (int,)
_NUMBER = (int, float)
# field -> (type, required)
_MANIFEST_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": ((str,), True),
    "format_version": (_INT, True),
    "method": ((str,), True),
    "kind": ((str,), True),
    "config": ((dict,), True),
    "sites": ((list,), True),
    "default_budget": ((dict,), True),
    "backbone": ((dict,), True),
    # written by `tokensift export` and the trainers' manifest_extra
    "source_checkpoint": ((str,), False),
    "global_step": (_INT, False),
    "trained_keep_ratio_range": ((list,), False),
    "adapter": ((str,), False),
    "backbone_weights": ((str,), False),
    "metrics": ((dict,), False),
    "trained_layers": ((list,), False),
    "exit_label_rule": ((dict,), False),
    "trained_skip_range": ((list,), False),  # layer-skip methods: the skip counts whose adapters were fine-tuned
    # the model card's training record: the hub id the backbone came from, the data module's class path
    "base_model": ((str,), False),
    "data_module": ((str,), False),
}
_BACKBONE_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "model_class": ((str,), True),
    "model_type": ((str,), True),
    "hidden_size": (_INT, True),
    "num_hidden_layers": (_INT, True),
    "num_attention_heads": (_INT, True),
    "config_hash": ((str,), True),
    "weights_digest": ((str,), True),
    "image_size": (_INT, False),
    "patch_size": (_INT, False),
    "fingerprint_version": (_INT, False),
    "weights_groups": ((dict,), False),
}
# what save_artifact writes itself; the rest of a manifest is its `extra`
_WRITER_FIELDS = ("format", "format_version", "method", "kind", "config", "sites", "default_budget", "backbone")
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object", list: "a list"}


def _check_fields(values: dict, schema: dict, where: str, prefix: str = "") -> None:
    for field, (types, required) in schema.items():
        if field not in values:
            if required:
                fix = (
                    "pass the backbone's full fingerprint (ts.backbones.adapt(model).fingerprint())"
                    if prefix == "backbone." and where == "save_artifact"
                    else "re-export the artifact"
                )
                raise InvalidArtifact(f"{where}: field '{prefix}{field}' is missing; {fix}.")
            continue
        value = values[field]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join(_TYPE_NAMES[t] for t in types)
            raise InvalidArtifact(
                f"{where}: field '{prefix}{field}' must be {wanted}, got {type(value).__name__} {value!r:.80}."
            )
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise InvalidArtifact(
            f"{where}: unknown field(s) {[prefix + k for k in unknown]}; the fields are {sorted(schema)}. Remove them "
            "(free-form results belong under 'metrics')."
        )


def validate_manifest(manifest: object, where: str = MANIFEST) -> None:
    """Raise :class:`InvalidArtifact` naming the first field of ``manifest`` that is missing, unknown or mistyped."""
    if not isinstance(manifest, dict):
        raise InvalidArtifact(f"{where} must hold a JSON object, got {type(manifest).__name__}.")
    if manifest.get("format") != FORMAT:
        raise InvalidArtifact(f"{where}: field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}.")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise InvalidArtifact(
            f"{where}: field 'format_version' is {version}; this tokensift reads artifact format versions 1 .. "
            f"{FORMAT_VERSION}. Upgrade tokensift."
        )
    _check_fields(manifest, _MANIFEST_FIELDS, where)
    if version < 1:
        raise InvalidArtifact(
            f"{where}: field 'format_version' is {version}; supported versions are 1 .. {FORMAT_VERSION}."
        )
    try:
        cls = get_method_class(manifest["method"])
    except ValueError as error:
        raise InvalidArtifact(f"{where}: field 'method': {error}") from None
    if manifest["kind"] != cls.kind:
        raise InvalidArtifact(f"{where}: field 'kind' is {manifest['kind']!r}, but {cls.name} is {cls.kind!r}.")
    sites = manifest["sites"]
    if not all(isinstance(site, str) for site in sites):
        raise InvalidArtifact(f"{where}: field 'sites' must be a list of site names (strings), got {sites!r:.80}.")
    configured = manifest["config"].get("sites")
    if configured is not None and list(configured) != sites:
        raise InvalidArtifact(f"{where}: field 'sites' {sites} differs from 'config.sites' {configured}.")
    _check_budget(manifest["default_budget"], cls, where)
    backbone = manifest["backbone"]
    _check_fields(backbone, _BACKBONE_FIELDS, where, prefix="backbone.")
    groups = backbone.get("weights_groups", {})
    if not all(isinstance(v, str) for v in groups.values()):
        raise InvalidArtifact(f"{where}: field 'backbone.weights_groups' must map names to digest strings.")
    for folder in ("adapter", "backbone_weights"):
        name = manifest.get(folder)
        if name is not None and (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name):
            raise InvalidArtifact(
                f"{where}: field {folder!r} is {name!r}; it must name a folder directly inside the artifact "
                "(no path separators, no '..')."
            )
    for field in ("trained_keep_ratio_range", "trained_layers", "trained_skip_range"):
        items = manifest.get(field, [])
        kinds = _NUMBER if field == "trained_keep_ratio_range" else _INT
        if not all(isinstance(v, kinds) and not isinstance(v, bool) for v in items):
            raise InvalidArtifact(f"{where}: field {field!r} must be a list of numbers, got {items!r:.80}.")


def _check_budget(budget: dict, cls: type[Method], where: str) -> None:
    knobs = sorted(budget)
    if is_skip_method(cls):  # a layer-skip method's budget is a count of layers, not of tokens
        count = budget.get("skip_layers")
        if knobs != ["skip_layers"] or isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidArtifact(
                f"{where}: field 'default_budget' is {budget!r}; a {cls.name} artifact's default budget is "
                "{'skip_layers': n}, n a whole number of layers >= 0."
            )
        return
    allowed = ["threshold"] if cls.decides_exits else ["keep_count", "keep_ratio"]
    if len(knobs) != 1 or knobs[0] not in allowed:
        raise InvalidArtifact(
            f"{where}: field 'default_budget' is {budget!r}; a {cls.name} artifact's default budget is one of "
            f"{allowed}, e.g. {{{allowed[-1]!r}: 0.5}}."
        )
    try:
        if cls.decides_exits:
            from tokensift.scorers.dyvte import check_threshold

            check_threshold(budget["threshold"], field="default_budget.threshold")
        else:
            Budget(**budget)
    except (TypeError, ValueError) as error:
        raise InvalidArtifact(f"{where}: field 'default_budget': {error}") from None


def check_fingerprint(manifest: dict, fingerprint: dict, strict: bool = True) -> list[str]:
    """Raise if the model is structurally different; with ``strict`` also if its config or weights differ.

    The weights digest covers every parameter of the backbone (names, shapes, dtypes and a fixed strided
    sample of each tensor); ``weights_groups`` splits it per block, so the message names the blocks that differ.
    """
    recorded = manifest.get("backbone", {})
    structural = [f for f in STRUCTURAL_FIELDS if f in recorded and recorded[f] != fingerprint.get(f)]
    soft = [f for f in ("config_hash", "weights_digest") if f in recorded and recorded[f] != fingerprint.get(f)]
    if structural:
        detail = ", ".join(f"{f}: artifact {recorded[f]!r} vs model {fingerprint.get(f)!r}" for f in structural)
        raise FingerprintMismatch(f"this artifact was trained on a different backbone ({detail}).")
    if soft and strict:
        detail = ", ".join(f"{f}: artifact {recorded[f]!r} vs model {fingerprint.get(f)!r}" for f in soft)
        recorded_version = recorded.get("fingerprint_version", 1)
        if "weights_digest" in soft and recorded_version != fingerprint.get("fingerprint_version", 1):
            detail += (
                f"; the artifact's fingerprint is version {recorded_version}, the model's "
                f"{fingerprint.get('fingerprint_version', 1)}, so the weights cannot be compared: re-export the "
                "artifact from a checkpoint this tokensift's `tokensift fit` wrote, or, if this is the backbone it "
                "was trained on"
            )
        elif "weights_digest" in soft:
            ours, theirs = recorded.get("weights_groups") or {}, fingerprint.get("weights_groups") or {}
            differing = sorted(g for g in set(ours) | set(theirs) if ours.get(g) != theirs.get(g))
            if differing:
                more = f" and {len(differing) - 6} more" if len(differing) > 6 else ""
                detail += f"; the weights differ in {', '.join(differing[:6])}{more}"
        raise FingerprintMismatch(
            f"the model differs from the artifact's backbone ({detail}); pass strict=False to apply it anyway."
        )
    return soft


# -- the Hub: tokensift.export.hub moves the directories, these functions check what they hold -------------------------
def from_pretrained(
    id_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Artifact:
    """An artifact from a local folder or a hub id (``tokensift.export.hub.resolve_artifact_dir``), validated, never
    unpickled."""
    folder = resolve_artifact_dir(id_or_path, revision, cache_dir, local_files_only)
    if not (folder / MANIFEST).is_file() and folder != Path(id_or_path):
        raise InvalidArtifact(
            f"hub repo {os.fspath(id_or_path)!r} (snapshot {folder}) has no {MANIFEST}: it is not a tokensift "
            "artifact. Push one with Artifact.push_to_hub, or give a folder `tokensift export` wrote."
        )
    return load_artifact(folder)


def push_to_hub(
    artifact: Artifact,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload tokensift artifact",
):
    """Create the model repo ``repo_id`` if needed and upload the artifact's folder; returns the ``CommitInfo``.

    An artifact held in memory only (no ``path``) is saved to a temporary folder first. A folder holding a pickle
    file is refused rather than filtered: leaving a file out would upload a different artifact than the one
    tested.
    """
    import tempfile

    check_repo_id(repo_id)  # before any work
    with tempfile.TemporaryDirectory(prefix="tokensift-push-") as scratch:
        folder = Path(
            artifact.path if artifact.path is not None else artifact.save_pretrained(Path(scratch) / "artifact")
        )
        load_artifact(folder)  # upload only what ts.load reads back
        pickled = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise InvalidArtifact(
                f"{folder} holds pickle files {pickled[:3]}; an artifact is safetensors and JSON only: re-export it "
                "(`tokensift export`) or remove them."
            )
        return upload_folder(folder, repo_id, token=token, private=private, commit_message=commit_message)


def write_model_card(
    artifact_dir: str | os.PathLike, bench_results: str | os.PathLike | None = None, license: str | None = None
) -> Path:
    """Rewrite ``artifact_dir``'s ``README.md`` from its manifest, with the rows of the ``tokensift bench``
    ``results.json`` at ``bench_results`` measured for this artifact; returns the card's path.

    Args:
        artifact_dir: the artifact directory (`tokensift export` wrote it); its README.md is replaced.
        bench_results: a `tokensift bench` results.json; its rows whose 'artifact' is this directory (and the
            unpruned row) become the card's benchmark table.
        license: the Hub license identifier of the scorer's weights (`apache-2.0`, `mit`, `other`, ...), in the
            card's metadata; without it the card keeps the license it had.
    """
    artifact = load_artifact(artifact_dir)
    card = Path(artifact_dir) / CARD
    license = card_license(card) if license is None else check_license(license)
    rows = None if bench_results is None else bench_rows_for(bench_results, artifact_dir)
    return write_text_atomic(card, model_card_text(artifact.manifest, rows, license))
