"""``tokensift show``: what a method keeps on a user's own images, drawn.

The model folder's own processor prepares the images (any size: it resizes them as the model was trained), the
method is applied with :func:`tokensift.apply`, one forward runs, and the patches whose token survived the
method's last site are read off the handle exactly as the bench reads them for its ``overlays.png``
(:mod:`tokensift.bench.image` for ViT / CLIP / SigLIP classifiers, :mod:`tokensift.bench.mllm` for LLaVA /
Qwen2-VL), so the figure and the bench agree on what "kept" means. Each image is one row: the image as the model
saw it, then the same with the dropped patches dimmed, titled with the prediction (a classifier's top label; an
MLLM's greedy answer to ``--question``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tokensift as ts
from tokensift.backbones import adapt, load_backbone
from tokensift.backbones.loading import load_mllm_backbone, load_mllm_processor
from tokensift.bench.runner import is_multimodal_dir
from tokensift.bench.specs import MethodSpec, parse_methods
from tokensift.data.vqa import ANSWER_CUE, IGNORE_INDEX, IMAGE_TOKEN
from tokensift.export.artifact import Artifact, FingerprintMismatch
from tokensift.scorers.base import is_skip_method

SHOWN_FAMILIES = ("llava", "qwen2_vl")  # the bench's overlay geometry covers these two


def parse_images(images: Sequence[str] | str) -> list[Path]:
    """The image paths, each an existing file (``images`` may also be one comma-separated string)."""
    if isinstance(images, (str, os.PathLike)):
        images = [part for part in str(images).split(",") if part.strip()]
    paths = [Path(str(image).strip()) for image in images]
    if not paths:
        raise ValueError("images: give at least one PNG or JPEG file, e.g. --images a.png b.jpg.")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"images: {str(path)!r} is not a file; give the path of a PNG or JPEG image.")
    return paths


def read_images(paths: Sequence[Path]) -> list:
    """The images as RGB PIL images; a file PIL cannot decode is refused with its path."""
    from PIL import Image, UnidentifiedImageError

    pictures = []
    for path in paths:
        try:
            with Image.open(path) as opened:
                pictures.append(opened.convert("RGB"))  # convert() decodes now, while the file is open
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(
                f"images: {str(path)!r} is not an image PIL can read ({error}); give a PNG or JPEG file."
            ) from None
    return pictures


def check_keep_ratio(keep_ratio: float) -> float:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise ValueError(
            f"keep_ratio: {keep_ratio!r} is not a fraction of the tokens in (0, 1]; give e.g. --keep-ratio 0.25 "
            "(1 keeps every token)."
        )
    return float(keep_ratio)


def parse_sites(sites: Sequence[str] | str | None) -> list[str] | None:
    if sites is None:
        return None
    if isinstance(sites, str):
        sites = sites.split(",")
    parsed = [site.strip() for site in sites if site and site.strip()]
    return parsed or None


def resolve_method(method: str) -> MethodSpec:
    """One method entry (a name, ``NAME:ARTIFACT_DIR`` or an artifact folder), refused when it keeps every token."""
    if "," in method:
        raise ValueError(f"method: show draws one method at a time, got {method!r}; give one name or artifact.")
    try:
        specs, _ = parse_methods([method])
    except (ValueError, FileNotFoundError) as error:
        # the bench's parser names its own field; this command's is singular
        raise ValueError(str(error).replace("methods:", "method:", 1)) from None
    if not specs:
        raise ValueError(f"method: {method!r} is no method to draw; give e.g. random, fastv or NAME:ARTIFACT_DIR.")
    spec = specs[0]
    built = spec.build()
    inner = built.method if isinstance(built, Artifact) else built
    if is_skip_method(inner):
        raise ValueError(
            f"method: {spec.name} skips whole layers and keeps every token, so there is nothing to show; give a "
            "token method (ts.methods() lists them)."
        )
    if getattr(inner, "decides_exits", False):
        raise ValueError(
            f"method: {spec.name} lets each sample's visual tokens exit all at once at a layer it decides, so it "
            "selects no patches to show; give a token method (ts.methods() lists them)."
        )
    return spec


def _apply(model: nn.Module, spec: MethodSpec, keep_ratio: float, sites: list[str] | None, model_path: Path):
    try:
        return ts.apply(model, spec.build(), keep_ratio=keep_ratio, sites=sites)
    except FingerprintMismatch as error:
        raise ValueError(
            f"method: the artifact {spec.entry!r} was trained on another backbone than {model_path}: {error} "
            "Show it on the model it was trained on."
        ) from None


def _image_processor(model_path: Path):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"model: {model_path} has no image processor ({type(error).__name__}), so its own resizing and "
            "normalisation are unknown; save the one it was trained with into the folder: "
            f"processor.save_pretrained({str(model_path)!r})."
        ) from None


def _mllm_processor(model_path: Path):
    processor = load_mllm_processor(str(model_path))
    if processor is None:
        raise ValueError(
            f"model: {model_path} has no multimodal processor; a multimodal LLM needs one that builds its prompt "
            "with the image tokens and its pixels: save it into the folder with "
            f"processor.save_pretrained({str(model_path)!r}) (e.g. a LlavaProcessor of the model's tokenizer and "
            "image processor; for Qwen2-VL its tokenizer and image processor are enough)."
        )
    return processor


def chat_prompt(processor, question: str) -> str:
    """``question`` about one image in the model's chat layout: its processor's chat template when it has one,
    else tokensift's VQA layout (:mod:`tokensift.data.vqa`: the image, the question, ``answer :``), the layout
    ``tokensift pretrain-mllm`` trains."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None) or IMAGE_TOKEN
    return f"{image_token} {question.strip()} {ANSWER_CUE}"


def _classifier_rows(model_path, pictures, spec, keep_ratio, sites, device) -> list[dict]:
    from tokensift.bench.image import kept_patches

    processor = _image_processor(model_path)
    model = load_backbone(str(model_path)).eval().to(device)
    adapter = adapt(model)
    pixel_values = processor(images=pictures, return_tensors="pt")["pixel_values"].to(device)
    try:
        adapter.check_pixel_values(pixel_values)
    except ValueError as error:
        raise ValueError(
            f"model: the image processor in {model_path} makes {tuple(pixel_values.shape[1:])} pixel values but the "
            f"model refuses them ({error}); save the processor the model was trained with."
        ) from None
    grid = adapter.grid_for(pixel_values)
    handle = _apply(model, spec, keep_ratio, sites, model_path)
    try:
        with torch.no_grad():
            output = model(pixel_values=pixel_values)
        count = int(pixel_values.shape[0])
        kept = kept_patches(handle, count, grid[0] * grid[1], adapter.num_prefix, device).cpu().numpy()
    finally:
        handle.remove()
    if adapter.has_classifier:
        probabilities = output.logits.float().softmax(-1).cpu()
        top = probabilities.max(-1)
        names = model.config.id2label
        predictions = [
            f"{names.get(int(i), int(i))} ({float(p):.2f})" for p, i in zip(top.values, top.indices, strict=True)
        ]
    else:
        predictions = [f"{type(model).__name__} has no classification head"] * count
    images = pixel_values.float().cpu().numpy()
    return [{"image": images[r], "kept": kept[r], "grid": grid, "prediction": predictions[r]} for r in range(count)]


def _mllm_rows(model_path, pictures, spec, keep_ratio, sites, question, max_new_tokens, device) -> list[dict]:
    from tokensift.backbones.vqa import generate_answers, visual_token_id
    from tokensift.bench.mllm import (
        check_runs_on_mllms,
        kept_visual_patches,
        overlay_images,
        prepare_batch,
        visual_grid,
    )

    processor = _mllm_processor(model_path)
    model = load_mllm_backbone(str(model_path)).to(device)
    if model.config.model_type not in SHOWN_FAMILIES:
        raise ValueError(
            f"model: {model_path} holds a {model.config.model_type!r} model; show draws {list(SHOWN_FAMILIES)}."
        )
    try:
        check_runs_on_mllms([spec])
    except ValueError as error:
        raise ValueError(str(error).replace("methods:", "method:", 1)) from None
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.generation_config.pad_token_id
    pad = 0 if pad is None else int(pad)
    prompt = chat_prompt(processor, question)
    handle = _apply(model, spec, keep_ratio, sites, model_path)
    rows = []
    try:
        for picture in pictures:  # one at a time: each image keeps its own size (Qwen2-VL: its own token grid)
            encoded = dict(processor(images=[picture], text=[prompt], return_tensors="pt"))
            _check_tower_size(model, encoded["pixel_values"], model_path)
            encoded["labels"] = torch.full_like(encoded["input_ids"], IGNORE_INDEX)  # a prompt, no answer
            image_token = visual_token_id(model, encoded)
            prepared = prepare_batch(model, encoded, image_token, pad, device)
            with torch.no_grad():
                model(**prepared.inputs, logits_to_keep=1)
                kept = kept_visual_patches(handle, prepared)[0].cpu().numpy()
                answer = generate_answers(model, prepared.prompt, max_new_tokens, pad_token_id=pad)[0]
            words = tokenizer.decode([t for t in answer.tolist() if t >= 0], skip_special_tokens=True).strip()
            rows.append(
                {
                    "image": overlay_images(prepared, model)[0],
                    "kept": kept[: int(prepared.num_visual[0])],
                    "grid": visual_grid(prepared, model, None),
                    "prediction": f"{question.strip()} → {words or '(no answer)'}",
                }
            )
    finally:
        handle.remove()
    return rows


def _check_tower_size(model: nn.Module, pixel_values, model_path: Path) -> None:
    """LLaVA's tower reads one fixed size; a processor that does not resize to it fails deep inside CLIP."""
    size = getattr(model.config.vision_config, "image_size", None)
    if model.config.model_type != "llava" or size is None or tuple(pixel_values.shape[-2:]) == (size, size):
        return
    height, width = pixel_values.shape[-2:]
    raise ValueError(
        f"model: the processor in {model_path} makes {height}x{width} pixel values but the vision tower reads "
        f"{size}x{size}; save a processor that resizes to it (image_processor.do_resize = True, size = "
        f"{{'height': {size}, 'width': {size}}}, then processor.save_pretrained({str(model_path)!r}))."
    )


def _draw(rows: list[dict], path: Path, title: str) -> Path:
    """One row per image: the image as the model saw it, and again with its dropped patches dimmed."""
    import matplotlib.pyplot as plt

    from tokensift.bench.plots import per_pixel, save_figure, to_display

    fig, axes = plt.subplots(len(rows), 2, figsize=(6.4, 3.3 * len(rows)), squeeze=False)
    for (plain, pruned), row in zip(axes, rows, strict=True):
        display, cmap = to_display(row["image"])
        height, width = display.shape[:2]
        kept = np.asarray(row["kept"], dtype=bool)
        shade = np.zeros((height, width, 4), dtype=np.float32)
        shade[..., :3] = (0.05, 0.1, 0.35)
        shade[..., 3] = per_pixel(~kept, row["grid"], height, width) * 0.72
        for ax in (plain, pruned):
            ax.imshow(display, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        pruned.imshow(shade, interpolation="nearest")
        plain.set_title(f"{row['name']} (after the model's processor)", fontsize=8)
        pruned.set_title(f"kept {int(kept.sum())} / {kept.size} tokens", fontsize=8)
        plain.set_xlabel("\n".join(_wrap(row["prediction"], 60)), fontsize=8, loc="left")
    fig.suptitle(f"{title}\nblue tint: dropped tokens", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [text]


def show(
    model: str,
    method: str,
    images: list[str] | str,
    keep_ratio: float = 0.25,
    out: str = "kept.png",
    question: str | None = None,
    sites: list[str] | str | None = None,
    max_new_tokens: int = 4,
    device: str = "cpu",
) -> tuple[Path, list[list[int]]]:
    """Draw what a method keeps of your own images.

    Args:
        model: a ``save_pretrained`` folder with its processor: a ViT / CLIP / SigLIP classifier (its image
            processor) or a LLaVA / Qwen2-VL model (its multimodal processor).
        method: a registered method name, ``NAME:ARTIFACT_DIR`` or an artifact folder (``tokensift export``).
        images: PNG / JPEG files of any size (the processor resizes them).
        keep_ratio: the fraction of tokens kept after the method's last site, in (0, 1].
        out: the figure (PNG), written atomically.
        question: the question asked about each image (multimodal models only; required there).
        sites: the method's sites (training-free methods), e.g. ``vit.2`` or ``llm.2``; default: its own.
        max_new_tokens: the answer's length (greedy) for a multimodal model.
        device: where the model runs.

    Returns:
        The figure's path and, per image, the original patch indices whose token was kept (row-major on the
        model's token grid).
    """
    keep_ratio = check_keep_ratio(keep_ratio)
    out_path = Path(out)
    if out_path.suffix.lower() != ".png":
        raise ValueError(f"out: {out!r} is not a .png path; give e.g. --out kept.png.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: {max_new_tokens!r}; give a whole number of answer tokens >= 1.")
    model_path = Path(model)
    if not (model_path / "config.json").is_file():
        raise ValueError(f"model: {str(model_path)!r} is no save_pretrained folder (no config.json); give one.")
    multimodal = is_multimodal_dir(model_path)
    if multimodal and not (question or "").strip():
        raise ValueError(
            f"question: {model_path} is a multimodal LLM, which answers a question about each image; give "
            "--question '...'."
        )
    if not multimodal and question is not None:
        raise ValueError(
            f"question: {model_path} is an image classifier, which takes no question; drop --question (or give a "
            "LLaVA / Qwen2-VL folder)."
        )
    paths = parse_images(images)
    pictures = read_images(paths)
    spec = resolve_method(method)
    chosen_sites = parse_sites(sites)
    if multimodal:
        rows = _mllm_rows(model_path, pictures, spec, keep_ratio, chosen_sites, question, max_new_tokens, device)
    else:
        rows = _classifier_rows(model_path, pictures, spec, keep_ratio, chosen_sites, device)
    for row, path in zip(rows, paths, strict=True):
        row["name"] = path.name
    title = f"{spec.label} at keep ratio {keep_ratio:g} on {model_path.name}"
    figure = _draw(rows, out_path, title)
    kept = [np.flatnonzero(row["kept"]).tolist() for row in rows]
    counts = ", ".join(f"{len(indices)}/{row['kept'].size}" for indices, row in zip(kept, rows, strict=True))
    print(f"tokensift show: wrote {figure} (tokens kept per image: {counts})")
    return figure, kept


__all__ = ["chat_prompt", "show"]
