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


def _sample_rows(n, max_rows, seed):
    if n <= max_rows:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values


@torch.no_grad()
def pair_diagnostics(embeddings, labels, unit, *, max_rows=MAX_ROWS, seed=0):
    """``{"spread", "auc_S", "auc_euclidean", "pairs"}`` of the unit's scores on the pairs of
    ``embeddings`` (n, d) float with ``labels`` (n,) int (normalised here, row-wise).

    Uses at most ``max_rows`` rows (a seeded random subset), so the (rows, rows) score matrix stays
    small. An AUC is None when the pairs are all of one kind (one class, or one image per class).
    The unit is evaluated in eval mode (no dropout); its mode is restored.
    """
    from sklearn.metrics import roc_auc_score

    rows = _sample_rows(embeddings.shape[0], max_rows, seed)
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
