"""Turn a training checkpoint into an artifact (``tokensift export CKPT OUT_DIR``).

``CKPT`` is what ``tokensift fit`` wrote under any strategy: a ``.ckpt`` file (single device, DDP) or a
DeepSpeed ZeRO checkpoint directory (stage 2 or 3, which Lightning also names ``*.ckpt``). Both give
the same artifact for the same weights. Either is read with torch's weights-only unpickler (a ZeRO directory
through :mod:`tokensift.export.zero`, not DeepSpeed's converter), so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tokensift.backbones import adapt, load_backbone
from tokensift.backbones.loading import load_mllm_backbone
from tokensift.backbones.lora import ADAPTER_DIR, is_lora_parameter, save_adapter
from tokensift.export.artifact import MANIFEST, FingerprintMismatch, check_fingerprint, save_artifact
from tokensift.export.hub import looks_like_hub_id
from tokensift.export.zero import load_shard, read_zero_checkpoint
from tokensift.io import check_replaceable
from tokensift.scorers.base import is_skip_method
from tokensift.scorers.dyvte import check_threshold
from tokensift.scorers.registry import get_method_class

METHOD_PREFIX = "method."
BACKBONE_PREFIX = "backbone."
BACKBONE_DIR = "backbone"
# what Lightning's DeepSpeed wrapper prefixed parameter names with before Lightning 2.1
_LEGACY_WRAPPER_PREFIX = "_forward_module."


def export(
    checkpoint: Path,
    out_dir: Path,
    keep_ratio: float | None = None,
    overwrite: bool = False,
    backbone: str | None = None,
    threshold: float | None = None,
) -> Path:
    """Write the scorer of a ``tokensift fit`` checkpoint as an artifact directory.

    Args:
        checkpoint: a ``.ckpt`` file, or a DeepSpeed ZeRO checkpoint directory, written by ``tokensift fit``.
        out_dir: the artifact directory to create (written to a temporary name, then renamed).
        keep_ratio: the artifact's default budget (default: the first ratio it was validated at).
        overwrite: replace ``out_dir`` if it exists.
        backbone: where to load the training backbone from, needed only when the artifact carries a LoRA
            adapter or a fine-tuned backbone (default: the ``model.backbone`` the run trained on).
        threshold: an exit method's (``dyvte``) default exit threshold, in place of ``keep_ratio`` (default:
            the first threshold it was validated at).
    """
    checkpoint = Path(checkpoint)
    if not overwrite and Path(out_dir).exists() and not (Path(out_dir).is_dir() and not any(Path(out_dir).iterdir())):
        raise FileExistsError(f"artifact directory {out_dir} exists; pass overwrite=True (--overwrite) to replace it.")
    check_replaceable(out_dir, MANIFEST, "tokensift artifact")  # before any work: save_artifact checks again
    if checkpoint.is_dir():
        state, ckpt = _read_zero_checkpoint(checkpoint)
    elif checkpoint.is_file():
        ckpt = load_shard(checkpoint)  # the weights-only unpickler: tensors and plain containers, never objects
        state = ckpt.get("state_dict")
        if not isinstance(state, dict):
            raise ValueError(f"{checkpoint} has no 'state_dict' field: it is not a Lightning checkpoint.")
    else:
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; `tokensift fit` writes them under its logs.")
    meta = ckpt.get("tokensift")
    if meta is None:
        raise ValueError(f"{checkpoint} was not written by `tokensift fit` (it has no 'tokensift' entry).")
    _check_metadata(meta, checkpoint)
    cls = get_method_class(meta["method"])
    method = cls(cls.config_class.from_dict(meta["config"]))
    method.load_state_dict(_strip(state, METHOD_PREFIX))
    budget = dict(meta["default_budget"])
    if is_skip_method(cls):  # a layer-skip method's budget is the skip_layers count it was trained for
        if keep_ratio is not None or threshold is not None:
            raise ValueError(
                f"{meta['method']} skips layers: its default budget is {budget} (the count it was trained for), not "
                "--keep_ratio / --threshold."
            )
    elif cls.decides_exits:  # an exit method's budget is a decision threshold
        if keep_ratio is not None:
            raise ValueError(f"{meta['method']} is an exit method: its budget is --threshold, not --keep_ratio.")
        if threshold is not None:
            budget = {"threshold": check_threshold(threshold)}
    elif threshold is not None:
        raise ValueError(f"--threshold is the budget of exit methods (dyvte); {meta['method']} takes --keep_ratio.")
    elif keep_ratio is not None:
        budget = {"keep_ratio": keep_ratio}
    extra = {
        **meta.get("manifest_extra", {}),
        "source_checkpoint": checkpoint.name,
        "global_step": int(ckpt.get("global_step", 0)),
    }
    for field in ("trained_keep_ratio_range", "trained_skip_range", "data_module"):
        if field in meta:
            extra[field] = meta[field]
    source = meta.get("backbone")
    if isinstance(source, str) and looks_like_hub_id(source) and not Path(source).exists():
        extra["base_model"] = source  # the card's base_model: only a hub id, never a local training path
    fingerprint = meta["fingerprint"]
    add_files = None
    if meta.get("lora") or meta.get("backbone_trained"):
        fingerprint, add_files, names = _backbone_files(meta, _strip(state, BACKBONE_PREFIX), backbone)
        extra |= names
    return save_artifact(
        method, fingerprint, out_dir, default_budget=budget, extra=extra, overwrite=overwrite, add_files=add_files
    )


# the checkpoint's `tokensift` entry (ScorerTrainer / ExitRouterTrainer.artifact_metadata): field -> type
_METADATA_FIELDS = {"method": str, "config": dict, "fingerprint": dict, "default_budget": dict}


def _check_metadata(meta: object, checkpoint: Path) -> None:
    if not isinstance(meta, dict):
        raise ValueError(f"{checkpoint}: field 'tokensift' must be a dict, got {type(meta).__name__}.")
    for field, kind in _METADATA_FIELDS.items():
        if not isinstance(meta.get(field), kind):
            what = "is missing" if field not in meta else f"must be a {kind.__name__}, got {type(meta[field]).__name__}"
            raise ValueError(
                f"{checkpoint}: field 'tokensift.{field}' {what}; the checkpoint was not written by this tokensift's "
                "`tokensift fit`."
            )


def _backbone_files(meta: dict, backbone_state: dict[str, torch.Tensor], source: str | None):
    """The backbone-side files of an artifact: a peft adapter folder and/or the fine-tuned backbone."""
    source = source or meta["backbone"]
    loader = load_mllm_backbone if meta.get("multimodal") else load_backbone  # older checkpoints: vision
    try:
        model = loader(source)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"this checkpoint trained LoRA adapters or the backbone, so export rebuilds its backbone from "
            f"{source!r}, which failed ({error}); pass --backbone PATH to the save_pretrained folder it trained on."
        ) from error
    lora_weights = {name: value for name, value in backbone_state.items() if is_lora_parameter(name)}
    names: dict[str, str] = {}
    if meta.get("backbone_trained"):
        # under LoRA a projection's own weight sits at `<projection>.base_layer.weight`
        weights = {k.replace(".base_layer.", "."): v for k, v in backbone_state.items() if not is_lora_parameter(k)}
        result = model.load_state_dict(weights, strict=False)
        missing = sorted(set(result.missing_keys) & {name for name, _ in model.named_parameters()})
        if missing or result.unexpected_keys:
            raise ValueError(
                f"the checkpoint's backbone weights do not fit {source!r}: missing {missing[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}; pass --backbone PATH to the backbone it trained."
            )
        fingerprint = adapt(model).fingerprint()
        names["backbone_weights"] = BACKBONE_DIR
    else:
        # the adapter only makes sense on the weights it was trained with
        try:
            check_fingerprint({"backbone": meta["fingerprint"]}, adapt(model).fingerprint(), strict=True)
        except FingerprintMismatch as error:
            raise FingerprintMismatch(
                f"{source!r} is not the backbone this checkpoint trained its LoRA adapter on: {error} "
                "Pass --backbone PATH to that backbone."
            ) from error
        fingerprint = meta["fingerprint"]
    if meta.get("lora"):
        names["adapter"] = ADAPTER_DIR

    def add_files(directory: Path) -> None:
        if meta.get("backbone_trained"):
            model.save_pretrained(directory / BACKBONE_DIR)
        if meta.get("lora"):
            save_adapter(model, meta["lora"], lora_weights, directory / ADAPTER_DIR)

    return fingerprint, add_files, names


def _read_zero_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The fp32 trainable weights and Lightning's client state of a ZeRO stage 1/2/3 checkpoint directory.

    Every shard goes through the weights-only loader (``tokensift.export.zero``), never DeepSpeed's converter,
    which unpickles optimizer shards with ``weights_only=False``. Frozen weights were never saved
    (``exclude_frozen_parameters``): the backbone is rebuilt from its source.
    """
    state, client = read_zero_checkpoint(directory)
    return {_strip_prefix(k, _LEGACY_WRAPPER_PREFIX): v for k, v in state.items()}, client


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _strip_prefix(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key
