"""Retrieval metrics against brute-force definitions."""

import pytest
import torch

from pddm_ext.app import evaluate as ev

pytest.importorskip("sklearn")


def brute_force_recall(x, labels, k):
    hits = 0
    for i in range(len(x)):
        dist = [(float(((x[i] - x[j]) ** 2).sum()), j) for j in range(len(x)) if j != i]
        nearest = [j for _, j in sorted(dist)[:k]]
        hits += any(labels[j] == labels[i] for j in nearest)
    return hits / len(x)


@pytest.mark.parametrize("block_rows", [1, 7, 1024])
def test_recall_at_k_matches_brute_force(block_rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (60,), generator=g)
    got = ev.recall_at_k(x, labels, (1, 2, 4, 8), block_rows=block_rows)
    for k in (1, 2, 4, 8):
        assert got[k] == pytest.approx(brute_force_recall(x, labels, k))


def test_nearest_neighbours_never_returns_the_query():
    x = torch.zeros(10, 3)  # all rows identical: every other row is at distance 0
    nn_idx = ev.nearest_neighbours(x, 9, block_rows=4)
    for i in range(10):
        assert i not in nn_idx[i].tolist()


def test_small_cases_by_hand():
    x = torch.tensor([[0.0], [0.1], [5.0], [5.2]])
    assert ev.recall_at_k(x, torch.tensor([0, 0, 1, 1]), (1, 2)) == {1: 1.0, 2: 1.0}
    assert ev.recall_at_k(x, torch.tensor([0, 1, 0, 1]), (1, 2)) == {1: 0.0, 2: 0.5}


def test_nmi_perfect_and_pixel_floor():
    x = torch.cat([torch.randn(20, 2) * 0.01 + c for c in (0.0, 10.0, 20.0)])
    labels = torch.arange(3).repeat_interleave(20)
    assert ev.nmi(x, labels) == pytest.approx(1.0)
    metrics = ev.retrieval_metrics(x, labels)
    assert set(metrics) == {"recall@1", "recall@2", "recall@4", "recall@8", "nmi"}
    assert metrics["recall@1"] == 1.0
