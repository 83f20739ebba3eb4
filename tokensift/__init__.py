"""tokensift: learned token scorers for frozen transformers, applied like training-free pruners."""

from tokensift.api import apply, load, methods
from tokensift.budget import Budget
from tokensift.export import Artifact, save_artifact
from tokensift.reduce import PruningHandle
from tokensift.state import TokenState

__version__ = "0.1.0"
__all__ = ["Artifact", "Budget", "PruningHandle", "TokenState", "apply", "load", "methods", "save_artifact"]
