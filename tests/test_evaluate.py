"""Retrieval metrics against brute-force definitions, pytorch-metric-learning's AccuracyCalculator, and
their input checks (NaN/Inf, shapes, float64 kept, exact distances)."""

import math

import numpy as np
import pytest
import torch

from pddm_ext.app import evaluate as ev

pytest.importorskip("sklearn")


def exact_ranking(x, i):
    """Other rows of x ranked by the exact distance to row i (math.fsum of squared differences of
    the values as Python floats), ties in index order."""
    rows = x.double().tolist()
    dist = [(math.fsum((a - b) ** 2 for a, b in zip(rows[i], rows[j])), j) for j in range(len(rows)) if j != i]
    return [j for _, j in sorted(dist)]


def brute_force_recall(x, labels, k):
    labels = labels.tolist()
    return sum(any(labels[j] == labels[i] for j in exact_ranking(x, i)[:k]) for i in range(len(x))) / len(x)


def brute_force_map_at_r(x, labels):
    """MAP@R and R-Precision by their definition (Musgrave et al. 2020), loop by loop."""
    labels = labels.tolist()
    aps, rps = [], []
    for i in range(len(x)):
        r = sum(1 for j in range(len(x)) if j != i and labels[j] == labels[i])
        if r == 0:
            continue
        ranked = exact_ranking(x, i)[:r]
        hits, ap = 0, 0.0
        for pos, j in enumerate(ranked, start=1):
            if labels[j] == labels[i]:
                hits += 1
                ap += hits / pos
        aps.append(ap / r)
        rps.append(hits / r)
    return sum(aps) / len(aps), sum(rps) / len(rps)


@pytest.mark.parametrize("block_rows", [1, 7, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recall_at_k_matches_brute_force(block_rows, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(61, 5, generator=g, dtype=dtype)
    labels = torch.randint(0, 6, (61,), generator=g)
    got = ev.recall_at_k(x, labels, (1, 2, 4, 8), block_rows=block_rows)
    for k in (1, 2, 4, 8):
        assert got[k] == pytest.approx(brute_force_recall(x, labels, k), abs=1e-12)


def test_nearest_neighbours_never_returns_the_query_and_breaks_ties_by_index():
    x = torch.zeros(10, 3)  # all rows identical: every other row is at distance 0
    nn_idx = ev.nearest_neighbours(x, 9, block_rows=4)
    for i in range(10):
        assert nn_idx[i].tolist() == [j for j in range(10) if j != i]


def test_small_cases_by_hand():
    x = torch.tensor([[0.0], [0.1], [5.0], [5.2]])
    assert ev.recall_at_k(x, torch.tensor([0, 0, 1, 1]), (1, 2)) == {1: 1.0, 2: 1.0}
    assert ev.recall_at_k(x, torch.tensor([0, 1, 0, 1]), (1, 2)) == {1: 0.0, 2: 0.5}
    # MAP@R by hand: classes {0, 1} and {2, 3}, R = 1 for every query, each nearest is its partner
    assert ev.map_at_r(x, torch.tensor([0, 0, 1, 1])) == {"map@r": 1.0, "r_precision": 1.0}
    # classes {0, 2} and {1, 3}: every nearest neighbour is of the other class
    assert ev.map_at_r(x, torch.tensor([0, 1, 0, 1])) == {"map@r": 0.0, "r_precision": 0.0}


def test_nmi_perfect_and_pixel_floor():
    x = torch.cat([torch.randn(20, 2) * 0.01 + c for c in (0.0, 10.0, 20.0)])
    labels = torch.arange(3).repeat_interleave(20)
    assert ev.nmi(x, labels) == pytest.approx(1.0)
    metrics = ev.retrieval_metrics(x, labels)
    assert set(metrics) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi"}
    assert metrics["recall@1"] == 1.0 and metrics["map@r"] == 1.0 and metrics["r_precision"] == 1.0


# --- MAP@R and R-Precision --------------------------------------------------------------------


@pytest.mark.parametrize("seed, n, classes", [(0, 37, 4), (1, 50, 7), (2, 23, 3)])
def test_map_at_r_matches_a_brute_force_loop(seed, n, classes):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[0] = classes  # a class of one row: R = 0, left out
    want_map, want_rp = brute_force_map_at_r(x, labels)
    for block_rows in (1, 5, 1024):
        got = ev.map_at_r(x, labels, block_rows=block_rows)
        assert got["map@r"] == pytest.approx(want_map, abs=1e-12)
        assert got["r_precision"] == pytest.approx(want_rp, abs=1e-12)
    metrics = ev.retrieval_metrics(x, labels, (1, 2))
    assert metrics["map@r"] == pytest.approx(want_map, abs=1e-12)


def test_map_at_r_matches_pytorch_metric_learning():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 4, generator=g, dtype=torch.float64)
    labels = torch.arange(60) % 5
    calc = AccuracyCalculator(include=("mean_average_precision_at_r", "r_precision", "precision_at_1"),
                              knn_func=CustomKNN(LpDistance(normalize_embeddings=False)))
    want = calc.get_accuracy(x, labels)
    got = ev.retrieval_metrics(x, labels)
    assert got["map@r"] == pytest.approx(want["mean_average_precision_at_r"], abs=1e-9)
    assert got["r_precision"] == pytest.approx(want["r_precision"], abs=1e-9)
    assert got["recall@1"] == pytest.approx(want["precision_at_1"], abs=1e-9)


# --- exact distances: a large common offset, float64 kept ---------------------------------------


@pytest.mark.parametrize("dtype, offset, spread", [(torch.float32, 1e3, 1e-2), (torch.float64, 1e8, 1e-3)])
def test_rows_sharing_a_large_offset_are_ranked_exactly(dtype, offset, spread):
    g = torch.Generator().manual_seed(4)
    x = (offset + spread * torch.randn(40, 3, generator=g, dtype=torch.float64)).to(dtype)
    nn_idx = ev.nearest_neighbours(x, 5, block_rows=16)
    for i in range(len(x)):
        assert nn_idx[i].tolist() == exact_ranking(x, i)[:5], i


def test_rows_with_a_large_common_offset_rank_exactly():
    x = torch.tensor([[1000.0], [1000.1], [1000.2], [1000.3]])
    assert ev.nearest_neighbours(x, 1)[:, 0].tolist() == [1, 0, 3, 2]


def test_float64_is_not_rounded_to_float32():
    # In float32 all three rows are 1.0 (ties: index order, row 1's nearest would be row 0); in float64
    # row 2 is nearer to row 1 (1e-9) than row 0 is (2e-9).
    x = torch.tensor([[1.0], [1.0 + 2e-9], [1.0 + 3e-9]], dtype=torch.float64)
    assert ev.nearest_neighbours(x, 1)[:, 0].tolist() == [1, 2, 1]
    assert ev.recall_at_k(x, torch.tensor([0, 1, 1]), (1,)) == {1: 2 / 3}


def test_embed_keeps_float64():
    model = torch.nn.Linear(3, 2).double()
    data = torch.utils.data.TensorDataset(torch.randn(5, 3, dtype=torch.float64), torch.arange(5))
    feats, labels = ev.embed(model, data)
    assert feats.dtype == torch.float64 and labels.tolist() == list(range(5))


# --- input checks -----------------------------------------------------------------------------

LABELS = torch.arange(20) // 5


def _all_metrics():
    return [
        ("nearest_neighbours", lambda x, y: ev.nearest_neighbours(x, 3)),
        ("recall_at_k", lambda x, y: ev.recall_at_k(x, y)),
        ("map_at_r", lambda x, y: ev.map_at_r(x, y)),
        ("nmi", lambda x, y: ev.nmi(x, y)),
        ("retrieval_metrics", lambda x, y: ev.retrieval_metrics(x, y)),
    ]


@pytest.mark.parametrize("name, fn", _all_metrics())
@pytest.mark.parametrize("bad", ["all nan", "one nan", "inf", "-inf"])
def test_nan_or_inf_embeddings_raise_naming_the_argument(name, fn, bad):
    x = torch.randn(20, 8)
    if bad == "all nan":
        x[:] = float("nan")
    elif bad == "one nan":
        x[7, 3] = float("nan")
    else:
        x[7, 3] = float(bad)
    with pytest.raises(ValueError, match="embeddings contains NaN or Inf"):
        fn(x, LABELS)


@pytest.mark.parametrize("name, fn", _all_metrics())
@pytest.mark.parametrize("x, error, message", [
    (torch.randn(20), ValueError, r"embeddings must have shape \(n, d\)"),
    (torch.randn(20, 2, 2), ValueError, r"embeddings must have shape \(n, d\)"),
    (torch.randn(20, 0), ValueError, r"embeddings must have shape \(n, d\)"),
    (torch.randint(0, 3, (20, 4)), TypeError, "embeddings must have a floating dtype"),
    (np.zeros((20, 4)), TypeError, "embeddings must be a torch.Tensor"),
])
def test_bad_embeddings(name, fn, x, error, message):
    with pytest.raises(error, match=message):
        fn(x, LABELS)


@pytest.mark.parametrize("name, fn", [f for f in _all_metrics() if f[0] != "nearest_neighbours"])
@pytest.mark.parametrize("labels, error, message", [
    (torch.arange(19) // 5, ValueError, r"labels must have shape \(20,\) to match the 20 embeddings"),
    (torch.zeros(20, 1, dtype=torch.int64), ValueError, r"labels must have shape \(20,\)"),
    (torch.zeros(20), TypeError, "labels must have an integer dtype"),
    ("abc", TypeError, "labels must be a 1-D sequence"),
])
def test_bad_labels(name, fn, labels, error, message):
    with pytest.raises(error, match=message):
        fn(torch.randn(20, 4), labels)


def test_labels_as_list_or_numpy_are_accepted():
    x = torch.randn(20, 4)
    want = ev.recall_at_k(x, LABELS)
    assert ev.recall_at_k(x, LABELS.tolist()) == want == ev.recall_at_k(x, LABELS.numpy())


@pytest.mark.parametrize("cutoffs, error", [((0,), ValueError), ((20,), ValueError), ((), TypeError),
                                            ((1.5,), TypeError)])
def test_bad_cutoffs(cutoffs, error):
    with pytest.raises(error, match="cutoffs"):
        ev.recall_at_k(torch.randn(20, 4), LABELS, cutoffs)


def test_bad_k_and_block_rows():
    with pytest.raises(ValueError, match="k must be"):
        ev.nearest_neighbours(torch.randn(5, 2), 5)
    with pytest.raises(ValueError, match="block_rows"):
        ev.recall_at_k(torch.randn(5, 2), [0, 0, 1, 1, 1], (1,), block_rows=0)


def test_map_at_r_without_any_class_of_two_rows_is_an_error():
    with pytest.raises(ValueError, match="no class has two or more rows"):
        ev.map_at_r(torch.randn(4, 2), [0, 1, 2, 3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_go_to_the_smaller_index_at_every_cutoff(dtype):
    # small integer coordinates: many equal distances, inside the k nearest and across the k-th
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-2, 3, (30, 2), generator=g).to(dtype)
    for k in (1, 3, 7, 29):
        nn_idx = ev.nearest_neighbours(x, k, block_rows=8)
        for i in range(len(x)):
            assert nn_idx[i].tolist() == exact_ranking(x, i)[:k], (k, i)


# --- float32 ties are exact ties, as in float64 ----------------------------------------------


def test_float32_exact_ties_rank_in_index_order_as_float64_does():
    # row 4 = (0, 2) is at squared distance exactly 4 from row 0 (-2, 2) and from row 2 (2, 2)
    x = torch.tensor([[-2.0, 2.0], [2.0, 1.0], [2.0, 2.0], [2.0, -2.0], [0.0, 2.0]])
    assert ev.nearest_neighbours(x, 3)[4].tolist() == [0, 2, 1]
    assert ev.nearest_neighbours(x.double(), 3)[4].tolist() == [0, 2, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", range(6))
def test_integer_grid_recall_matches_brute_force_in_every_dtype(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (30, 3), generator=g).to(dtype)
    labels = torch.randint(0, 4, (30,), generator=g)
    got = ev.recall_at_k(x, labels, (1, 2, 4), block_rows=7)
    for k in (1, 2, 4):
        assert got[k] == pytest.approx(brute_force_recall(x, labels, k), abs=1e-12)
    assert torch.equal(ev.nearest_neighbours(x, 29, block_rows=7), ev.nearest_neighbours(x.double(), 29))
