"""Small programs that ``benchmarks/gpu_check.sh`` runs under a tool or in a process of their own.

    python -m benchmarks.gpu_cases sanitize [--device cuda]     three small cases for compute-sanitizer
    python -m benchmarks.gpu_cases profile  [--m 4096 --dim 128] the forward tile kernel, for ncu
    python -m benchmarks.gpu_cases lock     [--m 256 --n 131072 --dim 64]  float64 mining under contention

``sanitize``: (1) scores forward and backward of odd shapes (d = 20, h = 17, c = 9; m = 37 in batch
mode and against n = 29 rows) under "highest" (FP32) and "high" (tensor cores); (2) float64 mining
against a 300-row bank with k = 3 (the per-row spin lock of float64 scores, the per-block heaps) and
in batch mode with all pairs (k = -1, the append buffer); (3) float32 mining, Euclidean batch_hard
and mine_hard with k = 2 under "medium" (the packed 64-bit keys). Each prints ``case NAME ok`` after
checking its result against pddm_ext.reference, so a sanitizer run that prints no error but also no
``ok`` did not test anything.

``profile``: scores of m = 4096 float32 rows (d = h = c = 128) in batch mode, once under each float32
matmul precision ("highest", "high", "medium"): three launches of the forward tile kernel.

``lock``: mine_hard's reductions (``pddm_ext.ops.mine`` with k = 1) in reference mode, m queries
against an n-row bank, in float64 (per-row spin lock around the (score, index) pair) and float32
(packed 64-bit keys, atomicMin/atomicMax), for two banks: ``random`` rows, and ``ties``: 16 distinct
rows repeated, so that nearly every offer ties the current best and takes the lock (the lock under
contention: every block offers to the same m rows). Each result is checked against the fused scores
(``pddm_ext.ops.scores``, an (m, n) matrix): the mined score is the row's (column's) optimum within
the tolerance of docs/design.md#ties-and-tolerance, the reported score is the mined index's score
(no torn (score, index) pair), and the labels are right; ties resolved to the smallest index are
counted. Prints ``RESULT {json}``: per (bank, dtype) the median time of ``--repeats`` calls after a
warm-up, and the counts.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import pddm_ext
from pddm_ext import ops, reference


def _params(unit):
    return tuple(getattr(unit, name).detach() for name in reference.PARAM_NAMES)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _close(a, b, tol):
    return ((a.double() - b.double()).abs().max() / (1 + b.double().abs().max())).item() <= tol


def sanitize(device):
    torch.manual_seed(0)
    # (1) scores forward and backward, odd shapes, batch and reference mode, FP32 and tensor cores
    unit = pddm_ext.PDDM(20, 17, 9).to(device)
    x = torch.randn(37, 20, device=device)
    y = torch.randn(29, 20, device=device)
    G = torch.randn(37, 29, device=device)
    for precision in ("highest", "high"):
        torch.set_float32_matmul_precision(precision)
        for other in (None, y):
            xg = x.clone().requires_grad_()
            params = [p.clone().requires_grad_() for p in _params(unit)]
            S = pddm_ext.pddm_scores(xg, other, *params)
            R = reference.pddm_scores(x.double(), None if other is None else other.double(), [p.double() for p in params])
            assert _close(S, R, 1e-3), "scores differ from the reference"
            weight = G[:, :S.shape[1]] if other is not None else torch.randn(37, 37, device=device)
            torch.autograd.grad((S * weight).sum(), [xg] + params)
    torch.set_float32_matmul_precision("highest")
    _sync(device)
    print("case scores ok", flush=True)

    # (2) float64 mining: reference mode with k = 3 (spin lock, heaps), batch mode with all pairs
    unit64 = pddm_ext.PDDM(16, 12, 8).to(device=device, dtype=torch.float64)
    x = torch.randn(40, 16, device=device, dtype=torch.float64)
    bank = torch.randn(300, 16, device=device, dtype=torch.float64)
    lx = torch.randint(0, 6, (40,), device=device)
    lb = torch.randint(0, 6, (300,), device=device)
    res = ops.mine(x, lx, bank, lb, _params(unit64), 3)
    S = ops.scores(x, bank, *_params(unit64))
    best = torch.where(lx[:, None] == lb[None, :], S, float("inf")).min(1).values
    assert _close(res.hardest_positive_score, best, 1e-9), "float64 hardest positives differ"
    ops.mine(x, lx, None, None, _params(unit64), -1)
    _sync(device)
    print("case mine_float64 ok", flush=True)

    # (3) float32 mining: Euclidean batch_hard, mine_hard with k = 2 under TF32
    x = F.normalize(torch.randn(50, 24, device=device), dim=1)
    labels = torch.arange(50, device=device) // 4
    a, p, n = pddm_ext.batch_hard(x, labels)
    want = reference.batch_hard(x.double(), labels)
    assert torch.equal(a.cpu(), want[0].cpu()), "batch_hard anchors differ"
    torch.set_float32_matmul_precision("medium")
    pddm_ext.mine_hard(x, labels, pddm_ext.PDDM(24, 16, 16).to(device), k=2)
    torch.set_float32_matmul_precision("highest")
    _sync(device)
    print("case mine_float32 ok", flush=True)


def profile(device, m, dim):
    torch.manual_seed(0)
    unit = pddm_ext.PDDM(dim, dim, dim).to(device)
    x = F.normalize(torch.randn(m, dim, device=device), dim=1)
    params = _params(unit)
    with torch.no_grad():
        for precision in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(precision)
            pddm_ext.pddm_scores(x, None, *params)
            _sync(device)
            print(f"profiled scores m={m} under {precision}", flush=True)
    torch.set_float32_matmul_precision("highest")


def _first_index(values, target):
    """Per row, the smallest column index whose value equals the row's target exactly (-1 if none)."""
    hit = values == target[:, None]
    idx = torch.arange(values.shape[1], device=values.device).expand_as(values)
    return torch.where(hit, idx, values.shape[1]).min(1).values


def lock(device, m, n, dim, repeats):
    torch.manual_seed(0)
    unit = pddm_ext.PDDM(dim, dim, dim).to(device)
    x = F.normalize(torch.randn(m, dim, device=device), dim=1)
    bank_labels = torch.arange(n, device=device) // 64
    labels = torch.randint(0, max(n // 64, 1), (m,), device=device)
    banks = {"random": F.normalize(torch.randn(n, dim, device=device), dim=1),
             "ties": F.normalize(torch.randn(16, dim, device=device), dim=1).repeat((n + 15) // 16, 1)[:n]}
    same = labels[:, None] == bank_labels[None, :]
    results = []
    for bank_name, bank in banks.items():
        for dtype in (torch.float64, torch.float32):
            u = copy.deepcopy(unit).to(dtype)
            xs, ys, params = x.to(dtype), bank.to(dtype), _params(u)
            tol = 1e-9 if dtype == torch.float64 else 1e-4
            times = []
            for call in range(repeats + 1):  # the first call is the warm-up
                _sync(device)
                t0 = time.perf_counter()
                res = ops.mine(xs, labels, ys, bank_labels, params, 1)
                _sync(device)
                if call:
                    times.append(time.perf_counter() - t0)
            S = ops.scores(xs, ys, *params)
            pos_S = torch.where(same, S, float("inf"))
            neg_S = torch.where(same, -float("inf"), S)
            checks = {}
            for slot, idx, score, values, best in (
                    ("positives", res.hardest_positive, res.hardest_positive_score, pos_S, pos_S.min(1).values),
                    ("negatives", res.hardest_negative, res.hardest_negative_score, neg_S, neg_S.max(1).values),
                    ("bank columns", res.hardest_negative_of_ref, res.hardest_negative_of_ref_score, neg_S.t(),
                     neg_S.max(0).values)):
                has = torch.isfinite(best)
                rows = torch.arange(values.shape[0], device=values.device)
                got = values[rows, idx.clamp_min(0)]
                bound = tol * (1 + best.abs())
                optimal = has & (idx >= 0) & ((got - best).abs() <= bound)
                consistent = has & (idx >= 0) & ((score.to(values.dtype) - got).abs() <= bound)
                ties = has & ((values == best[:, None]).sum(1) > 1)
                first = _first_index(values, best)
                checks[slot] = {"slots": int(has.sum()), "optimal": int(optimal.sum()), "consistent": int(consistent.sum()),
                                "missing": int((has & (idx < 0)).sum()), "exact_ties": int(ties.sum()),
                                "ties_to_smallest_index": int((ties & (idx == first)).sum())}
            del S, pos_S, neg_S
            ok = all(c["optimal"] == c["slots"] == c["consistent"] and not c["missing"] for c in checks.values())
            results.append({"bank": bank_name, "dtype": str(dtype).replace("torch.", ""), "m": m, "n": n, "dim": dim,
                            "time_s": statistics.median(times), "times_s": times, "correct": ok, "checks": checks})
            print(f"lock case: {bank_name} bank, {results[-1]['dtype']}: {1e3 * results[-1]['time_s']:.2f} ms, "
                  f"{'correct' if ok else 'WRONG'}", file=sys.stderr, flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("sanitize", "profile", "lock"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--m", type=int)
    ap.add_argument("--n", type=int, default=131_072)
    ap.add_argument("--dim", type=int)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.what == "sanitize":
        sanitize(args.device)
    elif args.what == "profile":
        profile(args.device, args.m or 4096, args.dim or 128)
    else:
        result = lock(args.device, args.m or 256, args.n, args.dim or 64, args.repeats)
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
