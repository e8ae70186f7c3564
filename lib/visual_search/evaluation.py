"""Evaluation of one index version through the service's own query path: the query sets
(evalsets.py) searched as POST /search and GET /products/{id}/similar answer, then relevance,
the metrics and the report (jobs/evaluate.py's docstring describes it; evalreport.py renders it).
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from visual_search import (
    embedders,
    evalreport,
    images,
    index,
    inprocess,
    metrics,
    query,
    storage,
    verify,
)
from visual_search.evalsets import (
    EvalError,
    Queries,
    leave_one_out_queries,
    matching_dataset,
    strings,
    table_queries,
)
from visual_search.manifest import code_version
from visual_search.search import merge_topk
from visual_search.versions import Version, open_version

__all__ = ["Config", "EvalError", "run"]

RECALL_K = 10
WORST = 10
# Catalog photos' local features, kept across queries (500 keypoints: about 130 kB).
FEATURE_CACHE_BYTES = 512 << 20


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
    backdrop_balance: bool = True  # table queries: the backdrop scaled to white, as the service
    out: str | None = None
    weights: str | None = None  # model weights URI, for models that need them (resnet50, clip)
    batch_size: int = 32
    decode_threads: int = 8
    s3_endpoint: str | None = None
    products: tuple[str, ...] | None = None  # leave-one-out: only these products' photos
    same_category: bool = True  # leave-one-out: own category first, as GET /similar


def _say(msg: str) -> None:
    print(f"[evaluate] {msg}", flush=True)


# ----------------------------------------------------------------------------------- search


def rerank_top(
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
    searcher: inprocess.Searcher,
    k: int,
    rerank: int = 0,
    preprocess: images.Preprocess | None = None,
    threads: int = 8,
) -> tuple[list[list[dict]], list[float], list[float]]:
    """Each query through the service's query path (one row per product, best photo first),
    then, with query features, the re-rank of its top `rerank` products; (answers (k rows
    each), search ms, rerank ms)."""
    rerank = rerank if q.features is not None else 0
    cache = verify.FeatureCache(FEATURE_CACHE_BYTES)
    answers, search_ms, rerank_ms = [], [], []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for j in range(len(q.vectors)):
            t0 = time.perf_counter()
            vector, width = q.vectors[j : j + 1], max(k, rerank)
            results = searcher.search(vector, width, q.exclude[j], q.prefer[j])
            search_ms.append((time.perf_counter() - t0) * 1000)
            if rerank:
                t0 = time.perf_counter()
                results = rerank_top(results, q.features[j], rerank, cache, preprocess, pool)
                rerank_ms.append(q.features_ms[j] + (time.perf_counter() - t0) * 1000)
            answers.append(results[:k])
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
    for pid, cat in zip(pids, strings(docs.table, "category"), strict=True):
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
    with inprocess.Searcher(version) as searcher:
        return _evaluate(cfg, searcher, started)


def _queries(cfg: Config, version, docs, shards, dataset, rerank: int):
    if cfg.leave_one_out:
        q = leave_one_out_queries(cfg, version, docs, shards, dataset)
    else:
        q = table_queries(cfg, version, docs, rerank > 0)
    if not len(q.vectors):
        raise EvalError(f"no query could be used: {q.attempted} rows, errors {dict(q.errors)}")
    return q


def _version_fields(version) -> dict:
    m = version.manifest
    return {
        "version": m.version,
        "index_root": version.index_root,
        "model": m.model,
        "metric": m.metric,
        "factory": m.factory,
        "search_params": m.search_params,
        "shards": len(m.shards),
        "count": m.count,
    }


def _evaluate(cfg: Config, searcher: inprocess.Searcher, started: float) -> dict:
    version, shards, docs = searcher.version, searcher.shards, searcher.docs
    m = version.manifest
    mode = "leave-one-out" if cfg.leave_one_out else "table"
    _say(
        f"version {m.version} ({m.model['model_id']}, {m.factory}, {len(m.shards)} shard(s), "
        f"{m.count:,} vectors), {mode}"
    )
    dataset, why = matching_dataset(version, docs)
    # As the service: the inlier bonus is added to a cosine, so "l2" versions are not re-ranked.
    rerank = cfg.rerank if m.metric == "ip" else 0
    q = _queries(cfg, version, docs, shards, dataset, rerank)

    width = max(cfg.ks)
    preprocess = embedders.preprocess_for(
        m.model["model_id"], m.model.get("preprocess", {}).get("mode", "pad")
    )
    answers, search_ms, rerank_ms = _search_all(
        q, searcher, width, rerank, preprocess, cfg.decode_threads
    )
    levels = _relevance(q, answers, docs, width)
    summary = {
        level: metrics.summarize(rel, n_rel, cfg.ks) for level, (rel, n_rel) in levels.items()
    }
    per_category = _per_category(q, levels, cfg.ks)
    index_recall, recall_note = _index_recall(q, version, shards, dataset, why)

    report = {
        **_version_fields(version),
        "mode": mode,
        "ks": list(cfg.ks),
        "queries": q.attempted,
        "evaluated": len(q.vectors),
        "errors": sum(q.errors.values()),
        "errors_by_code": dict(sorted(q.errors.items())),
        "error_examples": q.error_examples,
        "instance": summary.get("instance"),
        "category": summary.get("category"),
        "predicted_category_accuracy": _predicted_category_accuracy(q, answers, m.metric),
        "per_category": per_category,
        "worst_categories": _worst_categories(per_category, levels, cfg.ks),
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
    return _finish(cfg, report, started)


def _worst_categories(per_category: dict, levels: dict, ks) -> dict:
    primary = "instance" if "instance" in levels else "category" if "category" in levels else None
    rank_key = _rank_key(ks)
    return {"level": primary, "by": rank_key, "rows": _worst(per_category, primary, rank_key)}


def _finish(cfg: Config, report: dict, started: float) -> dict:
    report["took_s"] = round(time.time() - started, 2)
    evalreport.print_summary(report, _say)
    if cfg.out:
        evalreport.write_outputs(cfg.out, report)
        _say(f"wrote {storage.join(cfg.out, 'report.json')}, summary.md, recall.png")
    return report
