#!/usr/bin/env bash
# The GPU checks of issue 12 in one go, from the repository root, on a machine with a CUDA GPU and a CUDA
# build of torch in the active environment (about 10 minutes on an H200, most of it the build).
#   1. build pystage._C and pystage._C_cuda in place (TORCH_CUDA_ARCH_LIST defaults to 9.0 here)
#   2. the CUDA tests: every backward path against the CPU reference, the autotuned layers, no host sync
#   3. pystage-bench layers --device cuda: cases 0-5, float32 and bfloat16 -> bench/results/layers_cuda.{json,txt}
set -euo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PYSTAGE_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" python setup.py -q build_ext --inplace
python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_autotune.py
pystage-bench layers --device cuda --json "$OUT/layers_cuda.json" | tee "$OUT/layers_cuda.txt"
