"""``tokensift`` console script: LightningCLI for fit/validate/test, plain typed functions for the rest."""

from __future__ import annotations

import json
import signal
import sys

from jsonargparse import auto_cli
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tokensift.fit_cli import TokensiftCLI

TOOL_COMMANDS = ("export", "card", "bench", "quickstart", "quickstart-vqa", "quickstart-video", "pretrain-mllm", "show")
# flags of a tool command that take several values as separate words (`--images a.png b.jpg`), as a shell glob gives
LIST_FLAGS = {"show": ("--images", "--sites")}


def _underscore_flag(arg: str) -> str:
    """Accept ``--keep-ratios`` as well as ``--keep_ratios``."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg.partition("=")
    return "--" + name[2:].replace("-", "_") + sep + value


def _gather_words(args: list[str], flags: tuple[str, ...]) -> list[str]:
    """``--images a.png b.jpg`` -> ``--images ["a.png", "b.jpg"]``: jsonargparse reads one word per flag."""
    gathered: list[str] = []
    k = 0
    while k < len(args):
        if args[k] not in flags:
            gathered.append(args[k])
            k += 1
            continue
        end = k + 1
        while end < len(args) and not args[end].startswith("--"):
            end += 1
        words = args[k + 1 : end]
        gathered += [args[k], json.dumps(words) if words else ""]
        k = end
    return gathered


def main(argv: list[str] | None = None) -> None:
    given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOL_COMMANDS:
        from tokensift.backbones.pretrain_mllm import pretrain_mllm_command
        from tokensift.bench import bench
        from tokensift.export.artifact import write_model_card
        from tokensift.export.checkpoint import export
        from tokensift.quickstart import quickstart
        from tokensift.quickstart_video import quickstart_video
        from tokensift.quickstart_vqa import quickstart_vqa
        from tokensift.show import show

        commands = {
            "export": export,
            "card": write_model_card,
            "bench": bench,
            "quickstart": quickstart,
            "quickstart-vqa": quickstart_vqa,
            "quickstart-video": quickstart_video,
            "pretrain-mllm": pretrain_mllm_command,
            "show": show,
        }
        # `export CKPT OUT_DIR` / `card ARTIFACT_DIR` read as sentences; bench and quickstart take --flags only
        positional = argv[0] in ("export", "card")
        args = _gather_words([_underscore_flag(arg) for arg in argv[1:]], LIST_FLAGS.get(argv[0], ()))
        auto_cli(commands[argv[0]], args=args, prog=f"tokensift {argv[0]}", as_positional=positional)
        return
    try:
        # args=None: LightningCLI reads sys.argv itself (given both, it warns that they were given twice)
        TokensiftCLI(args=None if given is None else argv)
    except SIGTERMException:
        # Lightning ends a SIGTERM'd fit with SystemExit(None), status 0; a stopped run is not a finished one
        print(
            "tokensift: stopped by SIGTERM after the step in progress; last.ckpt holds it: resume with "
            "--ckpt_path <checkpoints>/last.ckpt.",
            file=sys.stderr,
        )
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
