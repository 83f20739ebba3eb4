"""Artifacts as Hugging Face Hub repos: resolve ``org/name`` through the hub cache, push a saved artifact.

A hub repo of a tokensift artifact holds exactly the artifact directory (``tokensift.json``,
``scorer.safetensors``, ``README.md``, an adapter or backbone folder when trained so). Downloading goes
through ``huggingface_hub.snapshot_download``, so its cache and its offline rules (``HF_HUB_OFFLINE``,
``local_files_only``) apply unchanged; what comes back is read by the validated :func:`load_artifact`, never
unpickled.

Plain functions rather than ``huggingface_hub.ModelHubMixin``: the mixin's ``save_pretrained`` writes into a
directory it creates first and adds its own ``config.json`` and card, which would bypass the artifact's atomic,
validated writer and put a second, unvalidated config beside ``tokensift.json``. This module moves directories
only; ``tokensift.export.artifact`` checks what they hold (``Artifact.from_pretrained`` / ``push_to_hub``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# the Hub's own rule for a repo id: `owner/name`, letters, digits, `-`, `_`, `.`; no `--` or `..`
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# files that unpickle on load: never part of an artifact, so never uploaded as one
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def looks_like_hub_id(value: str | os.PathLike) -> bool:
    """True for ``owner/name`` as the Hub spells repo ids; a path with more parts, or ``./x`` / ``~/x``, is not."""
    if isinstance(value, os.PathLike):
        return False
    return bool(_HUB_ID.match(value)) and "--" not in value and ".." not in value and not value.endswith(".git")


def check_repo_id(repo_id: str) -> None:
    """A ValueError unless ``repo_id`` is a hub repo id (``owner/name``)."""
    if not looks_like_hub_id(repo_id):
        raise ValueError(f"repo_id {repo_id!r} is not a hub repo id; write it as owner/name, e.g. 'my-org/dynamicvit'.")


def resolve_artifact_dir(
    id_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """The local directory of an artifact: ``id_or_path`` itself when it is a folder, else the snapshot of the hub
    repo ``id_or_path`` (from the cache when offline or ``local_files_only``).

    ``local_files_only=None`` follows huggingface_hub's own rule: download only when ``HF_HUB_OFFLINE`` is unset.
    """
    path = Path(id_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; an artifact is a directory written by `tokensift export`.")
    if not looks_like_hub_id(id_or_path):
        raise FileNotFoundError(
            f"artifact {os.fspath(id_or_path)!r} does not exist as a local directory and is not a hub repo id "
            "(owner/name); give the folder `tokensift export` wrote, or a hub id."
        )
    repo_id = os.fspath(id_or_path)
    fix = (
        f"download it first (`hf download {repo_id}` or `huggingface-cli download {repo_id}`, online), pass "
        "cache_dir= where it was downloaded to, or give a local artifact folder"
    )
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
            library_name="tokensift",
        )
    except (LocalEntryNotFoundError, RevisionNotFoundError) as error:  # incl. an incomplete cached snapshot
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"artifact {repo_id!r}: no local folder of that name, and the hub repo{at} is not in the cache "
            f"{cache_dir or constants.HF_HUB_CACHE} ({type(error).__name__}); {fix}."
        ) from None
    except (RepositoryNotFoundError, HFValidationError) as error:
        raise FileNotFoundError(
            f"artifact {repo_id!r}: no local folder of that name, and no hub repo ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}); check the id, or give a local artifact folder."
        ) from None
    return Path(snapshot)


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload tokensift artifact",
):
    """Create the model repo ``repo_id`` if needed and upload ``folder`` (a checked artifact directory) as its
    contents; returns the ``CommitInfo``."""
    check_repo_id(repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=commit_message)
