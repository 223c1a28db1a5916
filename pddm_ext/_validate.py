"""Input validation at the Python boundary (SPEC §6).

Every public entry point checks its inputs here before any kernel runs, and raises
``TypeError`` for a wrong type or ``ValueError`` for a wrong value, naming the argument and
what was expected. Kernels then assume valid input.
"""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PARAM_NAMES = ("W_u", "b_u", "W_v", "b_v", "W_c", "b_c", "w_s", "b_s")
METRICS = ("pddm", "euclidean")


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


def check_finite(name, t):
    # A data-dependent check: skipped while torch.compile traces (it would break the graph), and for
    # meta tensors, which hold no data (a device mismatch is then reported by check_same_device).
    if _is_compiling() or t.device.type == "meta":
        return
    if t.numel() > 0 and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_embeddings(name, t, d=None, d_from=None):
    """A (rows, d) float matrix with at least one row, finite; d_from names where d comes from."""
    check_float(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: expected at least one row, got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no features: got shape {tuple(t.shape)}")
    if d is not None and t.shape[1] != d:
        raise ValueError(f"{name} has {t.shape[1]} features, expected {d} to match {d_from}")
    check_finite(name, t)


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


def check_params(params, d, device):
    """The eight PDDM parameters, in PARAM_NAMES order, with consistent shapes for input dim d."""
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
        check_finite(name, p)


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
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors if t is not None) else torch.float32


def check_k(k):
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be a positive int or None, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1 (or None for all positive pairs), got {k}")
    return int(k)


def resolve_metric(metric, unit):
    if metric is None:
        return "euclidean" if unit is None else "pddm"
    if not isinstance(metric, str):
        raise TypeError(f"metric must be a str ({' or '.join(METRICS)}), got {type(metric).__name__}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "pddm" and unit is None:
        raise ValueError("metric='pddm' needs a PDDM unit: pass unit=")
    return metric


def check_bool(name, value):
    """A plain bool option (not a tensor, not an int)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__}")
    return value


def unit_form(unit, normalize_inputs):
    """The form of SPEC §1 ("Two forms") a call computes: ``normalize_inputs`` when given, else the
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
