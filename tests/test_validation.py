"""docs/design.md#errors: every public entry point rejects bad input with ValueError (TypeError for a wrong type)
and a message that names the offending argument."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import pddm_ext
from pddm_ext.reference import PARAM_NAMES
from helpers import make_unit

G, D, H, C = 6, 4, 5, 3  # good batch: 6 rows of 4 features; unit widths h = 5, c = 3


def good_x():
    return torch.randn(G, D)


def labels_for(t):
    rows = t.shape[0] if isinstance(t, torch.Tensor) and t.dim() > 0 else 1
    return torch.arange(rows) % 2


def names(name):
    """A regex matching `name` as a whole word (so "x" does not match inside "expected")."""
    return rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])"


# --------------------------------------------------------------------------- embeddings


def _entry_points():
    """(id, call(bad), name the message must contain): the bad tensor in every embedding role."""
    unit = make_unit(D, H, C, dtype=torch.float32)
    params = unit.params()
    loss = pddm_ext.PDDMLoss(D, H, C)
    lab = torch.arange(G) % 2
    return [
        ("pddm_scores.x", lambda t: pddm_ext.pddm_scores(t, None, *params), "x"),
        ("pddm_scores.y", lambda t: pddm_ext.pddm_scores(good_x(), t, *params), "y"),
        ("PDDM.x", lambda t: unit(t), "x"),
        ("PDDM.y", lambda t: unit(good_x(), t), "y"),
        ("pair_scores.a", lambda t: pddm_ext.pair_scores(t, good_x(), params), "a"),
        ("pair_scores.b", lambda t: pddm_ext.pair_scores(good_x(), t, params), "b"),
        ("PDDM.pair_scores.a", lambda t: unit.pair_scores(t, good_x()), "a"),
        ("mine_hard", lambda t: pddm_ext.mine_hard(t, labels_for(t), unit), "embeddings"),
        ("mine_hard.euclidean", lambda t: pddm_ext.mine_hard(t, labels_for(t)), "embeddings"),
        ("mine_hard.ref_emb",
         lambda t: pddm_ext.mine_hard(good_x(), lab, unit, ref_emb=t, ref_labels=labels_for(t)), "ref_emb"),
        ("batch_hard", lambda t: pddm_ext.batch_hard(t, labels_for(t), unit), "embeddings"),
        ("batch_hard.ref_emb",
         lambda t: pddm_ext.batch_hard(good_x(), lab, ref_emb=t, ref_labels=labels_for(t)), "ref_emb"),
        ("PDDMLoss", lambda t: loss(t, labels_for(t)), "embeddings"),
    ]


ENTRY_IDS = [e[0] for e in _entry_points()]


def _nan():
    t = torch.randn(G, D)
    t[2, 1] = float("nan")
    return t


def _inf(sign=1.0):
    t = torch.randn(G, D)
    t[G - 1, D - 1] = sign * float("inf")
    return t


def _huge(sign=1.0):
    """Finite float32, but above the magnitude limit for d = 4 (4.6e18): squared distances overflow."""
    t = torch.randn(G, D)
    t[1, 2] = sign * 1e19
    return t


BAD_EMBEDDINGS = {
    "rank1": (lambda: torch.randn(D), ValueError, r"2-D"),
    "rank3": (lambda: torch.randn(G, 2, D), ValueError, r"2-D"),
    "rank0": (lambda: torch.tensor(1.0), ValueError, r"2-D"),
    "empty": (lambda: torch.randn(0, D), ValueError, r"empty"),
    "no_features": (lambda: torch.randn(G, 0), ValueError, r"features"),
    "int": (lambda: torch.randint(0, 5, (G, D)), ValueError, r"dtype"),
    "bool": (lambda: torch.ones(G, D, dtype=torch.bool), ValueError, r"dtype"),
    "complex": (lambda: torch.randn(G, D, dtype=torch.complex64), ValueError, r"dtype"),
    "nan": (_nan, ValueError, r"NaN"),
    "inf": (_inf, ValueError, r"Inf"),
    "-inf": (lambda: _inf(-1.0), ValueError, r"Inf"),
    "huge": (_huge, ValueError, r"above 4\.61e\+18 in magnitude .*overflow float32"),
    "-huge": (lambda: _huge(-1.0), ValueError, r"above 4\.61e\+18 in magnitude"),
    "list": (lambda: [[0.0] * D] * G, TypeError, r"Tensor"),
    "ndarray": (lambda: torch.randn(G, D).numpy(), TypeError, r"Tensor"),
}


@pytest.mark.parametrize("bad", list(BAD_EMBEDDINGS))
@pytest.mark.parametrize("entry", range(len(ENTRY_IDS)), ids=ENTRY_IDS)
def test_bad_embeddings(entry, bad):
    _, call, name = _entry_points()[entry]
    make, exc, what = BAD_EMBEDDINGS[bad]
    with pytest.raises(exc, match=names(name)) as info:
        call(make())
    assert re.search(what, str(info.value)), str(info.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_magnitude_limit_is_where_squared_distances_stop_being_finite(dtype):
    """Just below the limit every squared distance is finite and mining is right (against float64 on
    the same rows); just above it the input is refused. float32 and bfloat16 accumulate in float32
    (limit sqrt(3.4e38 / 4d)), float64 in float64."""
    from pddm_ext import _validate as V
    from pddm_ext import reference

    d = 8
    limit = V.magnitude_limit(torch.zeros(1, d, dtype=dtype))
    assert limit == pytest.approx((torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max
                                   / (4 * d)) ** 0.5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.zeros(6, d, dtype=torch.float64)
    x[0], x[1], x[2], x[3] = 0.99 * limit, -0.99 * limit, 0.9 * limit, -0.9 * limit
    x[4], x[5] = 0.3 * limit, 0.31 * limit
    x = x.to(dtype)
    got = pddm_ext.batch_hard(x, labels)
    want = reference.batch_hard(x.double(), labels)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    x[0, 0] = x[0, 0] * 1.02  # above the limit (bfloat16 rounds by at most 0.4%)
    with pytest.raises(ValueError, match=r"^embeddings contains a value above .*overflow float"):
        pddm_ext.batch_hard(x, labels)
    with V.asynchronous_checks(), pytest.raises(RuntimeError, match=r"embeddings contains NaN or Inf, or a value above"):
        pddm_ext.batch_hard(x, labels)  # the assert's text is fixed before the data is read: both causes
    x[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^embeddings contains NaN or Inf$"):  # eager: the cause that failed
        pddm_ext.batch_hard(x, labels)


@pytest.mark.parametrize("normalize", [True, False])
def test_pml_miner_refuses_rows_whose_norm_overflows(normalize):
    """With normalize=True a row whose norm overflows float32 would normalise to zeros (plausible
    garbage): the miner checks the input rows' magnitude before normalising."""
    miner = pddm_ext.PDDMMiner(pddm_ext.PDDM(D), normalize=normalize)
    with pytest.raises(ValueError, match=r"embeddings contains a value above"):
        miner.mine(_huge(), torch.arange(G) % 3, None, None)
    with pytest.raises(ValueError, match=r"ref_emb contains a value above"):
        miner.mine(good_x(), torch.arange(G) % 3, _huge(), torch.arange(G) % 3)


# Which argument the message must name when the bad tensor has d + 1 features: the first input is
# compared with the unit (W_u), a second input with the first, a/b of pair_scores with each other.
D_MISMATCH_NAME = {"pddm_scores.x": "W_u", "PDDM.x": "W_u", "mine_hard": "W_u", "batch_hard": "W_u",
                   "pair_scores.a": "a", "PDDM.pair_scores.a": "a", "mine_hard.euclidean": None}


@pytest.mark.parametrize("entry", range(len(ENTRY_IDS)), ids=ENTRY_IDS)
def test_feature_dimension_mismatch(entry):
    entry_id, call, name = _entry_points()[entry]
    name = D_MISMATCH_NAME.get(entry_id, name)
    if name is None:  # euclidean mining of one set of embeddings: any d is valid
        call(torch.randn(G, D + 1))
        return
    with pytest.raises(ValueError, match=names(name)):
        call(torch.randn(G, D + 1))


def test_pair_scores_row_count_mismatch():
    unit = make_unit(D, H, C, dtype=torch.float32)
    for call in (lambda a, b: unit.pair_scores(a, b), lambda a, b: pddm_ext.pair_scores(a, b, unit.params())):
        with pytest.raises(ValueError, match=r"rows") as info:
            call(torch.randn(3, D), torch.randn(4, D))
        assert re.search(names("a"), str(info.value)) and re.search(names("b"), str(info.value))


def test_mine_hard_euclidean_accepts_any_d():
    """Without a unit there is no W_u: any feature dimension is fine, but ref_emb must match."""
    pddm_ext.mine_hard(torch.randn(G, 7), labels_for(torch.randn(G)))
    with pytest.raises(ValueError, match=names("ref_emb")):
        pddm_ext.mine_hard(torch.randn(G, 7), labels_for(torch.randn(G)), ref_emb=torch.randn(3, 6),
                           ref_labels=torch.arange(3))


# --------------------------------------------------------------------------- parameters

SHAPES = {"W_u": (H, D), "b_u": (H,), "W_v": (H, D), "b_v": (H,), "W_c": (C, 2 * H), "b_c": (C,), "w_s": (C,),
          "b_s": ()}
# Wrong shapes that cannot be read as a different (h, c): h comes from W_u and c from W_c.
WRONG_SHAPES = [
    ("W_u", (H, D + 1)), ("W_u", (H * D,)), ("W_u", (1, H, D)),
    ("b_u", (H + 1,)), ("b_u", (H, 1)), ("b_u", ()),
    ("W_v", (H, D + 1)), ("W_v", (H + 1, D)), ("W_v", (D, H)),
    ("b_v", (H - 1,)), ("b_v", (1, H)),
    ("W_c", (C, 2 * H + 1)), ("W_c", (C, H)), ("W_c", (C * 2 * H,)),
    ("b_c", (C + 1,)), ("b_c", ()),
    ("w_s", (C + 1,)), ("w_s", (1, C)), ("w_s", ()),
    ("b_s", (1,)), ("b_s", (2,)), ("b_s", (1, 1)),
]


def _param_entry_points(params, unit):
    """(id, call) for every entry point that uses a unit or its parameters."""
    x = good_x()
    lab = labels_for(x)
    loss = pddm_ext.PDDMLoss(D, H, C)
    loss.unit = unit
    return [
        ("pddm_scores", lambda: pddm_ext.pddm_scores(x, None, *params)),
        ("pddm_scores.ref", lambda: pddm_ext.pddm_scores(x, x[:3], *params)),
        ("pair_scores", lambda: pddm_ext.pair_scores(x, x.flip(0), params)),
        ("PDDM", lambda: unit(x)),
        ("PDDM.ref", lambda: unit(x, x[:3])),
        ("PDDM.pair_scores", lambda: unit.pair_scores(x, x.flip(0))),
        ("mine_hard", lambda: pddm_ext.mine_hard(x, lab, unit)),
        ("mine_hard.ref", lambda: pddm_ext.mine_hard(x, lab, unit, ref_emb=x[:3], ref_labels=lab[:3])),
        ("batch_hard", lambda: pddm_ext.batch_hard(x, lab, unit)),
        ("PDDMLoss", lambda: loss(x, lab)),
    ]


PARAM_ENTRY_IDS = [e[0] for e in _param_entry_points((), None)]


def _unit_with(name, value):
    """A unit whose parameter `name` is replaced by `value` (kept as a Parameter, like a user would)."""
    unit = make_unit(D, H, C, dtype=torch.float32)
    setattr(unit, name, nn.Parameter(value, requires_grad=value.is_floating_point()))
    params = tuple(getattr(unit, n) for n in PARAM_NAMES)
    return unit, params


@pytest.mark.parametrize("entry", range(len(PARAM_ENTRY_IDS)), ids=PARAM_ENTRY_IDS)
@pytest.mark.parametrize("name,shape", WRONG_SHAPES, ids=[f"{n}{list(s)}" for n, s in WRONG_SHAPES])
def test_parameter_wrong_shape(name, shape, entry):
    unit, params = _unit_with(name, torch.randn(shape))
    entry_id, call = _param_entry_points(params, unit)[entry]
    with pytest.raises(ValueError, match=names(name)):
        call()


BAD_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf")}


@pytest.mark.parametrize("entry", range(len(PARAM_ENTRY_IDS)), ids=PARAM_ENTRY_IDS)
@pytest.mark.parametrize("bad", list(BAD_VALUES))
@pytest.mark.parametrize("name", PARAM_NAMES)
def test_parameter_not_finite(name, bad, entry):
    value = torch.randn(SHAPES[name])
    value.view(-1)[-1] = BAD_VALUES[bad]
    unit, params = _unit_with(name, value)
    _, call = _param_entry_points(params, unit)[entry]
    with pytest.raises(ValueError, match=names(name)) as info:
        call()
    assert re.search("NaN|Inf", str(info.value))


@pytest.mark.parametrize("name", PARAM_NAMES)
def test_parameter_wrong_dtype_or_type(name):
    unit = make_unit(D, H, C, dtype=torch.float32)
    params = list(unit.params())
    index = PARAM_NAMES.index(name)
    x = good_x()
    params[index] = torch.ones(SHAPES[name], dtype=torch.int64)
    with pytest.raises(ValueError, match=names(name)):
        pddm_ext.pddm_scores(x, None, *params)
    params[index] = [1.0]
    with pytest.raises(TypeError, match=names(name)):
        pddm_ext.pddm_scores(x, None, *params)


def test_unit_of_the_wrong_type():
    x = good_x()
    for call in (lambda: pddm_ext.mine_hard(x, labels_for(x), nn.Linear(D, D)),
                 lambda: pddm_ext.batch_hard(x, labels_for(x), "pddm")):
        with pytest.raises(TypeError, match=names("unit")):
            call()


def test_pddm_constructor_arguments():
    for bad in (0, -3):
        with pytest.raises(ValueError, match=names("in_features")):
            pddm_ext.PDDM(bad)
    for bad in (2.0, "4", True, None):
        with pytest.raises(TypeError, match=names("in_features")):
            pddm_ext.PDDM(bad)
    with pytest.raises(ValueError, match=names("hidden_features")):
        pddm_ext.PDDM(4, 0)
    with pytest.raises(TypeError, match=names("joint_features")):
        pddm_ext.PDDM(4, 3, 1.5)


# --------------------------------------------------------------------------- labels


def _label_entry_points():
    unit = make_unit(D, H, C, dtype=torch.float32)
    loss = pddm_ext.PDDMLoss(D, H, C)
    x = good_x()
    y = torch.randn(4, D)
    ly = torch.arange(4) % 2
    return [
        ("mine_hard", lambda lab: pddm_ext.mine_hard(x, lab, unit), "labels"),
        ("mine_hard.euclidean", lambda lab: pddm_ext.mine_hard(x, lab), "labels"),
        ("mine_hard.ref_labels", lambda lab: pddm_ext.mine_hard(x, labels_for(x), unit, ref_emb=y, ref_labels=lab),
         "ref_labels"),
        ("mine_hard.ref_mode_labels", lambda lab: pddm_ext.mine_hard(x, lab, unit, ref_emb=y, ref_labels=ly),
         "labels"),
        ("batch_hard", lambda lab: pddm_ext.batch_hard(x, lab, unit), "labels"),
        ("batch_hard.ref_labels", lambda lab: pddm_ext.batch_hard(x, labels_for(x), ref_emb=y, ref_labels=lab),
         "ref_labels"),
        ("PDDMLoss", lambda lab: loss(x, lab), "labels"),
    ]


LABEL_ENTRY_IDS = [e[0] for e in _label_entry_points()]

BAD_LABELS = {
    "too_short": (lambda n: torch.arange(n - 1), ValueError, r"length"),
    "too_long": (lambda n: torch.arange(n + 1), ValueError, r"length"),
    "float": (lambda n: torch.zeros(n), ValueError, r"integer"),
    "double": (lambda n: torch.arange(n, dtype=torch.float64), ValueError, r"integer"),
    "bool": (lambda n: torch.ones(n, dtype=torch.bool), ValueError, r"integer"),
    "2d": (lambda n: torch.zeros(n, 1, dtype=torch.int64), ValueError, r"1-D"),
    "scalar": (lambda n: torch.tensor(0), ValueError, r"1-D"),
    "list": (lambda n: list(range(n)), TypeError, r"Tensor"),
}


@pytest.mark.parametrize("bad", list(BAD_LABELS))
@pytest.mark.parametrize("entry", range(len(LABEL_ENTRY_IDS)), ids=LABEL_ENTRY_IDS)
def test_bad_labels(entry, bad):
    entry_id, call, name = _label_entry_points()[entry]
    make, exc, what = BAD_LABELS[bad]
    rows = 4 if name == "ref_labels" else G
    with pytest.raises(exc, match=names(name)) as info:
        call(make(rows))
    assert re.search(what, str(info.value)), str(info.value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8, torch.int64])
def test_integer_label_dtypes_are_accepted(dtype):
    """Any integer dtype is fine (labels on another device would be moved; only CPU here)."""
    x = good_x()
    lab = (torch.arange(G) % 3).to(dtype)
    unit = make_unit(D, H, C, dtype=torch.float32)
    want = pddm_ext.mine_hard(x, lab.long(), unit, k=None)
    got = pddm_ext.mine_hard(x, lab, unit, k=None)
    assert all(torch.equal(a, b) for a, b in zip(got[:5], want[:5])) and got.batch_mode == want.batch_mode
    assert got.anchor.dtype == torch.int64
    bh = pddm_ext.batch_hard(x, lab, unit, ref_emb=x[:4], ref_labels=lab[:4])
    assert all(t.dtype == torch.int64 for t in bh)
    loss = pddm_ext.PDDMLoss(D, H, C)
    torch.testing.assert_close(loss(x, lab), loss(x, lab.long()))


# --------------------------------------------------------------------------- k, metric, reference mode


@pytest.mark.parametrize("k", [0, -1, -100])
def test_k_below_one(k):
    x = good_x()
    unit = make_unit(D, H, C, dtype=torch.float32)
    with pytest.raises(ValueError, match=names("k")):
        pddm_ext.mine_hard(x, labels_for(x), unit, k=k)
    with pytest.raises(ValueError, match=names("k")):
        pddm_ext.mine_hard(x, labels_for(x), k=k)
    with pytest.raises(ValueError, match=names("k")):
        pddm_ext.PDDMLoss(D, k=k)


@pytest.mark.parametrize("k", [True, False, 1.5, 2.0, "3", torch.tensor([1, 2])], ids=["True", "False", "1.5", "2.0", "str", "tensor"])
def test_k_wrong_type(k):
    x = good_x()
    with pytest.raises(TypeError, match=names("k")):
        pddm_ext.mine_hard(x, labels_for(x), k=k)
    with pytest.raises(TypeError, match=names("k")):
        pddm_ext.PDDMLoss(D, k=k)


def test_k_accepts_python_and_numpy_integers():
    np = pytest.importorskip("numpy")
    x = good_x()
    lab = labels_for(x)
    want = pddm_ext.mine_hard(x, lab, k=2)
    got = pddm_ext.mine_hard(x, lab, k=np.int64(2))
    assert all(torch.equal(a, b) for a, b in zip(got[:5], want[:5])) and got.batch_mode == want.batch_mode


def test_unknown_metric():
    x = good_x()
    unit = make_unit(D, H, C, dtype=torch.float32)
    for fn in (pddm_ext.mine_hard, pddm_ext.batch_hard):
        with pytest.raises(ValueError, match=names("metric")):
            fn(x, labels_for(x), unit, metric="cosine")
        with pytest.raises(ValueError, match=names("metric")):
            fn(x, labels_for(x), metric="PDDM")
        with pytest.raises(TypeError, match=names("metric")):
            fn(x, labels_for(x), unit, metric=1)


def test_pddm_metric_needs_a_unit():
    x = good_x()
    for fn in (pddm_ext.mine_hard, pddm_ext.batch_hard):
        with pytest.raises(ValueError, match=names("unit")):
            fn(x, labels_for(x), metric="pddm")


def test_ref_emb_and_ref_labels_go_together():
    x = good_x()
    y = torch.randn(3, D)
    for fn in (pddm_ext.mine_hard, pddm_ext.batch_hard):
        with pytest.raises(ValueError, match=names("ref_labels")):
            fn(x, labels_for(x), ref_emb=y)
        with pytest.raises(ValueError, match=names("ref_emb")):
            fn(x, labels_for(x), ref_labels=torch.arange(3))


# --------------------------------------------------------------------------- devices


def test_inputs_on_different_devices():
    """Only a CPU here: the meta device stands in for "another device" (it has no data at all)."""
    unit = make_unit(D, H, C, dtype=torch.float32)
    x = good_x()
    meta = torch.randn(3, D, device="meta")
    with pytest.raises(ValueError, match=names("y")):
        unit(x, meta)
    with pytest.raises(ValueError, match=names("b")):
        pddm_ext.pair_scores(x[:3], meta, unit.params())
    with pytest.raises(ValueError, match=names("ref_emb")):
        pddm_ext.mine_hard(x, labels_for(x), unit, ref_emb=meta, ref_labels=torch.arange(3))
    with pytest.raises(ValueError, match=names("W_u")):
        pddm_ext.PDDM(D, H, C, device="meta")(x)
    params = [p.detach() for p in unit.params()]
    params[6] = params[6].to("meta")
    with pytest.raises(ValueError, match=names("w_s")):
        pddm_ext.pddm_scores(x, None, *params)


def test_meta_tensors_infer_shapes():
    """All inputs on the meta device: validation lets them through and the fake kernel gives shapes."""
    unit = pddm_ext.PDDM(D, H, C, device="meta")
    S = unit(torch.randn(3, D, device="meta"), torch.randn(5, D, device="meta"))
    assert S.shape == (3, 5) and S.device.type == "meta"


# --------------------------------------------------------------------------- not errors


def test_no_positive_or_no_negative_is_not_an_error():
    x = good_x()
    unit = make_unit(D, H, C, dtype=torch.float32)
    loss = pddm_ext.PDDMLoss(D, H, C)
    for lab in (torch.arange(G), torch.zeros(G, dtype=torch.int64)):
        assert pddm_ext.mine_hard(x, lab, unit).anchor.numel() == 0
        assert pddm_ext.batch_hard(x, lab, unit)[0].numel() == 0
        assert loss(x, lab).item() == 0.0


def test_single_row_is_valid():
    x = torch.randn(1, D)
    unit = make_unit(D, H, C, dtype=torch.float32)
    assert unit(x).shape == (1, 1)
    assert pddm_ext.mine_hard(x, torch.zeros(1, dtype=torch.int64), unit).anchor.numel() == 0


# --------------------------------------------------------------------------- the ops called directly

# torch.ops.pddm_ext.* skip the Python validation above; their kernels still check structure, so a
# wrong shape, dtype or label vector raises instead of reading or writing out of bounds (docs/design.md#errors).
_ops = torch.ops.pddm_ext


def _raw_args():
    unit = make_unit(8, 6, 5, dtype=torch.float32)
    params = [p.detach() for p in unit.params()]
    x, y = torch.randn(10, 8), torch.randn(7, 8)
    return x, y, params, torch.arange(10) % 3, torch.arange(7) % 3


def _with_param(params, name, value):
    return [value if n == name else p for n, p in zip(PARAM_NAMES, params)]


RAW_BAD = {
    "x_rank": lambda x, y, p: (x[0], None, p),
    "x_empty": lambda x, y, p: (x[:0], None, p),
    "x_width": lambda x, y, p: (torch.randn(10, 7), None, p),
    "y_width": lambda x, y, p: (x, torch.randn(7, 9), p),
    "y_empty": lambda x, y, p: (x, y[:0], p),
    "W_u_shape": lambda x, y, p: (x, y, _with_param(p, "W_u", torch.randn(6, 9))),
    "W_v_rows": lambda x, y, p: (x, y, _with_param(p, "W_v", torch.randn(5, 8))),
    "W_c_width": lambda x, y, p: (x, y, _with_param(p, "W_c", torch.randn(5, 11))),
    "b_c_len": lambda x, y, p: (x, y, _with_param(p, "b_c", torch.randn(4))),
    "w_s_len": lambda x, y, p: (x, y, _with_param(p, "w_s", torch.randn(6))),
    "b_s_len": lambda x, y, p: (x, y, _with_param(p, "b_s", torch.randn(2))),
}


@pytest.mark.parametrize("bad", list(RAW_BAD))
@pytest.mark.parametrize("op", ["scores", "scores_backward", "mine_pddm"])
def test_raw_ops_reject_bad_shapes(op, bad):
    x0, y0, params0, lx, ly = _raw_args()
    x, y, params = RAW_BAD[bad](x0, y0, params0)
    with pytest.raises(ValueError, match=f"pddm_ext::{op}"):
        if op == "scores":
            _ops.scores(x, y, *params)
        elif op == "scores_backward":
            n = x.shape[0] if y is None else y.shape[0]
            _ops.scores_backward(torch.ones(x.shape[0] if x.dim() else 1, n), x, y, *params, [True, True, True])
        else:
            labels_x = torch.arange(x.shape[0] if x.dim() else 1) % 3
            labels_y = None if y is None else torch.arange(y.shape[0]) % 3
            _ops.mine_pddm(x, labels_x, y, labels_y, *params, 1)


@pytest.mark.parametrize("grad_shape", [(3, 3), (10, 8), (7, 10), (10,)])
def test_raw_scores_backward_rejects_a_grad_of_the_wrong_shape(grad_shape):
    x, y, params, _, _ = _raw_args()
    with pytest.raises(ValueError, match="grad must have shape"):
        _ops.scores_backward(torch.ones(grad_shape), x, y, *params, [True, True, True])
    with pytest.raises(ValueError, match="grad must have shape"):
        _ops.scores_backward(torch.ones(grad_shape), x, None, *params, [True, False, True])


def test_raw_ops_reject_mixed_or_unsupported_dtypes():
    x, y, params, lx, _ = _raw_args()
    with pytest.raises(TypeError, match="y has dtype"):
        _ops.scores(x, y.double(), *params)
    with pytest.raises(TypeError, match="W_c has dtype"):
        _ops.scores(x, None, *_with_param(params, "W_c", params[4].double()))
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        _ops.mine_euclidean(x.half(), lx, None, None, 1)
    with pytest.raises(TypeError, match="grad has dtype"):
        _ops.scores_backward(torch.ones(10, 10, dtype=torch.float64), x, None, *params, [True, False, True])


@pytest.mark.parametrize("op", ["mine_pddm", "mine_euclidean"])
def test_raw_mining_ops_reject_bad_labels_and_k(op):
    x, y, params, lx, ly = _raw_args()
    unit_args = params if op == "mine_pddm" else []
    mine = getattr(_ops, op)
    with pytest.raises(ValueError, match="x_labels must have shape"):
        mine(x, lx[:9], None, None, *unit_args, 1)
    with pytest.raises(ValueError, match="y_labels must have shape"):
        mine(x, lx, y, ly[:5], *unit_args, 1)
    with pytest.raises(TypeError, match="x_labels must be int64"):
        mine(x, lx.int(), None, None, *unit_args, 1)
    with pytest.raises(ValueError, match="given together"):
        mine(x, lx, y, None, *unit_args, 1)
    with pytest.raises(ValueError, match="k must be"):
        mine(x, lx, None, None, *unit_args, -2)
    with pytest.raises(ValueError, match="y must be a non-empty"):
        mine(x, lx, torch.randn(7, 3), ly, *unit_args, 1)


# -- the "already validated" and "asynchronous checks" switches are per thread / per context ------------


def _nan_batch():
    bad = torch.randn(6, 4)
    bad[0, 0] = float("nan")
    return bad, torch.tensor([0, 0, 1, 1, 2, 2])


def test_a_memory_enqueue_in_another_thread_does_not_switch_off_nan_checks():
    import threading

    inside, release = threading.Event(), threading.Event()

    class SlowBank:  # any object with get()/enqueue() is a valid memory=
        def get(self):
            return None, None

        def enqueue(self, emb, labels):  # PDDMLoss calls this inside _validate.already_validated()
            inside.set()
            release.wait(30)

    loss_fn = pddm_ext.PDDMLoss(4, memory=SlowBank())
    x, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    t = threading.Thread(target=lambda: loss_fn(x, labels))
    t.start()
    try:
        assert inside.wait(30)
        bad, _ = _nan_batch()
        unit = pddm_ext.PDDM(4)
        with pytest.raises(ValueError, match="embeddings contains NaN or Inf"):
            pddm_ext.mine_hard(bad, labels, unit, k=None)
        with pytest.raises(ValueError, match="contains NaN or Inf"):
            unit(bad)
        with pytest.raises(ValueError, match="embeddings contains NaN or Inf"):
            pddm_ext.batch_hard(bad, labels)
    finally:
        release.set()
        t.join()


def test_a_users_enqueue_calling_pddm_ext_keeps_its_checks():
    seen = []

    class CheckingBank:
        def get(self):
            return None, None

        def enqueue(self, emb, labels):
            bad, _ = _nan_batch()
            with pytest.raises(ValueError, match="contains NaN or Inf"):
                pddm_ext.PDDM(4)(bad)
            seen.append(pddm_ext.PDDM(4)(emb).shape)  # the batch the loss validated is fine to use

    pddm_ext.PDDMLoss(4, memory=CheckingBank())(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert seen == [(6, 6)]


def test_asynchronous_checks_in_another_thread_keep_the_eager_value_error():
    import threading

    from pddm_ext import _validate as V

    inside, release = threading.Event(), threading.Event()

    def hold():
        with V.asynchronous_checks():
            inside.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert inside.wait(30)
        bad, _ = _nan_batch()
        with pytest.raises(ValueError, match="contains NaN or Inf"):
            pddm_ext.PDDM(4)(bad)
    finally:
        release.set()
        t.join()


# -- raw ops with one argument on meta reach the fake kernels, which must check devices ---------------


def _raw_cases():
    u = make_unit(D, H, C)
    params = [p.detach() for p in u.params()]
    x, lab = torch.randn(5, D), torch.tensor([0, 0, 1, 1, 2])

    def moved(i):
        return [p.to("meta") if j == i else p for j, p in enumerate(params)]

    ops = torch.ops.pddm_ext
    return [
        ("y", lambda: ops.scores(x, x.to("meta"), *params)),
        ("W_u", lambda: ops.scores(x, None, *moved(0))),
        ("y", lambda: ops.scores(x.to("meta"), x, *params)),  # x on meta, the rest on cpu
        ("b_s", lambda: ops.scores_backward(torch.randn(5, 5), x, None, *moved(7), [True, True, True])),
        ("grad", lambda: ops.scores_backward(torch.randn(5, 5, device="meta"), x, None, *params, [True, True, True])),
        ("w_s", lambda: ops.mine_pddm(x, lab, None, None, *moved(6), 2, True)),
        ("x_labels", lambda: ops.mine_euclidean(x, lab.to("meta"), None, None, 2)),
        ("y_labels", lambda: ops.mine_euclidean(x, lab, x, lab.to("meta"), 2)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_raw_ops_with_one_argument_on_meta_raise(case):
    name, call = _raw_cases()[case]
    with pytest.raises(ValueError, match=rf"pddm_ext::\w+: .*{names(name)}.* is on (meta|cpu) but x is on"):
        call()


def test_raw_scores_on_all_meta_inputs_still_give_shapes():
    u = make_unit(D, H, C)
    params = [p.detach().to("meta") for p in u.params()]
    out = torch.ops.pddm_ext.scores(torch.randn(5, D, device="meta"), torch.randn(3, D, device="meta"), *params)
    assert out.shape == (5, 3) and out.device.type == "meta"


# -- k beyond int64 is a ValueError naming k, at every entry point -------------------------------------


@pytest.mark.parametrize("k", [2**63, 2**64 + 5, 10**30])
@pytest.mark.parametrize("entry", ["mine_hard", "loss", "miner"])
def test_k_beyond_int64_is_rejected(entry, k):
    x, lab, u = torch.randn(6, D), torch.tensor([0, 0, 1, 1, 2, 2]), make_unit(D, H, C)
    with pytest.raises(ValueError, match=r"k must be at most 2\*\*63 - 1"):
        if entry == "mine_hard":
            pddm_ext.mine_hard(x, lab, u, k=k)
        elif entry == "loss":
            pddm_ext.PDDMLoss(D, k=k)
        else:
            pddm_ext.PDDMMiner(unit=u, k=k)


def test_the_largest_int64_k_means_all_pairs():
    x, lab, u = torch.randn(6, D), torch.tensor([0, 0, 1, 1, 2, 2]), make_unit(D, H, C)
    every = pddm_ext.mine_hard(x, lab, u, k=None)
    top = pddm_ext.mine_hard(x, lab, u, k=2**63 - 1)
    assert all(torch.equal(a, b) for a, b in zip(every, top) if isinstance(a, torch.Tensor))
    assert torch.equal(every.anchor, top.anchor) and every.anchor.numel() > 0


# -- Quadruplets.as_triplets checks that its fields have one length ----------------------------------


@pytest.mark.parametrize("field", ["anchor", "positive", "anchor_negative", "positive_negative"])
@pytest.mark.parametrize("ref", [False, True])
def test_as_triplets_rejects_fields_of_different_lengths(field, ref):
    x, lab, u = torch.randn(6, D), torch.tensor([0, 0, 1, 1, 2, 2]), make_unit(D, H, C)
    kwargs = dict(ref_emb=torch.randn(5, D), ref_labels=torch.tensor([0, 1, 2, 0, 1])) if ref else {}
    q = pddm_ext.mine_hard(x, lab, u, k=None, **kwargs)
    assert len(q.anchor) > 1
    short = q._replace(**{field: getattr(q, field)[:1]})
    with pytest.raises(ValueError, match=rf"Quadruplets fields must all have one length, .*{field} 1"):
        short.as_triplets()
    assert all(len(t) == len(q.as_triplets()[0]) for t in q.as_triplets())  # the unmodified one still works


# -- messages that name the argument and its real type; bool options; lam >= 0 ---------------------------


def test_pair_scores_with_a_module_as_params_names_params():
    u = make_unit(D, H, C)
    x = torch.randn(6, D)
    with pytest.raises(TypeError, match=r"params must be a tuple of the 8 parameters .*: pass unit.params\(\), got PDDM"):
        pddm_ext.pair_scores(x, x, u)
    with pytest.raises(TypeError, match=r"params must be a tuple .*got Tensor"):
        pddm_ext.pair_scores(x, x, u.W_u.detach())
    assert pddm_ext.pair_scores(x, x, u.params()).shape == (6,)
    assert pddm_ext.pair_scores(x, x, list(u.params())).shape == (6,)


def test_numpy_bool_is_accepted_as_a_bool_option():
    np = pytest.importorskip("numpy")
    u = pddm_ext.PDDM(D, normalize_inputs=np.bool_(False))
    assert u.normalize_inputs is False
    loss = pddm_ext.PDDMLoss(D, normalize=np.bool_(False), distributed=np.bool_(False))
    assert loss.normalize is False and loss.distributed is False
    with pytest.raises(TypeError, match="normalize_inputs must be a bool .*got numpy.int64"):
        pddm_ext.PDDM(D, normalize_inputs=np.int64(1))


@pytest.mark.parametrize("option", ["normalize", "distributed"])
@pytest.mark.parametrize("value", ["no", 1, None, torch.tensor(True)])
def test_pddm_loss_bool_options_must_be_bools(option, value):
    with pytest.raises(TypeError, match=rf"{option} must be a bool \(True or False\), got"):
        pddm_ext.PDDMLoss(D, **{option: value})


def test_pddm_loss_rejects_a_negative_lam():
    with pytest.raises(ValueError, match=r"lam must be >= 0, got -1.0"):
        pddm_ext.PDDMLoss(D, lam=-1.0)
    assert pddm_ext.PDDMLoss(D, lam=0.0).lam == 0.0
