"""A LightningDataModule from what a command names: an instance, a ``{class_path, init_args}`` mapping (or its
JSON text), a YAML file holding one (or a ``tokensift fit`` config with a ``data:`` section), or a class path built
with its defaults. ``tokensift bench --data`` and ``tokensift pretrain-mllm --data`` read it the same way."""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["resolve_datamodule"]

_CLASS_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def _import_class(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(
            f"data: cannot import class_path {class_path!r}; give an importable LightningDataModule such as "
            "tokensift.data.ClutteredDigitsDataModule."
        ) from None


def _data_spec_from_yaml(path: Path) -> dict:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"data: {path} is not valid YAML ({error}).") from None
    if isinstance(loaded, Mapping) and "class_path" not in loaded and isinstance(loaded.get("data"), Mapping):
        loaded = loaded["data"]  # a `tokensift fit` config: take its data section
    if not isinstance(loaded, Mapping) or "class_path" not in loaded:
        raise ValueError(
            f"data: {path} must hold `class_path:` and `init_args:` of a LightningDataModule "
            "(or a `data:` section with them, as a `tokensift fit` config does)."
        )
    return dict(loaded)


def resolve_datamodule(data: Any, batch_size: int | None = None) -> tuple[Any, dict]:
    """A LightningDataModule from an instance, a ``{class_path, init_args}`` mapping (or its JSON text, e.g.
    ``'{"class_path": "tokensift.data.ShapeVQADataModule", "init_args": {"canvas_size": 32}}'``), a YAML path or a
    class path.

    Returns the module and a JSON-able description of it; ``batch_size`` (when given) overrides the module's.
    """
    from lightning.pytorch import LightningDataModule

    if isinstance(data, (str, os.PathLike)):
        text = os.fspath(data)
        path = Path(text)
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"data: {text!r} is not valid JSON ({error}).") from None
        elif path.is_file():
            data = _data_spec_from_yaml(path)
        elif _CLASS_PATH.match(text) and not text.endswith((".yaml", ".yml", ".json")):
            data = {"class_path": text}
        else:
            raise FileNotFoundError(
                f"data: {text!r} is neither an existing YAML file nor a class path; give e.g. configs/data.yaml "
                "or tokensift.data.ClutteredDigitsDataModule."
            )
    if isinstance(data, Mapping):
        if "class_path" not in data and isinstance(data.get("data"), Mapping):
            data = data["data"]
        if "class_path" not in data:
            raise ValueError("data: a mapping must give class_path (and optionally init_args) of a LightningDataModule")
        cls = _import_class(str(data["class_path"]))
        if not (isinstance(cls, type) and issubclass(cls, LightningDataModule)):
            raise ValueError(f"data: {data['class_path']} is not a LightningDataModule subclass.")
        init_args = dict(data.get("init_args") or {})
        try:
            module = cls(**init_args)
        except TypeError as error:
            raise ValueError(f"data.init_args do not fit {data['class_path']}: {error}") from None
    elif isinstance(data, LightningDataModule):
        module = data
    else:
        raise TypeError(
            f"data must be a LightningDataModule, a {{class_path, init_args}} mapping, a YAML path or a class path; "
            f"got {type(data).__name__}."
        )
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}.")
        if not hasattr(module, "batch_size"):
            raise ValueError(
                f"batch_size: {type(module).__name__} has no batch_size attribute to override; pass batch_size=None "
                "and set it in the data config."
            )
        module.batch_size = batch_size
    hparams = dict(getattr(module, "hparams", {}) or {})
    if batch_size is not None and "batch_size" in hparams:
        hparams["batch_size"] = batch_size
    description = {
        "class_path": f"{type(module).__module__}.{type(module).__qualname__}",
        "init_args": json.loads(json.dumps(hparams, default=str)),
    }
    return module, description
