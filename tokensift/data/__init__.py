"""Datasets and Lightning data modules for tokensift."""

from tokensift.data.contract import VQA_BATCH_CONTRACT, VQABatchError, check_vqa_batch
from tokensift.data.digit_vqa import DigitVQA, DigitVQADataModule
from tokensift.data.digits import ClutteredDigits, ClutteredDigitsDataModule
from tokensift.data.shape_vqa import ShapeVQA, ShapeVQADataModule
from tokensift.data.shapes import TexturedShapes, TexturedShapesDataModule
from tokensift.data.video_vqa import VideoDigitVQA, VideoDigitVQADataModule

__all__ = [
    "VQA_BATCH_CONTRACT",
    "ClutteredDigits",
    "ClutteredDigitsDataModule",
    "DigitVQA",
    "DigitVQADataModule",
    "ShapeVQA",
    "ShapeVQADataModule",
    "TexturedShapes",
    "TexturedShapesDataModule",
    "VQABatchError",
    "VideoDigitVQA",
    "VideoDigitVQADataModule",
    "check_vqa_batch",
]
