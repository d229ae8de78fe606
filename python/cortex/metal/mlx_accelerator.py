"""The accelerator under its original import path; see :mod:`cortex.accelerator`."""

from ..accelerator import OPTIMIZATION_PRESETS, MLXAccelerator, MLXConfig

__all__ = ["OPTIMIZATION_PRESETS", "MLXAccelerator", "MLXConfig"]
