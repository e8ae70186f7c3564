"""Retrieval-quality metrics over ranked result lists (pure numpy).

Inputs, for nq queries:
- `rel`: bool (nq, L), rel[q, i] is True when the result at rank i + 1 of query q is relevant.
  Rows shorter than L (fewer results came back) are padded with False: a missing result is a
  non-relevant one. Results are distinct products, so a row holds each relevant item once.
- `n_relevant`: int (nq,), R = the number of relevant items in the whole index for query q
  (in leave-one-out, without the query's own product). Each row must satisfy sum(rel[q]) <= R.

Definitions, at cut-off k (columns past L count as non-relevant):
- hit@k(q)        = 1 if any(rel[q, :k]) else 0;  recall@k = mean of hit@k (the metric-learning
  convention of Recall@K, e.g. Musgrave et al., "A Metric Learning Reality Check").
- precision@k(q)  = sum(rel[q, :k]) / k (the denominator is k even when fewer results came back).
- AP@k(q)         = (1 / min(R, k)) * sum_{i <= k} precision@i(q) * rel[q, i];  mAP@k = mean AP@k.
Queries with R = 0 have no defined AP and cannot be hit: `summarize` leaves them out of every
mean and counts them as `no_relevant`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def _at(rel: np.ndarray, k: int) -> np.ndarray:
    """The first k columns of rel, padded with False when rel has fewer."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rel = np.asarray(rel, dtype=bool)
    if rel.ndim != 2:
        raise ValueError(f"rel must be (nq, L), got shape {rel.shape}")
    top = rel[:, :k]
    if top.shape[1] < k:
        top = np.pad(top, ((0, 0), (0, k - top.shape[1])))
    return top


def _check(rel: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    n_relevant = np.asarray(n_relevant, dtype=np.int64)
    if n_relevant.shape != (len(rel),):
        raise ValueError(f"n_relevant must be ({len(rel)},), got shape {n_relevant.shape}")
    found = np.asarray(rel, dtype=bool).sum(axis=1)
    if (found > n_relevant).any():
        q = int(np.argmax(found > n_relevant))
        raise ValueError(f"query {q}: {found[q]} relevant results but R = {n_relevant[q]}")
    return n_relevant


def hit_at_k(rel: np.ndarray, k: int) -> np.ndarray:
    """float64 (nq,): 1.0 where a relevant result is in the top k."""
    return _at(rel, k).any(axis=1).astype(np.float64)


def precision_at_k(rel: np.ndarray, k: int) -> np.ndarray:
    """float64 (nq,): the fraction of the top k (always divided by k) that is relevant."""
    return _at(rel, k).sum(axis=1) / k


def average_precision_at_k(rel: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """float64 (nq,): AP@k = (1/min(R, k)) * sum_{i<=k} precision@i * rel_i; NaN where R = 0."""
    n_relevant = _check(rel, n_relevant)
    top = _at(rel, k).astype(np.float64)
    ranks = np.arange(1, k + 1)
    precision_at_i = np.cumsum(top, axis=1) / ranks
    total = (precision_at_i * top).sum(axis=1)
    denom = np.minimum(n_relevant, k).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, total / np.where(denom > 0, denom, 1), np.nan)


def relevance(
    results: Sequence[Sequence[Hashable]], truth: Sequence[Hashable], width: int
) -> np.ndarray:
    """bool (nq, width): results[q][i] == truth[q], padded with False past each result list."""
    rel = np.zeros((len(results), width), dtype=bool)
    for q, (row, want) in enumerate(zip(results, truth, strict=True)):
        for i, label in enumerate(row[:width]):
            rel[q, i] = label is not None and label == want
    return rel


def summarize(rel: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int]) -> dict:
    """{"queries", "no_relevant", "recall@k", "precision@k", "map@k" for each k}, means over the
    queries with R > 0 (`queries` counts those); the metric values are None when there are none."""
    n_relevant = _check(rel, n_relevant)
    scored = n_relevant > 0
    out: dict = {"queries": int(scored.sum()), "no_relevant": int((~scored).sum())}
    r, nr = np.asarray(rel, dtype=bool)[scored], n_relevant[scored]
    for k in ks:
        if not len(r):
            out[f"recall@{k}"] = out[f"precision@{k}"] = out[f"map@{k}"] = None
            continue
        out[f"recall@{k}"] = float(hit_at_k(r, k).mean())
        out[f"precision@{k}"] = float(precision_at_k(r, k).mean())
        out[f"map@{k}"] = float(average_precision_at_k(r, nr, k).mean())
    return out
