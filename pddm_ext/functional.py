"""The functional API: PDDM scores, pair scores and hard mining (docs/design.md).

For a pair of feature vectors a, b in R^d the PDDM unit scores (Huang, Loy, Tang, NIPS 2016, Sec. 3.1)

    u  = |a - b|                  v  = (a + b) / 2
    u' = relu(W_u normalize(u) + b_u)
    v' = relu(W_v normalize(v) + b_v)
    q  = relu(W_c [normalize(u'); normalize(v')] + b_c)
    S(a, b) = w_s . q + b_s                      (higher = more similar)

with normalize(z) = z / max(||z||, 1e-12): the input-normalised form. The distance-aware form
(``normalize_inputs=False``, docs/design.md, "The two forms") uses u' = relu(W_u u + b_u) and
v' = relu(W_v v + b_v) instead, so that S sees how far apart a and b are. Mining uses S (metric="pddm") or
S(a, b) = -||a - b||^2 (metric="euclidean"): hard positives have low S, hard negatives high S.

Every public function here validates its inputs once (``_validate``) and then calls an unchecked
twin (``_mine_hard``, ``_batch_hard``, ``_pair_scores``) that the loss and the miner call directly
with inputs they already validated (docs/design.md#errors).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _validate as V
from . import ops, reference


class _QuadrupletFields(NamedTuple):
    anchor: torch.Tensor
    positive: torch.Tensor
    anchor_negative: torch.Tensor
    positive_negative: torch.Tensor
    scores: torch.Tensor
    batch_mode: bool = True


class Quadruplets(_QuadrupletFields):
    """Hard quadruplets ``(i, r, k, l)`` mined by :func:`mine_hard` (paper Sec. 3.2, Eq. 4).

    Fields (int64, shape (q,), on the embeddings' device): ``anchor`` i, ``positive`` r (a positive
    pair of anchor i), ``anchor_negative`` k = hardest_negative[i], ``positive_negative``
    l = hardest_negative_of_ref[r]; ``scores`` (q, 3) holds S(i, r), S(i, k), S(l, r), detached, in the
    compute dtype; ``batch_mode`` (bool) tells whether r and k index the embeddings themselves (batch
    mode) or ``ref_emb`` (reference mode). ``batch_mode`` is a real field, so ``_replace``, ``_make``,
    pickling and copying keep it; ``q[:4]`` is the four index tensors. ``batch_mode`` must be a bool
    (``TypeError`` naming it otherwise, also through ``_replace`` and ``_make``: a string such as
    ``"false"`` would read as batch mode).
    """

    __slots__ = ()

    def __new__(cls, anchor, positive, anchor_negative, positive_negative, scores, batch_mode=True):
        return super().__new__(cls, anchor, positive, anchor_negative, positive_negative, scores,
                               V.check_bool("batch_mode", batch_mode))

    @classmethod
    def _make(cls, iterable):  # namedtuple's _make (and so _replace) bypasses __new__
        return cls(*iterable)

    def as_triplets(self):
        """``(a, p, n)`` index tensors in the pytorch-metric-learning convention.

        Batch mode: 2q triplets, ``(i, r, k)`` then ``(r, i, l)``. Reference mode: the q triplets
        ``(i, r, k)``, anchors indexing the embeddings, positives and negatives ``ref_emb``.
        Raises ``ValueError`` when the four index fields do not all have one length (e.g. after ``_replace``).
        """
        i, r, k, l_ = self.anchor, self.positive, self.anchor_negative, self.positive_negative
        lengths = {name: len(t) for name, t in zip(self._fields[:4], (i, r, k, l_))}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"Quadruplets fields must all have one length, got "
                             f"{', '.join(f'{n} {q}' for n, q in lengths.items())}")
        if not self.batch_mode:
            return i, r, k
        return torch.cat([i, r]), torch.cat([r, i]), torch.cat([k, l_])


def _prepare_pair_inputs(x, y, params):
    """Validates (x, y, params) for scoring and casts them to the compute dtype; also returns the
    op's product_dtype (``V.product_dtype``: the half dtype of half inputs, else None)."""
    V.check_embeddings("x", x)
    d = x.shape[1]
    if y is not None:
        V.check_embeddings("y", y, d=d, d_from="x")
        V.check_same_device([("x", x), ("y", y)])
    V.check_params(params, d, x.device)
    product = V.product_dtype(x, y)
    V.check_product_range(params, product)
    dtype = V.compute_dtype(x, y)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731  (autograd flows through .to)
    return cast(x), cast(y), tuple(cast(p) for p in params), product


def pddm_scores(x, y, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, *, normalize_inputs=True):
    """All-pairs PDDM scores ``S[i, r] = S(x_i, y_r)``: an (m, n) tensor; ``y=None`` gives (m, m).

    x (m, d), y (n, d) or None; parameters of shapes W_u, W_v (h, d), b_u, b_v (h,), W_c (c, 2h),
    b_c, w_s (c,), b_s (); float16/bfloat16/float32/float64. The result has the compute dtype
    (float64 if any of x, y is, else float32: also for half inputs). Half inputs (x and y of one half
    dtype) run the tile products in that dtype with float32 accumulation on GPUs with tensor cores
    (sm_80+), everything else in float32; on the CPU and older GPUs all in float32; their backward
    computes in float32 and returns gradients of the inputs' dtypes (docs/design.md#precision; to
    keep float32 products, pass ``x.float()``). Fused: never builds the (m, n, d) pair tensor.
    Differentiable in x, y and every parameter (fused backward). ``normalize_inputs`` (bool) selects the unit's form (docs/design.md, "The two
    forms"). Raises ``TypeError``/``ValueError`` naming the argument
    for a non-tensor, a wrong dtype, rank, shape or device, an empty x or y, NaN or Inf, and
    ``ValueError`` naming W_u or W_c when float16 inputs meet a parameter beyond float16's range.
    """
    normalize_inputs = V.check_bool("normalize_inputs", normalize_inputs)
    x, y, params, product = _prepare_pair_inputs(x, y, (W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s))
    return ops.scores(x, y, *params, normalize_inputs, product_dtype=product)


def pair_scores(a, b, params, *, normalize_inputs=True):
    """Scores ``S(a[t], b[t])`` of row-aligned pairs: (p, d), (p, d) -> (p,). Differentiable.

    ``params``: the eight parameters (W_u, ..., b_s). Computed by ``pddm_ext.reference.pair_scores``
    (the formula's one home; it forms v from a + b itself, so b ~ -a does not cancel) with ordinary
    autograd, in the compute dtype; ``normalize_inputs=False`` gives the distance-aware form. Raises like
    :func:`pddm_scores`, and ``ValueError`` when a and b have different numbers of rows.
    """
    normalize_inputs = V.check_bool("normalize_inputs", normalize_inputs)
    _check_pair_inputs(a, b, params)
    return _pair_scores(a, b, params, normalize_inputs)


def _check_pair_inputs(a, b, params):
    """The checks of pair_scores (docs/design.md, "Errors")."""
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
    return reference.pair_scores(a.to(dtype), b.to(dtype), tuple(p.to(dtype) for p in params),
                                 normalize_inputs, dropout)


def _prepare_mining(embeddings, labels, unit, ref_emb, ref_labels, metric, normalize_inputs=None):
    """Validates mining inputs; returns (x, lx, y, ly, params or None, metric, normalize_inputs),
    detached, in the compute dtype, ready for the unchecked ``_mine_hard`` / ``_batch_hard``."""
    metric = V.resolve_metric(metric, unit)
    uses_unit = ops.METRICS[metric].uses_unit
    normalize_inputs = V.unit_form(unit, normalize_inputs) if uses_unit else True
    params = V.unit_params(unit) if uses_unit else None
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
    x, y, params = _mining_inputs(embeddings, ref_emb, params)
    return x, lx, y, ly, params, metric, normalize_inputs


def _mining_inputs(x, y, params):
    """Detached copies in the compute dtype (float64 if any input is, else float32)."""
    dtype = V.compute_dtype(x, y)
    x = x.detach().to(dtype)
    y = None if y is None else y.detach().to(dtype)
    if params is not None:
        params = tuple(p.detach().to(dtype) for p in params)
    return x, y, params


def _normalized_rows(t, dtype=None):
    """``t`` (rows, d) L2-normalised row-wise (``F.normalize``) in ``dtype``, by default the compute
    dtype (float32 for float16 / bfloat16 rows). Normalising in half precision would divide by
    F.normalize's eps = 1e-12, which is 0 in float16 (a zero row gives NaN), and by norms that
    overflow to inf (float16 above 65504: such a row gives zeros). Differentiable (through ``.to``)."""
    return F.normalize(t.to(V.compute_dtype(t) if dtype is None else dtype), dim=1)


def mine_hard(embeddings, labels, unit=None, *, k=1, ref_emb=None, ref_labels=None, metric=None,
              normalize_inputs=None):
    """Hard quadruplets (docs/design.md, "Mining"; paper Sec. 3.2), fused: the (m, n) score matrix
    is never built.

    1. Order all positive pairs (i, r) by S(x_i, y_r) ascending, ties by (i, r) ascending
       (batch mode: unordered pairs, i < r; reference mode: ordered (query, reference) pairs, less
       the same-label pairs of equal rows, docs/design.md "Mining", the self-copy rule).
    2. Keep the first ``k`` (``k=None`` keeps all; ``k=1`` is the paper's single hardest pair).
       ``k`` counts quadruplets (pairs) in both modes; ``as_triplets()`` makes each two triplets in
       batch mode and one in reference mode (``PDDMMiner``'s ``k`` counts triplets instead).
    3. Emit ``(i, r, hardest_negative[i], hardest_negative_of_ref[r])`` per kept pair, skipping pairs
       where either negative does not exist, with
       hardest_negative[i] = argmax_{r: label differs} S(x_i, y_r) and
       hardest_negative_of_ref[r] = argmax_{i: label differs} S(x_i, y_r).

    ``embeddings`` (m, d) and ``ref_emb`` (n, d): floating; ``labels`` (m,), ``ref_labels`` (n,):
    integer tensors on any device. Batch mode (``ref_emb=None``) pairs the embeddings with themselves
    (never a row with itself); reference mode pairs every query with every row of ``ref_emb`` (e.g. a
    memory bank). ``metric`` defaults to "pddm" when ``unit`` is given, else "euclidean"
    (S = -||a - b||^2). ``normalize_inputs`` (bool or None): the unit's form for metric="pddm"
    (docs/design.md, "The two forms"); None takes the unit's own (``PDDM.normalize_inputs``; True for
    a parameter tuple). Ties go to the smallest index. Returns :class:`Quadruplets`; not
    differentiable. Raises ``TypeError``/``ValueError`` naming the argument for bad input (wrong type,
    dtype, rank, shape, device, label length, ``k < 1``, NaN or Inf; see docs/design.md, "Errors").
    """
    k = V.check_k(k)
    x, lx, y, ly, params, metric, form = _prepare_mining(embeddings, labels, unit, ref_emb, ref_labels, metric,
                                                         normalize_inputs)
    return _mine_hard(x, lx, y, ly, params, k, metric, form, _mining_product(embeddings, ref_emb, params, metric))


def _mining_product(embeddings, ref_emb, params, metric):
    """The product_dtype of PDDM mining on these (validated) embeddings (``V.product_dtype``), after
    the range check of float16 products; None for the Euclidean metric (no tile products)."""
    if metric != "pddm":
        return None
    product = V.product_dtype(embeddings, ref_emb)
    V.check_product_range(params, product)
    return product


def _mine_hard(x, lx, y, ly, params, k, metric, normalize_inputs=True, product_dtype=None):
    """mine_hard on validated inputs (``_prepare_mining``'s result); ``product_dtype`` as the op's."""
    with torch.no_grad():
        res = ops.mine(x, lx, y, ly, params, -1 if k is None else k, metric, normalize_inputs, product_dtype)
        neg, neg_ref = res.hardest_negative, res.hardest_negative_of_ref
        # A pair is skipped when a negative is missing. That happens for all pairs or none (only when
        # every label is the same), so this is one data-dependent size, like the op's own pair count.
        kept = ((neg[res.pair_query] >= 0) & (neg_ref[res.pair_ref] >= 0)).nonzero().flatten()
        i, r, s = res.pair_query[kept], res.pair_ref[kept], res.pair_score[kept]
        a_neg, p_neg = neg[i], neg_ref[r]
        scores = torch.stack([s, res.hardest_negative_score[i], res.hardest_negative_of_ref_score[r]], dim=1)
    return Quadruplets(i, r, a_neg, p_neg, scores, y is None)


def batch_hard(embeddings, labels, unit=None, *, ref_emb=None, ref_labels=None, metric=None,
               normalize_inputs=None):
    """Per-query hardest triplets ``(a, p, n)`` (docs/design.md, "Mining"), fused.

    One triplet ``(i, hardest_positive[i], hardest_negative[i])`` per query i that has both, with
    hardest_positive[i] = argmin_{r: positive pair (i, r)} S(x_i, y_r) (reference mode: never a
    reference row equal to x_i, docs/design.md "Mining", the self-copy rule) and
    hardest_negative[i] = argmax_{r: label differs} S(x_i, y_r). Returns three int64 tensors of one
    length t <= m, on the embeddings' device. Inputs (``normalize_inputs`` included) and errors as
    :func:`mine_hard` (without ``k``).
    With metric="euclidean" on L2-normalised embeddings this is pytorch-metric-learning's
    BatchHardMiner rule.
    """
    x, lx, y, ly, params, metric, form = _prepare_mining(embeddings, labels, unit, ref_emb, ref_labels, metric,
                                                         normalize_inputs)
    return _batch_hard(x, lx, y, ly, params, metric, form, _mining_product(embeddings, ref_emb, params, metric))


def _batch_hard(x, lx, y, ly, params, metric, normalize_inputs=True, product_dtype=None):
    """batch_hard on validated inputs (``_prepare_mining``'s result); ``product_dtype`` as the op's."""
    with torch.no_grad():
        res = ops.mine(x, lx, y, ly, params, 0, metric, normalize_inputs, product_dtype)
        pos, neg = res.hardest_positive, res.hardest_negative
        a = ((pos >= 0) & (neg >= 0)).nonzero().flatten()  # the result's size is data dependent
    return a, pos[a], neg[a]
