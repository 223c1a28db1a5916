"""The losses ``pddm-ext train --loss`` offers, assembled from the library's parts: no formula here
is written out a second time.

- ``pddm``: :class:`pddm_ext.PDDMLoss` itself (the paper's loss, Huang, Loy & Tang 2016, Eq. 4-6):
  PDDM hard-quadruplet mining, the double-header hinge E_m on the PDDM scores and ``lam`` x the
  embedding hinge E_e.
- ``pddm-triplet``: the paper's "PDDM + triplet" variant. The PDDM unit is trained by
  :class:`pddm_ext.PDDMLoss`'s metric hinge on detached embeddings (so it keeps learning what to mine, but
  its scores pass no gradient to the network); the network learns only from a Euclidean triplet loss on
  the mined quadruplets' triplets (``Quadruplets.as_triplets()``, two per quadruplet), weighted by ``lam``.
- ``batch-hard``: :func:`pddm_ext.batch_hard` with ``metric="euclidean"`` (hardest positive and
  hardest negative per anchor, Hermans et al. 2017) and the Euclidean triplet loss.
- ``triplet-random``: one random positive and one random negative per anchor (torch's global RNG, which
  checkpoints save) and the Euclidean triplet loss.

The Euclidean triplet loss is pytorch-metric-learning's ``TripletMarginLoss`` on L2-normalised
embeddings with squared Euclidean distances and a mean over the given triplets:
``mean_t [beta + |f_a - f_p|^2 - |f_a - f_n|^2]_+`` (Schroff et al. 2015, Eq. 1; ``beta`` is the margin).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional import batch_hard
from ..modules import PDDMLoss
from . import loss_options

LOSSES = ("pddm", "pddm-triplet", "batch-hard", "triplet-random")


def euclidean_triplet_loss(beta):
    """pytorch-metric-learning's ``TripletMarginLoss(margin=beta)`` on squared Euclidean distances of
    L2-normalised embeddings, averaged over all given triplets (zero-loss ones included).

    Call it as ``loss(embeddings (n, d) float, labels (n,) int64, (anchors, positives, negatives))``;
    it returns a scalar. With no triplet it returns a zero connected to ``embeddings``.
    """
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.reducers import MeanReducer

    return TripletMarginLoss(margin=float(beta), distance=LpDistance(normalize_embeddings=True, p=2, power=2),
                             reducer=MeanReducer())


def _triplet_stats(triplet_loss, embeddings, a, p, n):
    """Logged statistics of triplets (a, p, n): count, fraction with a positive hinge, mean squared
    distances (the loss's own distance and margin, on detached embeddings)."""
    if a.numel() == 0:
        return dict(tuples=0, active=0.0)
    with torch.no_grad():
        dist = triplet_loss.distance(embeddings.detach())
        d_ap, d_an = dist[a, p], dist[a, n]
        active = (triplet_loss.distance.margin(d_ap, d_an) + triplet_loss.margin > 0).float().mean()
    return dict(tuples=int(a.numel()), active=float(active), d_ap=float(d_ap.mean()), d_an=float(d_an.mean()))


def random_triplets(labels):
    """One positive and one negative per anchor, drawn uniformly (``torch.multinomial`` on torch's global
    RNG); anchors without a positive or a negative are skipped. Returns int64 tensors (a, p, n)."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos, neg = same & ~eye, ~same
    anchors = (pos.any(1) & neg.any(1)).nonzero().flatten()
    p = torch.multinomial(pos[anchors].float(), 1).flatten()
    n = torch.multinomial(neg[anchors].float(), 1).flatten()
    return anchors, p, n


class EuclideanTripletLoss(nn.Module):
    """The Euclidean triplet loss on batch-hard (``mining="batch-hard"``) or random triplets
    (``mining="triplet-random"``). ``stats`` holds the last batch's triplet statistics."""

    def __init__(self, mining, beta=1.0):
        super().__init__()
        if mining not in ("batch-hard", "triplet-random"):
            raise ValueError(f"mining must be 'batch-hard' or 'triplet-random', got {mining!r}")
        self.mining = mining
        self.triplet = euclidean_triplet_loss(beta)
        self.stats = {}

    def forward(self, embeddings, labels):
        labels = labels.to(embeddings.device)
        if self.mining == "batch-hard":
            a, p, n = batch_hard(F.normalize(embeddings.detach(), dim=1), labels, metric="euclidean")
        else:
            a, p, n = random_triplets(labels)
        self.stats = _triplet_stats(self.triplet, embeddings, a, p, n)
        return self.triplet(embeddings, labels, (a, p, n))


class PDDMTripletLoss(PDDMLoss):
    """PDDM mining with a Euclidean embedding loss only (the paper's "PDDM + triplet").

    ``PDDMLoss.forward`` with ``lam=0`` on detached embeddings trains the unit (metric hinge E_m); the
    network learns from ``lam`` x the Euclidean triplet loss on the mined triplets. The unit is
    ``self.unit`` as in ``PDDMLoss`` (same checkpoint keys). ``last_embedding_loss`` is the triplet loss.
    """

    def __init__(self, embedding_dim, *, alpha=0.5, beta=1.0, lam=0.5, k=1, **options):
        super().__init__(embedding_dim, alpha=alpha, beta=beta, lam=0.0, k=k, **options)
        self.triplet_weight = float(lam)
        self.triplet = euclidean_triplet_loss(beta)

    def forward(self, embeddings, labels):
        metric_loss = super().forward(embeddings.detach(), labels)  # mean E_m (+ 0 x E_e)
        a, p, n = self.last_quadruplets.as_triplets()
        embedding_loss = self.triplet(embeddings, labels.to(embeddings.device), (a, p, n))
        self.last_embedding_loss = embedding_loss.detach()
        return metric_loss + self.triplet_weight * embedding_loss


def build_loss(cfg, p):
    """The loss module for ``cfg.loss`` (a TrainConfig); ``p`` classes per batch fixes the default number
    of mined pairs ``cfg.mine_k or P K / 2``."""
    options = loss_options.loss_kwargs(cfg)  # every PDDMLoss option pddm-ext offers, from cfg
    options["k"] = cfg.mine_k or max(1, p * cfg.k // 2)
    if cfg.loss == "pddm":
        return PDDMLoss(cfg.embedding_dim, **options)
    if cfg.loss == "pddm-triplet":
        return PDDMTripletLoss(cfg.embedding_dim, **options)
    return EuclideanTripletLoss(cfg.loss, beta=cfg.beta)


def batch_stats(loss_fn):
    """Mining statistics of the last batch: tuples mined, fraction of active hinges, mean scores."""
    if isinstance(loss_fn, EuclideanTripletLoss):
        return dict(loss_fn.stats)
    quads = loss_fn.last_quadruplets
    out = dict(tuples=int(quads.anchor.numel()))
    if quads.anchor.numel():
        s = quads.scores
        out.update(s_pos=float(s[:, 0].mean()), s_neg=float(s[:, 1:].mean()),
                   # fraction of mined (pair, negative) where the negative scores above the positive
                   violated=float((s[:, 1:] >= s[:, :1]).float().mean()),
                   metric_loss=float(loss_fn.last_metric_loss), embedding_loss=float(loss_fn.last_embedding_loss))
    return out


def build_optimizer(cfg, model, loss_fn):
    """Adam over the network and the loss's parameters (the PDDM unit). With ``cfg.unit_lr`` set, the
    unit is a second param group with that learning rate; unset, one group at ``cfg.lr``."""
    if cfg.unit_lr is None or not list(loss_fn.parameters()):
        return torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), lr=cfg.lr)
    return torch.optim.Adam([dict(params=list(model.parameters())),
                             dict(params=list(loss_fn.parameters()), lr=cfg.unit_lr)], lr=cfg.lr)
