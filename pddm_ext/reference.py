"""Plain PyTorch reference of every pddm_ext op (docs/design.md), and the one home of its formulas.

Everything here materialises all pairs and relies on ordinary autograd. It is the oracle
for the tests and the "naive" side of the benchmarks, so it stays short enough to check by
eye against the equations (Huang, Loy, Tang, NIPS 2016, Sec. 3.1, Fig. 2):

    u  = |a - b|                  v  = (a + b) / 2
    u' = relu(W_u normalize(u) + b_u)
    v' = relu(W_v normalize(v) + b_v)
    q  = relu(W_c [normalize(u'); normalize(v')] + b_c)
    S(a, b) = w_s . q + b_s

That is the input-normalised form; the distance-aware form (``normalize_inputs=False``,
docs/design.md, "The two forms") feeds u and v to W_u and W_v as they are. Here
``normalize_inputs=None`` means the unit's own form (``PDDM.normalize_inputs``; True for a parameter
tuple).

Parameters are passed as a tuple ``(W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s)`` or as a
``PDDM`` module (anything with those attributes).

The formulas are written once, here: ``pair_scores`` (the PDDM score S) and ``quadruplet_losses`` /
``triplet_losses`` (the loss terms, paper Eq. 5-7, from ``hinge`` and ``squared_distance``) are also
what ``pddm_ext.pair_scores`` and ``PDDMLoss`` differentiate. This
module imports nothing from the code it checks: its results are plain tuples and tensors.
"""

from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F

PARAM_NAMES = ("W_u", "b_u", "W_v", "b_v", "W_c", "b_c", "w_s", "b_s")

# mine_hard's result: the fields of pddm_ext.Quadruplets (a plain namedtuple, so the oracle stays
# independent of the code it checks).
ReferenceQuadruplets = namedtuple(
    "ReferenceQuadruplets", ["anchor", "positive", "anchor_negative", "positive_negative", "scores", "batch_mode"]
)


def _params(unit):
    if isinstance(unit, (tuple, list)):
        return tuple(unit)
    return tuple(getattr(unit, name) for name in PARAM_NAMES)


def _normalize_inputs(unit, normalize_inputs):
    return getattr(unit, "normalize_inputs", True) if normalize_inputs is None else normalize_inputs


def pair_scores(a, b, unit, normalize_inputs=None, dropout=0.0):
    """S(a[t], b[t]) for row-aligned pairs: (p, d), (p, d) -> (p,); any p >= 0. Differentiable.

    ``dropout > 0``: inverted dropout on q, one mask per pair (the unit's training mode)."""
    W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s = _params(unit)
    u = (a - b).abs()
    v = (a + b) / 2
    if _normalize_inputs(unit, normalize_inputs):
        u, v = F.normalize(u, dim=-1, eps=1e-12), F.normalize(v, dim=-1, eps=1e-12)
    u1 = torch.relu(u @ W_u.T + b_u)
    v1 = torch.relu(v @ W_v.T + b_v)
    joint = torch.cat([F.normalize(u1, dim=-1, eps=1e-12), F.normalize(v1, dim=-1, eps=1e-12)], dim=-1)
    q = torch.relu(joint @ W_c.T + b_c)
    if dropout > 0:
        q = F.dropout(q, dropout, training=True)
    return q @ w_s + b_s


def pddm_scores(x, y, unit, normalize_inputs=None):
    """All-pairs S(x_i, y_r) as an (m, n) matrix (y=None: y = x), through an (m, n, d) tensor."""
    y = x if y is None else y
    m, n = x.shape[0], y.shape[0]
    a = x[:, None, :].expand(m, n, x.shape[1]).reshape(m * n, -1)
    b = y[None, :, :].expand(m, n, y.shape[1]).reshape(m * n, -1)
    return pair_scores(a, b, unit, normalize_inputs).reshape(m, n)


def euclidean_scores(x, y=None):
    """All-pairs S(x_i, y_r) = -||x_i - y_r||^2 as an (m, n) matrix."""
    y = x if y is None else y
    return -((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def hinge(margin, s_positive, s_negative):
    """[margin + s_negative - s_positive]_+, elementwise: the hinge of paper Eq. 5-6 (metric loss,
    on PDDM scores) and Eq. 7 (embedding loss, on negated squared distances)."""
    return torch.relu(margin + s_negative - s_positive)


def squared_distance(a, b):
    """|a[t] - b[t]|^2 for row-aligned pairs: (p, d), (p, d) -> (p,)."""
    return ((a - b) ** 2).sum(-1)


def quadruplet_losses(f_i, f_j, f_k, f_l, score, alpha, beta):
    """Per-quadruplet loss terms (paper Eq. 5-7) for row-aligned (q, d) rows of (i, j, k, l):
    ``E_m = [alpha + S_ik - S_ij]_+ + [alpha + S_jl - S_ij]_+`` (the double-header hinge on PDDM
    scores) and ``E_e = [beta + |f_i - f_j|^2 - |f_i - f_k|^2]_+ + [beta + |f_i - f_j|^2 - |f_j - f_l|^2]_+``.
    ``score(a, b)`` gives the (q,) scores of row-aligned pairs (e.g. ``pair_scores`` with a unit).
    Returns ``(E_m, E_e)``, each (q,)."""
    S_ij = score(f_i, f_j)
    E_m = hinge(alpha, S_ij, score(f_i, f_k)) + hinge(alpha, S_ij, score(f_j, f_l))
    d_ij = squared_distance(f_i, f_j)
    E_e = hinge(beta, -d_ij, -squared_distance(f_i, f_k)) + hinge(beta, -d_ij, -squared_distance(f_j, f_l))
    return E_m, E_e


def triplet_losses(f_a, f_p, f_n, score, alpha, beta):
    """One header of each term of :func:`quadruplet_losses` per triplet (a, p, n): returns
    ``([alpha + S_an - S_ap]_+, [beta + |f_a - f_p|^2 - |f_a - f_n|^2]_+)``, each (t,)."""
    E_m = hinge(alpha, score(f_a, f_p), score(f_a, f_n))
    E_e = hinge(beta, -squared_distance(f_a, f_p), -squared_distance(f_a, f_n))
    return E_m, E_e


SCORE_MATRICES = {
    "pddm": pddm_scores,
    "euclidean": lambda x, y, unit, normalize_inputs=None: euclidean_scores(x, y),
}


def _score_matrix(x, y, unit, metric, normalize_inputs=None):
    return SCORE_MATRICES[metric](x, y, unit, normalize_inputs)


def hardest(embeddings, labels, unit=None, *, ref_emb=None, ref_labels=None, metric=None, normalize_inputs=None):
    """Per-row reductions (docs/design.md, "Mining") from the full score matrix.

    Returns ``(S, positive_mask, hardest_positive, hardest_negative, hardest_negative_of_ref)``;
    a row or column without a candidate gets -1. argmax/argmin return the first optimum,
    which is the smallest index. Positive pairs: equal labels, except (i, i) in batch mode and, in
    reference mode, a reference row equal to its query feature by feature (-0 equals +0).
    """
    metric = metric or ("euclidean" if unit is None else "pddm")
    batch_mode = ref_emb is None
    y, ly = (embeddings, labels) if batch_mode else (ref_emb, ref_labels)
    S = _score_matrix(embeddings, None if batch_mode else y, unit, metric, normalize_inputs)
    same = labels[:, None] == ly[None, :]
    positive, negative = same.clone(), ~same
    if batch_mode:
        positive.fill_diagonal_(False)
    else:
        positive &= ~(embeddings[:, None, :] == y[None, :, :]).all(-1)

    def pick(masked, mask, dim, largest):
        idx = masked.argmax(dim) if largest else masked.argmin(dim)
        return torch.where(mask.any(dim), idx, torch.full_like(idx, -1))

    inf = torch.tensor(float("inf"), dtype=S.dtype, device=S.device)
    hardest_positive = pick(torch.where(positive, S, inf), positive, 1, largest=False)
    hardest_negative = pick(torch.where(negative, S, -inf), negative, 1, largest=True)
    hardest_negative_of_ref = pick(torch.where(negative, S, -inf), negative, 0, largest=True)
    return S, positive, hardest_positive, hardest_negative, hardest_negative_of_ref


def mine_hard(embeddings, labels, unit=None, *, k=1, ref_emb=None, ref_labels=None, metric=None,
              normalize_inputs=None):
    """Hard quadruplets (docs/design.md, "Mining") from the full score matrix.

    Returns a ``ReferenceQuadruplets`` with the fields of ``pddm_ext.Quadruplets``."""
    with torch.no_grad():
        S, positive, _, neg, neg_ref = hardest(
            embeddings, labels, unit, ref_emb=ref_emb, ref_labels=ref_labels, metric=metric,
            normalize_inputs=normalize_inputs,
        )
        batch_mode = ref_emb is None
        if batch_mode:  # unordered pairs {i, r}, reported with i < r
            positive = positive.triu(diagonal=1)
        i, r = positive.nonzero(as_tuple=True)  # row-major: (i, r) ascending
        order = torch.sort(S[i, r], stable=True).indices  # ascending S, ties keep (i, r) order
        if k is not None:
            order = order[:k]
        i, r = i[order], r[order]
        keep = (neg[i] >= 0) & (neg_ref[r] >= 0)
        i, r = i[keep], r[keep]
        a_neg, p_neg = neg[i], neg_ref[r]
        scores = torch.stack([S[i, r], S[i, a_neg], S[p_neg, r]], dim=1)
    return ReferenceQuadruplets(i, r, a_neg, p_neg, scores, batch_mode)


def batch_hard(embeddings, labels, unit=None, *, ref_emb=None, ref_labels=None, metric=None,
               normalize_inputs=None):
    """Per-query hardest triplets ``(i, hardest_positive[i], hardest_negative[i])`` (docs/design.md)."""
    with torch.no_grad():
        _, _, pos, neg, _ = hardest(
            embeddings, labels, unit, ref_emb=ref_emb, ref_labels=ref_labels, metric=metric,
            normalize_inputs=normalize_inputs,
        )
    a = ((pos >= 0) & (neg >= 0)).nonzero(as_tuple=True)[0]
    return a, pos[a], neg[a]


def pddm_loss(embeddings, labels, unit, *, alpha=0.5, beta=1.0, lam=0.5, k=1, normalize=True):
    """The PDDM loss (docs/design.md, "Loss"; paper Eq. 5-8) on the full score matrix: returns
    ``(loss, metric_loss, embedding_loss, quadruplets)``."""
    f = F.normalize(embeddings, dim=1) if normalize else embeddings
    quads = mine_hard(f.detach(), labels, unit, k=k)
    i, j, k_, l_ = quads.anchor, quads.positive, quads.anchor_negative, quads.positive_negative
    if i.numel() == 0:
        zero = embeddings.sum() * 0 + sum(p.sum() * 0 for p in _params(unit))
        return zero, zero.detach(), zero.detach(), quads
    E_m, E_e = quadruplet_losses(f[i], f[j], f[k_], f[l_], lambda a, b: pair_scores(a, b, unit), alpha, beta)
    metric_loss, embedding_loss = E_m.mean(), E_e.mean()
    return metric_loss + lam * embedding_loss, metric_loss, embedding_loss, quads
