"""Validation happens once and costs no device->host synchronisation.

On CUDA, reading a tensor's value on the host (``bool(t)``, ``t.item()``, ``t.tolist()``, ...) waits for
the device. The validation layer therefore reads data-dependent conditions (NaN/Inf, index ranges) only
on CPU in eager mode; on CUDA and under torch.compile it queues ``torch._assert_async`` instead
(``pddm_ext._validate``). ``_validate.asynchronous_checks()`` makes CPU take the CUDA path, so this
test runs in CI without a GPU: during a training step every Python-level way to read a tensor's value
is patched to raise, and the data-dependent sizes (``nonzero``) are counted.

What this proves and what it does not: the Python layers (validation, the loss, the wrappers) read
no tensor value; the only data-dependent sizes left are the documented ones (each mining call's
``nonzero`` sizing its result: batch_hard's triplets, mine_hard's all-or-nothing skip of pairs
without a negative). The fused CUDA mining op itself reads its positive-pair count to size its
output (csrc/cuda/mine_cuda.cu); that sync is inside the kernel layer and not visible here.
"""

from __future__ import annotations

import pytest
import torch

import pddm_ext
from pddm_ext import _validate as V
from helpers import randn

HOST_READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy", "cpu", "__array__")


class HostReadError(AssertionError):
    pass


@pytest.fixture
def no_host_reads(monkeypatch):
    """Within the test: any host read of a tensor raises; returns a counter of data-dependent sizes."""
    counts = {"nonzero": 0}

    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise HostReadError(f"Tensor.{name} called during the step (a device->host sync on CUDA)")
        return raiser

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    original_nonzero, original_getitem = torch.Tensor.nonzero, torch.Tensor.__getitem__

    def nonzero(self, *args, **kwargs):
        counts["nonzero"] += 1
        return original_nonzero(self, *args, **kwargs)

    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            raise HostReadError("boolean-mask indexing during the step (a nonzero, a sync on CUDA)")
        return original_getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "nonzero", nonzero)
    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    monkeypatch.setattr(torch, "nonzero", lambda t, *a, **k: nonzero(t, *a, **k))
    return counts


def _batch():
    x = randn(12, 6, seed=0, dtype=torch.float32).requires_grad_()
    return x, torch.arange(12) % 4


def test_the_patch_catches_host_reads(no_host_reads):
    x, _ = _batch()
    with pytest.raises(HostReadError):
        bool(torch.isfinite(x).all())
    with pytest.raises(HostReadError):
        x[x > 0]


@pytest.mark.parametrize("ref", [False, True])
def test_a_training_step_reads_no_tensor_value(no_host_reads, ref):
    torch.manual_seed(0)
    loss_fn = pddm_ext.PDDMLoss(6, k=3)
    x, labels = _batch()
    kwargs = dict(ref_emb=randn(5, 6, seed=1, dtype=torch.float32), ref_labels=torch.arange(5) % 4) if ref else {}
    with V.asynchronous_checks():
        loss = loss_fn(x, labels, **kwargs)
        loss.backward()
        assert no_host_reads["nonzero"] == 1  # mine_hard's skip of pairs without a negative
        quads = pddm_ext.mine_hard(x, labels, loss_fn.unit, k=2, **kwargs)
        triplets = pddm_ext.batch_hard(x, labels, loss_fn.unit, **kwargs)
        euclidean = pddm_ext.batch_hard(x, labels, **kwargs)
        scores = loss_fn.unit(x)
        a, p, n = quads.as_triplets()
        loss_fn(x, labels, (a, p, n), **kwargs).backward()  # the indices_tuple path: range checked async
    assert no_host_reads["nonzero"] == 4  # one per mining call, nothing else
    assert x.grad is not None and scores.shape == (12, 12)
    assert triplets[0].numel() > 0 and euclidean[0].numel() > 0


@pytest.mark.parametrize("where", ["embeddings", "parameter", "indices"])
def test_asynchronous_checks_still_fail_on_bad_values(no_host_reads, where):
    torch.manual_seed(0)
    loss_fn = pddm_ext.PDDMLoss(6)
    x, labels = _batch()
    indices = None
    if where == "embeddings":
        x = x.detach().clone()
        x[3, 2] = float("nan")
    elif where == "parameter":
        with torch.no_grad():
            loss_fn.unit.W_v[0, 0] = float("inf")
    else:
        indices = (torch.tensor([0, 1]), torch.tensor([4, -1]), torch.tensor([2, 3]))
    name = {"embeddings": "embeddings", "parameter": "W_v", "indices": r"indices_tuple\[1\]"}[where]
    with V.asynchronous_checks():
        # the asynchronous assert's error is a RuntimeError with the same message (on CUDA it is
        # reported at the next synchronisation instead)
        with pytest.raises(RuntimeError, match=name):
            loss_fn(x, labels, indices)


def test_the_memory_path_checks_the_batch_once_and_the_bank_rows_once(monkeypatch):
    checked = []  # the name of every tensor whose values were checked
    original = V.check_condition
    monkeypatch.setattr(V, "check_condition",
                        lambda cond, message, *a, **k: (checked.append((message(False) if callable(message) else message)
                                                                       .split(" contains")[0]),
                                                        original(cond, message, *a, **k))[1])
    torch.manual_seed(0)
    loss_fn = pddm_ext.PDDMLoss(6, k=3, memory=pddm_ext.MemoryBank(64, 6))
    x, labels = _batch()
    loss_fn(x, labels).backward()  # empty bank: batch mode
    assert sorted(checked) == sorted(["embeddings", *V.PARAM_NAMES]), checked
    checked.clear()
    loss_fn(x, labels).backward()  # against the bank
    assert sorted(checked) == sorted(["embeddings", "memory embeddings", *V.PARAM_NAMES]), checked
    with pytest.raises(ValueError, match="embeddings contains NaN"):  # the bank's own entry still checks
        loss_fn.memory.enqueue(torch.full((2, 6), float("nan")), torch.tensor([0, 1]))


@pytest.mark.parametrize("call", ["loss", "loss_ref", "loss_indices", "mine_hard", "batch_hard", "miner"])
def test_each_input_is_validated_once(monkeypatch, call):
    """Validation runs at the public entry only: each tensor's finiteness is checked exactly once."""
    checked = []
    original = V.check_finite
    def counting(name, t, *limit):  # a check the caller declared done (V.already_validated) is not one
        if not any(t is v for v in V._validated.get()):
            checked.append(name)
        return original(name, t, *limit)

    monkeypatch.setattr(V, "check_finite", counting)
    torch.manual_seed(0)
    loss_fn = pddm_ext.PDDMLoss(6, k=3)
    x, labels = _batch()
    ref = dict(ref_emb=randn(5, 6, seed=1, dtype=torch.float32), ref_labels=torch.arange(5) % 4)
    if call == "loss":
        loss_fn(x, labels).backward()
    elif call == "loss_ref":
        loss_fn(x, labels, **ref).backward()
    elif call == "loss_indices":
        loss_fn(x, labels, (torch.tensor([0]), torch.tensor([4]), torch.tensor([1]))).backward()
    elif call == "mine_hard":
        pddm_ext.mine_hard(x, labels, loss_fn.unit, **ref)
    elif call == "batch_hard":
        pddm_ext.batch_hard(x, labels, loss_fn.unit, **ref)
    else:
        pddm_ext.PDDMMiner(unit=loss_fn.unit)(x, labels, ref["ref_emb"], ref["ref_labels"])
    params = list(V.PARAM_NAMES)
    inputs = ["embeddings"] + (["ref_emb"] if call in ("loss_ref", "mine_hard", "batch_hard", "miner") else [])
    assert sorted(checked) == sorted(inputs + params), checked
