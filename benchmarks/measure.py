"""Measures one configuration in this (fresh) process; run by ``benchmarks.run``.

    python -m benchmarks.measure '<json spec>'

prints one line ``RESULT {json}``. Memory is the *extra* peak of the calls after the warm-up:

- CPU: the kernel's RSS high-water mark is reset (``/proc/self/clear_refs`` = 5) once the inputs
  exist, and extra = VmHWM after the calls - VmRSS before them. Where the reset is refused, the
  process is fresh anyway and the same difference over-counts only setup transients.
- CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the calls,
  after ``reset_peak_memory_stats``.

Timing: the first call of a compiled variant is reported as ``compile_s`` (compilation plus one
call) and excluded; then ``warmup`` untimed calls, then at least ``min_repeats`` timed calls, more
while the time budget lasts (up to ``max_repeats``). The median is the reported time. A
configuration whose warm-up call takes longer than ``slow_s`` counts that call as timed and stops
at ``max_slow_calls`` calls (default two: a warm-up changes nothing at that scale, and the quick
run must stay quick).

``float32_matmul_precision`` in the spec ("highest", "high", "medium") is set with
``torch.set_float32_matmul_precision`` before anything runs (the GPU benchmark's precision rows).
"""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import sys
import time
import traceback


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_heap():
    """Returns glibc's cached free memory to the OS, so the timed calls cannot reuse pages that
    setup (or a compile) left resident without showing up in the peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryProbe:
    """Extra peak memory of a code region, in bytes (RSS on CPU, the caching allocator on CUDA)."""

    def __init__(self, device):
        self.device = device
        self.method = None

    def start(self):
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
        else:
            _release_free_heap()
            reset = _reset_peak_rss()
            self.base = _proc_status_kib("VmRSS") * 1024
            self.method = "VmHWM - VmRSS (peak reset)" if reset else "VmHWM - VmRSS (no peak reset)"

    def extra(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_status_kib("VmHWM") * 1024 - self.base


def measure_config(spec):
    import torch

    from benchmarks.workloads import Config, build_step, make_inputs

    cfg = Config(**spec["config"])
    if spec.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(spec["float32_matmul_precision"])
    on_cuda = cfg.device == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    result = {"threads": torch.get_num_threads()}

    inputs = make_inputs(cfg)
    step = build_step(cfg, inputs, sync)
    if cfg.variant == "compiled":
        t0 = time.perf_counter()
        step()
        sync()
        result["compile_s"] = time.perf_counter() - t0

    times, phases = [], {}
    min_repeats = spec.get("min_repeats", 3)

    def timed_call():
        t0 = time.perf_counter()
        phase_times = step()
        sync()
        times.append(time.perf_counter() - t0)
        for name, value in (phase_times or {}).items():
            phases.setdefault(name, []).append(value)

    for _ in range(spec.get("warmup", 1)):
        timed_call()
    # A call slower than slow_s gains nothing from a warm-up: its first call counts, and fewer
    # repeats are taken (max_slow_calls in all, default two).
    max_repeats = spec.get("max_repeats", 10)
    if times and times[0] >= spec.get("slow_s", float("inf")):
        result["first_call_timed"] = True
        max_repeats = min(max_repeats, spec.get("max_slow_calls", 2))
        min_repeats = min(min_repeats, max_repeats)
    else:
        times.clear()
        phases.clear()

    # Memory is measured over the calls after the warm-up: the steady state of a training loop,
    # without one-time costs such as the thread pool's first start (a few MB).
    probe = MemoryProbe(cfg.device)
    probe.start()
    started = time.perf_counter()
    calls_before = len(times)
    while len(times) < max_repeats:
        if len(times) >= min_repeats and time.perf_counter() - started >= spec.get("budget_s", 3.0):
            break
        timed_call()
    result.update(
        status="ok",
        time_s=statistics.median(times),
        times_s=times,
        phases_s={name: statistics.median(values) for name, values in phases.items()},
        # None when the one slow call allowed was the warm-up (max_slow_calls=1): nothing was probed.
        extra_peak_bytes=probe.extra() if len(times) > calls_before else None,
        memory_method=probe.method,
    )
    if cfg.variant == "fused" and spec.get("gemm_size"):
        # The roofline denominator again, in this process right after the kernel: on a shared
        # machine the rate of the moment matters more than the rate at the start of the run.
        result["gemm_gflops_here"] = _gemm_rate(torch, cfg.device, spec["gemm_size"], torch.float32, sync, 1.0)
    return result


def _gemm_rate(torch, device, size, dtype, sync, budget_s):
    """GFLOP/s of torch.mm on two (size, size) matrices: median of at least 5 calls after 2 warm-ups."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    sync()
    times = []
    started = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - started < budget_s and len(times) < 30):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


def _cpu_isa(torch):
    """The instruction-set level the CPU kernels dispatch to in this process (PDDM_EXT_CPU_ISA read as
    the ops read it), the CPU's levels, and whether the variable forced it."""
    try:
        import pddm_ext  # noqa: F401  (loads the extension)

        selected, *levels = torch.ops.pddm_ext.cpu_isa()
    except Exception as exc:  # an extension without the op, or a bad PDDM_EXT_CPU_ISA: said, not hidden
        return {"cpu_isa": None, "cpu_isa_error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
    return {"cpu_isa": selected, "cpu_isa_levels": levels, "cpu_isa_forced": bool(os.environ.get("PDDM_EXT_CPU_ISA"))}


def measure_gemm(spec):
    """torch.mm throughput at a large square size (the roofline denominator) + machine facts."""
    import torch

    device, size = spec["device"], spec["size"]
    dtype = getattr(torch, spec.get("dtype", "float32"))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gflops = _gemm_rate(torch, device, size, dtype, sync, spec.get("budget_s", 3.0))
    facts = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parallel_info": torch.__config__.parallel_info().splitlines()[:6],
        "cuda_available": torch.cuda.is_available(),
    }
    facts.update(_cpu_isa(torch))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return {
        "status": "ok",
        "size": size,
        "dtype": str(dtype).replace("torch.", ""),
        "gflops": gflops,
        "facts": facts,
    }


def main(argv):
    spec = json.loads(argv[1])
    try:
        result = measure_gemm(spec) if spec.get("kind") == "gemm" else measure_config(spec)
    except Exception as exc:  # reported, not raised: a failing variant is a result too
        result = {
            "status": "error",
            "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ''}",
            "traceback": traceback.format_exc()[-3000:],
        }
    sys.stdout.flush()
    print("RESULT " + json.dumps(result), flush=True)
    # Skip interpreter teardown (compile workers, thread pools): the result is out.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
