"""``PDDM`` (the learned metric unit) and ``PDDMLoss`` (the paper's training loss), SPEC §1, §4."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _validate as V
from .functional import mine_hard, pair_scores, pddm_scores


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
    """

    def __init__(self, embedding_dim, hidden_features=None, joint_features=None, *, alpha=0.5, beta=1.0,
                 lam=0.5, k=1, normalize=True):
        super().__init__()
        self.unit = PDDM(embedding_dim, hidden_features, joint_features)
        self.alpha, self.beta, self.lam = float(alpha), float(beta), float(lam)
        self.k = V.check_k(k)
        self.normalize = bool(normalize)
        self.last_quadruplets = None
        self.last_metric_loss = None
        self.last_embedding_loss = None

    def forward(self, embeddings, labels):
        V.check_embeddings("embeddings", embeddings, d=self.unit.in_features, d_from="the loss's embedding_dim")
        f = F.normalize(embeddings, dim=1) if self.normalize else embeddings
        quads = mine_hard(f.detach(), labels, self.unit, k=self.k)
        return self._loss(f, f, quads, embeddings)

    def _loss(self, f, f_ref, quads, embeddings):
        """The loss on mined quadruplets; i, k index f and j, l index f_ref."""
        i, j, k, l_ = quads.anchor, quads.positive, quads.anchor_negative, quads.positive_negative
        self.last_quadruplets = quads
        if i.numel() == 0:
            zero = embeddings.sum() * 0 + sum(p.sum() * 0 for p in self.unit.parameters())
            self.last_metric_loss = self.last_embedding_loss = zero.detach()
            return zero
        fi, fj, fk, fl = f[i], f_ref[j], f_ref[k], f[l_]
        S_ij = self.unit.pair_scores(fi, fj)
        S_ik = self.unit.pair_scores(fi, fk)
        S_jl = self.unit.pair_scores(fj, fl)
        E_m = torch.relu(self.alpha + S_ik - S_ij) + torch.relu(self.alpha + S_jl - S_ij)
        d_ij = ((fi - fj) ** 2).sum(1)
        E_e = torch.relu(self.beta + d_ij - ((fi - fk) ** 2).sum(1)) + torch.relu(
            self.beta + d_ij - ((fj - fl) ** 2).sum(1)
        )
        metric_loss, embedding_loss = E_m.mean(), E_e.mean()
        self.last_metric_loss, self.last_embedding_loss = metric_loss.detach(), embedding_loss.detach()
        return metric_loss + self.lam * embedding_loss

    def extra_repr(self):
        return f"alpha={self.alpha}, beta={self.beta}, lam={self.lam}, k={self.k}, normalize={self.normalize}"
