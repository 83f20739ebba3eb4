"""Artifacts: what ``tokensift export`` writes and ``ts.apply`` / ``ts.load`` read."""

from tokensift.export.artifact import (
    Artifact,
    FingerprintMismatch,
    check_fingerprint,
    load_artifact,
    save_artifact,
)

__all__ = ["Artifact", "FingerprintMismatch", "check_fingerprint", "load_artifact", "save_artifact"]
