"""Image-to-image retrieval metrics with style as relevance, silhouette and the style-by-style cosine matrix (numpy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
# Queries are ranked in blocks so the similarity matrix never has to exist at full (N, N) size at once.
_QUERY_BLOCK = 512


def encode_labels(labels: Sequence, classes: Sequence | None = None) -> tuple[np.ndarray, list]:
    """Integer codes for arbitrary labels (style names or ids).

    Args:
        labels: one label per item.
        classes: the code order; default the sorted distinct labels. Every label must be in it.

    Returns:
        (codes (N,) int64, classes as a list).

    Raises:
        ValueError: when a label is not among `classes`.
    """
    values = list(labels)
    order = list(classes) if classes is not None else sorted(set(values))
    index = {c: i for i, c in enumerate(order)}
    missing = sorted({str(v) for v in values if v not in index})
    if missing:
        raise ValueError(f"labels not in the class list: {', '.join(missing)}")
    return np.array([index[v] for v in values], dtype=np.int64), order


def normalize(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64); zero rows stay zero.

    Raises:
        ValueError: for anything but a finite 2-D array.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (n, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def retrieval_metrics(embeddings: np.ndarray, labels: Sequence, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Every item queries all others by cosine similarity; an item of the same label is relevant.

    The query never appears in its own results. Queries whose label has no other item cannot be scored and are left
    out (they still act as distractors for the others). Ties in similarity keep the original item order.

    Metrics, averaged over queries, for each K in `ks`:
      - `P@K`: relevant items among the top K / the number of results returned (min(K, N - 1)).
      - `R@K`: relevant items among the top K / all relevant items for the query.
      - `mAP@K`: sum over relevant ranks r <= K of precision@r, divided by min(K, number relevant).
      - `nDCG@K`: binary gains, DCG = sum rel_r / log2(r + 1), over the ideal DCG for min(K, number relevant) hits.
    and `MRR`: 1 / rank of the first relevant item over the full ranking.

    Args:
        embeddings: (N, D) vectors (normalised here).
        labels: N labels (any hashable).
        ks: cut-offs, each >= 1.

    Returns:
        A flat dict of floats, plus `n_queries` (the number of scored queries).

    Raises:
        ValueError: for mismatched lengths, bad K, or when no item shares its label with another.
    """
    x = normalize(embeddings)
    codes, _ = encode_labels(labels)
    n = x.shape[0]
    if codes.shape[0] != n:
        raise ValueError(f"{n} embeddings but {codes.shape[0]} labels")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"cut-offs must be >= 1, got {ks}")
    counts = np.bincount(codes)
    n_relevant = counts[codes] - 1
    queries = np.flatnonzero(n_relevant > 0)
    if queries.size == 0:
        raise ValueError("no label has two or more items: retrieval with label relevance is undefined")

    totals: dict[str, float] = {}
    for start in range(0, queries.size, _QUERY_BLOCK):
        q = queries[start : start + _QUERY_BLOCK]
        sims = x[q] @ x.T
        sims[np.arange(q.size), q] = -np.inf  # the query itself sorts last and is dropped below
        order = np.argsort(-sims, axis=1, kind="stable")[:, : n - 1]
        relevance = codes[order] == codes[q][:, None]
        for name, mean in ranking_metrics(relevance, n_relevant[q], ks).items():
            totals[name] = totals.get(name, 0.0) + mean * q.size
    out = {name: total / queries.size for name, total in totals.items()}
    out["n_queries"] = float(queries.size)
    return out


def ranking_metrics(relevance: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean P@K, R@K, mAP@K, nDCG@K and MRR of ranked result lists (definitions in `retrieval_metrics`).

    Args:
        relevance: (Q, M) booleans, row q = whether each result of query q, best first, is relevant.
        n_relevant: (Q,) number of relevant items that exist for each query (>= 1; may exceed the row's hits).
        ks: cut-offs, each >= 1; a K beyond M is cut to M.

    Raises:
        ValueError: for bad shapes, a query without relevant items, or bad K.
    """
    rel = np.asarray(relevance, dtype=np.float64)
    r_total = np.asarray(n_relevant, dtype=np.float64)
    if rel.ndim != 2 or r_total.shape != (rel.shape[0],) or rel.shape[1] == 0:
        raise ValueError(f"relevance must be (queries, results) and n_relevant (queries,), got {rel.shape}, "
                         f"{r_total.shape}")  # fmt: skip
    if (r_total < 1).any() or (r_total < rel.sum(axis=1)).any():
        raise ValueError("n_relevant must be >= 1 and at least the relevant results listed for each query")
    if not ks or min(ks) < 1:
        raise ValueError(f"cut-offs must be >= 1, got {list(ks)}")
    m = rel.shape[1]
    ranks = np.arange(1, m + 1)
    discounts = 1.0 / np.log2(ranks + 1)
    hits = np.cumsum(rel, axis=1)
    has_hit = rel.any(axis=1)
    # 1 / rank of the first relevant result; a query whose list holds none scores 0.
    reciprocal = np.where(has_hit, 1.0 / (rel.argmax(axis=1) + 1), 0.0)
    out: dict[str, float] = {}
    for k in sorted({int(k) for k in ks}):
        kk = min(k, m)
        ideal_hits = np.minimum(kk, r_total)
        out[f"P@{k}"] = float((hits[:, kk - 1] / kk).mean())
        out[f"R@{k}"] = float((hits[:, kk - 1] / r_total).mean())
        precision_at_r = hits[:, :kk] / ranks[:kk]
        out[f"mAP@{k}"] = float(((precision_at_r * rel[:, :kk]).sum(axis=1) / ideal_hits).mean())
        dcg = (rel[:, :kk] * discounts[:kk]).sum(axis=1)
        idcg = np.cumsum(discounts[:kk])[ideal_hits.astype(np.int64) - 1]
        out[f"nDCG@{k}"] = float((dcg / idcg).mean())
    out["MRR"] = float(reciprocal.mean())
    return out


def silhouette(embeddings: np.ndarray, labels: Sequence) -> float:
    """Mean silhouette coefficient with cosine distance, in [-1, 1] (higher: styles form tighter, apart clusters).

    Raises:
        ValueError: unless there are at least 2 labels and fewer labels than items.
    """
    from sklearn.metrics import silhouette_score

    x = normalize(embeddings)
    codes, classes = encode_labels(labels)
    if codes.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} embeddings but {codes.shape[0]} labels")
    if not 2 <= len(classes) <= x.shape[0] - 1:
        raise ValueError(f"silhouette needs 2..n-1 labels, got {len(classes)} labels for {x.shape[0]} items")
    return float(silhouette_score(x, codes, metric="cosine"))


def style_matrix(embeddings: np.ndarray, labels: Sequence, classes: Sequence) -> np.ndarray:
    """Mean cosine similarity between the items of every pair of styles.

    Entry (a, b) is the mean of cos(x_i, x_j) over i in style a and j in style b; the diagonal averages over
    distinct pairs i != j of one style (self-similarity, always 1, is left out). Entries without any pair are NaN.

    Args:
        embeddings: (N, D) vectors (normalised here).
        labels: N labels, each one of `classes`.
        classes: row/column order (e.g. all 13 styles).

    Returns:
        (len(classes), len(classes)) float64 array, symmetric.
    """
    x = normalize(embeddings)
    codes, order = encode_labels(labels, classes)
    if codes.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} embeddings but {codes.shape[0]} labels")
    s = len(order)
    onehot = np.zeros((x.shape[0], s))
    onehot[np.arange(x.shape[0]), codes] = 1.0
    # sum_{i in a, j in b} x_i . x_j = (sum_{i in a} x_i) . (sum_{j in b} x_j): O(N D) instead of O(N^2 D).
    centroids = onehot.T @ x
    totals = centroids @ centroids.T
    n = onehot.sum(axis=0)
    self_sims = onehot.T @ (x * x).sum(axis=1)  # 1 per non-zero item: removes the i == j terms
    pairs = np.outer(n, n)
    np.fill_diagonal(pairs, n * (n - 1))
    np.fill_diagonal(totals, np.diag(totals) - self_sims)
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = np.where(pairs > 0, totals / np.where(pairs > 0, pairs, 1.0), np.nan)
    return matrix


def matrix_summary(matrix: np.ndarray) -> dict[str, float]:
    """Diagonal vs off-diagonal mean of a style matrix; a positive `style_gap` means styles dominate their rows."""
    diag = np.diag(matrix)
    off = matrix[~np.eye(matrix.shape[0], dtype=bool)]
    diag_mean = float(np.nanmean(diag)) if np.isfinite(diag).any() else float("nan")
    off_mean = float(np.nanmean(off)) if np.isfinite(off).any() else float("nan")
    return {"same_style_cos": diag_mean, "cross_style_cos": off_mean, "style_gap": diag_mean - off_mean}


def color_histogram(pixels: np.ndarray, bins: int = 8) -> np.ndarray:
    """Joint RGB histogram of an image, L1-normalised: the no-learning baseline every learned model must beat.

    Args:
        pixels: (H, W, 3) uint8 RGB array (e.g. `np.asarray(pil_image.convert("RGB"))`).
        bins: bins per channel; the result has bins**3 entries (8 → 512).

    Returns:
        float64 (bins**3,) summing to 1 (all zeros for an empty image). Cosine similarity of two such vectors
        compares colour distributions, so retrieval with them needs nothing but the pixels.

    Raises:
        ValueError: for a non-RGB array or bins outside 1..256.
    """
    x = np.asarray(pixels)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"pixels must be (height, width, 3) RGB, got shape {x.shape}")
    if not 1 <= bins <= 256:
        raise ValueError(f"bins must be in 1..256, got {bins}")
    q = (x.reshape(-1, 3).astype(np.int64) * bins) // 256  # uniform bins over 0..255 per channel
    codes = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    counts = np.bincount(codes, minlength=bins**3).astype(np.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts
