"""``tokensift fit`` with tests/ importable, so ``--data.class_path=scale_out_helpers.DistributedOrderDigits``
resolves; tests/test_scale_out.py runs it as a script (a script, not ``python -c``, because Lightning's
launcher re-runs ``sys.argv`` for every extra rank)."""

from tokensift.cli import main

if __name__ == "__main__":
    main()
