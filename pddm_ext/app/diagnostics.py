"""Per-epoch health of the PDDM unit: does it score pairs, or has it collapsed?

For a set of embeddings (L2-normalised, as the loss sees them) and their labels, over every pair
i < j (or a seeded sample of rows when there are more than ``max_rows``):

- ``spread``: the standard deviation of the unit's scores S over the pairs;
- ``auc_S``: ROC AUC of S for telling same-class pairs from different-class pairs
  (``sklearn.metrics.roc_auc_score``; 0.5 = chance);
- ``auc_euclidean``: the same AUC for -||a - b||^2 of the same embeddings, the yardstick the unit has
  to match for PDDM mining to be better than Euclidean mining.

``pddm-ext train`` computes them after every epoch on held-out images of the training classes
(``heldout``) and on the unseen test classes (``unseen``), logs them in ``log.jsonl`` and prints them.

**Collapse.** Under its own hardest-pair mining the unit can settle at near-constant scores
(``benchmarks/results/compare/README.md``): the spread falls from about 0.01 at initialisation to
about 0.001 while the metric loss sits at 2 alpha. A unit that separates pairs by a margin alpha =
0.5 has a spread of the order of alpha (0.04-3 in ``benchmarks/results/learning/``).
``COLLAPSE_SPREAD = 0.005`` (alpha / 100 at the default alpha) lies below an untrained unit and
above a collapsed one: a held-out spread below it (the unseen classes' when nothing is held out)
makes ``pddm-ext train`` warn after the epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLLAPSE_SPREAD = 0.005
MAX_ROWS = 1000  # at most 1000 rows (about 500,000 pairs) per diagnostic
# and at most the work of MAX_ROWS rows for a d = h = c = 128 unit: a wider unit scores fewer rows
# (a d = h = c = 4096 unit would otherwise spend minutes of every epoch here)
FLOP_BUDGET = MAX_ROWS * (MAX_ROWS - 1) // 2 * 2 * (128 * 128 + 2 * 128 * 128)


def rows_within_budget(unit, max_rows=MAX_ROWS):
    """The number of rows whose pairs the unit scores within ``FLOP_BUDGET`` (2 (h d + 2 h c) FLOPs a
    pair: its W_u and W_c products), at most ``max_rows`` and at least 2."""
    h, d = unit.W_u.shape
    c = unit.W_c.shape[0]
    pairs = FLOP_BUDGET / (2 * (h * d + 2 * h * c))
    return max(2, min(max_rows, int((2 * pairs) ** 0.5) + 1))


def _sample_rows(n, max_rows, seed):
    if n <= max_rows:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values


@torch.no_grad()
def pair_diagnostics(embeddings, labels, unit, *, max_rows=MAX_ROWS, seed=0):
    """``{"spread", "auc_S", "auc_euclidean", "pairs"}`` of the unit's scores on the pairs of
    ``embeddings`` (n, d) float with ``labels`` (n,) int (normalised here, row-wise).

    Uses at most ``max_rows`` rows (a seeded random subset), fewer for a unit wider than
    d = h = c = 128 (:func:`rows_within_budget`), so the (rows, rows) score matrix and its cost stay
    small. An AUC is None when the pairs are all of one kind (one class, or one image per class).
    The unit is evaluated in eval mode (no dropout); its mode is restored.
    """
    from sklearn.metrics import roc_auc_score

    rows = _sample_rows(embeddings.shape[0], rows_within_budget(unit, max_rows), seed)
    param = next(unit.parameters())
    f = F.normalize(embeddings[rows].to(device=param.device, dtype=param.dtype), dim=1)
    y = torch.as_tensor(labels)[rows].to(f.device)
    was_training = unit.training
    unit.eval()
    try:
        S = unit(f)
    finally:
        unit.train(was_training)
    i, j = torch.triu_indices(len(f), len(f), 1, device=f.device)
    s = S[i, j].double().cpu()
    same = (y[i] == y[j]).cpu().numpy()
    d2 = ((f[i] - f[j]) ** 2).sum(1).double().cpu()
    both = 0 < same.sum() < len(same)
    return dict(spread=float(s.std()) if len(s) > 1 else 0.0,
                auc_S=float(roc_auc_score(same, s.numpy())) if both else None,
                auc_euclidean=float(roc_auc_score(same, (-d2).numpy())) if both else None,
                pairs=int(len(s)))


def collapsed(diag):
    """True when a diagnostic's spread is below ``COLLAPSE_SPREAD``."""
    return diag is not None and diag["spread"] < COLLAPSE_SPREAD


def format_diagnostics(diag):
    """One line: ``unit on held-out pairs: spread 0.123  AUC S 0.74 / -d^2 0.75; on unseen: ...``."""
    def one(d):
        auc = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        return f"spread {d['spread']:.4f}  AUC S {auc(d['auc_S'])} / -d^2 {auc(d['auc_euclidean'])}"
    parts = [f"{name} {one(diag[name])}" for name in ("heldout", "unseen") if diag.get(name)]
    line = "unit: " + "; ".join(parts)
    if diag.get("metric_loss") is not None:
        line += f"; metric loss {diag['metric_loss']:.4f}"
    return line
