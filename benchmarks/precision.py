"""The error of the fused ops under each float32 matmul precision and for half inputs
(docs/design.md#precision).

For torch.set_float32_matmul_precision("highest" / "high" / "medium") on float32 inputs, and for
float16 and bfloat16 inputs (rows "float16" / "bfloat16": the embeddings rounded to that dtype, the
unit's parameters float32; their tile products, the backward's included, run in that dtype where the
backend has tensor cores for it), this measures, against the float64 reference
(pddm_ext.reference) on the same inputs (the half values) and parameters:

  scores     max |S - S_ref| / max |S_ref| and the median of |S - S_ref| / max |S_ref|
             (batch mode, and reference mode against a bank);
  gradients  the elements of dL/dx and of each parameter gradient (L = sum(S * G), G random), each
             relative to the largest reference value of its gradient, pooled: the max and the 99th
             percentile (a ReLU unit whose pre-activation is within the rounding error of 0 switches,
             and moves the gradient by a whole term: the max shows those, the percentile the rest);
  sensitivity  the same pooled gradient error of the float64 reference itself after perturbing its
             inputs and parameters by a random relative u (PERTURBATION: the precision's operand
             rounding): how much of the gradient error any arithmetic of that precision would show;
  mining     batch_hard's hardest positive and negative per anchor: the fraction of slots whose index
             differs from the float64 reference's choice, and the largest reference-score gap
             (best - chosen) / max |S_ref| among them: a differing slot with a gap at rounding level is
             a near-tie decided by the rounding, not a wrong choice.

Run it on a GPU (`make gpu-check` runs it) or on the CUDA emulation build (`make precision-emulated`),
whose tensor-core model rounds operands as the hardware does; on the CPU kernels every precision
computes FP32.
Writes a Markdown table to stdout and, with --out DIR, precision.json and precision.md there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())  # an in-place build in the working directory comes first

import pddm_ext  # noqa: E402
from pddm_ext import reference  # noqa: E402

PRECISIONS = ("highest", "high", "medium")
# Half-input rows: the embeddings' dtype (the float32 matmul precision stays "highest").
HALF_ROWS = {"float16": torch.float16, "bfloat16": torch.bfloat16}
ROWS = PRECISIONS + tuple(HALF_ROWS)
# Relative rounding of the tile products' operands per row, for the sensitivity column: FP32's
# unit roundoff; 3xTF32's effective one (hi + lo keeps ~21 bits; its measured score error is a few
# times FP32's); TF32's and float16's 10 explicit mantissa bits; bfloat16's 7.
PERTURBATION = {"highest": 2.0**-24, "high": 2.0**-22, "medium": 2.0**-11, "float16": 2.0**-11,
                "bfloat16": 2.0**-8}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, or cpu (default: cuda when available, else cpu)")
    ap.add_argument("--m", type=int, default=96, help="batch rows (default 96)")
    ap.add_argument("--n", type=int, default=80, help="bank rows of reference mode (default 80)")
    ap.add_argument("--dim", type=int, default=128, help="d = h = c (default 128)")
    ap.add_argument("--classes", type=int, default=8, help="labels for mining (default 8)")
    ap.add_argument("--seeds", type=int, default=3, help="independent draws, errors are the worst (default 3)")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                    help="which rows to measure (default: all)")
    ap.add_argument("--out", default=None, help="folder for precision.json and precision.md")
    ap.add_argument("--command", default=None, help="the command to record in precision.md (default: this script's)")
    return ap.parse_args(argv)


def rel(a, b):
    """(max, median) of |a - b| / max |b|."""
    diff = (a.double() - b.double()).abs() / b.double().abs().max().clamp_min(1e-300)
    return diff.max().item(), diff.median().item()


def backend(device):
    if getattr(pddm_ext._C, "cuda_emulation", False):
        return "CUDA emulation (tensor-core model of csrc/emulation/cuda_emu.h)"
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return "CPU kernels (FP32 under every precision)"


def measure(args, device, row, seed):
    """The errors of one row (a float32 matmul precision, or a half dtype of the inputs) for one seed."""
    torch.manual_seed(seed)
    d = args.dim
    unit = pddm_ext.PDDM(d, d, d).to(device)
    params = [getattr(unit, name).detach() for name in reference.PARAM_NAMES]
    params64 = [p.double() for p in params]
    x = torch.nn.functional.normalize(torch.randn(args.m, d, device=device), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(args.n, d, device=device), dim=1)
    labels = torch.randint(0, args.classes, (args.m,), device=device)
    if row in HALF_ROWS:  # the same draws, rounded to the half dtype: the reference sees those values
        x, bank = x.to(HALF_ROWS[row]), bank.to(HALF_ROWS[row])
    precision = row if row in PRECISIONS else "highest"
    out = {}
    with torch.no_grad():
        ref_batch = reference.pddm_scores(x.double(), None, params64)
        ref_bank = reference.pddm_scores(x.double(), bank.double(), params64)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with torch.no_grad():
            out["scores_batch"] = rel(pddm_ext.pddm_scores(x, None, *params), ref_batch)
            out["scores_bank"] = rel(pddm_ext.pddm_scores(x, bank, *params), ref_bank)
            a, pos, neg = pddm_ext.batch_hard(x, labels, unit)
        xg = x.clone().requires_grad_()
        pg = [p.clone().requires_grad_() for p in params]
        G = torch.randn(args.m, args.m, device=device)
        got = torch.autograd.grad((pddm_ext.pddm_scores(xg, None, *pg) * G).sum(), [xg] + pg)
    finally:
        torch.set_float32_matmul_precision(previous)
    x64 = x.double().requires_grad_()
    p64 = [p.clone().requires_grad_() for p in params64]
    want = torch.autograd.grad((reference.pddm_scores(x64, None, p64) * G.double()).sum(), [x64] + p64)
    # every gradient's elements relative to that gradient's largest reference value, pooled
    pooled = torch.cat([((g.double() - w).abs() / w.abs().max().clamp_min(1e-300)).flatten()
                        for g, w in zip(got, want)])
    out["gradients"] = (pooled.max().item(), torch.quantile(pooled, 0.99).item())
    # The gradient's own sensitivity: the float64 gradients after a random relative perturbation of
    # inputs and parameters by the precision's operand rounding (unit roundoff u of PERTURBATION).
    u = PERTURBATION[row]
    gen = torch.Generator(device="cpu").manual_seed(1000 + seed)
    noise = lambda t: t * (1 + u * torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device))  # noqa: E731
    x64p = noise(x.double()).requires_grad_()
    p64p = [noise(p).requires_grad_() for p in params64]
    moved = torch.autograd.grad((reference.pddm_scores(x64p, None, p64p) * G.double()).sum(), [x64p] + p64p)
    pooled = torch.cat([((g - w).abs() / w.abs().max().clamp_min(1e-300)).flatten() for g, w in zip(moved, want)])
    out["sensitivity"] = (pooled.max().item(), torch.quantile(pooled, 0.99).item())
    # mining against the float64 reference's choices
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(args.m, dtype=torch.bool, device=device)
    R = ref_batch
    scale = R.abs().max().item()
    differ, gaps, slots = 0, [0.0], 0
    for i, j, k in zip(a.tolist(), pos.tolist(), neg.tolist()):
        positives, negatives = (same[i] & ~eye[i]), ~same[i]
        best_j = torch.where(positives, R[i], torch.full_like(R[i], float("inf"))).argmin().item()
        best_k = torch.where(negatives, R[i], torch.full_like(R[i], float("-inf"))).argmax().item()
        slots += 2
        if j != best_j:
            differ += 1
            gaps.append((R[i, j] - R[i, best_j]).item() / scale)
        if k != best_k:
            differ += 1
            gaps.append((R[i, best_k] - R[i, k]).item() / scale)
    out["mining"] = (differ / max(slots, 1), max(gaps))
    return out


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and pddm_ext._C.with_cuda else "cpu"))
    rows = {}
    for row in (r for r in ROWS if r in args.rows):
        worst = {}
        for seed in range(args.seeds):
            for key, value in measure(args, device, row, seed).items():
                worst[key] = tuple(max(a, b) for a, b in zip(worst.get(key, value), value))
        rows[row] = worst
    lines = [
        f"Backend: {backend(device)}; torch {torch.__version__}; float32 inputs (rows float16 / bfloat16: "
        f"inputs of that dtype, under \"highest\"), d = h = c = {args.dim}, "
        f"m = {args.m}, bank n = {args.n}, {args.classes} classes, worst of {args.seeds} seeds.",
        "Errors relative to max |reference| (float64): max (median); gradients: max (99th percentile).",
        "",
        "| precision or input dtype | scores, batch | scores, bank | gradients | float64 gradients perturbed by u | batch_hard slots off the float64 choice | largest score gap of those |",
        "|---|---|---|---|---|---|---|",
    ]
    for precision, r in rows.items():
        lines.append(
            f"| {precision} | {r['scores_batch'][0]:.1e} ({r['scores_batch'][1]:.1e}) "
            f"| {r['scores_bank'][0]:.1e} ({r['scores_bank'][1]:.1e}) "
            f"| {r['gradients'][0]:.1e} ({r['gradients'][1]:.1e}) "
            f"| {r['sensitivity'][0]:.1e} ({r['sensitivity'][1]:.1e}), u = 2^{int(math.log2(PERTURBATION[precision]))} "
            f"| {100 * r['mining'][0]:.1f}% | {r['mining'][1]:.1e} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "precision.md"), "w") as f:
            command = args.command or "python benchmarks/precision.py " + " ".join(argv if argv is not None else sys.argv[1:])
            f.write(f"Command: `{command}`\n\n" + text)
        with open(os.path.join(args.out, "precision.json"), "w") as f:
            json.dump({"backend": backend(device), "torch": torch.__version__, "args": vars(args), "rows": rows,
                       "markdown": text}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
