"""``PDDM`` (the learned metric unit) and ``PDDMLoss`` (the paper's training loss); docs/design.md.

The core: this module imports neither the trainer integrations nor the application. ``PDDMLoss``'s
``memory=`` takes any object with the memory-bank protocol (``get()``, ``enqueue(embeddings, labels)``,
e.g. ``pddm_ext.MemoryBank``) and ``distributed=True`` uses the core's ``pddm_ext.collectives``.

In order: the loss's terms and negative policies (``balanced_pair_bce``, ``triplet_pair_bce``,
``semihard_negatives``, ``NEGATIVES``, ``mine_quadruplets``), ``LOSS_OPTIONS`` (each ``PDDMLoss`` option
declared once: what the constructor, its docstring and the training app read), ``PDDM``, then
``PDDMLoss``'s input checks and the class itself.
"""

from __future__ import annotations

import math
import textwrap
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _validate as V
from . import collectives, ops
from .functional import (Quadruplets, _check_pair_inputs, _mine_hard, _mining_inputs, _normalized_rows,
                         _pair_scores, pddm_scores)
from .reference import quadruplet_losses, triplet_losses



def _check_nonnegative(name, value):
    value = V.check_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _mean_or_zero(t):
    """mean(t), or 0 for an empty t, still connected to the graph; no data-dependent branch, so
    torch.compile traces it as one graph."""
    return t.sum() / torch.ones_like(t).sum().clamp_min(1)


def _check_indices_tuple(indices_tuple, rows, ref_rows, device):
    """``indices_tuple = (a, p, n)``: three 1-D integer index vectors of one length, a into the
    ``rows`` embeddings, p and n into the ``ref_rows`` references (the embeddings themselves unless
    ``ref_emb`` is given). Returned as int64 on ``device``."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) != 3:
        length = len(indices_tuple) if isinstance(indices_tuple, (tuple, list)) else "?"
        raise ValueError("indices_tuple must be a triplet tuple (anchors, positives, negatives), "
                         f"got {type(indices_tuple).__name__} of length {length}")
    a = V.check_indices("indices_tuple[0] (anchors)", indices_tuple[0], rows, "embeddings", device)
    p = V.check_indices("indices_tuple[1] (positives)", indices_tuple[1], ref_rows, "the references", device)
    n = V.check_indices("indices_tuple[2] (negatives)", indices_tuple[2], ref_rows, "the references", device)
    if not a.shape == p.shape == n.shape:
        raise ValueError(f"indices_tuple tensors must have one length, got {a.shape[0]}, {p.shape[0]}, {n.shape[0]}")
    return a, p, n


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
    (a batch of P x K has about P times more negative pairs than positive ones). A batch without a
    positive pair or without a negative pair gives 0, still connected to the graph (as the loss's
    other terms do when nothing is mined). Returns a 0-dim tensor.
    """
    m = scores.shape[0]
    upper = torch.ones(m, m, dtype=torch.bool, device=scores.device).triu(1)
    same = labels[:, None] == labels[None, :]
    # weights instead of boolean-mask indexing: no data-dependent shape, no host sync on CUDA
    pos, neg = (upper & same).to(scores.dtype), (upper & ~same).to(scores.dtype)
    n_pos, n_neg = pos.sum(), neg.sum()
    value = 0.5 * ((F.softplus(-scores) * pos).sum() / n_pos.clamp_min(1)
                   + (F.softplus(scores) * neg).sum() / n_neg.clamp_min(1))
    return value * ((n_pos > 0) & (n_neg > 0))


def triplet_pair_bce(positive, negative):
    """Balanced binary cross-entropy of given pairs: ``positive`` (t,) scores of pairs with target 1,
    ``negative`` (t,) of pairs with target 0 (e.g. each triplet's (a, p) and (a, n)), as logits:
    ``0.5 * (mean_t log(1 + exp(-S_ap)) + mean_t log(1 + exp(S_an)))``; 0 without a pair, still
    connected to the graph. Returns a 0-dim tensor."""
    return 0.5 * (_mean_or_zero(F.softplus(-positive)) + _mean_or_zero(F.softplus(negative)))


# --- PDDMLoss's negative policies and mining --------------------------------------------------


def _hardest_negatives(quads, labels, y_labels, score_matrix):
    """The paper's rule: the mining op's hardest negatives, as mined."""
    return quads


def _semihard_negatives(quads, labels, y_labels, score_matrix):
    """:func:`semihard_negatives` of the mined positive pairs under the same score; it needs every
    candidate's score: ``score_matrix()``, the batch's (m, n) matrix."""
    if quads.anchor.numel() == 0:
        return quads
    with torch.no_grad():
        S = score_matrix()
    i, r = quads.anchor, quads.positive
    a_neg, p_neg = semihard_negatives(S, labels[:, None] != y_labels[None, :], i, r)
    scores = torch.stack([S[i, r], S[i, a_neg], S[p_neg, r]], dim=1)
    return Quadruplets(i, r, a_neg, p_neg, scores, quads.batch_mode)


# PDDMLoss(negatives=): name -> policy(quadruplets, labels, y_labels, score_matrix) -> quadruplets
NEGATIVES = {"hardest": _hardest_negatives, "semihard": _semihard_negatives}


def mine_quadruplets(x, labels, y, y_labels, params, *, pairs, negatives, metric, normalize_inputs):
    """``PDDMLoss``'s quadruplets: the ``pairs`` (int or None: all) hardest positive pairs under the
    metric ``metric`` (a name in ``ops.METRICS``; ``params``, the unit's parameter tuple, is used when
    the metric uses the unit, in the form ``normalize_inputs``), with negatives picked by the policy
    ``NEGATIVES[negatives]`` under the same score (the metric's ``scores``). Inputs are validated and
    detached: x (m, d), y (n, d) or None (batch mode), one float dtype, int64 labels. Returns
    :class:`pddm_ext.Quadruplets`."""
    row = ops.METRICS[metric]
    params = params if row.uses_unit else None
    quads = _mine_hard(x, labels, y, y_labels, params, pairs, metric, normalize_inputs)
    y, y_labels = (x, labels) if y is None else (y, y_labels)
    return NEGATIVES[negatives](quads, labels, y_labels, lambda: row.scores(x, y, params, normalize_inputs))


# --- PDDMLoss's options: each declared once ---------------------------------------------------


class LossOption(NamedTuple):
    """One option of :class:`PDDMLoss`, declared once. The constructor (its default and check) and
    docstring read it here, and so does the training app (``pddm_ext.app.loss_options``: the flag
    and ``TrainConfig`` field, the value rule, ``compare``'s variants, the value of old runs).

    - ``name``; ``kind`` (float, int, bool or str); ``default`` (PDDMLoss's); ``help`` (what it does);
    - ``check(name, value) -> value``: PDDMLoss's validation (``TypeError`` for a wrong type,
      ``ValueError`` for a bad value, naming the option); None for the unit's options (``PDDM`` checks
      them);
    - ``choices``: the values of a str option;
    - ``rule``: the training app's value rule, ``(test, requirement[, label])`` checks in order (the
      first that fails gives "<label> must be <requirement>, got <value>"; label: the field);
    - ``field``: its ``TrainConfig`` field and ``pddm-ext`` flag (None: ``pddm-ext`` does not offer it);
    - ``legacy``: the value of runs saved before the option existed (their checkpoints and results
      resume and compare as that); None for an option every saved run has;
    - ``variants``: ``pddm-ext compare`` entries that set it, ``{entry: value}`` (an entry named by
      several options sets each of them).
    """

    name: str
    kind: type
    default: object
    help: str
    check: Callable | None
    choices: tuple = ()
    rule: tuple = ()
    field: str | None = None
    legacy: object = None
    variants: dict = {}


def _choice(choices):
    def check(name, value):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, one of {', '.join(map(repr, choices))}, got "
                            f"{type(value).__name__}")
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    return check


_FINITE = (math.isfinite, "finite")
_AT_LEAST_0 = ((lambda v: v >= 0), ">= 0")

# The table's order is the order of the checks, of the flags in ``pddm-ext --help`` and of the
# options in ``compare``'s reports.
LOSS_OPTIONS = {option.name: option for option in (
    LossOption("alpha", float, 0.5, "margin of the metric hinge E_m on the PDDM scores", V.check_number,
               rule=(_FINITE,), field="alpha"),
    LossOption("beta", float, 1.0, "margin of the embedding hinge E_e on squared distances", V.check_number,
               rule=(_FINITE,), field="beta"),
    # a negative weight would reward embedding-loss violations
    LossOption("lam", float, 0.5, "weight of the embedding loss E_e (>= 0)", _check_nonnegative,
               rule=(_FINITE, (lambda v: v >= 0, ">= 0", "lam (the embedding-loss weight)")), field="lam"),
    LossOption("k", int, 1, "positive pairs mined per batch, hardest first under the mining score (in batch mode "
               "unordered pairs {i, j}, each one quadruplet, i.e. two triplets); 1 is the paper's rule; "
               "PDDMLoss(k=None) mines every positive pair", lambda name, value: V.check_k(value),
               rule=(((lambda v: v >= 1), ">= 1"),), field="mine_k"),
    LossOption("negatives", str, "hardest", "hardest: the paper's hardest negatives; semihard: per pair the most "
               "similar negative that still scores below the positive pair (FaceNet's rule; builds the batch's "
               "(m, n) score matrix, n = m or the references' rows)", _choice(tuple(NEGATIVES)),
               choices=tuple(NEGATIVES), field="negatives", legacy="hardest",
               variants={"pddm-paper": "hardest", "pddm-hardest": "hardest", "pddm-semihard": "semihard",
                         "pddm-hardest-euclidean": "hardest"}),
    LossOption("bce_weight", float, 1.0, "weight of the balanced BCE pair term E_p (>= 0); 0 gives the paper's "
               "loss", _check_nonnegative, rule=(_AT_LEAST_0, _FINITE), field="bce_weight", legacy=0.0,
               variants={"pddm-paper": 0.0}),
    LossOption("normalize_inputs", bool, False, "the unit's form (PDDM(normalize_inputs=)): True is the paper "
               "as read, blind to the distance between a and b; False the distance-aware form", None,
               field="normalize_inputs", legacy=True, variants={"pddm-paper": True}),
    LossOption("unit_dropout", float, 0.0, "the unit's dropout p in [0, 1) (PDDM(dropout=))",
               V.check_probability),
    LossOption("mining", str, "pddm", "the metric that mines the quadruplets (a name in pddm_ext.ops.METRICS): "
               "pddm, the unit, or euclidean, -||a - b||^2 on every batch (the control that tells PDDM "
               "mining from the PDDM loss)", _choice(tuple(ops.METRICS)), choices=tuple(ops.METRICS),
               field="mining", legacy="pddm",
               variants={"pddm-euclidean": "euclidean", "pddm-hardest-euclidean": "euclidean"}),
    LossOption("warmup_steps", int, 0, "the first N training calls mine by Euclidean distance instead of by "
               "the mining metric; end_warmup() ends it early; its progress (warmup_done) is saved in the "
               "state_dict, and a state_dict from before the option loads with the warm-up over",
               lambda name, value: V.check_int(name, value, 0), rule=(_AT_LEAST_0,), field="warmup_steps",
               legacy=0, variants={"pddm-warmup": 100}),
    LossOption("normalize", bool, True, "L2-normalise the embeddings row-wise first", V.check_bool),
)}
_DEFAULT = {name: option.default for name, option in LOSS_OPTIONS.items()}


def _options_doc():
    """The options' list in ``PDDMLoss``'s docstring, from ``LOSS_OPTIONS``."""
    def line(o):
        values = f"{' or '.join(map(repr, o.choices))}, " if o.choices else ""
        return textwrap.fill(f"- ``{o.name}`` ({values}{o.kind.__name__}, default {o.default!r}): {o.help}.",
                             100, initial_indent="    ", subsequent_indent="      ")
    return "\n".join(line(o) for o in LOSS_OPTIONS.values())


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
    pairs. Each layer is initialised like ``nn.Linear``. Paper Sec. 3.1, Fig. 2; docs/design.md#the-pddm-unit.

    Raises ``TypeError`` for a width that is not an int (``in_features`` is required) and
    ``ValueError`` for a width < 1.

    ``normalize_inputs`` (bool, docs/design.md, "The two forms"): True is the form above (the paper as read:
    S ignores how far apart a and b are along a family of pairs with fixed directions of |a - b|
    and a + b); False is the distance-aware form u' = relu(W_u |a - b| + b_u),
    v' = relu(W_v (a + b) / 2 + b_v). It is saved in the state_dict; a state_dict from before the
    option loads as the input-normalised form it was trained with.

    ``dropout`` (p in [0, 1), default 0): inverted dropout on q in training mode. ``pair_scores``
    (the path the losses train through) draws one mask per pair, like ``nn.Dropout`` on a batch;
    the fused all-pairs ``unit(x[, y])`` draws one mask over the c joint units per call, shared by
    all its pairs, and applies it as a rescaled w_s (the kernels compute unchanged). Mining
    (``mine_hard``, ``batch_hard``) and evaluation mode never drop.
    """

    def __init__(self, in_features, hidden_features=None, joint_features=None, *, normalize_inputs=True,
                 dropout=0.0, device=None, dtype=None):
        super().__init__()
        self.normalize_inputs = V.check_bool("normalize_inputs", normalize_inputs)
        self.dropout = V.check_probability("dropout", dropout)
        if in_features is None:  # only the widths h and c have defaults
            raise TypeError("in_features must be an int, got NoneType")
        for name, value in (("in_features", in_features), ("hidden_features", hidden_features),
                            ("joint_features", joint_features)):
            if value is not None:
                V.check_int(name, value, 1)
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
        """All-pairs scores: x (m, d) -> (m, m), or x (m, d), y (n, d) -> (m, n); fused and
        differentiable; errors as ``pddm_ext.pddm_scores``."""
        return pddm_scores(x, y, *self._with_dropout(self.params()), normalize_inputs=self.normalize_inputs)

    def _with_dropout(self, params):
        """The parameter tuple for the fused all-pairs scores, with the training-mode dropout of q folded
        into w_s: one mask over the c joint units per call, shared by all pairs (q * mask / (1 - p) . w_s)."""
        p = self._active_dropout()
        if p == 0:
            return params
        keep = torch.bernoulli(torch.full_like(params[6], 1 - p, requires_grad=False))
        return params[:6] + (params[6] * keep / (1 - p), params[7])

    def pair_scores(self, a, b):
        """Scores of row-aligned pairs: a, b (p, d) -> (p,); differentiable; errors as
        ``pddm_ext.pair_scores``."""
        _check_pair_inputs(a, b, self.params())
        return self._pair_scores(a, b)

    def _pair_scores(self, a, b):
        # pair_scores without validation (the losses check their inputs once); accepts p = 0.
        return _pair_scores(a, b, self.params(), self.normalize_inputs, self._active_dropout())

    def _active_dropout(self):
        return self.dropout if self.training else 0.0

    # The form is state: a checkpoint must score the way it was trained.
    def get_extra_state(self):
        return {"normalize_inputs": self.normalize_inputs}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or not isinstance(state.get("normalize_inputs"), bool):
            raise ValueError(f"PDDM state_dict: _extra_state must be {{'normalize_inputs': bool}}, got {state!r}")
        self.normalize_inputs = state["normalize_inputs"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state_dict saved before normalize_inputs existed: that unit was the input-normalised form.
        if prefix + "W_u" in state_dict and prefix + "_extra_state" not in state_dict:
            state_dict[prefix + "_extra_state"] = {"normalize_inputs": True}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        extra = f", normalize_inputs={self.normalize_inputs}"
        extra += f", dropout={self.dropout}" if self.dropout > 0 else ""
        return (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
                f"joint_features={self.joint_features}{extra}")


class _Inputs(NamedTuple):
    """``PDDMLoss.forward``'s validated inputs: labels (int64 or None), the references' labels, the
    rows per rank (under a process group, else None), the memory bank's rows (None while empty or
    without a bank) and whether the batch is gathered from every rank."""

    labels: torch.Tensor | None
    ref_labels: torch.Tensor | None
    rows: list | None
    ref_rows: list | None
    bank_emb: torch.Tensor | None
    bank_labels: torch.Tensor | None
    gather: bool


def _check_arguments(loss, labels, indices_tuple, ref_emb, ref_labels):
    """Which arguments of ``loss.forward`` go together (the checks that read no tensor)."""
    if labels is None:
        if indices_tuple is None:
            raise TypeError("labels must be a torch.Tensor, got NoneType (labels may be None only with an "
                            "indices_tuple: the loss then uses the given triplets alone)")
        if ref_labels is not None:
            raise ValueError("ref_labels is given but labels is None: pass both or neither")
    elif (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together (reference mode) or not at all")
    if ref_emb is not None and loss.memory is not None:
        raise ValueError("ref_emb cannot be combined with memory=: the bank is the reference set")
    if indices_tuple is not None and (loss.memory is not None or loss.distributed):
        raise ValueError("indices_tuple cannot be combined with memory= or distributed=True: the loss mines itself")


def _memory_rows(memory, d, d_from, device, finite=True):
    """The bank's ``(embeddings, labels as int64)`` (``(None, None)`` while empty), validated."""
    bank_emb, bank_labels = memory.get()
    if bank_emb is None:
        return None, None
    V.check_embeddings("memory embeddings", bank_emb, d=d, d_from=d_from, finite=finite)
    return bank_emb, V.check_labels("memory labels", bank_labels, bank_emb.shape[0], device)


def _agree(loss, embeddings, labels, indices_tuple, ref_emb, ref_labels, params, d, d_from):
    """``distributed=True`` under a process group: every check whose outcome may differ between
    ranks (this rank's arguments, shard, references, unit parameters and memory bank) runs inside
    the ranks' agreement (``collectives.agree_on_batch``), so a problem on any rank raises the
    same error on every rank and no rank is left waiting in a collective."""
    bank = [None, None]

    def local_checks():  # after this rank's shard passed its structural checks
        _check_arguments(loss, labels, indices_tuple, ref_emb, ref_labels)
        if isinstance(ref_emb, torch.Tensor):
            V.check_same_device([("embeddings", embeddings), ("ref_emb", ref_emb)])
        V.check_params(params, d, embeddings.device, finite=False)
        finite = list(zip(V.PARAM_NAMES, params))
        if loss.memory is not None:
            bank[:] = _memory_rows(loss.memory, d, d_from, embeddings.device, finite=False)
            if bank[0] is not None:
                finite.append(("memory embeddings", bank[0], V.magnitude_limit(bank[0])))
        return finite

    labels, rows = collectives.agree_on_batch(embeddings, labels, d=d, d_from=d_from, check=local_checks,
                                              same={"ref_emb": ref_emb is not None})
    ref_rows = None
    if ref_emb is not None:  # given on every rank (agreed above)
        ref_labels, ref_rows = collectives.agree_on_batch(ref_emb, ref_labels, d=d, d_from=d_from,
                                                          names=("ref_emb", "ref_labels"))
    return _Inputs(labels, ref_labels, rows, ref_rows, *bank, gather=True)


def _checked_inputs(loss, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """Every input of ``loss.forward`` validated here, once (the mining and scoring after it take
    unchecked paths); under a process group with ``distributed=True`` the ranks agree (``_agree``),
    and an empty shard is legal."""
    d, d_from = loss.unit.in_features, "the loss's embedding_dim"
    params = loss.unit.params()
    if loss.distributed and collectives.world_size() > 1:
        return _agree(loss, embeddings, labels, indices_tuple, ref_emb, ref_labels, params, d, d_from)
    _check_arguments(loss, labels, indices_tuple, ref_emb, ref_labels)
    V.check_embeddings("embeddings", embeddings, d=d, d_from=d_from)
    if labels is not None:
        labels = V.check_labels("labels", labels, embeddings.shape[0], embeddings.device)
    if ref_emb is not None:
        V.check_embeddings("ref_emb", ref_emb, d=d, d_from=d_from)
        V.check_same_device([("embeddings", embeddings), ("ref_emb", ref_emb)])
        if ref_labels is not None:
            ref_labels = V.check_labels("ref_labels", ref_labels, ref_emb.shape[0], embeddings.device)
    V.check_params(params, d, embeddings.device)
    bank = (None, None) if loss.memory is None else _memory_rows(loss.memory, d, d_from, embeddings.device)
    return _Inputs(labels, ref_labels, None, None, *bank, gather=False)


def _loss_rows(t, dtype, normalize):
    """The rows ``PDDMLoss`` works on, in the compute dtype ``dtype`` (float32 for half inputs), then
    L2-normalised unless ``normalize`` is False. Normalising in half precision would turn a zero row
    into NaN (F.normalize's eps is 0 in float16) and a row whose norm overflows into zeros."""
    return _normalized_rows(t, dtype) if normalize else t.to(dtype)


def _batch_scores(unit, f):
    """``unit(f)`` without re-validating (done on entry): the fused (m, m) scores, with the unit's
    dropout (one mask per call, as ``PDDM.forward``) in training mode."""
    dtype = V.compute_dtype(f)
    params = unit._with_dropout(tuple(p.to(dtype) for p in unit.params()))
    return ops.scores(f.to(dtype), None, *params, unit.normalize_inputs)


class _EuclideanWarmUp:
    """``PDDMLoss``'s warm-up (``warmup_steps``): its first ``warmup_steps`` training calls mine by
    Euclidean distance. The progress ``warmup_done`` is state (the module's ``_extra_state``): a
    resumed run continues where it stopped."""

    @property
    def warming_up(self):
        """True while training batches are mined by Euclidean distance (the warm-up)."""
        return self.training and self.warmup_done < self.warmup_steps

    def end_warmup(self):
        """Ends the warm-up now: from the next batch on, mining uses the ``mining`` metric."""
        self.warmup_done = self.warmup_steps

    def get_extra_state(self):
        return {"warmup_done": self.warmup_done}

    def set_extra_state(self, state):
        done = state.get("warmup_done") if isinstance(state, dict) else None
        if isinstance(done, bool) or not isinstance(done, int):
            raise ValueError(f"PDDMLoss state_dict: _extra_state must be {{'warmup_done': int}}, got {state!r}")
        self.warmup_done = done

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state_dict saved before the warm-up existed: a run with no warm-up left to do.
        if prefix + "unit.W_u" in state_dict and prefix + "_extra_state" not in state_dict:
            state_dict[prefix + "_extra_state"] = {"warmup_done": self.warmup_steps}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _mined_rows(given, f, labels, f_ref, ref_labels):
    """The rows a PDDMLoss call mines: under ``distributed=True`` every rank's rows (and references),
    gathered; against a non-empty memory bank, the bank's rows as the references."""
    if given.gather:
        # Each rank holds the full dL/dtheta but only its own slice's dL/dx: global_batch scales the
        # slice's gradient by the world size, so DDP's average equals the single-process gradient.
        f, labels = collectives.global_batch(f, labels, rows=given.rows)
        if f_ref is not None:  # every rank's references too, by the same rule
            f_ref, ref_labels = collectives.global_batch(f_ref, ref_labels, rows=given.ref_rows)
    if given.bank_emb is not None:
        f_ref, ref_labels = given.bank_emb.to(device=f.device, dtype=f.dtype), given.bank_labels
    return f, labels, f_ref, ref_labels


class _LossTerms:
    """PDDMLoss's terms on mined quadruplets or given triplets: the double-header hinge E_m and the
    embedding hinge E_e (``pddm_ext.reference.quadruplet_losses`` / ``triplet_losses``, paper Eq. 5-7)
    weighted by ``lam``, plus ``bce_weight`` x the balanced pair BCE E_p; each call keeps its parts in
    ``last_*``. Reads ``unit``, ``alpha``, ``beta``, ``lam`` and ``bce_weight`` of the loss."""

    def _quadruplets_loss(self, f, f_ref, quads):
        """The loss on mined quadruplets (i, j, k, l): the anchor i and the positive's negative l index f
        (queries), the positive j and the anchor's negative k index f_ref (references)."""
        i, j, a_neg, p_neg = quads.anchor, quads.positive, quads.anchor_negative, quads.positive_negative
        self.last_quadruplets, self.last_triplets = quads, None
        score = self.unit._pair_scores  # unchecked: inputs were validated on entry
        return self._weighted(*quadruplet_losses(f[i], f_ref[j], f_ref[a_neg], f[p_neg], score, self.alpha, self.beta))

    def _triplets_loss(self, f, labels, f_ref, indices_tuple):
        """The loss on given triplets (a indexes f, p and n f_ref): one hinge header each, so twice their
        means; the pair term on the batch, or on the triplets' own pairs without labels."""
        a, p, n = _check_indices_tuple(indices_tuple, f.shape[0], f_ref.shape[0], f.device)
        self.last_quadruplets, self.last_triplets = None, (a, p, n)
        score = self.unit._pair_scores
        loss = self._weighted(*triplet_losses(f[a], f_ref[p], f_ref[n], score, self.alpha, self.beta), headers=2)
        if labels is None:
            return loss + self._weighted_pair(lambda: triplet_pair_bce(score(f[a], f_ref[p]), score(f[a], f_ref[n])))
        return loss + self._pair_term(f, labels)

    def _weighted(self, E_m, E_e, headers=1):
        """``headers`` x (mean(E_m) + lam mean(E_e)); the parts are kept in ``last_*``."""
        metric_loss, embedding_loss = _mean_or_zero(E_m), _mean_or_zero(E_e)
        if headers != 1:
            metric_loss, embedding_loss = headers * metric_loss, headers * embedding_loss
        self.last_metric_loss, self.last_embedding_loss = metric_loss.detach(), embedding_loss.detach()
        return metric_loss + self.lam * embedding_loss

    def _pair_term(self, f, labels):
        """bce_weight x the balanced BCE of the batch's own pair scores (0 when bce_weight = 0)."""
        return self._weighted_pair(lambda: balanced_pair_bce(_batch_scores(self.unit, f), labels))

    def _weighted_pair(self, pair_loss):
        """bce_weight x ``pair_loss()``, kept in ``last_pair_loss``; 0 (and None) when bce_weight = 0."""
        if self.bce_weight == 0:
            self.last_pair_loss = None
            return 0.0
        value = pair_loss()
        self.last_pair_loss = value.detach()
        return self.bce_weight * value


class PDDMLoss(_EuclideanWarmUp, _LossTerms, nn.Module):
    """The paper's loss: PDDM hard-quadruplet mining, a double-header hinge on the PDDM scores and
    a triplet-style embedding loss, trained end to end (paper Sec. 3.2, Eq. 5-8; docs/design.md, "Loss"),
    with a pair-classification term that keeps the unit from collapsing. ``forward(embeddings, labels)``:

    1. f = normalize(embeddings) row-wise (unless ``normalize=False``), in the compute dtype (float32
       for float16 / bfloat16 embeddings: a zero row stays 0, a row whose norm overflows is normalised);
    2. quadruplets (i, j, k, l) = :func:`mine_quadruplets` of f.detach(): the hardest positive pairs
       (i, j), ``self.k`` of them (a count, not the negative k), under the ``mining`` metric (the unit's
       S by default; -||a - b||^2 during the warm-up), each with the hardest (or semi-hard:
       :func:`semihard_negatives`) negatives k of i and l of j;
    3. S_ij, S_ik, S_jl recomputed with autograd (``unit.pair_scores``);
    4. E_m = [alpha + S_ik - S_ij]_+ + [alpha + S_jl - S_ij]_+;
    5. E_e = [beta + |f_i - f_j|^2 - |f_i - f_k|^2]_+ + [beta + |f_i - f_j|^2 - |f_j - f_l|^2]_+;
    6. loss = mean(E_m) + lam * mean(E_e) + bce_weight * E_p, with E_p the balanced BCE of the
       scores of all pairs of the batch (:func:`balanced_pair_bce` on ``unit(f)``).

    Steps 3-5 are ``pddm_ext.reference.quadruplet_losses`` (``triplet_losses`` for ``indices_tuple``),
    differentiated here. A batch without a quadruplet gives a zero still connected to the graph. The
    options, each declared once in ``LOSS_OPTIONS`` (a bad value raises ``ValueError``, ``TypeError``
    for a wrong type, naming it; evidence for the defaults in ``benchmarks/results/learning/``):

{options}

    ``embedding_dim`` (int >= 1), ``hidden_features``, ``joint_features``: the unit's widths (``PDDM``),
    ``self.unit``, whose parameters are this module's (give them to the optimiser); ``memory`` and
    ``distributed``: see ``forward``. With ``normalize_inputs=True, bce_weight=0`` and the other
    defaults this is the paper's loss exactly. The options are constructor arguments, not state; the
    warm-up's progress ``warmup_done`` is, and a state_dict from before it (or before the unit's form)
    loads as the run it was. ``last_quadruplets`` (or ``last_triplets``), ``last_metric_loss``,
    ``last_embedding_loss`` and ``last_pair_loss`` (None when ``bce_weight=0``) keep the last call's parts.
    """

    def __init__(self, embedding_dim, hidden_features=None, joint_features=None, *, alpha=_DEFAULT["alpha"],
                 beta=_DEFAULT["beta"], lam=_DEFAULT["lam"], k=_DEFAULT["k"], negatives=_DEFAULT["negatives"],
                 bce_weight=_DEFAULT["bce_weight"], warmup_steps=_DEFAULT["warmup_steps"],
                 normalize_inputs=_DEFAULT["normalize_inputs"], unit_dropout=_DEFAULT["unit_dropout"],
                 normalize=_DEFAULT["normalize"], mining=_DEFAULT["mining"], memory=None, distributed=False):
        given = dict(locals())  # the arguments, each option's value under its name
        super().__init__()
        V.check_int("embedding_dim", embedding_dim, 1)
        for option in LOSS_OPTIONS.values():  # self.<option> = its checked value; PDDM checks the unit's form
            if option.check is not None:
                setattr(self, option.name, option.check(option.name, given[option.name]))
        self.unit = PDDM(embedding_dim, hidden_features, joint_features, normalize_inputs=normalize_inputs,
                         dropout=unit_dropout)
        self.warmup_done = 0  # training calls mined by Euclidean distance so far (saved in the state_dict)
        self.memory = V.check_memory(memory, embedding_dim)
        self.distributed = V.check_bool("distributed", distributed)
        self.last_quadruplets = self.last_triplets = None
        self.last_metric_loss = self.last_embedding_loss = self.last_pair_loss = None

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """The loss, a 0-dim tensor in the compute dtype, of ``embeddings`` (m, embedding_dim) floating
        with ``labels`` (m,) integer (pytorch-metric-learning's loss signature). Every input is
        validated once on entry, the unit's parameters included (``TypeError``/``ValueError`` naming
        the argument, docs/design.md "Errors"); mining and scoring then take unchecked paths.

        - ``ref_emb`` (n, embedding_dim), ``ref_labels`` (n,): mine against these references (reference
          mode of ``mine_hard``: j, k index the references, i, l the queries).
        - ``memory=`` (``MemoryBank(size, d)`` or any object with ``get() -> (embeddings, labels)``, or
          ``(None, None)`` while empty, and ``enqueue(embeddings, labels)``): each batch is mined
          against the bank's detached rows (batch mode while it is empty), then enqueued.
        - ``distributed=True`` under ``torch.distributed``: mines the global batch (every rank's rows,
          ``collectives.global_batch``), each rank back-propagating through its own, so DDP's averaged
          gradients equal single-process training on the whole batch
          (``pddm_ext.integrations.distributed``). The ranks agree on every check first: a bad shard
          raises the same error on every rank, never a hang; an empty shard is legal.
        - ``indices_tuple=(a, p, n)`` (e.g. from ``PDDMMiner``; 1-D integer, one length, a indexing the
          embeddings, p and n the references): no mining, each triplet one header of the double hinge,
          ``2 (mean_t [alpha + S_an - S_ap]_+ + lam mean_t [beta + |f_a - f_p|^2 - |f_a - f_n|^2]_+)``;
          with ``labels=None`` (and ``ref_labels=None``) E_p is :func:`triplet_pair_bce` of the
          triplets' own pairs. ``labels=None`` without an ``indices_tuple`` is a ``TypeError``.
        """
        given = _checked_inputs(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)
        labels, ref_labels = given.labels, given.ref_labels
        dtype = V.compute_dtype(embeddings, ref_emb)
        f = _loss_rows(embeddings, dtype, self.normalize)
        f_ref = None if ref_emb is None else _loss_rows(ref_emb, dtype, self.normalize)
        if indices_tuple is not None:
            return self._triplets_loss(f, labels, f if f_ref is None else f_ref, indices_tuple)
        f, labels, f_ref, ref_labels = _mined_rows(given, f, labels, f_ref, ref_labels)
        quads = self._mine(f, labels, f_ref, ref_labels)
        loss = self._quadruplets_loss(f, f if f_ref is None else f_ref, quads) + self._pair_term(f, labels)
        if self.memory is not None:
            rows = f.detach()
            with V.already_validated(rows):  # f was checked on entry: the bank need not check it again
                self.memory.enqueue(rows, labels)
        return loss

    def _mine(self, f, labels, f_ref, ref_labels):
        """Quadruplets of the detached rows (``self.k``: the number of positive pairs), by Euclidean
        distance while warming up, else by the ``mining`` metric; a training call counts towards the warm-up."""
        x, y, params = _mining_inputs(f, f_ref, self.unit.params())
        warming_up = self.warming_up
        quads = mine_quadruplets(x, labels, y, None if f_ref is None else ref_labels, params, pairs=self.k,
                                 negatives=self.negatives, metric="euclidean" if warming_up else self.mining,
                                 normalize_inputs=self.unit.normalize_inputs)
        if warming_up:
            self.warmup_done += 1
        return quads

    def extra_repr(self):
        extra = f", mining={self.mining!r}" if self.mining != "pddm" else ""
        extra += f", memory={self.memory!r}" if self.memory is not None else ""
        extra += ", distributed=True" if self.distributed else ""
        return (f"alpha={self.alpha}, beta={self.beta}, lam={self.lam}, k={self.k}, negatives={self.negatives!r}, "
                f"bce_weight={self.bce_weight}, warmup_steps={self.warmup_steps}, normalize={self.normalize}{extra}")


PDDMLoss.__doc__ = PDDMLoss.__doc__.replace("{options}", _options_doc())
