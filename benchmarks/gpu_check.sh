#!/usr/bin/env bash
# The one-shot GPU check (`make gpu-check`), for a machine with a GPU, torch, nvcc and ninja and no
# network. Every step runs under a hard `timeout` taken from one time budget (CHECK_BUDGET_S, default
# 360 s: start + run + start + rerun fit in 15 minutes of device time); a step that does not fit what
# is left is skipped with a line saying so. In the order of their value:
#   preflight   benchmarks/gpu_preflight.py, seconds: GPU, SMs, driver, clocks, nvcc vs torch's CUDA,
#               C++ compiler, ninja, the carried wheels; no GPU, a toolkit whose CUDA major version
#               differs from torch's, no ninja, or a package neither installed nor carried ends the
#               script at once (exit 2) with one line `gpu_check: ...`
#   wheels      the carried wheels ($GPU_WHEELS, default .whl; `make gpu-wheels`) of packages not
#               installed here, pip --no-index --no-deps into build/gpu-site (never the network,
#               never a torch); then BatchHardMiner must import, else the script ends (exit 2)
#   build       pddm_ext in place with CUDA, only the visible GPU's architecture, ninja with MAX_JOBS
#               (default: all cores); objects in build/gpu-temp, so a rerun on the same machine
#               recompiles only what changed. A failed build ends the script (exit 1)
#   tests       the `cuda` cases of the tests every device shares (tests/test_scores.py,
#               test_autograd.py, test_mining.py, test_forms.py, test_numerics.py; -k cuda), then
#               tests/test_cuda.py (last: a test of its large sizes that leaves the CUDA context broken
#               cannot take the shared ones with it), pytest -v --durations=15 (a hang dumps its stack
#               after 60 s and the log names the last test started)
#   sanitizer   compute-sanitizer memcheck, then racecheck, of three small cases
#               (benchmarks/gpu_cases.py sanitize), only pddm_ext's kernels instrumented
#   precision   benchmarks/precision.py: the error of each float32 matmul precision
#   bench       benchmarks/gpu_bench.py within what is left (less the ncu box): rows by value, the
#               bank row last on a fraction of the bank
#   ncu         a profile of the forward tile kernel at m = 4096 under each precision (occupancy,
#               shared memory, tensor pipe, stall reasons), in its own time box, when time is left
# Results: results.json and results.md, rewritten after every step and every benchmark row (a killed
# run leaves all it measured), plus gpu_check.log (this output), build.log, test_cuda.log,
# sanitizer.log and ncu.csv: 7 files in $OUT when set (a remote run returns at most 8), else in
# benchmarks/results/gpu/. Exit code: 0 all passed, 1 a build, test or check failed, 2 the preflight
# stopped the run.
#
# Environment: PYTHON (python3), CUDA_HOME (default: where the preflight found nvcc),
# TORCH_CUDA_ARCH_LIST (default: the visible GPU's), MAX_JOBS (all cores), CHECK_BUDGET_S (360),
# GPU_WHEELS (.whl), GPU_CHECK_COMMIT (the commit, for a tree copied without .git),
# GPU_CHECK_ALLOW_MISSING_WHEELS=1 (run without BatchHardMiner), GPU_CHECK_<STEP>_TIMEOUT_S (the cap
# of a step: BUILD 240, TESTS 150, SANITIZER 45 per tool, PRECISION 60, NCU 90), GPU_CHECK_TESTS
# (pytest's arguments; default: the files and -k of the tests step above), GPU_CHECK_BENCH_BUDGET_S
# (at most this for the benchmark), GPU_CHECK_SKIP (steps not to run, e.g. "sanitizer ncu" on a rerun:
# tests, sanitizer, precision, bench, ncu).
# GPU_CHECK_REHEARSAL=1 rehearses the script on the CPU (CI, benchmarks/test_gpu_check.py): the GPU
# and toolkit checks only reported, no build (the package as built), the benchmark and precision.py
# at tiny sizes on the CPU (GPU_CHECK_BENCH_ARGS, GPU_CHECK_PRECISION_ARGS), no sanitizer, no ncu.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

# Everything this script prints also goes to gpu_check.log (the script runs again under tee).
if [[ -z "${GPU_CHECK_LOGGED:-}" ]]; then
  export GPU_CHECK_LOGGED=1
  rm -f "$OUT_DIR"/{results.json,results.md,gpu_check.log,build.log,test_cuda.log,sanitizer.log,ncu.csv}
  bash "$0" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi

PYTHON=${PYTHON:-python3}
BUDGET_S=${CHECK_BUDGET_S:-360}
REHEARSAL=${GPU_CHECK_REHEARSAL:-0}
WORK=$PWD/build/gpu-check
rm -rf "$WORK"
mkdir -p "$WORK"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build below, ahead of any installed copy
export PYTHONPATH PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1
export GPU_WHEELS=${GPU_WHEELS:-.whl}
start=$SECONDS
failed=()

left() { echo $(( BUDGET_S - (SECONDS - start) )); }
log() { local l; l=$(left); printf '[gpu_check %4ds, %4ds left] %s\n' "$(( SECONDS - start ))" "$(( l > 0 ? l : 0 ))" "$*"; }
results() { "$PYTHON" -m benchmarks.gpu_results --out "$OUT_DIR" "$@" || log "could not write results ($*)"; }
# record NAME STATUS SECONDS LINE: one entry of the steps table, and the line in the log
record() {
  results step "$1" "$2" "$3" "$4"
  log "$1: $2: $4"
  if [[ "$2" == failed || "$2" == timeout ]]; then failed+=("$1"); fi
}
# timebox NAME CAP MIN: sets TB to min(CAP, what is left - 5); returns 1 (the step recorded as
# skipped) when that is under MIN.
timebox() {
  if [[ " ${GPU_CHECK_SKIP:-} " == *" ${1%% *} "* ]]; then
    record "$1" skipped 0 "GPU_CHECK_SKIP names it"
    return 1
  fi
  local l=$(( $(left) - 5 ))
  TB=$(( $2 < l ? $2 : l ))
  if (( TB < $3 )); then
    record "$1" skipped 0 "$(( l > 0 ? l : 0 )) s left of the ${BUDGET_S} s budget, under the $3 s this step needs"
    if [[ "$1" == tests ]]; then failed+=("tests (no time left)"); fi  # a run without its tests has not passed
    return 1
  fi
}
# status_of RC: ok / failed / timeout (124: timeout's TERM, 137: its KILL after the grace period)
status_of() { case "$1" in 0) echo ok ;; 124|137) echo timeout ;; *) echo failed ;; esac; }
# stop STEP LINE CODE: end the run at once with one line
stop() {
  results step "$1" failed $(( SECONDS - start )) "$2"
  echo "gpu_check: $2"
  exit "$3"
}

results init --command "${GPU_CHECK_COMMAND:-make gpu-check}" --budget-s "$BUDGET_S" >/dev/null 2>&1 \
  || { echo "gpu_check: $PYTHON cannot run benchmarks/gpu_results.py (is $PYTHON the Python with torch?)"; exit 2; }

# ---- preflight --------------------------------------------------------------------------------
t0=$SECONDS
pre_args=(--facts-out "$WORK/facts.json")
[[ "$REHEARSAL" == 1 ]] && pre_args+=(--rehearsal)
pre_out=$(timeout -k 5 60 "$PYTHON" -m benchmarks.gpu_preflight "${pre_args[@]}" 2>&1)
rc=$?
if (( rc == 124 || rc == 137 )); then
  stop preflight "the preflight did not finish within 60 s (nvidia-smi or torch's CUDA initialisation hanging?)" 2
elif (( rc != 0 )); then
  line=$(grep -m1 '^gpu_check: ' <<< "$pre_out" | sed 's/^gpu_check: //')
  stop preflight "${line:-the preflight failed (exit code $rc): $(tail -n 1 <<< "$pre_out")}" 2
fi
printf '%s\n' "$pre_out"
results machine "$WORK/facts.json"
fact() { "$PYTHON" -c 'import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = (v or {}).get(k)
print("" if v is None else v)' "$WORK/facts.json" "$1"; }
record preflight ok $(( SECONDS - t0 )) "$(head -n 1 <<< "$pre_out")"

# ---- wheels -----------------------------------------------------------------------------------
t0=$SECONDS
mapfile -t wheels < <("$PYTHON" - "$WORK/facts.json" <<'EOF'
import json, os, sys
from benchmarks.gpu_preflight import wheel_dist
facts = json.load(open(sys.argv[1]))
installed = {d for d, v in facts.get("installed", {}).items() if v}
for w in facts.get("wheels", []):
    if wheel_dist(w) not in installed:  # an installed package is never shadowed by a carried one
        print(os.path.join(facts["wheels_dir"], w))
EOF
)
if (( ${#wheels[@]} )); then
  site="$PWD/build/gpu-site"
  rm -rf "$site"
  if timeout -k 5 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
      "${wheels[@]}" > "$WORK/wheels.log" 2>&1; then
    PYTHONPATH="$PYTHONPATH:$site"
    record wheels ok $(( SECONDS - t0 )) "installed ${#wheels[@]} carried wheel(s) into build/gpu-site: $(printf '%s ' "${wheels[@]##*/}")"
  else
    stop wheels "installing the carried wheels failed: $(tail -n 1 "$WORK/wheels.log")" 2
  fi
else
  record wheels ok $(( SECONDS - t0 )) "nothing to install (every needed package installed here)"
fi
if [[ "${GPU_CHECK_ALLOW_MISSING_WHEELS:-0}" != 1 ]]; then
  if ! miss=$(timeout -k 5 60 "$PYTHON" -c 'import pytorch_metric_learning.miners' 2>&1); then
    stop wheels "pytorch-metric-learning's BatchHardMiner does not import: $(tail -n 1 <<< "$miss") (carry the missing package's wheel: GPU_WHEEL_SPECS of make gpu-wheels)" 2
  fi
fi

# ---- build ------------------------------------------------------------------------------------
t0=$SECONDS
if [[ "$REHEARSAL" == 1 ]]; then
  record build skipped 0 "rehearsal: the package as built in place ($(ls pddm_ext/_C*.so 2>/dev/null || echo 'no pddm_ext/_C*.so here'))"
else
  nvcc_path=$(fact nvcc.path)
  export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$nvcc_path")")}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(fact capability)}
  export PDDM_EXT_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  timebox build "${GPU_CHECK_BUILD_TIMEOUT_S:-240}" 30 || { echo "gpu_check: the build did not run (the line above), so nothing else can"; exit 1; }
  log "building (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, CUDA_HOME=$CUDA_HOME, MAX_JOBS=$MAX_JOBS, ninja), at most ${TB}s"
  timeout -k 10 "$TB" "$PYTHON" setup.py build_ext --inplace --build-temp build/gpu-temp > "$OUT_DIR/build.log" 2>&1
  rc=$?
  if (( rc != 0 )); then
    tail -n 30 "$OUT_DIR/build.log"
    record build "$(status_of $rc)" $(( SECONDS - t0 )) "the build $( ((rc == 124 || rc == 137)) && echo "did not finish within ${TB}s" || echo "failed (exit code $rc)"): build.log"
    exit 1
  fi
  if ! reg=$(timeout -k 5 60 "$PYTHON" -c 'import pddm_ext, torch
assert pddm_ext._C.with_cuda, "built without CUDA"
for op in ("scores", "scores_backward", "mine_pddm", "mine_euclidean"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pddm_ext::{op}", "CUDA"), f"no CUDA kernel for {op}"
print("CUDA kernels registered for all ops")' 2>&1); then
    record build failed $(( SECONDS - t0 )) "built, but: $(tail -n 1 <<< "$reg")"
    exit 1
  fi
  record build ok $(( SECONDS - t0 )) "$reg (build.log)"
fi

# ---- CUDA tests -------------------------------------------------------------------------------
t0=$SECONDS
if timebox tests "${GPU_CHECK_TESTS_TIMEOUT_S:-150}" 10; then
  tests=${GPU_CHECK_TESTS:-tests/test_scores.py tests/test_autograd.py tests/test_mining.py tests/test_forms.py tests/test_numerics.py tests/test_cuda.py -k cuda}
  log "tests: $tests, at most ${TB}s"
  # shellcheck disable=SC2086
  timeout -k 10 "$TB" "$PYTHON" -m pytest -v --durations=15 -rfEs -p no:cacheprovider -o faulthandler_timeout=60 \
    $tests > "$OUT_DIR/test_cuda.log" 2>&1
  rc=$?
  tail -n 25 "$OUT_DIR/test_cuda.log"
  results tests "$OUT_DIR/test_cuda.log"
  summary=$(grep -E '^=+ .*(passed|failed|skipped|error)' "$OUT_DIR/test_cuda.log" | tail -n 1 | tr -d '=')
  last=$(grep -oE '^[^ ]+::[^ ]+' "$OUT_DIR/test_cuda.log" | tail -n 1)
  case $(status_of $rc) in
    ok) record tests ok $(( SECONDS - t0 )) "${summary# }" ;;
    timeout) record tests timeout $(( SECONDS - t0 )) "killed after ${TB}s; the last test started: ${last:-none}" ;;
    *) record tests failed $(( SECONDS - t0 )) "${summary:- exit code $rc}" ;;
  esac
fi

# ---- compute-sanitizer ------------------------------------------------------------------------
if [[ "$REHEARSAL" == 1 ]]; then
  record sanitizer skipped 0 "rehearsal: no GPU"
elif ! command -v compute-sanitizer >/dev/null; then
  record sanitizer skipped 0 "compute-sanitizer is not on PATH"
else
  for tool in memcheck racecheck; do
    t0=$SECONDS
    timebox "sanitizer $tool" "${GPU_CHECK_SANITIZER_TIMEOUT_S:-45}" 20 || continue
    log "compute-sanitizer --tool $tool, at most ${TB}s"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 "$TB" compute-sanitizer --tool "$tool" --kernel-name kns=pddm_ext \
      --error-exitcode 3 "$PYTHON" -m benchmarks.gpu_cases sanitize > "$WORK/$tool.log" 2>&1
    rc=$?
    { echo "==== compute-sanitizer --tool $tool: exit code $rc"; cat "$WORK/$tool.log"; } >> "$OUT_DIR/sanitizer.log"
    line=$(results sanitizer "$tool" "$WORK/$tool.log" "$rc")
    status=${line#*: }
    record "sanitizer $tool" "${status%%:*}" $(( SECONDS - t0 )) "${line#*: *: }"
  done
fi

# ---- precision --------------------------------------------------------------------------------
t0=$SECONDS
if timebox precision "${GPU_CHECK_PRECISION_TIMEOUT_S:-60}" 15; then
  # shellcheck disable=SC2086
  timeout -k 5 "$TB" "$PYTHON" benchmarks/precision.py --out "$WORK/precision" --command "make gpu-check" \
    ${GPU_CHECK_PRECISION_ARGS:-} > "$WORK/precision.log" 2>&1
  rc=$?
  tail -n 8 "$WORK/precision.log"
  [[ $rc == 0 ]] && results section precision "$WORK/precision/precision.json"
  record precision "$(status_of $rc)" $(( SECONDS - t0 )) "$( ((rc == 0)) && echo "the error table in results.md" || tail -n 1 "$WORK/precision.log")"
fi

# ---- benchmark --------------------------------------------------------------------------------
t0=$SECONDS
ncu_box=0
if [[ "$REHEARSAL" != 1 && " ${GPU_CHECK_SKIP:-} " != *" ncu "* ]] && command -v ncu >/dev/null; then ncu_box=45; fi
if timebox bench $(( $(left) - 5 - ncu_box )) 30; then
  bench_budget=$(( TB - 20 ))  # starts no row after this; the rest of the box for the row in flight and the write
  if [[ -n "${GPU_CHECK_BENCH_BUDGET_S:-}" ]] && (( GPU_CHECK_BENCH_BUDGET_S < bench_budget )); then
    bench_budget=$GPU_CHECK_BENCH_BUDGET_S
  fi
  log "benchmark: rows start within ${bench_budget}s, killed at ${TB}s"
  # shellcheck disable=SC2086
  timeout -k 10 "$TB" "$PYTHON" benchmarks/gpu_bench.py --out "$OUT_DIR" --budget-s "$bench_budget" \
    --facts "$WORK/facts.json" ${GPU_CHECK_BENCH_ARGS:-}
  rc=$?
  record bench "$(status_of $rc)" $(( SECONDS - t0 )) "$( ((rc == 0)) && echo "rows and targets in results.md" || echo "exit code $rc: the rows measured until then are in results.md")"
fi

# ---- ncu --------------------------------------------------------------------------------------
t0=$SECONDS
if [[ "$REHEARSAL" == 1 ]]; then
  record ncu skipped 0 "rehearsal: no GPU"
elif ! command -v ncu >/dev/null; then
  record ncu skipped 0 "ncu is not on PATH"
elif timebox ncu "${GPU_CHECK_NCU_TIMEOUT_S:-90}" 30; then
  log "ncu: the forward tile kernel at m = 4096 under each precision, at most ${TB}s"
  timeout -k 5 "$TB" ncu --target-processes all --kernel-name 'regex:(^|:)scores_kernel([^_a-z]|$)' --launch-count 3 \
    --section LaunchStats --section Occupancy --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --csv --page raw \
    "$PYTHON" -m benchmarks.gpu_cases profile > "$OUT_DIR/ncu.csv" 2>&1
  rc=$?
  line=$(results ncu "$OUT_DIR/ncu.csv" "$rc")
  record ncu "$(status_of $rc)" $(( SECONDS - t0 )) "${line#ncu: }"
fi

log "done in $(( SECONDS - start ))s of ${BUDGET_S}s; results in $OUT_DIR (results.md)${failed[*]:+; failed: ${failed[*]}}"
(( ${#failed[@]} == 0 ))
