"""``tokensift fit | validate | test``: LightningCLI with tokensift's trainers, any data module and its defaults.

Its own module so that the typed entry points (``quickstart``) can run a fit without importing the console
script that dispatches to them.
"""

from __future__ import annotations

import copy
from typing import Any

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.cli import LightningCLI

DEFAULT_CALLBACKS = [
    {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
    # best by mean pruned validation accuracy, and the latest weights (Lightning's save_last only
    # refreshes when the best improves)
    {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"monitor": "val/acc", "mode": "max", "filename": "best"},
    },
    # last.ckpt at each epoch end, on SIGTERM, and every `checkpoint_every_n_steps` steps when set
    {"class_path": "tokensift.trainer.reliability.LastCheckpoint"},
]
DEFAULT_LOGGER = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}
# each parameter group's learning rate per step (warmup + cosine) next to the losses; added only to a run that logs
LR_MONITOR = {
    "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
    "init_args": {"logging_interval": "step"},
}


class ModelSummary(RichModelSummary):
    """Lightning's Rich model summary without the FLOPs column and total when nothing was measured.

    Lightning counts FLOPs by running ``example_input_array`` through the module; the trainers have none (their
    step runs the backbone several times at sampled budgets), so it would print ``Total FLOPs: 0``. ``tokensift
    bench`` reports analytic FLOPs per method and budget instead.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if total_flops:
            RichModelSummary.summarize(
                summary_data,
                total_parameters,
                trainable_parameters,
                model_size,
                total_training_modes,
                total_flops,
                **summarize_kwargs,
            )
            return
        from lightning.pytorch.utilities.model_summary.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in ("Params", "Params per Device") else "left")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        grid = Table.grid(expand=True)
        grid.add_column()
        frozen = total_parameters - trainable_parameters
        grid.add_row(f"[bold]Trainable params[/]: {get_human_readable_count(int(trainable_parameters))}")
        grid.add_row(f"[bold]Non-trainable params[/]: {get_human_readable_count(int(frozen))}")
        grid.add_row(f"[bold]Total params[/]: {get_human_readable_count(int(total_parameters))}")
        grid.add_row(f"[bold]Total estimated model params size (MB)[/]: {get_formatted_model_size(model_size)}")
        grid.add_row(f"[bold]Modules in train mode[/]: {total_training_modes['train']}")
        grid.add_row(f"[bold]Modules in eval mode[/]: {total_training_modes['eval']}")
        console.print(grid)


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
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int | None,
            default=None,
            help="Also write last.ckpt every N optimizer steps (it is always written at each epoch end and on "
            "SIGTERM), so a killed fit loses at most N steps: resume with --ckpt_path .../last.ckpt.",
        )
        parser.set_defaults(
            {
                "model": {"class_path": "tokensift.trainer.ScorerTrainer"},
                "trainer.callbacks": DEFAULT_CALLBACKS,
                "trainer.logger": DEFAULT_LOGGER,
            }
        )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            raise _first_union_error(error) from None

    def before_instantiate_classes(self) -> None:
        # the default Rich bar would make Lightning refuse `--trainer.enable_progress_bar false`
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("enable_progress_bar") is False and config.trainer.callbacks:
            config.trainer.callbacks = [
                c for c in config.trainer.callbacks if not str(c.get("class_path", "")).endswith("ProgressBar")
            ]
        _set_checkpoint_every_n_steps(config)
        _add_lr_monitor(config)
        callbacks = config.trainer.callbacks or []
        if config.trainer.get("enable_model_summary") is not False and not any(
            str(c.get("class_path", "")).endswith("ModelSummary") for c in callbacks
        ):
            # ours instead of Lightning's default one (its FLOPs column reads 0 here); added as a callback,
            # Lightning's own default is then turned off so it does not log that one was already given
            config.trainer.callbacks = [*callbacks, {"class_path": "tokensift.fit_cli.ModelSummary"}]
            config.trainer.enable_model_summary = False


def _first_union_error(error: ValueError) -> ValueError:
    """jsonargparse reports a model / data class that refused its arguments as "Does not validate against any of
    the Union subtypes", then one line per subtype; the first is the class's own message (which names the field)."""
    text = str(error)
    if "Union subtypes" not in text or "Errors:" not in text:
        return error
    lines = text.split("Errors:", 1)[1].splitlines()
    first = next((line.strip()[2:] for line in lines if line.strip().startswith("- ")), None)
    return ValueError(first) if first else error


def _add_lr_monitor(config) -> None:
    """Lightning's LearningRateMonitor among the callbacks unless the run has no logger (the monitor raises on one
    without: ``logger: false``, an empty list, ``barebones``) or the config already lists one (kept as it is)."""
    logger = config.trainer.get("logger")
    if logger is False or logger == [] or config.trainer.get("barebones"):
        return
    callbacks = config.trainer.callbacks or []
    if any(str(c.get("class_path", "")).endswith(".LearningRateMonitor") for c in callbacks):
        return
    config.trainer.callbacks = [*callbacks, copy.deepcopy(LR_MONITOR)]


def _set_checkpoint_every_n_steps(config) -> None:
    every = config.get("checkpoint_every_n_steps")
    if every is None:
        return
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"checkpoint_every_n_steps must be a positive integer (optimizer steps), got {every!r}.")
    last = [c for c in config.trainer.callbacks or [] if str(c.get("class_path", "")).endswith(".LastCheckpoint")]
    if not last:
        raise ValueError(
            "checkpoint_every_n_steps sets tokensift.trainer.reliability.LastCheckpoint's every_n_train_steps, and "
            "trainer.callbacks has none: add one, or set every_n_train_steps on your own ModelCheckpoint."
        )
    for callback in last:
        callback.init_args["every_n_train_steps"] = every
