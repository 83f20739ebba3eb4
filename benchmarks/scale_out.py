"""Step time and peak memory per rank: DDP vs DeepSpeed ZeRO-2 vs ZeRO-3 on one recipe, measured in one run.

    .venv/bin/python benchmarks/scale_out.py [--devices 2] [--steps 12] [--batch-size 8] [--precision 32-true]

The recipe is DynamicViT-style: a scorer plus the backbone itself trained at 0.01x the learning rate, so
there is optimizer state for ZeRO to shard (with a frozen backbone only the small scorer has any). Each
strategy runs as its own `devices`-process fit of the same random-init ViT on the same data; every rank
reports the median wall time of its steps after `--warmup` steps and its peak memory. On GPU that is
``torch.cuda.max_memory_allocated``; on CPU it is the growth of the process's resident memory from just
before the strategy sets up (model built, nothing sharded yet) to the largest value sampled at the end
of each backward and each step, which counts gradients, optimizer state and ZeRO's buffers (glibc keeps
freed activations resident, so it approximates the peak). The ratios to DDP are what to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

STRATEGIES = ("ddp", "deepspeed_stage_2", "deepspeed_stage_3")


class StepStats(Callback):
    """Per-rank step wall times and peak memory, written as JSON at the end of the fit."""

    def __init__(self, out_dir: Path, warmup: int):
        self.out_dir, self.warmup = Path(out_dir), warmup
        self.step_times: list[float] = []
        self.baseline = self.peak = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.baseline = self.peak = _resident_bytes()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.peak = max(self.peak, _resident_bytes())  # gradients are all there now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.step_times.append(time.perf_counter() - self._start)
        self.peak = max(self.peak, _resident_bytes())

    def on_fit_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            peak, kind = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
        else:
            peak, kind = self.peak - self.baseline, "cpu resident growth"
        report = {
            "rank": trainer.global_rank,
            "step_seconds": statistics.median(self.step_times[self.warmup :]),
            "steps_timed": len(self.step_times[self.warmup :]),
            "peak_bytes": peak,
            "peak_kind": kind,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "trainable_parameters": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> None:
    """One strategy's fit (Lightning re-runs this same command line for every other rank)."""
    from tokensift.data import ClutteredDigitsDataModule
    from tokensift.trainer import ScorerTrainer

    torch.set_num_threads(1)
    seed_everything(0)
    model = ScorerTrainer(args.backbone, backbone_lr_factor=0.01, keep_ratio_range=(0.25, 0.75))
    data = ClutteredDigitsDataModule(batch_size=args.batch_size, train_samples=args.batch_size * args.devices * 64)
    trainer = Trainer(
        accelerator="auto",
        devices=args.devices,
        strategy=args.worker,
        precision=args.precision,
        max_steps=args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StepStats(args.out, args.warmup)],
    )
    trainer.fit(model, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2, help="processes (GPUs) per strategy")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed")
    parser.add_argument(
        "--vit",
        default='{"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536}',
        help="random-init ViT shape (JSON; default DeiT-S's) on the demo's 64x64 canvas, patch 8",
    )
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup >= args.steps:
        parser.error(f"--warmup ({args.warmup}) must be smaller than --steps ({args.steps})")
    if args.worker:
        worker(args)
        return

    from tokensift.backbones.pretrain import BackboneClassifier

    env = os.environ | {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "")}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        backbone = Path(tmp) / "vit"
        torch.manual_seed(0)
        BackboneClassifier(**json.loads(args.vit)).model.save_pretrained(backbone)
        for strategy in args.strategies:
            out = Path(tmp) / strategy
            out.mkdir()
            command = [sys.executable, __file__, f"--worker={strategy}", f"--backbone={backbone}", f"--out={out}"]
            command += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in _FORWARDED]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{strategy} failed:\n{done.stderr[-4000:]}")
            results[strategy] = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    _print_table(args, results)


_FORWARDED = ("devices", "steps", "warmup", "batch_size", "precision")


def _print_table(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    reference = results.get("ddp") or next(iter(results.values()))
    ref_time = statistics.mean(r["step_seconds"] for r in reference)
    ref_peak = statistics.mean(r["peak_bytes"] for r in reference)
    first = reference[0]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(
        f"{device}; {args.devices} ranks x batch {args.batch_size}, precision {args.precision}; ViT {args.vit}; "
        f"{first['trainable_parameters']:,} trainable parameters; median of {first['steps_timed']} steps after "
        f"{args.warmup}; memory = {first['peak_kind']}"
    )
    header = ("strategy", "rank", "step ms", "peak MiB", "max RSS MiB", "time/DDP", "mem/DDP")
    print("{:<20} {:>4} {:>9} {:>9} {:>12} {:>9} {:>8}".format(*header))
    for strategy, ranks in results.items():
        for r in ranks:
            print(
                f"{strategy:<20} {r['rank']:>4} {r['step_seconds'] * 1e3:>9.1f} {r['peak_bytes'] / 2**20:>9.1f} "
                f"{r['max_rss_bytes'] / 2**20:>12.1f} {r['step_seconds'] / ref_time:>9.2f} "
                f"{r['peak_bytes'] / ref_peak:>8.2f}"
            )


if __name__ == "__main__":
    main()
