"""Near-duplicate product groups of an index version (Contract 6).

    python jobs/dedup.py --index-root URI [--version V] [--out URI] [--threshold T]
        [--embedding-threshold E] [--k K] [--mutual-k M] [--since URI | --full]
        [--s3-endpoint URL]

Every photo of the version is searched (k-NN) against every shard in Ray tasks, one task per
shard of queries; candidates are re-scored exactly with the embeddings dataset the version was
built from (or vectors reconstructed from the index). Each product pair whose best cosine is
>= E has its best photo pair verified as a copy (dedup_verify: aligned thumbnails, in Ray
tasks); only those are, so the cost is bounded by the pairs above E. Products are linked when
each is among the other's M best verified products at or above the copy threshold T; linked
components are split into complete groups (every two members >= T, see dedup.py).

Writes {out}/groups.parquet, pairs.parquet and items.parquet (what a later run reuses),
report.html, summary.md and, last, manifest.json. Default out: {index_root}/dedup/{version}.

Incremental: unless --full, the newest complete output of another version under
{index_root}/dedup/ (or --since URI) with the same model and verifier is reused: products whose
photos (image_uri set) are unchanged keep their pairs and copy scores, and only the photos of
new or changed products are queried (against the whole new index, so new-old pairs are found
from the new side). Contract 5 updates are folded into a version by jobs/compact.py; their
products are new or changed products of that version here.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import cli
from visual_search import (
    cluster,
    dedup,
    dedup_report,
    dedup_verify,
    embedders,
    query,
    storage,
    versions,
)

# bench/dedup.py --calibrate on products-dev: see README (near-duplicates) for the curve.
DEFAULT_THRESHOLD = 0.97  # copy score
# Below it a pair is not verified: bounds the verification work (cosine alone reached precision
# 0.99 only at recall ~0, so it is a candidate filter, not the decision).
DEFAULT_EMBEDDING_THRESHOLD = 0.8
VERIFY_CHUNK = 500  # pairs per Ray verification task (each reads its photos once)


@dataclass(frozen=True)
class Config:
    index_root: str
    version: str | None = None
    out: str | None = None
    threshold: float = DEFAULT_THRESHOLD
    embedding_threshold: float = DEFAULT_EMBEDDING_THRESHOLD
    k: int = 10  # items per query: room for several photos of one product
    mutual_k: int = 3
    since: str | None = None
    full: bool = False
    s3_endpoint: str | None = None


def _say(msg: str) -> None:
    print(f"[dedup] {msg}", flush=True)


def _open(cfg: Config) -> versions.Version:
    if not storage.exists(cfg.index_root):
        raise dedup.DedupError(f"{cfg.index_root}: index root not found")
    try:
        return versions.open_version(cfg.index_root, cfg.version)
    except (FileNotFoundError, ValueError) as exc:
        raise dedup.DedupError(str(exc)) from exc


def _previous(cfg: Config, version: versions.Version) -> str | None:
    """The output folder to reuse: --since, else the newest complete one of another version."""
    if cfg.full:
        return None
    if cfg.since:
        if not storage.exists(storage.join(cfg.since, "manifest.json")):
            raise dedup.DedupError(f"{cfg.since}: no manifest.json (not a complete dedup output)")
        return cfg.since
    base = storage.join(cfg.index_root, "dedup")
    if not storage.is_dir(base):
        return None
    found = []
    for entry in storage.list_files(base, (".json",)):
        if entry.uri.endswith("/manifest.json"):
            folder = storage.parent(entry.uri)
            m = storage.read_json(entry.uri)
            if m.get("version") != version.manifest.version:
                found.append((m.get("created_unix", 0), folder, m))
    model = version.manifest.model.get("model_id")
    found = [
        f
        for f in found
        if f[2].get("model_id") == model and f[2].get("verify") == dedup_verify.VERSION
    ]
    return max(found)[1] if found else None


def _reuse(prev: str | None, docs: pa.Table) -> tuple[set[str], pa.Table | None]:
    """(products whose photos are unchanged since prev, prev's pairs among them)."""
    if prev is None:
        return set(), None
    old = storage.read_parquet(storage.join(prev, "items.parquet"))
    photos_old: dict[str, set] = {}
    for pid, uri in zip(old["product_id"].to_pylist(), old["image_uri"].to_pylist(), strict=True):
        photos_old.setdefault(pid, set()).add(uri)
    photos_new: dict[str, set] = {}
    for pid, uri in zip(docs["product_id"].to_pylist(), docs["image_uri"].to_pylist(), strict=True):
        photos_new.setdefault(pid, set()).add(uri)
    covered = {p for p, s in photos_new.items() if photos_old.get(p) == s}
    pairs = storage.read_parquet(storage.join(prev, "pairs.parquet"))
    keep = pc.and_(
        pc.is_in(pairs["product_a"], pa.array(sorted(covered), pa.string())),
        pc.is_in(pairs["product_b"], pa.array(sorted(covered), pa.string())),
    )
    return covered, pairs.filter(keep)


def _candidates(version: versions.Version, dataset, qids: np.ndarray, k: int):
    """Ray tasks, one per shard of queries; returns (qids, cand, scores) concatenated."""
    import ray

    cluster.init()
    task = ray.remote(dedup.query_items).options(runtime_env=cluster.runtime_env())
    vref, dref = ray.put(version), ray.put(dataset)
    futures = []
    for rec in version.manifest.shards:
        lo, hi = rec.id_range
        mine = qids[(qids >= lo) & (qids < hi)]
        if len(mine):
            futures.append(task.remote(vref, dref, mine, k))
    parts = ray.get(futures)
    if not parts:
        z = np.zeros(0, np.int64)
        return z, np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))


def _pairs(cfg, version, qids, dataset, old_pairs, names, codes, uris) -> dict:
    """Candidate product pairs of the queried items, merged with the reused ones: columns a, b
    (codes), score (cosine), uri_a, uri_b (the photos compared), copy (NaN: not verified)."""
    q, cand, scores = _candidates(version, dataset, qids, cfg.k)
    a, b, s, ia, ib = dedup.product_pairs(q, cand, scores, codes)
    lists = [(a, b, s, uris[ia], uris[ib], np.full(len(a), np.nan, np.float32))]
    if old_pairs is not None and old_pairs.num_rows:
        lookup = {n: i for i, n in enumerate(names)}
        col = {c: old_pairs[c].to_numpy(zero_copy_only=False) for c in old_pairs.column_names}
        oa = np.array([lookup[p] for p in col["product_a"]], np.int64)
        ob = np.array([lookup[p] for p in col["product_b"]], np.int64)
        lists.append((oa, ob, col["score"], col["uri_a"], col["uri_b"], col["copy_score"]))
    keys = ("a", "b", "score", "uri_a", "uri_b", "copy")
    return dict(zip(keys, dedup.merge_pairs(*lists), strict=True)) | {"queried": len(q)}


def _verify(cfg, version, pairs: dict) -> int:
    """Copy-score (in place) every pair >= the embedding threshold not scored yet, in Ray
    tasks of VERIFY_CHUNK pairs; returns how many were."""
    import ray

    todo = np.flatnonzero((pairs["score"] >= cfg.embedding_threshold) & np.isnan(pairs["copy"]))
    if not len(todo):
        return 0
    cluster.init()
    model = version.manifest.model
    mode = model.get("preprocess", {}).get("mode", "pad")
    pre = embedders.preprocess_for(model["model_id"], mode)
    task = ray.remote(dedup_verify.score_uri_pairs).options(runtime_env=cluster.runtime_env())
    chunks = [todo[j : j + VERIFY_CHUNK] for j in range(0, len(todo), VERIFY_CHUNK)]
    futures = [
        task.remote(list(zip(pairs["uri_a"][c], pairs["uri_b"][c], strict=True)), pre)
        for c in chunks
    ]
    for c, got in zip(chunks, ray.get(futures), strict=True):
        pairs["copy"][c] = got
    return len(todo)


def group_pairs(pairs: dict, names: list[str], threshold: float, mutual_k: int):
    """(mutual top-k edges, complete groups) of the verified pairs (columns a, b, copy) at or
    above the copy-score threshold."""
    ok = pairs["copy"] >= threshold  # NaN (not verified) compares False
    a, b, c = pairs["a"][ok], pairs["b"][ok], pairs["copy"][ok]
    edges = dedup.mutual_edges(a, b, c, threshold, mutual_k)
    scores = dict(zip(zip(a.tolist(), b.tolist(), strict=True), c.tolist(), strict=True))
    return edges, dedup.groups_from_edges(edges, names, scores, threshold)


def _outputs(cfg, version, docs, groups, summary, pair_rows, curve=None) -> None:
    out = cfg.out or dedup.output_root(cfg.index_root, version.manifest.version)
    storage.write_parquet(storage.join(out, "groups.parquet"), dedup.groups_table(groups))
    storage.write_parquet(storage.join(out, "pairs.parquet"), pair_rows)
    items = docs.select(["product_id", "image_uri"])
    storage.write_parquet(storage.join(out, "items.parquet"), items)
    pids = docs["product_id"].to_pylist()
    cats = (
        docs["category"].cast(pa.string()).to_pylist()
        if "category" in docs.column_names
        else [None] * len(pids)
    )
    photo_of: dict[str, str] = {}
    for pid, uri in zip(pids, docs["image_uri"].to_pylist(), strict=True):
        photo_of.setdefault(pid, uri)
    grouped = {p for g in groups for p in g["members"]}
    shares = dedup_report.category_shares(dict(zip(pids, cats, strict=True)), grouped)
    report = dedup_report.render_html(summary, groups, photo_of, shares, curve)
    storage.write_text(storage.join(out, "report.html"), report)
    storage.write_text(
        storage.join(out, "summary.md"), dedup_report.render_summary(summary, groups, shares)
    )
    storage.write_json(storage.join(out, "manifest.json"), summary)  # last: output complete
    _say(f"wrote {out}: {summary['groups']} groups, {summary['grouped_products']} products")


def _check(cfg: Config) -> None:
    if cfg.k < 1 or cfg.mutual_k < 1:
        raise ValueError("--k and --mutual-k must be >= 1")
    if not (0 < cfg.threshold <= 1 and -1 <= cfg.embedding_threshold <= 1):
        raise ValueError("--threshold must be in (0, 1], --embedding-threshold in [-1, 1]")


def _pair_rows(pairs: dict, names: list[str]) -> pa.Table:
    return pa.table(
        {
            "product_a": pa.array([names[i] for i in pairs["a"].tolist()], pa.string()),
            "product_b": pa.array([names[i] for i in pairs["b"].tolist()], pa.string()),
            "score": pa.array(pairs["score"], pa.float32()),
            "uri_a": pa.array(pairs["uri_a"].tolist(), pa.string()),
            "uri_b": pa.array(pairs["uri_b"].tolist(), pa.string()),
            "copy_score": pa.array(pairs["copy"], pa.float32()),
        }
    )


def run(cfg: Config, curve: list[dict] | None = None) -> dict:
    """Dedup one version (cfg.version or CURRENT's); returns the manifest written last.
    `curve`: a calibration precision/recall curve to show in the report (bench/dedup.py)."""
    started = time.time()
    if cfg.s3_endpoint:
        storage.configure(cfg.s3_endpoint)
    _check(cfg)
    version = _open(cfg)
    docs = query.Docs.load(version).table
    pid_col = docs["product_id"].combine_chunks()
    names_arr, codes = np.unique(np.asarray(pid_col.to_pylist(), dtype=object), return_inverse=True)
    names = [str(n) for n in names_arr]
    dataset = dedup.matching_dataset(version, pid_col)
    prev = _previous(cfg, version)
    covered, old_pairs = _reuse(prev, docs)
    todo = ~np.isin(names_arr[codes], np.array(sorted(covered), dtype=object))
    qids = np.flatnonzero(todo).astype(np.int64)
    _say(
        f"version {version.manifest.version}: {len(docs):,} items, {len(names):,} products; "
        f"querying {len(qids):,} items" + (f" (reusing {prev})" if prev else "")
    )
    uris = np.asarray(docs["image_uri"].to_pylist(), dtype=object)
    t0 = time.monotonic()
    pairs = _pairs(cfg, version, qids, dataset, old_pairs, names, codes, uris)
    t_cand = time.monotonic() - t0
    verified = _verify(cfg, version, pairs)
    t_verify = time.monotonic() - t0 - t_cand
    edges, groups = group_pairs(pairs, names, cfg.threshold, cfg.mutual_k)
    t_group = time.monotonic() - t0 - t_cand - t_verify
    summary = {
        "version": version.manifest.version,
        "model_id": version.manifest.model.get("model_id"),
        "created_unix": time.time(),
        "threshold": cfg.threshold,
        "embedding_threshold": cfg.embedding_threshold,
        "verify": dedup_verify.VERSION,
        "k": cfg.mutual_k,
        "items": len(docs),
        "products": len(names),
        "queried_items": pairs["queried"],
        "reused_from": prev,
        "vectors": "embeddings dataset" if dataset is not None else "reconstructed from index",
        "pairs": len(pairs["a"]),
        "pairs_above_embedding_threshold": int((pairs["score"] >= cfg.embedding_threshold).sum()),
        "verified_pairs": verified,
        "edges": len(edges),
        "groups": len(groups),
        "grouped_products": sum(len(g["members"]) for g in groups),
        "timings": {
            "candidates_s": round(t_cand, 2),
            "verify_s": round(t_verify, 2),
            "groups_s": round(t_group, 2),
            "total_s": round(time.time() - started, 2),
        },
    }
    _outputs(cfg, version, docs, groups, summary, _pair_rows(pairs, names), curve)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_index_root(p)
    p.add_argument("--version", help="version to dedup (default: the one CURRENT names)")
    p.add_argument("--out", help="output folder (default: {index_root}/dedup/{version})")
    p.add_argument(
        "--threshold", type=float, default=DEFAULT_THRESHOLD, help="copy score of an edge"
    )
    p.add_argument(
        "--embedding-threshold",
        type=float,
        default=DEFAULT_EMBEDDING_THRESHOLD,
        help="cosine from which a candidate pair is verified",
    )
    p.add_argument("--k", type=int, default=Config.k, help="neighbours per photo")
    p.add_argument(
        "--mutual-k", type=int, default=Config.mutual_k, help="mutual top-k products per edge"
    )
    p.add_argument("--since", help="a previous dedup output to reuse (default: the newest)")
    p.add_argument("--full", action="store_true", help="query every item, reuse nothing")
    cli.add_s3_endpoint(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cli.exit_code("dedup", lambda: run(cli.config(Config, args)), (dedup.DedupError,))


if __name__ == "__main__":
    sys.exit(main())
