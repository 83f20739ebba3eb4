"""Training cost of a scorer on a frozen ViT vs fine-tuning the whole ViT, and inference speedup.

    .venv/bin/python benchmarks/train_cost.py [--backbone runs/quickstart/backbone] [--batch-size 64]

One run times, on each shape (default: the demo's small ViT and ViT-Tiny), one full fine-tune step and three
``dynamicvit`` scorer steps on the frozen ViT:

- mask: the default path (teacher forward + a full-length masked forward with policy attention);
- removal, cold: ``train_by_removal`` (tokens removed after the block that follows each site) with a teacher pass,
  what the first epoch costs;
- removal, warm: the same with the teacher's logits from the cache, what every later epoch costs.

The variants run round-robin, one step each per round, so a load change on shared cores hits them alike; the
printed times are medians over rounds and the ratios medians of the per-round ratios. Without --backbone a
random-init ViT of each shape is used (timings do not depend on weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

import tokensift as ts
from tokensift.backbones.pretrain import BackboneClassifier
from tokensift.trainer import ScorerTrainer
from tokensift.trainer.losses import LossWeights

VIT_TINY = {
    "hidden_size": 192,
    "num_hidden_layers": 12,
    "num_attention_heads": 3,
    "intermediate_size": 768,
    "image_size": 224,
    "patch_size": 16,
}
SHAPES = {"demo": {}, "vit-tiny": VIT_TINY}  # demo: BackboneClassifier's defaults (d64, 4 blocks, 64 patches)


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def round_robin(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each step per round: every round runs each step once, in the dict's order."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def training_steps(backbone: str, batch_size: int) -> tuple[dict[str, Callable[[], None]], ScorerTrainer]:
    """One optimizer step of each variant on one fixed batch (the warm cache holds its teacher logits)."""
    mask = ScorerTrainer(backbone)
    removal = {"method_options": {"train_by_removal": True}, "loss": LossWeights(tokens=0.0)}
    cold = ScorerTrainer(backbone, teacher_cache=False, **removal)
    warm = ScorerTrainer(backbone, teacher_cache=True, **removal)
    full = BackboneClassifier()
    full.model = type(mask.backbone).from_pretrained(backbone)
    image = mask.backbone.config.image_size
    num_labels = int(mask.backbone.config.num_labels)
    batch = {
        "pixel_values": torch.randn(batch_size, 3, image, image),
        "labels": torch.randint(0, num_labels, (batch_size,)),
        "index": torch.arange(batch_size),
    }

    def step_of(module) -> Callable[[], None]:
        module.train()
        module.log = lambda *a, **k: None  # no trainer attached: logging is a no-op here
        trained = module.method.parameters() if isinstance(module, ScorerTrainer) else module.parameters()
        optimizer = torch.optim.AdamW(trained)

        def step() -> None:
            optimizer.zero_grad()
            module.training_step(batch, 0).backward()
            optimizer.step()

        return step

    steps = {
        "full fine-tune (fwd + bwd + AdamW)": step_of(full),
        "scorer, mask (teacher fwd + masked fwd + bwd)": step_of(mask),
        "scorer, removal, cold (teacher fwd + pruned fwd + bwd)": step_of(cold),
        "scorer, removal, warm (cached teacher + pruned fwd + bwd)": step_of(warm),
    }
    return steps, mask


def report_training(name: str, steps: dict[str, Callable[[], None]], repeats: int) -> None:
    times = round_robin(steps, repeats)
    full_name = next(iter(steps))
    print(f"\n== {name}: training step, median of {repeats} rounds ({torch.get_num_threads()} threads)")
    for variant, seconds in times.items():
        line = f"{variant:<58} {statistics.median(seconds) * 1e3:9.1f} ms"
        if variant != full_name:
            ratios = [t / f for t, f in zip(seconds, times[full_name], strict=True)]
            line += f"   ratio to full fine-tune {statistics.median(ratios):.2f}"
        print(line)


def report_inference(scorer: ScorerTrainer, backbone: str, batch_size: int, repeats: int, tmp: str) -> None:
    model = type(scorer.backbone).from_pretrained(backbone).eval()
    image = model.config.image_size
    pixel_values = torch.randn(batch_size, 3, image, image)
    with torch.no_grad():
        t_unpruned = median_seconds(lambda: model(pixel_values=pixel_values), repeats)
        print(f"inference, unpruned: {t_unpruned * 1e3:.1f} ms")
        artifact = f"{tmp}/artifact"
        ts.save_artifact(scorer.method, scorer.adapter.fingerprint(), artifact, overwrite=True)
        for method in ["random", "l2norm", "cls_attention", "tome", "divprune", artifact]:
            label = "dynamicvit" if method == artifact else method
            with ts.apply(model, method, keep_ratio=0.5):
                t = median_seconds(lambda: model(pixel_values=pixel_values), repeats)
            print(f"inference, {label:>13} keep_ratio=0.5: {t * 1e3:7.1f} ms  speedup x{t_unpruned / t:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="save_pretrained ViT directory (default: random init)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--shapes",
        default="demo,vit-tiny",
        help=f"random-init shapes to time, comma-separated, of {sorted(SHAPES)} (ignored with --backbone or --vit)",
    )
    parser.add_argument(
        "--vit",
        default="",
        help=f"one random-init ViT shape as JSON instead of --shapes, e.g. '{json.dumps(VIT_TINY)}' (ViT-Tiny)",
    )
    parser.add_argument("--no-inference", action="store_true", help="time training only")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        if args.backbone is not None:
            backbones = {args.backbone: args.backbone}
        else:
            shapes = {"--vit": json.loads(args.vit)} if args.vit else {}
            for name in [] if args.vit else [s.strip() for s in args.shapes.split(",") if s.strip()]:
                if name not in SHAPES:
                    parser.error(f"--shapes: unknown shape {name!r}; choose from {sorted(SHAPES)}")
                shapes[name] = SHAPES[name]
            backbones = {}
            for name, shape in shapes.items():
                backbones[name] = f"{tmp}/{name}"
                BackboneClassifier(**shape).model.save_pretrained(backbones[name])
        print(f"batch {args.batch_size}")
        for name, backbone in backbones.items():
            steps, scorer = training_steps(backbone, args.batch_size)
            report_training(name, steps, args.repeats)
            if not args.no_inference:
                report_inference(scorer, backbone, args.batch_size, args.repeats, tmp)


if __name__ == "__main__":
    main()
