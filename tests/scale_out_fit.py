"""``tokensift`` with the test-only noise-free method registered; tests/test_scale_out.py runs it as a script
(a script, not ``python -c``, because Lightning's launcher re-runs ``sys.argv`` for every extra rank)."""

from scale_out_helpers import NoiseFreeDynamicViT

from tokensift.cli import main
from tokensift.scorers.registry import register

if __name__ == "__main__":
    register(NoiseFreeDynamicViT)
    main()
