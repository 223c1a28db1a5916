"""Issue 14 item 3: distributed inputs that are bad, or empty, on one rank only (2 gloo ranks).

- An input that is bad on one rank raises the same clear error on every rank, without a hang: the
  ranks agree on validity (one small all_gather of a status vector) before any gathering.
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


def make_loss(distributed):
    torch.manual_seed(0)
    return pddm_ext.PDDMLoss(D, k=None, distributed=distributed).double()


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


if __name__ == "__main__":
    worker(sys.argv[1])
