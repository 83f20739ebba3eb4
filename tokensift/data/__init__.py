"""Datasets and Lightning data modules for tokensift."""

from tokensift.data.digits import ClutteredDigits, ClutteredDigitsDataModule

__all__ = ["ClutteredDigits", "ClutteredDigitsDataModule"]
