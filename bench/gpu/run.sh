#!/usr/bin/env bash
# One prepared GPU check: build pystage against the torch installed here, run the CUDA tests and every
# `pystage-bench ... --device cuda` job, and bring every figure back in OUTDIR - in at most 8 minutes.
#
#   bash bench/gpu/run.sh OUTDIR [--device cuda|cpu] [--steps NAME,NAME,...]
#
# For a bare, offline GPU machine with torch + CUDA + nvcc + h5py + psutil + tqdm + pytest: nothing is
# downloaded (`pip install --no-build-isolation --no-deps -e .`). Each step runs under its own `timeout`
# (and never past the total deadline); a failing step is recorded (rc) and the next one runs. OUTDIR gets
# one log per step (<step>.log), the jobs' JSON, cuda_tests.xml, and summary.tsv + summary.md (step, rc,
# seconds, key figures). `--device cpu` is the dry run: the same steps on the CPU with small sizes.
# `--steps` runs only the named steps (the others are recorded as "not selected"); the default is every
# step but the extras (paper_full, train_full, search_full: issue-sized runs at 49,000 rows, minutes each),
# which a second call runs: `--steps env,build,paper_full,train_full,search_full`.
#
# Environment: PYTHON (default python3), PYSTAGE_GPU_TOTAL_S (deadline for all steps, default 470; the CPU
# dry run doubles every limit and the deadline),
# TORCH_CUDA_ARCH_LIST (default: the GPU's capability), MAX_JOBS (default nproc).
set -uo pipefail

usage() { echo "usage: $0 OUTDIR [--device cuda|cpu] [--steps NAME,NAME,...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DEVICE=cuda
EXTRAS=",paper_full,train_full,search_full,"
STEPS=""  # empty: every step but the extras
while [ $# -gt 0 ]; do
  case "$1" in
    --device) [ $# -ge 2 ] || usage; DEVICE=$2; shift 2 ;;
    --steps) [ $# -ge 2 ] || usage; STEPS=",$2,"; shift 2 ;;
    *) usage ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) usage ;; esac

PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 1
T0=$SECONDS
SCALE=1  # the dry run on a (shared, slow) CPU gets twice the time per step and a later deadline
[ "$DEVICE" = cpu ] && SCALE=2
TOTAL=${PYSTAGE_GPU_TOTAL_S:-$((470 * SCALE))}
SUMMARY="$OUT/summary.tsv"
printf 'step\trc\tseconds\tlimit_s\tlog\n' >"$SUMMARY"
BENCH="$PY -m pystage.bench.cli"

# step NAME LIMIT_S COMMAND: run COMMAND (a bash string) under timeout, log to OUTDIR/NAME.log, record it.
step() {
  local name=$1 limit=$(($2 * SCALE)) cmd=$3 left rc t
  if { [ -n "$STEPS" ] && [[ "$STEPS" != *",$name,"* ]]; } || { [ -z "$STEPS" ] && [[ "$EXTRAS" == *",$name,"* ]]; }; then
    printf '%s\tnot selected\t0\t0\t-\n' "$name" >>"$SUMMARY"
    return
  fi
  left=$((TOTAL - (SECONDS - T0)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    printf '%s\tskipped\t0\t0\t-\n' "$name" >>"$SUMMARY"
    printf '[%4ds] %-14s skipped: the %ds deadline is reached\n' "$((SECONDS - T0))" "$name" "$TOTAL"
    return
  fi
  t=$SECONDS
  { echo "\$ $cmd"; echo; } >"$OUT/$name.log"
  timeout -k 10 "$limit" bash -c "$cmd" >>"$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%d\t%d\t%d\t%s.log\n' "$name" "$rc" "$((SECONDS - t))" "$limit" "$name" >>"$SUMMARY"
  printf '[%4ds] %-14s rc=%-3d %4ds (limit %ds)\n' "$((SECONDS - T0))" "$name" "$rc" "$((SECONDS - t))" "$limit"
  [ "$rc" -eq 0 ] || tail -n 5 "$OUT/$name.log" | sed 's/^/    /'
}

if [ "$DEVICE" = cuda ]; then
  # sizes of the real check (H200-class GPU): the recorded nets at batch 256
  B=256; P16=400MiB; P24=470MiB; P40=512MiB
  TRAIN_BUDGET="--model plain-60-64 --batch-size 64 --n 512 --val-n 128 --epochs 1 --budget 140MiB --methods partial,total"
  TRAIN="--model cnn8 --n 4000 --val-n 1000 --epochs 1 --methods plain,total,partial,partial-recompute,checkpoint"
  TRAIN_FULL="--model cnn8 --n 49000 --val-n 1000 --epochs 4 --methods plain,total,partial"
  PAPER="--data synthetic --n 1000 --n-val 200 --table 2 --sweeps both"
  PAPER_FULL="--data synthetic --n 49000 --n-val 1000 --table both --sweeps shared --search population --halving off --threads 0"
  SEARCH="--model cnn6 --n 4900 --n-val 500 --repeats 1 --threads 0"
  SEARCH_FULL="--model cnn6 --n 49000 --n-val 1000 --repeats 1 --threads 0"
  # the default job's 5 MiB cannot be planned on a GPU: stage 1 pays the one-off cuBLAS workspaces (65 MiB on sm_90),
  # so no split fits under 69 MiB; at 3x32x32, batch 512 end to end needs ~1 GiB (estimate), > 4x 240 MiB
  BUDGET="--threads 0 --parallel 1 --size 32 --batch-size 512 --budget 240MiB --n 2048 --val-n 512 --epochs 1"
  LAYERS=""
  ARCH=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)}
  BUILD="TORCH_CUDA_ARCH_LIST='${ARCH:-9.0}' MAX_JOBS=\${MAX_JOBS:-\$(nproc)} $PY -m pip install --no-build-isolation --no-deps -e . \
&& $PY -c 'import pystage, pystage._C_cuda; from pystage import _ext; assert _ext.HAS_CUDA_KERNELS; print(\"built\", pystage.__file__)'"
  LIM_BUILD=150
else
  # the dry run: same steps, sizes that take seconds on a CPU
  B=16; P16=28MiB; P24=36MiB; P40=56MiB
  TRAIN_BUDGET="--model plain-16-16 --batch-size 20 --n 200 --val-n 50 --epochs 1 --budget 9MiB --methods partial,total"
  TRAIN="--model cnn2 --n 200 --val-n 50 --epochs 1 --methods plain,total,partial"
  TRAIN_FULL=$TRAIN
  PAPER="--data synthetic --n 100 --n-val 20 --models cnn1,cnn2 --draws 2 --table 2 --sweeps both"
  PAPER_FULL="--data synthetic --n 200 --n-val 50 --models cnn1,cnn2 --draws 2 --table both --sweeps shared \
--search population --halving off"
  SEARCH="--model cnn2 --n 200 --n-val 50 --draws 2 --repeats 1"
  SEARCH_FULL=$SEARCH
  BUDGET="--n 300 --val-n 100 --epochs 1"
  LAYERS="--repeats 1 --forward-repeats 1 --cases 0 --fractions 0.5"
  BUILD="$PY -c 'import pystage, pystage._C; print(\"already built:\", pystage.__file__)' \
|| $PY -m pip install --no-build-isolation --no-deps -e ."
  LIM_BUILD=150
fi
D="--device $DEVICE"

echo "pystage GPU check: device=$DEVICE, output in $OUT, deadline ${TOTAL}s"
step env 20 "nvidia-smi 2>/dev/null; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \
\"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name(0)); \
print(\"cudnn\", torch.backends.cudnn.version() if torch.cuda.is_available() else None)'; nproc; \
git -C '$ROOT' log --oneline -1 2>/dev/null || true"
step build "$LIM_BUILD" "$BUILD"
step cuda_tests 75 "$PY -m pytest -m cuda -q -p no:cacheprovider --junitxml='$OUT/cuda_tests.xml' tests"
step layers 90 "$BENCH layers $D $LAYERS --json '$OUT/layers.json'"  # fp32 + bf16 on cuda, cases 0-5
step plan16 30 "$BENCH plan --model plain-16-64 --budget $P16 --batch-size $B --verify $D --json '$OUT/plan16.json'"
step plan24_rec 30 "$BENCH plan --model plain-24-64 --budget $P24 --batch-size $B --split-points 6,10,14 --verify $D \
--json '$OUT/plan24_recorded.json'"
step budget 45 "$BENCH budget $D $BUDGET --json '$OUT/budget.json'"
step train 50 "$BENCH train $D $TRAIN --json '$OUT/train.json'"
step search 40 "$BENCH search $D $SEARCH --json '$OUT/search.json'"
step plan24 30 "$BENCH plan --model plain-24-64 --budget $P24 --batch-size $B --verify $D --json '$OUT/plan24.json'"
step plan40 45 "$BENCH plan --model plain-40-64 --budget $P40 --batch-size $B --verify $D --json '$OUT/plan40.json'"
step train_budget 60 "$BENCH train $D $TRAIN_BUDGET --json '$OUT/train_budget.json'"
step paper 50 "$BENCH paper $D $PAPER --json '$OUT/paper.json'"
step paper_full 300 "$BENCH paper $D $PAPER_FULL --json '$OUT/paper_full.json'"
step train_full 150 "$BENCH train $D $TRAIN_FULL --json '$OUT/train_full.json'"
step search_full 200 "$BENCH search $D $SEARCH_FULL --json '$OUT/search_full.json'"

"$PY" "$ROOT/bench/gpu/summarize.py" "$OUT" >"$OUT/summary.md" 2>"$OUT/summarize.log" \
  || echo "summarize.py failed: see $OUT/summarize.log"
echo
cat "$OUT/summary.md" 2>/dev/null || cat "$SUMMARY"
echo "total: $((SECONDS - T0)) s"
