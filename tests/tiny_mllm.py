"""Tiny random-init multimodal LLMs (LLaVA with a Llama LM, Qwen2-VL, Molmo2) and batches that stress their layouts.

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


# -- Molmo2 (images and videos) ----------------------------------------------------------------------------
# Molmo2 adds no tokens to the vocabulary here (additional_vocab_size 0): its special tokens are ids 55..62.
MOLMO2_IMAGE_START, MOLMO2_LOW_RES_START, MOLMO2_IMAGE_END, MOLMO2_PATCH = 55, 56, 57, 58
MOLMO2_FRAME_START, MOLMO2_FRAME_END, MOLMO2_COL = 59, 60, 61
# what Molmo2's processor marks in mm_token_type_ids: every token of an image or frame (its bidirectional block)
MOLMO2_MULTIMODAL = (
    MOLMO2_IMAGE_START,
    MOLMO2_LOW_RES_START,
    MOLMO2_IMAGE_END,
    MOLMO2_PATCH,
    MOLMO2_FRAME_START,
    MOLMO2_FRAME_END,
    MOLMO2_COL,
)
MOLMO2_CROP = 24  # px: a crop (a video frame, an image's low-res view, one high-res crop) is 6x6 patches of 4 px
MOLMO2_SIDE = MOLMO2_CROP // 4
MOLMO2_POOL = 2  # 2x2 patches per LLM token: a crop gives 3x3 tokens
MOLMO2_PATCH_PIXELS = 4 * 4 * 3


def build_tiny_molmo2(seed: int = 0) -> torch.nn.Module:
    """Tiny random-init Molmo2: 3 ViT blocks (the adapter reads blocks 2 and 1), a 4-layer LM whose first two layers
    use a scaled RoPE (Molmo2's per-layer tables) and grouped-query attention."""
    from transformers import Molmo2Config, Molmo2ForConditionalGeneration

    torch.manual_seed(seed)
    text = {k: v for k, v in TEXT_CONFIG.items() if k != "max_position_embeddings"}
    config = Molmo2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            image_size=[MOLMO2_CROP, MOLMO2_CROP],
            patch_size=4,
            initializer_range=0.2,
        ),
        adapter_config=dict(
            vision_feature_layer=[-1, -2],
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=64,
            text_hidden_size=32,
            initializer_range=0.2,
        ),
        text_config=dict(
            text,
            head_dim=8,
            additional_vocab_size=0,
            max_position_embeddings=512,
            rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
            rope_scaling_layers=[0, 1],
        ),
        image_start_token_id=MOLMO2_IMAGE_START,
        low_res_image_start_token_id=MOLMO2_LOW_RES_START,
        image_end_token_id=MOLMO2_IMAGE_END,
        image_patch_id=MOLMO2_PATCH,
        frame_start_token_id=MOLMO2_FRAME_START,
        frame_end_token_id=MOLMO2_FRAME_END,
        initializer_range=0.2,
    )
    return Molmo2ForConditionalGeneration(config).eval()


def _pooling(rows: int, cols: int, crop_of, offset: int) -> torch.Tensor:
    """``[rows/2 * cols/2, 4]`` patch indices pooled by each LLM token over a ``rows x cols`` patch canvas, row-major
    (Molmo2's ``arange_for_pooling``); ``crop_of(r, c)`` maps a canvas patch to ``(crop, row, col)``."""
    windows = []
    for tr in range(rows // MOLMO2_POOL):
        for tc in range(cols // MOLMO2_POOL):
            window = []
            for dr in range(MOLMO2_POOL):
                for dc in range(MOLMO2_POOL):
                    crop, r, c = crop_of(tr * MOLMO2_POOL + dr, tc * MOLMO2_POOL + dc)
                    window.append(offset + crop * MOLMO2_SIDE**2 + r * MOLMO2_SIDE + c)
            windows.append(window)
    return torch.tensor(windows)


@dataclass
class Molmo2Batch:
    """Molmo2 samples in the processor's layout: each sample holds images (a low-res view and ``wide`` high-res crops
    side by side, rows ended by a column token) or one video (``frames`` frames, each with a timestamp word)."""

    kind: str  # "image" or "video"
    rows: list[list[int]]
    items: list[list[int]]  # per sample: indices into the batch's images / videos, in order of appearance
    crops: list[torch.Tensor]  # per item: [crops, 36, 48] patches (image: low-res view first; video: one per frame)
    grids: list[list[int]]  # per item: image [3, 3, 3, 3 * wide]; video [frames, 3, 3]

    family = "molmo2"

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
        items = [j for i in indices for j in self.items[i]]
        pooling, offset = [], 0
        for j in items:
            pooling.append(self._item_pooling(j, offset))
            offset += self.crops[j].shape[0] * MOLMO2_SIDE**2
        name = "image" if self.kind == "image" else "video"
        pixels = "pixel_values" if self.kind == "image" else "pixel_values_videos"
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": torch.isin(input_ids, torch.tensor(MOLMO2_MULTIMODAL)).long(),
            pixels: torch.cat([self.crops[j] for j in items]),
            f"{name}_token_pooling": torch.cat(pooling),
            f"{name}_grids": torch.tensor([self.grids[j] for j in items]),
        }

    def sample(self, i: int) -> dict:
        return self.inputs([i])

    def _item_pooling(self, j: int, offset: int) -> torch.Tensor:
        if self.kind == "video":  # each frame is its own crop
            frames = self.crops[j].shape[0]
            return torch.cat(
                [_pooling(MOLMO2_SIDE, MOLMO2_SIDE, lambda r, c, f=f: (f, r, c), offset) for f in range(frames)]
            )
        wide = self.crops[j].shape[0] - 1
        low = _pooling(MOLMO2_SIDE, MOLMO2_SIDE, lambda r, c: (0, r, c), offset)

        def high_res(r: int, c: int) -> tuple[int, int, int]:  # the high-res crops side by side, no overlap
            return 1 + c // MOLMO2_SIDE, r, c % MOLMO2_SIDE

        high = _pooling(MOLMO2_SIDE, MOLMO2_SIDE * wide, high_res, offset)
        return torch.cat([low, high])


def make_molmo2_batch(kind: str, seed: int = 7) -> Molmo2Batch:
    """Three samples, left padded. Images: one, one twice as wide, two; videos of 2, 3 and 1 frames (9 tokens each),
    the prompts of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    tokens = MOLMO2_CROP // 4 // MOLMO2_POOL  # 3 tokens per side of a crop

    def words(n: int) -> list[int]:
        return torch.randint(3, 50, (n,), generator=generator).tolist()

    def crops(n: int) -> torch.Tensor:
        return torch.randn(n, MOLMO2_SIDE**2, MOLMO2_PATCH_PIXELS, generator=generator)

    if kind == "image":

        def image(wide: int) -> list[int]:
            low = [MOLMO2_LOW_RES_START, *([MOLMO2_PATCH] * tokens + [MOLMO2_COL]) * tokens, MOLMO2_IMAGE_END]
            high = [MOLMO2_IMAGE_START, *([MOLMO2_PATCH] * tokens * wide + [MOLMO2_COL]) * tokens, MOLMO2_IMAGE_END]
            return low + high

        widths = [1, 2, 1, 1]
        rows = [
            [BOS, *words(2), *image(1), *words(3)],
            [BOS, *image(2), *words(6)],
            [BOS, *words(1), *image(1), *words(2), *image(1), *words(1)],
        ]
        grids = [[tokens, tokens, tokens, tokens * w] for w in widths]
        return Molmo2Batch("image", rows, [[0], [1], [2, 3]], [crops(1 + w) for w in widths], grids)
    if kind == "video":

        def video(frames: int) -> list[int]:
            out = []
            for _ in range(frames):  # a timestamp word, then the frame's tokens (videos have no column tokens)
                out += [*words(1), MOLMO2_FRAME_START, *[MOLMO2_PATCH] * tokens**2, MOLMO2_FRAME_END]
            return out

        frames = [2, 3, 1]
        rows = [
            [BOS, *words(2), *video(frames[0]), *words(3)],
            [BOS, *video(frames[1]), *words(2)],
            [BOS, *words(4), *video(frames[2]), *words(1)],
        ]
        grids = [[f, tokens, tokens] for f in frames]
        return Molmo2Batch("video", rows, [[0], [1], [2]], [crops(f) for f in frames], grids)
    raise ValueError(f"unknown Molmo2 batch kind {kind!r}")


def molmo2_visual_counts(batch: Molmo2Batch) -> list[int]:
    return [row.count(MOLMO2_PATCH) for row in batch.rows]
