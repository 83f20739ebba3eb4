"""``run_mllm_bench``: the benchmark on a multimodal LLM (LLaVA, Qwen2-VL) and a VQA data module.

``tokensift bench`` dispatches here when ``--model`` is a LLaVA / Qwen2-VL folder; the rows, files, table,
Pareto plot, timing, memory and interval code are the shared modules' (:mod:`~tokensift.bench.results`,
:mod:`~tokensift.bench.measure`, :mod:`~tokensift.bench.stats`). Per method × budget:

- ``accuracy``: answer accuracy on the test split: the prompt (each row's tokens before its answer, left-padded)
  goes through the model once and a one-token answer is the argmax of the next-token logits (over the data's
  ``answer_token_ids`` when it has them); a longer answer is decoded by greedy ``generate`` with the method on,
  and a sample counts when every answer token is right (:mod:`tokensift.backbones.vqa` does the same).
- ``oracle_recall``: the fraction of the question's oracle patches whose visual token is still in the
  sequence after the method's last site (``handle.kept_orig_index``); only when the batches carry
  ``oracle_mask``.

The data is any LightningDataModule whose test batches follow the VQA batch contract
(:mod:`tokensift.data.contract`): the model's processor outputs, the answer's tokens as ``labels``, ``index``
and, where the task has one, ``oracle_mask``. Digit VQA and shape VQA are two.
- ``flops_ratio``: analytic prefill FLOPs, ``(vision tower + LLM + scorer) / (unpruned vision tower + unpruned LLM)``
  (:class:`~tokensift.flops.TowerFlopsCounter`: what the tower ran, ``vit.<i>`` sites' savings included;
  :func:`~tokensift.flops.mllm_prefill_flops`).
- ``speedup`` and ``mem_ratio``: one prefill forward of the timing batches, pruned vs unpruned, measured as
  the image bench does (back-to-back pairs; activation peak).
- exit methods (``dyvte``) take a decision ``threshold`` per row instead of a keep ratio (by default the
  keep-ratio list read as thresholds: 1 never exits) and report ``mean_exit_layer``.

The ``oracle`` row (when the data has oracle masks) keeps the question's oracle patches first, then random ones,
before the LLM: a yardstick for what a text-conditioned selection could reach at each budget.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import tokensift as ts
from tokensift.backbones import adapt
from tokensift.backbones.loading import load_mllm_backbone
from tokensift.backbones.vqa import (
    SUPPORTED_MODEL_TYPES,
    answer_ids_of,
    answers_correct,
    generate_answers,
    mllm_inputs,
    pad_token_id_of,
    restricted_argmax,
    visual_token_id,
)
from tokensift.bench.data import take_rows, vqa_test_batches
from tokensift.bench.measure import environment_metadata, measure_speed_and_memory
from tokensift.bench.oracle import MLLMOracleMethod
from tokensift.bench.results import MATCHED_FLOPS_NOTE, RowProgress, finalize_rows, summarize, write_results
from tokensift.bench.settings import bench_settings, torch_threads
from tokensift.bench.specs import (
    ORACLE,
    UNPRUNED,
    MethodSpec,
    bench_skip_spec,
    parse_fractions,
    parse_keep_ratios,
    parse_methods,
    parse_skip_layers,
    rows_of_spec,
)
from tokensift.bench.stats import (
    DEFAULT_FLOPS_RATIOS,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    Bootstrap,
    check_bootstrap,
    parse_flops_ratios,
)
from tokensift.data.contract import check_vqa_batch, split_answers
from tokensift.data.vqa import ANSWER_CUE, IGNORE_INDEX, qwen2_vl_images
from tokensift.export.artifact import Artifact, FingerprintMismatch
from tokensift.flops import TowerFlopsCounter, mllm_prefill_flops, mllm_skip_prefill_flops
from tokensift.scorers import TokenMethod
from tokensift.scorers.base import is_skip_method
from tokensift.skip import LayerSkipHandle, skipped_site_labels

MLLM_SITE_KINDS = ("pre_llm", "llm")


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


def check_runs_on_mllms(specs: list[MethodSpec]) -> None:
    for spec in specs:
        if spec.artifact is not None:  # trained on a multimodal model (its fingerprint is checked when applied)
            continue
        method = _method_of(spec.build())
        if not set(method.site_kinds) & set(MLLM_SITE_KINDS):
            mllm = sorted(n for n, info in ts.methods().items() if set(info["sites"]) & set(MLLM_SITE_KINDS))
            raise ValueError(
                f"methods: {spec.entry!r} prunes vision-transformer blocks only and cannot run on a multimodal LLM; "
                f"methods for LLaVA / Qwen2-VL: {mllm} (learned: NAME:ARTIFACT_DIR)."
            )


def _check_data(datamodule: Any, model: nn.Module, model_path: Path) -> None:
    """What the data module says about itself, checked against the model (each attribute only when present)."""
    image_token = getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))
    placeholders = {image_token, getattr(model.config, "video_token_id", image_token)}
    data_token = getattr(datamodule, "image_token_id", None)
    if data_token is not None and data_token not in placeholders:
        raise ValueError(
            f"data: its image token id is {data_token} but the model in {model_path} expects "
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
    answers = getattr(datamodule, "answer_token_ids", None)
    if answers is not None and max(answers) >= vocab:
        raise ValueError(
            f"data: answer token ids reach {max(answers)} but the model's vocabulary has {vocab} "
            "entries; give the data module the model's tokenizer."
        )


def _check_batch(batch: dict, model: nn.Module) -> None:
    """The first test batch against the VQA batch contract, for this model."""
    family = model.config.model_type
    merge = getattr(model.config.vision_config, "spatial_merge_size", None) if family == "qwen2_vl" else None
    try:
        check_vqa_batch(batch, family, image_token_id=visual_token_id(model, batch), spatial_merge_size=merge)
    except ValueError as error:
        raise ValueError(f"data: {error}") from None


@dataclass
class PreparedBatch:
    """One test batch, ready to run: the model's inputs and what the measures compare them with."""

    prompt: dict[str, Tensor]  # the prompt-only batch (each row ends where its answer starts)
    inputs: dict[str, Tensor]  # the prefill's forward arguments
    answers: Tensor  # [B, T] the answer's tokens, -100 after each row's answer
    oracle_mask: Tensor | None  # [B, P] the patches the question needs (None: the data has no oracle)
    visual_positions: Tensor  # [B, P] index in the LLM input of each visual token (the input's length: none)
    num_text: Tensor  # [B] text and special tokens (padding excluded)
    num_visual: Tensor  # [B]
    index: Tensor | None = None  # [B] dataset index of each sample: its random draws follow it, not the batch


def prepare_batch(model: nn.Module, batch: dict, image_token_id: int, pad_token_id: int, device) -> PreparedBatch:
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    prompt, answers = split_answers(batch, pad_token_id)
    input_ids = prompt["input_ids"]
    is_visual = input_ids == image_token_id
    num_visual = is_visual.sum(1)
    oracle = batch.get("oracle_mask")
    if oracle is not None:  # rows of shorter videos are padded with False to the longest one
        beyond = torch.arange(oracle.shape[1], device=oracle.device) >= num_visual.to(oracle.device)[:, None]
        if oracle.shape[1] != int(num_visual.max()) or bool((oracle.bool() & beyond).any()):
            raise ValueError(
                f"data: samples hold {sorted(set(num_visual.tolist()))} image tokens but {oracle.shape[1]} oracle "
                "patches; the bench needs one image or video per sample and one LLM token per patch "
                "(num_image_tokens: null), the oracle padded with False past a shorter sample's tokens."
            )
    length = input_ids.shape[1]
    positions = torch.arange(length, device=device).expand_as(input_ids)
    rank = is_visual.long().cumsum(1) - 1
    visual_positions = torch.full((input_ids.shape[0], int(num_visual.max())), length, dtype=torch.long, device=device)
    rows = torch.arange(input_ids.shape[0], device=device).unsqueeze(1).expand_as(input_ids)
    visual_positions[rows[is_visual], rank[is_visual]] = positions[is_visual]
    return PreparedBatch(
        prompt=prompt,
        inputs=mllm_inputs(model, prompt),
        answers=answers,
        oracle_mask=None if oracle is None else oracle.bool(),
        visual_positions=visual_positions,
        num_text=prompt["attention_mask"].sum(1) - num_visual,
        num_visual=num_visual,
        index=batch.get("index"),
    )


def kept_visual_patches(handle, batch: PreparedBatch) -> Tensor:
    """``[B, P]`` bool: patches whose visual token is still in the sequence after the method's last site."""
    kept = getattr(handle, "kept_orig_index", None)  # None also for a layer-skip handle: every token stays
    real = batch.visual_positions < batch.prompt["input_ids"].shape[1]
    if kept is None:  # unpruned, or a budget that dropped nothing: every site was skipped
        return real
    length = int(batch.inputs["input_ids"].shape[1])
    present = torch.zeros(kept.shape[0], length + 1, dtype=torch.bool, device=kept.device)
    present.scatter_(1, torch.where(kept >= 0, kept, length), True)  # -1 padding slots -> a spare column
    present[:, length] = False
    return present.gather(1, batch.visual_positions.to(kept.device)).to(real.device) & real


class _MLLMEvaluator:
    """Runs and measures one (method, budget) on the prepared batches of one model."""

    def __init__(self, model, adapter, batches, timing, answer_ids, pad_token_id, device, repeats, warmup, progress):
        self.model, self.adapter, self.batches, self.timing = model, adapter, batches, timing
        self.progress: RowProgress = progress
        self.answer_ids = None if answer_ids is None else answer_ids.to(device)
        self.pad_token_id, self.device, self.repeats, self.warmup = pad_token_id, device, repeats, warmup
        self._unpruned_vision: dict[int, float] = {}  # per batch: the tower's FLOPs without a method

    def forward_fn(self, method: nn.Module | None, handle=None):
        def forward(batch: PreparedBatch) -> Tensor:
            self._select(batch, method, handle)
            # only the next-token logits are read: the LM head runs on the last position (a prefill)
            return self.model(**batch.inputs, logits_to_keep=1).logits[:, -1]

        return forward

    @staticmethod
    def _select(batch: PreparedBatch, method, handle) -> None:
        """Name the batch's samples (and, for the oracle, its masks) before a pass."""
        if isinstance(method, MLLMOracleMethod):
            method.oracle_mask = batch.oracle_mask
        if hasattr(handle, "set_samples") and batch.index is not None:  # token handles (random draws per sample)
            handle.set_samples(batch.index)

    def run(self, batch: PreparedBatch, method, handle) -> dict:
        """One prefill (and, for answers longer than one token, greedy ``generate`` with the method on).

        Returns ``tokens`` (the predicted answer tokens ``[B, T]``), the prefill's records (``per_layer``: visual
        tokens per layer, ``exit_layers``; ``None`` unpruned) and ``kept`` (the kept patches ``[B, P]``)."""
        logits = self.forward_fn(method, handle)(batch)
        result = {
            "per_layer": getattr(handle, "visual_tokens_per_layer", None),  # None: unpruned, or layers skipped
            "exit_layers": getattr(handle, "exit_layers", None),
            "kept": kept_visual_patches(handle, batch),
            "tokens": restricted_argmax(logits, self.answer_ids).unsqueeze(1),
        }
        if batch.answers.shape[1] > 1:
            self._select(batch, method, handle)
            length = batch.answers.shape[1]
            result["tokens"] = generate_answers(self.model, batch.prompt, length, self.answer_ids, self.pad_token_id)
        return result

    def measure(self, label: str, kind: str, handle, method, keep_ratio=None, threshold=None) -> dict:
        correct = []
        hits = total = samples = 0
        llm = scorer = unpruned = vision = vision_unpruned = 0.0
        kept_last, exits = [], []
        with torch.no_grad():
            for number, batch in enumerate(self.batches):
                with TowerFlopsCounter(self.adapter) as tower:
                    result = self.run(batch, method, handle)
                per_layer = result["per_layer"]
                correct.append(answers_correct(result["tokens"], batch.answers).cpu())
                samples += int(batch.answers.shape[0])
                if batch.oracle_mask is not None:
                    hits += int((result["kept"] & batch.oracle_mask).sum())
                    total += int(batch.oracle_mask.sum())
                if per_layer is None:
                    per_layer = batch.num_visual.unsqueeze(1).repeat(1, self.adapter.num_layers)
                if isinstance(handle, LayerSkipHandle):
                    flops = mllm_skip_prefill_flops(handle, batch.num_text, batch.num_visual)
                else:
                    flops = mllm_prefill_flops(self.adapter, batch.num_text, per_layer, method, batch.num_visual)
                llm, scorer, unpruned = llm + flops["llm"], scorer + flops["scorer"], unpruned + flops["unpruned"]
                if handle is None:  # the unpruned row runs first
                    self._unpruned_vision[number] = tower.flops
                vision, vision_unpruned = vision + tower.flops, vision_unpruned + self._unpruned_vision[number]
                kept_last.append(per_layer[:, -1].float())
                exits.append((per_layer > 0).sum(1).float())
        times, speedups, memory = measure_speed_and_memory(
            self.forward_fn(method, handle), self.timing, handle, self.repeats, self.warmup, self.device
        )
        decides_exits = bool(getattr(method, "decides_exits", False))
        per_sample = torch.cat(correct).double().numpy()
        row = {
            "method": label,
            "kind": kind,
            "keep_ratio": keep_ratio,
            "keep_count": float(torch.cat(kept_last).mean()),  # visual tokens reaching the last layer, mean
            # their spread over samples: 0 for a fixed count, atp's per-sample thresholds, DyVTE's exits
            "keep_count_sd": float(torch.cat(kept_last).std()) if samples > 1 else 0.0,
            "num_patches": max(int(b.visual_positions.shape[1]) for b in self.batches),
            "accuracy": float(per_sample.mean()),
            "oracle_recall": hits / total if total else None,
            "flops": vision + llm + scorer,
            "flops_backbone": vision + llm,
            "flops_scorer": scorer,
            "flops_ratio": (vision + llm + scorer) / (vision_unpruned + unpruned),
            "peak_mem_bytes": memory,
            "num_samples": samples,
            "sites": _row_sites(handle),
            "artifact": None,
            "threshold": threshold,
            "skip_layers": handle.skip_layers if isinstance(handle, LayerSkipHandle) else None,
            "mean_exit_layer": float(torch.cat(exits).mean()) if decides_exits else None,
            "_correct": per_sample,
            "_times": times,
            "_speedups": speedups,
        }
        self.progress.advance(row)
        return row


def _row_sites(handle) -> list[str]:
    """A row's ``sites``: a token method's sites, the blocks a layer-skip handle skips (``layer.<i>``); none
    unpruned."""
    if isinstance(handle, LayerSkipHandle):
        return skipped_site_labels(handle)
    return list(handle.sites) if handle is not None else []


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
    "accuracy": "answer accuracy: argmax over the answer words of the next-token logits after the prompt (answers "
    "of more tokens: greedy generate with the method on; every answer token must be right)",
    "flops_model": "analytic prefill, see tokensift.flops: (vision tower + LLM + scorer) / "
    "(vision tower + unpruned LLM); 2 FLOPs per multiply-add",
    "keep_count": "mean visual tokens per sample entering the last LLM layer",
    "keep_count_sd": "their standard deviation over samples (0 when every sample keeps the budget's count)",
    "matched_flops": MATCHED_FLOPS_NOTE,
}


def _decides_exits(spec: MethodSpec) -> bool:
    """Whether the spec is an exit method (dyvte), benched at thresholds rather than keep ratios."""
    return spec.kind != ORACLE and bool(getattr(_method_of(spec.build()), "decides_exits", False))


def _bench_spec(evaluator: _MLLMEvaluator, spec: MethodSpec, ratios, exit_thresholds, shown):
    """One method at every budget (measured rows) and its ``overlays.png`` column; ``shown`` is the overlay batch,
    its keep ratio and threshold, and the answer tokens -> answer words function."""
    overlay, overlay_ratio, overlay_threshold, words = shown
    exits = _decides_exits(spec)
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
            result = evaluator.run(overlay, method, handle)
        notes = None
        if exits and result["exit_layers"] is not None:
            notes = [f"exit @ layer {int(k)}" for k in result["exit_layers"].tolist()]
        column = {
            "title": f"{spec.label} @ " + (f"t={overlay_threshold:g}" if exits else f"{overlay_ratio:g}"),
            "kept": result["kept"].cpu().numpy(),
            "preds": words(result["tokens"], overlay.answers),
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
    skip_layers: Sequence[int] | str | None = None,
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
        skip_layers: the skip counts of layer-skip artifacts (das), one row each, as ``run_bench``.
        Other arguments as :func:`tokensift.bench.runner.run_bench`.
    """
    from tokensift.bench.plots import plot_overlays

    model_path = Path(model_dir)
    specs, _ = parse_methods(methods)  # the oracle is benched whenever the batches carry oracle masks
    check_runs_on_mllms(specs)
    counts = parse_skip_layers(skip_layers, specs)
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

    with torch_threads(num_threads), RowProgress(quiet) as progress:
        model = load_mllm_backbone(str(model_path)).to(torch_device)
        if model.config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model: {model.config.model_type!r} is not one of {list(SUPPORTED_MODEL_TYPES)}.")
        adapter = adapt(model)
        _check_data(datamodule, model, model_path)
        raw = vqa_test_batches(datamodule, max_batches)
        _check_batch(raw[0], model)
        answer_ids = answer_ids_of(datamodule)
        pad = pad_token_id_of(datamodule, model)
        image_token = visual_token_id(model, raw[0])
        batches = [prepare_batch(model, batch, image_token, pad, torch_device) for batch in raw]
        count = sum(int(b.answers.shape[0]) for b in batches)
        size = int(getattr(datamodule, "batch_size", None) or batches[0].answers.shape[0])
        timing = batches[:timing_batches]
        evaluator = _MLLMEvaluator(
            model, adapter, batches, timing, answer_ids, pad, torch_device, repeats, warmup, progress
        )
        has_oracle = all(b.oracle_mask is not None for b in batches)

        # the overlay samples: the first test samples, as their own small batch
        n_overlay = min(num_overlay_images, int(raw[0]["input_ids"].shape[0]))
        overlay = prepare_batch(model, take_rows(raw[0], n_overlay), image_token, pad, torch_device)
        tokenizer = _tokenizer(datamodule, model_path)
        questions = [_question_text(row, tokenizer, image_token) for row in _rows(overlay.prompt)]
        answers = _words(overlay.answers, overlay.answers, tokenizer)

        def words(tokens: Tensor, reference: Tensor) -> list[str]:
            return _words(tokens, reference, tokenizer)

        oracle = [MethodSpec(ORACLE, ORACLE, ORACLE, ORACLE)] if has_oracle else []
        per_spec = [rows_of_spec(s, exit_thresholds if _decides_exits(s) else ratios, counts) for s in specs + oracle]
        progress.start(1 + sum(per_spec))  # the unpruned row first
        rows = [evaluator.measure(UNPRUNED, "none", None, None, keep_ratio=1.0)]
        with torch.no_grad():
            preds = words(evaluator.run(overlay, None, None)["tokens"], overlay.answers)
        columns = [{"title": f"{UNPRUNED} (all tokens)", "kept": None, "preds": preds}]
        for spec in [*specs, *oracle]:
            if spec.artifact is not None and is_skip_method(spec.artifact.method):
                rows += bench_skip_spec(
                    evaluator.model, spec, counts, lambda h, s=spec: evaluator.measure(s.label, s.kind, h, h.method)
                )
                continue
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
    if overlay.prompt.get("pixel_values_videos") is not None:
        files["overlays"] = _plot_video_overlays(
            overlay, columns, answers, questions, datamodule, out_dir / "overlays.png", overlay_ratio
        )
        return {"rows": rows, "metadata": metadata, **summary, "files": {k: str(v) for k, v in files.items()}}
    files["overlays"] = plot_overlays(
        overlay_images(overlay, model),
        answers,
        None if overlay.oracle_mask is None else overlay.oracle_mask.cpu().numpy(),
        columns,
        visual_grid(overlay, model, datamodule),
        out_dir / "overlays.png",
        title=f"kept visual tokens at keep ratio {overlay_ratio:g} (exit methods: threshold {overlay_threshold:g})",
        row_titles=questions,
        outline="patches",
    )
    return {"rows": rows, "metadata": metadata, **summary, "files": {k: str(v) for k, v in files.items()}}


def _plot_video_overlays(overlay, columns, answers, questions, datamodule, path: Path, ratio: float) -> Path:
    """Per-frame overlays of the first overlay video: one row per frame (Qwen2-VL: per temporal patch, its first
    frame shown), one column per method, its kept visual tokens of that frame. The frames come from the data
    module's ``video_frames(index)`` (``[T, C, H, W]``), the token grid from its ``grid_size``."""
    from tokensift.bench.plots import plot_overlays

    if not callable(getattr(datamodule, "video_frames", None)) or overlay.index is None:
        raise ValueError(
            "data: a video bench draws its overlays from the data module's video_frames(index) ([T, C, H, W]) and "
            "the batch's index; give the data module that method (tokensift.data.VideoDigitVQADataModule has it)."
        )
    frames = torch.as_tensor(datamodule.video_frames(int(overlay.index[0])))
    rows, cols = datamodule.grid_size if isinstance(datamodule.grid_size, tuple) else (datamodule.grid_size,) * 2
    count = int(overlay.num_visual[0])
    steps = count // (rows * cols)
    stride = max(1, frames.shape[0] // steps)
    shown = frames[::stride][:steps].float().numpy()

    def per_frame(values) -> np.ndarray:
        return np.asarray(values)[0][:count].reshape(steps, rows * cols)

    panels = []
    for column in columns:
        kept = column.get("kept")
        panels.append(
            dict(column, kept=None if kept is None else per_frame(kept), preds=[column["preds"][0]] * steps)
        )
    oracle = None if overlay.oracle_mask is None else per_frame(overlay.oracle_mask.cpu().numpy())
    labels = [answers[0]] * steps
    titles = [f"frame {k * stride}" + (f": {questions[0]}" if k == 0 else "") for k in range(steps)]
    return plot_overlays(
        shown,
        labels,
        oracle,
        panels,
        (rows, cols),
        path,
        title=f"kept visual tokens per frame at keep ratio {ratio:g}",
        row_titles=titles,
        outline="patches",
    )


def _tokenizer(datamodule: Any, model_path: Path):
    """The data's tokenizer (answers and questions in the figure), else the model folder's, else ``None``."""
    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError):
        return None


def _rows(prompt: dict) -> list[list[int]]:
    """Each row's real prompt tokens."""
    ids, mask = prompt["input_ids"].cpu(), prompt["attention_mask"].cpu().bool()
    return [row[keep].tolist() for row, keep in zip(ids, mask, strict=True)]


def _decode(ids: list[int], tokenizer) -> str:
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    return tokenizer.decode(ids, skip_special_tokens=True)


def _words(tokens: Tensor, reference: Tensor, tokenizer) -> list[str]:
    """Each row's predicted answer text: its first as many tokens as ``reference``'s answer (-100 padded)."""
    lengths = (reference != IGNORE_INDEX).sum(1).tolist()
    rows = tokens.cpu().tolist()
    return [_decode([t for t in row[:n] if t >= 0], tokenizer) for row, n in zip(rows, lengths, strict=True)]


def _question_text(ids: list[int], tokenizer, image_token_id: int) -> str:
    """The question of a prompt, for a figure: each run of image tokens as [image], without the answer cue."""
    parts, text = [], []
    for k, token in enumerate(ids):
        if token == image_token_id:
            if k == 0 or ids[k - 1] != image_token_id:
                parts += [_decode(text, tokenizer), "[image]"]
                text = []
        else:
            text.append(token)
    parts.append(_decode(text, tokenizer))
    question = " ".join(" ".join(parts).split())
    return question[: -len(ANSWER_CUE)].rstrip() if question.endswith(ANSWER_CUE) else question


def overlay_images(overlay: PreparedBatch, model: nn.Module):
    """``[R, C, H, W]`` images of the overlay samples (Qwen2-VL's flattened patches put back together)."""
    pixels = overlay.prompt["pixel_values"]
    grid = overlay.prompt.get("image_grid_thw")
    if grid is not None:
        vision = model.config.vision_config
        channels = pixels.shape[1] // (vision.temporal_patch_size * vision.patch_size**2)
        images = qwen2_vl_images(pixels, grid, channels, vision.patch_size, vision.spatial_merge_size)
        pixels = torch.stack(images)
    return pixels.float().cpu().numpy()


def visual_grid(overlay: PreparedBatch, model: nn.Module, datamodule: Any) -> tuple[int, int]:
    """The (rows, columns) grid of each overlay sample's visual tokens on its image."""
    count = int(overlay.visual_positions.shape[1])
    grid = overlay.prompt.get("image_grid_thw")
    if grid is not None:
        merge = model.config.vision_config.spatial_merge_size
        return int(grid[0, 1]) // merge, int(grid[0, 2]) // merge
    height, width = overlay.prompt["pixel_values"].shape[-2:]
    if model.config.model_type == "qwen2_vl":  # images patched by tokensift: one LM token per merged window
        vision = model.config.vision_config
        cell = vision.patch_size * vision.spatial_merge_size
        return int(height) // cell, int(width) // cell
    patch = getattr(model.config.vision_config, "patch_size", None)
    if patch and (int(height) // patch) * (int(width) // patch) == count:
        return int(height) // patch, int(width) // patch
    side = getattr(datamodule, "grid_size", None) or math.isqrt(count)
    return int(side), count // int(side)


__all__ = ["MLLMOracleMethod", "parse_thresholds", "run_mllm_bench"]
