"""FAISS index choice, training, shard filling, search parameters, files and recall checks."""

from __future__ import annotations

import math
import os

import faiss
import numpy as np

from visual_search import devices, storage

METRIC_TYPES = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
ID_BYTES = 8
# Below this many vectors exact search is fast enough and needs no training.
FLAT_MAX = 50_000
REFINE_K_FACTOR = 4
# Our parameter names -> faiss.ParameterSpace names.
PARAM_NAMES = {"k_factor": "k_factor_rf"}


def nlist_for(n: int) -> int:
    """IVF list count: a power of two near 4 * sqrt(n), with >= 39 training points per list."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** round(math.log2(target))
    while nlist > 16 and nlist * 39 > n:
        nlist //= 2
    return max(16, nlist)


CODE_BITS = {"Flat": 32, "SQ8": 8, "SQ6": 6, "SQ4": 4}


def _codec_bytes(codec: str, d: int) -> int:
    if codec in CODE_BITS:
        return math.ceil(CODE_BITS[codec] * d / 8)
    if codec == "RFlat":
        return 4 * d
    if codec.startswith("Refine(") and codec.endswith(")"):
        return _codec_bytes(codec[len("Refine(") : -1], d)
    if codec.startswith("PQ"):
        m, _, bits = codec[2:].partition("x")
        return math.ceil(int(m) * int(bits.removesuffix("fs") or 8) / 8)
    raise ValueError(f"cannot size codec {codec!r}")


def bytes_per_vector(factory: str, d: int) -> float:
    """Approximate stored bytes per vector (codes, refine codes, ids) of choose_factory's types."""
    parts = factory.split(",")
    total = ID_BYTES * (2 if parts[0] == "IDMap" else 1)
    codecs = [p for p in parts if not p.startswith(("IDMap", "IVF", "OPQ", "PCA"))]
    if not codecs:
        raise ValueError(f"cannot size factory {factory!r}")
    return total + sum(_codec_bytes(c, d) for c in codecs)


def choose_factory(n: int, d: int, memory_budget: int) -> str:
    """A FAISS factory string for n vectors of dimension d within memory_budget bytes.

    Small catalogs get exact search. Larger ones get IVF with 4-bit fast-scan PQ codes (one
    sub-quantizer per 4 dimensions) to shortlist candidates, re-ranked with the richest refine
    codes that fit the budget (full floats, SQ8, SQ6); IVF lists get an HNSW coarse quantizer from
    16,384 lists. Catalogs that fit none of these get OPQ + IVF + PQ.
    """
    if n <= 0 or d <= 0:
        raise ValueError(f"need n > 0 and d > 0, got n={n}, d={d}")
    if n <= FLAT_MAX and n * (4 * d + ID_BYTES) <= memory_budget:
        return "Flat"
    nlist = nlist_for(n)
    quantizer = f"IVF{nlist}_HNSW32" if nlist >= 16384 else f"IVF{nlist}"
    candidates = []
    if d % 4 == 0:
        fast = f"IDMap,{quantizer},PQ{d // 4}x4fs"
        candidates += [f"{fast},RFlat", f"{fast},Refine(SQ8)", f"{fast},Refine(SQ6)"]
    candidates += [f"{quantizer},SQ8", f"{quantizer},SQ6"]
    for factory in candidates:
        if n * bytes_per_vector(factory, d) <= memory_budget:
            return factory
    # PQ: the largest m (bytes per vector) that fits and divides the OPQ output dimension.
    for m in (256, 192, 128, 96, 64, 48, 32, 24, 16, 8):
        d_out = 4 * m if 4 * m <= d else d
        if m <= d and d_out % m == 0 and n * (m + ID_BYTES) <= memory_budget:
            return f"OPQ{m}_{d_out},{quantizer},PQ{m}x8"
    raise ValueError(
        f"{n:,} vectors of dimension {d} do not fit in {memory_budget:,} bytes even as PQ8"
    )


def is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except (RuntimeError, TypeError):
        return False


def make_template(factory: str, d: int, metric: str) -> faiss.Index:
    """An untrained index; non-IVF types are wrapped in IDMap2 so they take global ids."""
    if metric not in METRIC_TYPES:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRIC_TYPES)}")
    try:
        index = faiss.index_factory(d, factory, METRIC_TYPES[metric])
    except RuntimeError as exc:
        raise ValueError(f"invalid FAISS factory {factory!r}: {exc}") from exc
    if not is_ivf(index) and not isinstance(index, faiss.IndexIDMap):
        index = faiss.IndexIDMap2(index)
    return index


def train(template: faiss.Index, vectors: np.ndarray, use_gpu: bool | None = None) -> faiss.Index:
    """Train the template in place; IVF clustering runs on all GPUs when there are any."""
    if template.is_trained:
        return template
    use_gpu = devices.faiss_gpus() > 0 if use_gpu is None else use_gpu
    if use_gpu and is_ivf(template):
        ivf = faiss.extract_index_ivf(template)
        flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat)
    template.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return template


def to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def from_bytes(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def param_grid(index: faiss.Index) -> list[dict]:
    """Search-parameter candidates, cheapest first (nprobe for IVF, efSearch for HNSW)."""
    if is_ivf(index):
        nlist = faiss.extract_index_ivf(index).nlist
        grid = [p for p in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)]
        out = [{"nprobe": p} for p in grid if p < nlist] + [{"nprobe": nlist}]
        if _refine(index) is not None:
            # Re-ranking 4k candidates is cheap next to scanning lists: fixed, not tuned.
            out = [{**p, "k_factor": REFINE_K_FACTOR} for p in out]
        return out
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        return [{"efSearch": e} for e in (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)]
    return [{}]


def _refine(index: faiss.Index) -> faiss.IndexRefine | None:
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index if isinstance(index, faiss.IndexRefine) else None


def rows_of(index: faiss.Index, lo: int, hi: int) -> tuple[faiss.Index, int]:
    """(the index inside an IDMap, lo) for an IDMap over the contiguous ids [lo, hi) in row
    order (checked), else (index, 0): ids minus the offset are the inner index's rows."""
    outer = faiss.downcast_index(index)
    if not isinstance(outer, faiss.IndexIDMap | faiss.IndexIDMap2):
        return index, 0
    if not np.array_equal(faiss.vector_to_array(outer.id_map), np.arange(lo, hi)):
        raise ValueError(f"ids are not the contiguous range [{lo}, {hi})")
    inner = faiss.downcast_index(outer.index)
    inner.referenced_objects = [index]  # the IDMap owns it: freeing the IDMap frees it
    return inner, lo


def reconstruct(index: faiss.Index, key: int) -> np.ndarray:
    """The stored vector of `key`: exact from a Refine stage's flat copy, else decoded from the
    codes (an IVF gets a direct map on first use). IDMap does not reconstruct: callers pass
    the index inside it with row numbers."""
    if _refine(index) is None and is_ivf(index):
        ivf = faiss.extract_index_ivf(index)
        if not ivf.direct_map.type:
            try:
                ivf.make_direct_map()
            except RuntimeError:  # an array map needs ids 0..n-1; a shard's start elsewhere
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index.reconstruct(int(key))


def apply_params(index: faiss.Index, params: dict) -> None:
    """Set search parameters on the index object itself (defaults for plain .search calls)."""
    ps = faiss.ParameterSpace()
    for name, value in params.items():
        ps.set_index_parameter(index, PARAM_NAMES.get(name, name), value)


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    params: dict,
    selector: faiss.IDSelector | None = None,
    exhaustive: bool = False,
):
    """(scores (nq, k) float32, ids (nq, k) int64) with per-call parameters (thread-safe).

    `exhaustive` probes every IVF list (used when a filtered search came back short). A selector
    must name the ids the given index stores (for an IDMap-wrapped index, search its inner index
    with row numbers: IDMap does not translate selectors through a Refine stage).
    """
    keep: list = []  # SWIG params hold raw pointers: keep their Python owners alive

    def build(idx: faiss.Index) -> faiss.SearchParameters:
        idx = faiss.downcast_index(idx)
        if isinstance(idx, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexPreTransform):
            return build(idx.index)
        if isinstance(idx, faiss.IndexRefine):
            p = faiss.IndexRefineSearchParameters()
            p.k_factor = float(params.get("k_factor", idx.k_factor))
            p.base_index_params = build(idx.base_index)
        elif is_ivf(idx):
            p = faiss.SearchParametersIVF()
            ivf = faiss.extract_index_ivf(idx)
            p.nprobe = ivf.nlist if exhaustive else int(params.get("nprobe", ivf.nprobe))
            if selector is not None:
                p.sel = selector
        elif isinstance(idx, faiss.IndexHNSW):
            p = faiss.SearchParametersHNSW()
            p.efSearch = max(int(params.get("efSearch", idx.hnsw.efSearch)), 1024 * exhaustive)
            if selector is not None:
                p.sel = selector
        else:
            p = faiss.SearchParameters()
            if selector is not None:
                p.sel = selector
        keep.append(p)
        return p

    x = np.ascontiguousarray(queries, dtype=np.float32)
    return index.search(x, k, params=build(index))


def exact_topk(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, metric: str):
    """Brute-force top-k of queries against (vectors, ids): the reference for recall."""
    scores, pos = faiss.knn(
        np.ascontiguousarray(queries, np.float32),
        np.ascontiguousarray(vectors, np.float32),
        k,
        metric=METRIC_TYPES[metric],
    )
    return scores, np.where(pos >= 0, np.asarray(ids, np.int64)[np.clip(pos, 0, None)], -1)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int, exclude=None) -> float:
    """Mean |found_k ∩ truth_k| / k over queries; `exclude` (one id per query, e.g. the query's
    own id when queries come from the database) is dropped from both lists first."""
    total = 0.0
    for q in range(len(found)):
        skip = None if exclude is None else exclude[q]
        f = [i for i in found[q] if i >= 0 and i != skip][:k]
        t = [i for i in truth[q] if i >= 0 and i != skip][:k]
        total += len(set(f) & set(t)) / max(len(t), 1)
    return total / max(len(found), 1)


def write_index(index: faiss.Index, uri: str) -> tuple[str, int]:
    """Write as a CPU index file, atomically; returns (sha256, bytes)."""
    with storage.staged_file(uri) as path:
        faiss.write_index(index, path)
        digest, size = storage.sha256_file(path), os.path.getsize(path)
    return digest, size


def read_index(uri: str, sha256: str | None = None, mmap: bool = True) -> faiss.Index:
    """Open an index file (a local copy for remote URIs), checking its sha256 when given."""
    path = storage.local_copy(uri)
    if sha256 is not None:
        actual = storage.sha256_file(path)
        if actual != sha256:
            raise ValueError(f"{uri}: sha256 {actual} does not match the manifest's {sha256}")
    if not mmap:
        return faiss.read_index(path)
    # MMAP maps IVF lists, MMAP_IFC the codes of flat-code indexes (a Refine stage's raw
    # vectors, fast-scan PQ codes): a shard's vectors stay in the page cache, not the heap.
    # faiss refuses both at once for plain IVF lists, and either for some types.
    ro = faiss.IO_FLAG_READ_ONLY
    for flags in (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC | ro, faiss.IO_FLAG_MMAP | ro):
        try:
            return faiss.read_index(path, flags)
        except RuntimeError:
            continue
    return faiss.read_index(path)  # a type that cannot be memory-mapped
