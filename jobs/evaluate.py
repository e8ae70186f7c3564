"""Measure the retrieval quality of one index version, through the service's own query path.

    python jobs/evaluate.py --index-root URI (--queries URI | --leave-one-out) [--version V]
        [--k 1,5,10,50] [--limit N] [--seed S] [--rerank N] [--any-category] [--out URI]
        [--weights URI] [--s3-endpoint URL]

Queries are either a table (Contract 1 style: `image_uri` plus `product_id` for instance-level
and/or `category` for category-level ground truth; e.g. the output of jobs/make_queries.py),
embedded in process with the index's own model, or (--leave-one-out) catalog photos of the index
itself, whose stored vectors are the queries and whose own product is excluded from the results.
Each query runs the Serve app's path in process (query.ShardIndex per shard +
query.preferring_search + query.results): one result per product, as POST /search answers. Table
queries then get POST /search's geometric re-rank of their top --rerank products (verify.py,
against the catalog photos the docs name; 0: off; "ip" versions only); leave-one-out queries,
like GET /products/{id}/similar, are not re-ranked and list the products of the query's own
category first (--any-category: nearest first, as ?same_category=false).

Metrics (definitions in lib/visual_search/metrics.py) at each k: recall@k, precision@k, mAP@k,
overall and per query category; the index's raw top-10 against exact search on the same queries
(index_recall_at_10); per-query latency. With --out: report.json, summary.md, recall.png.

The report (what run() returns and report.json holds):
- version, index_root, model, metric, factory, search_params, shards, count, mode ("table" or
  "leave-one-out"), ks;
- queries (rows tried), evaluated, errors (rows whose image could not be read or decoded; never
  fatal), errors_by_code, error_examples (up to 10);
- instance, category: {"queries", "no_relevant", "recall@K", "precision@K", "map@K"} or None
  (instance: the table has product ids that are in the index; category: it has a category
  column and the docs have one; leave-one-out is category level only);
- per_category: {category: {"queries", "instance", "category"}} by query category (instance-only
  tables: the category of the query's product in the docs); worst_categories: {"level", "by",
  "rows": [{"category", "queries", "map@10"}]}, the 10 lowest first;
- index_recall_at_10 (None, with index_recall_note, when the embeddings dataset the manifest names
  is gone or does not match the version);
- predicted_category_accuracy: the share of the queries with a category whose
  verify.predicted_category (of the final results, as POST /search answers it) is that category;
  None without category ground truth;
- latency_ms: {"decode", "embed", "search", "rerank"}: {"p50", "p99", "mean"} or None. embed is
  each query's share of its batch of 32; search is widening_search + docs join, one query at a
  time; rerank is the query's features + its candidates' (cached across queries) + matching.
- rerank: how many top products were re-ranked (0: off, leave-one-out, or an "l2" version);
- config, code_version, created_unix, took_s.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import dataclasses
import io
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import cli
from visual_search import (
    catalog,
    embedders,
    embeddings,
    images,
    index,
    metrics,
    query,
    storage,
    verify,
)
from visual_search.manifest import code_version
from visual_search.search import merge_topk
from visual_search.versions import Version, open_version

RECALL_K = 10
DEFAULT_LOO_LIMIT = 1000
WORST = 10
# Catalog photos' local features, kept across queries (500 keypoints: about 130 kB).
FEATURE_CACHE_BYTES = 512 << 20


class EvalError(ValueError):
    """The evaluation cannot run on this input; the message says why."""


@dataclass(frozen=True)
class Config:
    index_root: str
    queries: str | None = None  # queries table URI; or leave_one_out
    leave_one_out: bool = False
    version: str | None = None  # default: the version CURRENT names
    ks: tuple[int, ...] = (1, 5, 10, 50)
    limit: int | None = None  # None: 1000 for leave-one-out, every row of a table; 0: all
    seed: int = 0
    rerank: int = 10  # top products re-ranked by geometric verification, as the service does
    out: str | None = None
    weights: str | None = None  # model weights URI, for models that need them (resnet50, clip)
    batch_size: int = 32
    decode_threads: int = 8
    s3_endpoint: str | None = None
    products: tuple[str, ...] | None = None  # leave-one-out: only these products' photos
    same_category: bool = True  # leave-one-out: own category first, as GET /similar


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


def _say(msg: str) -> None:
    print(f"[evaluate] {msg}", flush=True)


def _sample(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded sample of min(limit, n) rows (all when limit is 0)."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _strings(table: pa.Table, column: str) -> list[str | None]:
    return table[column].cast(pa.string()).to_pylist()


# ------------------------------------------------------------------------------ query sets


def _decode(uri: str, preprocess: images.Preprocess, limits: images.Limits):
    """(pixels, None, ms) or (None, (code, detail), ms); never raises for a bad image."""
    t0 = time.perf_counter()
    try:
        data = storage.read_bytes(uri, limits.max_bytes)
        pixels = images.load(data, preprocess, limits)
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


def _table_queries(cfg: Config, version: Version, docs: query.Docs, rerank: bool) -> Queries:
    table = catalog.read_catalog(cfg.queries).table
    has_category = "category" in table.column_names
    rows = _sample(table.num_rows, cfg.limit or 0, cfg.seed)
    table = table.take(pa.array(rows))
    uris = _strings(table, "image_uri")
    pids = _strings(table, "product_id")
    known = set(docs.table["product_id"].to_pylist())
    has_instance = any(p in known for p in pids)
    cats = _strings(table, "category") if has_category else [None] * len(pids)
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
            decoded = list(pool.map(lambda j: _decode(uris[j], embedder.preprocess, limits), batch))
            good = []
            for j, (pixels, err, ms) in zip(batch, decoded, strict=True):
                if err is None:
                    good.append((j, pixels))
                    decode_ms.append(ms)
                    continue
                errors[err[0]] += 1
                if len(examples) < 10:
                    examples.append({"image_uri": uris[j], "error": err[0], "detail": err[1]})
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


def _product_category(docs: query.Docs) -> dict[str, str]:
    """product_id -> the category of its first photo in the docs (empty without categories)."""
    if "category" not in docs.table.column_names:
        return {}
    pairs = zip(docs.table["product_id"].to_pylist(), _strings(docs.table, "category"), strict=True)
    out: dict[str, str] = {}
    for pid, cat in pairs:
        if cat is not None:
            out.setdefault(pid, cat)
    return out


def _leave_one_out_queries(
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
    pids, cats = _strings(rows, "product_id"), _strings(rows, "category")
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


def _matching_dataset(version: Version, docs: query.Docs):
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


# ----------------------------------------------------------------------------------- search


def _rerank(
    results: list[dict],
    query_features: verify.Features,
    n: int,
    cache: verify.FeatureCache,
    preprocess: images.Preprocess,
    pool: ThreadPoolExecutor,
) -> list[dict]:
    """POST /search's re-rank of the top n results; catalog features read in the pool."""
    top = results[:n]
    read = pool.map(lambda r: cache.get_or_read(r["id"], r["image_uri"], preprocess), top)
    found = {row["id"]: features for row, features in zip(top, read, strict=True)}
    return verify.rerank(results, query_features, lambda row: found[row["id"]], n)


def _search_all(
    q: Queries,
    shards: list[query.ShardIndex],
    docs: query.Docs,
    metric: str,
    k: int,
    rerank: int = 0,
    preprocess: images.Preprocess | None = None,
    threads: int = 8,
) -> tuple[list[list[dict]], list[float], list[float]]:
    """Each query through preferring_search + results (one row per product, best photo first),
    then, with query features, the re-rank of its top `rerank` products; (answers (k rows
    each), search ms, rerank ms)."""
    rerank = rerank if q.features is not None else 0
    cache = verify.FeatureCache(FEATURE_CACHE_BYTES)
    loop = asyncio.new_event_loop()
    answers, search_ms, rerank_ms = [], [], []
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for j in range(len(q.vectors)):
                vector = q.vectors[j : j + 1]

                async def fan_out(width: int, flt, vector=vector):
                    return [s.search(vector, width, flt) for s in shards]

                t0 = time.perf_counter()
                width, exclude, prefer = max(k, rerank), q.exclude[j], q.prefer[j]
                hits = loop.run_until_complete(
                    query.preferring_search(fan_out, metric, docs, width, exclude, prefer)
                )
                results = query.results(docs, hits)
                search_ms.append((time.perf_counter() - t0) * 1000)
                if rerank:
                    t0 = time.perf_counter()
                    results = _rerank(results, q.features[j], rerank, cache, preprocess, pool)
                    rerank_ms.append(q.features_ms[j] + (time.perf_counter() - t0) * 1000)
                answers.append(results[:k])
    finally:
        loop.close()
    return answers, search_ms, rerank_ms


def _index_recall(
    q: Queries, version: Version, shards: list[query.ShardIndex], dataset, why: str | None
) -> tuple[float | None, str | None]:
    """Mean |index top-10 ∩ exact top-10| / 10 over the queries (raw ids, before grouping by
    product; in leave-one-out the query's own id is left out of both lists)."""
    if dataset is None:
        return None, why
    metric = version.manifest.metric
    k = RECALL_K + (1 if q.self_ids is not None else 0)
    found = merge_topk([s.search(q.vectors, k, None) for s in shards], k, metric)[1]
    parts = []
    for p in dataset.parts:
        table = dataset.read_range(p.first_id, p.first_id + p.rows, columns=["embedding"])
        x = dataset.vectors(table)
        parts.append(index.exact_topk(x, table["id"].to_numpy(), q.vectors, k, metric))
    truth = merge_topk(parts, k, metric)[1]
    return index.recall_at_k(found, truth, RECALL_K, exclude=q.self_ids), None


# ---------------------------------------------------------------------------------- metrics


def _category_sizes(docs: query.Docs) -> dict[str, set]:
    """category -> the set of products with a photo in it."""
    out: dict[str, set] = {}
    if "category" not in docs.table.column_names:
        return out
    pids = docs.table["product_id"].to_pylist()
    for pid, cat in zip(pids, _strings(docs.table, "category"), strict=True):
        if cat is not None:
            out.setdefault(cat, set()).add(pid)
    return out


def _relevance(q: Queries, answers: list[list[dict]], docs: query.Docs, width: int) -> dict:
    """level -> (rel (n, width), R (n,)) for instance and category ground truth."""
    out = {}
    if q.has_instance:
        known = set(docs.table["product_id"].to_pylist())
        rel = metrics.relevance(
            [[r["product_id"] for r in a] for a in answers], q.product_id, width
        )
        n_rel = np.array([int(p is not None and p in known) for p in q.product_id])
        out["instance"] = (rel, n_rel)
    if q.has_category and "category" in docs.table.column_names:
        members = _category_sizes(docs)
        rel = metrics.relevance(
            [[r.get("category") for r in a] for a in answers], q.category, width
        )
        n_rel = np.array(
            [
                len(members.get(c, set()) - {x}) if c is not None else 0
                for c, x in zip(q.category, q.exclude, strict=True)
            ]
        )
        out["category"] = (rel, n_rel)
    return out


def _latency(samples: list[float]) -> dict | None:
    if not samples:
        return None
    a = np.asarray(samples)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
    }


def _rank_key(ks: tuple[int, ...]) -> str:
    return f"map@{RECALL_K if RECALL_K in ks else max(ks)}"


def _per_category(q: Queries, levels: dict, ks: tuple[int, ...]) -> dict:
    groups: dict[str, list[int]] = {}
    for j, g in enumerate(q.group):
        if g is not None:
            groups.setdefault(g, []).append(j)
    out = {}
    for g, rows in sorted(groups.items()):
        entry: dict = {"queries": len(rows), "instance": None, "category": None}
        for level, (rel, n_rel) in levels.items():
            entry[level] = metrics.summarize(rel[rows], n_rel[rows], ks)
        out[g] = entry
    return out


def _worst(per_category: dict, level: str | None, key: str) -> list[dict]:
    if level is None:
        return []
    rows = [
        {"category": c, "queries": e[level]["queries"], key: e[level][key]}
        for c, e in per_category.items()
        if e.get(level) and e[level][key] is not None
    ]
    return sorted(rows, key=lambda r: (r[key], r["category"]))[:WORST]


def _predicted_category_accuracy(
    q: Queries, answers: list[list[dict]], metric: str
) -> float | None:
    """Share of the queries with a category that POST /search's predicted_category gets right."""
    pairs = [(c, a) for c, a in zip(q.category, answers, strict=True) if c is not None]
    if not q.has_category or not pairs:
        return None
    right = sum(verify.predicted_category(a, metric=metric) == c for c, a in pairs)
    return round(right / len(pairs), 6)


# ------------------------------------------------------------------------------------ run


def _validate(cfg: Config) -> None:
    if bool(cfg.queries) == bool(cfg.leave_one_out):
        raise EvalError("give exactly one of --queries URI and --leave-one-out")
    if not cfg.ks or any(k < 1 for k in cfg.ks):
        raise EvalError(f"--k needs positive cut-offs, got {list(cfg.ks)}")
    if cfg.limit is not None and cfg.limit < 0:
        raise EvalError(f"--limit must be >= 0 (0: all), got {cfg.limit}")
    if cfg.batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.rerank < 0:
        raise EvalError(f"--rerank must be >= 0 (0: off), got {cfg.rerank}")
    if not storage.exists(cfg.index_root):
        raise EvalError(f"{cfg.index_root}: index root not found")


def run(cfg: Config) -> dict:
    """Evaluate one version (cfg.version, or CURRENT's); returns the report (see module doc)."""
    started = time.time()
    if cfg.s3_endpoint:
        storage.configure(cfg.s3_endpoint)
    cfg = dataclasses.replace(cfg, ks=tuple(sorted(set(cfg.ks))))
    _validate(cfg)
    version = open_version(cfg.index_root, cfg.version)
    m = version.manifest
    shards = [query.ShardIndex(version, i) for i in range(len(m.shards))]
    docs = query.Docs.load(version)
    mode = "leave-one-out" if cfg.leave_one_out else "table"
    _say(
        f"version {m.version} ({m.model['model_id']}, {m.factory}, {len(m.shards)} shard(s), "
        f"{m.count:,} vectors), {mode}"
    )
    dataset, why = _matching_dataset(version, docs)
    # As the service: the inlier bonus is added to a cosine, so "l2" versions are not re-ranked.
    rerank = cfg.rerank if m.metric == "ip" else 0
    if cfg.leave_one_out:
        q = _leave_one_out_queries(cfg, version, docs, shards, dataset)
    else:
        q = _table_queries(cfg, version, docs, rerank > 0)
    n_errors = sum(q.errors.values())
    if not len(q.vectors):
        raise EvalError(f"no query could be used: {q.attempted} rows, errors {dict(q.errors)}")

    width = max(cfg.ks)
    preprocess = embedders.preprocess_for(
        m.model["model_id"], m.model.get("preprocess", {}).get("mode", "pad")
    )
    answers, search_ms, rerank_ms = _search_all(
        q, shards, docs, m.metric, width, rerank, preprocess, cfg.decode_threads
    )
    levels = _relevance(q, answers, docs, width)
    summary = {
        level: metrics.summarize(rel, n_rel, cfg.ks) for level, (rel, n_rel) in levels.items()
    }
    per_category = _per_category(q, levels, cfg.ks)
    primary = "instance" if "instance" in levels else "category" if "category" in levels else None
    rank_key = _rank_key(cfg.ks)
    index_recall, recall_note = _index_recall(q, version, shards, dataset, why)

    report = {
        "version": m.version,
        "index_root": version.index_root,
        "model": m.model,
        "metric": m.metric,
        "factory": m.factory,
        "search_params": m.search_params,
        "shards": len(m.shards),
        "count": m.count,
        "mode": mode,
        "ks": list(cfg.ks),
        "queries": q.attempted,
        "evaluated": len(q.vectors),
        "errors": n_errors,
        "errors_by_code": dict(sorted(q.errors.items())),
        "error_examples": q.error_examples,
        "instance": summary.get("instance"),
        "category": summary.get("category"),
        "predicted_category_accuracy": _predicted_category_accuracy(q, answers, m.metric),
        "per_category": per_category,
        "worst_categories": {
            "level": primary,
            "by": rank_key,
            "rows": _worst(per_category, primary, rank_key),
        },
        "index_recall_at_10": None if index_recall is None else round(index_recall, 6),
        "index_recall_note": recall_note,
        "latency_ms": {
            "decode": _latency(q.decode_ms),
            "embed": _latency(q.embed_ms),
            "search": _latency(search_ms),
            "rerank": _latency(rerank_ms),
        },
        "rerank": rerank if q.features is not None else 0,
        "config": {**dataclasses.asdict(cfg), "ks": list(cfg.ks)},
        "code_version": code_version(),
        "created_unix": started,
        "took_s": None,
    }
    report["took_s"] = round(time.time() - started, 2)
    _print_summary(report)
    if cfg.out:
        write_outputs(cfg.out, report)
        _say(f"wrote {storage.join(cfg.out, 'report.json')}, summary.md, recall.png")
    return report


# ---------------------------------------------------------------------------------- output


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _metric_line(summary: dict, ks: list[int], rank_key: str) -> str:
    parts = [f"{rank_key.replace('map', 'mAP')} {_fmt(summary[rank_key])}"]
    parts += [f"recall@{k} {_fmt(summary[f'recall@{k}'])}" for k in ks]
    parts += [f"precision@{k} {_fmt(summary[f'precision@{k}'])}" for k in ks]
    return " ".join(parts) + f" ({summary['queries']} queries, {summary['no_relevant']} without)"


def _print_summary(r: dict) -> None:
    rank_key = r["worst_categories"]["by"]
    errors = f"{r['errors']} errors {r['errors_by_code']}" if r["errors"] else "no errors"
    _say(f"{r['queries']} queries, {r['evaluated']} evaluated, {errors}")
    for level in ("instance", "category"):
        if r[level] is not None:
            _say(f"{level} {_metric_line(r[level], r['ks'], rank_key)}")
    if r["predicted_category_accuracy"] is not None:
        _say(f"predicted category accuracy {r['predicted_category_accuracy']:.3f}")
    if r["index_recall_at_10"] is not None:
        _say(f"index recall@10 vs exact search {r['index_recall_at_10']:.4f}")
    else:
        _say(f"index recall@10 vs exact search not measured: {r['index_recall_note']}")
    lat = r["latency_ms"]
    _say(
        "latency ms "
        + " ".join(
            f"{stage} p50 {v['p50']:.2f} p99 {v['p99']:.2f}" for stage, v in lat.items() if v
        )
    )
    worst = r["worst_categories"]["rows"]
    if worst:
        shown = ", ".join(f"{w['category']} {_fmt(w[rank_key])}" for w in worst)
        _say(f"worst categories by {r['worst_categories']['level']} {rank_key}: {shown}")


def summary_markdown(r: dict) -> str:
    """The report as Markdown: metric table, index recall, latency, the 10 worst categories."""
    ks = r["ks"]
    lines = [
        f"# Retrieval quality of index version `{r['version']}`",
        "",
        f"- index: `{r['index_root']}`, {r['count']:,} vectors, `{r['factory']}`, "
        f"{r['shards']} shard(s), model `{r['model']['model_id']}`",
        f"- queries: {r['queries']} ({r['mode']}), "
        f"{r['evaluated']} evaluated, {r['errors']} errors"
        + (f" {r['errors_by_code']}" if r["errors"] else ""),
        f"- re-rank: top {r['rerank']} by geometric verification"
        if r["rerank"]
        else "- re-rank: off",
        f"- index recall@10 vs exact search: {_fmt(r['index_recall_at_10'])}"
        + (f" ({r['index_recall_note']})" if r["index_recall_note"] else ""),
        f"- predicted category accuracy: {_fmt(r['predicted_category_accuracy'])}",
        "",
        "| level | metric | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for level in ("instance", "category"):
        s = r[level]
        if s is None:
            continue
        for name, key in (("recall", "recall"), ("precision", "precision"), ("mAP", "map")):
            cells = " | ".join(_fmt(s[f"{key}@{k}"]) for k in ks)
            lines.append(f"| {level} ({s['queries']} q) | {name}@k | {cells} |")
    lines += ["", "| latency (ms/query) | p50 | p99 |", "|---|---|---|"]
    for stage, v in r["latency_ms"].items():
        if v:
            lines.append(f"| {stage} | {v['p50']:.2f} | {v['p99']:.2f} |")
    worst = r["worst_categories"]
    if worst["rows"]:
        key = worst["by"]
        lines += [
            "",
            f"## {len(worst['rows'])} worst categories by {worst['level']} {key}",
            "",
            f"| category | queries | {key} | recall@{ks[0]} |",
            "|---|---|---|---|",
        ]
        for w in worst["rows"]:
            entry = r["per_category"][w["category"]][worst["level"]]
            lines.append(
                f"| {w['category']} | {w['queries']} | {_fmt(w[key])} | "
                f"{_fmt(entry[f'recall@{ks[0]}'])} |"
            )
    return "\n".join(lines) + "\n"


def recall_png(r: dict) -> bytes:
    """recall@k curves (instance, category) and the worst categories' mAP as a bar chart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for level in ("instance", "category"):
        s = r[level]
        if s is not None:
            ys = [s[f"recall@{k}"] for k in r["ks"]]
            left.plot(r["ks"], ys, marker="o", label=f"{level} ({s['queries']} queries)")
    left.set_xscale("log")
    left.set_xticks(r["ks"], [str(k) for k in r["ks"]])
    left.set_ylim(0, 1.02)
    left.set_xlabel("k")
    left.set_ylabel("recall@k")
    left.set_title(f"version {r['version']}", fontsize=9)
    left.grid(alpha=0.3)
    if r["instance"] is not None or r["category"] is not None:
        left.legend(loc="lower right")
    worst = r["worst_categories"]
    key = worst["by"]
    if worst["rows"]:
        names = [w["category"] for w in worst["rows"]][::-1]
        values = [w[key] for w in worst["rows"]][::-1]
        right.barh(names, values, color="tab:red")
        right.set_xlim(0, 1)
        right.set_xlabel(f"{worst['level']} {key.replace('map', 'mAP')}")
        right.set_title(f"{len(names)} worst categories")
    else:
        right.text(0.5, 0.5, "no categories", ha="center", va="center")
        right.set_axis_off()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_outputs(out: str, report: dict) -> None:
    """report.json, summary.md and recall.png under `out`, each written atomically."""
    storage.write_json(storage.join(out, "report.json"), report)
    storage.write_text(storage.join(out, "summary.md"), summary_markdown(report))
    storage.write_bytes(storage.join(out, "recall.png"), recall_png(report))


# ------------------------------------------------------------------------------------- CLI


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--k takes comma-separated integers: {text!r}") from exc
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--k takes positive integers: {text!r}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--index-root", required=True, help="index root URI (versions/, CURRENT)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--queries", help="queries table URI (image_uri, product_id and/or category)")
    src.add_argument(
        "--leave-one-out", action="store_true", help="catalog photos as queries, own product out"
    )
    p.add_argument("--version", help="version id (default: the one CURRENT names)")
    p.add_argument("--k", type=_ks, default=Config.ks, help="cut-offs, e.g. 1,5,10,50")
    p.add_argument(
        "--limit", type=int, help="sampled queries (default: 1000 leave-one-out, all rows; 0: all)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rerank",
        type=int,
        default=Config.rerank,
        help="top products re-ranked by geometric verification, as POST /search (0: off)",
    )
    p.add_argument(
        "--any-category",
        action="store_true",
        help="leave-one-out: nearest products first, not the own category's (?same_category=false)",
    )
    p.add_argument("--out", help="folder URI for report.json, summary.md, recall.png")
    p.add_argument("--weights", help="model weights URI (models that need them)")
    cli.add_s3_endpoint(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = cli.config(Config, args, ks=args.k, same_category=not args.any_category)
    return cli.exit_code("evaluate", lambda: run(cfg), (EvalError,))


if __name__ == "__main__":
    sys.exit(main())
