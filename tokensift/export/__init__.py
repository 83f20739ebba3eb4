"""Artifacts: what ``tokensift export`` writes and ``ts.apply`` / ``ts.load`` read."""

from tokensift.export.artifact import (
    Artifact,
    FingerprintMismatch,
    InvalidArtifact,
    check_fingerprint,
    load_artifact,
    save_artifact,
    validate_manifest,
)
from tokensift.export.zero import UnsafeCheckpoint

__all__ = [
    "Artifact",
    "FingerprintMismatch",
    "InvalidArtifact",
    "UnsafeCheckpoint",
    "check_fingerprint",
    "load_artifact",
    "save_artifact",
    "validate_manifest",
]
