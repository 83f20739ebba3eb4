"""``run_mllm_bench``: the benchmark on a multimodal LLM (LLaVA, Qwen2-VL) and a VQA data module.

``tokensift bench`` dispatches here when ``--model`` is a LLaVA / Qwen2-VL folder; the rows, files, table,
Pareto plot, timing, memory and interval code are the shared modules' (:mod:`~tokensift.bench.results`,
:mod:`~tokensift.bench.measure`, :mod:`~tokensift.bench.stats`). Per method × budget:

- ``accuracy``: answer accuracy on the test split (torchmetrics): the prompt (left-padded, ending in
  ``answer :``) goes through the model once and the prediction is the argmax of the next-token logits over
  the answer words (:mod:`tokensift.backbones.vqa` does the same and checks ``generate`` agrees).
- ``oracle_recall``: the fraction of the question's oracle patches whose visual token is still in the
  sequence after the method's last site (``handle.kept_orig_index``).
- ``flops_ratio``: analytic prefill FLOPs, ``(vision tower + LLM + scorer) / (vision tower + unpruned LLM)``
  (:func:`~tokensift.flops.mllm_vision_flops`, :func:`~tokensift.flops.mllm_prefill_flops`).
- ``speedup`` and ``mem_ratio``: one prefill forward of the timing batches, pruned vs unpruned, measured as
  the image bench does (back-to-back pairs; activation peak).
- exit methods (``dyvte``) take a decision ``threshold`` per row instead of a keep ratio (by default the
  keep-ratio list read as thresholds: 1 never exits) and report ``mean_exit_layer``.

The ``oracle`` row keeps the question's oracle patches first, then random ones, before the LLM: a yardstick
for what a text-conditioned selection could reach at each budget.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.backbones.loading import load_mllm_backbone
from tokensift.backbones.vqa import SUPPORTED_MODEL_TYPES, mllm_inputs
from tokensift.bench.measure import environment_metadata, measure_speed_and_memory
from tokensift.bench.oracle import MLLMOracleMethod
from tokensift.bench.results import MATCHED_FLOPS_NOTE, finalize_rows, summarize, write_results
from tokensift.bench.settings import bench_settings, torch_threads
from tokensift.bench.specs import ORACLE, UNPRUNED, MethodSpec, parse_fractions, parse_keep_ratios, parse_methods
from tokensift.bench.stats import (
    DEFAULT_FLOPS_RATIOS,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    Bootstrap,
    check_bootstrap,
    parse_flops_ratios,
)
from tokensift.export.artifact import Artifact, FingerprintMismatch
from tokensift.flops import mllm_prefill_flops, mllm_vision_flops
from tokensift.scorers import TokenMethod

MLLM_SITE_KINDS = ("pre_llm", "llm")
_DATA_ATTRIBUTES = ("answer_token_ids", "image_token_id", "num_patches", "grid_size", "collator", "build")


def parse_thresholds(thresholds: Sequence[float] | str, field: str = "thresholds") -> list[float]:
    """Exit thresholds in [0, 1] (1 never exits), distinct, highest first."""
    meaning = (
        "a threshold is the exit probability at which a sample's visual tokens leave (1 never exits, 0 exits at "
        "the first router)"
    )
    values = parse_fractions(
        thresholds, field, meaning=meaning, example="1,0.5,0.25,0.1", noun="exit probabilities", include_zero=True
    )
    if not values:
        raise ValueError(f"{field}: give at least one threshold in [0, 1], e.g. 1,0.5,0.25,0.1.")
    return values


def _method_of(built: TokenMethod | Artifact) -> TokenMethod:
    return built.method if isinstance(built, Artifact) else built


def _check_runs_on_mllms(specs: list[MethodSpec]) -> None:
    for spec in specs:
        method = _method_of(spec.build())
        if not set(method.site_kinds) & set(MLLM_SITE_KINDS):
            mllm = sorted(n for n, info in ts.methods().items() if set(info["sites"]) & set(MLLM_SITE_KINDS))
            raise ValueError(
                f"methods: {spec.entry!r} prunes vision-transformer blocks only and cannot run on a multimodal LLM; "
                f"methods for LLaVA / Qwen2-VL: {mllm} (learned: NAME:ARTIFACT_DIR)."
            )


def _check_data(datamodule: Any, model: nn.Module, model_path: Path) -> None:
    missing = [name for name in _DATA_ATTRIBUTES if not hasattr(datamodule, name)]
    if missing:
        raise ValueError(
            f"data: {type(datamodule).__name__} lacks {missing}; a multimodal LLM is benched on a VQA data module "
            "such as tokensift.data.DigitVQADataModule (answer words, image token, oracle patches)."
        )
    image_token = getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))
    if image_token != datamodule.image_token_id:
        raise ValueError(
            f"data: its image token id is {datamodule.image_token_id} but the model in {model_path} expects "
            f"{image_token}; bench the model on the data (and tokenizer) it was trained with (the 'data' entry of "
            "its tokensift_mllm.json)."
        )
    vision = model.config.vision_config
    channels = getattr(vision, "num_channels", getattr(vision, "in_channels", None))
    if channels is not None and channels != getattr(datamodule, "num_channels", channels):
        raise ValueError(
            f"data: images have {datamodule.num_channels} channels but the model in {model_path} reads {channels}; "
            f"set init_args.num_channels: {channels}."
        )
    size = getattr(vision, "image_size", None)  # LLaVA's tower has a fixed size; Qwen2-VL reads any grid
    if size is not None and size != getattr(datamodule, "image_size", size):
        raise ValueError(
            f"data: images are {datamodule.image_size} px but the model in {model_path} expects {size}; "
            f"set init_args.canvas_size: {size}."
        )
    vocab = int(model.get_input_embeddings().weight.shape[0])
    if max(datamodule.answer_token_ids) >= vocab:
        raise ValueError(
            f"data: answer token ids reach {max(datamodule.answer_token_ids)} but the model's vocabulary has {vocab} "
            "entries; give the data module the model's tokenizer."
        )


@dataclass
class _PreparedBatch:
    """One test batch, ready to run: the model's inputs and what the measures compare them with."""

    inputs: dict[str, Tensor]
    answer_index: Tensor  # [B] index of the right answer among the answer words
    oracle_mask: Tensor  # [B, P] the patches the question needs
    visual_positions: Tensor  # [B, P] index in the LLM input of each patch's visual token
    num_text: Tensor  # [B] text and special tokens (padding excluded)
    num_visual: Tensor  # [B]
    index: Tensor | None = None  # [B] dataset index of each sample: its random draws follow it, not the batch


def _prepare(model: nn.Module, batch: dict, answer_ids: Tensor, image_token_id: int, device) -> _PreparedBatch:
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    input_ids = batch["input_ids"]
    is_visual = input_ids == image_token_id
    num_visual = is_visual.sum(1)
    patches = batch["oracle_mask"].shape[1]
    if bool((num_visual != patches).any()):
        raise ValueError(
            f"data: samples hold {sorted(set(num_visual.tolist()))} image tokens but {patches} oracle patches; the "
            "bench needs one image per sample and one LLM token per patch (num_image_tokens: null)."
        )
    positions = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
    visual_positions = positions[is_visual].reshape(input_ids.shape[0], patches)
    answer_index = (batch["answer_id"].unsqueeze(1) == answer_ids.to(device)).long().argmax(1)
    return _PreparedBatch(
        inputs=mllm_inputs(model, batch),
        answer_index=answer_index,
        oracle_mask=batch["oracle_mask"].bool(),
        visual_positions=visual_positions,
        num_text=batch["attention_mask"].sum(1) - num_visual,
        num_visual=num_visual,
        index=batch.get("index"),
    )


def _kept_patches(handle, batch: _PreparedBatch) -> Tensor:
    """``[B, P]`` bool: patches whose visual token is still in the sequence after the method's last site."""
    kept = None if handle is None else handle.kept_orig_index
    if kept is None:  # unpruned, or a budget that dropped nothing: every site was skipped
        return torch.ones_like(batch.oracle_mask)
    length = int(batch.inputs["input_ids"].shape[1])
    present = torch.zeros(kept.shape[0], length + 1, dtype=torch.bool, device=kept.device)
    present.scatter_(1, torch.where(kept >= 0, kept, length), True)  # -1 padding slots -> a spare column
    return present.gather(1, batch.visual_positions.to(kept.device)).to(batch.oracle_mask.device)


class _MLLMEvaluator:
    """Runs and measures one (method, budget) on the prepared batches of one model."""

    def __init__(self, model, adapter, batches, timing, answer_ids, device, repeats, warmup):
        self.model, self.adapter, self.batches, self.timing = model, adapter, batches, timing
        self.answer_ids, self.device, self.repeats, self.warmup = answer_ids.to(device), device, repeats, warmup
        self._vision: dict[int, float] = {}

    def forward_fn(self, method: nn.Module | None, handle=None):
        def forward(batch: _PreparedBatch) -> Tensor:
            if isinstance(method, MLLMOracleMethod):
                method.oracle_mask = batch.oracle_mask
            if handle is not None and batch.index is not None:
                handle.set_samples(batch.index)
            # only the next-token logits are read: the LM head runs on the last position (a prefill)
            return self.model(**batch.inputs, logits_to_keep=1).logits[:, -1]

        return forward

    def vision_flops(self, num_visual: Tensor) -> float:
        total = 0.0
        for count in num_visual.tolist():
            if count not in self._vision:
                self._vision[count] = mllm_vision_flops(self.adapter, count)
            total += self._vision[count]
        return total

    def measure(self, label: str, kind: str, handle, method, keep_ratio=None, threshold=None) -> dict:
        forward = self.forward_fn(method, handle)
        correct = []
        hits = total = samples = 0
        llm = scorer = unpruned = vision = 0.0
        kept_last, exits = [], []
        with torch.no_grad():
            for batch in self.batches:
                logits = forward(batch)
                correct.append((logits[:, self.answer_ids].argmax(-1) == batch.answer_index).cpu())
                samples += int(batch.answer_index.shape[0])
                kept = _kept_patches(handle, batch)
                hits += int((kept & batch.oracle_mask).sum())
                total += int(batch.oracle_mask.sum())
                per_layer = None if handle is None else handle.visual_tokens_per_layer
                if per_layer is None:
                    per_layer = batch.num_visual.unsqueeze(1).repeat(1, self.adapter.num_layers)
                flops = mllm_prefill_flops(self.adapter, batch.num_text, per_layer, method, batch.num_visual)
                llm, scorer, unpruned = llm + flops["llm"], scorer + flops["scorer"], unpruned + flops["unpruned"]
                vision += self.vision_flops(batch.num_visual)
                kept_last.append(per_layer[:, -1].float())
                exits.append((per_layer > 0).sum(1).float())
        times, speedups, memory = measure_speed_and_memory(
            forward, self.timing, handle, self.repeats, self.warmup, self.device
        )
        decides_exits = bool(getattr(method, "decides_exits", False))
        per_sample = torch.cat(correct).double().numpy()
        return {
            "method": label,
            "kind": kind,
            "keep_ratio": keep_ratio,
            "keep_count": float(torch.cat(kept_last).mean()),  # visual tokens reaching the last layer, mean
            "num_patches": int(self.batches[0].oracle_mask.shape[1]),
            "accuracy": float(per_sample.mean()),
            "oracle_recall": hits / total if total else None,
            "flops": vision + llm + scorer,
            "flops_backbone": vision + llm,
            "flops_scorer": scorer,
            "flops_ratio": (vision + llm + scorer) / (vision + unpruned),
            "peak_mem_bytes": memory,
            "num_samples": samples,
            "sites": list(handle.sites) if handle is not None else [],
            "artifact": None,
            "threshold": threshold,
            "mean_exit_layer": float(torch.cat(exits).mean()) if decides_exits else None,
            "_correct": per_sample,
            "_times": times,
            "_speedups": speedups,
        }


def _apply(model: nn.Module, spec: MethodSpec, keep_ratio: float | None, threshold: float | None):
    built = MLLMOracleMethod() if spec.kind == ORACLE else spec.build()
    budget = {"threshold": threshold} if threshold is not None else {"keep_ratio": keep_ratio}
    try:
        handle = ts.apply(model, built, **budget)
    except FingerprintMismatch as error:
        raise ValueError(
            f"methods: the artifact in {spec.entry!r} does not match the model: {error} "
            "Benchmark it on the model it was trained on."
        ) from None
    return handle, _method_of(built)


def _set_budget(handle, method, keep_ratio: float | None, threshold: float | None) -> None:
    if threshold is not None:
        method.threshold = threshold
    else:
        handle.set_budget(keep_ratio=keep_ratio)


_TIMING_NOTES = {
    "pass": "one prefill forward per batch (logits of the last position only)",
    "statistic": "time: median over repeats; speedup: median over repeats of unpruned / pruned time of back-to-back "
    "passes",
}
_MEASURE_NOTES = {
    "accuracy": "answer accuracy: argmax over the answer words of the next-token logits after the prompt",
    "flops_model": "analytic prefill, see tokensift.flops: (vision tower + LLM + scorer) / "
    "(vision tower + unpruned LLM); 2 FLOPs per multiply-add",
    "keep_count": "mean visual tokens per sample entering the last LLM layer",
    "matched_flops": MATCHED_FLOPS_NOTE,
}


def _bench_spec(evaluator: _MLLMEvaluator, spec: MethodSpec, ratios, exit_thresholds, shown):
    """One method at every budget (measured rows) and its ``overlays.png`` column; ``shown`` is the overlay batch,
    its keep ratio and threshold, and the logits -> answer words function."""
    overlay, overlay_ratio, overlay_threshold, words = shown
    exits = bool(getattr(_method_of(spec.build()), "decides_exits", False)) if spec.kind != ORACLE else False
    budgets = [(None, t) for t in exit_thresholds] if exits else [(r, None) for r in ratios]
    handle, method = _apply(evaluator.model, spec, *budgets[0])
    rows = []
    try:
        for keep_ratio, threshold in budgets:
            _set_budget(handle, method, keep_ratio, threshold)
            row = evaluator.measure(spec.label, spec.kind, handle, method, keep_ratio, threshold)
            row["artifact"] = None if spec.artifact is None else str(spec.artifact.path)
            rows.append(row)
        _set_budget(handle, method, *((None, overlay_threshold) if exits else (overlay_ratio, None)))
        with torch.no_grad():
            logits = evaluator.forward_fn(method, handle)(overlay)
        notes = None
        if exits and handle.exit_layers is not None:
            notes = [f"exit @ layer {int(k)}" for k in handle.exit_layers.tolist()]
        column = {
            "title": f"{spec.label} @ " + (f"t={overlay_threshold:g}" if exits else f"{overlay_ratio:g}"),
            "kept": _kept_patches(handle, overlay).cpu().numpy(),
            "preds": words(logits),
            "notes": notes,
        }
    finally:
        handle.remove()
        if isinstance(method, MLLMOracleMethod):
            method.oracle_mask = None
    return rows, column


def run_mllm_bench(
    model_dir: str | os.PathLike,
    data: Any,
    methods: Sequence[str] | str,
    keep_ratios: Sequence[float] | str = (1.0, 0.5, 0.25, 0.1),
    thresholds: Sequence[float] | str | None = None,
    out: str | os.PathLike = "runs/bench",
    batch_size: int | None = None,
    timing_batches: int = 1,
    repeats: int = 5,
    warmup: int = 2,
    overlay_ratio: float = 0.25,
    overlay_threshold: float = 0.5,
    max_batches: int | None = None,
    device: str = "cpu",
    num_overlay_images: int = 4,
    num_threads: int | None = None,
    quiet: bool = False,
    flops_ratios: Sequence[float] | str | None = DEFAULT_FLOPS_RATIOS,
    bootstrap_resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = DEFAULT_SEED,
) -> dict:
    """Benchmark MLLM token methods × budgets on a VQA data module's test split against the unpruned model.

    Args:
        model_dir: a LLaVA / Qwen2-VL ``save_pretrained`` folder (e.g. written by ``pretrain_mllm``).
        data: a VQA ``LightningDataModule`` (``tokensift.data.DigitVQADataModule``) as :func:`run_bench` takes it;
            its options must be the model's (vocabulary, canvas, patch size).
        methods: ``fastv``, ``pyramiddrop``, ``visionzip``, ``dart``, ``d2pruner``, ``divprune``, ``random`` and
            ``NAME:ARTIFACT_DIR`` (``dyvte:runs/x/artifact``); ``unpruned`` and ``oracle`` are always included.
        keep_ratios: fractions of each sample's visual tokens kept after the method's last site.
        thresholds: exit thresholds of exit methods (``dyvte``), each a row; default: ``keep_ratios``.
        out: output directory (``results.json``, ``results.csv``, ``pareto.png``, ``overlays.png``).
        overlay_ratio / overlay_threshold: the budget shown in ``overlays.png``.
        flops_ratios, bootstrap_resamples, bootstrap_seed: the equal-cost table and the intervals, as
            :func:`tokensift.bench.runner.run_bench` (FLOPs here are the prefill's, vision tower included).
        Other arguments as :func:`tokensift.bench.runner.run_bench`.
    """
    from tokensift.bench.plots import plot_overlays
    from tokensift.data.digit_vqa import ANSWER_WORDS

    model_path = Path(model_dir)
    specs, _ = parse_methods(methods)  # the oracle is always benched: VQA batches carry oracle masks
    _check_runs_on_mllms(specs)
    ratios = parse_keep_ratios(keep_ratios)
    exit_thresholds = parse_thresholds(ratios if thresholds is None else thresholds)
    overlay_ratio = parse_keep_ratios([overlay_ratio], field="overlay_ratio")[0]
    overlay_threshold = parse_thresholds([overlay_threshold], field="overlay_threshold")[0]
    targets = parse_flops_ratios(flops_ratios)
    check_bootstrap(bootstrap_resamples, bootstrap_seed)
    settings = bench_settings(
        data, batch_size, out, timing_batches, repeats, warmup, num_overlay_images, max_batches, device
    )
    timing_batches, repeats, warmup, num_overlay_images, max_batches, torch_device, datamodule, *_ = settings
    data_description, out_dir = settings.data_description, settings.out_dir

    with torch_threads(num_threads):
        model = load_mllm_backbone(str(model_path)).to(torch_device)
        if model.config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model: {model.config.model_type!r} is not one of {list(SUPPORTED_MODEL_TYPES)}.")
        adapter = adapt(model)
        _check_data(datamodule, model, model_path)
        datamodule.setup("test")
        dataset = getattr(datamodule, "test_dataset", None) or datamodule.build("test")
        size = int(datamodule.batch_size)
        count = len(dataset) if max_batches is None else min(len(dataset), max_batches * size)
        if count < 1:
            raise ValueError("data: the test split is empty; give the data module some test samples.")
        collate = datamodule.collator(padding_side="left", with_answer=False)  # prompts end where the answer goes
        answer_ids = torch.tensor(list(datamodule.answer_token_ids), dtype=torch.long)
        image_token = int(datamodule.image_token_id)
        batches = [
            _prepare(model, collate([dataset[i] for i in range(start, min(start + size, count))]), answer_ids,
                     image_token, torch_device)
            for start in range(0, count, size)
        ]  # fmt: skip
        timing = batches[:timing_batches]
        evaluator = _MLLMEvaluator(model, adapter, batches, timing, answer_ids, torch_device, repeats, warmup)

        # the overlay samples, as their own small batch (Qwen2-VL's flattened patches cannot be sliced per sample)
        n_overlay = min(num_overlay_images, count)
        overlay_samples = [dataset[i] for i in range(n_overlay)]
        overlay = _prepare(model, collate(overlay_samples), answer_ids, image_token, torch_device)
        questions = [_question_text(dataset.question(dataset.sample_spec(i))) for i in range(n_overlay)]
        answers = [ANSWER_WORDS[int(i)] for i in overlay.answer_index.tolist()]

        def words(logits: Tensor) -> list[str]:
            return [ANSWER_WORDS[int(i)] for i in logits[:, evaluator.answer_ids].argmax(-1).tolist()]

        rows = [evaluator.measure(UNPRUNED, "none", None, None, keep_ratio=1.0)]
        with torch.no_grad():
            columns = [
                {"title": f"{UNPRUNED} (all tokens)", "kept": None, "preds": words(evaluator.forward_fn(None)(overlay))}
            ]
        for spec in [*specs, MethodSpec(ORACLE, ORACLE, ORACLE, ORACLE)]:
            shown = (overlay, overlay_ratio, overlay_threshold, words)
            spec_rows, column = _bench_spec(evaluator, spec, ratios, exit_thresholds, shown)
            rows += spec_rows
            columns.append(column)

        bootstrap = Bootstrap(rows[0]["num_samples"], bootstrap_resamples, bootstrap_seed)
        summary = summarize(rows, bootstrap, targets)
        rows = finalize_rows(rows)
        metadata = {
            "model": str(model_path),
            "model_class": type(model).__name__,
            "model_type": model.config.model_type,
            "num_layers": adapter.num_layers,
            "data": data_description,
            "batch_size": size,
            "num_samples": count,
            "num_batches": len(batches),
            "num_patches": rows[0]["num_patches"],
            **environment_metadata(torch_device),
            "methods": [s.entry for s in specs],
            "keep_ratios": ratios,
            "thresholds": exit_thresholds,
            "overlay_ratio": overlay_ratio,
            "overlay_threshold": overlay_threshold,
            "timing": {
                "timing_batches": len(timing),
                "repeats": repeats,
                "warmup": warmup,
                "unpruned_time_ms": rows[0]["time_ms"],
                **_TIMING_NOTES,
            },
            **_MEASURE_NOTES,
            "accuracy_interval": bootstrap.describe(),
            "flops_ratios": targets,
        }

    title = f"{metadata['model_class']} ({model_path.name}) · {count} test questions"
    files = write_results(out_dir, rows, metadata, title, quiet, summary=summary)
    files["overlays"] = plot_overlays(
        _overlay_images(overlay_samples),
        answers,
        overlay.oracle_mask.cpu().numpy(),
        columns,
        (int(datamodule.grid_size), int(datamodule.grid_size)),
        out_dir / "overlays.png",
        title=f"kept visual tokens at keep ratio {overlay_ratio:g} (exit methods: threshold {overlay_threshold:g})",
        row_titles=questions,
        outline="patches",
    )
    return {"rows": rows, "metadata": metadata, **summary, "files": {k: str(v) for k, v in files.items()}}


def _question_text(prompt: str) -> str:
    """The question of a prompt, for a figure: the image placeholder as [image], without the answer cue."""
    from tokensift.data.digit_vqa import ANSWER_CUE, IMAGE_TOKEN

    text = prompt.replace(IMAGE_TOKEN, "[image]").replace(ANSWER_CUE, "")
    return " ".join(text.split())


def _overlay_images(samples: list[dict]):
    return torch.stack([s["pixel_values"] for s in samples]).float().numpy()


__all__ = ["MLLMOracleMethod", "parse_thresholds", "run_mllm_bench"]
