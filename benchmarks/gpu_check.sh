#!/usr/bin/env bash
# The first thing a GPU machine runs: builds the CUDA kernels for its GPU, proves that they are the ones used, checks
# them (parity, long-memory drift, compute-sanitizer, the GPU test suite) and times them, in about ten minutes.
#
#   bash benchmarks/gpu_check.sh OUTDIR             # on a GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run OUTDIR   # anywhere: the steps that need no GPU, the others marked skipped
#
# Every step runs under `timeout` and tees its log into OUTDIR (NN-step.log); OUTDIR/summary.txt lists each step's
# status and time. The benchmark report (benchmarks/gpu.py) is written to benchmarks/results/ and copied to OUTDIR,
# next to OUTDIR/stages.json (Spatial-Mamba-T's four stages against a measured device copy) and OUTDIR/drift.json.
# PYTHON (default: .venv/bin/python, else python3) runs the steps. Exits non-zero when a step failed.
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
fi
if [ $# -ne 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh [--dry-run] OUTDIR" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="$(mkdir -p "$1" && cd "$1" && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# The CPU kernels compile into OUTDIR, not into a shared cache, and only if a step uses them.
export SPATIAL_MAMBA_CACHE="$OUTDIR/cpu_kernels"
export PYTHONUNBUFFERED=1

if [ "$DRY" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: no CUDA device visible to $PY; use --dry-run to check the script itself" >&2
  exit 2
fi

STEP=0
FAILED=0
: > "$OUTDIR/summary.txt"

# step NAME SECONDS GPU_ONLY COMMAND...: runs COMMAND under `timeout SECONDS`, its output teed to OUTDIR/NN-NAME.log.
step() {
  local name="$1" seconds="$2" gpu_only="$3"
  shift 3
  STEP=$((STEP + 1))
  local log
  log="$OUTDIR/$(printf '%02d' "$STEP")-$name.log"
  if [ "$DRY" = 1 ] && [ "$gpu_only" = 1 ]; then
    echo "skipped (dry run): $*" > "$log"
    printf '%-10s %-8s %5s s  %s\n' "$name" skipped 0 "$*" | tee -a "$OUTDIR/summary.txt"
    return 0
  fi
  local start status
  start=$(date +%s)
  echo "[gpu_check] $name: $*"
  timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  local result=ok
  if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    result=timeout
  elif [ "$status" != 0 ]; then
    result="rc=$status"
  fi
  [ "$result" = ok ] || FAILED=$((FAILED + 1))
  printf '%-10s %-8s %5s s  %s\n' "$name" "$result" "$(($(date +%s) - start))" "$*" | tee -a "$OUTDIR/summary.txt"
}

ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)"

# 1. What this machine is.
step env 60 0 bash -c "nvidia-smi || echo 'nvidia-smi: not found'; $PY benchmarks/gpu_check.py env"
# 2. The CUDA extensions, built for this GPU, with ptxas' register and spill report.
step build 300 1 env SPATIAL_MAMBA_BUILD_CUDA=1 MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="$ARCH" \
  NVCC_APPEND_FLAGS=--ptxas-options=-v "$PY" setup.py build_ext --inplace
# 3. Every op must run on the cuda backend now; each later step relies on it.
step dispatch 60 1 "$PY" benchmarks/gpu_check.py dispatch
# 4. The long-memory scan (no state resets, 66,600-token rows) against float64, on every backend here.
step drift 180 0 "$PY" benchmarks/gpu_check.py drift "$OUTDIR/drift.json"
# 5. compute-sanitizer: out-of-bounds accesses and races of every kernel at tiny shapes.
if command -v compute-sanitizer > /dev/null 2>&1 || [ "$DRY" = 1 ]; then
  step memcheck 150 1 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" benchmarks/gpu_check.py sanitize
  step racecheck 150 1 compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" benchmarks/gpu_check.py sanitize
else
  echo "compute-sanitizer not found: memcheck and racecheck not run" | tee -a "$OUTDIR/summary.txt"
fi
# 6. The GPU tests: a missing extension fails them (tests/kernels/gpu.py), so nothing passes without running.
step pytest 240 1 "$PY" -m pytest tests/kernels/test_cuda_ops.py tests/kernels/test_backend_parity.py \
  tests/ops/test_triton_scan.py tests/ops/test_triton_state_fusion.py -q -rs -x -p no:cacheprovider
# 7. Timing: the four stages of Spatial-Mamba-T against a device copy, then the benchmark report.
step stages 150 1 "$PY" benchmarks/gpu_check.py stages "$OUTDIR/stages.json"
if [ "$DRY" = 1 ]; then
  step benchmark 300 0 "$PY" benchmarks/gpu.py --smoke --out "$OUTDIR"
else
  step benchmark 300 0 bash -c "$PY benchmarks/gpu.py --profile --time-budget 240 --out benchmarks/results && \
    cp benchmarks/results/*.json '$OUTDIR/'"
fi
# 8. ncu on the observation backward and the scan (when it works on this machine).
if command -v ncu > /dev/null 2>&1 || [ "$DRY" = 1 ]; then
  step ncu 90 1 ncu -c 6 --section SpeedOfLight --section Occupancy --section WarpStateStats \
    "$PY" benchmarks/gpu_check.py sanitize
fi

echo "[gpu_check] $FAILED step(s) failed; summary in $OUTDIR/summary.txt"
[ "$FAILED" = 0 ]
