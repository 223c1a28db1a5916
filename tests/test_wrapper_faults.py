"""Faults found by running the package inside the wrappers users already run (pytorch-metric-learning's
losses and miners, a trainer's validation loop), each tested as a family:

- half-precision rows (float16, bfloat16) are L2-normalised in float32 by ``PDDMMiner(normalize=True)``
  and ``PDDMLoss``: zero rows, tiny rows and rows whose norm overflows float16 mine and score as the
  float64 oracle does (docs/design.md, "Public API": half inputs are computed in float32);
- ``PDDMLoss(embeddings, None, indices_tuple)`` (pytorch-metric-learning's call without labels) is the
  loss on the given triplets with the pair term on the triplets' own pairs (docs/design.md, "Loss");
- a ``MemoryBank`` filled under ``torch.inference_mode()`` or ``torch.no_grad()`` can be written later;
- every conversion ``nn.Module`` offers either follows ``MemoryBank``'s dtype rule or is not offered;
- every bool parameter of every public constructor rejects a non-bool with a ``TypeError`` naming it.
"""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pddm_ext
import pddm_ext.integrations.distributed
import pddm_ext.integrations.memory
import pddm_ext.integrations.miners
from pddm_ext import reference
from helpers import MINING_TOL, randn

D = 6
HALF = [torch.float16, torch.bfloat16]


def names(name):
    return rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])"


# --------------------------------------------------------------------------- half-precision rows


def awkward_rows(dtype, seed):
    """12 rows of 3 classes in ``dtype``: random rows plus two zero rows, two tiny rows (float16
    subnormals) and two rows whose norm (about 6.7e4) overflows float16 while every entry fits."""
    x = randn(12, D, dtype=torch.float32, seed=seed)
    x[0] = 0
    x[7] = 0
    x[1] = x[1] * 1e-6
    x[5] = x[5] * 3e-7
    big = torch.tensor([3e4, -2.5e4, 4e4, 1e4, -3e4, 2e4])
    x[2] = big
    x[9] = -big.flip(0)
    return x.to(dtype), torch.arange(12) % 3


def oracle(x, labels, unit):
    """The float64 score matrix of the L2-normalised rows (``pddm_ext.reference``) and the positive mask."""
    f = F.normalize(x.double(), dim=1)
    S, positive, *_ = reference.hardest(f, labels, unit, metric=None if unit is not None else "euclidean")
    return S, positive


def assert_best(value, best, what):
    tol = MINING_TOL[torch.float32]
    assert abs(value - best) <= tol * (1 + abs(best)), f"{what}: {value} vs the oracle's best {best}"


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_miner_normalises_half_rows_in_float32(dtype, metric, seed):
    x, labels = awkward_rows(dtype, seed)
    unit = pddm_ext.PDDM(D, dtype=torch.float64) if metric == "pddm" else None
    miner = pddm_ext.PDDMMiner(unit=unit, k=None)
    a, p, n = miner(x, labels)
    q = miner.last_quadruplets
    S, positive = oracle(x, labels, unit)
    negative = ~positive & (labels[:, None] != labels[None, :])
    # every positive pair is mined (k=None), each with the oracle's hardest negatives
    want_pairs = {(i, r) for i, r in positive.triu(1).nonzero().tolist()}
    assert set(zip(q.anchor.tolist(), q.positive.tolist())) == want_pairs
    for i, r, k, l_ in zip(*(t.tolist() for t in q[:4])):
        assert negative[i, k] and negative[l_, r]
        assert_best(S[i, k].item(), S[i][negative[i]].max().item(), f"anchor negative of {i}")
        assert_best(S[l_, r].item(), S[:, r][negative[:, r]].max().item(), f"positive negative of {r}")
    # the scores the miner reports are the oracle's, at float32 precision
    idx = (q.anchor, q.positive), (q.anchor, q.anchor_negative), (q.positive_negative, q.positive)
    want = torch.stack([S[i, j] for i, j in idx], dim=1).float()
    torch.testing.assert_close(q.scores, want, rtol=1e-4, atol=1e-4)
    assert len(a) == len(p) == len(n) == 2 * len(want_pairs)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_batch_hard_mode_of_the_miner_on_half_rows(dtype):
    x, labels = awkward_rows(dtype, 3)
    unit = pddm_ext.PDDM(D, dtype=torch.float64)
    a, p, n = pddm_ext.PDDMMiner(unit=unit, mode="batch_hard")(x, labels)
    S, positive = oracle(x, labels, unit)
    negative = labels[:, None] != labels[None, :]
    assert a.tolist() == list(range(12))
    for i, pi, ni in zip(a.tolist(), p.tolist(), n.tolist()):
        assert_best(S[i, pi].item(), S[i][positive[i]].min().item(), f"hardest positive of {i}")
        assert_best(S[i, ni].item(), S[i][negative[i]].max().item(), f"hardest negative of {i}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_reference_mode_of_the_miner_on_half_rows(dtype):
    x, labels = awkward_rows(dtype, 4)
    y, y_labels = awkward_rows(dtype, 5)
    a, p, n = pddm_ext.PDDMMiner(k=None)(x, labels, y, y_labels)
    f, g = F.normalize(x.double(), dim=1), F.normalize(y.double(), dim=1)
    S = -torch.cdist(f, g).pow(2)
    for i, r, k in zip(a.tolist(), p.tolist(), n.tolist()):
        assert labels[i] == y_labels[r] and labels[i] != y_labels[k]
        assert_best(S[i, k].item(), S[i][labels[i] != y_labels].max().item(), f"anchor negative of {i}")
    # every same-label pair but the self-copies (equal rows as mined: normalised in float32) is mined
    fx, fy = F.normalize(x.float(), dim=1), F.normalize(y.float(), dim=1)
    copies = (fx[:, None, :] == fy[None, :, :]).all(-1)
    assert copies.any()  # the zero and the overflowing rows stand in both sets
    assert len(a) == int(((labels[:, None] == y_labels[None, :]) & ~copies).sum())


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_the_loss_computes_half_rows_in_float32(dtype, normalize):
    x, labels = awkward_rows(dtype, 6)
    if not normalize:
        x = (x.float() * 1e-4).to(dtype)  # in range for the distance-aware unit
    torch.manual_seed(0)
    loss_fn = pddm_ext.PDDMLoss(D, k=None, normalize=normalize)
    want = copy.deepcopy(loss_fn).double()(x.double(), labels)
    x = x.clone().requires_grad_()
    got = loss_fn(x, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    got.backward()
    assert x.grad is not None and x.grad.dtype == dtype


# --------------------------------------------------------------------------- labels=None + indices_tuple


def _triplet_case(**options):
    torch.manual_seed(0)
    loss_fn = pddm_ext.PDDMLoss(D, k=None, **options).double()
    x = randn(7, D, seed=11)
    triplets = (torch.tensor([0, 2, 6, 0]), torch.tensor([1, 3, 5, 1]), torch.tensor([4, 5, 1, 3]))
    return loss_fn, x, triplets


def hand_loss(loss_fn, f, f_ref, triplets, bce_weight):
    a, p, n = triplets
    params = loss_fn.unit.params()
    form = loss_fn.unit.normalize_inputs
    S_ap = reference.pair_scores(f[a], f_ref[p], params, form)
    S_an = reference.pair_scores(f[a], f_ref[n], params, form)
    d_ap, d_an = ((f[a] - f_ref[p]) ** 2).sum(1), ((f[a] - f_ref[n]) ** 2).sum(1)
    triplet = (2 * torch.clamp(loss_fn.alpha + S_an - S_ap, min=0).mean()
               + loss_fn.lam * 2 * torch.clamp(loss_fn.beta + d_ap - d_an, min=0).mean())
    pair = 0.5 * (torch.log1p(torch.exp(-S_ap)).mean() + torch.log1p(torch.exp(S_an)).mean())
    return triplet + bce_weight * pair


@pytest.mark.parametrize("bce_weight", [0.0, 0.7])
def test_without_labels_the_loss_uses_the_triplets_own_pairs(bce_weight):
    loss_fn, x, triplets = _triplet_case(bce_weight=bce_weight)
    f = F.normalize(x, dim=1)
    got = loss_fn(x, None, triplets)
    torch.testing.assert_close(got, hand_loss(loss_fn, f, f, triplets, bce_weight), rtol=1e-12, atol=1e-12)
    assert (loss_fn.last_pair_loss is None) == (bce_weight == 0)
    # pytorch-metric-learning's keyword form, as its wrappers call a loss without labels
    torch.testing.assert_close(loss_fn(x, indices_tuple=triplets), got, rtol=0, atol=0)
    if bce_weight == 0:  # without the pair term labels do not enter the loss
        torch.testing.assert_close(loss_fn(x, torch.arange(7) % 3, triplets), got, rtol=0, atol=0)


def test_without_labels_the_triplets_may_index_references():
    loss_fn, x, triplets = _triplet_case(bce_weight=0.4)
    ref = randn(6, D, seed=12)
    got = loss_fn(x, None, triplets, ref)
    want = hand_loss(loss_fn, F.normalize(x, dim=1), F.normalize(ref, dim=1), triplets, 0.4)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_without_labels_gradients_reach_the_unit_through_the_pair_term():
    loss_fn, x, triplets = _triplet_case(bce_weight=1.0, lam=0.0, alpha=-100.0)  # the hinge is inactive
    x = x.clone().requires_grad_()
    loss_fn(x, None, triplets).backward()
    assert loss_fn.unit.w_s.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_without_labels_an_empty_tuple_gives_a_connected_zero():
    loss_fn, x, _ = _triplet_case(bce_weight=1.0)
    x = x.clone().requires_grad_()
    empty = torch.zeros(0, dtype=torch.int64)
    loss = loss_fn(x, None, (empty, empty, empty))
    assert loss.item() == 0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_labels_none_needs_an_indices_tuple():
    loss_fn, x, triplets = _triplet_case()
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor, got NoneType .*indices_tuple"):
        loss_fn(x, None)
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor, got NoneType"):
        loss_fn(x)
    with pytest.raises(ValueError, match=names("ref_labels") + ".*labels is None"):
        loss_fn(x, None, triplets, randn(6, D, seed=2), torch.arange(6))
    bank_loss = pddm_ext.PDDMLoss(D, memory=pddm_ext.MemoryBank(8, D)).double()
    with pytest.raises(ValueError, match="indices_tuple cannot be combined with memory="):
        bank_loss(x, None, triplets)
    with pytest.raises(ValueError, match=r"indices_tuple\[1\].*outside \[0, 7\)"):
        loss_fn(x, None, (triplets[0], triplets[1] + 6, triplets[2]))


# --------------------------------------------------------------------------- memory bank and grad modes


GRAD_MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}


def rows(start, count, dim=3):
    return torch.arange(start, start + count, dtype=torch.float32)[:, None].expand(count, dim).clone()


@pytest.mark.parametrize("mode", list(GRAD_MODES))
@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_a_bank_filled_under_a_no_grad_mode_is_written_afterwards(mode, dtype):
    bank = pddm_ext.MemoryBank(6, 3, dtype=dtype)
    with GRAD_MODES[mode]():
        bank.enqueue(rows(0, 4), torch.arange(4))  # the first enqueue allocates the storage
        bank.enqueue(rows(4, 1), torch.tensor([4]))  # and writes there again
    bank.enqueue(rows(5, 3), torch.arange(5, 8))  # training: wraps around into the first slots
    emb, lab = bank.get()
    assert not emb.is_inference() and not lab.is_inference()
    assert lab.tolist() == [6, 7, 2, 3, 4, 5] and emb[:, 0].tolist() == [6, 7, 2, 3, 4, 5]
    with GRAD_MODES[mode]():  # and a later validation pass writes again
        bank.enqueue(rows(8, 1), torch.tensor([8]))
    assert bank.get()[1].tolist() == [6, 7, 8, 3, 4, 5]


@pytest.mark.parametrize("mode", list(GRAD_MODES))
def test_a_bank_converted_under_inference_mode_is_written_afterwards(mode):
    bank = pddm_ext.MemoryBank(4, 3)
    bank.enqueue(rows(0, 2), torch.arange(2))
    with GRAD_MODES[mode]():
        bank.double()
    bank.enqueue(rows(2, 3), torch.arange(2, 5))
    assert bank.get()[0].dtype == torch.float64 and bank.get()[1].tolist() == [4, 1, 2, 3]


def test_a_loss_validated_under_inference_mode_trains_afterwards():
    """A trainer's sanity check runs validation (inference mode) before the first training step."""
    torch.manual_seed(0)
    bank = pddm_ext.MemoryBank(32, D)
    loss_fn = pddm_ext.PDDMLoss(D, k=2, memory=bank)
    labels = torch.arange(8) % 4
    with torch.inference_mode():
        loss_fn(randn(8, D, dtype=torch.float32, seed=1), labels)
    assert len(bank) == 8
    for step in range(3):  # mined against the bank, then enqueued in place
        x = randn(8, D, dtype=torch.float32, seed=2 + step).requires_grad_()
        loss_fn(x, labels).backward()
        assert x.grad is not None
    assert len(bank) == 32


# --------------------------------------------------------------------------- memory bank conversions


ALL_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
# nn.Module's conversion methods: the bank offers those that change a device or a dtype
DTYPE_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_METHODS = ("cpu", "cuda")
NOT_OFFERED = ("xpu", "ipu", "mtia", "to_empty")  # other accelerators; to_empty drops the storage's values
NOT_CONVERSIONS = ("share_memory",)  # applies to every tensor, changes neither device nor dtype
ARGUMENT_METHODS = ("to", "type")


def test_the_conversion_lists_are_nn_modules_own():
    listed = set(DTYPE_METHODS) | set(DEVICE_METHODS) | set(NOT_OFFERED) | set(ARGUMENT_METHODS) | set(NOT_CONVERSIONS)
    for name in listed:
        assert callable(getattr(nn.Module, name, None)), name
    # any other public nn.Module method that converts parameters or buffers would be listed above
    converting = {n for n, f in vars(nn.Module).items() if callable(f) and not n.startswith("_")
                  and "_apply(" in inspect.getsource(f)}
    assert converting <= listed, converting - listed


def constructor_accepts(dtype):
    try:
        pddm_ext.MemoryBank(4, 3, dtype=dtype)
        return True
    except ValueError as exc:
        assert re.search(names("dtype"), str(exc))
        return False


def filled_bank():
    bank = pddm_ext.MemoryBank(4, 3)
    bank.enqueue(rows(1, 3) / 3, torch.arange(3))
    return bank


def _convert(bank, how, dtype):
    if how == "to":
        return bank.to(dtype)
    if how == "to_keywords":
        return bank.to(device="cpu", dtype=dtype)
    if how == "type":
        return bank.type(dtype)
    return bank.to(torch.empty(0, dtype=dtype))  # "like_tensor"


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns on creating complex32 and quantized tensors
@pytest.mark.parametrize("how", ["to", "to_keywords", "type", "like_tensor"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_conversion_follows_the_constructors_rule(dtype, how):
    bank = filled_bank()
    before = bank.get()[0].clone()
    if how == "like_tensor":
        try:
            torch.empty(0, dtype=dtype)
        except (RuntimeError, TypeError):
            pytest.skip(f"torch cannot allocate a {dtype} tensor")
    if constructor_accepts(dtype):
        assert _convert(bank, how, dtype) is bank
        emb, lab = bank.get()
        assert emb.dtype == dtype and lab.dtype == torch.int64
        torch.testing.assert_close(emb, before.to(dtype))
    else:
        with pytest.raises(ValueError, match=names("dtype") + r" must be torch.float32 or torch.float64"):
            _convert(bank, how, dtype)
        emb, _ = bank.get()
        assert emb.dtype == torch.float32 and torch.equal(emb, before)  # unchanged
        bank.enqueue(rows(9, 1), torch.tensor([9]))  # and still usable in its dtype
        assert bank.get()[0].dtype == torch.float32


@pytest.mark.parametrize("method", list(DTYPE_METHODS))
@pytest.mark.parametrize("filled", [True, False])
def test_nn_module_dtype_methods_follow_the_constructors_rule(method, filled):
    bank = filled_bank() if filled else pddm_ext.MemoryBank(4, 3)
    dtype = DTYPE_METHODS[method]
    if constructor_accepts(dtype):
        assert getattr(bank, method)() is bank
        bank.enqueue(rows(5, 1), torch.tensor([5]))  # an empty bank allocates in the converted dtype
        assert bank.get()[0].dtype == dtype
    else:
        with pytest.raises(ValueError, match=names("dtype")):
            getattr(bank, method)()
        bank.enqueue(rows(5, 1), torch.tensor([5]))
        assert bank.get()[0].dtype == torch.float32


@pytest.mark.parametrize("method", DEVICE_METHODS)
def test_nn_module_device_methods_move_the_storage(method):
    if method == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    bank = filled_bank()
    assert getattr(bank, method)() is bank
    emb, lab = bank.get()
    assert emb.device.type == lab.device.type == method and emb.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA cannot be used")
@pytest.mark.parametrize("filled", [True, False], ids=["filled", "empty"])
def test_a_move_to_a_device_that_cannot_be_used_changes_nothing(filled):
    bank = filled_bank() if filled else pddm_ext.MemoryBank(4, 3)
    before = bank.get()
    with pytest.raises((AssertionError, RuntimeError)):  # torch's own error for cuda without CUDA
        bank.to("cuda")
    assert bank._device is None  # the device a later allocation takes is unchanged too
    after = bank.get()
    assert (after[0] is None) == (before[0] is None) and (after[0] is None or after[0].device.type == "cpu")
    bank.enqueue(torch.ones(2, 3), torch.zeros(2, dtype=torch.long))  # still usable on the CPU
    assert bank.get()[0].device.type == "cpu"


@pytest.mark.parametrize("method", NOT_OFFERED)
def test_other_nn_module_conversions_are_not_offered(method):
    assert not hasattr(pddm_ext.MemoryBank(4, 3), method)


@pytest.mark.parametrize("bad", ["float16", 16, None])
def test_a_conversion_argument_that_is_not_a_dtype_is_a_type_error(bad):
    bank = filled_bank()
    with pytest.raises(TypeError, match="dst_type"):
        bank.type(bad)
    if bad is not None and not isinstance(bad, int):  # torch's .to reads an int as a CUDA device index
        with pytest.raises(TypeError, match=r"MemoryBank.to\(\)"):
            bank.to(bad)
    with pytest.raises(TypeError, match=names("dtype") + " must be a torch.dtype"):
        pddm_ext.MemoryBank(4, 3, dtype="float32")
    assert bank.type("torch.DoubleTensor").get()[0].dtype == torch.float64


# --------------------------------------------------------------------------- bool options


PUBLIC_MODULES = [pddm_ext, pddm_ext.integrations.distributed, pddm_ext.integrations.memory,
                  pddm_ext.integrations.miners, pddm_ext.collectives, pddm_ext.sampler]
# the required arguments of each public class with a bool parameter
REQUIRED = {
    "PDDM": dict(in_features=4),
    "PDDMLoss": dict(embedding_dim=4),
    "PDDMMiner": {},
    "Quadruplets": {f: torch.zeros(0, dtype=torch.int64) for f in pddm_ext.Quadruplets._fields[:5]},
}


def public_classes():
    found = {}
    for module in PUBLIC_MODULES:
        for name in getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]:
            obj = getattr(module, name)
            if inspect.isclass(obj) and obj.__module__.startswith("pddm_ext"):
                found[name] = obj
    return found


BOOL_PARAMETERS = [(name, p.name) for name, cls in sorted(public_classes().items())
                   for p in inspect.signature(cls).parameters.values() if isinstance(p.default, bool)]


def test_the_bool_parameters_are_found():
    assert {("PDDMMiner", "normalize"), ("PDDMLoss", "distributed"), ("PDDM", "normalize_inputs"),
            ("Quadruplets", "batch_mode")} <= set(BOOL_PARAMETERS)


def _plain_miner():
    import sys

    saved = sys.modules.get("pytorch_metric_learning.miners")
    sys.modules["pytorch_metric_learning.miners"] = None  # the form without pytorch-metric-learning
    try:
        return pddm_ext.integrations.miners._miner_class()
    finally:
        if saved is None:
            del sys.modules["pytorch_metric_learning.miners"]
        else:
            sys.modules["pytorch_metric_learning.miners"] = saved


@pytest.mark.parametrize("cls_name,param", BOOL_PARAMETERS)
@pytest.mark.parametrize("value", ["false", "True", 0, 1, 1.0, None, torch.tensor(True), [True]],
                         ids=lambda v: repr(v))
def test_every_bool_parameter_rejects_a_non_bool(cls_name, param, value):
    classes = [public_classes()[cls_name]] + ([_plain_miner()] if cls_name == "PDDMMiner" else [])
    for cls in classes:
        with pytest.raises(TypeError, match=names(param) + r" must be a bool"):
            cls(**REQUIRED[cls_name], **{param: value})
        for ok in (True, False):
            made = cls(**REQUIRED[cls_name], **{param: ok})
            assert getattr(made if hasattr(made, param) else made.unit, param) is ok
