"""What pruning inside the vision tower saves: STTS's training step and prefill at keep 0.5 vs unpruned, one run.

    .venv/bin/python benchmarks/stts_train_cost.py [--backbone runs/video/molmo2] [--frames 16] [--batch-size 4]

One batch of ``--frames``-frame videos of video digit VQA. Training (forward + backward + AdamW): the whole model
fine-tuned by its answer loss unpruned, against the same with STTS at keep 0.5 (``MLLMScorerTrainer(method="stts")``
with the model's weights trained too: removal in gather mode, what the STTS paper's 1.62x compares), and against the
recipe's step (``configs/stts_video_vqa.yaml``: only the scorer trains, the model frozen, no teacher pass).
Inference: one prefill of the frozen model unpruned vs with the trained-or-not scorer applied at keep 0.5. Medians over
``--repeats`` interleaved rounds in this one run; the printed ratios are what to quote. Without ``--backbone`` a
random-init model of the demo's shape (``quickstart-video``'s ``pretrain_mllm`` defaults) is used: timings do not
depend on the weights. The anchor (STTS paper): 1.62x faster training, 1.61x faster inference at 50% pruned.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable

import torch
from train_cost import round_robin  # benchmarks/ is the script's folder, first on sys.path

import tokensift as ts

# configs/stts_video_vqa.yaml's options (keep them in step)
RECIPE_OPTIONS = dict(
    method="stts",
    method_options={"sites": ["vit.3"]},
    answer_weight=1.0,
    distill_weight=0.0,
    lr=1e-3,
    warmup_fraction=0.0,
)


def report(title: str, times: dict[str, list[float]], reference: str) -> None:
    print(f"\n== {title} (median of {len(times[reference])} rounds, {torch.get_num_threads()} threads)")
    for name, seconds in times.items():
        line = f"{name:<52} {statistics.median(seconds) * 1e3:9.1f} ms"
        if name != reference:
            ratios = [r / t for t, r in zip(seconds, times[reference], strict=True)]
            line += f"   speedup vs {reference.split(' (')[0]} x{statistics.median(ratios):.2f}"
        print(line)


def main() -> None:
    from tokensift.backbones.pretrain_mllm import build_mllm
    from tokensift.backbones.vqa import mllm_inputs
    from tokensift.data import VideoDigitVQADataModule
    from tokensift.trainer import MLLMScorerTrainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="a video Molmo2 / Qwen2-VL folder (default: random init)")
    parser.add_argument("--family", default="molmo2", choices=["molmo2", "qwen2_vl"])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vision-layers", type=int, default=None, help="random init only (default: the demo's)")
    parser.add_argument("--packing", default="contiguous", choices=["contiguous", "ffd"], help="the packed rows' fill")
    parser.add_argument("--vision-hidden-size", type=int, default=None, help="random init only (default: the demo's)")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = VideoDigitVQADataModule(
        family=args.family, min_frames=args.frames, max_frames=args.frames, batch_size=args.batch_size,
        train_samples=args.batch_size, val_samples=args.batch_size, test_samples=args.batch_size,
    )  # fmt: skip
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))

    with tempfile.TemporaryDirectory() as tmp:
        backbone = args.backbone
        if backbone is None:
            backbone = f"{tmp}/model"
            sizes = {"vision_layers": args.vision_layers, "vision_hidden_size": args.vision_hidden_size}
            sizes = {key: value for key, value in sizes.items() if value is not None}
            build_mllm(args.family, data, **sizes).save_pretrained(backbone)
        trainers = {
            "stts keep 0.5, model fine-tuned (removal)": MLLMScorerTrainer(
                backbone, keep_ratio_range=(0.5, 0.5), **RECIPE_OPTIONS
            ),
            "stts keep 0.5, frozen model (the recipe)": MLLMScorerTrainer(
                backbone, keep_ratio_range=(0.5, 0.5), **RECIPE_OPTIONS
            ),
        }
        model_class = type(next(iter(trainers.values())).backbone)
        # the model trains with the scorer here (timing only: the trainer's own option keeps MLLMs frozen)
        trainers["stts keep 0.5, model fine-tuned (removal)"].backbone.requires_grad_(True)

        def step_of(module) -> Callable[[], None]:
            module.train()
            module.log = lambda *a, **k: None  # no trainer attached
            optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad])

            def step() -> None:
                optimizer.zero_grad()
                module.training_step(batch, 0).backward()
                optimizer.step()

            return step

        def full_step() -> Callable[[], None]:
            model = model_class.from_pretrained(backbone).train()
            optimizer = torch.optim.AdamW(model.parameters())
            inputs = mllm_inputs(model, batch)

            def step() -> None:
                optimizer.zero_grad()
                model(**inputs, labels=batch["labels"]).loss.backward()
                optimizer.step()

            return step

        reference = "model fine-tuned, unpruned"
        steps = {reference: full_step(), **{name: step_of(module) for name, module in trainers.items()}}
        times = round_robin(steps, args.repeats)
        report(f"training step, {args.batch_size} videos x {args.frames} frames", times, reference)

        model = model_class.from_pretrained(backbone).eval()
        scorer = trainers["stts keep 0.5, frozen model (the recipe)"]
        artifact = f"{tmp}/stts"
        ts.save_artifact(scorer.method, scorer.adapter.fingerprint(), artifact, overwrite=True)
        prompt = mllm_inputs(model, batch)
        handle = ts.apply(model, artifact, keep_ratio=0.5)
        handle._vision_handle.packing = args.packing  # ts.apply takes no handle options yet
        handle.enabled = False

        def prefill(enabled: bool) -> Callable[[], None]:
            def run() -> None:
                handle.enabled = enabled
                with torch.no_grad():
                    model(**prompt, logits_to_keep=1)

            return run

        times = round_robin({"unpruned prefill": prefill(False), "stts keep 0.5 prefill": prefill(True)}, args.repeats)
        report("inference prefill (teacher-forced prompt + answer)", times, "unpruned prefill")
        waste = [r.waste for r in handle._vision_handle.last_records if r.rows]
        if waste:
            print(f"packing waste of the last prefill: {statistics.mean(waste):.3f} (padding slots / all slots)")
        handle.remove()


if __name__ == "__main__":
    main()
