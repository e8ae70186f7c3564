"""merge_topk against a reference: N shards + merge == one unsharded index, per metric."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from faiss.contrib.datasets import SyntheticDataset
from faiss.contrib.evaluation import check_ref_knn_with_draws

from visual_search.search import merge_topk, worst_score

D, NT, NB, NQ, K = 32, 2000, 1000, 32, 10
METRIC_TYPES = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# Shard sizes summing to NB: one shard, equal halves, a shard smaller than K, an empty shard.
SPLITS = [(1000,), (500, 500), (3, 600, 397), (100, 0, 250, 400, 250), (999, 1)]


@pytest.fixture(scope="module")
def ds():
    return SyntheticDataset(D, NT, NB, NQ, seed=1234)


def shard_bounds(sizes, n):
    edges = np.concatenate([[0], np.cumsum(sizes)])
    assert edges[-1] == n
    return list(zip(edges[:-1], edges[1:], strict=True))


def search_shards(make_shard, xb, xq, sizes, k):
    """Fill one index per shard with global ids, search each for k, return the parts."""
    parts = []
    for lo, hi in shard_bounds(sizes, len(xb)):
        index = make_shard()
        if hi > lo:
            index.add_with_ids(xb[lo:hi], np.arange(lo, hi, dtype=np.int64))
        parts.append(index.search(xq, k))
    return parts


def check_equal(ref, merged):
    (d_ref, i_ref), (d_new, i_new) = ref, merged
    assert d_new.shape == i_new.shape == d_ref.shape
    assert d_new.dtype == np.float32 and i_new.dtype == np.int64
    assert (i_new >= 0).all()
    # Same scores; ids equal up to ties (the last tied group may be cut at k differently).
    check_ref_knn_with_draws(d_ref, i_ref, d_new, i_new, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("sizes", SPLITS, ids=lambda s: "-".join(map(str, s)))
def test_sharded_flat_equals_one_flat(ds, metric, sizes):
    xb, xq = ds.get_database(), ds.get_queries()
    ref = faiss.IndexFlat(D, METRIC_TYPES[metric])
    ref.add(xb)
    parts = search_shards(
        lambda: faiss.IndexIDMap2(faiss.IndexFlat(D, METRIC_TYPES[metric])), xb, xq, sizes, K
    )
    assert len(parts) == len(sizes)
    check_equal(ref.search(xq, K), merge_topk(parts, K, metric))


@pytest.fixture(scope="module")
def ivf_templates(ds):
    """One trained IVF template per metric, serialized: every shard is a copy of it."""
    out = {}
    for metric, mt in METRIC_TYPES.items():
        template = faiss.index_factory(D, "IVF32,Flat", mt)
        template.train(ds.get_train())
        out[metric] = faiss.serialize_index(template)
    return out


@pytest.mark.parametrize("nprobe", [1, 4])
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("sizes", SPLITS, ids=lambda s: "-".join(map(str, s)))
def test_sharded_ivf_equals_one_ivf(ds, ivf_templates, metric, sizes, nprobe):
    xb, xq = ds.get_database(), ds.get_queries()

    def copy():
        index = faiss.deserialize_index(ivf_templates[metric])
        assert index.is_trained and index.ntotal == 0
        index.nprobe = nprobe
        return index

    ref = copy()
    ref.add_with_ids(xb, np.arange(NB, dtype=np.int64))
    d_ref, i_ref = ref.search(xq, K)
    merged = merge_topk(search_shards(copy, xb, xq, sizes, K), K, metric)
    if nprobe == 1:
        # A query's single list may hold fewer than K vectors: padding must match too.
        np.testing.assert_array_equal(merged[1] < 0, i_ref < 0)
        valid = i_ref >= 0
        np.testing.assert_allclose(merged[0][valid], d_ref[valid], rtol=1e-5, atol=1e-5)
        full = valid.all(axis=1)
        check_equal((d_ref[full], i_ref[full]), (merged[0][full], merged[1][full]))
    else:
        check_equal((d_ref, i_ref), merged)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_duplicates_across_shards_tie_to_smaller_id(ds, metric):
    """Every vector stored twice (ids j and j + NB, in different shards): exact ties."""
    xb, xq = ds.get_database()[:200], ds.get_queries()[:8]
    parts = []
    for offset in (0, NB):
        index = faiss.IndexIDMap2(faiss.IndexFlat(D, METRIC_TYPES[metric]))
        index.add_with_ids(xb, np.arange(len(xb), dtype=np.int64) + offset)
        parts.append(index.search(xq, K))
    d, i = merge_topk(parts, K, metric)
    ref = faiss.IndexFlat(D, METRIC_TYPES[metric])
    ref.add(xb)
    d_ref, i_ref = ref.search(xq, K // 2)
    np.testing.assert_array_equal(d[:, 0::2], d_ref)
    np.testing.assert_array_equal(d[:, 1::2], d_ref)
    np.testing.assert_array_equal(i[:, 0::2], i_ref)
    np.testing.assert_array_equal(i[:, 1::2], i_ref + NB)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_k_beyond_total_pads_like_faiss(ds, metric):
    xb, xq = ds.get_database()[:7], ds.get_queries()
    ref = faiss.IndexFlat(D, METRIC_TYPES[metric])
    ref.add(xb)
    _, i_ref = ref.search(xq, 12)
    parts = search_shards(
        lambda: faiss.IndexIDMap2(faiss.IndexFlat(D, METRIC_TYPES[metric])), xb, xq, (3, 4, 0), 12
    )
    d, i = merge_topk(parts, 12, metric)
    np.testing.assert_array_equal(i, i_ref)
    assert (i[:, 7:] == -1).all()
    assert (d[:, 7:] == worst_score(metric)).all()


def part(scores, ids):
    return np.array(scores, np.float32), np.array(ids, np.int64)


INF = np.inf
# (parts, k, metric, expected scores, expected ids); one query row unless shown otherwise.
CASES = {
    "single part, ip": (
        [part([[0.9, 0.5, 0.1]], [[4, 2, 8]])], 3, "ip", [[0.9, 0.5, 0.1]], [[4, 2, 8]],
    ),
    "single part cut to k, l2": (
        [part([[0.1, 0.5, 0.9]], [[4, 2, 8]])], 2, "l2", [[0.1, 0.5]], [[4, 2]],
    ),
    "single part, unsorted input": (
        [part([[0.1, 0.9, 0.5]], [[1, 2, 3]])], 3, "ip", [[0.9, 0.5, 0.1]], [[2, 3, 1]],
    ),
    "interleave, ip": (
        [part([[0.9, 0.4]], [[1, 2]]), part([[0.8, 0.7]], [[3, 4]])],
        3, "ip", [[0.9, 0.8, 0.7]], [[1, 3, 4]],
    ),
    "interleave, l2": (
        [part([[0.9, 0.4]], [[1, 2]]), part([[0.8, 0.7]], [[3, 4]])],
        3, "l2", [[0.4, 0.7, 0.8]], [[2, 4, 3]],
    ),
    "short shard padded, ip": (
        [part([[0.9, 0.5]], [[3, -1]]), part([[0.7]], [[8]])],
        4, "ip", [[0.9, 0.7, -INF, -INF]], [[3, 8, -1, -1]],
    ),
    "short shard padded, l2": (
        [part([[0.2, 3.4e38]], [[3, -1]]), part([[0.1]], [[8]])],
        3, "l2", [[0.1, 0.2, INF]], [[8, 3, -1]],
    ),
    "k beyond all results": (
        [part([[0.5, 0.4]], [[1, 2]]), part([[0.6, 0.3]], [[3, 4]])],
        6, "ip", [[0.6, 0.5, 0.4, 0.3, -INF, -INF]], [[3, 1, 2, 4, -1, -1]],
    ),
    "padding with a good score still last, ip": (
        [part([[1e9, 0.5]], [[-1, 5]])], 2, "ip", [[0.5, -INF]], [[5, -1]],
    ),
    "padding with a good score still last, l2": (
        [part([[-1.0, 0.5]], [[-1, 5]])], 2, "l2", [[0.5, INF]], [[5, -1]],
    ),
    "all padding": ([part([[0.0, 0.0]], [[-1, -1]])], 3, "l2", [[INF, INF, INF]], [[-1, -1, -1]]),
    "ties to smaller id, ip": (
        [part([[0.5, 0.1]], [[7, 2]]), part([[0.5, 0.3]], [[4, 9]])],
        3, "ip", [[0.5, 0.5, 0.3]], [[4, 7, 9]],
    ),
    "ties to smaller id, l2": (
        [part([[1.0, 2.0]], [[7, 2]]), part([[1.0, 2.0]], [[4, 1]])],
        4, "l2", [[1.0, 1.0, 2.0, 2.0]], [[4, 7, 1, 2]],
    ),
    "tie cut at k keeps the smaller id": (
        [part([[0.9, 0.5]], [[1, 30]]), part([[0.5]], [[20]]), part([[0.5]], [[10]])],
        2, "ip", [[0.9, 0.5]], [[1, 10]],
    ),
    "rows are independent": (
        [part([[0.9, 0.1], [0.2, 0.1]], [[1, 2], [1, 2]]), part([[0.5], [0.8]], [[3], [3]])],
        2, "ip", [[0.9, 0.5], [0.8, 0.2]], [[1, 3], [3, 1]],
    ),
    "empty shard (k_i = 0)": (
        [part(np.zeros((1, 0)), np.zeros((1, 0))), part([[0.3]], [[6]])],
        2, "l2", [[0.3, INF]], [[6, -1]],
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    "parts, k, metric, scores, ids", list(CASES.values()), ids=list(CASES.keys())
)
def test_merge_topk_table(parts, k, metric, scores, ids):
    d, i = merge_topk(parts, k, metric)
    assert d.dtype == np.float32 and i.dtype == np.int64
    assert d.shape == i.shape == (len(ids), k)
    np.testing.assert_array_equal(i, np.array(ids, np.int64))
    np.testing.assert_array_equal(d, np.array(scores, np.float32))


def test_merge_topk_accepts_faiss_padding_as_is():
    # An empty FAISS index pads with id -1 and +-FLT_MAX; those must lose to every real result.
    for metric in ("ip", "l2"):
        empty = faiss.IndexIDMap2(faiss.IndexFlat(4, METRIC_TYPES[metric]))
        full = faiss.IndexIDMap2(faiss.IndexFlat(4, METRIC_TYPES[metric]))
        full.add_with_ids(np.eye(4, dtype=np.float32), np.array([10, 11, 12, 13]))
        q = np.eye(4, dtype=np.float32)[:1]
        d, i = merge_topk([empty.search(q, 5), full.search(q, 5)], 5, metric)
        assert i[0, 0] == 10 and sorted(i[0, :4]) == [10, 11, 12, 13] and i[0, 4] == -1


@pytest.mark.parametrize("metric", ["cosine", "IP", "", None])
def test_unknown_metric_raises(metric):
    with pytest.raises(ValueError, match="unknown metric"):
        merge_topk([part([[0.5]], [[1]])], 1, metric)
    with pytest.raises(ValueError):
        worst_score(metric)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_no_parts_raises(metric):
    with pytest.raises(ValueError, match="at least one part"):
        merge_topk([], 3, metric)


def test_worst_score():
    assert worst_score("ip") == -np.inf
    assert worst_score("l2") == np.inf
