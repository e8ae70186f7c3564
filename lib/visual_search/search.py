"""Merging per-shard top-k results into the global top-k."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("ip", "l2")


def worst_score(metric: str) -> float:
    """The score FAISS-style padding (id -1) must sort behind."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return -np.inf if metric == "ip" else np.inf


def merge_topk(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard (scores (nq, k_i), int64 ids (nq, k_i)) -> the best k per query over all shards.

    "ip": higher scores first; "l2": lower distances first. Ties go to the smaller id, and
    missing results (id -1) come last, padded with id -1 and the worst score when fewer than k.
    """
    worst = worst_score(metric)
    if not parts:
        raise ValueError("merge_topk needs at least one part")
    nq = parts[0][0].shape[0]
    if nq == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    scores = np.concatenate([np.asarray(d, np.float32).reshape(nq, -1) for d, _ in parts], axis=1)
    ids = np.concatenate([np.asarray(i, np.int64).reshape(nq, -1) for _, i in parts], axis=1)
    scores = np.where(ids < 0, worst, scores)
    primary = -scores if metric == "ip" else scores
    # lexsort: the last key is primary; padding (-1) sorts after every real id on equal scores.
    tie = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((tie, primary), axis=-1)[:, :k]
    out_d = np.take_along_axis(scores, order, axis=1)
    out_i = np.take_along_axis(ids, order, axis=1)
    if out_i.shape[1] < k:
        pad = k - out_i.shape[1]
        out_d = np.pad(out_d, ((0, 0), (0, pad)), constant_values=worst)
        out_i = np.pad(out_i, ((0, 0), (0, pad)), constant_values=-1)
    return out_d, out_i
