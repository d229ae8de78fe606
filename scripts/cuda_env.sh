#!/usr/bin/env bash
# Run a command in a CUDA 13.0 build environment made only of pip packages: nvcc, headers
# and cudart from PyPI wheels, link-time stubs for the driver libraries (the GPU machine's
# own are used at run time). No GPU and no CUDA toolkit are needed.
#
#   scripts/cuda_env.sh maturin build --release --features cuda,python   # a GPU wheel
#   scripts/cuda_env.sh --check cargo clippy --lib --features cuda       # CI: type-check only
#
# --check puts a fake `nvcc` first on PATH for candle-kernels (whose build script compiles
# llama.cpp's MMQ kernels for ~10 minutes even for `cargo check`), while Cortex's own
# kernels (src/cuda/kernels/*.cu) still compile for real through CORTEX_NVCC: they cannot
# rot, and the check takes about a minute.
#
# CUDA_COMPUTE_CAP (default 90) is the architecture candle's MMQ library is built for;
# Cortex's kernels are compute_80 PTX and run on any sm_80+ GPU.
set -euo pipefail

check=0
if [ "${1:-}" = "--check" ]; then check=1; shift; fi

CUDA_VENV=${CUDA_VENV:-$HOME/.cache/cuda13.0-venv}
# Every piece pinned to 13.0: an unpinned nvvm (13.5) emits PTX that driver 580 rejects.
[ -x "$CUDA_VENV/bin/pip" ] || python3 -m venv "$CUDA_VENV"
if [ ! -f "$CUDA_VENV/.cortex-13.0" ]; then
  "$CUDA_VENV/bin/pip" install -q --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85"
  touch "$CUDA_VENV/.cortex-13.0"
fi
CU=$("$CUDA_VENV/bin/python" -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13"))')

# Link stubs with the right SONAMEs, generated from cudarc's own bindings: candle-core 0.11
# links cudarc with "dynamic-linking", and libcuda has no wheel at all.
STUB="$CUDA_VENV/cuda-link"
if [ ! -f "$STUB/lib/libcuda.so" ]; then
  CUDARC=$(cargo metadata --format-version 1 --features cuda | python3 -c '
import json, os, sys
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
  mkdir -p "$STUB/lib"
  gen() {  # gen <libname> <soname> <cudarc sys module>
    grep -oP '^pub unsafe fn \K\w+' "$CUDARC/src/$3/sys/mod.rs" | sort -u |
      awk '{print "void " $1 "(void){}"}' > "$STUB/$1.c"
    gcc -shared -fPIC -Wl,-soname,"$2" -o "$STUB/lib/$1.so" "$STUB/$1.c"
  }
  gen libcuda libcuda.so.1 driver
  gen libcublas libcublas.so.13 cublas
  gen libcublasLt libcublasLt.so.13 cublaslt
  gen libcurand libcurand.so.10 curand
  gen libnvrtc libnvrtc.so.13 nvrtc
  ln -sf "$CU/lib/libcudart.so.13" "$STUB/lib/libcudart.so"
fi

export CUDA_HOME="$STUB" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CORTEX_NVCC="$CU/bin/nvcc"
if [ $check = 1 ]; then
  FAKE="$CUDA_VENV/fake-nvcc"
  mkdir -p "$FAKE"
  cp "$(dirname "$0")/fake_nvcc.sh" "$FAKE/nvcc"
  chmod +x "$FAKE/nvcc"
  export PATH="$FAKE:$PATH"
else
  export PATH="$CU/bin:$PATH"
fi
exec "$@"
