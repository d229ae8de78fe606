#!/usr/bin/env bash
# A stand-in `nvcc` for type-checking the CUDA build (scripts/cuda_env.sh --check): it
# answers --version as CUDA 13.0 and creates, empty, the files a real nvcc would write.
if [[ " $* " == *" --version "* ]]; then
  # Line 4 is what cudarc's build script parses.
  printf 'nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2025 NVIDIA Corporation\nBuilt on fake\nCuda compilation tools, release 13.0, V13.0.88\nBuild cuda_13.0.r13.0/compiler.36424714_0\n'
  exit 0
fi
out=""; dir=""; ptx=0; files=()
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out="$2"; shift;;
    --output-directory|-odir) dir="$2"; shift;;
    --ptx|-ptx) ptx=1;;
    *.cu) files+=("$1");;
  esac
  shift
done
if [ -n "$out" ]; then : > "$out"; fi
if [ $ptx = 1 ] && [ -n "$dir" ]; then
  for f in "${files[@]}"; do : > "$dir/$(basename "$f" .cu).ptx"; done
fi
exit 0
