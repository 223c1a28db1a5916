"""``PDDMMiner`` inside pytorch-metric-learning's wrappers whose references hold the batch itself.

``CrossBatchMemory`` enqueues the batch before mining it against the memory, and
``DistributedMinerWrapper(efficient=True)`` mines the local batch against the gathered global batch
(the local rows first); both then remove the self-comparisons (an anchor paired with its own slot).
docs/design.md#mining's self-copy rule keeps the miner from taking an anchor's own copy as a positive,
so no anchor of the batch loses its triplet to it: the removal finds nothing to remove, ``batch_hard``
mode gives a triplet to every anchor that has another positive and a negative, and ``mine_hard`` mode
gives its ``k`` triplets (``PDDMMiner`` counts ``k`` in ordered (anchor, positive) pairs in both modes,
so the first call of a memory, which holds just the batch, gives the bare miner's triplets).

Each property is checked on 200 random draws (sizes, labels, memory sizes, earlier batches, unit,
dtype, mode, k). This file is also the worker of the 2-process test:
``torchrun --nproc_per_node 2 tests/test_wrapper_self_copies.py OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import pddm_ext

DRAWS = 200
TIMEOUT_S = 180


class Recorder:
    """Wraps PML's ``remove_self_comparisons`` (the step both wrappers end with) to keep what the miner
    gave it and what it kept."""

    def __init__(self, original):
        self.original, self.calls = original, []

    def __call__(self, indices_tuple, *args, **kwargs):
        kept = self.original(indices_tuple, *args, **kwargs)
        self.calls.append((tuple(t.clone() for t in indices_tuple), kept))
        return kept


def draw(index, rank_rows=None):
    """One random case: (embeddings, labels, miner, options). ``rank_rows``: the distributed test's
    rows per rank (both ranks draw the same global case from ``index``)."""
    g = torch.Generator().manual_seed(1000 + index)

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    d = randint(2, 8)
    m = rank_rows or randint(2, 12)
    rows = m * (2 if rank_rows else 1)
    dtype = torch.float64 if index % 2 else torch.float32
    labels = torch.randint(0, randint(1, 4), (rows,), generator=g)
    embeddings = torch.randn(rows, d, generator=g, dtype=dtype)
    metric = "euclidean" if index % 5 == 4 else "pddm"
    torch.manual_seed(index)
    unit = pddm_ext.PDDM(d, randint(1, 8), randint(1, 8), normalize_inputs=bool(index % 3),
                         dtype=dtype) if metric == "pddm" else None
    mode = "batch_hard" if index % 4 == 3 else "mine_hard"
    k = None if index % 7 == 0 else randint(1, 2 * m)
    if mode == "batch_hard":
        k = None  # one triplet per anchor: the miner refuses a k (drawn anyway, so later draws stay the same)
    miner = pddm_ext.PDDMMiner(unit=unit, k=k, mode=mode)
    options = dict(memory_size=randint(m, 3 * m), earlier=randint(0, 3), mode=mode, k=k)
    return embeddings, labels, miner, options, g


def expected_counts(labels, ref_labels, own, mode, k):
    """What the miner must give when the self-copies are the only rows equal to an anchor (random
    rows): batch_hard mode, the anchors with a positive other than their own slot ``own[i]`` and a
    negative; mine_hard mode, min(k, ordered positive pairs (i, r) with r != own[i]) triplets, of the
    pairs whose anchor and reference both have a negative (mine_hard skips the others)."""
    positive = labels[:, None] == ref_labels[None, :]
    positive[torch.arange(len(labels)), own] = False
    negative = labels[:, None] != ref_labels[None, :]
    has_negative = negative.any(1)
    if mode == "batch_hard":
        return sorted((positive.any(1) & has_negative).nonzero().flatten().tolist())
    pairs = int((positive & has_negative[:, None] & negative.any(0)[None, :]).sum())
    return pairs if k is None else min(k, pairs)


def check_wrapped(before, after, labels, ref_labels, own, options):
    """The property for one wrapped call: nothing to remove, and every anchor keeps its triplet."""
    assert all(len(t) == len(before[0]) for t in after), "a triplet was a self-comparison"
    a = after[0]
    want = expected_counts(labels, ref_labels, own, options["mode"], options["k"])
    if options["mode"] == "batch_hard":
        assert sorted(a.tolist()) == want
    else:
        assert len(a) == want


def test_cross_batch_memory_no_anchor_loses_its_triplet_to_its_copy(monkeypatch):
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    recorder = Recorder(lmu.remove_self_comparisons)
    monkeypatch.setattr(lmu, "remove_self_comparisons", recorder)
    same_as_bare = 0
    for index in range(DRAWS):
        embeddings, labels, miner, options, g = draw(index)
        m, d = embeddings.shape
        xbm = losses.CrossBatchMemory(losses.TripletMarginLoss(), d, memory_size=options["memory_size"], miner=miner)
        for _ in range(options["earlier"]):  # earlier batches fill (and wrap) the queue
            xbm(torch.randn(m, d, generator=g, dtype=embeddings.dtype), torch.randint(0, 4, (m,), generator=g))
        first = not xbm.has_been_filled and xbm.queue_idx == 0
        recorder.calls.clear()
        xbm(embeddings, labels)
        (before, after), = recorder.calls
        memory_labels = xbm.label_memory if xbm.has_been_filled else xbm.label_memory[: xbm.queue_idx]
        check_wrapped(before, after, labels, memory_labels, xbm.curr_batch_idx, options)
        if first and embeddings.dtype == torch.float64:
            # The memory holds just this batch, in batch order: the bare miner's triplets (random
            # float64 rows: no score ties, so the sets are equal, not only their sizes).
            bare = miner(embeddings, labels)
            assert sorted(zip(*(t.tolist() for t in after))) == sorted(zip(*(t.tolist() for t in bare)))
            same_as_bare += 1
    assert same_as_bare >= 20


def test_pddm_miner_counts_k_alike_bare_and_against_a_copy_of_the_batch():
    """k triplets in both modes: the bare miner and the miner against a copy of the batch give the same
    triplets (float64, no ties); batch mode keeps the triplets of mine_hard's k unordered pairs that
    are among the k hardest ordered pairs, by brute force on the reference scores."""
    from pddm_ext import reference

    for index in range(40):
        g = torch.Generator().manual_seed(index)
        m, d = int(torch.randint(3, 14, (1,), generator=g)), 5
        x = torch.randn(m, d, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 3, (m,), generator=g)
        torch.manual_seed(index)
        unit = pddm_ext.PDDM(d, dtype=torch.float64)
        k = int(torch.randint(1, m * m, (1,), generator=g))
        miner = pddm_ext.PDDMMiner(unit=unit, k=k)
        bare = list(zip(*(t.tolist() for t in miner(x, labels))))
        against_copy = list(zip(*(t.tolist() for t in miner(x, labels, x.clone(), labels.clone()))))
        assert sorted(bare) == sorted(against_copy)
        f = F.normalize(x, dim=1)
        S = reference.pddm_scores(f, None, unit)
        S = (S + S.T) / 2  # S(a, b) = S(b, a) exactly, as the fused scores (the reference's matmul may round apart)
        same = labels[:, None] == labels[None, :]
        positive = same & ~torch.eye(m, dtype=torch.bool)
        if not (~same).any():
            assert bare == []
            continue
        ordered = sorted((S[a, p].item(), a, p) for a, p in positive.nonzero().tolist())[:k]
        negative_of = torch.where(same, -torch.inf, S).argmax(1)
        assert sorted(bare) == sorted((a, p, int(negative_of[a])) for _, a, p in ordered)
        assert len(bare) == min(k, int(positive.sum()))


# --- DistributedMinerWrapper(efficient=True), 2 gloo processes --------------------------------------


def worker(out_dir):
    import torch.distributed as dist
    from pytorch_metric_learning.utils import distributed as pml_dist
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    recorder = Recorder(lmu.remove_self_comparisons)
    lmu.remove_self_comparisons = recorder  # what pml_dist.get_indices_tuple calls
    failures, checked = [], 0
    for index in range(DRAWS):
        embeddings, labels, miner, options, _ = draw(index, rank_rows=int(4 + index % 5))
        half = len(labels) // 2
        mine = slice(rank * half, (rank + 1) * half)
        recorder.calls.clear()
        pml_dist.DistributedMinerWrapper(miner, efficient=True)(embeddings[mine], labels[mine])
        (before, after), = recorder.calls
        # the references: this rank's rows, then the other rank's
        ref_labels = torch.cat([labels[mine], labels[(1 - rank) * half:(2 - rank) * half]])
        try:
            check_wrapped(before, after, labels[mine], ref_labels, torch.arange(half), options)
            checked += 1
        except AssertionError as e:
            failures.append(f"draw {index}: {e}")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"checked": checked, "failures": failures}, f)
    dist.destroy_process_group()


def test_distributed_miner_wrapper_no_anchor_loses_its_triplet_to_its_copy(tmp_path):
    pytest.importorskip("pytorch_metric_learning")
    from test_distributed import run_torchrun

    run_torchrun([__file__, str(tmp_path)], TIMEOUT_S)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["failures"] == [] and result["checked"] == DRAWS


if __name__ == "__main__":
    worker(sys.argv[1])
