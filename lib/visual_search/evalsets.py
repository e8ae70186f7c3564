"""Query sets for evaluating an index version (jobs/evaluate.py): a queries table embedded with
the version's own model (bad rows become counted errors, never fatal), or leave-one-out over the
catalog's own stored vectors."""

from __future__ import annotations

import bisect
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visual_search import catalog, embedders, embeddings, images, query, storage, verify
from visual_search.versions import Version

if TYPE_CHECKING:
    from visual_search.evaluation import Config

DEFAULT_LOO_LIMIT = 1000


class EvalError(ValueError):
    """The evaluation cannot run on this input; the message says why."""


@dataclass
class Queries:
    """The evaluated queries (rows that failed to decode are already dropped)."""

    vectors: np.ndarray  # float32 (n, d)
    product_id: list[str | None]  # instance ground truth (None: none)
    category: list[str | None]  # category ground truth (None: none)
    group: list[str | None]  # the category each query is reported under
    exclude: list[str | None]  # product excluded from the results (leave-one-out: its own)
    prefer: list[str | None]  # category whose products come first (None: nearest first)
    self_ids: np.ndarray | None  # leave-one-out: the query's own global id
    attempted: int
    errors: Counter
    error_examples: list[dict]
    decode_ms: list[float]
    embed_ms: list[float]
    features: list[verify.Features] | None  # local features of the query photos (to re-rank)
    features_ms: list[float]
    has_instance: bool
    has_category: bool


def _sample(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded sample of min(limit, n) rows (all when limit is 0)."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def strings(table: pa.Table, column: str) -> list[str | None]:
    return table[column].cast(pa.string()).to_pylist()


def _decode(uri: str, preprocess: images.Preprocess, limits: images.Limits, backdrop: bool):
    """(pixels, None, ms) or (None, (code, detail), ms); never raises for a bad image."""
    t0 = time.perf_counter()
    try:
        data = storage.read_bytes(uri, limits.max_bytes)
        pixels = images.load(data, preprocess, limits, backdrop)
        return pixels, None, (time.perf_counter() - t0) * 1000
    except storage.TooLarge as exc:
        return None, ("too_large", str(exc)), 0.0
    except storage.StorageError as exc:
        return None, ("read_error", str(exc)), 0.0
    except images.ImageError as exc:
        return None, (exc.code, exc.detail), 0.0


def _timed_features(pixels: np.ndarray) -> tuple[verify.Features, float]:
    t0 = time.perf_counter()
    return verify.local_features(pixels), (time.perf_counter() - t0) * 1000


def table_queries(cfg: Config, version: Version, docs: query.Docs, rerank: bool) -> Queries:
    table = catalog.read_catalog(cfg.queries).table
    has_category = "category" in table.column_names
    rows = _sample(table.num_rows, cfg.limit or 0, cfg.seed)
    table = table.take(pa.array(rows))
    uris = strings(table, "image_uri")
    pids = strings(table, "product_id")
    known = set(docs.table["product_id"].to_pylist())
    has_instance = any(p in known for p in pids)
    cats = strings(table, "category") if has_category else [None] * len(pids)
    # Instance-only queries are reported under the category of their product in the index.
    groups = cats if has_category else [_product_category(docs).get(p) for p in pids]

    embedder = embedders.from_model_dict(version.manifest.model, cfg.weights)
    limits = images.Limits()
    errors: Counter = Counter()
    examples: list[dict] = []
    keep: list[int] = []
    vectors, decode_ms, embed_ms = [], [], []
    features, features_ms = [], []
    with ThreadPoolExecutor(max_workers=max(1, cfg.decode_threads)) as pool:
        for lo in range(0, len(uris), cfg.batch_size):
            batch = list(range(lo, min(lo + cfg.batch_size, len(uris))))
            decoded = list(
                pool.map(
                    lambda j: _decode(uris[j], embedder.preprocess, limits, cfg.backdrop_balance),
                    batch,
                )
            )
            good = _decoded(batch, decoded, uris, decode_ms, errors, examples)
            if not good:
                continue
            if rerank:
                for f, ms in pool.map(_timed_features, [p for _, p in good]):
                    features.append(f)
                    features_ms.append(ms)
            t0 = time.perf_counter()
            vectors.append(embedder.embed(np.stack([p for _, p in good])))
            share = (time.perf_counter() - t0) * 1000 / len(good)
            embed_ms.extend([share] * len(good))
            keep.extend(j for j, _ in good)
    dim = version.manifest.dim
    return Queries(
        vectors=np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
        product_id=[pids[j] for j in keep],
        category=[cats[j] for j in keep],
        group=[groups[j] for j in keep],
        exclude=[None] * len(keep),
        prefer=[None] * len(keep),
        self_ids=None,
        attempted=len(uris),
        errors=errors,
        error_examples=examples,
        decode_ms=decode_ms,
        embed_ms=embed_ms,
        features=features if rerank else None,
        features_ms=features_ms,
        has_instance=has_instance,
        has_category=has_category,
    )


def _decoded(batch, decoded, uris, decode_ms: list, errors: Counter, examples: list) -> list:
    """The (index, pixels) that decoded; the others counted in `errors` (10 kept as examples)."""
    good = []
    for j, (pixels, err, ms) in zip(batch, decoded, strict=True):
        if err is None:
            good.append((j, pixels))
            decode_ms.append(ms)
            continue
        errors[err[0]] += 1
        if len(examples) < 10:
            examples.append({"image_uri": uris[j], "error": err[0], "detail": err[1]})
    return good


def _product_category(docs: query.Docs) -> dict[str, str]:
    """product_id -> the category of its first photo in the docs (empty without categories)."""
    if "category" not in docs.table.column_names:
        return {}
    pairs = zip(docs.table["product_id"].to_pylist(), strings(docs.table, "category"), strict=True)
    out: dict[str, str] = {}
    for pid, cat in pairs:
        if cat is not None:
            out.setdefault(pid, cat)
    return out


def leave_one_out_queries(
    cfg: Config, version: Version, docs: query.Docs, shards: list[query.ShardIndex], dataset
) -> Queries:
    if "category" not in docs.table.column_names:
        raise EvalError(
            f"version {version.manifest.version}: the docs have no category column, which "
            "leave-one-out needs as ground truth"
        )
    limit = DEFAULT_LOO_LIMIT if cfg.limit is None else cfg.limit
    rows = np.arange(docs.table.num_rows)
    if cfg.products is not None:
        wanted = pa.array(list(cfg.products), pa.string())
        rows = rows[pc.is_in(docs.table["product_id"].cast(pa.string()), wanted).to_numpy(False)]
    ids = rows[_sample(len(rows), limit, cfg.seed)]
    vectors = _stored_vectors(version, dataset, ids, shards)
    rows = docs.table.take(pa.array(ids))
    pids, cats = strings(rows, "product_id"), strings(rows, "category")
    return Queries(
        vectors=vectors,
        product_id=[None] * len(ids),
        category=cats,
        group=cats,
        exclude=pids,
        prefer=cats if cfg.same_category else [None] * len(ids),
        self_ids=ids,
        attempted=len(ids),
        errors=Counter(),
        error_examples=[],
        decode_ms=[],
        embed_ms=[],
        features=None,
        features_ms=[],
        has_instance=False,
        has_category=True,
    )


def _stored_vectors(version: Version, dataset, ids: np.ndarray, shards) -> np.ndarray:
    """The catalog vectors of these ids: from the embeddings dataset when it matches the
    version, else decoded from the index (as GET /products/{id}/similar does)."""
    if dataset is not None:
        return dataset.read_ids(ids)[1]
    starts = [s.id_range[0] for s in version.manifest.shards]
    out = [shards[bisect.bisect_right(starts, gid) - 1].reconstruct(gid) for gid in ids.tolist()]
    return np.asarray(out, np.float32).reshape(len(ids), version.manifest.dim)


def matching_dataset(version: Version, docs: query.Docs):
    """(dataset, None) when the embeddings dataset the manifest names is there and holds the
    version's rows (same count, dimension, product per id), else (None, why not)."""
    m = version.manifest
    uri = (m.embeddings or {}).get("uri")
    if not uri:
        return None, "the index manifest names no embeddings dataset"
    try:
        dataset = embeddings.open_dataset(uri)
    except (embeddings.DatasetError, storage.StorageError) as exc:
        return None, f"embeddings dataset unavailable: {exc}"
    if dataset.count != m.count or dataset.dim != m.dim:
        return None, f"{uri}: {dataset.count}x{dataset.dim}, the index is {m.count}x{m.dim}"
    doc_pids = docs.table["product_id"]
    for p in dataset.parts:
        pids = storage.read_parquet(p.uri, columns=["product_id"])["product_id"]
        if not pids.equals(doc_pids.slice(p.first_id, p.rows)):
            return None, f"{p.uri}: its products differ from the version's docs"
    return dataset, None
