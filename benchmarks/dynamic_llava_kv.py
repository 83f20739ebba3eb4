"""Dynamic-LLaVA's output-text predictor on a multi-token answer task: answer accuracy and KV-cache memory of
``generate()`` with the generated tokens' KV entries evicted, against the unpruned model, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dynamic_llava_kv.py [--out runs/dynamic_llava_kv]

Task ("read every digit"): digit VQA's scenes (2..4 handwritten digits, one per quadrant of a 32 px canvas, 8 px
patches: 16 image tokens) with one question, "read every digit in <image> ? answer :", whose answer names each
occupied quadrant in reading order with its digit, then ``end``: ``top left 3 bottom right 7 end`` (7 to 13
tokens). Built here on :class:`tokensift.data.digit_vqa.DigitVQA` (its scenes, its vocabulary plus three words
appended), not a question type of the library.

Stages, all in this process (one thread):

1. a tiny LLaVA (CLIP d48 × 2 → Llama d64 × 3) trained from scratch on the task by ``MLLMPretrainer`` (answer loss +
   the digit / half-canvas alignment term);
2. ``dynamic_llava`` with ``text_predictor`` (eviction from decoder layer 1, its site llm.1) trained on the frozen
   model by ``MLLMScorerTrainer`` in mask mode (teacher-forced answers, the answer tokens' policy as a key bias, the
   text budget term at ``text_keep_ratio`` 0.5; visual keep ratios drawn in [0.5, 1]);
3. greedy ``generate()`` on the test prompts (left-padded batches, stopping at ``end``): unpruned, the
   output-text predictor alone (visual keep 1), and with the vision predictor at visual keep 0.5.

A control row evicts the same share of generated entries at random (a coin per sample and step).

Printed per row: exact-match answer accuracy and per-token accuracy (teacher-free: the generated answer against the
reference, position by position), the generated tokens whose KV entry stayed in layers >= 1, and the KV cache at the
end of each batch's ``generate()`` (bytes of every layer's key / value tensors, padding slots included; the live
entries per sample), relative to the unpruned run on the same prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import lightning as L
import torch

from tokensift.data.digit_vqa import QUADRANTS, DigitVQA, DigitVQADataModule, _vocabulary
from tokensift.data.vqa import IMAGE_TOKEN, build_word_tokenizer

EXTRA_WORDS = ("read", "every", "end")  # appended after digit VQA's vocabulary: its ids do not move
QUESTION = f"read every digit in {IMAGE_TOKEN} ? answer :"


def read_tokenizer():
    return build_word_tokenizer([*_vocabulary(), *EXTRA_WORDS])


class ReadDigitsVQA(DigitVQA):
    """Digit VQA's scenes with one question: read every digit, quadrant by quadrant (a multi-token answer)."""

    def __init__(self, split: str = "train", num_samples: int | None = None, *, tokenizer=None, **kwargs):
        kwargs["question_types"] = ("position",)  # the scene draw; the question is replaced below
        super().__init__(split, num_samples, tokenizer=tokenizer or read_tokenizer(), **kwargs)
        words = [str(d) for d in range(10)] + ["top", "bottom", "left", "right", "end"]
        self.answer_token_ids = self.tokenizer.convert_tokens_to_ids(words)

    def sample_spec(self, index: int):
        spec = super().sample_spec(index)
        classes = self.digit_classes(spec)
        parts = [f"{QUADRANTS[d.quadrant]} {c}" for d, c in zip(spec.digits, classes, strict=True)]
        answer = " ".join([*parts, "end"])
        return dataclasses.replace(spec, answer=answer, relevant=tuple(range(len(spec.digits))))

    def question(self, spec) -> str:
        return QUESTION


class ReadDigitsDataModule(DigitVQADataModule):
    dataset_class = ReadDigitsVQA


def random_eviction(method, rate: float):
    """The trained method with its output-text decisions replaced by a per-(sample, step) coin of keep probability
    ``rate`` (the control: the same share of generated entries evicted, blind to the tokens)."""
    from tokensift.scorers.dynamic_llava import DynamicLLaVAMethod

    class RandomEviction(DynamicLLaVAMethod):
        def generated_keep(self, tokens):
            return (tokens.uniform(1, "benchmark.random_eviction") < rate) & tokens.candidates

    control = RandomEviction(dataclasses.replace(method.config))
    control.load_state_dict(method.state_dict())
    return control.eval()


def data_module(batch_size: int, train_samples: int, test_samples: int) -> ReadDigitsDataModule:
    return ReadDigitsDataModule(
        batch_size=batch_size,
        train_samples=train_samples,
        val_samples=64,
        test_samples=test_samples,
        canvas_size=32,
        patch_size=8,
        digit_scale=1,
    )


def pretrain(data, out: Path, steps: int, seed: int) -> Path:
    from tokensift.backbones.pretrain_mllm import MLLMPretrainer

    L.seed_everything(seed)
    module = MLLMPretrainer(
        "llava", data, lr=3e-3, vision_hidden_size=48, vision_layers=2, text_hidden_size=64, text_layers=3
    )
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    module.model.eval().save_pretrained(out)
    return out


def train_predictor(data, backbone: Path, steps: int, seed: int):
    from tokensift.trainer import MLLMScorerTrainer

    L.seed_everything(seed)
    module = MLLMScorerTrainer(
        str(backbone),
        method="dynamic_llava",
        method_options={"layer": 1, "text_predictor": True, "text_keep_ratio": 0.5, "text_min_length": 4},
        keep_ratio_range=(0.5, 1.0),
        eval_keep_ratios=[0.5],
        lr=3e-3,
        seed=seed,
    )
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    module.handle.remove()
    return module.backbone.eval(), module.method.eval()


def adapt_layers(model) -> list:
    from tokensift.backbones import adapt

    return list(adapt(model).layers)


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def evaluate(model, data, method=None, keep_ratio: float = 1.0, batch_size: int = 64) -> dict:
    """Greedy answers on the test prompts; accuracy and the KV cache left by each batch's ``generate()``."""
    import tokensift as ts

    dataset = data.build("test")
    tokenizer = data.tokenizer
    end = tokenizer.convert_tokens_to_ids("end")
    allowed = set(dataset.answer_token_ids)
    suppress = [i for i in range(len(tokenizer)) if i not in allowed]
    prompts, full = data.collator(with_answer=False), data.collator(with_answer=True)
    exact = tokens_right = tokens_total = 0
    kv_bytes = live = 0
    kept = decided = fed = 0
    handle = ts.apply(model, method, keep_ratio=keep_ratio) if method is not None else None
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            prompt, reference = prompts(items), full(items)
            answers = [item["input_ids"][item["labels"] != -100] for item in items]
            if handle is not None:
                handle.set_samples(prompt["index"])
            with torch.no_grad():
                out = model.generate(
                    input_ids=prompt["input_ids"],
                    attention_mask=prompt["attention_mask"],
                    pixel_values=prompt["pixel_values"],
                    max_new_tokens=max(len(a) for a in reference["labels"]) + 2,
                    do_sample=False,
                    suppress_tokens=suppress,
                    eos_token_id=end,
                    pad_token_id=data.pad_token_id,
                    return_dict_in_generate=True,
                )
            generated = out.sequences[:, prompt["input_ids"].shape[1] :]
            for row, answer in zip(generated, answers, strict=True):
                produced = row[: len(answer)]
                right = produced == answer[: len(produced)]
                tokens_right += int(right.sum())
                tokens_total += len(answer)
                exact += int(len(produced) == len(answer) and bool(right.all()))
            cache = out.past_key_values
            kv_bytes += cache_bytes(cache)
            layers = len(cache.layers)
            prompt_entries = int(prompt["attention_mask"].sum()) * layers
            steps = generated.shape[1] - 1  # the last token is never fed back
            fed += steps * len(items)
            if handle is not None and handle.last_records:  # visual tokens dropped from the site's layer on
                site = int(handle.last_records[-1].site.split(".")[1])
                dropped = (handle.last_records[-1].num_visual - handle.last_records[-1].kept_visual).sum()
                prompt_entries -= int(dropped) * (layers - site)
            records = handle.last_generated_records if handle is not None else []
            if records:
                record = records[0]
                kept += int(record.kept.sum())
                decided += int(record.num.sum())
                generated_entries = int(record.num.sum()) * record.layer + int(record.kept.sum()) * (
                    layers - record.layer
                )
            else:
                kept += steps * len(items)
                decided += steps * len(items)
                generated_entries = steps * len(items) * layers
            live += prompt_entries + generated_entries
    finally:
        if handle is not None:
            handle.remove()
    return {
        "exact": exact / len(dataset),
        "token_acc": tokens_right / tokens_total,
        "kv_bytes": kv_bytes,
        "live_entries": live / len(dataset),
        "generated_kept": kept / max(decided, 1),
        "steps": fed / len(dataset),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/dynamic_llava_kv")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--predictor-steps", type=int, default=600)
    parser.add_argument("--test-samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", help="a tiny LLaVA saved by an earlier run (OUT/backbone): skip stage 1")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = data_module(32, args.pretrain_steps * 32, args.test_samples)
    started = time.perf_counter()
    backbone = (
        Path(args.backbone) if args.backbone else pretrain(data, out / "backbone", args.pretrain_steps, args.seed)
    )
    pretrain_seconds = time.perf_counter() - started
    model, method = train_predictor(data, backbone, args.predictor_steps, args.seed)
    train_seconds = time.perf_counter() - started - pretrain_seconds
    rows = [("unpruned", None, 1.0), ("text predictor (visual keep 1)", method, 1.0)]
    rows.append(("text + vision predictor (visual keep 0.5)", method, 0.5))
    results = [(name, evaluate(model, data, m, ratio)) for name, m, ratio in rows]
    rate = results[1][1]["generated_kept"]
    control = evaluate(model, data, random_eviction(method, rate), 1.0)
    results.append((f"random eviction, keep {rate:.2f} (visual keep 1)", control))
    eval_seconds = time.perf_counter() - started - pretrain_seconds - train_seconds
    base = results[0][1]
    print(
        f"\nread-every-digit VQA: {args.test_samples} test prompts, answers of 7..13 tokens; tiny LLaVA with "
        f"{len(adapt_layers(model))} decoder layers; generated entries evicted from layer {method.kv_eviction_layer}"
    )
    header = ("row", "exact", "tok acc", "decode steps", "gen. KV kept", "KV MiB", "vs unpr.", "live", "vs unpr.")
    print(f"{header[0]:44s}" + "".join(f"{h:>13s}" for h in header[1:]))
    for name, r in results:
        values = (
            f"{r['exact']:.3f}",
            f"{r['token_acc']:.3f}",
            f"{r['steps']:.2f}",
            f"{r['generated_kept']:.3f}",
            f"{r['kv_bytes'] / 2**20:.2f}",
            f"{r['kv_bytes'] / base['kv_bytes']:.3f}",
            f"{r['live_entries']:.1f}",
            f"{r['live_entries'] / base['live_entries']:.3f}",
        )
        print(f"{name:44s}" + "".join(f"{v:>13s}" for v in values))
    print(
        "decode steps: tokens fed back per sample (a batch runs until its last row says `end`); gen. KV kept: share "
        "of them whose KV entry stayed in the evicting layers; KV MiB: key / value tensors left by each batch's "
        "generate(), summed (padding slots included); live: KV entries per sample, summed over layers."
    )
    print(f"time: pretrain {pretrain_seconds:.0f} s, predictor {train_seconds:.0f} s, evaluation {eval_seconds:.0f} s")


if __name__ == "__main__":
    main()
