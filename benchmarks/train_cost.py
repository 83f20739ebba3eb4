"""Training cost of a scorer on a frozen ViT vs fine-tuning the whole ViT, and inference speedup.

    .venv/bin/python benchmarks/train_cost.py [--backbone runs/quickstart/backbone] [--batch-size 64]

All numbers are medians over repeats measured in this one run; the printed ratios are what to quote.
Without --backbone a random-init ViT of the demo's shape is used (timings do not depend on weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

import tokensift as ts
from tokensift.backbones.pretrain import BackboneClassifier
from tokensift.trainer import ScorerTrainer


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="save_pretrained ViT directory (default: random init)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--vit",
        default="",
        help='random-init ViT shape as JSON, e.g. \'{"hidden_size": 192, "num_hidden_layers": 12, '
        '"num_attention_heads": 3, "intermediate_size": 768, "image_size": 224, "patch_size": 16}\' (ViT-Tiny)',
    )
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        backbone = args.backbone
        if backbone is None:
            backbone = f"{tmp}/vit"
            BackboneClassifier(**json.loads(args.vit or "{}")).model.save_pretrained(backbone)
        scorer = ScorerTrainer(backbone)
        scorer.train()
        full = BackboneClassifier()
        full.model = type(scorer.backbone).from_pretrained(backbone)
        full.train()
        image = scorer.backbone.config.image_size
        batch = {
            "pixel_values": torch.randn(args.batch_size, 3, image, image),
            "labels": torch.randint(0, 10, (args.batch_size,)),
        }
        scorer.log = full.log = lambda *a, **k: None  # no trainer attached: logging is a no-op here
        scorer_opt = torch.optim.AdamW(scorer.method.parameters())
        full_opt = torch.optim.AdamW(full.parameters())

        def scorer_step():
            scorer_opt.zero_grad()
            scorer.training_step(batch, 0).backward()
            scorer_opt.step()

        def full_step():
            full_opt.zero_grad()
            full.training_step(batch, 0).backward()
            full_opt.step()

        t_scorer = median_seconds(scorer_step, args.repeats)
        t_full = median_seconds(full_step, args.repeats)
        print(f"batch {args.batch_size}, {torch.get_num_threads()} threads, median of {args.repeats}")
        print(f"scorer step on frozen ViT (teacher fwd + masked fwd + scorer bwd): {t_scorer * 1e3:8.1f} ms")
        print(f"full fine-tune step of the same ViT (fwd + bwd + AdamW):           {t_full * 1e3:8.1f} ms")
        print(f"ratio scorer / full fine-tune: {t_scorer / t_full:.2f}")

        model = type(scorer.backbone).from_pretrained(backbone).eval()
        pixel_values = batch["pixel_values"]
        with torch.no_grad():
            t_unpruned = median_seconds(lambda: model(pixel_values=pixel_values), args.repeats)
            print(f"\ninference, unpruned: {t_unpruned * 1e3:.1f} ms")
            artifact = f"{tmp}/artifact"
            ts.save_artifact(scorer.method, scorer.adapter.fingerprint(), artifact)
            for method in ["random", "l2norm", "cls_attention", "tome", "divprune", artifact]:
                name = "dynamicvit" if method == artifact else method
                with ts.apply(model, method, keep_ratio=0.5):
                    t = median_seconds(lambda: model(pixel_values=pixel_values), args.repeats)
                print(f"inference, {name:>13} keep_ratio=0.5: {t * 1e3:7.1f} ms  speedup x{t_unpruned / t:.2f}")


if __name__ == "__main__":
    main()
