"""GPU benchmark: fused pddm_ext kernels vs the plain PyTorch reference (issue 4).

Configurations (d = h = c = 128 by default):
  scores            S = unit(x), batch mode, m = 1024, 4096, 16384
  scores+backward   forward and backward of S.sum()-like loss, same sizes
  mine_hard         k = 1 hard quadruplets, batch mode, same sizes
  mine_hard (bank)  4096 queries against a 1,048,576-row memory bank (reference mode)

The reference materialises all pairs; a reference configuration whose predicted peak memory exceeds
the device is skipped and reported with the memory it would need (predicted from a measured small
run, bytes per pair). The fused scores kernel's useful FLOP rate counts 2 (h d + 2 h c) FLOPs per
computed pair (batch mode computes one triangle, m (m + 1) / 2 pairs).

Writes results.json and results.md into $OUT when set, else benchmarks/results/gpu/.
``--device cpu --quick`` runs small sizes on the CPU (to test this script without a GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: an in-place build is found first

import pddm_ext  # noqa: E402
from pddm_ext import reference  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the script)")
    ap.add_argument("--sizes", type=int, nargs="*", help="batch sizes m (default 1024 4096 16384; quick: 64 128)")
    ap.add_argument("--dim", type=int, help="d = h = c (default 128; quick: 32)")
    ap.add_argument("--bank", type=int, nargs=2, metavar=("QUERIES", "ROWS"),
                    help="mine_hard bank configuration (default 4096 1048576; quick: 64 4096)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="stop starting new configurations after this many seconds (default 420)")
    ap.add_argument("--out", help="output folder (default: $OUT, else benchmarks/results/gpu)")
    return ap.parse_args(argv)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_memory(device):
    """Bytes the benchmark may use on the device."""
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


def timed(fn, device, *, max_runs=5, min_total_s=0.5, warmup=True):
    """Median seconds of fn() over up to max_runs runs (fewer for slow runs)."""
    if warmup:
        fn()
        synchronize(device)
    times = []
    while len(times) < max_runs:
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if sum(times) >= min_total_s:
            break
    times.sort()
    return times[len(times) // 2]


def peak_bytes(fn, device):
    """Peak extra device memory of fn() (CUDA only; None on the CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def flops_per_pair(d, h, c):
    return 2 * (h * d + 2 * h * c)


class Bench:
    def __init__(self, args):
        self.device = torch.device(args.device)
        self.quick = args.quick
        self.dim = args.dim or (32 if args.quick else 128)
        self.sizes = args.sizes or ([64, 128] if args.quick else [1024, 4096, 16384])
        self.bank = args.bank or ([64, 4096] if args.quick else [4096, 1 << 20])
        self.budget_s = args.budget_s
        self.start = time.perf_counter()
        self.memory = device_memory(self.device)
        self.rows = []
        torch.manual_seed(0)
        d = self.dim
        self.unit = pddm_ext.PDDM(d, d, d).to(self.device)
        self.params = tuple(getattr(self.unit, n) for n in reference.PARAM_NAMES)
        self.bytes_per_pair = {}

    def over_budget(self):
        return time.perf_counter() - self.start > self.budget_s

    def data(self, m, n_classes):
        x = torch.nn.functional.normalize(torch.randn(m, self.dim, device=self.device), dim=1)
        labels = torch.randint(0, n_classes, (m,), device=self.device)
        return x, labels

    # -- the measured operations --------------------------------------------------------------------
    def op(self, name, impl, x, labels, bank=None):
        unit, params = self.unit, self.params
        if name == "scores":
            if impl == "fused":
                return lambda: pddm_ext.pddm_scores(x, None, *params).detach()
            return lambda: reference.pddm_scores(x, None, params).detach()
        if name == "scores+backward":
            def run():
                xg = x.detach().requires_grad_()
                S = pddm_ext.pddm_scores(xg, None, *params) if impl == "fused" else reference.pddm_scores(xg, None, params)
                grads = torch.autograd.grad(S.sum(), [xg, *params])
                return grads
            return run
        if name == "mine_hard":
            mod = pddm_ext if impl == "fused" else reference
            if bank is None:
                return lambda: mod.mine_hard(x, labels, unit, k=1)
            return lambda: mod.mine_hard(x, labels, unit, k=1, ref_emb=bank[0], ref_labels=bank[1])
        raise ValueError(name)

    def predicted_reference_bytes(self, name, pairs):
        """Bytes the reference would need: bytes per pair measured at a small size, times pairs."""
        if name not in self.bytes_per_pair:
            per_pair = None
            if self.device.type == "cuda":
                m = 128
                x, labels = self.data(m, 16)
                peak = peak_bytes(self.op(name, "reference", x, labels), self.device)
                per_pair = peak / (m * m) if peak else None
            if per_pair is None:  # CPU: a conservative estimate of the reference's live intermediates
                d = self.dim
                per_pair = 4 * (8 * d + 8 * d + 4 * d) * (3 if name == "scores+backward" else 1)
            self.bytes_per_pair[name] = per_pair
        return int(self.bytes_per_pair[name] * pairs * 1.1)

    # -- one configuration -----------------------------------------------------------------------
    def run(self, name, m, n=None):
        bank_mode = n is not None
        n_classes = max(2, m // 4)
        x, labels = self.data(m, n_classes)
        bank = None
        if bank_mode:
            bank = self.data(n, n_classes)
        pairs_all = m * (n if bank_mode else m)
        computed_pairs = m * n if bank_mode else m * (m + 1) // 2
        row = {"op": name + (" (bank)" if bank_mode else ""), "m": m, "n": n if bank_mode else m,
               "d": self.dim, "h": self.dim, "c": self.dim}
        if self.over_budget():
            row["note"] = "skipped: time budget"
            self.rows.append(row)
            return
        fused = self.op(name, "fused", x, labels, bank)
        expected = computed_pairs * flops_per_pair(self.dim, self.dim, self.dim)
        slow = expected > 2e14 if self.device.type == "cuda" else expected > 2e10
        row["fused_s"] = timed(fused, self.device, max_runs=1 if slow else 5, warmup=not slow)
        fused_peak = peak_bytes(fused, self.device) if not slow else None
        row["fused_peak_bytes"] = fused_peak
        if name == "scores":
            row["fused_tflops"] = expected / row["fused_s"] / 1e12
        need = self.predicted_reference_bytes(name, pairs_all)
        row["reference_predicted_bytes"] = need
        if need > self.memory:
            row["note"] = f"reference skipped: needs ~{need / 2**30:.1f} GiB, device allows {self.memory / 2**30:.1f} GiB"
        elif self.over_budget():
            row["note"] = "reference skipped: time budget"
        else:
            ref = self.op(name, "reference", x, labels, bank)
            try:
                row["reference_s"] = timed(ref, self.device, max_runs=3)
                row["speedup"] = row["reference_s"] / row["fused_s"]
            except torch.OutOfMemoryError:
                row["note"] = f"reference out of memory (predicted ~{need / 2**30:.1f} GiB)"
            finally:
                del ref
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        self.rows.append(row)
        print(format_row(row), flush=True)

    def all(self):
        for name in ("scores", "scores+backward", "mine_hard"):
            for m in self.sizes:
                self.run(name, m)
        self.run("mine_hard", self.bank[0], self.bank[1])


def format_row(r):
    ms = lambda s: "-" if s is None else f"{1e3 * s:.2f}"  # noqa: E731
    gib = lambda b: "-" if not b else f"{b / 2**30:.2f}"  # noqa: E731
    tf = r.get("fused_tflops")
    sp = r.get("speedup")
    return (f"| {r['op']} | {r['m']} | {r['n']} | {ms(r.get('fused_s'))} | {ms(r.get('reference_s'))} | "
            f"{'-' if sp is None else f'{sp:.1f}x'} | {'-' if tf is None else f'{tf:.1f}'} | "
            f"{gib(r.get('fused_peak_bytes'))} | {gib(r.get('reference_predicted_bytes'))} | {r.get('note', '')} |")


def machine(device):
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "device": str(device), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                        timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main(argv=None):
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible; use --device cpu --quick to test the script", file=sys.stderr)
        return 2
    bench = Bench(args)
    header = ("| op | m | n | fused ms | reference ms | speedup | fused TFLOP/s | fused peak GiB | "
              "reference GiB (predicted) | note |\n|---|---|---|---|---|---|---|---|---|---|")
    print(header, flush=True)
    bench.all()
    out = args.out or os.environ.get("OUT") or os.path.join(HERE, "results", "gpu")
    os.makedirs(out, exist_ok=True)
    result = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(bench.device), "rows": bench.rows,
              "flops_per_pair": "2 (h d + 2 h c)", "elapsed_s": time.perf_counter() - bench.start}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    m = result["machine"]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# pddm_ext GPU benchmark\n\n`{result['command']}` on {m.get('gpu', m['device'])} "
                f"(torch {m['torch']}, CUDA {m.get('cuda', '-')}), {result['date']}, commit {m.get('commit', '?')}.\n\n")
        f.write(header + "\n")
        for r in bench.rows:
            f.write(format_row(r) + "\n")
    print(f"wrote {out}/results.json and results.md ({result['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
