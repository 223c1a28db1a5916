"""What the suite times: workloads x variants, their inputs, useful FLOPs and predicted memory.

A *configuration* is one (workload, variant, m, n, d, h, c, dtype, device). Each is measured in a
fresh process (``benchmarks.measure``); this module only describes and builds them, so the
parent process never imports torch for planning.

Workloads (d = h = c unless stated):

- ``scores_fwd``      all-pairs scores of x (m, d) against itself, no autograd: S = unit(x).
- ``scores_fwd_bwd``  unit(x).sum().backward() with x and every parameter requiring grad
                      (its cost against the forward is a target); the forward and backward phases are also timed apart.
- ``scores_bwd_positives``  (unit(x) * same_class).sum().backward(): a loss that reaches only the
                      same-class pairs (the positive term of a contrastive loss, 0.2% of the pairs
                      at K = 4), to time the backward on a sparse dS; phases timed apart as above.
- ``mine_k1``         mine_hard(x, labels, unit, k=1): the paper's single hardest quadruplet.
- ``mine_k64``        mine_hard(..., k=64).
- ``batch_hard``      batch_hard(x, labels) with the Euclidean metric (vs pytorch-metric-learning's
                      BatchHardMiner, the miner users run today).
- ``bank_mine``       mine_hard in reference mode: 256 queries against a 65,536-row memory bank.
- ``bank_fwd_bwd``    unit(x, bank).sum().backward() for 64 queries (requiring grad) against the
                      65,536-row bank (not trained), parameters requiring grad: the backward's
                      memory in reference mode; phases timed apart.

Variants: ``fused`` (pddm_ext), ``reference`` (pddm_ext.reference, eager), ``compiled``
(torch.compile of the reference; compile time reported apart), ``pml`` (BatchHardMiner).
Labels are P x K batches with K = 4 samples per class (the bank has 64 rows per class).
"""

from __future__ import annotations

import dataclasses

WORKLOADS = (
    "scores_fwd", "scores_fwd_bwd", "scores_bwd_positives", "mine_k1", "mine_k64", "batch_hard", "bank_mine",
    "bank_fwd_bwd",
)
VARIANTS = ("fused", "reference", "compiled", "pml")

# Which variants make sense for which workload.
WORKLOAD_VARIANTS = {
    "scores_fwd": ("fused", "reference", "compiled"),
    "scores_fwd_bwd": ("fused", "reference", "compiled"),
    "scores_bwd_positives": ("fused", "reference", "compiled"),
    "mine_k1": ("fused", "reference", "compiled"),
    "mine_k64": ("fused", "reference", "compiled"),
    "batch_hard": ("fused", "reference", "compiled", "pml"),
    "bank_mine": ("fused", "reference", "compiled"),
    "bank_fwd_bwd": ("fused", "reference", "compiled"),
}
BANK_WORKLOADS = ("bank_mine", "bank_fwd_bwd")
BACKWARD_WORKLOADS = ("scores_fwd_bwd", "scores_bwd_positives", "bank_fwd_bwd")  # forward + backward of a loss on S

METRIC = {w: ("euclidean" if w == "batch_hard" else "pddm") for w in WORKLOADS}
SAMPLES_PER_CLASS = 4
BANK_ROWS, BANK_QUERIES, BANK_ROWS_PER_CLASS = 65_536, 256, 64
BANK_GRAD_QUERIES = 64
ELEMENT_SIZE = {"float32": 4, "float64": 8}


@dataclasses.dataclass(frozen=True)
class Config:
    workload: str
    variant: str
    m: int  # queries (rows of x)
    n: int  # references (= m in batch mode)
    d: int
    h: int
    c: int
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def batch_mode(self):
        return self.workload not in BANK_WORKLOADS

    @property
    def k(self):
        return {"mine_k1": 1, "mine_k64": 64, "bank_mine": 1}.get(self.workload)

    def to_dict(self):
        return dataclasses.asdict(self)

    def label(self):
        return f"{self.workload}/{self.variant} m={self.m} n={self.n} d={self.d} h={self.h} c={self.c}"


def make_config(workload, variant, m, d, *, dtype="float32", device="cpu"):
    """A configuration with h = c = d; the bank workload fixes m and n."""
    if workload == "bank_mine":
        m, n = BANK_QUERIES, BANK_ROWS
    elif workload == "bank_fwd_bwd":
        m, n = BANK_GRAD_QUERIES, BANK_ROWS
    else:
        n = m
    return Config(workload, variant, m, n, d, d, d, dtype, device)


# --- useful FLOPs (the roofline numerator) -----------------------------------------------------


def pairs_scored(cfg):
    """Pairs a fused kernel must score: one triangle (with the diagonal) in batch mode."""
    return cfg.m * (cfg.m + 1) // 2 if cfg.batch_mode else cfg.m * cfg.n


def useful_flops(cfg):
    """FLOPs a perfect kernel cannot avoid.

    PDDM: 2(h d + 2 h c) per pair (the W_u |a - b| product and the W_c layer; the mean branch is
    O(h) per pair thanks to the per-row projections). Forward+backward counts 3x the forward
    (the backward is two GEMMs per forward GEMM); with the same-class loss only the pairs that
    carry a gradient (one triangle of each class block) count twice more. Euclidean: 2d per pair.
    """
    if METRIC[cfg.workload] == "euclidean":
        return pairs_scored(cfg) * 2 * cfg.d
    per_pair = 2 * (cfg.h * cfg.d + 2 * cfg.h * cfg.c)
    flops = pairs_scored(cfg) * per_pair
    if cfg.workload == "scores_bwd_positives":
        with_gradient = cfg.m * (SAMPLES_PER_CLASS + 1) // 2
        return flops + 2 * with_gradient * per_pair
    return 3 * flops if cfg.workload in BACKWARD_WORKLOADS else flops


# --- predicted extra peak memory (to skip what cannot fit) -------------------------------------

# Extra bytes per (query, reference) pair of the variants that materialise all pairs, in elements
# per unit of width ("width" = d + h + c for PDDM workloads, d for Euclidean), plus 8 elements per
# pair for the (m, n) score matrix and masks. Calibrated from the extra peak RSS measured at
# m = 256 and 512, d = h = c = 128, float32 (e.g. reference mine_k1 m=512: 1.26 GB), rounded up.
_PAIR_ELEMENTS_PER_WIDTH = {
    ("reference", "forward"): 3.6,
    ("reference", "mine"): 3.6,
    ("reference", "fwd_bwd"): 5.2,
    ("compiled", "forward"): 1.5,
    ("compiled", "mine"): 1.5,
    ("compiled", "fwd_bwd"): 2.6,
    ("reference", "euclidean"): 2.2,
    ("compiled", "euclidean"): 0.0,  # Inductor fuses the (m, n, d) difference away
}
_FIXED_SLACK = 64 * 2**20  # allocator slack, thread pools, tiles


def _kind(cfg):
    if cfg.workload == "batch_hard":
        return "euclidean"
    if cfg.workload == "scores_fwd":
        return "forward"
    if cfg.workload in BACKWARD_WORKLOADS:
        return "fwd_bwd"
    return "mine"


def predicted_bytes(cfg):
    """A deliberately rough upper estimate of a configuration's extra peak memory."""
    es = ELEMENT_SIZE[cfg.dtype]
    pairs = cfg.m * cfg.n
    kind = _kind(cfg)
    if cfg.variant == "fused":
        # Only outputs and O(m + n) per-row state: the score matrix for scores, its gradient (and
        # the loss's mask) too.
        per_pair = {"forward": 1, "fwd_bwd": 4}.get(kind, 0)
        return pairs * per_pair * es + (cfg.m + cfg.n) * 64 + _FIXED_SLACK
    if cfg.variant == "pml":
        # A dense distance matrix plus (m, n) masks and masked copies (measured 7-9 elements/pair
        # at N = 4096 and 8192).
        return pairs * 10 * es + _FIXED_SLACK
    width = cfg.d if kind == "euclidean" else cfg.d + cfg.h + cfg.c
    return int(pairs * (width * _PAIR_ELEMENTS_PER_WIDTH[(cfg.variant, kind)] + 8) * es) + _FIXED_SLACK


# --- building the timed step (runs in the child process) ---------------------------------------


def make_inputs(cfg):
    """Seeded inputs: L2-normalised embeddings, P x K labels, a PDDM unit with default init."""
    import torch
    import torch.nn.functional as F

    import pddm_ext

    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = F.normalize(torch.randn(cfg.m, cfg.d, generator=gen, dtype=torch.float64), dim=1)
    inputs = {"x": x.to(device=cfg.device, dtype=dtype)}
    if cfg.batch_mode:
        inputs["labels"] = (torch.arange(cfg.m) // SAMPLES_PER_CLASS).to(cfg.device)
    else:
        classes = cfg.n // BANK_ROWS_PER_CLASS
        y = F.normalize(torch.randn(cfg.n, cfg.d, generator=gen, dtype=torch.float64), dim=1)
        inputs["y"] = y.to(device=cfg.device, dtype=dtype)
        inputs["y_labels"] = (torch.arange(cfg.n) // BANK_ROWS_PER_CLASS).to(cfg.device)
        inputs["labels"] = torch.randint(0, classes, (cfg.m,), generator=gen).to(cfg.device)
    if METRIC[cfg.workload] == "pddm":
        inputs["unit"] = pddm_ext.PDDM(cfg.d, cfg.h, cfg.c).to(device=cfg.device, dtype=dtype)
    return inputs


def build_step(cfg, inputs, sync):
    """Returns ``step()``: one timed call, which drops its result and may return phase times.

    ``sync()`` waits for the device (a no-op on CPU). The first call of a ``compiled`` step
    compiles; the caller times it apart.
    """
    import time

    import torch

    import pddm_ext
    from pddm_ext import reference as R

    x, labels, unit = inputs["x"], inputs["labels"], inputs.get("unit")
    w, v = cfg.workload, cfg.variant

    def maybe_compile(fn):
        return torch.compile(fn) if v == "compiled" else fn

    if w == "scores_fwd":
        fn = (lambda: unit(x)) if v == "fused" else _bind(maybe_compile(R.pddm_scores), x, None, unit)

        def step():
            with torch.no_grad():
                fn()

        return step

    if w in BACKWARD_WORKLOADS:
        x.requires_grad_(True)
        y = inputs.get("y")  # the bank (not trained) in reference mode
        if w == "scores_bwd_positives":
            same_class = (labels[:, None] == labels[None, :]).to(x.dtype)
            loss = lambda S: (S * same_class).sum()  # noqa: E731
        else:
            loss = lambda S: S.sum()  # noqa: E731
        if v == "fused":
            forward = lambda: loss(unit(x, y))  # noqa: E731
        else:
            forward = maybe_compile(lambda: loss(R.pddm_scores(x, y, unit)))

        def step():
            t0 = time.perf_counter()
            total = forward()
            sync()
            t1 = time.perf_counter()
            total.backward()
            sync()
            t2 = time.perf_counter()
            x.grad = None
            unit.zero_grad(set_to_none=True)
            return {"forward": t1 - t0, "backward": t2 - t1}

        return step

    if w in ("mine_k1", "mine_k64", "bank_mine"):
        mine = pddm_ext.mine_hard if v == "fused" else maybe_compile(R.mine_hard)
        ref = {} if cfg.batch_mode else {"ref_emb": inputs["y"], "ref_labels": inputs["y_labels"]}

        def step():
            with torch.no_grad():
                mine(x, labels, unit, k=cfg.k, **ref)

        return step

    if w == "batch_hard":
        if v == "pml":
            from pytorch_metric_learning.miners import BatchHardMiner

            miner = BatchHardMiner()
            fn = lambda: miner(x, labels)  # noqa: E731
        elif v == "fused":
            fn = lambda: pddm_ext.batch_hard(x, labels)  # noqa: E731
        else:
            fn = _bind(maybe_compile(R.batch_hard), x, labels)

        def step():
            with torch.no_grad():
                fn()

        return step

    raise ValueError(f"unknown workload {w!r}")


def _bind(fn, *args):
    return lambda: fn(*args)
