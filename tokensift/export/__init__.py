"""Artifacts: what ``tokensift export`` writes and ``ts.apply`` / ``ts.load`` read."""

from tokensift.export.artifact import (
    Artifact,
    FingerprintMismatch,
    InvalidArtifact,
    check_fingerprint,
    from_pretrained,
    load_artifact,
    push_to_hub,
    save_artifact,
    validate_manifest,
    write_model_card,
)
from tokensift.export.zero import UnsafeCheckpoint

__all__ = [
    "Artifact",
    "FingerprintMismatch",
    "InvalidArtifact",
    "UnsafeCheckpoint",
    "check_fingerprint",
    "from_pretrained",
    "load_artifact",
    "push_to_hub",
    "save_artifact",
    "validate_manifest",
    "write_model_card",
]
