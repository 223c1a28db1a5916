"""Input validation at the Python boundary (docs/design.md, "Errors").

Every public entry point checks its inputs here once, before any kernel runs, and raises
``TypeError`` for a wrong type or ``ValueError`` for a wrong value, naming the argument and
what was expected. Internal calls (the loss calling the miner, the miner calling the op) take
unchecked paths; kernels assume valid input.

Structural checks (type, dtype, rank, shape, device) read only metadata and cost nothing.
Data-dependent checks (NaN/Inf, index ranges) go through :func:`check_condition`:

* eager, on CPU: the condition is read at once and a ``ValueError`` naming the argument is raised
  (a CPU tensor's value is on the host: no synchronisation);
* on CUDA, while ``torch.compile`` traces, or inside :func:`asynchronous_checks`: the condition becomes
  ``torch._assert_async(cond, message)``, a device-side assert queued on the stream. The host never
  waits for it; a failure surfaces as a ``RuntimeError`` (CUDA: at the next synchronisation; compiled
  CPU code: when the graph runs, with the message). Results computed from the bad input are never
  returned as if they were valid.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PARAM_NAMES = ("W_u", "b_u", "W_v", "b_v", "W_c", "b_c", "w_s", "b_s")


def _is_compiling():
    return torch.compiler.is_compiling()


def check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(name, t):
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}"
        )


# Both switches are per thread and per asyncio task (contextvars): entering one in a thread never
# changes what another thread checks (the default context of a new thread starts with both unset).
_force_async = contextvars.ContextVar("pddm_ext_force_async", default=False)  # asynchronous_checks()
_validated = contextvars.ContextVar("pddm_ext_validated", default=())  # already_validated(*tensors)


@contextlib.contextmanager
def asynchronous_checks():
    """Within this block, data-dependent checks on CPU take the asynchronous path CUDA takes
    (``torch._assert_async``), so CPU tests can prove that validation never reads a tensor's value
    on the host (tests/test_layers.py). The switch is held in a ``contextvars.ContextVar``: it applies
    to the calling thread (or asyncio task) only; other threads keep the eager ``ValueError``."""
    token = _force_async.set(True)
    try:
        yield
    finally:
        _force_async.reset(token)


@contextlib.contextmanager
def already_validated(*tensors):
    """Within this block, the NaN/Inf check is skipped for exactly the given tensor objects
    (compared by identity, ``is``), which the caller has just checked: for a public entry point
    handing data it validated to another public entry point (PDDMLoss enqueueing its validated
    batch into ``memory``), so each tensor is checked once per call. Every other tensor is still
    checked, so a user's code called from inside (a custom memory's ``enqueue`` calling pddm_ext on
    its own tensors) keeps its checks; structural checks always run. The set is held in a
    ``contextvars.ContextVar``: it applies to the calling thread (or asyncio task) only."""
    token = _validated.set(_validated.get() + tuple(tensors))
    try:
        yield
    finally:
        _validated.reset(token)


def check_condition(cond, message, device, exc=ValueError):
    """Raises ``exc(message)`` unless the 0-dim bool tensor ``cond`` is true, without a host sync
    where reading ``cond`` would need one (module docstring). Meta tensors hold no data: skipped.
    ``message`` may be a callable ``message(eager)``: called with True when the failure is raised on
    the host (it may then read data to say more), with False for the asynchronous assert's text."""
    if device.type == "meta":
        return
    text = message if callable(message) else (lambda eager: message)
    if device.type == "cpu" and not (_is_compiling() or _force_async.get()):  # Dynamo cannot trace ContextVar.get
        if not bool(cond):
            raise exc(text(True))
        return
    torch._assert_async(cond, text(False))


def magnitude_limit(t):
    """The largest magnitude an entry of the (rows, d) embeddings ``t`` may have: ``sqrt(max / (4 d))``,
    ``max`` the largest finite value of :func:`compute_dtype`, the type distances are accumulated in
    (float64 for float64 inputs, else float32: 3.4e38). Below it every squared distance between two rows of ``d`` features (at most
    ``d (2 limit)^2``), every squared norm and every ``|x|^2 + |y|^2 - 2 x.y`` is finite; above it a
    finite input can give an infinite distance and a wrong choice (e.g. 3.3e18 for float32, d = 8;
    8.2e17 for d = 128)."""
    return math.sqrt(torch.finfo(compute_dtype(t)).max / (4 * t.shape[-1]))


def finite_condition(t, limit=None):
    """0-dim bool tensor: no NaN or Inf in ``t`` and, with ``limit``, no entry above it in magnitude
    (the infinity norm; NaN compares false)."""
    if limit is None:
        return torch.isfinite(t).all()
    return torch.linalg.vector_norm(t, ord=math.inf) <= limit


def finite_message(name, t, limit=None, eager=False):
    """The error of :func:`finite_condition`. One text for both causes where it must be fixed before
    the data can be read (the asynchronous assert, the ranks' agreement); ``eager``: the data is on the
    host, so the text names the cause that failed."""
    if limit is None or (eager and not bool(torch.isfinite(t).all())):
        return f"{name} contains NaN or Inf"
    acc = str(compute_dtype(t)).removeprefix("torch.")
    large = (f"a value above {limit:.3g} in magnitude (with {t.shape[-1]} features its squared distances would "
             f"overflow {acc}): scale the embeddings down")
    return f"{name} contains {large}" if eager else f"{name} contains NaN or Inf, or {large}"


def check_finite(name, t, limit=None):
    """No NaN or Inf in ``t`` and, with ``limit``, no entry above it in magnitude (ValueError naming
    ``name``; asynchronous on CUDA / under compile). Skipped for a tensor object the caller declared
    checked with :func:`already_validated` (not while torch.compile traces, which cannot read a
    ContextVar: there the check is an asynchronous assert)."""
    if t.numel() > 0 and (_is_compiling() or not any(t is v for v in _validated.get())):
        check_condition(finite_condition(t, limit), lambda eager: finite_message(name, t, limit, eager), t.device)


def check_embeddings(name, t, d=None, d_from=None, *, finite=True):
    """A (rows, d) float matrix with at least one row, finite and within :func:`magnitude_limit`
    (unless ``finite=False``: a caller that checks finiteness later, once); d_from names where d
    comes from."""
    check_float(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: expected at least one row, got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no features: got shape {tuple(t.shape)}")
    if d is not None and t.shape[1] != d:
        raise ValueError(f"{name} has {t.shape[1]} features, expected {d} to match {d_from}")
    if finite:
        check_finite(name, t, magnitude_limit(t))


def check_same_device(named):
    """named: list of (name, tensor); all must be on the device of the first."""
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: move them to one device")


def check_labels(name, labels, length, device):
    """1-D integer labels of the given length; returned as int64 on `device`."""
    check_tensor(name, labels)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != length:
        raise ValueError(f"{name} has length {labels.shape[0]}, expected {length} (one label per row)")
    return labels.to(device=device, dtype=torch.int64)


def check_params(params, d, device, *, finite=True):
    """The eight PDDM parameters, in PARAM_NAMES order, with consistent shapes for input dim d, finite
    (unless ``finite=False``: a caller that checks finiteness itself, e.g. across ranks).
    ``params`` must be a tuple or list (``TypeError`` naming params otherwise, e.g. for a PDDM module)."""
    if not isinstance(params, (tuple, list)):
        hint = ": pass unit.params()" if hasattr(params, "params") else ""
        raise TypeError(f"params must be a tuple of the {len(PARAM_NAMES)} parameters {PARAM_NAMES}{hint}, "
                        f"got {type(params).__name__}")
    if len(params) != len(PARAM_NAMES):
        raise ValueError(f"expected {len(PARAM_NAMES)} parameters {PARAM_NAMES}, got {len(params)}")
    for name, p in zip(PARAM_NAMES, params):
        check_float(name, p)
    W_u, b_u, W_v, b_v, W_c, b_c, w_s, b_s = params
    if W_u.dim() != 2:
        raise ValueError(f"W_u must be 2-D (h, d), got shape {tuple(W_u.shape)}")
    h = W_u.shape[0]
    if W_u.shape[1] != d:
        raise ValueError(f"W_u has shape {tuple(W_u.shape)}: its d = {W_u.shape[1]} does not match the inputs' d = {d}")
    if W_c.dim() != 2 or W_c.shape[1] != 2 * h:
        raise ValueError(f"W_c must have shape (c, 2h) = (c, {2 * h}), got {tuple(W_c.shape)}")
    c = W_c.shape[0]
    if h == 0 or c == 0:
        raise ValueError(f"hidden and joint widths must be positive, got h = {h}, c = {c}")
    expected = {"W_u": (h, d), "b_u": (h,), "W_v": (h, d), "b_v": (h,), "W_c": (c, 2 * h), "b_c": (c,),
                "w_s": (c,), "b_s": ()}
    for name, p in zip(PARAM_NAMES, params):
        if tuple(p.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(p.shape)}")
        if p.device != device:
            raise ValueError(f"{name} is on {p.device} but the inputs are on {device}: move them to one device")
        if finite:
            check_finite(name, p)


def check_indices(name, idx, rows, rows_from, device):
    """A 1-D integer index vector into ``rows`` rows (named by ``rows_from``), every entry in
    [0, rows): no negative index wraps around, no float is truncated. Returned as int64 on ``device``.
    Lists and tuples of ints are accepted as by ``torch.as_tensor``."""
    if not isinstance(idx, torch.Tensor):
        if not isinstance(idx, (list, tuple)):
            raise TypeError(f"{name} must be a torch.Tensor of indices, got {type(idx).__name__}")
        idx = torch.as_tensor(idx, dtype=torch.int64 if len(idx) == 0 else None)
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"{name} must have an integer dtype, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    idx = idx.to(device=device, dtype=torch.int64)
    if idx.numel() > 0:
        in_range = ((idx >= 0) & (idx < rows)).all()
        check_condition(in_range, f"{name} has an index outside [0, {rows}) (the rows of {rows_from})", device)
    return idx


def check_int(name, value, minimum):
    """``value`` as an int >= ``minimum``: TypeError naming ``name`` for anything but an int (bool
    included), ValueError naming it below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_number(name, value):
    """A finite real number (a loss margin or weight); returned as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_memory(memory, dim):
    """The memory-bank protocol ``PDDMLoss(memory=...)`` relies on, checked by duck typing so that
    the core never imports the integrations: ``get() -> (embeddings, labels) or (None, None)`` and
    ``enqueue(embeddings, labels)``; a ``dim`` attribute, when present, must equal ``dim``."""
    if memory is None:
        return None
    for method in ("get", "enqueue"):
        if not callable(getattr(memory, method, None)):
            raise TypeError(
                "memory must be a pddm_ext.MemoryBank or another memory bank with get() and "
                f"enqueue(embeddings, labels), got {type(memory).__name__}"
            )
    mem_dim = getattr(memory, "dim", dim)
    if mem_dim != dim:
        raise ValueError(f"memory has dim {mem_dim}, expected {dim} to match embedding_dim")
    return memory


def unit_params(unit):
    """The parameters of a PDDM unit (a module with attributes W_u ... b_s) as a tuple."""
    missing = [n for n in PARAM_NAMES if not hasattr(unit, n)]
    if missing:
        raise TypeError(
            f"unit must be a pddm_ext.PDDM (a module with parameters {', '.join(PARAM_NAMES)}), "
            f"got {type(unit).__name__}"
        )
    return tuple(getattr(unit, n) for n in PARAM_NAMES)


def compute_dtype(*tensors):
    """float64 if any input is float64, else float32 (half inputs are stored and computed in float32
    around the tile products: :func:`product_dtype`)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors if t is not None) else torch.float32


HALF_DTYPES = (torch.float16, torch.bfloat16)


def product_dtype(*embeddings):
    """The ``product_dtype`` of the fused scores and mining ops for these embeddings (None entries
    skipped): float16 or bfloat16 when every one of them has that one half dtype, else None
    (docs/design.md#precision: the tile products of half inputs run in their type on GPUs with tensor
    cores for it; the CPU and older GPUs compute them in float32). The parameters' dtype does not
    decide; the products round them to this type."""
    dtypes = {t.dtype for t in embeddings if t is not None}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in HALF_DTYPES else None


def check_product_range(params, dtype):
    """float16 tile products take W_u and W_c rounded to float16: an entry beyond its range (65504)
    would become inf. ``ValueError`` naming the parameter (asynchronous on CUDA, as check_finite)."""
    if dtype != torch.float16:
        return
    limit = torch.finfo(torch.float16).max
    for name, p in (("W_u", params[0]), ("W_c", params[4])):
        if p.dtype != torch.float16 and p.numel() > 0:
            check_condition(p.detach().abs().max() <= limit,
                            f"{name} has entries beyond float16's range ({limit:g}), which the float16 tile "
                            f"products of float16 inputs cannot hold: upcast the inputs to float32", p.device)


INT64_MAX = 2**63 - 1


def check_k(k):
    """The number of positive pairs to mine: None (all) or an int in [1, 2**63 - 1] (the kernels' int64);
    TypeError for a non-int, ValueError naming ``k`` outside that range."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be a positive int or None, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1 (or None for all positive pairs), got {k}")
    if k > INT64_MAX:
        raise ValueError(f"k must be at most 2**63 - 1 (or None for all positive pairs), got {k}")
    return int(k)


def resolve_metric(metric, unit):
    """The metric's name in ``ops.METRICS``; None means "pddm" with a unit, else "euclidean"."""
    from .ops import METRICS  # the one table of metrics

    if metric is None:
        return "euclidean" if unit is None else "pddm"
    names = tuple(METRICS)
    if not isinstance(metric, str):
        raise TypeError(f"metric must be a str ({' or '.join(names)}), got {type(metric).__name__}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {names}, got {metric!r}")
    if METRICS[metric].uses_unit and unit is None:
        raise ValueError(f"metric={metric!r} needs a PDDM unit: pass unit=")
    return metric


def check_bool(name, value):
    """A plain bool option (not a tensor, not an int); NumPy's bool scalar is accepted and returned as bool."""
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    if not isinstance(value, bool):
        kind = type(value).__name__ if type(value).__module__ == "builtins" else f"{type(value).__module__}.{type(value).__name__}"
        raise TypeError(f"{name} must be a bool (True or False), got {kind}")
    return value


def unit_form(unit, normalize_inputs):
    """The form (docs/design.md, "The two forms") a call computes: ``normalize_inputs`` when given, else the
    unit's own (``PDDM.normalize_inputs``; True for a unit without one, e.g. a parameter tuple)."""
    if normalize_inputs is None:
        normalize_inputs = getattr(unit, "normalize_inputs", True)
    return check_bool("normalize_inputs", normalize_inputs)


def check_probability(name, p):
    """A dropout probability: a real number in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    if not 0 <= p < 1:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)
