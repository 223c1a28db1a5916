"""Zero-shot retrieval metrics: Recall@K (exact k-NN, blocked ``torch.topk``) and NMI of k-means.

Every test image queries all *other* test images; Recall@K is the fraction of queries with at
least one same-class image among their K nearest neighbours (squared Euclidean distance).
"""

from __future__ import annotations

import torch

RECALL_KS = (1, 2, 4, 8)


def nearest_neighbours(x, k, *, block_rows=1024):
    """Indices (n, k) of the k nearest other rows of x by squared Euclidean distance, nearest first.

    Exact, in query blocks of ``block_rows`` so memory stays O(block_rows * n); a row never
    retrieves itself.
    """
    x = x.float()
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and n - 1 = {n - 1}, got {k}")
    sq = (x * x).sum(1)
    out = torch.empty(n, k, dtype=torch.int64, device=x.device)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        # ||q||^2 is constant per query, so ranking by ||r||^2 - 2 q.r ranks by distance
        dist = sq[None, :] - 2 * (x[start:stop] @ x.T)
        rows = torch.arange(start, stop, device=x.device)
        dist[rows - start, rows] = float("inf")
        out[start:stop] = dist.topk(k, dim=1, largest=False).indices
    return out


def recall_at_k(x, labels, ks=RECALL_KS, *, block_rows=1024):
    """{K: Recall@K} over all rows of x as queries against all other rows."""
    labels = torch.as_tensor(labels, device=x.device)
    nn_idx = nearest_neighbours(x, max(ks), block_rows=block_rows)
    hit = labels[nn_idx] == labels[:, None]  # (n, max k)
    first_hit = torch.cummax(hit.int(), dim=1).values.bool()
    return {k: float(first_hit[:, k - 1].float().mean()) for k in ks}


def nmi(x, labels, *, seed=0):
    """Normalised mutual information between the labels and k-means (k = number of classes) of x."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    labels = torch.as_tensor(labels).cpu().numpy()
    n_clusters = len(set(labels.tolist()))
    pred = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit_predict(x.detach().cpu().double().numpy())
    return float(normalized_mutual_info_score(labels, pred))


def retrieval_metrics(x, labels, ks=RECALL_KS, *, seed=0):
    """{"recall@1": ..., "recall@2": ..., ..., "nmi": ...} for embeddings (or flattened pixels) x."""
    out = {f"recall@{k}": v for k, v in recall_at_k(x, labels, ks).items()}
    out["nmi"] = nmi(x, labels, seed=seed)
    return out


@torch.no_grad()
def embed(model, dataset, *, batch_size=512, device="cpu"):
    """(embeddings (n, d) on CPU, labels (n,)) of a dataset, model in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    feats, labels = [], []
    for x, y in loader:
        feats.append(model(x.to(device)).float().cpu())
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
