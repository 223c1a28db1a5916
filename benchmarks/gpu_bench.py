"""GPU benchmark: the fused pddm_ext ops against their peers, in one run on one GPU.

Operations (the workloads of ``benchmarks/workloads.py``; d = h = c = 128 by default, float32,
L2-normalised random embeddings, P x K labels with K = 4, a ``PDDM(d, d, d)`` with default init):

  scores_fwd      S = unit(x) under no_grad: pddm_ext.pddm_scores forward, batch mode
  scores_fwd_bwd  unit(x).sum().backward(), x and every parameter requiring grad
  mine_k1         mine_hard(x, labels, unit, k=1): the paper's hardest quadruplet
  batch_hard      batch_hard(x, labels), Euclidean metric
  bank_mine       mine_hard in reference mode: 4096 queries against a 1,048,576-row memory bank,
                  measured on 1/--bank-fraction of the bank and extrapolated (the work is linear in
                  the bank's rows); the row says so
  lock_mine       the reductions of mine_hard (k = 1) of 256 queries against a 131,072-row bank
                  (d = h = c = 64) in float64 (a per-row spin lock) and float32 (packed 64-bit
                  keys), on a random bank and on one of 16 distinct rows repeated (every offer ties
                  and takes the lock), checked against the fused scores (benchmarks/gpu_cases.py,
                  in a process of its own killed at its time box: a hang is a result too)

Peers: fused (pddm_ext at each float32 matmul precision: "highest" = FP32, "high" = 3xTF32 tensor
cores, "medium" = TF32 tensor cores; rows labelled with the setting), reference (pddm_ext.reference,
all pairs materialised, at "highest" = FP32 and "high" = TF32 in cuBLAS, which stands in for
"medium" too), pml (pytorch-metric-learning's BatchHardMiner for batch_hard; skipped with a line
saying so when it cannot be imported), compiled (torch.compile of the reference in a fresh process,
benchmarks/measure.py, killed when it outruns what is left of --compile-budget-s), gemm (torch.mm
of two 8192^2 matrices: float32 at each precision, bfloat16, float16: the roofline).

Order of measurement, by value, so that a budget that runs out costs the least important rows:
  1. mine_k1, scores_fwd and batch_hard at m = --target-m (4096): fused at each precision, then the
     strongest peer (BatchHardMiner for batch_hard, the reference for the others);
  2. the torch.mm rooflines;
  3. the rest: the float64 lock case, scores_fwd_bwd at the target m, every op at the other sizes;
  4. torch.compile of the reference, only with the time the bank row does not need;
  5. the bank row, last.

Times are medians in seconds of the calls after one warm-up (a first call slower than --slow-s is
timed and is the only call). "useful TFLOP/s" counts ``workloads.useful_flops``: 2 (h d + 2 h c)
FLOPs per scored pair (batch mode scores one triangle, m (m + 1) / 2 pairs; reference mode m n),
x3 for forward+backward, 2 d per pair for the Euclidean batch_hard; torch.mm counts 2 n^3.
"bound ms" is the arithmetic lower bound of a fused row: its useful FLOPs at the GPU's peak rate
for its arithmetic (SMs x maximum SM clock x FLOPs per clock and SM of benchmarks/gpu_preflight.py;
3xTF32 at a third of TF32's), or, where that peak is not known (a CPU, another GPU), at the rate
torch.mm reached under the same precision (then not a hard bound). Memory is the extra peak of the
timed calls (the CUDA caching allocator's peak, the CPU's RSS).

A configuration is skipped, with a line saying why, when its predicted peak memory exceeds 90% of
the free device memory (the reference's bytes per pair are measured at m = 128 on the GPU), when
--budget-s has run out, or when its time predicted from a smaller measured size would overrun what
is left of it. Targets (reported met / not met, never asserted), each with its arithmetic bound:
fused mine_k1 at m = 4096 >= 5x faster than the fastest peer at the same precision; fused scores_fwd
useful FLOP rate >= 40% of torch.mm's at the same precision; the 4096 x 1,048,576 bank mined in
< 2 s. Every precision setting is restored after its rows.

Writes results.json and results.md (benchmarks/gpu_results.py: section "bench", next to what the
other steps of gpu_check.sh wrote) into --out, else $OUT, else benchmarks/results/gpu/, after every
row: a run killed at any point leaves every row it measured.
``--device cpu --quick`` runs every peer at tiny sizes on the CPU (CI's rehearsal of this script).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: an in-place build is found first

import pddm_ext  # noqa: E402,F401  (the fused ops; imported here so a broken build fails at once)
from benchmarks import gpu_preflight, gpu_results, measure  # noqa: E402
from benchmarks.gpu_results import format_row  # noqa: E402,F401  (part of this module's interface)
from benchmarks.run import run_child  # noqa: E402
from benchmarks.workloads import Config, predicted_bytes, useful_flops  # noqa: E402

PRECISIONS = ("highest", "high", "medium")
PEER_PRECISIONS = ("highest", "high")  # FP32 and TF32 for the cuBLAS-backed peers
OPS = ("mine_k1", "scores_fwd", "batch_hard", "scores_fwd_bwd")  # the order of measurement at each m
TARGET_OPS = ("mine_k1", "scores_fwd", "batch_hard")  # measured first, at the target m
PEER_KINDS = ("fused", "reference", "pml", "compiled", "gemm")
GEMM_DTYPES = ("bfloat16", "float16")
# What each (peer, precision) computes its products in on a GPU.
ARITHMETIC = {
    ("fused", "highest"): "FP32", ("fused", "high"): "3xTF32", ("fused", "medium"): "TF32",
    ("peer", "highest"): "FP32", ("peer", "high"): "TF32 (cuBLAS)", ("peer", "medium"): "TF32 (cuBLAS)",
}
MIN_COMPILE_S = 5.0  # a torch.compile child given less would only be killed
MIN_LOCK_S = 10.0  # the lock case's child needs at least this (import, CUDA context, two banks)
LOCK_BOX_S = 60.0  # and gets at most this: a hang of the spin lock costs no more
TARGET_SPEEDUP = 5.0
TARGET_GEMM_FRACTION = 0.40
TARGET_BANK_S = 2.0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes, torch.compile only for the target configuration (a rehearsal of the script)")
    ap.add_argument("--sizes", type=int, nargs="*", help="batch sizes m (default 1024 4096 16384; quick: 64 128)")
    ap.add_argument("--dim", type=int, help="d = h = c (default 128; quick: 32)")
    ap.add_argument("--bank", type=int, nargs=2, metavar=("QUERIES", "ROWS"),
                    help="bank_mine configuration (default 4096 1048576; quick: 64 4096)")
    ap.add_argument("--bank-fraction", type=int,
                    help="measure the bank row on 1/this of the bank's rows and extrapolate (default 16; quick 4)")
    ap.add_argument("--lock", type=int, nargs=3, metavar=("QUERIES", "ROWS", "DIM"),
                    help="the float64 lock case (default 256 131072 64; quick: 16 2048 8)")
    ap.add_argument("--target-m", type=int,
                    help="m of the speedup target (default 4096 if among the sizes, else the largest size)")
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                    help="float32 matmul precisions of the fused rows (default: all three)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no configuration after this many seconds, nor one predicted to overrun them (default 420)")
    ap.add_argument("--compile-budget-s", type=float,
                    help="seconds for all torch.compile configurations together, compiles included "
                         "(default: 150, quick 120, at most a third of --budget-s)")
    ap.add_argument("--gemm-size", type=int, help="side of the torch.mm roofline matrices (default 8192; quick: 256)")
    ap.add_argument("--slow-s", type=float, help="a first call slower than this is timed and is the only call (default 2)")
    ap.add_argument("--facts", help="the preflight's facts (JSON; benchmarks/gpu_preflight.py --facts-out): "
                                    "SMs and maximum clock for the arithmetic bounds")
    ap.add_argument("--out", help="output folder (default: $OUT, else benchmarks/results/gpu)")
    return ap.parse_args(argv)


@contextlib.contextmanager
def float32_matmul_precision(precision):
    """``torch.set_float32_matmul_precision(precision)`` inside the block, the previous setting after it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def device_memory(device):
    """Bytes a configuration may use: 90% of the free device memory, half the available RAM on the CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(min(free, total) * 0.9)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 << 30


def pml_missing():
    """Why pytorch-metric-learning's BatchHardMiner cannot run here, or None when it can."""
    try:
        importlib.import_module("pytorch_metric_learning.miners")
    except ImportError as exc:
        return f"pytorch-metric-learning not installed ({exc})"
    return None


def _error_text(exc):
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def run_module(args, timeout_s):
    """``python -m ARGS`` in a process group of its own, killed after ``timeout_s``:
    (exit code or None on timeout, stdout, stderr, wall seconds)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=os.path.dirname(HERE), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return proc.returncode, out, err, time.perf_counter() - started
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err, time.perf_counter() - started


def gpu_facts(device, facts_file):
    """The preflight's facts (from its file, else gathered here: nvidia-smi and torch only)."""
    facts = {}
    if facts_file and os.path.exists(facts_file):
        with open(facts_file) as f:
            facts = json.load(f)
    if device.type == "cuda" and not facts.get("sms"):
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                     gpu_memory_bytes=props.total_memory)
        facts.setdefault("nvidia_smi", gpu_preflight.nvidia_smi())
    return facts


class Bench:
    """Measures the plan in priority order; every measurement, skip and failure becomes one row,
    written out (results.json, results.md) as soon as it exists."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.quick = args.quick
        self.dim = args.dim or (32 if args.quick else 128)
        self.sizes = args.sizes or ([64, 128] if args.quick else [1024, 4096, 16384])
        self.bank = args.bank or ([64, 4096] if args.quick else [4096, 1 << 20])
        self.bank_fraction = max(1, args.bank_fraction or (4 if args.quick else 16))
        self.lock = args.lock or ([16, 2048, 8] if args.quick else [256, 131_072, 64])
        self.target_m = args.target_m or (4096 if 4096 in self.sizes else max(self.sizes))
        self.precisions = list(args.precisions)
        self.budget_s = args.budget_s
        self.compile_budget_s = (args.compile_budget_s if args.compile_budget_s is not None
                                 else min(120.0 if args.quick else 150.0, self.budget_s / 3))
        self.compile_spent_s = 0.0
        self.gemm_size = args.gemm_size or (256 if args.quick else 8192)
        slow_s = args.slow_s if args.slow_s is not None else 2.0
        # measure.measure_config's timing: one warm-up, then min_repeats..max_repeats calls while
        # budget_s lasts; a first call slower than slow_s is the only one.
        self.timing = ({"warmup": 1, "min_repeats": 1, "max_repeats": 3, "budget_s": 0.02, "slow_s": slow_s,
                        "max_slow_calls": 1} if args.quick else
                       {"warmup": 1, "min_repeats": 3, "max_repeats": 10, "budget_s": 0.3, "slow_s": slow_s,
                        "max_slow_calls": 1})
        self.start = time.perf_counter()
        self.memory = device_memory(self.device)
        self.rows = []
        self.seconds_per_flop = {}  # (op family, peer, precision) -> measured seconds per useful FLOP
        self.reference_bytes_per_pair = {}
        self.out = args.out or os.environ.get("OUT") or os.path.join(HERE, "results", "gpu")
        self.command = " ".join([os.path.basename(sys.executable)] + sys.argv)
        self.facts = gpu_facts(self.device, args.facts)
        smi = self.facts.get("nvidia_smi") or {}
        try:
            clock = float(smi.get("clocks_max_sm"))
        except (TypeError, ValueError):
            clock = None
        self.peaks = gpu_preflight.peak_rates(self.facts.get("capability"), self.facts.get("sms"), clock)
        self.precision_before = torch.get_float32_matmul_precision()

    # -- budget ---------------------------------------------------------------------------------
    def left_s(self):
        return self.budget_s - (time.perf_counter() - self.start)

    def predicted_s(self, cfg, peer, precision):
        """Seconds the measurement would take, from the same op family at a smaller size (None: unknown)."""
        family = "mine_k1" if cfg.workload == "bank_mine" else cfg.workload
        rate = self.seconds_per_flop.get((family, peer, precision))
        if rate is None:  # another precision of the same op: the best guess there is
            rates = [r for (f, p, _), r in self.seconds_per_flop.items() if f == family and p == peer]
            rate = max(rates) if rates else None
        if rate is None:
            return None
        call = rate * useful_flops(cfg)
        if call >= self.timing["slow_s"]:
            return call
        return call * (1 + self.timing["min_repeats"]) + self.timing["budget_s"]

    # -- bounds -----------------------------------------------------------------------------------
    def bound(self, row):
        """(seconds, source) of a fused row's useful FLOPs at the peak of its arithmetic, else at
        torch.mm's measured rate under the same precision; (None, None) when neither is known."""
        flops = row.get("useful_flops")
        if not flops or row.get("peer") != "fused":
            return None, None
        arithmetic = row.get("arithmetic")
        if arithmetic and self.peaks.get(arithmetic):
            return flops / self.peaks[arithmetic], "peak"
        if row.get("dtype", "float32") != "float32":
            return None, None
        gemm = {r["precision"]: r["tflops"] * 1e12 for r in _ok(self.rows, op="gemm", dtype="float32")}
        if self.device.type != "cuda":  # FP32 under every setting: the best rate measured
            rate = max(gemm.values(), default=None)
        else:
            rate = gemm.get(row["precision"])
        if not rate:
            return None, None
        passes = 3 if arithmetic == "3xTF32" else 1  # torch.mm under "high" is one TF32 pass
        return flops * passes / rate, "torch.mm"

    # -- rows -----------------------------------------------------------------------------------
    def config(self, workload, m, n, peer):
        variant = {"compiled": "compiled", "pml": "pml", "reference": "reference"}.get(peer, "fused")
        return Config(workload, variant, m, n, self.dim, self.dim, self.dim, "float32", self.device.type)

    def arithmetic(self, peer, precision):
        """What the products are computed in (GPU only: on a CPU that is up to its BLAS and build)."""
        if self.device.type != "cuda":
            return None
        return ARITHMETIC[("fused" if peer == "fused" else "peer", precision)]

    def new_row(self, cfg, peer, precision):
        return {"op": cfg.workload, "m": cfg.m, "n": cfg.n, "d": cfg.d, "h": cfg.h, "c": cfg.c, "dtype": cfg.dtype,
                "peer": peer, "precision": precision, "arithmetic": self.arithmetic(peer, precision),
                "useful_flops": useful_flops(cfg)}

    def emit(self, row):
        self.rows.append(row)
        row["at_s"] = round(time.perf_counter() - self.start, 1)
        print(format_row(row), flush=True)
        self.write()
        return row

    def skip(self, row, why):
        row.update(status="skipped", note=why)
        return self.emit(row)

    def predicted_bytes(self, cfg, peer):
        if peer == "reference" and self.device.type == "cuda":
            family = "mine_k1" if cfg.workload == "bank_mine" else cfg.workload
            per_pair = self.calibrate_reference(family)
            if per_pair is not None:
                return int(per_pair * cfg.m * cfg.n * 1.1)
        return predicted_bytes(cfg)

    def calibrate_reference(self, workload):
        """The reference's extra peak bytes per pair, measured at m = 128 (CUDA; None if that failed)."""
        if workload not in self.reference_bytes_per_pair:
            per_pair = None
            try:
                spec = dict(self.timing, config=self.config(workload, 128, 128, "reference").to_dict(),
                            min_repeats=1, max_repeats=1)
                result = measure.measure_config(spec)
                if result.get("extra_peak_bytes"):
                    per_pair = result["extra_peak_bytes"] / (128 * 128)
            except Exception as exc:  # noqa: BLE001  (a failed calibration falls back to the estimate)
                print(f"reference memory calibration of {workload} failed ({_error_text(exc)}): using the estimate")
            self.reference_bytes_per_pair[workload] = per_pair
        return self.reference_bytes_per_pair[workload]

    def record(self, row, cfg, peer, precision, result, scale=1.0):
        """A measured result into ``row``; ``scale`` extrapolates the time (the bank's fraction)."""
        time_s = result["time_s"] * scale
        row.update(status="ok", time_s=time_s, times_s=result.get("times_s"),
                   peak_bytes=result.get("extra_peak_bytes"), tflops=row["useful_flops"] / time_s / 1e12)
        for key in ("phases_s", "compile_s", "first_call_timed"):
            if result.get(key):
                row[key] = result[key]
        family = "mine_k1" if cfg.workload == "bank_mine" else cfg.workload
        self.seconds_per_flop[(family, peer, precision)] = result["time_s"] / useful_flops(cfg)

    # -- one measurement ------------------------------------------------------------------------
    def measure(self, workload, m, n, peer, precision, fraction=1):
        """One row: ``peer`` on ``workload`` at (m, n) under the float32 matmul ``precision``; with
        ``fraction`` > 1 measured on n / fraction references and extrapolated (linear in n)."""
        cfg = self.config(workload, m, n, peer)
        row = self.new_row(cfg, peer, precision)
        if fraction > 1:
            measured_n = max(1, n // fraction)
            row.update(measured_n=measured_n, extrapolated=True)
            cfg = self.config(workload, m, measured_n, peer)
        if peer == "pml":
            missing = pml_missing()
            if missing:
                return self.skip(row, f"BatchHardMiner skipped: {missing}")
        need = self.predicted_bytes(cfg, peer)
        row["predicted_bytes"] = need
        if need > self.memory:
            return self.skip(row, f"skipped: needs ~{need / 2**30:.1f} GiB (predicted), "
                                  f"the device allows {self.memory / 2**30:.1f} GiB")
        left = self.left_s()
        if left <= 0:
            return self.skip(row, f"skipped: time budget ({self.budget_s:.0f} s) spent")
        if peer == "compiled":
            return self.measure_compiled(row, cfg, precision, left)
        predicted = self.predicted_s(cfg, peer, precision)
        if predicted is not None and predicted > left:
            return self.skip(row, f"skipped: predicted ~{predicted:.3g} s, {left:.3g} s of the budget left")
        spec = dict(self.timing, config=cfg.to_dict())
        try:
            with float32_matmul_precision(precision):
                result = measure.measure_config(spec)
            self.record(row, cfg, peer, precision, result, scale=n / cfg.n)
            if fraction > 1:
                row["note"] = (f"extrapolated: measured on {cfg.n:,} of the {n:,} rows (1/{fraction}), "
                               f"{1e3 * result['time_s']:.3f} ms x {n / cfg.n:g}")
        except torch.OutOfMemoryError:
            row.update(status="error", note=f"out of memory (predicted ~{need / 2**30:.1f} GiB)")
        except Exception as exc:  # noqa: BLE001  (a failing peer is a result too, never the end of the run)
            row.update(status="error", note=f"error: {_error_text(exc)}")
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return self.emit(row)

    def bank_reserve_s(self):
        """Seconds the bank rows are predicted to need (a fixed guess before mine_k1 was measured)."""
        total = 0.0
        for p in self.precisions:
            cfg = self.config("bank_mine", self.bank[0], max(1, self.bank[1] // self.bank_fraction), "fused")
            predicted = self.predicted_s(cfg, "fused", p)
            total += predicted if predicted is not None else (2.0 if self.quick else 10.0)
        return total

    def measure_compiled(self, row, cfg, precision, left):
        """torch.compile(reference) in a fresh process, killed when it outruns the compile budget or
        the time the bank rows still need."""
        compile_left = self.compile_budget_s - self.compile_spent_s
        reserve = self.bank_reserve_s()
        timeout = min(compile_left, left - reserve)
        if timeout < MIN_COMPILE_S:
            spent = "compile budget" if compile_left <= left - reserve else f"time budget ({reserve:.0f} s kept for the bank rows)"
            return self.skip(row, f"compiled skipped: {max(timeout, 0):.0f} s left of the {spent}, "
                                  f"under the {MIN_COMPILE_S:.0f} s a compile needs at least")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the child gets the device memory this process does not hold
        spec = dict(self.timing, config=cfg.to_dict(), float32_matmul_precision=precision)
        result = run_child(spec, timeout, None)
        self.compile_spent_s += result.get("wall_s", timeout)
        if result.get("status") == "ok":
            self.record(row, cfg, "compiled", precision, result)
            row["wall_s"] = result["wall_s"]
            return self.emit(row)
        if result.get("status") == "timeout":
            budget = "compile budget" if compile_left <= left - reserve else "time budget"
            return self.skip(row, f"compiled skipped: no result within {timeout:.0f} s (what was left of the {budget})")
        row.update(status="error", note=f"compiled failed: {result.get('error', '?')}")
        if result.get("stderr_tail"):
            row["stderr_tail"] = result["stderr_tail"]
        return self.emit(row)

    # -- the float64 lock under contention --------------------------------------------------------
    def lock_case(self):
        """Rows of benchmarks/gpu_cases.py's lock case (float64 vs float32 keys, random and tied banks),
        run in a child killed at what is left of the budget (at most LOCK_BOX_S)."""
        m, n, dim = self.lock
        cfg = Config("mine_k1", "fused", m, n, dim, dim, dim, "float64", self.device.type)
        base = {"op": "lock_mine", "m": m, "n": n, "d": dim, "h": dim, "c": dim, "peer": "fused", "precision": "highest"}
        left = self.left_s()
        if left < MIN_LOCK_S:
            return self.skip(dict(base, dtype="float64"), f"skipped: {max(left, 0):.0f} s of the budget left, "
                                                          f"under the {MIN_LOCK_S:.0f} s the lock case needs")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        timeout = min(LOCK_BOX_S, left)
        code, out, err, wall = run_module(["benchmarks.gpu_cases", "lock", "--device", self.device.type, "--m", str(m),
                                           "--n", str(n), "--dim", str(dim)], timeout)
        result = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
        if result is None:
            why = (f"no result within {timeout:.0f} s: a hang of the float64 spin lock, or slower than that"
                   if code is None else f"the lock case failed (exit code {code}): {err.strip()[-300:]}")
            return self.emit(dict(base, dtype="float64", status="error", note=why, wall_s=wall))
        times = {(r["bank"], r["dtype"]): r["time_s"] for r in result}
        for r in result:
            dtype = r["dtype"]
            row = dict(base, dtype=dtype, arithmetic=None if self.device.type != "cuda" else
                       ("FP64" if dtype == "float64" else "FP32"), useful_flops=useful_flops(cfg), bank=r["bank"])
            c = r["checks"]
            counts = "; ".join(f"{slot} {v['optimal']}/{v['slots']} optimal" + (
                f", {v['ties_to_smallest_index']}/{v['exact_ties']} ties to the smallest index" if v["exact_ties"] else "")
                + (f", {v['slots'] - v['consistent']} torn" if v["consistent"] != v["slots"] else "")
                for slot, v in c.items())
            ratio = ""
            if dtype == "float64" and (r["bank"], "float32") in times:
                ratio = f"; float64 / float32 keys: {r['time_s'] / times[(r['bank'], 'float32')]:.2f}x"
            label = "random bank" if r["bank"] == "random" else "16 distinct rows repeated (every offer ties)"
            row.update(status="ok" if r["correct"] else "error", time_s=r["time_s"], times_s=r["times_s"],
                       tflops=row["useful_flops"] / r["time_s"] / 1e12, checks=c,
                       note=f"{label}: {'correct' if r['correct'] else 'WRONG'} ({counts}){ratio}")
            self.emit(row)
        return None

    # -- the roofline ----------------------------------------------------------------------------
    def gemm(self, dtype, precision):
        """GFLOP/s of torch.mm on (size, size) matrices (measure._gemm_rate) under ``precision``."""
        size = self.gemm_size
        row = {"op": "gemm", "m": size, "n": size, "d": size, "dtype": dtype, "peer": "gemm", "precision": precision,
               "arithmetic": {"bfloat16": "BF16", "float16": "FP16"}.get(dtype) or self.arithmetic("gemm", precision)}
        if self.left_s() <= 0:
            return self.skip(row, f"skipped: time budget ({self.budget_s:.0f} s) spent")
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        try:
            with float32_matmul_precision(precision):
                gflops = measure._gemm_rate(torch, self.device.type, size, getattr(torch, dtype), sync,
                                            0.05 if self.quick else 0.5)
            row.update(status="ok", time_s=2 * size**3 / (gflops * 1e9), tflops=gflops / 1e3)
        except Exception as exc:  # noqa: BLE001
            row.update(status="error", note=f"error: {_error_text(exc)}")
        return self.emit(row)

    # -- the plan ---------------------------------------------------------------------------------
    def plan(self):
        """Steps in the order of their value: ("measure", workload, m, n), ("gemm", dtype, precision),
        ("lock",), ("compile", workload, m, n), ("bank",)."""
        T = self.target_m
        steps = [("measure", op, T, T) for op in TARGET_OPS]
        steps += [("gemm", "float32", p) for p in PRECISIONS] + [("gemm", dt, "highest") for dt in GEMM_DTYPES]
        steps += [("lock",), ("measure", "scores_fwd_bwd", T, T)]
        steps += [("measure", op, m, m) for m in sorted(self.sizes) if m != T for op in OPS]
        # The quick rehearsal compiles once (the target configuration): each compile costs ~10-20 s on a CPU.
        compiled = ["mine_k1"] if self.quick else list(OPS)
        steps += [("compile", op, T, T) for op in compiled]
        steps += [("bank",)]
        return steps

    def peers(self, workload):
        """(peer, precision) pairs measured for one configuration, in order: fused at each precision,
        then the strongest peer first."""
        pairs = [("fused", p) for p in self.precisions]
        if workload == "batch_hard":
            pairs += [("pml", p) for p in PEER_PRECISIONS]
        pairs += [("reference", p) for p in PEER_PRECISIONS]
        return pairs

    def all(self):
        for step in self.plan():
            kind = step[0]
            if kind == "measure":
                for peer, precision in self.peers(step[1]):
                    self.measure(step[1], step[2], step[3], peer, precision)
            elif kind == "gemm":
                self.gemm(step[1], step[2])
            elif kind == "lock":
                self.lock_case()
            elif kind == "compile":
                for precision in (PEER_PRECISIONS[:1] if self.quick else PEER_PRECISIONS):
                    self.measure(step[1], step[2], step[3], "compiled", precision)
            elif kind == "bank":
                for precision in self.precisions:
                    self.measure("bank_mine", self.bank[0], self.bank[1], "fused", precision, fraction=self.bank_fraction)

    # -- output ------------------------------------------------------------------------------------
    def document(self):
        for row in self.rows:
            if row.get("peer") == "fused":
                row["bound_s"], row["bound_source"] = self.bound(row)
        return {"command": self.command, "device": str(self.device), "gemm_size": self.gemm_size, "dim": self.dim,
                "target_m": self.target_m, "bank": self.bank, "bank_fraction": self.bank_fraction, "lock": self.lock,
                "budget_s": self.budget_s, "compile_budget_s": self.compile_budget_s,
                "compile_spent_s": self.compile_spent_s, "peaks_flops": self.peaks,
                "float32_matmul_precision": {"before": self.precision_before,
                                             "after": torch.get_float32_matmul_precision()},
                "useful_flops": "2 (h d + 2 h c) per scored pair (x3 forward+backward; Euclidean 2 d); torch.mm 2 n^3",
                "rows": self.rows,
                "targets": check_targets(self.rows, self.target_m, self.bank, self.precisions),
                "elapsed_s": time.perf_counter() - self.start}

    def write(self):
        doc = gpu_results.load(self.out)
        if not doc.get("machine"):  # run on its own, not by gpu_check.sh: its own facts
            doc["machine"] = machine(self.device, self.facts)
            doc["command"] = self.command
        doc["bench"] = self.document()
        gpu_results.save(self.out, doc)


# -- targets ----------------------------------------------------------------------------------------
def _ok(rows, **match):
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def _stand_in(precision):
    """The precision whose peer rows count as "the same precision": cuBLAS runs TF32 under "medium" too."""
    return "high" if precision == "medium" else precision


def _bound_of(rows, **match):
    """The arithmetic bound (seconds, source) of the first fused row matching, measured or not."""
    for r in rows:
        if r.get("peer") == "fused" and all(r.get(k) == v for k, v in match.items()) and r.get("bound_s"):
            return r["bound_s"], r.get("bound_source")
    return None, None


def check_targets(rows, target_m, bank, precisions):
    """The targets, one entry per precision: measured value, threshold, met / not met, and the
    arithmetic bound on the measured value ("bound"; None where unknown)."""
    targets = []
    gemm = {r["precision"]: r for r in _ok(rows, op="gemm", dtype="float32")}
    for p in precisions:
        # 1. mine_k1 at target_m: fused vs the fastest peer at the same precision.
        name = f"mine_k1 m={target_m}: fused >= {TARGET_SPEEDUP:g}x faster than the fastest peer at the same precision"
        fused = _ok(rows, op="mine_k1", m=target_m, peer="fused", precision=p)
        peers = [r for r in _ok(rows, op="mine_k1", m=target_m, precision=_stand_in(p)) if r["peer"] != "fused"]
        entry = {"target": name, "precision": p, "threshold": TARGET_SPEEDUP, "unit": "x", "bound": None}
        bound_s, source = _bound_of(rows, op="mine_k1", m=target_m, precision=p)
        if fused and peers:
            best = min(peers, key=lambda r: r["time_s"])
            ratio = best["time_s"] / fused[0]["time_s"]
            entry.update(measured=ratio, result="met" if ratio >= TARGET_SPEEDUP else "not met",
                         detail=f"fused {1e3 * fused[0]['time_s']:.2f} ms, fastest peer {best['peer']} "
                                f"({best['precision']}) {1e3 * best['time_s']:.2f} ms")
            if bound_s:
                entry.update(bound=best["time_s"] / bound_s,
                             bound_detail=f"at most {best['time_s'] / bound_s:.0f}x: fused >= {1e3 * bound_s:.3f} ms at the {source} rate")
        else:
            entry.update(measured=None, result="not measured",
                         detail="no fused row" if not fused else f"no peer row at {_stand_in(p)}")
            if bound_s:
                entry["bound_detail"] = f"fused >= {1e3 * bound_s:.3f} ms at the {source} rate"
        targets.append(entry)

        # 2. The fused scores forward's useful FLOP rate vs torch.mm at the same precision, at the
        # largest m measured (the kernel's steady state).
        fused = sorted(_ok(rows, op="scores_fwd", peer="fused", precision=p), key=lambda r: r["m"])
        name = (f"scores_fwd: fused useful FLOP rate >= {TARGET_GEMM_FRACTION:.0%} of torch.mm's at the same precision")
        entry = {"target": name, "precision": p, "threshold": TARGET_GEMM_FRACTION, "unit": "fraction", "bound": None}
        if fused and p in gemm:
            frac = fused[-1]["tflops"] / gemm[p]["tflops"]
            entry.update(measured=frac, result="met" if frac >= TARGET_GEMM_FRACTION else "not met",
                         detail=f"m={fused[-1]['m']}: fused {fused[-1]['tflops']:.2f} TFLOP/s, "
                                f"torch.mm {gemm[p]['tflops']:.2f} TFLOP/s")
            if fused[-1].get("bound_s"):
                best = frac * fused[-1]["time_s"] / fused[-1]["bound_s"]
                entry.update(bound=best, bound_detail=f"at most {best:.0%} (fused at the {fused[-1].get('bound_source')} "
                                                      f"rate of its arithmetic)")
        else:
            entry.update(measured=None, result="not measured", detail="no fused scores_fwd row" if not fused else "no GEMM row")
        targets.append(entry)

        # 3. The bank mined in under TARGET_BANK_S.
        name = f"bank_mine {bank[0]} x {bank[1]:,}: fused < {TARGET_BANK_S:g} s"
        fused = _ok(rows, op="bank_mine", peer="fused", precision=p)
        entry = {"target": name, "precision": p, "threshold": TARGET_BANK_S, "unit": "s", "bound": None}
        bound_s, source = _bound_of(rows, op="bank_mine", precision=p)
        if bound_s:
            entry.update(bound=bound_s, bound_detail=f"at least {bound_s:.3g} s at the {source} rate"
                                                     + (" (the target is out of reach)" if bound_s >= TARGET_BANK_S and source == "peak" else ""))
        if fused:
            t = fused[0]["time_s"]
            extrapolated = f" (extrapolated from 1/{fused[0]['n'] // fused[0]['measured_n']} of the bank)" \
                if fused[0].get("extrapolated") else ""
            entry.update(measured=t, result="met" if t < TARGET_BANK_S else "not met", detail=f"{t:.3f} s{extrapolated}")
        else:
            entry.update(measured=None, result="not measured", detail="no fused bank_mine row")
        targets.append(entry)
    return targets


def machine(device, facts=None):
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "platform": platform.platform(), "device": str(device), "cpu_count": os.cpu_count()}
    info.update({k: v for k, v in (facts or {}).items() if k in ("gpu", "sms", "capability", "gpu_memory_bytes",
                                                                 "nvidia_smi")})
    try:
        info["pytorch_metric_learning"] = importlib.import_module("pytorch_metric_learning").__version__
    except ImportError:
        info["pytorch_metric_learning"] = None
    info.update(gpu_preflight.commit_facts(os.environ))
    return info


def main(argv=None):
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible; use --device cpu --quick to test the script", file=sys.stderr)
        return 2
    bench = Bench(args)
    print(f"budget {bench.budget_s:.0f} s (torch.compile: {bench.compile_budget_s:.0f} s), device memory allowed "
          f"{bench.memory / 2**30:.1f} GiB, float32 matmul precision before: {bench.precision_before}; "
          f"peak FLOP/s for the bounds: {({k: f'{v / 1e12:.1f}T' for k, v in bench.peaks.items()}) or 'unknown here (torch.mm rates instead)'}",
          flush=True)
    missing = pml_missing()
    if missing:
        print(f"BatchHardMiner rows will be skipped: {missing}", flush=True)
    print(gpu_results.HEADER, flush=True)
    bench.all()
    if torch.get_float32_matmul_precision() != bench.precision_before:  # a bug here: never leave it changed
        print(f"float32 matmul precision was left at {torch.get_float32_matmul_precision()}; restoring "
              f"{bench.precision_before}", file=sys.stderr)
    if bench.device.type == "cuda":
        bench.facts["nvidia_smi_end"] = gpu_preflight.nvidia_smi()  # the clocks after the run (throttling?)
    bench.write()
    torch.set_float32_matmul_precision(bench.precision_before)
    doc = gpu_results.load(bench.out)
    if bench.device.type == "cuda":
        doc["bench"]["nvidia_smi_end"] = bench.facts["nvidia_smi_end"]
        gpu_results.save(bench.out, doc)
    for t in doc["bench"]["targets"]:
        print(f"target [{t['precision']}] {t['target']}: {t['result']} ({t['detail']})"
              + (f"; bound: {t['bound_detail']}" if t.get("bound_detail") else ""))
    print(f"wrote {bench.out}/results.json and results.md ({doc['bench']['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
