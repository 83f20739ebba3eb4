"""Read the fp32 weights of a DeepSpeed ZeRO stage 1/2/3 checkpoint without unpickling arbitrary objects.

DeepSpeed's own converter (``deepspeed.utils.zero_to_fp32``) loads every shard with ``weights_only=False``
and joins the ``latest`` file's text to the checkpoint path unchecked, so a crafted checkpoint directory runs
code during ``tokensift export``. This reader rebuilds the same weights from the same files with
``torch.load(weights_only=True)``: the three DeepSpeed types an optimizer shard holds (its loss scaler, the
ZeRO stage enum and ZeRO-2's fragment addresses) are read into inert stand-ins defined here, so no DeepSpeed
(or any other) code runs while a shard is read, and DeepSpeed need not be installed to export.

The layout (DeepSpeed 0.9 - 0.19): ``<dir>/latest`` names a tag folder; in it, ``*_model_states.pt`` (one per
rank under ZeRO-3, one in all under ZeRO-1/2) carry ``param_shapes`` (one ``{name: shape}`` per parameter
group, in flattening order), ``buffer_names``, ``shared_params`` and the client state; ``*_optim_states.pt``
(one per data-parallel rank) carry ``optimizer_state_dict`` with ``zero_stage``, ``partition_count`` and each
rank's fp32 master partition per group (``single_partition_of_fp32_groups`` under ZeRO-1/2: the group's
flat vector cut into equal consecutive pieces, one per rank; ``fp32_flat_groups`` under ZeRO-3: every
parameter cut into ``ceil(numel / ranks)`` pieces, rank ``r`` holding piece ``r`` of each, back to back).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch

LATEST = "latest"
MODEL_STATES = "*_model_states.pt"
OPTIM_STATES = "*_optim_states.pt"


class UnsafeCheckpoint(ValueError):
    """A checkpoint holds something the weights-only reader refuses (a pickled object, a path outside it)."""


class _InertRecord:
    """Stand-in for a DeepSpeed object in a shard: the pickled attributes land in ``__dict__``, nothing runs."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__!r})"


class _LossScaler(_InertRecord):
    pass


class _FragmentAddress(_InertRecord):
    pass


def _zero_stage(value: Any) -> int:
    """Stand-in for ``ZeroStageEnum(value)``: the stage as a plain int."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnpicklingError(f"ZeroStageEnum holds {value!r}, not a stage number")
    return value


# the only non-torch globals a DeepSpeed shard may name, each mapped to an inert stand-in
_STAND_INS = [
    (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_zero_stage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
]


def checkpoint_tag_dir(directory: Path) -> Path:
    """The tag folder that ``directory/latest`` names, refused unless it is a child folder of ``directory``."""
    latest = directory / LATEST
    if not latest.is_file():
        raise ValueError(
            f"{directory} is a directory but not a DeepSpeed checkpoint (it has no '{LATEST}' file); give a `.ckpt` "
            "file or the checkpoint directory `tokensift fit --trainer.strategy deepspeed_stage_*` wrote."
        )
    tag = latest.read_text(errors="replace").strip()
    bad = (
        not tag
        or tag in (".", "..")
        or "/" in tag
        or "\\" in tag
        or "\0" in tag
        or (os.altsep is not None and os.altsep in tag)
        or Path(tag).is_absolute()
    )
    tag_dir = directory / tag
    if not bad and (not tag_dir.is_dir() or tag_dir.resolve().parent != directory.resolve()):
        bad = True
    if bad:
        raise UnsafeCheckpoint(
            f"{latest}: the tag {tag[:80]!r} must name a folder directly inside {directory} (no path separators, "
            "no '..', no link out of it); write the name of the checkpoint's tag folder (e.g. 'checkpoint') into "
            f"'{LATEST}'."
        )
    return tag_dir


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def shard_files(tag_dir: Path, pattern: str) -> list[Path]:
    files = sorted(tag_dir.glob(pattern), key=_natural_key)
    if not files:
        raise FileNotFoundError(f"{tag_dir} holds no {pattern} files: the ZeRO checkpoint is incomplete.")
    return files


def load_shard(path: Path) -> dict:
    """One shard through the weights-only unpickler, DeepSpeed's types read into inert stand-ins."""
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as error:
        raise UnsafeCheckpoint(
            f"{path} is not a torch checkpoint, or holds a pickled object outside the tensors, containers and "
            f"DeepSpeed records a checkpoint carries; it was not loaded (nothing in it ran): "
            f"{_unpickling_detail(error)}. Export only checkpoints `tokensift fit` wrote; a file of unknown origin "
            "can carry code."
        ) from None
    except (RuntimeError, EOFError, OSError, IndexError, KeyError, TypeError, ValueError) as error:
        # the weights-only unpickler stops on bytes that are no pickle at all with whatever it tripped on
        raise ValueError(
            f"{path} is not a readable torch checkpoint ({type(error).__name__}: {error}); it may be truncated or "
            "another kind of file. Export a last.ckpt / best.ckpt or a ZeRO checkpoint folder `tokensift fit` wrote."
        ) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not the dict of a DeepSpeed checkpoint shard.")
    return state


def _unpickling_detail(error: Exception) -> str:
    """The weights-only unpickler's reason (``Unsupported global: GLOBAL builtins.exec ...``), not its advice."""
    text = str(error)
    reason = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    return reason.strip().split(". ")[0].splitlines()[0][:300]


def _field(state: Mapping, path: Path, *keys: str) -> Any:
    value: Any = state
    for depth, key in enumerate(keys):
        if not isinstance(value, Mapping) or key not in value:
            where = ".".join(keys[: depth + 1])
            raise ValueError(f"{path} has no field '{where}': not a complete DeepSpeed ZeRO checkpoint shard.")
        value = value[key]
    return value


def _shapes(value: Any, path: Path) -> list[dict[str, torch.Size]]:
    groups = value if isinstance(value, list) else [value]
    out = []
    for group in groups:
        if not isinstance(group, Mapping):
            raise ValueError(f"{path}: field 'param_shapes' must be a list of {{name: shape}} dicts.")
        shapes = {}
        for name, shape in group.items():
            if not isinstance(name, str) or not isinstance(shape, (tuple, list)):
                raise ValueError(f"{path}: field 'param_shapes' has {name!r}: {shape!r}, not a name and a shape.")
            shapes[name] = torch.Size(shape)
        out.append(shapes)
    return out


def _vectors(value: Any, path: Path, field: str) -> list[torch.Tensor]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, torch.Tensor) and v.dim() == 1 for v in value):
        raise ValueError(f"{path}: field 'optimizer_state_dict.{field}' must be a list of flat tensors.")
    return [v.detach() for v in value]


def read_zero_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(fp32 trainable weights and buffers, rank 0's model-state dict)`` of a ZeRO checkpoint directory.

    The weights equal ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(directory,
    exclude_frozen_parameters=True)``; frozen parameters (never saved with ``exclude_frozen_parameters``) are
    left out.
    """
    directory = Path(directory)
    tag_dir = checkpoint_tag_dir(directory)
    model_files = shard_files(tag_dir, MODEL_STATES)
    client = load_shard(model_files[0])
    optim_files = shard_files(tag_dir, OPTIM_STATES)
    optim = [_field(load_shard(f), f, "optimizer_state_dict") for f in optim_files]
    first = optim_files[0]
    stage = _field(optim[0], first, "zero_stage")
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (1, 2, 3):
        raise ValueError(f"{first}: field 'optimizer_state_dict.zero_stage' is {stage!r}, not 1, 2 or 3.")
    world = _field(optim[0], first, "partition_count")
    world = max(world) if isinstance(world, (list, tuple)) else world
    if isinstance(world, bool) or not isinstance(world, int) or world != len(optim_files):
        raise ValueError(
            f"{tag_dir}: field 'optimizer_state_dict.partition_count' says {world!r} ranks but there are "
            f"{len(optim_files)} {OPTIM_STATES} files; a rank's shard is missing or left over from another run."
        )
    shapes = _shapes(_field(client, model_files[0], "param_shapes"), model_files[0])
    buffer_names = set(client.get("buffer_names") or [])
    module = _field(client, model_files[0], "module")
    state: dict[str, torch.Tensor] = {
        k: v.float() if v.is_floating_point() else v for k, v in module.items() if k in buffer_names
    }
    if stage <= 2:
        key = "single_partition_of_fp32_groups"
        groups = [_vectors(_field(o, f, key), f, key) for o, f in zip(optim, optim_files, strict=True)]
        paddings = optim[0].get("param_alignment_paddings")
        state |= _zero2_weights(shapes, groups, world, paddings, tag_dir)
    else:
        key = "fp32_flat_groups"
        groups = [_vectors(_field(o, f, key), f, key) for o, f in zip(optim, optim_files, strict=True)]
        state |= _zero3_weights(shapes, groups, world, tag_dir)
    for alias, source in dict(client.get("shared_params") or {}).items():
        if source in state:
            state[alias] = state[source]
    return state, client


def _zero2_weights(shapes, groups, world, paddings, where) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: a group's flat fp32 vector is its ranks' partitions end to end, parameters in order."""
    if any(len(rank) != len(shapes) for rank in groups):
        raise ValueError(
            f"{where}: the optimizer shards hold a different number of parameter groups than param_shapes."
        )
    out = {}
    for index, group_shapes in enumerate(shapes):
        flat = torch.cat([rank[index] for rank in groups])
        group_paddings = None if paddings is None else list(paddings[index])
        if group_paddings is not None and len(group_paddings) != len(group_shapes):
            raise ValueError(f"{where}: param_alignment_paddings of group {index} do not match its parameters.")
        offset = 0
        for position, (name, shape) in enumerate(group_shapes.items()):
            numel = shape.numel()
            if offset + numel > flat.numel():
                raise ValueError(f"{where}: parameter {name} runs past the end of group {index}'s fp32 partitions.")
            out[name] = flat.narrow(0, offset, numel).view(shape).clone()
            offset += numel + (group_paddings[position] if group_paddings is not None else 0)
        align = 2 * world  # DeepSpeed pads each group to a multiple of 2 x ranks
        if align * math.ceil(offset / align) != align * math.ceil(flat.numel() / align):
            raise ValueError(
                f"{where}: group {index} used {offset} of {flat.numel()} fp32 values; the shards disagree."
            )
    return out


def _zero3_weights(shapes, groups, world, where) -> dict[str, torch.Tensor]:
    """ZeRO-3: each rank holds piece ``r`` of every parameter (``ceil(numel / ranks)`` values), in order."""
    flats = [torch.cat(rank) if rank else torch.zeros(0) for rank in groups]
    if len({flat.numel() for flat in flats}) != 1:
        raise ValueError(f"{where}: the ZeRO-3 ranks hold fp32 partitions of different sizes.")
    merged = {name: shape for group in shapes for name, shape in group.items()}
    out, offset = {}, 0
    for name, shape in merged.items():
        piece = math.ceil(shape.numel() / world)
        if offset + piece > flats[0].numel():
            raise ValueError(f"{where}: parameter {name} runs past the end of the ranks' fp32 partitions.")
        full = torch.cat([flat[offset : offset + piece] for flat in flats])
        out[name] = full[: shape.numel()].view(shape).clone()
        offset += piece
    if offset != flats[0].numel():
        raise ValueError(f"{where}: the parameters use {offset * world} of {flats[0].numel() * world} fp32 values.")
    return out
