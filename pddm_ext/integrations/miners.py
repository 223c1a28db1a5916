"""``PDDMMiner``: PDDM hard mining with pytorch-metric-learning's miner call convention.

    miner = pddm_ext.PDDMMiner(unit=loss_fn.unit)          # or unit=None: fused Euclidean mining
    a, p, n = miner(embeddings, labels)                     # batch mode
    a, p, n = miner(embeddings, labels, ref_emb, ref_labels)  # reference mode (e.g. a memory bank)
    loss = pml_loss(embeddings, labels, (a, p, n))          # any PML triplet loss

When pytorch-metric-learning (PML) is installed, ``PDDMMiner`` subclasses its ``BaseMiner``, so PML's
losses, ``CrossBatchMemory``, ``DistributedMinerWrapper`` and trainers accept it. Without PML it is a
plain callable with the same signature and result.

Labels: a ``torch.Tensor`` of integers, as everywhere in the package. A list or a numpy array raises
the package's ``TypeError`` naming ``labels`` (or ``ref_labels``) before PML touches it, in both forms
of the miner alike (convert with ``torch.as_tensor``): accepting array-likes here only would make the
miner disagree with ``mine_hard``, ``batch_hard`` and ``PDDMLoss``, which take tensors.
"""

from __future__ import annotations

import torch

from .. import _validate as V
from ..functional import _batch_hard, _mine_hard, _normalized_rows, _prepare_mining

MODES = ("mine_hard", "batch_hard")


class _PDDMMining:
    """The mining shared by both forms of ``PDDMMiner`` (with and without PML)."""

    def _configure(self, unit, k, metric, mode, normalize):
        if unit is not None:
            V.unit_params(unit)  # TypeError unless it has W_u ... b_s
        self.metric = V.resolve_metric(metric, unit)
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.k = V.check_k(k)
        if mode == "batch_hard" and self.k is not None:
            raise ValueError(f"k applies to mode='mine_hard' only (mode='batch_hard' gives one triplet per anchor), "
                             f"got k={k!r}")
        self.mode = mode
        self.normalize = V.check_bool("normalize", normalize)
        # Not registered as a submodule: the unit belongs to the loss (and its optimiser); the
        # miner only reads it, so it must not show up twice in parameters() or state_dict().
        object.__setattr__(self, "_unit", unit)
        self.last_quadruplets = None

    @property
    def unit(self):
        return self._unit

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        """``(a, p, n)`` triplet indices. ``ref_emb`` None, or the embeddings themselves with their own
        labels (``ref_labels`` None or ``labels`` itself), means batch mode, as in PML (its
        ``BaseMiner.forward`` passes the embeddings and labels themselves as references); the
        embeddings as references with other labels are reference mode, so those labels count. Validated
        here, once (the structure first, so that normalising cannot fail; with ``normalize`` the input
        rows' values, finiteness and magnitude, since a row whose norm overflows would normalise to
        zeros; without it the rows as mined), then mined unchecked."""
        batch_mode = ref_emb is None or (ref_emb is embeddings and (ref_labels is None or ref_labels is labels))
        if batch_mode:
            ref_emb = ref_labels = None
        elif ref_labels is None:
            raise ValueError("ref_labels must be given with ref_emb")
        V.check_embeddings("embeddings", embeddings, finite=self.normalize)
        if not batch_mode:
            V.check_embeddings("ref_emb", ref_emb, d=embeddings.shape[1], d_from="embeddings", finite=self.normalize)
        # normalised in the compute dtype: float32 for half rows (float16's eps and norms fail)
        dtype = V.compute_dtype(embeddings, None if batch_mode else ref_emb)
        prep = (lambda t: _normalized_rows(t.detach(), dtype)) if self.normalize else (lambda t: t.detach())  # noqa: E731
        x = prep(embeddings)
        y = None if batch_mode else prep(ref_emb)
        # rows normalised from checked input rows are finite and of norm 1: not checked a second time
        checked = tuple(t for t in (x, y) if t is not None) if self.normalize else ()
        with V.already_validated(*checked):
            x, lx, y, ly, params, metric, form = _prepare_mining(x, labels, self.unit, y, ref_labels, self.metric)
        if self.mode == "batch_hard":
            self.last_quadruplets = None
            return _batch_hard(x, lx, y, ly, params, metric, form)
        quads = _mine_hard(x, lx, y, ly, params, self.k, metric, form)
        triplets = quads.as_triplets()
        if batch_mode and self.k is not None:
            triplets = _hardest_ordered_pairs(quads, triplets, self.k)
        self.last_quadruplets = quads
        return triplets

    def _extra(self):
        return f"k={self.k}, metric={self.metric!r}, mode={self.mode!r}, normalize={self.normalize}"


def _hardest_ordered_pairs(quads, triplets, k):
    """Batch mode: the triplets of the k hardest ordered positive pairs (a, p) (S(a, p) ascending,
    ties by (a, p) ascending).

    ``quads`` are ``mine_hard``'s k hardest unordered pairs and ``triplets`` their 2q triplets
    ``(i, r, k)`` and ``(r, i, l)``. They hold the k hardest ordered pairs: every unordered pair that
    comes before {a, p} in mine_hard's order puts at least one of its two ordered pairs before (a, p),
    so an ordered pair among the first k belongs to one of the first k unordered pairs. The kept
    triplets stay in ``as_triplets()``'s order. Index arithmetic only: no size depends on the data, so
    nothing waits for the device."""
    a, p, n = triplets
    if a.numel() <= k:
        return triplets
    s = quads.scores[:, 0].repeat(2)  # S(i, r) = S(r, i): one score per unordered pair
    order = torch.argsort(p, stable=True)
    order = order[torch.argsort(a[order], stable=True)]
    order = order[torch.argsort(s[order], stable=True)]
    kept = order[:k].sort().values
    return a[kept], p[kept], n[kept]


_DOC = """PDDM hard mining as a pytorch-metric-learning miner (docs/design.md, "Mining").

    ``PDDMMiner(unit=None, k=None, metric=None, mode="mine_hard", normalize=True)``;
    ``miner(embeddings, labels, ref_emb=None, ref_labels=None)`` returns ``(a, p, n)`` int64 indices:

    - ``mode="mine_hard"``: ``k`` triplets (fewer when there are fewer positive pairs; ``k=None``:
      every positive pair), those of the ``k`` hardest *ordered* positive pairs (a, p): S(a, p)
      ascending, ties by (a, p) ascending, each with the anchor's hardest negative, n =
      hardest_negative[a]. Both modes count ``k`` alike, as pytorch-metric-learning counts pairs
      (an anchor from ``embeddings``, a positive from ``ref_emb``): ``PDDMMiner(k=8)`` gives 8 triplets
      bare and 8 inside ``CrossBatchMemory``. Batch mode (``ref_emb`` None, or ``embeddings``
      itself with ``labels`` itself or no ``ref_labels``) counts the unordered pair {i, j} as the two ordered pairs (i, j) and (j, i): the
      triplets are those of ``mine_hard(..., k=k).as_triplets()`` (the (i, r, k) and (r, i, l) of
      each quadruplet) that are among the k hardest ordered pairs, so ``PDDMMiner(k=2 * q)`` gives
      the 2q triplets of ``mine_hard(..., k=q)`` (unless exact score ties straddle the cut).
      Reference mode: ``mine_hard(..., k=k, ref_emb=..., ref_labels=...).as_triplets()``, with p and
      n indexing ``ref_emb``. ``last_quadruplets``: the last call's ``mine_hard`` quadruplets (the
      triplets are chosen from theirs).
      Unlike the miner, ``mine_hard`` and ``PDDMLoss`` count ``k`` in quadruplets (positive pairs:
      unordered in batch mode, two triplets each).
    - ``mode="batch_hard"``: ``batch_hard``'s one triplet per query.

    Reference mode never pairs an anchor with a reference row equal to it, feature by feature, with
    the same label (docs/design.md, "Mining"): inside ``CrossBatchMemory`` and
    ``DistributedMinerWrapper(efficient=True)``, whose references hold the batch itself, no anchor
    loses its triplet to its own copy (which the wrappers then remove as a self-comparison). The
    rows compared are the ones mined: with ``normalize=True`` the normalised rows.

    ``unit``: a ``pddm_ext.PDDM`` (e.g. ``PDDMLoss(...).unit``); the miner reads it but does not own
    it (it is not among the miner's parameters). ``metric`` defaults to "pddm" with a unit, else
    "euclidean". ``normalize`` (bool; ``TypeError`` naming it otherwise): mine on L2-normalised
    embeddings, as ``PDDMLoss`` and PML's default distance do, normalised in the compute dtype
    (float32 for float16 / bfloat16 embeddings, whose own eps and norms fail: docs/design.md).
    Mining is fused (no (m, n) matrix) and not differentiable.

    ``embeddings`` (m, d) and ``ref_emb`` (n, d): floating tensors; ``labels`` (m,), ``ref_labels``
    (n,): integer tensors (a list or numpy array raises ``TypeError`` naming ``labels``: convert with
    ``torch.as_tensor``). Other bad input raises like ``mine_hard`` (docs/design.md, "Errors").
    """


def _check_types(embeddings, labels, ref_emb, ref_labels):
    """What must hold before PML's BaseMiner.forward reads the inputs (it reads .shape and moves
    labels first): tensors, and ref_labels with ref_emb. Values are checked once, in ``mine``."""
    V.check_tensor("embeddings", embeddings)
    V.check_tensor("labels", labels)
    if ref_emb is not None:
        V.check_tensor("ref_emb", ref_emb)
        if ref_labels is None and ref_emb is not embeddings:
            raise ValueError("ref_labels must be given with ref_emb")
    if ref_labels is not None:
        V.check_tensor("ref_labels", ref_labels)


def _miner_class():
    """``PDDMMiner`` built on PML's ``BaseMiner`` when PML imports, else a plain callable."""
    try:
        from pytorch_metric_learning.miners import BaseMiner
    except ImportError:
        BaseMiner = None

    if BaseMiner is not None:

        class PDDMMiner(_PDDMMining, BaseMiner):
            __doc__ = _DOC

            def __init__(self, unit=None, k=None, metric=None, mode="mine_hard", normalize=True, **kwargs):
                if "distance" in kwargs:
                    raise ValueError("PDDMMiner does not take a PML distance: choose metric='pddm' or 'euclidean'")
                super().__init__(**kwargs)
                self._configure(unit, k, metric, mode, normalize)

            def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
                # PML's BaseMiner.forward reads labels.shape first: the package's TypeError comes first.
                _check_types(embeddings, labels, ref_emb, ref_labels)
                return super().forward(embeddings, labels, ref_emb, ref_labels)

            def extra_repr(self):
                return self._extra()

        return _public(PDDMMiner)

    class PDDMMiner(_PDDMMining):
        __doc__ = _DOC

        def __init__(self, unit=None, k=None, metric=None, mode="mine_hard", normalize=True):
            self._configure(unit, k, metric, mode, normalize)

        def __call__(self, embeddings, labels, ref_emb=None, ref_labels=None):
            _check_types(embeddings, labels, ref_emb, ref_labels)
            with torch.no_grad():
                return self.mine(embeddings, labels, ref_emb, ref_labels)

        def __repr__(self):
            return f"PDDMMiner({self._extra()})"

    return _public(PDDMMiner)


def _public(cls):
    # Defined inside _miner_class, but reachable (and picklable) as pddm_ext.miners.PDDMMiner.
    cls.__qualname__, cls.__module__ = "PDDMMiner", __name__
    return cls


PDDMMiner = _miner_class()
HAS_PML = issubclass(PDDMMiner, torch.nn.Module)
