"""``tokensift`` console script: LightningCLI for fit/validate/test, plain typed functions for the rest."""

from __future__ import annotations

import sys

from jsonargparse import auto_cli
from lightning.pytorch.cli import LightningCLI

TOOL_COMMANDS = ("export", "bench", "quickstart", "quickstart-vqa")

DEFAULT_CALLBACKS = [
    {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
    # best by mean pruned validation accuracy, and the latest weights (Lightning's save_last only
    # refreshes when the best improves)
    {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"monitor": "val/acc", "mode": "max", "filename": "best"},
    },
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"filename": "last"}},
]
DEFAULT_LOGGER = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}


class TokensiftCLI(LightningCLI):
    """LightningCLI with tokensift's trainers, any LightningDataModule and tokensift's defaults.

    The model is ``ScorerTrainer`` unless the config names another (``model.class_path:
    tokensift.trainer.ExitRouterTrainer`` trains DyVTE's exit routers); a config without a class path
    gives ScorerTrainer's arguments directly under ``model:``.
    """

    def __init__(self, args=None, run: bool = True, **kwargs):
        from lightning.pytorch.core import LightningDataModule, LightningModule

        import tokensift.trainer  # noqa: F401  (the trainers the model's class path names)

        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": "tokensift.trainer.ScorerTrainer"},
                "trainer.callbacks": DEFAULT_CALLBACKS,
                "trainer.logger": DEFAULT_LOGGER,
            }
        )

    def before_instantiate_classes(self) -> None:
        # the default Rich bar would make Lightning refuse `--trainer.enable_progress_bar false`
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("enable_progress_bar") is False and config.trainer.callbacks:
            config.trainer.callbacks = [
                c for c in config.trainer.callbacks if not str(c.get("class_path", "")).endswith("ProgressBar")
            ]


def _underscore_flag(arg: str) -> str:
    """Accept ``--keep-ratios`` as well as ``--keep_ratios``."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg.partition("=")
    return "--" + name[2:].replace("-", "_") + sep + value


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOL_COMMANDS:
        from tokensift.bench import bench
        from tokensift.export.checkpoint import export
        from tokensift.quickstart import quickstart
        from tokensift.quickstart_vqa import quickstart_vqa

        commands = {"export": export, "bench": bench, "quickstart": quickstart, "quickstart-vqa": quickstart_vqa}
        # `export CKPT OUT_DIR` reads as a sentence; bench and quickstart take --flags only
        positional = argv[0] == "export"
        args = [_underscore_flag(arg) for arg in argv[1:]]
        auto_cli(commands[argv[0]], args=args, prog=f"tokensift {argv[0]}", as_positional=positional)
        return
    TokensiftCLI(args=argv)


if __name__ == "__main__":
    main()
