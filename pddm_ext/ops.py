"""Thin wrappers around the C++ ops in ``torch.ops.pddm_ext``.

One wrapper per op, plus what ``torch.compile`` and autograd need: a fake (meta) kernel for each
op and the fused backward of ``scores`` registered with ``torch.library.register_autograd``.
The wrappers take validated, contiguous-or-not tensors of one float dtype (float32/float64);
public entry points (``functional.py``) validate first (docs/design.md, "Errors").

``METRICS`` is the one table of mining metrics: name -> fused op -> all-pairs scores -> reference score
function.
A new metric touches the schema (csrc/pddm_ext.cpp), its kernels, a row of this table, its
reference function (``pddm_ext.reference``) and its tests; everything else looks it up here.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import _extension, reference

# Loads the schemas and kernels, after checking that the extension was built for this torch.
_C = _extension.load()
_ops = torch.ops.pddm_ext


class MineResult(NamedTuple):
    """The fused mining op's outputs (docs/design.md, "Mining"), for m queries, n references and
    q mined pairs. Indices are int64, -1 meaning "no candidate" (its score is then meaningless);
    scores have the compute dtype.

    - ``hardest_positive`` (m,), ``hardest_positive_score`` (m,): argmin / min of S over row i's
      positive pairs;
    - ``hardest_negative`` (m,), ``hardest_negative_score`` (m,): argmax / max of S over the
      references whose label differs from the query's;
    - ``hardest_negative_of_ref`` (n,), ``hardest_negative_of_ref_score`` (n,): argmax / max of S over
      the queries whose label differs from reference r's;
    - ``pair_query`` (q,), ``pair_ref`` (q,), ``pair_score`` (q,): the ``k`` lowest-scoring positive
      pairs (i, r) by ascending S, ties by (i, r) ascending (batch mode: i < r).
    """

    hardest_positive: torch.Tensor
    hardest_positive_score: torch.Tensor
    hardest_negative: torch.Tensor
    hardest_negative_score: torch.Tensor
    hardest_negative_of_ref: torch.Tensor
    hardest_negative_of_ref_score: torch.Tensor
    pair_query: torch.Tensor
    pair_ref: torch.Tensor
    pair_score: torch.Tensor


class Metric(NamedTuple):
    """A row of ``METRICS``: how to mine with a metric and how the reference computes it.

    ``op``: the fused op's name in ``torch.ops.pddm_ext`` (its fake kernel is registered from this
    table); ``mine(x, x_labels, y, y_labels, params, k, normalize_inputs, product_dtype)`` calls it
    (``params`` is the unit's parameter tuple, or None when ``uses_unit`` is false;
    ``normalize_inputs`` selects the PDDM form and ``product_dtype`` the tile products' operand type
    (:func:`scores`); metrics without a unit ignore both); ``scores(x, y, params, normalize_inputs)``
    is the library's all-pairs (m, n) score matrix S of x (m, d) against y (n, d), not differentiated
    (what needs every candidate's score, e.g. ``PDDMLoss``'s semi-hard negatives, uses it);
    ``reference_scores(x, y, params, normalize_inputs)`` is the plain all-pairs (m, n) score matrix
    of ``pddm_ext.reference``."""

    op: str
    mine: Callable
    scores: Callable
    reference_scores: Callable
    uses_unit: bool


METRICS = {
    "pddm": Metric(
        op="mine_pddm",
        mine=lambda x, lx, y, ly, params, k, normalize_inputs, product_dtype: _ops.mine_pddm(
            x, lx, y, ly, *params, k, normalize_inputs, product_dtype),
        scores=lambda x, y, params, normalize_inputs: scores(x, y, *params, normalize_inputs),  # the fused op
        reference_scores=reference.SCORE_MATRICES["pddm"],
        uses_unit=True,
    ),
    "euclidean": Metric(
        op="mine_euclidean",
        mine=lambda x, lx, y, ly, params, k, normalize_inputs, product_dtype: _ops.mine_euclidean(x, lx, y, ly, k),
        scores=lambda x, y, params, normalize_inputs: -torch.cdist(x, y).pow(2),  # -||x_i - y_r||^2
        reference_scores=reference.SCORE_MATRICES["euclidean"],
        uses_unit=False,
    ),
}


def scores(x, y, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, normalize_inputs=True, product_dtype=None):
    """S[i, r] = PDDM(x_i, y_r) as an (m, n) tensor; ``y=None`` scores x against itself.

    ``normalize_inputs``: the input-normalised (True) or distance-aware (False) form
    (docs/design.md, "The two forms"). ``product_dtype``: None, or torch.float16 / torch.bfloat16
    when the float32 tensors hold half inputs: on a GPU with tensor cores for it (sm_80+) the tile
    products round their operands to that type and accumulate in float32 (docs/design.md#precision);
    the CPU and older GPUs compute float32. ``TypeError`` for another dtype, or with float64 tensors.
    The backward takes the same ``product_dtype``: on such a GPU it recomputes the forward with the same
    half products and runs its gradient products in that type too (operands scaled per pair by a power
    of two, so that small gradients do not underflow float16); elsewhere float32.
    """
    if product_dtype is None:
        return _ops.scores(x, y, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, normalize_inputs)
    return _ops.scores(x, y, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, normalize_inputs, product_dtype)


def mine(x, x_labels, y, y_labels, params, k, metric=None, normalize_inputs=True, product_dtype=None):
    """Fused per-row/column reductions and the k lowest positive pairs, as a :class:`MineResult`.

    ``metric``: a name in ``METRICS`` (default: "pddm" when ``params`` is given, else "euclidean").
    ``k``: -1 all pairs, 0 none. ``product_dtype``: as :func:`scores` (the PDDM metric only).
    Inputs must be valid (no checks here beyond the kernels' own structural ones): x (m, d), y (n, d)
    or None (batch mode), int64 labels, one float dtype.
    """
    if metric is None:
        metric = "euclidean" if params is None else "pddm"
    return MineResult(*METRICS[metric].mine(x, x_labels, y, y_labels, params, k, normalize_inputs, product_dtype))


# --- fake kernels: shapes and dtypes only, so torch.compile can trace the ops -----------------


_PARAM_NAMES = ("W_u", "b_u", "W_v", "b_v", "W_c", "b_c", "w_s", "b_s")


def _check_one_device(op, x, named):
    """Every tensor argument of a fake kernel on x's device (``ValueError`` naming the argument, as the
    C++ op_checks say): a call with one argument on ``meta`` dispatches here, and must raise rather
    than return uninitialised memory. Fake tensors under torch.compile / opcheck share one device."""
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"pddm_ext::{op}: {name} is on {t.device} but x is on {x.device}")


@torch.library.register_fake("pddm_ext::scores")
def _scores_fake(x, y, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, normalize_inputs=True, product_dtype=None):
    _check_one_device("scores", x, zip(("y", *_PARAM_NAMES), (y, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s)))
    n = x.shape[0] if y is None else y.shape[0]
    return x.new_empty((x.shape[0], n))


@torch.library.register_fake("pddm_ext::scores_backward")
def _scores_backward_fake(grad, x, y, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s, output_mask, normalize_inputs=True,
                          product_dtype=None):
    _check_one_device("scores_backward", x,
                      zip(("grad", "y", *_PARAM_NAMES), (grad, y, W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s)))
    # An input that needs no gradient (output_mask) gets an empty (0,) tensor.
    grad_x = torch.empty_like(x) if output_mask[0] else x.new_empty((0,))
    grad_y = torch.empty_like(y) if y is not None and output_mask[1] else x.new_empty((0,))
    params = (W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s)
    return (grad_x, grad_y, *(torch.empty_like(p) for p in params))


def _mine_fake(x, x_labels, y, y_labels, *params_and_k, **options):
    """The outputs of every mining op (``MineResult``): only x, y and the data-dependent pair count matter."""
    op = options.pop("_op", "mine")
    params = [t for t in params_and_k if isinstance(t, torch.Tensor)]
    _check_one_device(op, x, zip(("x_labels", "y", "y_labels", *_PARAM_NAMES), (x_labels, y, y_labels, *params)))
    m = x.shape[0]
    n = m if y is None else y.shape[0]
    ctx = torch.library.get_ctx()
    q = ctx.new_dynamic_size()  # number of mined pairs: data dependent
    idx = dict(dtype=torch.int64, device=x.device)
    return (
        torch.empty(m, **idx), x.new_empty(m), torch.empty(m, **idx), x.new_empty(m),
        torch.empty(n, **idx), x.new_empty(n), torch.empty(q, **idx), torch.empty(q, **idx), x.new_empty(q),
    )


for _metric in METRICS.values():
    torch.library.register_fake(f"pddm_ext::{_metric.op}")(
        lambda *args, _op=_metric.op, **options: _mine_fake(*args, _op=_op, **options))


# --- autograd: the fused backward of scores ----------------------------------------------------


def _scores_setup_context(ctx, inputs, output):
    # inputs[11], the product_dtype, reaches the backward: it computes the tile products as the forward did.
    tensors, ctx.normalize_inputs = inputs[:10], (inputs[10] if len(inputs) > 10 else True)
    ctx.product_dtype = inputs[11] if len(inputs) > 11 else None
    ctx.save_for_backward(*(t for t in tensors if t is not None))
    ctx.batch_mode = inputs[1] is None
    ctx.num_inputs = len(inputs)


def _scores_backward(ctx, grad):
    saved = ctx.saved_tensors
    if ctx.batch_mode:
        x, y, params = saved[0], None, saved[1:]
    else:
        x, y, params = saved[0], saved[1], saved[2:]
    needs = ctx.needs_input_grad
    mask = [bool(needs[0]), bool(needs[1]), any(needs[2:10])]
    if ctx.product_dtype is None:
        grads = _ops.scores_backward(grad, x, y, *params, mask, ctx.normalize_inputs)
    else:
        grads = _ops.scores_backward(grad, x, y, *params, mask, ctx.normalize_inputs, ctx.product_dtype)
    grad_x = grads[0] if needs[0] else None
    grad_y = grads[1] if (y is not None and needs[1]) else None
    grad_params = [g if need else None for g, need in zip(grads[2:], needs[2:10])]
    return (grad_x, grad_y, *grad_params) + (None,) * (ctx.num_inputs - 10)


torch.library.register_autograd("pddm_ext::scores", _scores_backward, setup_context=_scores_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "pddm_ext: double backward (differentiating the gradient of pddm_scores) is not supported"
    )


def _no_context(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "pddm_ext::scores_backward", _no_double_backward, setup_context=_no_context
)
