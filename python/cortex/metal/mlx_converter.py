"""The converter under its original import path; see :mod:`cortex.converter`."""

from ..converter import ConversionConfig, ConversionFormat, MLXConverter, QuantizationRecipe

__all__ = ["ConversionConfig", "ConversionFormat", "MLXConverter", "QuantizationRecipe"]
