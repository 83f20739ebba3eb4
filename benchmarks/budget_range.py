"""What does serving every budget from one scorer cost? A range-trained scorer vs fixed-ratio scorers.

    .venv/bin/python benchmarks/budget_range.py --backbone runs/quickstart/backbone [--epochs 2]

Fits the recipe's scorer once over a keep-ratio range and once per fixed ratio (same epochs, same
seed), then reports each one's test accuracy at every ratio from this one run.
"""

from __future__ import annotations

import argparse
import tempfile

from rich.console import Console
from rich.table import Table

from tokensift.fit_cli import TokensiftCLI
from tokensift.quickstart import RECIPE


def fit_and_test(backbone: str, keep_range: tuple[float, float], ratios: list[float], epochs: int, logs: str) -> dict:
    common = [
        f"--config={RECIPE}",
        f"--model.backbone={backbone}",
        f"--model.keep_ratio_range=[{keep_range[0]},{keep_range[1]}]",
        f"--model.eval_keep_ratios=[{','.join(map(str, ratios))}]",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.logger.init_args.save_dir={logs}",
    ]
    cli = TokensiftCLI(args=["fit", *common])
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="last", verbose=False)[0]
    return {r: results[f"test/acc_keep{r:g}".replace(".", "_")] for r in ratios} | {"full": results["test/acc_full"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="runs/quickstart/backbone")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--ratios", default="0.5,0.25,0.1")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory() as logs:
        rows[f"range [{min(ratios)}, {max(ratios)}]"] = fit_and_test(
            args.backbone, (min(ratios), max(ratios)), ratios, args.epochs, logs
        )
        for ratio in ratios:
            rows[f"fixed {ratio}"] = fit_and_test(args.backbone, (ratio, ratio), ratios, args.epochs, logs)
    table = Table(title=f"test accuracy, {args.epochs} epochs each")
    table.add_column("scorer")
    for r in ratios:
        table.add_column(f"keep {r}", justify="right")
    for name, accs in rows.items():
        table.add_row(name, *(f"{accs[r]:.4f}" for r in ratios))
    Console().print(table)
    print(f"unpruned: {next(iter(rows.values()))['full']:.4f}")


if __name__ == "__main__":
    main()
