"""Artifacts as Hugging Face Hub repos, offline: a hub cache laid out as huggingface_hub writes it (blobs,
snapshot symlinks, ``refs/main``) is read by ``ts.load`` / ``ts.apply`` with ``"org/name"``; ``push_to_hub`` uploads
the artifact folder through ``HfApi`` (patched: nothing leaves the machine); the model card parses as a Hub card.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import ClassVar

import huggingface_hub
import pytest
import torch
from conftest import build_tiny, make_pixel_values
from huggingface_hub import ModelCard

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.cli import main
from tokensift.export import Artifact, InvalidArtifact, save_artifact
from tokensift.export.artifact import write_model_card
from tokensift.export.card import bench_rows_for
from tokensift.export.checkpoint import export
from tokensift.export.hub import looks_like_hub_id
from tokensift.scorers.dynamicvit import DynamicViTMethod

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline: huggingface_hub reads both settings at import, so patch its constants too."""
    cache = tmp_path / "hub_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def tiny_artifact(directory: Path, seed: int = 0, **extra) -> tuple[torch.nn.Module, Path]:
    model = build_tiny("vit")
    torch.manual_seed(seed)
    method = DynamicViTMethod.for_backbone(adapt(model))
    for parameter in method.parameters():  # away from the init, so a scorer that was not loaded would show
        parameter.data.normal_(generator=torch.Generator().manual_seed(seed))
    fields = {"global_step": 120, "trained_keep_ratio_range": [0.25, 0.75]} | extra
    save_artifact(method, adapt(model).fingerprint(), directory, default_budget={"keep_ratio": 0.5}, extra=fields)
    return model, directory


def cache_repo(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """``folder`` as the cached snapshot ``commit`` of ``repo_id`` (main): content-addressed blobs, the snapshot's
    relative symlinks into them, and ``refs/main`` naming the commit, as ``snapshot_download`` leaves a cache."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for source in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = source.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / source.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("..", *[".."] * len(source.relative_to(folder).parts[:-1]), "..", "blobs", blob.name))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def pruned_logits(model, artifact, **budget) -> torch.Tensor:
    pixel_values = make_pixel_values()
    with torch.no_grad(), ts.apply(model, artifact, **budget):
        return model(pixel_values=pixel_values).logits


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    model, local = tiny_artifact(tmp_path / "artifact")
    artifact = Artifact.from_pretrained(local)
    copy = artifact.save_pretrained(tmp_path / "copy")
    again = Artifact.from_pretrained(copy)
    assert again.manifest == artifact.manifest  # the training record (steps, ranges) survives
    state, state_again = artifact.method.state_dict(), again.method.state_dict()
    assert state.keys() == state_again.keys() and all(torch.equal(state[k], state_again[k]) for k in state)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        artifact.save_pretrained(copy)
    assert torch.equal(pruned_logits(model, again), pruned_logits(model, local))


def test_hub_id_resolves_from_the_cache(tmp_path, offline_hub, monkeypatch):
    model, local = tiny_artifact(tmp_path / "artifact")
    snapshot = cache_repo(offline_hub, "my-org/tiny-dynamicvit", local)
    scanned = huggingface_hub.scan_cache_dir(offline_hub)  # the library itself recognises the hand-made layout
    assert [(r.repo_id, [rev.commit_hash for rev in r.revisions]) for r in scanned.repos] == [
        ("my-org/tiny-dynamicvit", [COMMIT])
    ]
    monkeypatch.chdir(tmp_path)  # no local folder named like the id
    loaded = ts.load("my-org/tiny-dynamicvit")
    assert loaded.path == snapshot and loaded.manifest == ts.load(local).manifest
    assert ts.load("my-org/tiny-dynamicvit", cache_dir=offline_hub, local_files_only=True).path == snapshot
    expected = pruned_logits(model, local)
    assert torch.equal(pruned_logits(model, "my-org/tiny-dynamicvit"), expected)
    assert torch.equal(pruned_logits(model, "dynamicvit:my-org/tiny-dynamicvit"), expected)
    # a different budget must change the output, so the equality above is not a budget that ignores the scorer
    assert not torch.equal(pruned_logits(model, "my-org/tiny-dynamicvit", keep_ratio=0.25), expected)


def test_a_local_folder_wins_over_a_hub_id(tmp_path, offline_hub, monkeypatch):
    model, hub_copy = tiny_artifact(tmp_path / "hub_copy", seed=1)
    cache_repo(offline_hub, "org/name", hub_copy)
    monkeypatch.chdir(tmp_path)
    tiny_artifact(tmp_path / "org" / "name", seed=2)
    local = ts.load("org/name")
    assert local.path == Path("org/name")
    assert not torch.equal(pruned_logits(model, "org/name"), pruned_logits(model, hub_copy))


def test_missing_and_foreign_repos_error_clearly(tmp_path, offline_hub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = build_tiny("vit")
    with pytest.raises(FileNotFoundError, match=r"'org/absent'.*not in the cache.*huggingface-cli download org/absent"):
        ts.load("org/absent")
    with pytest.raises(FileNotFoundError, match=r"not in the cache.*local artifact folder"):
        ts.apply(model, "org/absent", keep_ratio=0.5)
    with pytest.raises(FileNotFoundError, match=r"'org/absent'.*repo at revision 'v2' is not in the cache .*hub_cache"):
        ts.load("org/absent", revision="v2")
    with pytest.raises(FileNotFoundError, match=r"does not exist as a local directory and is not a hub repo id"):
        ts.load(tmp_path / "no" / "such" / "artifact")
    other = tmp_path / "not_an_artifact"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"")
    cache_repo(offline_hub, "org/plain-model", other)
    with pytest.raises(InvalidArtifact, match=r"'org/plain-model'.*has no tokensift\.json"):
        ts.load("org/plain-model")


def test_hub_id_syntax():
    assert looks_like_hub_id("org/name") and looks_like_hub_id("my-org/tiny.model_v2")
    for not_an_id in ("name", "a/b/c", "./x", "/abs", "~/x", "org/../x", "org--a/b", "dynamicvit", "org/x.git"):
        assert not looks_like_hub_id(not_an_id), not_an_id


class RecordingApi:
    """``HfApi`` without a network: records the calls and a listing of the folder at upload time."""

    calls: ClassVar[list] = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        listing = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, listing, kwargs))
        return "commit-info"


@pytest.fixture
def recording_api(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr("tokensift.export.hub.HfApi", RecordingApi)
    return RecordingApi


def test_push_to_hub_uploads_the_artifact_folder_only(tmp_path, recording_api):
    _, local = tiny_artifact(tmp_path / "artifact")
    artifact = ts.load(local)
    assert artifact.push_to_hub("my-org/tiny", token="secret", private=True, commit_message="v1") == "commit-info"
    init, create, upload = recording_api.calls
    assert init == ("init", "secret")
    assert create == ("create_repo", "my-org/tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert upload[:3] == ("upload_folder", "my-org/tiny", ["README.md", "scorer.safetensors", "tokensift.json"])
    assert upload[3]["commit_message"] == "v1"
    # held in memory only: saved to a temporary folder first, with the same files
    recording_api.calls = []
    Artifact(method=artifact.method, manifest=artifact.manifest).push_to_hub("my-org/tiny")
    assert recording_api.calls[-1][2] == ["README.md", "scorer.safetensors", "tokensift.json"]
    # a pickle beside the artifact is refused before anything is created
    recording_api.calls = []
    torch.save({"x": torch.zeros(1)}, local / "extra.pt")
    with pytest.raises(InvalidArtifact, match=r"pickle files \['extra\.pt'\]"):
        artifact.push_to_hub("my-org/tiny")
    assert recording_api.calls == []  # no client built, no repo created
    with pytest.raises(ValueError, match="repo_id 'tiny' is not a hub repo id; write it as owner/name"):
        artifact.push_to_hub("tiny")


def test_model_card_is_a_hub_card(tmp_path):
    _, local = tiny_artifact(
        tmp_path / "artifact", base_model="google/vit-base-patch16-224", data_module="tokensift.data.DigitsDataModule"
    )
    card = ModelCard.load(local / "README.md")
    assert card.data.library_name == "tokensift"
    assert card.data.tags == ["tokensift", "token-pruning", "dynamicvit", "learned"]
    assert card.data.base_model == "google/vit-base-patch16-224"
    fingerprint = ts.load(local).manifest["backbone"]
    for needle in (
        "trained over keep ratios [0.25, 0.75]",
        "training data: `tokensift.data.DigitsDataModule`",
        "training steps: 120",
        f'"weights_digest": "{fingerprint["weights_digest"]}"',
        "## Method config (dynamicvit)",
        "handle = ts.apply(model, 'path/to/this/dir', keep_ratio=0.5)",
    ):
        assert needle in card.text, needle
    assert "weights_groups" not in card.text
    # no hub id for the backbone: no base_model in the metadata rather than a local path
    _, plain = tiny_artifact(tmp_path / "plain")
    assert ModelCard.load(plain / "README.md").data.base_model is None


def bench_results(path: Path, artifact: str) -> Path:
    row = dict(kind="learned", threshold=None, skip_layers=None, keep_count=None, num_samples=64, artifact=artifact)
    rows = [
        row | dict(method="unpruned", kind="none", artifact=None, keep_ratio=1.0, accuracy=0.8, accuracy_low=0.7,
                   accuracy_high=0.9, retention=1.0, flops_ratio=1.0, speedup=1.0),
        row | dict(method="dynamicvit:art", keep_ratio=0.5, accuracy=0.78, accuracy_low=0.68, accuracy_high=0.88,
                   retention=0.975, flops_ratio=0.61, speedup=1.42),
        row | dict(method="other", artifact="elsewhere/other", keep_ratio=0.5, accuracy=0.1, accuracy_low=0.05,
                   accuracy_high=0.15, retention=0.125, flops_ratio=0.6, speedup=1.5),
    ]  # fmt: skip
    path.write_text(json.dumps({"metadata": {}, "rows": rows}))
    return path


def test_card_with_bench_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, local = tiny_artifact(tmp_path / "runs" / "art")
    results = bench_results(tmp_path / "results.json", "runs/art")
    rows = bench_rows_for(results, local)
    assert [row["method"] for row in rows] == ["unpruned", "dynamicvit:art"]
    main(["card", str(local), "--bench-results", str(results)])  # the CLI spelling of write_model_card
    card = ModelCard.load(local / "README.md")
    assert card.data.library_name == "tokensift"
    assert "| dynamicvit:art | keep_ratio=0.5 | 0.7800 [0.6800, 0.8800] | 0.9750 | 0.6100 | 1.42x | 64 |" in card.text
    assert "| unpruned | keep_ratio=1 | 0.8000 [0.7000, 0.9000] | 1.0000 | 1.0000 | 1.00x | 64 |" in card.text
    assert "other" not in card.text and "0.1000" not in card.text
    ts.load(local)  # the card rewrite leaves a loadable artifact
    shutil.rmtree(tmp_path / "runs" / "art")
    _, moved = tiny_artifact(tmp_path / "moved")
    with pytest.raises(ValueError, match=r"no row of .*results\.json was measured with the artifact .*moved.*runs/art"):
        write_model_card(moved, results)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"has no 'rows' list"):
        write_model_card(moved, tmp_path / "bad.json")


def test_card_license(tmp_path):
    _, local = tiny_artifact(tmp_path / "art")
    assert ModelCard.load(local / "README.md").data.license is None
    main(["card", str(local), "--license", "apache-2.0"])
    assert ModelCard.load(local / "README.md").data.license == "apache-2.0"
    write_model_card(local)  # a rewrite without --license keeps the card's license
    assert ModelCard.load(local / "README.md").data.license == "apache-2.0"
    with pytest.raises(ValueError, match=r"license='Apache 2\.0' is not a Hub license identifier.*'apache-2\.0'"):
        write_model_card(local, license="Apache 2.0")
    assert ModelCard.load(local / "README.md").data.license == "apache-2.0"  # the refused call wrote nothing


def test_export_records_the_training_data_and_base_model(tmp_path):
    """``tokensift export`` carries the checkpoint's data module and a hub-id backbone into the manifest and card;
    a local training path never becomes ``base_model``."""
    model = build_tiny("vit")
    method = DynamicViTMethod.for_backbone(adapt(model))
    meta = {
        "method": "dynamicvit",
        "config": dataclasses.asdict(method.config),
        "fingerprint": adapt(model).fingerprint(),
        "backbone": "google/vit-base-patch16-224",
        "default_budget": {"keep_ratio": 0.5},
        "data_module": "tokensift.data.digits.DigitsDataModule",
    }
    state = {f"method.{k}": v for k, v in method.state_dict().items()}
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "tokensift": meta, "global_step": 7}, checkpoint)
    manifest = ts.load(export(checkpoint, tmp_path / "art")).manifest
    assert (manifest["data_module"], manifest["base_model"], manifest["global_step"]) == (
        "tokensift.data.digits.DigitsDataModule",
        "google/vit-base-patch16-224",
        7,
    )
    card = ModelCard.load(tmp_path / "art" / "README.md")
    assert card.data.base_model == "google/vit-base-patch16-224"
    assert "training data: `tokensift.data.digits.DigitsDataModule`" in card.text and "training steps: 7" in card.text
    torch.save({"state_dict": state, "tokensift": meta | {"backbone": str(tmp_path / "backbone")}}, checkpoint)
    assert "base_model" not in ts.load(export(checkpoint, tmp_path / "local")).manifest


def test_save_pretrained_copies_the_adapter_folder(tmp_path):
    model = build_tiny("vit")
    method = DynamicViTMethod.for_backbone(adapt(model))

    def write_adapter(directory: Path) -> None:
        (directory / "adapter").mkdir()
        (directory / "adapter" / "adapter_model.safetensors").write_bytes(b"lora weights")

    save_artifact(
        method, adapt(model).fingerprint(), tmp_path / "a", extra={"adapter": "adapter"}, add_files=write_adapter
    )
    artifact = ts.load(tmp_path / "a")
    artifact.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").read_bytes() == b"lora weights"
    with pytest.raises(ValueError, match=r"names the folders \['adapter'\] but was not loaded from a directory"):
        Artifact(method=artifact.method, manifest=artifact.manifest).save_pretrained(tmp_path / "c")
    assert not (tmp_path / "c").exists()
