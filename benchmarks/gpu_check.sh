#!/usr/bin/env bash
# The prepared GPU check of issue 4, for a machine with a GPU and torch already installed:
#   1. build pddm_ext in place with the CUDA kernels (only the visible GPU's architecture),
#   2. run tests/test_cuda.py and benchmarks/precision.py (the error of each float32 matmul precision),
#   3. run benchmarks/gpu_bench.py (the fused ops at each float32 matmul precision against the
#      reference, torch.compile of it, BatchHardMiner and the torch.mm roofline) within what is left
#      of an 8-minute budget.
# Wheels in $GPU_WHEELS (default .whl; `make gpu-wheels` downloads them where a registry is reachable)
# are installed first, without an index and without their dependencies (torch is never touched), into
# build/gpu-site, which goes on PYTHONPATH after the checkout; a peer whose package is still missing is
# skipped by the benchmark with a line saying so.
# Results (build/test logs, results.json, results.md, nvidia-smi) go to $OUT when set, else
# benchmarks/results/gpu/. Exits non-zero if the build or a test failed (the benchmark still runs
# after a test failure, so one session on a GPU yields everything).
#
# Environment: PYTHON (default python3), CUDA_HOME (default /usr/local/cuda if present),
# TORCH_CUDA_ARCH_LIST (default: the visible GPU's), MAX_JOBS (default: all cores),
# CHECK_BUDGET_S (default 460: seconds for the whole script), GPU_WHEELS (default .whl).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHONPATH_BEFORE=${PYTHONPATH:-}
PYTHONPATH="$PWD${PYTHONPATH_BEFORE:+:$PYTHONPATH_BEFORE}"  # the in-place build below, ahead of any installed copy
export PYTHONPATH
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results/gpu}
BUDGET_S=${CHECK_BUDGET_S:-460}
mkdir -p "$OUT_DIR"
start=$(date +%s)

log() { printf '[gpu_check %4ds] %s\n' "$(( $(date +%s) - start ))" "$*"; }

if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  log "no CUDA device visible to torch: nothing to check"
  exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
fi
wheels_dir=${GPU_WHEELS:-.whl}
shopt -s nullglob
wheels=("$wheels_dir"/*.whl)
shopt -u nullglob
if (( ${#wheels[@]} )); then
  site="$PWD/build/gpu-site"
  rm -rf "$site"
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "${wheels[@]}" > "$OUT_DIR/wheels.log" 2>&1; then
    PYTHONPATH="$PWD:$site${PYTHONPATH_BEFORE:+:$PYTHONPATH_BEFORE}"
    log "installed ${wheels[*]##*/} into $site"
  else
    tail -n 5 "$OUT_DIR/wheels.log"
    log "installing the wheels of $wheels_dir failed (log: $OUT_DIR/wheels.log): peers without their package are skipped"
  fi
else
  log "no wheels in $wheels_dir (make gpu-wheels): peers whose package is missing here are skipped"
fi

if [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda ]]; then
  export CUDA_HOME=/usr/local/cuda
fi
arch=$("$PYTHON" -c 'import torch; major, minor = torch.cuda.get_device_capability(); print(f"{major}.{minor}")')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
export PDDM_EXT_CUDA=1
MAX_JOBS=${MAX_JOBS:-$(nproc)}
export MAX_JOBS

log "building (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, CUDA_HOME=${CUDA_HOME:-unset}, MAX_JOBS=$MAX_JOBS)"
if ! "$PYTHON" setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1; then
  tail -n 40 "$OUT_DIR/build.log"
  log "build failed (log: $OUT_DIR/build.log)"
  exit 1
fi
"$PYTHON" -c 'import pddm_ext, torch
assert pddm_ext._C.with_cuda, "built without CUDA"
for op in ("scores", "scores_backward", "mine_pddm", "mine_euclidean"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pddm_ext::{op}", "CUDA"), op
print("CUDA kernels registered for all ops")'

log "running tests/test_cuda.py"
test_status=0
"$PYTHON" -m pytest -q -rs tests/test_cuda.py 2>&1 | tee "$OUT_DIR/test_cuda.log" | tail -n 25 || test_status=$?

log "measuring the error of each float32 matmul precision (benchmarks/precision.py)"
precision_status=0
timeout 120 "$PYTHON" benchmarks/precision.py --out "$OUT_DIR" --command "make gpu-check" 2>&1 \
  | tee "$OUT_DIR/precision.log" | tail -n 8 || precision_status=$?

elapsed=$(( $(date +%s) - start ))
bench_budget=$(( BUDGET_S - elapsed - 30 ))
if (( bench_budget < 60 )); then
  bench_budget=60
fi
log "benchmarking (budget ${bench_budget}s for starting configurations)"
bench_status=0
"$PYTHON" benchmarks/gpu_bench.py --out "$OUT_DIR" --budget-s "$bench_budget" 2>&1 | tee "$OUT_DIR/bench.log" || bench_status=$?

log "done: tests exit $test_status, precision exit $precision_status, benchmark exit $bench_status; results in $OUT_DIR"
if (( test_status != 0 || precision_status != 0 || bench_status != 0 )); then
  exit 1
fi
