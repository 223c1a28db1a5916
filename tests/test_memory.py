"""``MemoryBank`` (an XBM-style ring buffer) and ``PDDMLoss(memory=bank)`` (docs/design.md#mining reference mode).

The loss with a bank is checked against a hand-written loss on ``pddm_ext.reference.mine_hard`` in
reference mode (float64, so mined indices agree exactly on these random inputs), and the 64k-row
bank check runs in a fresh process so its peak RSS measures that one mining step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import pddm_ext
from pddm_ext import reference


def rows(start, count, dim=3):
    """Rows whose every entry is their global row number: easy to trace through the ring."""
    return torch.arange(start, start + count, dtype=torch.float32)[:, None].expand(count, dim).clone()


# --- the ring buffer -----------------------------------------------------------------------------


@pytest.mark.parametrize("huge, cause", [(1e39, "NaN or Inf"),  # inf as float32
                                         (1e30, "a value above 4.61e\\+18")])  # finite, above float32's limit
def test_a_float64_batch_is_checked_as_the_float32_bank_stores_it(huge, cause):
    """A float64 batch within float64's magnitude limit may not fit a float32 bank: refused before
    anything is written, by enqueue and through PDDMLoss(memory=, normalize=False); the bank keeps
    its rows and later batches still work."""
    bank = pddm_ext.MemoryBank(16, 4, dtype=torch.float32)
    bank.enqueue(torch.randn(4, 4, dtype=torch.float64), torch.arange(4) // 2)
    before = bank.get()[0].clone()
    x = torch.randn(8, 4, dtype=torch.float64)
    x[0, 1] = huge
    with pytest.raises(ValueError, match=rf"embeddings \(as the bank's float32\) contains {cause}"):
        bank.enqueue(x, torch.arange(8) // 2)
    loss_fn = pddm_ext.PDDMLoss(4, normalize=False, memory=bank).double()
    with pytest.raises(ValueError, match=r"as the bank's float32"):
        loss_fn(x, torch.arange(8) // 2)
    assert torch.equal(bank.get()[0], before) and bank.count == 4
    loss_fn(torch.randn(8, 4, dtype=torch.float64), torch.arange(8) // 2)
    assert bank.count == 12



def test_fills_in_slot_order_then_wraps_around():
    bank = pddm_ext.MemoryBank(10, 3)
    assert len(bank) == 0 and bank.get() == (None, None)
    bank.enqueue(rows(0, 4), torch.arange(0, 4))
    bank.enqueue(rows(4, 4), torch.arange(4, 8))
    emb, lab = bank.get()
    assert len(bank) == 8 and not bank.is_full
    assert emb[:, 0].tolist() == list(range(8)) and lab.tolist() == list(range(8))

    bank.enqueue(rows(8, 4), torch.arange(8, 12))  # rows 10, 11 wrap into slots 0, 1
    emb, lab = bank.get()
    assert len(bank) == 10 and bank.is_full and bank.ptr == 2
    assert emb[:, 0].tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert lab.tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert torch.equal(emb, emb[:, :1].expand(10, 3))  # whole rows moved together

    bank.enqueue(rows(12, 9), torch.arange(12, 21))  # slots 2..9 then 0
    assert bank.get()[1].tolist() == [20, 11, 12, 13, 14, 15, 16, 17, 18, 19] and bank.ptr == 1


def test_a_batch_longer_than_the_bank_keeps_its_newest_rows():
    bank = pddm_ext.MemoryBank(4, 3)
    bank.enqueue(rows(0, 1), torch.tensor([0]))
    bank.enqueue(rows(1, 6), torch.arange(1, 7))  # 7 rows seen, the last 4 (3..6) survive
    emb, lab = bank.get()
    assert sorted(lab.tolist()) == [3, 4, 5, 6] and len(bank) == 4
    assert torch.equal(emb[:, 0], lab.float())
    # the write pointer continues after the newest row: the next row overwrites the oldest (3)
    bank.enqueue(rows(7, 1), torch.tensor([7]))
    assert sorted(bank.get()[1].tolist()) == [4, 5, 6, 7]


def test_stores_detached_rows_in_its_own_dtype_and_validates():
    bank = pddm_ext.MemoryBank(5, 2, dtype=torch.float64)
    x = torch.randn(3, 2, requires_grad=True)
    bank.enqueue(x * 2, torch.tensor([1, 2, 3], dtype=torch.int32))
    emb, lab = bank.get()
    assert emb.dtype == torch.float64 and not emb.requires_grad and lab.dtype == torch.int64
    torch.testing.assert_close(emb, (x * 2).detach().double())
    with pytest.raises(ValueError, match="3 features, expected 2"):
        bank.enqueue(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels has length 1"):
        bank.enqueue(torch.randn(2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="integer dtype"):
        bank.enqueue(torch.randn(2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="size must be >= 1"):
        pddm_ext.MemoryBank(0, 2)
    with pytest.raises(TypeError, match="memory must be a pddm_ext.MemoryBank"):
        pddm_ext.PDDMLoss(2, memory=torch.zeros(5, 2))
    with pytest.raises(ValueError, match="memory has dim 2"):
        pddm_ext.PDDMLoss(3, memory=bank)
    bank.reset()
    assert len(bank) == 0 and bank.get() == (None, None)


# --- PDDMLoss(memory=bank) -----------------------------------------------------------------------


def reference_memory_loss(loss_fn, embeddings, labels, bank_emb, bank_labels):
    """docs/design.md#loss written out for reference mode: queries f (grad), references = bank rows (constants)."""
    f = F.normalize(embeddings, dim=1)
    q = reference.mine_hard(f.detach(), labels, loss_fn.unit, k=loss_fn.k, ref_emb=bank_emb, ref_labels=bank_labels)
    i, j, k, l_ = q.anchor, q.positive, q.anchor_negative, q.positive_negative
    fi, fj, fk, fl = f[i], bank_emb[j], bank_emb[k], f[l_]
    S = lambda a, b: reference.pair_scores(a, b, loss_fn.unit)  # noqa: E731
    E_m = torch.relu(loss_fn.alpha + S(fi, fk) - S(fi, fj)) + torch.relu(loss_fn.alpha + S(fj, fl) - S(fi, fj))
    d = lambda a, b: ((a - b) ** 2).sum(1)  # noqa: E731
    E_e = torch.relu(loss_fn.beta + d(fi, fj) - d(fi, fk)) + torch.relu(loss_fn.beta + d(fi, fj) - d(fj, fl))
    return E_m.mean() + loss_fn.lam * E_e.mean(), q


def test_loss_mines_each_batch_against_the_bank_then_enqueues_it():
    torch.manual_seed(0)
    d, P, K = 6, 4, 3
    bank = pddm_ext.MemoryBank(20, d)
    paper = dict(normalize_inputs=True, bce_weight=0.0)  # the loss reference_memory_loss writes out
    loss_fn = pddm_ext.PDDMLoss(d, k=4, memory=bank, **paper).double()
    plain = pddm_ext.PDDMLoss(d, k=4, **paper).double()
    plain.load_state_dict(loss_fn.state_dict())
    labels = torch.arange(P).repeat_interleave(K)

    # Step 1, empty bank: the batch is mined against itself, exactly like the loss without a bank.
    x0 = torch.randn(P * K, d, dtype=torch.float64, requires_grad=True)
    l0 = loss_fn(x0, labels)
    torch.testing.assert_close(l0, plain(x0, labels), rtol=0, atol=0)
    assert loss_fn.last_quadruplets.batch_mode and len(bank) == P * K
    torch.testing.assert_close(bank.get()[0], F.normalize(x0, dim=1).detach())

    # Later steps: reference mode against what the bank held before the batch arrived.
    for step in range(3):  # 12 + 36 rows through a 20-row bank: wraps around
        x = torch.randn(P * K, d, dtype=torch.float64, requires_grad=True)
        bank_emb, bank_labels = (t.clone() for t in bank.get())
        loss = loss_fn(x, labels)
        expected, q_ref = reference_memory_loss(loss_fn, x, labels, bank_emb, bank_labels)
        q = loss_fn.last_quadruplets
        assert not q.batch_mode and q.anchor.numel() > 0
        for got, want in zip(q[:4], q_ref[:4]):
            assert torch.equal(got, want), (step, q, q_ref)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        g, = torch.autograd.grad(loss, x)
        g_ref, = torch.autograd.grad(expected, x)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
        assert len(bank) == min(20, P * K * (step + 2))
    assert bank.is_full and bank.ptr == (4 * P * K) % 20


def test_gradients_reach_only_the_current_batch():
    torch.manual_seed(1)
    d = 5
    bank = pddm_ext.MemoryBank(64, d)
    loss_fn = pddm_ext.PDDMLoss(d, k=None, memory=bank)
    labels = torch.arange(4).repeat(4)
    old = torch.randn(16, d, requires_grad=True)
    loss_fn(old, labels).backward()
    assert old.grad is not None
    old.grad = None
    new = torch.randn(16, d, requires_grad=True)
    loss = loss_fn(new, labels)
    assert loss_fn.last_quadruplets.anchor.numel() > 0
    loss.backward()
    assert old.grad is None  # the bank's rows are constants
    assert new.grad is not None and new.grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss_fn.unit.parameters())
    assert not bank.embeddings.requires_grad


# --- 65,536 rows: the fused path, no (m, n) matrix ------------------------------------------------

BIG_BANK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    import pddm_ext
    from pddm_ext import ops, reference

    def forbidden(name):
        def boom(*args, **kwargs):
            raise AssertionError(f"{name} materialises all pairs: not allowed with a memory bank")
        return boom

    # Anything that builds an (m, n) matrix fails: the plain reference and the all-pairs scores op.
    for name in ("pddm_scores", "euclidean_scores", "hardest", "mine_hard", "batch_hard", "pddm_loss"):
        setattr(reference, name, forbidden("reference." + name))
    ops.scores = forbidden("ops.scores")
    mined_against = []
    fused_mine = ops.mine
    def spy(x, lx, y, ly, params, k, *args, **kwargs):
        mined_against.append((tuple(x.shape), None if y is None else tuple(y.shape)))
        return fused_mine(x, lx, y, ly, params, k, *args, **kwargs)
    ops.mine = spy

    torch.manual_seed(0)
    n, m, d = 65536, 128, 8
    bank = pddm_ext.MemoryBank(n, d, dtype=torch.float64)
    for start in range(0, n, 8192):
        bank.enqueue(torch.nn.functional.normalize(torch.randn(8192, d, dtype=torch.float64), dim=1),
                     torch.randint(0, 1000, (8192,)))
    loss_fn = pddm_ext.PDDMLoss(d, memory=bank, normalize_inputs=True, bce_weight=0.0).double()
    # Warm up (thread pool, per-thread tiles) with a small batch against the full bank.
    loss_fn(torch.randn(4, d, dtype=torch.float64, requires_grad=True), torch.randint(0, 1000, (4,))).backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    x = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(x, torch.randint(0, 1000, (m,)))
    loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra_peak_bytes": after - before, "matrix_bytes": m * n * 8,
                      "mined_against": mined_against, "quadruplets": loss_fn.last_quadruplets.anchor.numel(),
                      "grad_finite": bool(torch.isfinite(x.grad).all())}))
    """
)


def test_mining_against_a_65536_row_bank_uses_the_fused_path():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", BIG_BANK_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Every mining call went through the fused op, the last one with all 65,536 references.
    assert result["mined_against"][-1] == [[128, 8], [65536, 8]]
    assert result["quadruplets"] == 1 and result["grad_finite"]
    # A (128, 65536) float64 score matrix would be 64 MiB; the step's extra peak stays under a quarter.
    assert result["extra_peak_bytes"] < result["matrix_bytes"] / 4, result


def test_explicit_ref_emb_is_reference_mode_with_gradients_into_both():
    """PML's loss signature: loss(embeddings, labels, ref_emb=..., ref_labels=...) mines against the
    given references; unlike the bank's rows they keep their graph."""
    torch.manual_seed(2)
    d = 6
    loss_fn = pddm_ext.PDDMLoss(d, k=3, normalize_inputs=True, bce_weight=0.0).double()  # the loss reference_memory_loss writes out
    x = torch.randn(8, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(20, d, dtype=torch.float64, requires_grad=True)
    labels, ref_labels = torch.arange(4).repeat(2), torch.arange(5).repeat(4)
    loss = loss_fn(x, labels, ref_emb=y, ref_labels=ref_labels)
    expected, q_ref = reference_memory_loss(loss_fn, x, labels, F.normalize(y, dim=1), ref_labels)
    for got, want in zip(loss_fn.last_quadruplets[:4], q_ref[:4]):
        assert torch.equal(got, want)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(torch.autograd.grad(loss, [x, y]), torch.autograd.grad(expected, [x, y])):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="together"):
        loss_fn(x, labels, ref_emb=y)
    with pytest.raises(ValueError, match="cannot be combined with memory"):
        pddm_ext.PDDMLoss(d, memory=pddm_ext.MemoryBank(4, d))(x, labels, ref_emb=y, ref_labels=ref_labels)
