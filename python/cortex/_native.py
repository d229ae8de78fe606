"""Imports the Rust core, ``cortex._core``.

The GPU build links CUDA's libraries (the driver's ``libcuda.so.1``; cuBLAS, cuRAND, NVRTC
and the runtime, version 13). When the system's loader does not find them, they are taken
from the ``nvidia-*`` pip packages beside Cortex (``nvidia-cublas``, ``nvidia-curand``,
``nvidia-cuda-nvrtc``, ``nvidia-cuda-runtime``, as PyTorch installs them): each library
found there is loaded once, globally, and the import is tried again. The CPU build links
none of them and imports at once.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
from types import ModuleType

__all__ = ["core", "load_core"]

#: Load order: each before the libraries that link it.
_LIBRARIES = ("libcudart.so.13", "libnvrtc.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10")


def _pip_library_dirs() -> list[str]:
    dirs = []
    for entry in sys.path:
        for sub in (
            "nvidia/cu13/lib",
            "nvidia/cublas/lib",
            "nvidia/curand/lib",
            "nvidia/cuda_nvrtc/lib",
            "nvidia/cuda_runtime/lib",
        ):
            d = os.path.join(entry or ".", sub)
            if os.path.isdir(d):
                dirs.append(d)
    return dirs


def load_core() -> ModuleType:
    try:
        return importlib.import_module("cortex._core")
    except ImportError as first:
        if ".so" not in str(first):
            raise
        dirs = _pip_library_dirs()
        for name in _LIBRARIES:
            for d in dirs:
                path = os.path.join(d, name)
                if os.path.exists(path):
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                    break
        try:
            return importlib.import_module("cortex._core")
        except ImportError as second:
            raise ImportError(
                f"{second}. This is the GPU build of Cortex: it needs the NVIDIA driver (libcuda.so.1) and "
                "CUDA 13's cuBLAS, cuRAND, NVRTC and runtime, from the system or from pip "
                "(nvidia-cublas nvidia-curand nvidia-cuda-nvrtc nvidia-cuda-runtime)"
            ) from first


core = load_core()
