"""GPU benchmark: the fused pddm_ext ops against their peers, in one run on one GPU (issues 4 and 12).

Operations (the workloads of ``benchmarks/workloads.py``; d = h = c = 128 by default, float32,
L2-normalised random embeddings, P x K labels with K = 4, a ``PDDM(d, d, d)`` with default init):

  scores_fwd      S = unit(x) under no_grad: pddm_ext.pddm_scores forward, batch mode
  scores_fwd_bwd  unit(x).sum().backward(), x and every parameter requiring grad
  mine_k1         mine_hard(x, labels, unit, k=1): the paper's hardest quadruplet
  batch_hard      batch_hard(x, labels), Euclidean metric
  bank_mine       mine_hard in reference mode: 4096 queries against a 1,048,576-row memory bank

each at m = 1024, 4096 and 16384 (bank_mine: its one size), measured for these peers:

  fused      pddm_ext, at each float32 matmul precision (torch.set_float32_matmul_precision):
             "highest" = FP32, "high" = 3xTF32 tensor cores, "medium" = TF32 tensor cores
             (what the CUDA kernels are asked for; the rows are labelled with the setting)
  reference  pddm_ext.reference (plain PyTorch, all pairs materialised) at "highest" (FP32) and
             "high" (cuBLAS uses TF32; "medium" gives cuBLAS the same TF32, so the "high" peers
             stand in for "medium" in the targets)
  pml        pytorch-metric-learning's BatchHardMiner (batch_hard only), at "highest" and "high";
             skipped with a line saying so when the package is not installed
  compiled   torch.compile(reference) at "highest" and "high", each configuration in a fresh process
             (benchmarks/measure.py) killed when it outruns what is left of --compile-budget-s;
             compile time reported apart
  gemm       torch.mm of two (8192, 8192) matrices: float32 at each precision (cuBLAS FP32 / TF32),
             bfloat16 and float16: the roofline

Times are medians in seconds of the calls after one warm-up (a first call slower than --slow-s is
timed and is the only call). "useful TFLOP/s" counts ``workloads.useful_flops``: 2 (h d + 2 h c)
FLOPs per scored pair (batch mode scores one triangle, m (m + 1) / 2 pairs; reference mode m n),
x3 for forward+backward, 2 d per pair for the Euclidean batch_hard; torch.mm counts 2 n^3.
Memory is the extra peak of the timed calls (the CUDA caching allocator's peak, the CPU's RSS).

A configuration is skipped, with a line saying why, when its predicted peak memory exceeds 90% of
the free device memory (the reference's bytes per pair are measured at m = 128 on the GPU), when
--budget-s has run out, or when its time predicted from a smaller measured size would overrun what
is left of it. Targets (issue 12; reported met / not met, never asserted): fused mine_k1 at
m = 4096 >= 5x faster than the fastest peer at the same precision; fused scores_fwd useful FLOP
rate >= 40% of torch.mm's at the same precision; the 4096 x 1,048,576 bank mined in < 2 s.
Every precision setting is restored after its rows.

Writes results.json and results.md into --out, else $OUT, else benchmarks/results/gpu/.
``--device cpu --quick`` runs every peer at tiny sizes on the CPU (CI's rehearsal of this script).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: an in-place build is found first

import pddm_ext  # noqa: E402,F401  (the fused ops; imported here so a broken build fails at once)
from benchmarks import measure  # noqa: E402
from benchmarks.run import run_child  # noqa: E402
from benchmarks.workloads import Config, predicted_bytes, useful_flops  # noqa: E402

PRECISIONS = ("highest", "high", "medium")
PEER_PRECISIONS = ("highest", "high")  # FP32 and TF32 for the cuBLAS-backed peers
OPS = ("mine_k1", "scores_fwd", "batch_hard", "scores_fwd_bwd")  # the order of measurement at each m
PEER_KINDS = ("fused", "reference", "pml", "compiled", "gemm")
GEMM_DTYPES = ("bfloat16", "float16")
# What each (peer, precision) computes its products in on a GPU.
ARITHMETIC = {
    ("fused", "highest"): "FP32", ("fused", "high"): "3xTF32", ("fused", "medium"): "TF32",
    ("peer", "highest"): "FP32", ("peer", "high"): "TF32 (cuBLAS)", ("peer", "medium"): "TF32 (cuBLAS)",
}
MIN_COMPILE_S = 5.0  # a torch.compile child given less would only be killed
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


class Bench:
    """Measures the plan in priority order; every measurement, skip and failure becomes one row."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.quick = args.quick
        self.dim = args.dim or (32 if args.quick else 128)
        self.sizes = args.sizes or ([64, 128] if args.quick else [1024, 4096, 16384])
        self.bank = args.bank or ([64, 4096] if args.quick else [4096, 1 << 20])
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
                "peer": peer, "precision": precision, "arithmetic": self.arithmetic(peer, precision)}

    def emit(self, row):
        self.rows.append(row)
        print(format_row(row), flush=True)
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

    def record(self, row, cfg, peer, precision, result):
        row.update(status="ok", time_s=result["time_s"], times_s=result.get("times_s"),
                   peak_bytes=result.get("extra_peak_bytes"), tflops=useful_flops(cfg) / result["time_s"] / 1e12)
        for key in ("phases_s", "compile_s", "first_call_timed"):
            if result.get(key):
                row[key] = result[key]
        family = "mine_k1" if cfg.workload == "bank_mine" else cfg.workload
        self.seconds_per_flop[(family, peer, precision)] = result["time_s"] / useful_flops(cfg)

    # -- one measurement ------------------------------------------------------------------------
    def measure(self, workload, m, n, peer, precision):
        """One row: ``peer`` on ``workload`` at (m, n) under the float32 matmul ``precision``."""
        cfg = self.config(workload, m, n, peer)
        row = self.new_row(cfg, peer, precision)
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
            self.record(row, cfg, peer, precision, result)
        except torch.OutOfMemoryError:
            row.update(status="error", note=f"out of memory (predicted ~{need / 2**30:.1f} GiB)")
        except Exception as exc:  # noqa: BLE001  (a failing peer is a result too, never the end of the run)
            row.update(status="error", note=f"error: {_error_text(exc)}")
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return self.emit(row)

    def measure_compiled(self, row, cfg, precision, left):
        """torch.compile(reference) in a fresh process, killed when it outruns the compile budget."""
        compile_left = self.compile_budget_s - self.compile_spent_s
        timeout = min(compile_left, left)
        if timeout < MIN_COMPILE_S:
            spent = "compile budget" if compile_left <= left else "time budget"
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
            budget = "compile budget" if compile_left <= left else "time budget"
            return self.skip(row, f"compiled skipped: no result within {timeout:.0f} s (what was left of the {budget})")
        row.update(status="error", note=f"compiled failed: {result.get('error', '?')}")
        if result.get("stderr_tail"):
            row["stderr_tail"] = result["stderr_tail"]
        return self.emit(row)

    # -- the roofline ----------------------------------------------------------------------------
    def gemm(self, dtype, precision):
        """GFLOP/s of torch.mm on (size, size) matrices (measure._gemm_rate) under ``precision``."""
        size = self.gemm_size
        row = {"op": "gemm", "m": size, "n": size, "d": size, "dtype": dtype, "peer": "gemm", "precision": precision,
               "arithmetic": {"bfloat16": "BF16", "float16": "FP16"}.get(dtype) or self.arithmetic("gemm", precision)}
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
        """(workload, m, n) in priority order: the target configurations first, so that a budget
        that runs out costs the least important rows."""
        T = self.target_m
        first = [("mine_k1", T, T), ("bank_mine", self.bank[0], self.bank[1])]
        first += [(op, T, T) for op in OPS if op != "mine_k1"]
        rest = [(op, m, m) for m in sorted(self.sizes) if m != T for op in OPS]
        return first + rest

    def peers(self, workload, m):
        """(peer, precision) pairs measured for one configuration, in order."""
        pairs = [("fused", p) for p in self.precisions]
        pairs += [("reference", p) for p in PEER_PRECISIONS]
        if workload == "batch_hard":
            pairs += [("pml", p) for p in PEER_PRECISIONS]
        # The quick rehearsal compiles once (the target configuration): each compile costs ~10-20 s on a CPU.
        if not self.quick or (workload == "mine_k1" and m == self.target_m):
            pairs += [("compiled", p) for p in (PEER_PRECISIONS[:1] if self.quick else PEER_PRECISIONS)]
        return pairs

    def all(self):
        for precision in PRECISIONS:
            self.gemm("float32", precision)
        for dtype in GEMM_DTYPES:
            self.gemm(dtype, "highest")
        for workload, m, n in self.plan():
            for peer, precision in self.peers(workload, m):
                self.measure(workload, m, n, peer, precision)


# -- targets ----------------------------------------------------------------------------------------
def _ok(rows, **match):
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def _stand_in(precision):
    """The precision whose peer rows count as "the same precision": cuBLAS runs TF32 under "medium" too."""
    return "high" if precision == "medium" else precision


def check_targets(rows, target_m, bank, precisions):
    """The targets of issue 12, one entry per precision: measured value, threshold, met / not met."""
    targets = []
    gemm = {r["precision"]: r for r in _ok(rows, op="gemm", dtype="float32")}
    for p in precisions:
        # 1. mine_k1 at target_m: fused vs the fastest peer at the same precision.
        name = f"mine_k1 m={target_m}: fused >= {TARGET_SPEEDUP:g}x faster than the fastest peer at the same precision"
        fused = _ok(rows, op="mine_k1", m=target_m, peer="fused", precision=p)
        peers = [r for r in _ok(rows, op="mine_k1", m=target_m, precision=_stand_in(p)) if r["peer"] != "fused"]
        entry = {"target": name, "precision": p, "threshold": TARGET_SPEEDUP, "unit": "x"}
        if fused and peers:
            best = min(peers, key=lambda r: r["time_s"])
            ratio = best["time_s"] / fused[0]["time_s"]
            entry.update(measured=ratio, result="met" if ratio >= TARGET_SPEEDUP else "not met",
                         detail=f"fused {1e3 * fused[0]['time_s']:.2f} ms, fastest peer {best['peer']} "
                                f"({best['precision']}) {1e3 * best['time_s']:.2f} ms")
        else:
            entry.update(measured=None, result="not measured",
                         detail="no fused row" if not fused else f"no peer row at {_stand_in(p)}")
        targets.append(entry)

        # 2. The fused scores forward's useful FLOP rate vs torch.mm at the same precision, at the
        # largest m measured (the kernel's steady state).
        fused = sorted(_ok(rows, op="scores_fwd", peer="fused", precision=p), key=lambda r: r["m"])
        name = (f"scores_fwd: fused useful FLOP rate >= {TARGET_GEMM_FRACTION:.0%} of torch.mm's at the same precision")
        entry = {"target": name, "precision": p, "threshold": TARGET_GEMM_FRACTION, "unit": "fraction"}
        if fused and p in gemm:
            frac = fused[-1]["tflops"] / gemm[p]["tflops"]
            entry.update(measured=frac, result="met" if frac >= TARGET_GEMM_FRACTION else "not met",
                         detail=f"m={fused[-1]['m']}: fused {fused[-1]['tflops']:.2f} TFLOP/s, "
                                f"torch.mm {gemm[p]['tflops']:.2f} TFLOP/s")
        else:
            entry.update(measured=None, result="not measured", detail="no fused scores_fwd row" if not fused else "no GEMM row")
        targets.append(entry)

        # 3. The bank mined in under TARGET_BANK_S.
        name = f"bank_mine {bank[0]} x {bank[1]:,}: fused < {TARGET_BANK_S:g} s"
        fused = _ok(rows, op="bank_mine", peer="fused", precision=p)
        entry = {"target": name, "precision": p, "threshold": TARGET_BANK_S, "unit": "s"}
        if fused:
            t = fused[0]["time_s"]
            entry.update(measured=t, result="met" if t < TARGET_BANK_S else "not met", detail=f"{t:.3f} s")
        else:
            entry.update(measured=None, result="not measured", detail="no fused bank_mine row")
        targets.append(entry)
    return targets


# -- output -----------------------------------------------------------------------------------------
HEADER = ("| op | m | n | peer | precision | arithmetic | ms | useful TFLOP/s | extra peak GiB | compile s | note |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r):
    ms = "-" if r.get("time_s") is None else f"{1e3 * r['time_s']:.3f}"
    tf = "-" if r.get("tflops") is None else f"{r['tflops']:.3f}"
    gib = "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:.3f}"
    comp = "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
    precision = r["precision"] if r.get("dtype", "float32") == "float32" else r["dtype"]
    note = str(r.get("note", "")).replace("|", "/")
    return (f"| {r['op']} | {r['m']} | {r['n']} | {r['peer']} | {precision} | {r.get('arithmetic') or '-'} | {ms} | "
            f"{tf} | {gib} | {comp} | {note} |")


def comparisons(rows):
    """Per peer row: fused time / peer time at the same precision, and fused rate / torch.mm rate."""
    gemm = {r["precision"]: r["tflops"] for r in _ok(rows, op="gemm", dtype="float32")}
    fused = {(r["op"], r["m"], r["n"], r["precision"]): r for r in _ok(rows, peer="fused")}
    lines = ["| op | m | n | peer | precision | peer ms | fused ms (same precision) | fused speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in _ok(rows):
        if r["peer"] in ("fused", "gemm"):
            continue
        f = fused.get((r["op"], r["m"], r["n"], r["precision"]))
        if f:
            lines.append(f"| {r['op']} | {r['m']} | {r['n']} | {r['peer']} | {r['precision']} | {1e3 * r['time_s']:.3f} | "
                         f"{1e3 * f['time_s']:.3f} | {r['time_s'] / f['time_s']:.1f}x |")
    rate = ["| op | m | n | precision | fused useful TFLOP/s | torch.mm TFLOP/s | fraction |", "|---|---|---|---|---|---|---|"]
    for (op, m, n, p), f in fused.items():
        if p in gemm and op != "batch_hard":
            rate.append(f"| {op} | {m} | {n} | {p} | {f['tflops']:.3f} | {gemm[p]:.3f} | {f['tflops'] / gemm[p]:.1%} |")
    return "\n".join(lines), "\n".join(rate)


def machine(device):
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "device": str(device), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
    try:
        info["pytorch_metric_learning"] = importlib.import_module("pytorch_metric_learning").__version__
    except ImportError:
        info["pytorch_metric_learning"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                        timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def write_results(out, result):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    m, rows = result["machine"], result["rows"]
    vs_peers, vs_gemm = comparisons(rows)
    targets = ["| target | precision | measured | result | detail |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        v = t["measured"]
        shown = "-" if v is None else {"x": f"{v:.1f}x", "fraction": f"{v:.1%}", "s": f"{v:.3f} s"}[t["unit"]]
        targets.append(f"| {t['target']} | {t['precision']} | {shown} | **{t['result']}** | {t['detail']} |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# pddm_ext GPU benchmark\n\n`{result['command']}` on {m.get('gpu', m['device'])} "
                f"(torch {m['torch']}, CUDA {m.get('cuda', '-')}, pytorch-metric-learning "
                f"{m.get('pytorch_metric_learning') or 'not installed'}), {result['date']}, commit {m.get('commit', '?')}, "
                f"{result['elapsed_s']:.0f} s.\n\n"
                "precision = `torch.set_float32_matmul_precision` during the row. Fused: highest = FP32, high = 3xTF32, "
                "medium = TF32 (what the kernels are asked for); the reference, torch.compile and BatchHardMiner: "
                "highest = FP32, high = TF32 in cuBLAS (as under medium). gemm: torch.mm of two "
                f"{result['gemm_size']}^2 matrices. Times are medians of the calls after one warm-up.\n\n")
        f.write("## Targets (issue 12; reported, not asserted)\n\n" + "\n".join(targets) + "\n\n")
        f.write("## Every row\n\n" + HEADER + "\n" + "\n".join(format_row(r) for r in rows) + "\n\n")
        f.write("## Fused vs each peer at the same precision\n\n" + vs_peers + "\n\n")
        f.write("## Fused useful FLOP rate vs torch.mm at the same precision\n\n" + vs_gemm + "\n")


def main(argv=None):
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible; use --device cpu --quick to test the script", file=sys.stderr)
        return 2
    precision_before = torch.get_float32_matmul_precision()
    bench = Bench(args)
    print(f"budget {bench.budget_s:.0f} s (torch.compile: {bench.compile_budget_s:.0f} s), device memory allowed "
          f"{bench.memory / 2**30:.1f} GiB, float32 matmul precision before: {precision_before}", flush=True)
    missing = pml_missing()
    if missing:
        print(f"BatchHardMiner rows will be skipped: {missing}", flush=True)
    print(HEADER, flush=True)
    bench.all()
    precision_after = torch.get_float32_matmul_precision()
    if precision_after != precision_before:  # a bug here: never leave the caller's setting changed
        print(f"float32 matmul precision was left at {precision_after}; restoring {precision_before}", file=sys.stderr)
        torch.set_float32_matmul_precision(precision_before)
    out = args.out or os.environ.get("OUT") or os.path.join(HERE, "results", "gpu")
    result = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(bench.device), "gemm_size": bench.gemm_size, "dim": bench.dim,
              "target_m": bench.target_m, "bank": bench.bank, "budget_s": bench.budget_s,
              "compile_budget_s": bench.compile_budget_s, "compile_spent_s": bench.compile_spent_s,
              "float32_matmul_precision": {"before": precision_before, "after": precision_after},
              "useful_flops": "2 (h d + 2 h c) per scored pair (x3 forward+backward; Euclidean 2 d); torch.mm 2 n^3",
              "rows": bench.rows,
              "targets": check_targets(bench.rows, bench.target_m, bench.bank, bench.precisions),
              "elapsed_s": time.perf_counter() - bench.start}
    write_results(out, result)
    for t in result["targets"]:
        print(f"target [{t['precision']}] {t['target']}: {t['result']} ({t['detail']})")
    print(f"wrote {out}/results.json and results.md ({result['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
