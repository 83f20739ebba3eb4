"""Artifacts and checkpoints from untrusted or damaged sources: refused with the field named, nothing written.

- ZeRO checkpoints are read with the weights-only unpickler (``tokensift.export.zero``), never DeepSpeed's
  converter: a shard carrying a pickle payload is refused without running it, and ``latest`` may only name a
  folder inside the checkpoint. The reader's weights equal DeepSpeed's converter's (2 ranks, ZeRO-2 and 3).
- ``tokensift.json`` is validated field by field; ``scorer.safetensors`` must be readable and fit the manifest.
- The backbone fingerprint covers every parameter, so a model with one other layer is refused (by name).
- Writers replace only their own earlier output (or an empty directory), swapping it out before deleting it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import save_file
from test_train_export import save_vit
from tiny_mllm import build_tiny_mllm

import tokensift as ts
from tokensift.backbones import MLLMAdapter, adapt
from tokensift.backbones.pretrain import pretrain_backbone
from tokensift.backbones.pretrain_mllm import pretrain_mllm
from tokensift.cli import main
from tokensift.export import FingerprintMismatch, InvalidArtifact, UnsafeCheckpoint, save_artifact
from tokensift.export.checkpoint import export
from tokensift.export.zero import read_zero_checkpoint
from tokensift.io import atomic_directory
from tokensift.scorers import build_method
from tokensift.scorers.dynamicvit import DynamicViTConfig, DynamicViTMethod

ROOT = Path(__file__).resolve().parents[1]


# -- helpers -----------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs ``exec``: it writes ``marker``. The weights-only loader must never get there."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('the payload ran')",))


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes, to show that a refused call wrote nothing."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(root.rglob("*"))
    }


def vit_and_scorer(seed: int = 0):
    model = build_tiny("vit", seed=seed)
    torch.manual_seed(seed)
    return model, DynamicViTMethod.for_backbone(adapt(model))


def write_zero_checkpoint(
    root: Path,
    params: dict[str, torch.Tensor],
    stage: int,
    world: int = 2,
    client: dict | None = None,
    tag: str = "checkpoint",
    buffers: dict[str, torch.Tensor] | None = None,
    payload_in: str | None = None,
    marker: Path | None = None,
) -> Path:
    """A DeepSpeed ZeRO ``stage`` checkpoint directory of ``params`` over ``world`` ranks, laid out as DeepSpeed
    0.19 writes it (two parameter groups, padded partitions, DeepSpeed's own loss scaler / stage enum / fragment
    addresses pickled in the optimizer shards). ``payload_in`` puts a :class:`Payload` into rank 0's ``model``
    or ``optim`` shard."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    names = list(params)
    groups = [names[: len(names) // 2], names[len(names) // 2 :]]
    shapes = [OrderedDict((n, params[n].shape) for n in group) for group in groups]
    tag_dir = root / tag
    tag_dir.mkdir(parents=True)
    (root / "latest").write_text(tag)
    buffers = buffers or {}
    model_state = {
        "module": OrderedDict({**{n: p.clone() for n, p in params.items()}, **buffers}),
        "buffer_names": list(buffers),
        "param_shapes": shapes,
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "ds_version": "0.19.8",
        **(client or {}),
    }
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for group in groups:
        if stage == 3:  # every parameter cut into ceil(numel / world) pieces, rank r holding piece r of each
            pieces: list[list[torch.Tensor]] = [[] for _ in range(world)]
            for name in group:
                flat = params[name].reshape(-1).float()
                piece = math.ceil(flat.numel() / world)
                flat = torch.cat([flat, flat.new_zeros(piece * world - flat.numel())])
                for rank in range(world):
                    pieces[rank].append(flat[rank * piece : (rank + 1) * piece])
            for rank in range(world):
                per_rank[rank].append(torch.cat(pieces[rank]))
        else:  # the group's flat vector, padded to a multiple of 2 x world, cut into equal consecutive pieces
            flat = torch.cat([params[name].reshape(-1).float() for name in group])
            align = 2 * world
            flat = torch.cat([flat, flat.new_zeros(align * math.ceil(flat.numel() / align) - flat.numel())])
            for rank, part in enumerate(flat.chunk(world)):
                per_rank[rank].append(part.clone())
    for rank in range(world):
        optimizer = {
            "loss_scaler": LossScaler(1.0),
            "dynamic_loss_scale": False,
            "overflow": False,
            "zero_stage": ZeroStageEnum.weights if stage == 3 else ZeroStageEnum.gradients,
            "partition_count": world if stage == 3 else [world] * len(groups),
            "ds_version": "0.19.8",
        }
        if stage == 3:
            optimizer["fp32_flat_groups"] = [t.clone().requires_grad_() for t in per_rank[rank]]
        else:
            optimizer["single_partition_of_fp32_groups"] = [t.requires_grad_() for t in per_rank[rank]]
            optimizer["param_alignment_paddings"] = [[0] * len(group) for group in groups]
            starts = [0, *torch.tensor([params[n].numel() for n in names]).cumsum(0).tolist()]
            optimizer["param_slice_mappings"] = [
                OrderedDict(
                    (n, fragment_address(numel=params[n].numel(), start=starts[i])) for i, n in enumerate(names)
                )
            ]
        if payload_in == "optim" and rank == 0:
            optimizer["loss_scaler"] = Payload(marker)
        torch.save({"optimizer_state_dict": optimizer}, tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        if stage == 3 or rank == 0:
            state = dict(model_state)
            if payload_in == "model" and rank == 0:
                state["hyper_parameters"] = {"innocent": Payload(marker)}
            name = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
            torch.save(state, tag_dir / name)
    return root


def odd_params(seed: int = 0) -> dict[str, torch.Tensor]:
    """Parameters with sizes that leave ZeRO padding (odd counts, a single value)."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"a.weight": (5, 3), "a.bias": (5,), "b.weight": (7,), "c.scale": (1,), "d.weight": (3, 3)}
    return {name: torch.randn(*size, generator=g) for name, size in sizes.items()}


def scorer_checkpoint(root: Path, stage: int, **kwargs) -> tuple[Path, DynamicViTMethod, torch.nn.Module]:
    """A ZeRO checkpoint of a DynamicViT scorer with the client state `tokensift fit` writes."""
    model, method = vit_and_scorer()
    meta = {
        "method": method.name,
        "config": dataclasses.asdict(method.config),
        "fingerprint": adapt(model).fingerprint(),
        "backbone": "unused",
        "lora": None,
        "backbone_trained": False,
        "default_budget": {"keep_ratio": 0.5},
    }
    params = {f"method.{k}": v.detach() for k, v in method.state_dict().items()}
    path = write_zero_checkpoint(root, params, stage, client={"tokensift": meta, "global_step": 3}, **kwargs)
    return path, method, model


# -- ZeRO checkpoints -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_reader_equals_deepspeeds_converter(stage, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    params = odd_params()
    buffers = {"a.running": torch.arange(4, dtype=torch.float16)}
    write_zero_checkpoint(tmp_path, params, stage, buffers=buffers)
    ours, _ = read_zero_checkpoint(tmp_path)
    # a trusted file written just above: DeepSpeed's converter (weights_only=False) is the reference here
    reference = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), exclude_frozen_parameters=True)
    assert list(ours) == list(reference)
    for name in reference:
        assert ours[name].dtype == reference[name].dtype and torch.equal(ours[name], reference[name]), name
    for name, value in params.items():
        assert torch.equal(ours[name], value), name
    assert ours["a.running"].dtype == torch.float32 and torch.equal(ours["a.running"], torch.arange(4.0))


@pytest.mark.parametrize("stage", [2, 3])
def test_export_of_a_zero_checkpoint_holds_the_scorer_weights(stage, tmp_path):
    checkpoint, method, model = scorer_checkpoint(tmp_path / "ckpt", stage)
    artifact = ts.load(export(checkpoint, tmp_path / "artifact"))
    expected = method.state_dict()
    assert artifact.method.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in artifact.method.state_dict().items())
    ts.apply(model, tmp_path / "artifact").remove()


@pytest.mark.parametrize("where", ["optim", "model"])
def test_zero_shard_with_a_pickle_payload_is_refused_without_running_it(where, tmp_path):
    marker = tmp_path / "payload_ran"
    checkpoint, _, _ = scorer_checkpoint(tmp_path / "ckpt", 3, payload_in=where, marker=marker)
    out = tmp_path / "artifact"
    with pytest.raises(UnsafeCheckpoint, match=r"Unsupported global: GLOBAL (builtins\.)?exec") as info:
        main(["export", str(checkpoint), str(out)])
    assert "_states.pt" in str(info.value) and "nothing in it ran" in str(info.value)
    assert not marker.exists(), "the payload ran"
    assert not out.exists() and not list(tmp_path.glob(".artifact*"))
    # the payload is live: the unrestricted unpickler DeepSpeed's converter uses runs it
    shard = next((checkpoint / "checkpoint").glob(f"zero_pp_rank_0_mp_rank_00_{where}*_states.pt"))
    torch.load(shard, weights_only=False)
    assert marker.read_text() == "the payload ran"


def test_ckpt_file_with_a_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    torch.save({"state_dict": {}, "tokensift": Payload(marker)}, tmp_path / "last.ckpt")
    with pytest.raises(UnsafeCheckpoint, match=r"last\.ckpt is not a torch checkpoint, or holds a pickled object"):
        export(tmp_path / "last.ckpt", tmp_path / "artifact")
    assert not marker.exists() and not (tmp_path / "artifact").exists()


@pytest.mark.parametrize("tag", ["../outside", "..", "/tmp", "checkpoint/../../outside", "missing"])
def test_latest_tag_must_name_a_folder_inside_the_checkpoint(tag, tmp_path):
    # a complete checkpoint beside the directory: the tag would have led DeepSpeed's converter into it
    scorer_checkpoint(tmp_path / "outside_root", 2, tag="outside")
    (tmp_path / "outside").symlink_to(tmp_path / "outside_root" / "outside")
    checkpoint, _, _ = scorer_checkpoint(tmp_path / "ckpt", 2)
    (checkpoint / "latest").write_text(tag)
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeCheckpoint, match=r"latest: the tag .* must name a folder directly inside"):
        export(checkpoint, tmp_path / "artifact")
    assert snapshot(tmp_path) == before


def test_zero_checkpoint_with_a_missing_rank_is_named(tmp_path):
    checkpoint, _, _ = scorer_checkpoint(tmp_path / "ckpt", 2)
    (checkpoint / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ValueError, match=r"'optimizer_state_dict\.partition_count' says 2 ranks but there are 1"):
        export(checkpoint, tmp_path / "artifact")
    assert not (tmp_path / "artifact").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_reader_equals_deepspeed_on_a_real_two_process_fit(stage, tmp_path):
    """A real `tokensift fit` under ZeRO ``stage`` on 2 CPU processes: DeepSpeed's converter's fp32 weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    backbone = save_vit(tmp_path / "backbone")
    data = [
        "--data.class_path=tokensift.data.ClutteredDigitsDataModule",
        "--data.init_args.canvas_size=32",
        "--data.init_args.clutter_size=[2,3]",
        "--data.init_args.num_clutter=3",
        "--data.init_args.train_samples=32",
        "--data.init_args.val_samples=16",
        "--data.init_args.test_samples=16",
        "--data.init_args.batch_size=8",
    ]
    command = [
        sys.executable,
        "-m",
        "tokensift.cli",
        "fit",
        f"--model.backbone={backbone}",
        "--model.keep_ratio_range=[0.5,0.5]",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        f"--trainer.strategy=deepspeed_stage_{stage}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--seed_everything=0",
        *data,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    ours, client = read_zero_checkpoint(checkpoint)
    reference = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), exclude_frozen_parameters=True)
    assert list(ours) == list(reference) and all(k.startswith("method.") for k in ours)
    for name in reference:
        assert torch.equal(ours[name], reference[name]), name
    assert client["tokensift"]["method"] == "dynamicvit"


# -- manifest and weights -------------------------------------------------------------------------------------
@pytest.fixture
def artifact(tmp_path) -> Path:
    model, method = vit_and_scorer()
    return save_artifact(method, adapt(model).fingerprint(), tmp_path / "artifact", extra={"global_step": 5})


def edit_manifest(artifact: Path, change) -> dict[str, str]:
    manifest = json.loads((artifact / "tokensift.json").read_text())
    change(manifest)
    (artifact / "tokensift.json").write_text(json.dumps(manifest))
    return snapshot(artifact)


def _set(path: str, value):
    def change(manifest: dict) -> None:
        *parents, leaf = path.split(".")
        target = manifest
        for key in parents:
            target = target[key]
        target[leaf] = value

    return change


def _delete(path: str):
    def change(manifest: dict) -> None:
        *parents, leaf = path.split(".")
        target = manifest
        for key in parents:
            target = target[key]
        del target[leaf]

    return change


MANIFEST_CASES = {
    "missing field": (_delete("backbone"), r"field 'backbone' is missing"),
    "missing fingerprint field": (_delete("backbone.weights_digest"), r"field 'backbone\.weights_digest' is missing"),
    "extra field": (_set("surprise", 1), r"unknown field\(s\) \['surprise'\]"),
    "extra fingerprint field": (_set("backbone.colour", "red"), r"unknown field\(s\) \['backbone\.colour'\]"),
    "wrong type: sites": (_set("sites", "vit.0"), r"field 'sites' must be a list, got str"),
    "wrong type: format_version": (_set("format_version", "1"), r"field 'format_version' must be an integer"),
    "wrong type: bool step": (_set("global_step", True), r"field 'global_step' must be an integer, got bool"),
    "wrong type: hidden size": (_set("backbone.hidden_size", 32.0), r"field 'backbone\.hidden_size' must be an int"),
    "unknown method": (_set("method", "no_such_method"), r"field 'method': unknown method 'no_such_method'"),
    "kind of another method": (_set("kind", "training-free"), r"field 'kind' is 'training-free', but dynamicvit"),
    "newer format version": (_set("format_version", 99), r"field 'format_version' is 99.*Upgrade tokensift"),
    "format version 0": (_set("format_version", 0), r"field 'format_version' is 0; supported versions are 1"),
    "other format": (_set("format", "something-else"), r"field 'format' is 'something-else'"),
    "budget out of range": (_set("default_budget", {"keep_ratio": 2.0}), r"field 'default_budget': keep_ratio"),
    "exit budget on a pruner": (_set("default_budget", {"threshold": 0.5}), r"field 'default_budget' is"),
    "config option unknown": (_set("config.colour", "red"), r"field 'config' does not configure dynamicvit"),
    "sites disagree with config": (
        _set("sites", ["vit.0"]),
        r"field 'sites' \['vit\.0'\] differs from 'config\.sites'",
    ),
    "adapter outside the artifact": (_set("adapter", "../elsewhere"), r"field 'adapter' is '\.\./elsewhere'"),
    "adapter folder missing": (_set("adapter", "adapter"), r"field 'adapter' names the folder 'adapter', which is"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_bad_manifest_is_refused_naming_the_field(case, artifact, tiny_vit):
    change, message = MANIFEST_CASES[case]
    before = edit_manifest(artifact, change)
    with pytest.raises(InvalidArtifact, match=message):
        ts.load(artifact)
    with pytest.raises(InvalidArtifact, match=message):
        ts.apply(tiny_vit, artifact)
    assert snapshot(artifact) == before
    assert tiny_vit.config._attn_implementation in ("eager", "sdpa"), "ts.apply left nothing on the model"


def test_manifest_that_is_not_json_is_named(artifact):
    text = (artifact / "tokensift.json").read_text()
    (artifact / "tokensift.json").write_text(text[: len(text) // 2])
    with pytest.raises(InvalidArtifact, match=r"tokensift\.json is not valid JSON"):
        ts.load(artifact)


def test_save_artifact_refuses_what_load_would_refuse(tmp_path):
    model, method = vit_and_scorer()
    with pytest.raises(InvalidArtifact, match=r"save_artifact: unknown field\(s\) \['note'\]"):
        save_artifact(method, adapt(model).fingerprint(), tmp_path / "artifact", extra={"note": "hi"})
    partial = {k: v for k, v in adapt(model).fingerprint().items() if k != "weights_digest"}
    with pytest.raises(InvalidArtifact, match=r"field 'backbone\.weights_digest' is missing; pass the backbone's"):
        save_artifact(method, partial, tmp_path / "artifact")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_weights_are_named(keep, artifact):
    weights = artifact / "scorer.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(8, int(len(data) * keep))])
    before = snapshot(artifact)
    with pytest.raises(InvalidArtifact, match=r"scorer\.safetensors is not a readable safetensors file"):
        ts.load(artifact)
    assert snapshot(artifact) == before


def test_weights_of_another_scorer_are_named(artifact):
    other = DynamicViTMethod.for_backbone(adapt(build_tiny("vit")), config=DynamicViTConfig(num_stages=1))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, artifact / "scorer.safetensors")
    with pytest.raises(InvalidArtifact, match=r"does not fit the dynamicvit scorer its manifest's 'config'"):
        ts.load(artifact)
    # the right tensors, labelled as another method's: the files come from two artifacts
    right = {k: v.contiguous() for k, v in vit_and_scorer()[1].state_dict().items()}
    save_file(right, artifact / "scorer.safetensors", metadata={"method": "tome"})
    with pytest.raises(InvalidArtifact, match=r"holds tome weights but the manifest's field 'method' says"):
        ts.load(artifact)


def test_artifact_applied_as_another_method_is_refused(artifact, tiny_vit):
    with pytest.raises(
        ValueError,
        match=r"holds a dynamicvit artifact \(the 'method' field of its tokensift\.json\), not tome; write dynamicvit:",
    ):
        ts.apply(tiny_vit, f"tome:{artifact}")
    assert tiny_vit.config._attn_implementation in ("eager", "sdpa")


# -- fingerprints ---------------------------------------------------------------------------------------------
def test_fingerprint_refuses_a_vision_model_with_one_other_block(artifact, pixel_values):
    other = build_tiny("vit")
    with torch.no_grad():
        adapt(other).layers[2].mlp.fc2.weight.mul_(1.01)
    with pytest.raises(FingerprintMismatch) as info:
        ts.apply(other, artifact)
    message = str(info.value)
    assert "weights_digest" in message and "the weights differ in layers.2)" in message
    assert "strict=False" in message and other.config._attn_implementation in ("eager", "sdpa")
    with ts.apply(other, artifact, strict=False), torch.no_grad():
        other(pixel_values=pixel_values)
    same = build_tiny("vit")
    with torch.no_grad():
        same.classifier.weight.zero_()  # the head: outside what a scorer sees
    ts.apply(same, artifact).remove()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_fingerprint_refuses_an_mllm_with_one_other_llm_layer(family, tmp_path):
    model = build_tiny_mllm(family)
    method = build_method("fastv")
    artifact = save_artifact(method, adapt(model).fingerprint(), tmp_path / "artifact")
    ts.apply(build_tiny_mllm(family), artifact, keep_ratio=0.5).remove()
    changed = build_tiny_mllm(family)
    layer = 2
    with torch.no_grad():
        MLLMAdapter(changed).layers[layer].mlp.down_proj.weight.add_(0.01)
    with pytest.raises(FingerprintMismatch) as info:
        ts.apply(changed, artifact, keep_ratio=0.5)
    message = str(info.value)
    assert "weights_digest" in message and f"layers.{layer}" in message and "strict=False" in message
    assert not any(f"layers.{i}" in message.split("differ in", 1)[1] for i in (0, 1, 3))
    ts.apply(changed, artifact, keep_ratio=0.5, strict=False).remove()


def test_fingerprint_of_an_older_tokensift_asks_for_a_re_export(artifact, tiny_vit):
    def old_style(manifest: dict) -> None:
        del manifest["backbone"]["fingerprint_version"], manifest["backbone"]["weights_groups"]
        manifest["backbone"]["weights_digest"] = "0123456789abcdef"

    edit_manifest(artifact, old_style)
    with pytest.raises(FingerprintMismatch, match=r"fingerprint is version 1.*re-export the artifact"):
        ts.apply(tiny_vit, artifact)


# -- writes ---------------------------------------------------------------------------------------------------
def test_export_refuses_to_replace_a_directory_that_is_not_an_artifact(tmp_path):
    checkpoint, _, _ = scorer_checkpoint(tmp_path / "ckpt", 2)
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    before = snapshot(tmp_path)
    for overwrite in ([], ["--overwrite=true"]):
        with pytest.raises(FileExistsError, match=r"thesis exists"):
            main(["export", str(checkpoint), str(precious), *overwrite])
    with pytest.raises(FileExistsError, match=r"thesis exists and is not a tokensift artifact \(it has no tokensift"):
        save_artifact(*_method_and_fingerprint(), precious, overwrite=True)
    assert snapshot(tmp_path) == before


def _method_and_fingerprint():
    model, method = vit_and_scorer()
    return method, adapt(model).fingerprint()


def test_overwrite_replaces_an_artifact_and_an_empty_directory(tmp_path):
    method, fingerprint = _method_and_fingerprint()
    (tmp_path / "empty").mkdir()
    save_artifact(method, fingerprint, tmp_path / "empty")
    assert (tmp_path / "empty" / "tokensift.json").is_file()
    save_artifact(method, fingerprint, tmp_path / "empty", default_budget={"keep_ratio": 0.3}, overwrite=True)
    assert ts.load(tmp_path / "empty").default_budget == {"keep_ratio": 0.3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"], "no temporary or set-aside folder left"
    status = Path("/proc/self/status").read_text().splitlines()
    umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    assert (tmp_path / "empty").stat().st_mode & 0o777 == 0o777 & ~umask, "the usual mode, not mkdtemp's 0700"


def test_a_failed_swap_keeps_the_old_artifact(tmp_path, monkeypatch):
    method, fingerprint = _method_and_fingerprint()
    out = save_artifact(method, fingerprint, tmp_path / "artifact", default_budget={"keep_ratio": 0.3})
    before = snapshot(out)
    real_replace = os.replace

    def fail_into_place(src, dst):
        if Path(dst) == out and ".old." not in Path(src).name:  # the new artifact into place; not the restore
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_into_place)
    with pytest.raises(OSError, match="power cut"):
        save_artifact(method, fingerprint, out, default_budget={"keep_ratio": 0.7}, overwrite=True)
    monkeypatch.undo()
    assert snapshot(out) == before, "the old artifact is back in place"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_pretrain_refuses_a_foreign_directory_before_training(tmp_path):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "images.npz").write_bytes(b"1234")
    (tmp_path / "link").symlink_to(precious)
    before = snapshot(tmp_path)
    # data=None: the refusal must come before any training touches the data
    with pytest.raises(
        FileExistsError, match=r"data exists and is not a trained backbone \(it has no tokensift_backbone"
    ):
        pretrain_backbone(precious, data=None)
    with pytest.raises(
        FileExistsError, match=r"data exists and is not a trained MLLM \(it has no tokensift_mllm\.json"
    ):
        pretrain_mllm(precious, data=None)
    with pytest.raises(FileExistsError, match=r"link is a symbolic link"):
        pretrain_backbone(tmp_path / "link", data=None)
    assert snapshot(tmp_path) == before


def test_atomic_directory_replaces_only_its_own_output(tmp_path):
    out = tmp_path / "backbone"
    out.mkdir()
    (out / "tokensift_backbone.json").write_text("{}")
    (out / "old.bin").write_text("old")
    with atomic_directory(out, "tokensift_backbone.json", "trained backbone") as tmp:
        (tmp / "tokensift_backbone.json").write_text('{"new": 1}')
    assert sorted(p.name for p in out.iterdir()) == ["tokensift_backbone.json"]
    no_marker = pytest.raises(RuntimeError, match=r"did not write its marker file tokensift_backbone\.json")
    with no_marker, atomic_directory(out, "tokensift_backbone.json", "trained backbone") as tmp:
        (tmp / "weights.bin").write_text("no marker")
    assert (out / "tokensift_backbone.json").read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone"]


def test_atomic_file_keeps_the_old_file_until_the_new_one_is_complete(tmp_path):
    from tokensift.io import atomic_file, write_text_atomic

    target = write_text_atomic(tmp_path / "results.csv", "old\n")
    with pytest.raises(RuntimeError, match="crash"), atomic_file(target) as tmp:
        tmp.write_text("half of the ne")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no temporary left behind
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]
