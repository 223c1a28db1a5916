"""The functional API: PDDM scores, pair scores and hard mining (SPEC §1-§3).

For a pair of feature vectors a, b in R^d the PDDM unit scores

    u  = |a - b|                  v  = (a + b) / 2
    u' = relu(W_u normalize(u) + b_u)
    v' = relu(W_v normalize(v) + b_v)
    q  = relu(W_c [normalize(u'); normalize(v')] + b_c)
    S(a, b) = w_s . q + b_s                      (higher = more similar)

with normalize(z) = z / max(||z||, 1e-12): the input-normalised form. The distance-aware form
(``normalize_inputs=False``, SPEC §1 "Two forms") uses u' = relu(W_u u + b_u) and
v' = relu(W_v v + b_v) instead, so that S sees how far apart a and b are. Mining uses S (metric="pddm") or
S(a, b) = -||a - b||^2 (metric="euclidean"): hard positives have low S, hard negatives high S.
"""

from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F

from . import _validate as V
from . import ops

_QuadrupletsBase = namedtuple(
    "Quadruplets", ["anchor", "positive", "anchor_negative", "positive_negative", "scores"]
)


class Quadruplets(_QuadrupletsBase):
    """Hard quadruplets ``(i, r, k, l)`` mined by :func:`mine_hard`.

    Fields (int64, shape (q,)): ``anchor`` i, ``positive`` r (a positive pair of anchor i),
    ``anchor_negative`` k = hardest_negative[i], ``positive_negative`` l = hardest_negative_of_ref[r];
    ``scores`` (q, 3) holds S(i, r), S(i, k), S(l, r), detached. ``batch_mode`` tells whether r and
    l index the embeddings themselves (batch mode) or ``ref_emb`` (reference mode).
    """

    def __new__(cls, anchor, positive, anchor_negative, positive_negative, scores, *, batch_mode=True):
        self = super().__new__(cls, anchor, positive, anchor_negative, positive_negative, scores)
        self.batch_mode = batch_mode
        return self

    def __getnewargs_ex__(self):  # keep batch_mode through pickling/copying
        return tuple(self), {"batch_mode": self.batch_mode}

    def as_triplets(self):
        """``(a, p, n)`` index tensors in the pytorch-metric-learning convention.

        Batch mode: 2q triplets, ``(i, r, k)`` then ``(r, i, l)``. Reference mode: the q triplets
        ``(i, r, k)``, anchors indexing the embeddings, positives and negatives ``ref_emb``.
        """
        i, r, k, l_ = self.anchor, self.positive, self.anchor_negative, self.positive_negative
        if not self.batch_mode:
            return i, r, k
        return torch.cat([i, r]), torch.cat([r, i]), torch.cat([k, l_])


def _prepare_pair_inputs(x, y, params):
    """Validates (x, y, params) for scoring and casts them to the compute dtype."""
    V.check_embeddings("x", x)
    d = x.shape[1]
    if y is not None:
        V.check_embeddings("y", y, d=d, d_from="x")
        V.check_same_device([("x", x), ("y", y)])
    V.check_params(params, d, x.device)
    dtype = V.compute_dtype(x, y)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731  (autograd flows through .to)
    return cast(x), cast(y), tuple(cast(p) for p in params)


def pddm_scores(x, y, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, *, normalize_inputs=True):
    """All-pairs PDDM scores ``S[i, r] = S(x_i, y_r)``: an (m, n) tensor; ``y=None`` gives (m, m).

    Fused: never builds the (m, n, d) pair tensor. Differentiable in x, y and every parameter
    (fused backward). Half inputs are computed in float32; the result has the compute dtype.
    ``normalize_inputs`` (bool, else ``TypeError``) selects the form of SPEC §1.
    """
    normalize_inputs = V.check_bool("normalize_inputs", normalize_inputs)
    x, y, params = _prepare_pair_inputs(x, y, (W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s))
    return ops.scores(x, y, *params, normalize_inputs)


def pair_scores(a, b, params, *, normalize_inputs=True):
    """Scores ``S(a[t], b[t])`` of row-aligned pairs: (p, d), (p, d) -> (p,). Differentiable.

    Written as the kernels compute it: W_u normalize(u) = (W_u u) / max(||u||, eps) and
    W_v normalize(v) = W_v (a + b) / (2 max(||v||, eps)), from a + b itself (W_v a + W_v b would
    cancel for b ~ -a). ``normalize_inputs=False``: the distance-aware form (scales 1 and 1/2).
    """
    normalize_inputs = V.check_bool("normalize_inputs", normalize_inputs)
    _check_pair_inputs(a, b, params)
    return _pair_scores(a, b, params, normalize_inputs)


def _check_pair_inputs(a, b, params):
    """The checks of pair_scores (SPEC §6)."""
    V.check_embeddings("a", a)
    V.check_embeddings("b", b, d=a.shape[1], d_from="a")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of rows (row-aligned pairs), got {a.shape[0]} and {b.shape[0]}")
    V.check_same_device([("a", a), ("b", b)])
    V.check_params(params, a.shape[1], a.device)


def _pair_scores(a, b, params, normalize_inputs=True, dropout=0.0):
    """pair_scores without validation, for inputs already checked (the losses); accepts p = 0.
    ``dropout > 0``: inverted dropout on q, one mask per pair (PDDM's training mode)."""
    dtype = V.compute_dtype(a, b)
    a, b = a.to(dtype), b.to(dtype)
    W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s = (p.to(dtype) for p in params)
    eps = 1e-12
    u, s = (a - b).abs(), a + b
    if normalize_inputs:
        u_scale = 1 / u.norm(dim=1, keepdim=True).clamp_min(eps)
        v_scale = 1 / (2 * (s / 2).norm(dim=1, keepdim=True).clamp_min(eps))
    else:
        u_scale, v_scale = 1.0, 0.5
    u1 = torch.relu((u @ W_u.T) * u_scale + b_u)
    v1 = torch.relu((s @ W_v.T) * v_scale + b_v)
    joint = torch.cat([F.normalize(u1, dim=1, eps=eps), F.normalize(v1, dim=1, eps=eps)], dim=1)
    q = torch.relu(joint @ W_c.T + b_c)
    if dropout > 0:
        q = F.dropout(q, dropout, training=True)
    return q @ w_s + b_s


def _prepare_mining(embeddings, labels, unit, ref_emb, ref_labels, metric, normalize_inputs):
    """Validates mining inputs; returns (x, lx, y, ly, params or None, normalize_inputs) detached, in
    compute dtype."""
    metric = V.resolve_metric(metric, unit)
    normalize_inputs = V.unit_form(unit, normalize_inputs) if metric == "pddm" else True
    params = V.unit_params(unit) if metric == "pddm" else None
    V.check_embeddings("embeddings", embeddings)
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together (reference mode) or not at all")
    d, device = embeddings.shape[1], embeddings.device
    if ref_emb is not None:
        V.check_embeddings("ref_emb", ref_emb, d=d, d_from="embeddings")
        V.check_same_device([("embeddings", embeddings), ("ref_emb", ref_emb)])
    lx = V.check_labels("labels", labels, embeddings.shape[0], device)
    ly = None if ref_emb is None else V.check_labels("ref_labels", ref_labels, ref_emb.shape[0], device)
    if params is not None:
        V.check_params(params, d, device)
    dtype = V.compute_dtype(embeddings, ref_emb)
    x = embeddings.detach().to(dtype)
    y = None if ref_emb is None else ref_emb.detach().to(dtype)
    if params is not None:
        params = tuple(p.detach().to(dtype) for p in params)
    return x, lx, y, ly, params, normalize_inputs


def mine_hard(embeddings, labels, unit=None, *, k=1, ref_emb=None, ref_labels=None, metric=None,
              normalize_inputs=None):
    """Hard quadruplets (SPEC §3), fused: the (m, n) score matrix is never built.

    1. Order all positive pairs (i, r) by S(x_i, y_r) ascending, ties by (i, r) ascending
       (batch mode: unordered pairs, i < r).
    2. Keep the first ``k`` (``k=None`` keeps all; ``k=1`` is the paper's single hardest pair).
    3. Emit ``(i, r, hardest_negative[i], hardest_negative_of_ref[r])`` per kept pair, skipping pairs
       where either negative does not exist, with
       hardest_negative[i] = argmax_{r: label differs} S(x_i, y_r) and
       hardest_negative_of_ref[r] = argmax_{i: label differs} S(x_i, y_r).

    Batch mode (``ref_emb=None``) pairs the embeddings with themselves (never a row with itself);
    reference mode pairs every query with every row of ``ref_emb`` (e.g. a memory bank).
    ``metric`` defaults to "pddm" when ``unit`` is given, else "euclidean" (S = -||a - b||^2).
    ``normalize_inputs`` (bool or None): the form of SPEC §1 for metric="pddm"; None takes the
    unit's own (``PDDM.normalize_inputs``; True for a parameter tuple).
    Ties go to the smallest index. Returns :class:`Quadruplets`; not differentiable.
    """
    k = V.check_k(k)
    x, lx, y, ly, params, form = _prepare_mining(embeddings, labels, unit, ref_emb, ref_labels, metric,
                                                 normalize_inputs)
    with torch.no_grad():
        _, _, neg, neg_s, neg_ref, neg_ref_s, pair_i, pair_r, pair_s = ops.mine(
            x, lx, y, ly, params, -1 if k is None else k, form
        )
        keep = (neg[pair_i] >= 0) & (neg_ref[pair_r] >= 0)
        i, r, s = pair_i[keep], pair_r[keep], pair_s[keep]
        a_neg, p_neg = neg[i], neg_ref[r]
        scores = torch.stack([s, neg_s[i], neg_ref_s[r]], dim=1)
    return Quadruplets(i, r, a_neg, p_neg, scores, batch_mode=ref_emb is None)


def batch_hard(embeddings, labels, unit=None, *, ref_emb=None, ref_labels=None, metric=None,
               normalize_inputs=None):
    """Per-query hardest triplets ``(a, p, n)`` (SPEC §3), fused.

    One triplet ``(i, hardest_positive[i], hardest_negative[i])`` per query i that has both, with
    hardest_positive[i] = argmin_{r: positive pair (i, r)} S(x_i, y_r) and
    hardest_negative[i] = argmax_{r: label differs} S(x_i, y_r). With metric="euclidean" on
    L2-normalised embeddings this is pytorch-metric-learning's BatchHardMiner rule.
    ``normalize_inputs``: as in :func:`mine_hard`.
    """
    x, lx, y, ly, params, form = _prepare_mining(embeddings, labels, unit, ref_emb, ref_labels, metric,
                                                 normalize_inputs)
    with torch.no_grad():
        pos, _, neg, *_ = ops.mine(x, lx, y, ly, params, 0, form)
        a = ((pos >= 0) & (neg >= 0)).nonzero().flatten()
    return a, pos[a], neg[a]
