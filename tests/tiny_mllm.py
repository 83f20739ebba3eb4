"""Tiny random-init multimodal LLMs (LLaVA with a Llama LM, Qwen2-VL) and batches that stress their layouts.

Each batch mixes prompt lengths, image positions and image counts (so samples keep different numbers
of visual tokens), left-padded as for generation. ``sample(i)`` gives sample ``i`` alone, unpadded, to
check that a batch computes what its samples compute one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration

MLLM_FAMILIES = ("llava", "qwen2_vl")
VOCAB = 64
PAD, BOS = 0, 1
# a larger init than the default 0.02 makes the greedy continuations of a random model vary from token to token
TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as Llama-3 / Qwen2
    vocab_size=VOCAB,
    max_position_embeddings=512,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=2,
    initializer_range=0.2,
)
LLAVA_IMAGE_TOKEN = 63
QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, QWEN_VISION_START, QWEN_VISION_END = 60, 61, 58, 59
LLAVA_PATCHES = (16 // 4) ** 2  # one 16x16 image, patch 4: 16 image tokens


def build_tiny_mllm(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "llava":
        config = LlavaConfig(
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=2,
                image_size=16,
                patch_size=4,
                projection_dim=32,
            ),
            text_config=dict(model_type="llama", **TEXT_CONFIG),
            image_token_index=LLAVA_IMAGE_TOKEN,
            image_seq_length=LLAVA_PATCHES,
            initializer_range=0.2,
        )
        return LlavaForConditionalGeneration(config).eval()
    if family == "qwen2_vl":
        text = dict(TEXT_CONFIG, rope_parameters=dict(rope_type="default", mrope_section=[2, 1, 1], rope_theta=10000.0))
        config = Qwen2VLConfig(
            text_config=text,
            vision_config=dict(
                depth=2,
                embed_dim=32,
                hidden_size=32,
                num_heads=2,
                mlp_ratio=2,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
                in_channels=3,
                initializer_range=0.2,
            ),
            image_token_id=QWEN_IMAGE_TOKEN,
            video_token_id=QWEN_VIDEO_TOKEN,
            vision_start_token_id=QWEN_VISION_START,
            vision_end_token_id=QWEN_VISION_END,
        )
        return Qwen2VLForConditionalGeneration(config).eval()
    raise ValueError(f"unknown family {family!r}")


@dataclass
class Batch:
    family: str
    rows: list[list[int]]  # unpadded token ids per sample
    images: list[list[int]]  # indices into the batch's images, per sample, in order of appearance
    pixels: list[torch.Tensor]  # per image: LLaVA [3, 16, 16]; Qwen2-VL [patches, 96]
    grids: list[tuple[int, int, int]]  # Qwen2-VL: per image (t, h, w) in patches

    @property
    def size(self) -> int:
        return len(self.rows)

    def inputs(self, indices: list[int] | None = None) -> dict:
        """Model inputs for the samples at ``indices`` (all by default), left-padded to the longest."""
        indices = list(range(self.size)) if indices is None else indices
        rows = [self.rows[i] for i in indices]
        length = max(len(r) for r in rows)
        input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
        attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
        images = [j for i in indices for j in self.images[i]]
        out = dict(input_ids=input_ids, attention_mask=attention_mask)
        if self.family == "llava":
            out["pixel_values"] = torch.stack([self.pixels[j] for j in images])
        else:
            out["pixel_values"] = torch.cat([self.pixels[j] for j in images])
            out["image_grid_thw"] = torch.tensor([self.grids[j] for j in images])
            out["mm_token_type_ids"] = (input_ids == QWEN_IMAGE_TOKEN).long()
        return out

    def sample(self, i: int) -> dict:
        return self.inputs([i])


def make_batch(family: str, seed: int = 7) -> Batch:
    """Three samples: different prompt lengths, the image early / late, and one sample with two images."""
    generator = torch.Generator().manual_seed(seed)

    def words(n: int) -> list[int]:
        return torch.randint(3, 50, (n,), generator=generator).tolist()

    if family == "llava":
        image = [LLAVA_IMAGE_TOKEN] * LLAVA_PATCHES
        rows = [
            [BOS, *words(2), *image, *words(3)],
            [BOS, *image, *words(6)],
            [BOS, *words(1), *image, *words(2), *image, *words(1)],
        ]
        images = [[0], [1], [2, 3]]
        pixels = [torch.randn(3, 16, 16, generator=generator) for _ in range(4)]
        return Batch(family, rows, images, pixels, [])
    if family == "qwen2_vl":
        # 32x32 px -> 8x8 patches -> 4x4 = 16 tokens; 32x16 px -> 8x4 patches -> 8 tokens
        grids = [(1, 8, 8), (1, 8, 4), (1, 4, 8), (1, 8, 8)]

        def image(grid: tuple[int, int, int]) -> list[int]:
            t, h, w = grid
            return [QWEN_VISION_START, *[QWEN_IMAGE_TOKEN] * (t * h * w // 4), QWEN_VISION_END]

        rows = [
            [BOS, *words(2), *image(grids[0]), *words(3)],
            [BOS, *image(grids[1]), *words(6)],
            [BOS, *words(1), *image(grids[2]), *words(2), *image(grids[3]), *words(1)],
        ]
        images = [[0], [1], [2, 3]]
        pixels = [torch.randn(t * h * w, 3 * 2 * 4 * 4, generator=generator) for t, h, w in grids]
        return Batch(family, rows, images, pixels, grids)
    raise ValueError(f"unknown family {family!r}")


def visual_counts(batch: Batch) -> list[int]:
    image_token = LLAVA_IMAGE_TOKEN if batch.family == "llava" else QWEN_IMAGE_TOKEN
    return [row.count(image_token) for row in batch.rows]


def image_token_id(family: str) -> int:
    return LLAVA_IMAGE_TOKEN if family == "llava" else QWEN_IMAGE_TOKEN
