#!/usr/bin/env bash
# Where the CPU kernels' time goes, per function (= per phase of a tile), at one instruction-set level:
#   bash benchmarks/profile/profile.sh LEVEL WORKLOAD      (LEVEL: baseline, avx2, avx512; WORKLOAD: see workload.py)
# perf's software cpu-clock event (works without hardware counters, e.g. in a VM), 1 kHz, then the
# samples inside the extension, as shares of the extension's samples. Needs perf and a build with
# symbols (setup.py builds with -g).
set -euo pipefail
level="$1"
workload="$2"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
data="$(mktemp -d)/perf.data"
PDDM_EXT_CPU_ISA="$level" PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" \
  perf record -q -e cpu-clock -F 1000 -o "$data" "${PYTHON:-python}" "$root/benchmarks/profile/workload.py" "$workload" >/dev/null
so="$(basename "$(ls "$root"/pddm_ext/_C*.so)")"
perf report -i "$data" --dsos "$so" --percentage relative --sort symbol --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -12
