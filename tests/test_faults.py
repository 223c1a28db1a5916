"""indices_tuple, Quadruplets and the core's contracts (docs/design.md, "Errors", "Results").

- ``PDDMLoss``'s ``indices_tuple`` path validates like the mining path: labels, the unit's parameters,
  and the indices (integer dtype, 1-D, one length, every entry in range of the rows it indexes: no -1
  wraparound, no float truncation).
- ``Quadruplets.batch_mode`` is a real field: it survives ``_replace``, ``_make``, pickling, copying
  and ``Quadruplets(*q)``.
- ``PDDMLoss(memory=...)`` takes any object with the memory-bank protocol (the core does not import
  ``MemoryBank``) and rejects others with a ``TypeError``.
- The op wrapper returns a named ``MineResult``; the metrics are one table.
"""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
import torch.nn.functional as F

import pddm_ext
from pddm_ext import ops, reference
from helpers import make_unit, randn

D = 4


def names(name):
    return rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])"


def _triplet_case():
    torch.manual_seed(0)
    loss_fn = pddm_ext.PDDMLoss(D, k=None, normalize_inputs=True, bce_weight=0.0).double()  # the paper's loss
    x = randn(6, D, seed=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    good = (torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([4, 5]))
    return loss_fn, x, labels, good


# --------------------------------------------------------------------------- indices_tuple


def test_indices_tuple_good_input_gives_the_hand_loss():
    loss_fn, x, labels, (a, p, n) = _triplet_case()
    got = loss_fn(x, labels, (a, p, n))
    f = F.normalize(x, dim=1)
    params = loss_fn.unit.params()
    S_ap, S_an = reference.pair_scores(f[a], f[p], params), reference.pair_scores(f[a], f[n], params)
    d_ap, d_an = ((f[a] - f[p]) ** 2).sum(1), ((f[a] - f[n]) ** 2).sum(1)
    want = 2 * torch.clamp(0.5 + S_an - S_ap, min=0).mean() + 0.5 * 2 * torch.clamp(1.0 + d_ap - d_an, min=0).mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # lists of ints are indices too (as torch.as_tensor reads them)
    torch.testing.assert_close(loss_fn(x, labels, ([0, 2], [1, 3], [4, 5])), want, rtol=1e-12, atol=1e-12)


BAD_INDICES = {
    # labels of length 3 for 6 rows, index -1, float indices
    "labels_length": (lambda a, p, n: (a, p, n), "labels", "length 3"),
    "negative_index": (lambda a, p, n: (a, p, torch.tensor([4, -1])), "indices_tuple[2]", r"outside \[0, 6\)"),
    "index_too_large": (lambda a, p, n: (torch.tensor([0, 6]), p, n), "indices_tuple[0]", r"outside \[0, 6\)"),
    "float_indices": (lambda a, p, n: (a, p.double() + 0.7, n), "indices_tuple[1]", "integer dtype"),
    "bool_indices": (lambda a, p, n: (a, p, torch.tensor([True, False])), "indices_tuple[2]", "integer dtype"),
    "unequal_lengths": (lambda a, p, n: (a, p[:1], n), "indices_tuple", "one length"),
    "two_dims": (lambda a, p, n: (a[None], p, n), "indices_tuple[0]", "1-D"),
    "not_a_tensor": (lambda a, p, n: (a, "01", n), "indices_tuple[1]", "torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_INDICES))
def test_indices_tuple_is_validated(case):
    loss_fn, x, labels, good = _triplet_case()
    make, name, what = BAD_INDICES[case]
    if case == "labels_length":
        labels = labels[:3]
    exc = TypeError if case == "not_a_tensor" else ValueError
    with pytest.raises(exc, match=names(name)) as info:
        loss_fn(x, labels, make(*good))
    assert re.search(what, str(info.value)), str(info.value)


def test_indices_tuple_range_is_checked_against_the_references():
    loss_fn, x, labels, good = _triplet_case()
    ref, ref_labels = randn(3, D, seed=2), torch.tensor([0, 1, 2])
    a, p, n = torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([1, 2])
    loss_fn(x, labels, (a, p, n), ref, ref_labels)  # in range of the 3 references
    with pytest.raises(ValueError, match=r"indices_tuple\[1\].*outside \[0, 3\)"):
        loss_fn(x, labels, (a, torch.tensor([0, 3]), n), ref, ref_labels)
    with pytest.raises(ValueError, match=names("ref_labels")):
        loss_fn(x, labels, (a, p, n), ref, ref_labels[:2])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("param", ["W_u", "b_s", "w_s"])
@pytest.mark.parametrize("path", ["indices_tuple", "mining"])
def test_a_non_finite_parameter_raises_on_every_loss_path(path, param, bad):
    loss_fn, x, labels, good = _triplet_case()
    with torch.no_grad():
        getattr(loss_fn.unit, param).view(-1)[0] = bad
    with pytest.raises(ValueError, match=names(param)):
        loss_fn(x, labels, good if path == "indices_tuple" else None)


@pytest.mark.parametrize("name,value", [("alpha", float("nan")), ("beta", float("inf")), ("lam", "1")])
def test_loss_weights_must_be_finite_numbers(name, value):
    with pytest.raises(TypeError if isinstance(value, str) else ValueError, match=names(name)):
        pddm_ext.PDDMLoss(D, **{name: value})


# --------------------------------------------------------------------------- Quadruplets


@pytest.mark.parametrize("ref", [False, True])
def test_quadruplets_keep_batch_mode_through_every_tuple_operation(ref):
    x, labels = randn(8, D, seed=3), torch.arange(8) // 2
    kwargs = dict(ref_emb=randn(5, D, seed=4), ref_labels=torch.arange(5) % 4) if ref else {}
    q = pddm_ext.mine_hard(x, labels, make_unit(D), k=2, **kwargs)
    assert q.batch_mode is (not ref)
    want = q.as_triplets()
    clones = [q._replace(scores=None), pddm_ext.Quadruplets._make(list(q)), pddm_ext.Quadruplets(*q),
              pickle.loads(pickle.dumps(q)), copy.copy(q), copy.deepcopy(q),
              pddm_ext.Quadruplets(**q._asdict())]
    for clone in clones:
        assert clone.batch_mode is (not ref)
        for got, w in zip(clone.as_triplets(), want):
            assert torch.equal(got, w)


def test_reference_quadruplets_have_the_same_fields():
    assert reference.ReferenceQuadruplets._fields == pddm_ext.Quadruplets._fields


# --------------------------------------------------------------------------- memory protocol


class ListMemory:
    """A memory bank in the protocol PDDMLoss relies on, unrelated to pddm_ext.MemoryBank."""

    def __init__(self):
        self.rows, self.labels = [], []

    def get(self):
        if not self.rows:
            return None, None
        return torch.cat(self.rows), torch.cat(self.labels)

    def enqueue(self, embeddings, labels):
        self.rows.append(embeddings.detach().clone())
        self.labels.append(labels.clone())


def test_any_memory_with_the_protocol_works_like_memory_bank():
    batches = [(randn(8, D, seed=s), torch.arange(8) % 3) for s in range(3)]
    torch.manual_seed(0)
    with_bank = pddm_ext.PDDMLoss(D, k=None, memory=pddm_ext.MemoryBank(64, D, dtype=torch.float64)).double()
    torch.manual_seed(0)
    with_list = pddm_ext.PDDMLoss(D, k=None, memory=ListMemory()).double()
    for x, labels in batches:
        torch.testing.assert_close(with_list(x, labels), with_bank(x, labels), rtol=0, atol=0)
    assert not with_list.last_quadruplets.batch_mode


@pytest.mark.parametrize("memory", [torch.zeros(3), object(), "bank"])
def test_memory_without_the_protocol_is_a_type_error(memory):
    with pytest.raises(TypeError, match=names("memory")):
        pddm_ext.PDDMLoss(D, memory=memory)


def test_memory_dim_must_match():
    with pytest.raises(ValueError, match="memory has dim 3"):
        pddm_ext.PDDMLoss(D, memory=pddm_ext.MemoryBank(8, 3))


# --------------------------------------------------------------------------- named result, metric table


def test_mine_op_returns_a_named_result():
    x, labels = randn(7, D, seed=5), torch.arange(7) % 3
    res = ops.mine(x, labels, None, None, None, -1)
    assert isinstance(res, ops.MineResult)
    S = reference.euclidean_scores(x)
    _, _, pos, neg, neg_ref = reference.hardest(x, labels)
    assert torch.equal(res.hardest_positive, pos) and torch.equal(res.hardest_negative, neg)
    assert torch.equal(res.hardest_negative_of_ref, neg_ref)
    torch.testing.assert_close(res.pair_score, S[res.pair_query, res.pair_ref])


@pytest.mark.parametrize("metric", list(ops.METRICS))
def test_every_metric_in_the_table_mines_like_its_reference(metric):
    x, labels = randn(9, D, seed=6), torch.arange(9) % 3
    row = ops.METRICS[metric]
    unit = make_unit(D) if row.uses_unit else None
    params = None if unit is None else tuple(p.detach() for p in unit.params())
    res = ops.mine(x, labels, None, None, params, 0, metric)
    S = row.reference_scores(x, None, params)
    torch.testing.assert_close(res.hardest_negative_score, torch.where(labels[:, None] != labels, S, -torch.inf).amax(1))
    q = pddm_ext.mine_hard(x, labels, unit, k=None, metric=metric)
    r = reference.mine_hard(x, labels, unit, k=None, metric=metric)
    for got, want in zip(q[:4], r[:4]):
        assert torch.equal(got, want)
