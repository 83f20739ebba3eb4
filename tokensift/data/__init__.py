"""Datasets and Lightning data modules for tokensift."""

from tokensift.data.digit_vqa import DigitVQA, DigitVQADataModule
from tokensift.data.digits import ClutteredDigits, ClutteredDigitsDataModule
from tokensift.data.shapes import TexturedShapes, TexturedShapesDataModule

__all__ = [
    "ClutteredDigits",
    "ClutteredDigitsDataModule",
    "DigitVQA",
    "DigitVQADataModule",
    "TexturedShapes",
    "TexturedShapesDataModule",
]
