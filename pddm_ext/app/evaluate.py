"""Zero-shot retrieval metrics: Recall@K, MAP@R, R-Precision (exact k-NN) and NMI of k-means.

Every test image queries all *other* test images, ranked by Euclidean distance (nearest first; equal
distances in index order). The metrics:

- Recall@K (Huang, Loy & Tang 2016, Sec. 4; Oh Song et al. 2016): the fraction of queries with at least
  one same-class image among their K nearest neighbours, for each cut-off K in ``cutoffs``.
- MAP@R and R-Precision (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020,
  Sec. 3.2): for a query with R other images of its class, R-Precision = (same-class images among its R
  nearest) / R and MAP@R = (1 / R) sum_{i=1..R} P(i) [the i-th neighbour is of its class], P(i) being the
  precision among the i nearest. Queries whose class has no other image (R = 0) are left out of both.
- NMI: normalised mutual information between the labels and k-means (k = number of classes).

Distances are exact to the precision of the input: embeddings of every floating dtype are cast to
float64 (exact) and ranked by ``torch.cdist(..., compute_mode="donot_use_mm_for_euclid_dist")``
(differences, never the expansion |a|^2 + |b|^2 - 2 a.b, which cancels for rows far from the origin and
whose rounding makes exactly equal distances unequal). Equal distances (as computed) rank in index order;
every dtype takes the same computation, so float32 and float64 copies of the same values rank alike. Work is done in blocks of ``block_rows`` queries, so
memory stays O(block_rows * n).

Every function validates its inputs before computing: ``TypeError`` for a non-tensor or non-floating
``embeddings`` or non-integer ``labels``, ``ValueError`` (naming the argument) for NaN/Inf entries, wrong
shapes, label counts that do not match, or cut-offs out of range.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

RECALL_CUTOFFS = (1, 2, 4, 8)
RECALL_KS = RECALL_CUTOFFS  # the former name


# --- validation -------------------------------------------------------------------------------


def check_embeddings(embeddings, name="embeddings", *, min_rows=2):
    """``embeddings`` as a 2-D floating tensor of at least ``min_rows`` finite rows, else an error naming ``name``."""
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, d), got {type(embeddings).__name__}")
    if not embeddings.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {embeddings.dtype}")
    if embeddings.dim() != 2 or embeddings.shape[1] < 1:
        raise ValueError(f"{name} must have shape (n, d) with d >= 1, got {tuple(embeddings.shape)}")
    if embeddings.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows (each row queries the others), got {embeddings.shape[0]}")
    finite = torch.isfinite(embeddings).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise ValueError(f"{name} contains NaN or Inf in {bad.numel()} row(s), first row {int(bad[0])}")
    return embeddings


def check_labels(labels, n, name="labels", device=None):
    """``labels`` (tensor, numpy array or sequence of ints) as a 1-D int64 tensor of length ``n``."""
    if isinstance(labels, (str, bytes)) or labels is None:
        raise TypeError(f"{name} must be a 1-D sequence of integer class labels, got {type(labels).__name__}")
    try:
        t = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a 1-D sequence of integer class labels, got {type(labels).__name__}") from exc
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the {n} embeddings, got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.int64)


def _check_cutoffs(cutoffs, n):
    if isinstance(cutoffs, numbers.Integral):
        cutoffs = (cutoffs,)
    cutoffs = tuple(cutoffs)
    if not cutoffs or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in cutoffs):
        raise TypeError(f"cutoffs must be a non-empty sequence of ints, got {cutoffs!r}")
    if not all(1 <= c <= n - 1 for c in cutoffs):
        raise ValueError(f"cutoffs must lie in [1, n - 1] = [1, {n - 1}] (each query ranks the other rows), got {cutoffs}")
    return tuple(int(c) for c in cutoffs)


def _check_block_rows(block_rows):
    if not isinstance(block_rows, numbers.Integral) or isinstance(block_rows, bool) or block_rows < 1:
        raise ValueError(f"block_rows must be an int >= 1, got {block_rows!r}")
    return int(block_rows)


def evaluation_problem(labels, cutoffs=RECALL_CUTOFFS, class_names=None):
    """Why :func:`retrieval_metrics` is undefined for a test set with these ``labels`` (n,), as one
    phrase, or None when every metric is defined. Undefined: fewer than ``max(cutoffs) + 1`` rows
    (Recall@K ranks K other rows per query), or a class with a single row (its query has no
    same-class image to retrieve, so its Recall@K is 0 by construction and MAP@R leaves it out;
    a set of such classes makes every metric meaningless). ``class_names``: the names of the classes
    in sorted label order, used to name a single-row class (default: its label)."""
    labels = torch.as_tensor(labels)
    n = int(labels.numel())
    need = max(cutoffs) + 1
    if n < need:
        return (f"{n} test image(s); Recall@{max(cutoffs)} ranks {max(cutoffs)} other images per query, "
                f"so the test classes need at least {need} images in all")
    classes, counts = torch.unique(labels, return_counts=True)
    single = [i for i, c in enumerate(counts.tolist()) if c < 2]
    if single:
        names = [class_names[i] if class_names is not None and len(class_names) == len(classes)
                 else str(int(classes[i])) for i in single]
        shown = ", ".join(repr(name) for name in names[:5]) + (", ..." if len(names) > 5 else "")
        return (f"{len(single)} test class(es) with a single image ({shown}); every test class needs at least "
                f"2 images (a query retrieves the other images of its class)")
    return None


# --- exact nearest neighbours ------------------------------------------------------------------


def _distance_blocks(x, block_rows):
    """Yields (start, stop, squared-or-plain distances of rows start:stop to all rows), exact as the
    module docstring says; ranks equal those of the Euclidean distance."""
    # Every dtype is ranked in float64 by differences (never |a|^2 + |b|^2 - 2 a.b, whose rounding
    # splits exactly equal distances): the same computation for every input, so ties stay ties.
    x = x.double()
    for start in range(0, x.shape[0], block_rows):
        stop = min(start + block_rows, x.shape[0])
        yield start, stop, torch.cdist(x[start:stop], x, compute_mode="donot_use_mm_for_euclid_dist")


def _ranked_neighbours(x, k, block_rows):
    n = x.shape[0]
    out = torch.empty(n, k, dtype=torch.int64, device=x.device)
    for start, stop, dist in _distance_blocks(x, block_rows):
        rows = torch.arange(start, stop, device=x.device)
        dist[rows - start, rows] = float("inf")  # a row never retrieves itself
        out[start:stop] = _k_smallest_in_index_order(dist, k)
    return out


def _k_smallest_in_index_order(dist, k):
    """Per row, the indices of the k smallest entries, ascending, equal values in index order: what a
    stable sort would give, at the cost of a topk (a full sort of every row is many times slower)."""
    kth = dist.topk(k, dim=1, largest=False, sorted=True).values[:, -1:]
    less = dist < kth
    equal = dist == kth
    # all entries below the k-th value, then the first (k - #below) entries equal to it, by index
    selected = less | (equal & (equal.cumsum(1) <= k - less.sum(1, keepdim=True)))
    idx = selected.nonzero()[:, 1].view(dist.shape[0], k)  # ascending index within each row
    order = dist.gather(1, idx).sort(dim=1, stable=True).indices
    return idx.gather(1, order)


def nearest_neighbours(embeddings, k, *, block_rows=1024):
    """Indices (n, k) int64 of the k nearest *other* rows of ``embeddings`` (n, d), nearest first by
    Euclidean distance, ties in index order. Exact (see the module docstring); memory O(block_rows * n).

    Raises TypeError / ValueError (naming the argument) for bad ``embeddings``, ``k`` outside [1, n - 1]
    or ``block_rows`` < 1.
    """
    x = check_embeddings(embeddings)
    n = x.shape[0]
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k < n:
        raise ValueError(f"k must be an int between 1 and n - 1 = {n - 1}, got {k!r}")
    return _ranked_neighbours(x, int(k), _check_block_rows(block_rows))


def _recall(labels, nn_idx, cutoffs):
    hit = labels[nn_idx] == labels[:, None]
    first_hit = torch.cummax(hit.int(), dim=1).values.bool()
    return {c: float(first_hit[:, c - 1].double().mean()) for c in cutoffs}


def _largest_class(labels):
    return int(torch.unique(labels, return_counts=True)[1].max())


def _map_at_r(labels, nn_idx):
    """(MAP@R, R-Precision, number of queries with R >= 1) from ranked neighbours of >= max R columns."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    r = counts[inverse] - 1  # other images of the query's class
    keep = r > 0
    if not bool(keep.any()):
        raise ValueError("labels: no class has two or more rows, so MAP@R and R-Precision are undefined")
    r, nn_idx, query_labels = r[keep], nn_idx[keep], labels[keep]
    width = int(r.max())
    hit = (labels[nn_idx[:, :width]] == query_labels[:, None]).double()
    within = torch.arange(width, device=labels.device)[None, :] < r[:, None]
    hit = hit * within
    precision_at_i = hit.cumsum(1) / torch.arange(1, width + 1, device=labels.device, dtype=torch.float64)
    rd = r.double()
    map_at_r = ((precision_at_i * hit).sum(1) / rd).mean()
    r_precision = (hit.sum(1) / rd).mean()
    return float(map_at_r), float(r_precision), int(keep.sum())


def recall_at_k(embeddings, labels, cutoffs=RECALL_CUTOFFS, *, block_rows=1024):
    """{K: Recall@K} (floats in [0, 1]) for each cut-off K in ``cutoffs``, every row of ``embeddings``
    (n, d) querying all other rows; ``labels`` (n,) integer class labels."""
    x = check_embeddings(embeddings)
    labels = check_labels(labels, x.shape[0], device=x.device)
    cutoffs = _check_cutoffs(cutoffs, x.shape[0])
    nn_idx = _ranked_neighbours(x, max(cutoffs), _check_block_rows(block_rows))
    return _recall(labels, nn_idx, cutoffs)


def map_at_r(embeddings, labels, *, block_rows=1024):
    """{"map@r": MAP@R, "r_precision": R-Precision} (floats in [0, 1]; Musgrave et al. 2020) with every
    row of ``embeddings`` (n, d) querying all other rows; ``labels`` (n,) integer class labels. Raises
    ValueError when no class has two rows."""
    x = check_embeddings(embeddings)
    labels = check_labels(labels, x.shape[0], device=x.device)
    width = _largest_class(labels) - 1
    nn_idx = _ranked_neighbours(x, max(1, width), _check_block_rows(block_rows))
    m, rp, _ = _map_at_r(labels, nn_idx)
    return {"map@r": m, "r_precision": rp}


def nmi(embeddings, labels, *, seed=0):
    """Normalised mutual information (float in [0, 1]) between ``labels`` and k-means (k = number of
    classes, scikit-learn, ``seed``) of ``embeddings`` (n, d), computed in float64."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    x = check_embeddings(embeddings)
    labels = check_labels(labels, x.shape[0]).cpu().numpy()
    n_clusters = len(set(labels.tolist()))
    pred = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit_predict(x.detach().cpu().double().numpy())
    return float(normalized_mutual_info_score(labels, pred))


def retrieval_metrics(embeddings, labels, cutoffs=RECALL_CUTOFFS, *, seed=0, block_rows=1024):
    """{"recall@1": ..., "recall@8": ..., "map@r": ..., "r_precision": ..., "nmi": ...} for
    ``embeddings`` (n, d) (or flattened pixels) and ``labels`` (n,), from one exact ranking."""
    x = check_embeddings(embeddings)
    labels = check_labels(labels, x.shape[0], device=x.device)
    cutoffs = _check_cutoffs(cutoffs, x.shape[0])
    width = max(max(cutoffs), _largest_class(labels) - 1)
    nn_idx = _ranked_neighbours(x, min(width, x.shape[0] - 1), _check_block_rows(block_rows))
    out = {f"recall@{c}": v for c, v in _recall(labels, nn_idx, cutoffs).items()}
    out["map@r"], out["r_precision"], _ = _map_at_r(labels, nn_idx)
    out["nmi"] = nmi(x, labels, seed=seed)
    return out


@torch.no_grad()
def embed(model, dataset, *, batch_size=512, device="cpu"):
    """(embeddings (n, d) on the CPU, labels (n,)) of a dataset, model in eval mode (restored after).
    Float64 outputs stay float64; half-precision ones become float32."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    feats, labels = [], []
    for x, y in loader:
        f = model(x.to(device))
        feats.append((f if f.dtype == torch.float64 else f.float()).cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def pixel_floor(dataset, *, seed=0, batch_size=512):
    """The metrics of raw pixels (flattened, L2-normalised): what an embedding must beat."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    xs, ys = [], []
    for x, y in loader:
        xs.append(torch.nn.functional.normalize(x.flatten(1).float(), dim=1))
        ys.append(y)
    return retrieval_metrics(torch.cat(xs), torch.cat(ys), seed=seed)
