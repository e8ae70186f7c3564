"""visual_search.index: the index-choice heuristic as tables, the rest against FAISS itself."""

from __future__ import annotations

import hashlib
import os
import re

import faiss
import numpy as np
import pytest
from faiss.contrib.datasets import SyntheticDataset
from faiss.contrib.evaluation import check_ref_knn_with_draws

from visual_search import index as vi
from visual_search import storage

METRIC_TYPES = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
D = 32
GB = 10**9

# ---------------------------------------------------------------------------- choose_factory

CHOOSE = [
    # small catalogs: exact search
    (10_000, 128, GB, "Flat"),
    (50_000, 128, GB, "Flat"),
    (1, 768, GB, "Flat"),
    # room for full vectors: IVF + fast-scan PQ shortlist, re-ranked on the floats
    (50_001, 128, GB, "IDMap,IVF1024,PQ32x4fs,RFlat"),
    (1_000_000, 128, GB, "IDMap,IVF4096,PQ32x4fs,RFlat"),
    # the budget forces compressed re-ranking: SQ8 (16 + d + 16 bytes), then SQ6 (16 + 3d/4 + 16)
    (10_000, 128, 2_000_000, "IDMap,IVF256,PQ32x4fs,Refine(SQ8)"),
    (1_000_000, 128, 200_000_000, "IDMap,IVF4096,PQ32x4fs,Refine(SQ8)"),
    (1_000_000, 128, 160_000_000, "IDMap,IVF4096,PQ32x4fs,Refine(SQ8)"),
    (1_000_000, 128, 159_999_999, "IDMap,IVF4096,PQ32x4fs,Refine(SQ6)"),
    (1_000_000, 128, 130_000_000, "IDMap,IVF4096,PQ32x4fs,Refine(SQ6)"),
    (1_000_000, 256, 280_000_000, "IDMap,IVF4096,PQ64x4fs,Refine(SQ6)"),
    # no room for a refine stage: plain IVF-SQ6
    (1_000_000, 128, 110_000_000, "IVF4096,SQ6"),
    # even SQ6 does not fit: OPQ + PQ with the largest m that fits
    (1_000_000, 128, 100_000_000, "OPQ64_128,IVF4096,PQ64x8"),
    (1_000_000, 768, 100_000_000, "OPQ64_256,IVF4096,PQ64x8"),
    # huge catalogs: HNSW coarse quantizer
    (20_000_000, 128, 3 * GB, "IDMap,IVF16384_HNSW32,PQ32x4fs,Refine(SQ6)"),
    (20_000_000, 128, 1 * GB, "OPQ32_128,IVF16384_HNSW32,PQ32x8"),
    (100_000_000, 768, 64 * GB, "IVF32768_HNSW32,SQ6"),
    (1_000_000_000, 768, 64 * GB, "OPQ48_192,IVF131072_HNSW32,PQ48x8"),
]


@pytest.mark.parametrize("n, d, budget, expected", CHOOSE)
def test_choose_factory_table(n, d, budget, expected):
    factory = vi.choose_factory(n, d, budget)
    assert factory == expected
    index = faiss.index_factory(d, factory)
    assert index.d == d
    assert n * vi.bytes_per_vector(factory, d) <= budget
    m = re.search(r"IVF(\d+)(_HNSW32)?", factory)
    if m:
        assert (int(m.group(1)) >= 16384) == bool(m.group(2))


@pytest.mark.parametrize(
    "n, d, budget",
    [
        (1_000_000, 128, 1_000_000),  # far below even PQ8
        (1_000_000, 128, 15_999_999),  # one byte short of PQ8 (8 code + 8 id bytes)
        (100_000, 4, 1_000_000),  # SQ6 needs 11 bytes and d < 8 rules out PQ8
        (0, 128, GB),
        (-5, 128, GB),
        (1000, 0, GB),
    ],
)
def test_choose_factory_rejects(n, d, budget):
    with pytest.raises(ValueError):
        vi.choose_factory(n, d, budget)


@pytest.mark.parametrize("d", [8, 64, 100, 128, 200, 384, 512, 768, 1024])
def test_choose_factory_always_buildable_and_within_budget(d):
    """From 16 bytes per vector (PQ8 + id) up, it returns a factory that builds and fits."""
    bad = []
    for n in (10_000, 1_000_000, 20_000_000):
        for per_vector in (5000, 1000, 300, 200, 120, 100, 80, 60, 40, 30, 20, 16):
            budget = n * per_vector
            factory = vi.choose_factory(n, d, budget)
            assert n * vi.bytes_per_vector(factory, d) <= budget, factory
            try:
                faiss.index_factory(d, factory)
            except RuntimeError as exc:
                why = str(exc).split("Error: ")[-1].split(" failed")[0]
                bad.append(f"choose_factory({n}, {d}, {budget}) = {factory!r}: {why}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "n, d, budget",
    [
        (1_000_000, 512, 200_000_000),  # m = 192 fits the budget but does not divide 512
        (1_000_000, 128, 60_000_000),  # m = 48 fits the budget but does not divide 128
        (1_000_000, 100, 60_000_000),  # d = 100 is not a multiple of 48 or 32
    ],
)
def test_choose_factory_pq_m_divides_opq_output(n, d, budget):
    factory = vi.choose_factory(n, d, budget)
    m = re.fullmatch(r"OPQ(\d+)_(\d+),IVF\d+,PQ(\d+)x8", factory)
    assert m, factory
    m_opq, d_out, m_pq = map(int, m.groups())
    assert m_opq == m_pq and d_out <= d and d_out % m_pq == 0, factory
    assert n * (m_pq + vi.ID_BYTES) <= budget
    faiss.index_factory(d, factory)


NLIST = [
    (1, 16),
    (1000, 16),
    (10_000, 256),
    (50_001, 1024),
    (1_000_000, 4096),
    (20_000_000, 16384),
    (10**9, 131072),
]


@pytest.mark.parametrize("n, expected", NLIST)
def test_nlist_for_table(n, expected):
    assert vi.nlist_for(n) == expected


def test_nlist_for_monotonic_power_of_two_and_39_points_per_list():
    ns = np.unique(np.logspace(0, 10, 3000).astype(np.int64))
    nlists = [vi.nlist_for(int(n)) for n in ns]
    assert all(a <= b for a, b in zip(nlists, nlists[1:], strict=False))
    for n, nlist in zip(ns, nlists, strict=True):
        assert nlist >= 16 and nlist & (nlist - 1) == 0
        assert nlist == 16 or nlist * 39 <= n, (n, nlist)
        assert nlist <= max(16, 8 * np.sqrt(n)), (n, nlist)


BYTES = [
    ("Flat", 128, 4 * 128 + 8),
    ("IVF1024,Flat", 128, 4 * 128 + 8),
    ("IVF1024,SQ8", 128, 128 + 8),
    ("IVF16384_HNSW32,SQ8", 768, 768 + 8),
    ("IVF1024,SQ6", 128, 96 + 8),
    ("IVF1024,SQ6", 10, 8 + 8),  # 60 bits round up to 8 bytes
    ("OPQ64_256,IVF4096,PQ64x8", 768, 64 + 8),
    ("IVF256,PQ32", 128, 32 + 8),
    ("IVF256,PQ16x4", 64, 8 + 8),
    ("IVF256,PQ32x4fs", 128, 16 + 8),
]


@pytest.mark.parametrize("factory, d, expected", BYTES)
def test_bytes_per_vector(factory, d, expected):
    assert vi.bytes_per_vector(factory, d) == expected
    # Reference: FAISS's own per-vector code size plus the 8-byte id.
    index = faiss.index_factory(d, factory)
    code = faiss.extract_index_ivf(index).code_size if vi.is_ivf(index) else index.code_size
    assert code + vi.ID_BYTES == expected


@pytest.mark.parametrize("factory", ["HNSW32", "IVF256,RQ4x8", ""])
def test_bytes_per_vector_unknown_codec(factory):
    with pytest.raises(ValueError, match="cannot size"):
        vi.bytes_per_vector(factory, 64)


# ----------------------------------------------------------------------------- templates


@pytest.fixture(scope="module")
def ds():
    return SyntheticDataset(D, 2000, 1000, 20, seed=4321)


@pytest.fixture(scope="module")
def ivf_bytes(ds):
    """One trained IVF16,Flat template per metric, serialized: each test gets a fresh copy."""
    return {
        metric: vi.to_bytes(
            vi.train(vi.make_template("IVF16,Flat", D, metric), ds.get_train(), False)
        )
        for metric in METRIC_TYPES
    }


def filled_ivf(ivf_bytes, ds, metric="l2"):
    index = vi.from_bytes(ivf_bytes[metric])
    index.add_with_ids(ds.get_database(), np.arange(ds.nb, dtype=np.int64) + 10_000)
    return index


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_make_template_flat_wraps_idmap2_and_takes_global_ids(ds, metric):
    index = vi.make_template("Flat", D, metric)
    assert isinstance(index, faiss.IndexIDMap2)
    assert index.metric_type == METRIC_TYPES[metric]
    assert index.is_trained and index.ntotal == 0
    ids = np.arange(ds.nb, dtype=np.int64) * 7 + 123
    index.add_with_ids(ds.get_database(), ids)
    _, found = index.search(ds.get_database()[:5], 1)
    if metric == "l2":
        np.testing.assert_array_equal(found[:, 0], ids[:5])
    assert set(found.ravel()) <= set(ids)


def test_make_template_ivf_takes_ids_directly(ds):
    index = vi.make_template("IVF16,Flat", D, "ip")
    assert not isinstance(index, faiss.IndexIDMap)
    assert isinstance(index, faiss.IndexIVF)
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert not index.is_trained
    assert vi.train(index, ds.get_train(), use_gpu=False) is index
    assert index.is_trained
    ids = np.arange(ds.nb, dtype=np.int64) + 5_000_000_000
    index.add_with_ids(ds.get_database(), ids)
    assert index.ntotal == ds.nb
    _, found = index.search(ds.get_queries(), 3)
    assert set(found.ravel()) <= set(ids)


@pytest.mark.parametrize(
    "factory, wrapped",
    [
        ("HNSW32", True),
        ("IDMap2,Flat", True),  # already takes ids: not wrapped twice
        ("IVF16,SQ8", False),
        ("OPQ8_32,IVF64_HNSW32,PQ8x8", False),
    ],
)
def test_make_template_wrapping(factory, wrapped):
    index = vi.make_template(factory, D, "l2")
    assert isinstance(index, faiss.IndexIDMap2) == wrapped
    if factory.startswith("IDMap2"):
        assert not isinstance(faiss.downcast_index(index.index), faiss.IndexIDMap)


@pytest.mark.parametrize("factory", ["IVF,Bogus", "NotAnIndex", "IVF16,PQ5"])
def test_make_template_invalid_factory(factory):
    with pytest.raises(ValueError, match=re.escape(repr(factory))):
        vi.make_template(factory, D, "l2")


@pytest.mark.parametrize("metric", ["cosine", "L2", ""])
def test_make_template_unknown_metric(metric):
    with pytest.raises(ValueError, match="unknown metric"):
        vi.make_template("Flat", D, metric)


def test_train_on_cpu(ds):
    template = vi.make_template("IVF16,Flat", D, "l2")
    assert vi.train(template, ds.get_train().astype(np.float64), use_gpu=False) is template
    assert template.is_trained
    centroids = faiss.extract_index_ivf(template).quantizer.reconstruct_n(0, 16)
    # Trained templates are left alone.
    assert vi.train(template, ds.get_train()[:100] * 5, use_gpu=False) is template
    np.testing.assert_array_equal(
        faiss.extract_index_ivf(template).quantizer.reconstruct_n(0, 16), centroids
    )
    # use_gpu=None picks the CPU on a machine without FAISS GPUs.
    other = vi.make_template("IVF16,Flat", D, "l2")
    if vi.devices.faiss_gpus() == 0:
        assert vi.train(other, ds.get_train()).is_trained


def test_train_flat_is_a_no_op(ds):
    index = vi.make_template("Flat", D, "ip")
    assert vi.train(index, ds.get_train(), use_gpu=False) is index
    assert index.ntotal == 0


# ------------------------------------------------------------------------ search parameters


@pytest.mark.parametrize("factory, nlist", [("IVF16,Flat", 16), ("IVF12,Flat", 12),
                                            ("IVF1024,SQ8", 1024), ("IVF4096,Flat", 4096),
                                            ("OPQ8_32,IVF64_HNSW32,PQ8x8", 64)])  # fmt: skip
def test_param_grid_ivf(factory, nlist):
    grid = vi.param_grid(vi.make_template(factory, D, "l2"))
    assert all(list(p) == ["nprobe"] for p in grid)
    probes = [p["nprobe"] for p in grid]
    assert probes[0] == 1 and probes[-1] == nlist
    assert all(a < b for a, b in zip(probes, probes[1:], strict=False))


def test_param_grid_hnsw_and_flat():
    grid = vi.param_grid(vi.make_template("HNSW32", D, "l2"))
    assert grid and all(list(p) == ["efSearch"] for p in grid)
    ef = [p["efSearch"] for p in grid]
    assert all(a < b for a, b in zip(ef, ef[1:], strict=False))
    assert vi.param_grid(faiss.IndexHNSWFlat(D, 32)) == grid
    assert vi.param_grid(vi.make_template("Flat", D, "l2")) == [{}]
    assert vi.param_grid(faiss.IndexFlatL2(D)) == [{}]


@pytest.mark.parametrize("factory", ["IVF16,Flat", "OPQ8_32,IVF64_HNSW32,PQ8x8"])
def test_apply_params_sets_nprobe(factory):
    index = vi.make_template(factory, D, "l2")
    for nprobe in (7, 1, 16):
        vi.apply_params(index, {"nprobe": nprobe})
        assert faiss.extract_index_ivf(index).nprobe == nprobe


def test_apply_params_sets_ef_search_through_idmap2():
    index = vi.make_template("HNSW32", D, "l2")
    vi.apply_params(index, {"efSearch": 77})
    assert faiss.downcast_index(index.index).hnsw.efSearch == 77
    vi.apply_params(index, {})


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_search_full_probe_equals_exact(ivf_bytes, ds, metric):
    index = filled_ivf(ivf_bytes, ds, metric)
    ids = np.arange(ds.nb, dtype=np.int64) + 10_000
    ref = vi.exact_topk(ds.get_database(), ids, ds.get_queries(), 10, metric)
    before = index.nprobe
    d, i = vi.search(index, ds.get_queries().astype(np.float64), 10, {"nprobe": 16})
    check_ref_knn_with_draws(*ref, d, i, rtol=1e-5, atol=1e-5)
    _, i1 = vi.search(index, ds.get_queries(), 10, {"nprobe": 1})
    assert vi.recall_at_k(i1, ref[1], 10) < 1.0
    # Parameters are per call (thread-safe): the shared index object is left as it was.
    assert index.nprobe == before


# --------------------------------------------------------------------------------- recall

RECALL = {
    "perfect": ([[1, 2, 3]], [[1, 2, 3]], 3, None, 1.0),
    "order does not matter": ([[3, 1, 2]], [[1, 2, 3]], 3, None, 1.0),
    "partial": ([[1, 2, 4]], [[1, 2, 3]], 3, None, 2 / 3),
    "nothing": ([[7, 8, 9]], [[1, 2, 3]], 3, None, 0.0),
    "mean over queries": ([[1, 2], [5, 6]], [[1, 2], [5, 7]], 2, None, 0.75),
    "only the first k count": ([[1, 9, 2]], [[1, 2, 3]], 2, None, 0.5),
    "exclude drops self from both": ([[5, 1, 2]], [[5, 1, 3]], 2, [5], 0.5),
    "exclude, self not found": ([[1, 2, 3]], [[7, 1, 2]], 2, [7], 1.0),
    "exclude per query": ([[4, 1], [2, 8]], [[4, 1], [8, 3]], 1, [4, 8], 0.5),
    "missing found ids (-1)": ([[1, -1, -1]], [[1, 2, 3]], 3, None, 1 / 3),
    "fewer true neighbours than k": ([[1, 2, 3]], [[1, -1, -1]], 3, None, 1.0),
    "-1 never matches -1": ([[1, -1]], [[2, -1]], 2, None, 0.0),
}


@pytest.mark.parametrize(
    "found, truth, k, exclude, expected", list(RECALL.values()), ids=list(RECALL.keys())
)
def test_recall_at_k(found, truth, k, exclude, expected):
    found, truth = np.array(found, np.int64), np.array(truth, np.int64)
    ex = None if exclude is None else np.array(exclude, np.int64)
    assert vi.recall_at_k(found, truth, k, exclude=ex) == pytest.approx(expected)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_topk_equals_flat_index(ds, metric):
    rng = np.random.default_rng(0)
    ids = rng.permutation(ds.nb).astype(np.int64) * 3 + 1
    ref = faiss.IndexIDMap2(faiss.IndexFlat(D, METRIC_TYPES[metric]))
    ref.add_with_ids(ds.get_database(), ids)
    d_ref, i_ref = ref.search(ds.get_queries(), 10)
    d, i = vi.exact_topk(ds.get_database(), ids, ds.get_queries(), 10, metric)
    assert i.dtype == np.int64 and d.shape == i.shape == (ds.nq, 10)
    check_ref_knn_with_draws(d_ref, i_ref, d, i, rtol=1e-5, atol=1e-5)


def test_exact_topk_k_beyond_n_pads_with_minus_one(ds):
    ids = np.array([40, 41, 42], np.int64)
    _, i = vi.exact_topk(ds.get_database()[:3], ids, ds.get_queries(), 5, "l2")
    assert (np.sort(i[:, :3], axis=1) == ids).all()
    assert (i[:, 3:] == -1).all()


# --------------------------------------------------------------------------------- files


def test_write_read_roundtrip(tmp_path, ivf_bytes, ds):
    index = filled_ivf(ivf_bytes, ds)
    index.nprobe = 4
    uri = str(tmp_path / "shards" / "shard-0.faiss")
    digest, size = vi.write_index(index, uri)
    with open(uri, "rb") as f:
        data = f.read()
    assert digest == hashlib.sha256(data).hexdigest() == storage.sha256_file(uri)
    assert size == len(data) == os.path.getsize(uri)
    assert os.listdir(tmp_path / "shards") == ["shard-0.faiss"]  # no temp file left behind
    assert data == vi.to_bytes(index)

    expected = index.search(ds.get_queries(), 10)
    for mmap in (False, True):
        back = vi.read_index(uri, sha256=digest, mmap=mmap)
        assert back.ntotal == ds.nb
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(back).invlists)
        on_disk = isinstance(lists, faiss.OnDiskInvertedLists)
        assert on_disk == mmap
        got = vi.search(back, ds.get_queries(), 10, {"nprobe": 4})
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])


@pytest.mark.parametrize("mmap", [False, True])
def test_write_read_flat_roundtrip(tmp_path, ds, mmap):
    index = vi.make_template("Flat", D, "ip")
    index.add_with_ids(ds.get_database(), np.arange(ds.nb, dtype=np.int64) + 99)
    uri = str(tmp_path / "flat.faiss")
    digest, _ = vi.write_index(index, uri)
    back = vi.read_index(uri, sha256=digest, mmap=mmap)
    for a, b in zip(back.search(ds.get_queries(), 5), index.search(ds.get_queries(), 5),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_read_index_sha256_mismatch(tmp_path, ivf_bytes, ds):
    uri = str(tmp_path / "x.faiss")
    digest, _ = vi.write_index(filled_ivf(ivf_bytes, ds), uri)
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ValueError, match="sha256"):
        vi.read_index(uri, sha256=wrong)
    # A corrupted file fails the manifest's digest too.
    with open(uri, "r+b") as f:
        f.seek(os.path.getsize(uri) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match=digest):
        vi.read_index(uri, sha256=digest, mmap=False)


def test_to_from_bytes_roundtrip(ivf_bytes, ds):
    index = filled_ivf(ivf_bytes, ds, "ip")
    data = vi.to_bytes(index)
    assert isinstance(data, bytes)
    back = vi.from_bytes(data)
    assert vi.to_bytes(back) == data
    assert back.ntotal == index.ntotal and back.metric_type == faiss.METRIC_INNER_PRODUCT
    for nprobe in (1, 16):
        a = vi.search(index, ds.get_queries(), 10, {"nprobe": nprobe})
        b = vi.search(back, ds.get_queries(), 10, {"nprobe": nprobe})
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_mmap_keeps_a_refine_stages_raw_vectors_out_of_the_heap(tmp_path, ds):
    """IO_FLAG_MMAP_IFC: the RFlat stage's vectors are a view of the mapped file, not a copy."""
    index = vi.make_template("IDMap,IVF8,PQ8x4fs,RFlat", D, "ip")
    index.train(ds.get_train())
    index.add_with_ids(ds.get_database(), np.arange(ds.nb, dtype=np.int64))
    uri = str(tmp_path / "refine.faiss")
    digest, _ = vi.write_index(index, uri)
    expected = index.search(ds.get_queries(), 5)
    for mmap in (False, True):
        back = vi.read_index(uri, sha256=digest, mmap=mmap)
        refine = faiss.downcast_index(faiss.downcast_index(back).index)
        flat = faiss.downcast_index(refine.refine_index)
        assert flat.codes.size() == ds.nb * D * 4 and flat.codes.is_owned == (not mmap)
        got = back.search(ds.get_queries(), 5)
        np.testing.assert_array_equal(got[1], expected[1])
