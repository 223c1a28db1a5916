"""Distributed inputs that are bad, or empty, on one rank only (2 gloo ranks).

- An input that is bad on one rank raises the same clear error on every rank, without a hang: the
  ranks agree on validity (one small all_gather of a status vector) before any gathering.
- So does every other check of ``PDDMLoss(distributed=True)`` whose outcome can differ between ranks:
  which arguments are given (ref_emb without ref_labels, ref_emb on one rank only, ref_emb with
  memory=, indices_tuple, labels=None), the references' values, the unit's parameters (NaN, shape)
  and the memory bank's rows; and ``all_gather``'s checks (a non-tensor, a 0-dim tensor, dtypes or
  trailing shapes that differ). Each such call returns its error on both ranks within seconds.
- An empty local shard inside a non-empty global batch is legal: every rank gets the
  single-process loss and the single-process dL/dtheta.

The worker runs with a 30 s process-group timeout, and the whole run with a wall-clock limit, so
a regression (one rank blocked in a collective) fails instead of hanging for gloo's default 30 min.
This file is also the worker: ``torchrun --nproc_per_node 2 tests/test_distributed_faults.py OUT_DIR``.
"""

from __future__ import annotations

import datetime
import os
import sys

import pytest
import torch

import pddm_ext

sys.path.insert(0, os.path.dirname(__file__))
from test_distributed import run_torchrun  # noqa: E402  (same launcher, kills the group on timeout)

D = 8
ROWS = torch.tensor([[0.3, -1.2, 0.5, 0.9, -0.4, 0.1, 1.1, -0.7],
                     [0.2, -1.0, 0.7, 0.8, -0.3, 0.0, 1.0, -0.5],
                     [-0.9, 0.4, -0.2, 0.1, 1.3, -0.8, 0.2, 0.6],
                     [-1.1, 0.5, -0.1, 0.3, 1.0, -0.6, 0.4, 0.5]], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 1, 1])


def make_loss(distributed, **options):
    torch.manual_seed(0)
    return pddm_ext.PDDMLoss(D, k=None, distributed=distributed, **options).double()


def loss_and_grads(loss_fn, x, labels):
    x = x.clone().requires_grad_()
    loss = loss_fn(x, labels)
    grads = torch.autograd.grad(loss, [x, *loss_fn.parameters()])
    return loss.detach(), grads[0], grads[1:]


def _empty():
    return torch.zeros(0, D, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)


# (name, rank that is bad or None, embeddings and labels of that rank or (all ranks) builder)
def _bad_cases(rank):
    good = (ROWS[:2] if rank == 0 else ROWS[2:], LABELS[:2] if rank == 0 else LABELS[2:])
    nan_rows = ROWS[2:].clone()
    nan_rows[1, 3] = float("nan")
    cases = {
        "labels_length": (1, (ROWS[2:], LABELS[2:3])),
        "features": (1, (ROWS[2:, :5], LABELS[2:])),
        "nan": (0, (nan_rows, LABELS[2:])),
        "labels_list": (1, (ROWS[2:], [1, 1])),
        "labels_float": (0, (ROWS[:2], LABELS[:2].double())),
        "one_d": (1, (ROWS[2], LABELS[2:])),
        "all_empty": (None, _empty()),
    }
    out = {}
    for name, (bad_rank, bad) in cases.items():
        out[name] = bad if bad_rank is None or bad_rank == rank else good
    return out


class _BadLabelsMemory:
    """A memory bank whose labels do not match its rows (one rank only)."""

    def get(self):
        return ROWS, LABELS[:3]

    def enqueue(self, embeddings, labels):
        pass


def _one_rank_argument_cases(rank):
    """name -> a call of ``PDDMLoss(distributed=True)`` (or ``all_gather``) that is bad on one rank only."""
    import torch.nn as nn

    half = slice(0, 2) if rank == 0 else slice(2, 4)
    x, labels = ROWS[half], LABELS[half]
    ref, ref_labels = x.flip(0).clone(), labels.flip(0)
    triplets = (torch.tensor([0]), torch.tensor([1]), torch.tensor([1]))

    def with_memory(poison, value=float("nan")):
        bank = pddm_ext.MemoryBank(16, D, dtype=torch.float64)
        bank.enqueue(ROWS, LABELS)
        if poison:
            bank.embeddings[2, 3] = value
        return make_loss(True, memory=bank)

    def nan_parameter():
        loss_fn = make_loss(True)
        if rank == 1:
            with torch.no_grad():
                loss_fn.unit.W_u[0, 0] = float("nan")
        return loss_fn(x, labels)

    def wrong_parameter_shape():
        loss_fn = make_loss(True)
        if rank == 0:
            loss_fn.unit.b_s = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        return loss_fn(x, labels)

    nan_ref = ref.clone()
    nan_ref[0, 1] = float("nan")
    huge_x = x.clone()
    huge_x[1, 2] = -1e200  # finite, but its squared distances overflow float64
    return {
        "ref_emb_without_ref_labels": lambda: make_loss(True)(x, labels, ref_emb=ref if rank == 1 else None),
        "ref_emb_on_one_rank": lambda: make_loss(True)(x, labels, None, *((ref, ref_labels) if rank == 0 else ())),
        "ref_emb_with_memory": lambda: with_memory(False)(x, labels, None, *((ref, ref_labels) if rank == 1 else ())),
        "indices_tuple_on_one_rank": lambda: make_loss(True)(x, labels, triplets if rank == 0 else None),
        "labels_none_on_one_rank": lambda: make_loss(True)(x, None if rank == 1 else labels),
        "parameter_nan_on_one_rank": nan_parameter,
        "parameter_shape_on_one_rank": wrong_parameter_shape,
        "memory_nan_on_one_rank": lambda: with_memory(rank == 1)(x, labels),
        "memory_too_large_on_one_rank": lambda: with_memory(rank == 0, 1e200)(x, labels),
        "embeddings_too_large_on_one_rank": lambda: make_loss(True)(huge_x if rank == 1 else x, labels),
        "memory_labels_on_one_rank": lambda: make_loss(True, memory=_BadLabelsMemory() if rank == 0 else
                                                       pddm_ext.MemoryBank(16, D))(x, labels),
        "ref_emb_nan_on_one_rank": lambda: make_loss(True)(x, labels, None, nan_ref if rank == 1 else ref, ref_labels),
        "ref_emb_features_on_one_rank": lambda: make_loss(True)(x, labels, None, ref[:, :5] if rank == 0 else ref,
                                                                ref_labels),
        "all_gather_not_a_tensor": lambda: pddm_ext.distributed.all_gather([1.0, 2.0] if rank == 1 else x),
        "all_gather_zero_dim": lambda: pddm_ext.distributed.all_gather(torch.tensor(1.0) if rank == 0 else x),
        "all_gather_dtype": lambda: pddm_ext.distributed.all_gather(x.float() if rank == 1 else x),
        "all_gather_trailing_shape": lambda: pddm_ext.distributed.all_gather(x[:, :5] if rank == 0 else x),
    }


def worker(out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    result = {"errors": {}, "gather_errors": {}, "wrapper_errors": {}}
    loss_fn = make_loss(True)
    wrapped = pddm_ext.distributed.GlobalBatchLoss(make_loss(False))

    # an empty shard on either rank
    for empty_rank in (1, 0):
        x, labels = (ROWS, LABELS) if rank != empty_rank else _empty()
        result[f"empty_on_{empty_rank}"] = loss_and_grads(loss_fn, x, labels)

    for name, (x, labels) in _bad_cases(rank).items():
        for key, call in (("errors", lambda: loss_fn(x, labels)),
                          ("gather_errors", lambda: pddm_ext.distributed.gather_embeddings_and_labels(x, labels)),
                          ("wrapper_errors", lambda: wrapped(x, labels))):
            try:
                call()
                result[key][name] = None
            except (TypeError, ValueError) as exc:
                result[key][name] = (type(exc).__name__, str(exc))

    import time

    result["one_rank_errors"], result["seconds"] = {}, {}
    for name, call in _one_rank_argument_cases(rank).items():
        start = time.perf_counter()
        try:
            call()
            result["one_rank_errors"][name] = None
        except Exception as exc:  # a RuntimeError here is gloo's timeout: a rank waited
            result["one_rank_errors"][name] = (type(exc).__name__, str(exc))
        result["seconds"][name] = time.perf_counter() - start
    # PDDMMiner inside pytorch-metric-learning's DistributedMinerWrapper: PML gathers first (without an
    # agreement of its own), then the miner checks rows that every rank holds: a NaN on one rank reaches
    # every rank's references (efficient: the rank's own rows are its queries), so every rank raises
    from pytorch_metric_learning.utils.distributed import DistributedMinerWrapper

    shard = slice(0, 2) if rank == 0 else slice(2, 4)
    nan_rows = ROWS[shard].clone()
    nan_rows[0, 2] = float("nan")
    result["miner_errors"] = {}
    for efficient in (False, True):
        start = time.perf_counter()
        try:
            DistributedMinerWrapper(pddm_ext.PDDMMiner(), efficient=efficient)(
                nan_rows if rank == 1 else ROWS[shard], LABELS[shard])
            result["miner_errors"][efficient] = None
        except Exception as exc:
            result["miner_errors"][efficient] = (type(exc).__name__, str(exc))
        result["seconds"][f"miner_{efficient}"] = time.perf_counter() - start
    # all_ranks: a flag false on one rank is false on every rank (the training loop's divergence check)
    from pddm_ext import collectives
    result["all_ranks"] = (collectives.all_ranks(rank == 0), collectives.all_ranks(torch.tensor(rank == 1)),
                           collectives.all_ranks(True))
    # all_gather itself still works: rows per rank may differ, the trailing shape is agreed
    result["gathered"] = pddm_ext.distributed.all_gather(ROWS[:1] if rank == 0 else ROWS[1:])

    # the ranks are still in step after the errors: a good step works
    half = slice(0, 2) if rank == 0 else slice(2, 4)
    result["after"] = loss_and_grads(loss_fn, ROWS[half], LABELS[half])
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist_faults")
    run_torchrun([__file__, str(out_dir)], 180)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single():
    return loss_and_grads(make_loss(False), ROWS, LABELS)


def test_a_flag_false_on_one_rank_is_false_on_every_rank(ranks):
    assert [res["all_ranks"] for res in ranks] == [(False, False, True)] * 2


@pytest.mark.parametrize("key", ["empty_on_1", "empty_on_0", "after"])
def test_an_empty_shard_gives_the_single_process_loss(ranks, single, key):
    loss, _, gtheta = single
    assert loss > 0
    for rank, res in enumerate(ranks):
        r_loss, r_gx, r_gtheta = res[key]
        torch.testing.assert_close(r_loss, loss, rtol=0, atol=1e-12)
        for g_dist, g in zip(r_gtheta, gtheta):
            torch.testing.assert_close(g_dist, g, rtol=1e-10, atol=1e-12)
        if key == f"empty_on_{rank}":
            assert r_gx.shape == (0, D)


EXPECTED = {
    "labels_length": ("ValueError", r"labels has length 1, expected 2.*rank 1"),
    "features": ("ValueError", r"embeddings has 5 features.*rank 1"),
    "nan": ("ValueError", r"embeddings contains NaN or Inf.*rank 0"),
    "labels_list": ("TypeError", r"labels must be a torch.Tensor.*rank 1"),
    "labels_float": ("ValueError", r"labels must have an integer dtype.*rank 0"),
    "one_d": ("ValueError", r"embeddings must be 2-D.*rank 1"),
    "all_empty": ("ValueError", r"embeddings is empty on every rank"),
}


@pytest.mark.parametrize("key", ["errors", "gather_errors", "wrapper_errors"])
@pytest.mark.parametrize("case", list(EXPECTED))
def test_a_bad_shard_raises_the_same_error_on_every_rank(ranks, key, case):
    import re

    kind, pattern = EXPECTED[case]
    if key in ("gather_errors", "wrapper_errors") and case == "features":
        pattern = r"different number of features"  # no expected width: the ranks disagree
    got = [res[key][case] for res in ranks]
    assert got[0] is not None and got[0] == got[1], got
    assert got[0][0] == kind and re.search(pattern, got[0][1]), got[0]


ONE_RANK = {
    "ref_emb_without_ref_labels": ("ValueError", r"ref_emb and ref_labels must be given together.*rank 1 of 2"),
    "ref_emb_on_one_rank": ("ValueError", r"ref_emb is given on rank\(s\) \[0\] but not on rank\(s\) \[1\]"),
    "ref_emb_with_memory": ("ValueError", r"ref_emb cannot be combined with memory=.*rank 1 of 2"),
    "indices_tuple_on_one_rank": ("ValueError", r"indices_tuple cannot be combined .*distributed=True.*rank 0 of 2"),
    "labels_none_on_one_rank": ("TypeError", r"labels must be a torch.Tensor.*rank 1 of 2"),
    "parameter_nan_on_one_rank": ("ValueError", r"^W_u contains NaN or Inf \(on rank 1 of 2\)$"),
    "parameter_shape_on_one_rank": ("ValueError", r"b_s must have shape \(\).*rank 0 of 2"),
    "memory_nan_on_one_rank": ("ValueError", r"^memory embeddings contains NaN or Inf, or a value above .*\(on rank 1 of 2\)$"),
    "memory_too_large_on_one_rank": ("ValueError", r"^memory embeddings contains NaN or Inf, or a value above "
                                     r"2\.37e\+153 in magnitude \(with 8 features .*overflow float64\).*\(on rank 0 of 2\)$"),
    "embeddings_too_large_on_one_rank": ("ValueError", r"^embeddings contains NaN or Inf, or a value above "
                                         r"2\.37e\+153 in magnitude .*\(on rank 1 of 2\)$"),
    "memory_labels_on_one_rank": ("ValueError", r"memory labels has length 3, expected 4.*rank 0 of 2"),
    "ref_emb_nan_on_one_rank": ("ValueError", r"^ref_emb contains NaN or Inf, or a value above .*\(on rank 1 of 2\)$"),
    "ref_emb_features_on_one_rank": ("ValueError", r"ref_emb has 5 features, expected 8.*rank 0 of 2"),
    "all_gather_not_a_tensor": ("TypeError", r"tensor must be a torch.Tensor, got list \(on rank 1 of 2\)"),
    "all_gather_zero_dim": ("ValueError", r"tensor must have at least one dimension.*rank 0 of 2"),
    "all_gather_dtype": ("ValueError", r"tensor has a different dtype on different ranks"),
    "all_gather_trailing_shape": ("ValueError", r"tensor has a different shape beyond dim 0 on different ranks"),
}


@pytest.mark.parametrize("case", list(ONE_RANK))
def test_a_check_that_fails_on_one_rank_raises_on_every_rank_at_once(ranks, case):
    """Every rank gets the same error, well within the 30 s process-group timeout: no rank waited in a
    collective that the failing rank never reached."""
    import re

    kind, pattern = ONE_RANK[case]
    got = [res["one_rank_errors"][case] for res in ranks]
    assert got[0] is not None and got[0] == got[1], got
    assert got[0][0] == kind and re.search(pattern, got[0][1]), got[0]
    assert max(res["seconds"][case] for res in ranks) < 15, [res["seconds"][case] for res in ranks]


@pytest.mark.parametrize("efficient", [False, True])
def test_the_miner_in_pmls_wrapper_raises_on_every_rank_for_a_nan_on_one(ranks, efficient):
    got = [res["miner_errors"][efficient] for res in ranks]
    assert all(g is not None and g[0] == "ValueError" and "contains NaN or Inf" in g[1] for g in got), got
    assert max(res["seconds"][f"miner_{efficient}"] for res in ranks) < 15


def test_all_gather_still_gathers_after_the_errors(ranks):
    for res in ranks:
        assert torch.equal(res["gathered"], ROWS)


if __name__ == "__main__":
    worker(sys.argv[1])


@pytest.mark.parametrize("loss", [5, "triplet", None])
def test_global_batch_loss_refuses_a_loss_that_is_not_callable(loss):
    """Checked when the wrapper is built, on one process, not at the first step on every rank."""
    with pytest.raises(TypeError, match=r"^loss must be a callable loss\(embeddings, labels\)"):
        pddm_ext.distributed.GlobalBatchLoss(loss)
