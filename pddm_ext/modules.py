"""``PDDM`` (the learned metric unit) and ``PDDMLoss`` (the paper's training loss), SPEC §1, §4."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _validate as V
from .functional import Quadruplets, _pair_scores, mine_hard, pair_scores, pddm_scores


NEGATIVES = ("hardest", "semihard")


def _mean_or_zero(t):
    """mean(t), or 0 for an empty t, still connected to the graph; no data-dependent branch, so
    torch.compile traces it as one graph."""
    return t.sum() / torch.ones_like(t).sum().clamp_min(1)


@torch.no_grad()
def semihard_negatives(scores, negative, i, r):
    """Semi-hard negatives of the positive pairs (i[t], r[t]) under a similarity matrix (higher =
    more similar), the rule of FaceNet (Schroff et al. 2015, Sec. 3.2) in similarity form.

    ``scores`` (m, n): S of every query (rows) against every reference (columns); ``negative`` (m, n)
    bool: the pair's labels differ; ``i``, ``r`` (q,) int64: query and reference of each positive pair.
    Returns ``(anchor_negative, positive_negative)``, int64 (q,):

    - anchor side: the reference c with ``negative[i, c]`` and ``S[i, c] < S[i, r]`` of highest S
      (the most similar negative that still ranks below the positive pair);
    - positive side: the query c with ``negative[c, r]`` and ``S[c, r] < S[i, r]`` of highest S;
    - a side with no such candidate takes its least similar negative (the fallback of TensorFlow
      Addons' ``triplet_semihard_loss``); -1 when the row/column has no negative at all.

    Ties go to the smallest index. Builds (q, n) and (q, m) masks: memory O(q (m + n)).
    """
    def pick(s, neg, bound):  # s, neg: (q, c); bound: (q,)
        inf = torch.tensor(float("inf"), dtype=s.dtype, device=s.device)
        semi = neg & (s < bound[:, None])
        best = torch.where(semi, s, -inf).argmax(1)
        easiest = torch.where(neg, s, inf).argmin(1)
        out = torch.where(semi.any(1), best, easiest)
        return torch.where(neg.any(1), out, torch.full_like(out, -1))

    bound = scores[i, r]
    return pick(scores[i], negative[i], bound), pick(scores[:, r].T, negative[:, r].T, bound)


def balanced_pair_bce(scores, labels):
    """Balanced binary cross-entropy on pair scores used as logits (a pair-classification loss).

    ``scores`` (m, m): S of every pair of a batch (differentiable); ``labels`` (m,) integer. Over the
    unordered pairs i < j: ``0.5 * (mean_pos log(1 + exp(-S_ij)) + mean_neg log(1 + exp(S_ij)))``,
    i.e. BCE with target 1 for same-label pairs and 0 otherwise, each class of pair weighted equally
    (a batch of P x K has about P times more negative pairs than positive ones). A side without
    pairs contributes 0 (still connected to the graph). Returns a 0-dim tensor.
    """
    m = scores.shape[0]
    upper = torch.ones(m, m, dtype=torch.bool, device=scores.device).triu(1)
    same = labels[:, None] == labels[None, :]
    s_pos, s_neg = scores[upper & same], scores[upper & ~same]
    return 0.5 * (_mean_or_zero(F.softplus(-s_pos)) + _mean_or_zero(F.softplus(s_neg)))


def _check_nonnegative(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


class PDDM(nn.Module):
    """The Position-Dependent Deep Metric unit (Huang, Loy, Tang, NIPS 2016).

    For feature vectors a, b in R^d (d = ``in_features``), with h = ``hidden_features`` (default d)
    and c = ``joint_features`` (default h)::

        u' = relu(W_u normalize(|a - b|) + b_u)          W_u: (h, d), b_u: (h,)
        v' = relu(W_v normalize((a + b) / 2) + b_v)      W_v: (h, d), b_v: (h,)
        q  = relu(W_c [normalize(u'); normalize(v')] + b_c)   W_c: (c, 2h), b_c: (c,)
        S(a, b) = w_s . q + b_s                          w_s: (c,), b_s: ()

    ``unit(x)`` gives the (m, m) scores of all rows of x, ``unit(x, y)`` the (m, n) scores of x
    against y (both fused, differentiable), ``unit.pair_scores(a, b)`` the scores of row-aligned
    pairs. Each layer is initialised like ``nn.Linear``.
    """

    def __init__(self, in_features, hidden_features=None, joint_features=None, *, device=None, dtype=None):
        super().__init__()
        if in_features is None:  # only the widths h and c have defaults
            raise TypeError("in_features must be an int, got NoneType")
        for name, value in (("in_features", in_features), ("hidden_features", hidden_features),
                            ("joint_features", joint_features)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        d = in_features
        h = d if hidden_features is None else hidden_features
        c = h if joint_features is None else joint_features
        self.in_features, self.hidden_features, self.joint_features = d, h, c
        kw = dict(device=device, dtype=dtype)
        self.W_u = nn.Parameter(torch.empty(h, d, **kw))
        self.b_u = nn.Parameter(torch.empty(h, **kw))
        self.W_v = nn.Parameter(torch.empty(h, d, **kw))
        self.b_v = nn.Parameter(torch.empty(h, **kw))
        self.W_c = nn.Parameter(torch.empty(c, 2 * h, **kw))
        self.b_c = nn.Parameter(torch.empty(c, **kw))
        self.w_s = nn.Parameter(torch.empty(c, **kw))
        self.b_s = nn.Parameter(torch.empty((), **kw))
        self.reset_parameters()

    def reset_parameters(self):
        """nn.Linear's defaults: weights kaiming_uniform(a=sqrt(5)), biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for weight, bias in ((self.W_u, self.b_u), (self.W_v, self.b_v), (self.W_c, self.b_c)):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(weight.shape[1])
            nn.init.uniform_(bias, -bound, bound)
        nn.init.kaiming_uniform_(self.w_s.view(1, -1), a=math.sqrt(5))
        bound = 1 / math.sqrt(self.w_s.shape[0])
        nn.init.uniform_(self.b_s, -bound, bound)

    def params(self):
        """(W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s)."""
        return V.unit_params(self)

    def forward(self, x, y=None):
        return pddm_scores(x, y, *self.params())

    def pair_scores(self, a, b):
        return pair_scores(a, b, self.params())

    def extra_repr(self):
        return f"in_features={self.in_features}, hidden_features={self.hidden_features}, joint_features={self.joint_features}"


class PDDMLoss(nn.Module):
    """The paper's loss: PDDM hard-quadruplet mining, a double-header hinge on the PDDM scores and
    a triplet-style embedding loss, trained end to end (SPEC §4).

    ``forward(embeddings, labels)``:

    1. f = normalize(embeddings) row-wise (unless ``normalize=False``);
    2. quadruplets (i, j, k, l) = ``mine_hard(f.detach(), labels, self.unit, k=self.k)``;
    3. S_ij, S_ik, S_jl recomputed with autograd (``unit.pair_scores``);
    4. E_m = [alpha + S_ik - S_ij]_+ + [alpha + S_jl - S_ij]_+;
    5. E_e = [beta + |f_i - f_j|^2 - |f_i - f_k|^2]_+ + [beta + |f_i - f_j|^2 - |f_j - f_l|^2]_+;
    6. loss = mean(E_m) + lam * mean(E_e).

    A batch without a quadruplet gives a zero still connected to the graph. The last quadruplets
    and both loss parts are kept as ``last_quadruplets``, ``last_metric_loss``, ``last_embedding_loss``.
    The unit is ``self.unit``: its parameters are this module's parameters, so give them to the optimiser.

    Beyond one batch (SPEC §3 reference mode: j, k index the references, i, l the queries):

    - ``memory=MemoryBank(size, d)``: each batch is mined against the bank's rows (detached), then
      enqueued, so a row never meets itself; gradients reach only the current batch. While the bank
      is empty the batch is mined against itself (batch mode).
    - ``distributed=True``: under ``torch.distributed``, mines over the global batch (every rank's
      embeddings, ``pddm_ext.distributed.all_gather``) while each rank back-propagates through its
      own slice; with DDP averaging the gradients, every parameter's gradient equals single-process
      training on the concatenated batch (see ``pddm_ext.distributed``). A no-op without a process group.
    - ``forward(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)`` is also
      pytorch-metric-learning's loss signature. ``ref_emb``/``ref_labels`` mine against those
      references instead. ``indices_tuple=(a, p, n)`` (e.g. from ``PDDMMiner``) skips mining and
      treats each triplet as one header of the double hinge:
      ``2 * (mean_t [alpha + S_an - S_ap]_+ + lam * mean_t [beta + |f_a - f_p|^2 - |f_a - f_n|^2]_+)``,
      so the 2q batch-mode triplets of ``mine_hard(...).as_triplets()`` give exactly the loss above.
    """

    def __init__(self, embedding_dim, hidden_features=None, joint_features=None, *, alpha=0.5, beta=1.0,
                 lam=0.5, k=1, negatives="hardest", bce_weight=0.0, warmup_steps=0, normalize=True,
                 memory=None, distributed=False):
        super().__init__()
        from .integrations.memory import MemoryBank

        self.unit = PDDM(embedding_dim, hidden_features, joint_features)
        self.alpha, self.beta, self.lam = float(alpha), float(beta), float(lam)
        self.k = V.check_k(k)
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
        self.negatives = negatives
        self.bce_weight = _check_nonnegative("bce_weight", bce_weight)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int):
            raise TypeError(f"warmup_steps must be an int, got {type(warmup_steps).__name__}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.warmup_done = 0  # training calls mined by Euclidean distance so far (saved in the state_dict)
        self.normalize = bool(normalize)
        if memory is not None:
            if not isinstance(memory, MemoryBank):
                raise TypeError(f"memory must be a pddm_ext.MemoryBank, got {type(memory).__name__}")
            if memory.dim != embedding_dim:
                raise ValueError(f"memory has dim {memory.dim}, expected {embedding_dim} to match embedding_dim")
        self.memory = memory
        self.distributed = bool(distributed)
        self.last_quadruplets = None
        self.last_triplets = None
        self.last_metric_loss = None
        self.last_embedding_loss = None
        self.last_pair_loss = None

    @property
    def warming_up(self):
        """True while training batches are mined by Euclidean distance (the warm-up)."""
        return self.training and self.warmup_done < self.warmup_steps

    def end_warmup(self):
        """Ends the warm-up now: from the next batch on, mining uses the PDDM unit."""
        self.warmup_done = self.warmup_steps

    # The warm-up's progress is state: a resumed run continues where it stopped.
    def get_extra_state(self):
        return {"warmup_done": self.warmup_done}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or isinstance(state.get("warmup_done"), bool) \
                or not isinstance(state.get("warmup_done"), int):
            raise ValueError(f"PDDMLoss state_dict: _extra_state must be {{'warmup_done': int}}, got {state!r}")
        self.warmup_done = state["warmup_done"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state_dict saved before the warm-up existed: a run that never warmed up (or has finished).
        if prefix + "unit.W_u" in state_dict and prefix + "_extra_state" not in state_dict:
            state_dict[prefix + "_extra_state"] = {"warmup_done": self.warmup_steps}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
        V.check_embeddings("embeddings", embeddings, d=self.unit.in_features, d_from="the loss's embedding_dim")
        if (ref_emb is None) != (ref_labels is None):
            raise ValueError("ref_emb and ref_labels must be given together (reference mode) or not at all")
        if ref_emb is not None and self.memory is not None:
            raise ValueError("ref_emb cannot be combined with memory=: the bank is the reference set")
        if indices_tuple is not None and (self.memory is not None or self.distributed):
            raise ValueError("indices_tuple cannot be combined with memory= or distributed=True: the loss mines itself")
        normalize = (lambda t: F.normalize(t, dim=1)) if self.normalize else (lambda t: t)  # noqa: E731
        f = normalize(embeddings)
        if ref_emb is not None:
            V.check_embeddings("ref_emb", ref_emb, d=self.unit.in_features, d_from="the loss's embedding_dim")
            ref_labels = V.check_labels("ref_labels", ref_labels, ref_emb.shape[0], embeddings.device)
            f_ref = normalize(ref_emb)
        if indices_tuple is not None:
            f_ref = f if ref_emb is None else f_ref
            return self._triplet_loss(f, f_ref, indices_tuple, embeddings) + self._pair_term(f, labels)
        if self.distributed:
            from .integrations import distributed as D

            # Each rank holds the full dL/dtheta but only its own slice's dL/dx: scaling the slice's
            # gradient by the world size makes DDP's average equal the single-process gradient.
            f, labels = D.global_batch(f, labels)
            if ref_emb is not None:  # every rank's references too, by the same rule
                f_ref, ref_labels = D.global_batch(f_ref, ref_labels)
        if self.memory is not None:
            ref_emb, ref_labels = self.memory.get()
            f_ref = None if ref_emb is None else ref_emb.to(device=f.device, dtype=f.dtype)
        if ref_emb is None:
            quads = self._mine(f.detach(), labels)
            loss = self._loss(f, f, quads, embeddings)
        else:
            quads = self._mine(f.detach(), labels, f_ref.detach(), ref_labels)
            loss = self._loss(f, f_ref, quads, embeddings)
        if self.training and self.warming_up:
            self.warmup_done += 1
        loss = loss + self._pair_term(f, labels)
        if self.memory is not None:
            self.memory.enqueue(f.detach(), labels)
        return loss

    def _mine(self, x, labels, y=None, y_labels=None):
        """Quadruplets of the detached embeddings x (and references y): the k hardest positive pairs
        under the mining score (the unit's S, or -||a - b||^2 while warming up), with hardest or
        semi-hard negatives under the same score."""
        metric = "euclidean" if self.warming_up else "pddm"
        ref = {} if y is None else dict(ref_emb=y, ref_labels=y_labels)
        quads = mine_hard(x, labels, self.unit, k=self.k, metric=metric, **ref)
        if self.negatives == "hardest" or quads.anchor.numel() == 0:
            return quads
        y, y_labels = (x, labels) if y is None else (y, y_labels.to(labels.device))
        with torch.no_grad():  # the batch's (m, n) score matrix: semi-hard needs every candidate's score
            if metric == "euclidean":
                S = -torch.cdist(x, y).pow(2)
            else:
                S = pddm_scores(x, y, *self.unit.params())
        i, r = quads.anchor, quads.positive
        k, l_ = semihard_negatives(S, labels[:, None] != y_labels[None, :], i, r)
        scores = torch.stack([S[i, r], S[i, k], S[l_, r]], dim=1)
        return Quadruplets(i, r, k, l_, scores, batch_mode=quads.batch_mode)

    def _pair_term(self, f, labels):
        """bce_weight x the balanced BCE of the batch's own pair scores (0 when bce_weight = 0)."""
        if self.bce_weight == 0:
            self.last_pair_loss = None
            return 0.0
        pair_loss = balanced_pair_bce(pddm_scores(f, None, *self.unit.params()), labels.to(f.device))
        self.last_pair_loss = pair_loss.detach()
        return self.bce_weight * pair_loss

    def _scores(self, a, b):
        # Inputs were validated on entry; the unchecked core also takes zero pairs.
        return _pair_scores(a, b, self.unit.params())

    def _loss(self, f, f_ref, quads, embeddings):
        """The loss on mined quadruplets; i, l index f (queries) and j, k index f_ref (references)."""
        i, j, k, l_ = quads.anchor, quads.positive, quads.anchor_negative, quads.positive_negative
        self.last_quadruplets, self.last_triplets = quads, None
        fi, fj, fk, fl = f[i], f_ref[j], f_ref[k], f[l_]
        S_ij = self._scores(fi, fj)
        S_ik = self._scores(fi, fk)
        S_jl = self._scores(fj, fl)
        E_m = torch.relu(self.alpha + S_ik - S_ij) + torch.relu(self.alpha + S_jl - S_ij)
        d_ij = ((fi - fj) ** 2).sum(1)
        E_e = torch.relu(self.beta + d_ij - ((fi - fk) ** 2).sum(1)) + torch.relu(
            self.beta + d_ij - ((fj - fl) ** 2).sum(1)
        )
        metric_loss, embedding_loss = _mean_or_zero(E_m), _mean_or_zero(E_e)
        self.last_metric_loss, self.last_embedding_loss = metric_loss.detach(), embedding_loss.detach()
        return metric_loss + self.lam * embedding_loss

    def _triplet_loss(self, f, f_ref, indices_tuple, embeddings):
        """The loss on given triplets (a indexes f, p and n index f_ref): one hinge header each."""
        if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) != 3:
            raise ValueError("indices_tuple must be a triplet tuple (anchors, positives, negatives), "
                             f"got {type(indices_tuple).__name__} of length {len(indices_tuple) if isinstance(indices_tuple, (tuple, list)) else '?'}")
        a, p, n = (torch.as_tensor(t, device=f.device).long() for t in indices_tuple)
        if not a.shape == p.shape == n.shape or a.dim() != 1:
            raise ValueError(f"indices_tuple tensors must be 1-D of one length, got shapes {a.shape}, {p.shape}, {n.shape}")
        self.last_quadruplets, self.last_triplets = None, (a, p, n)
        fa, fp, fn = f[a], f_ref[p], f_ref[n]
        E_m = torch.relu(self.alpha + self._scores(fa, fn) - self._scores(fa, fp))
        E_e = torch.relu(self.beta + ((fa - fp) ** 2).sum(1) - ((fa - fn) ** 2).sum(1))
        metric_loss, embedding_loss = 2 * _mean_or_zero(E_m), 2 * _mean_or_zero(E_e)  # two headers per quadruplet
        self.last_metric_loss, self.last_embedding_loss = metric_loss.detach(), embedding_loss.detach()
        return metric_loss + self.lam * embedding_loss

    def extra_repr(self):
        extra = f", memory={self.memory!r}" if self.memory is not None else ""
        extra += ", distributed=True" if self.distributed else ""
        return (f"alpha={self.alpha}, beta={self.beta}, lam={self.lam}, k={self.k}, negatives={self.negatives!r}, "
                f"bce_weight={self.bce_weight}, warmup_steps={self.warmup_steps}, normalize={self.normalize}{extra}")
