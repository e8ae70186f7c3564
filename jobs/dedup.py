"""Near-duplicate product groups of an index version (Contract 6).

    python jobs/dedup.py --index-root URI [--version V] [--out URI] [--threshold T]
        [--k K] [--since URI | --full] [--s3-endpoint URL]

Every photo of the version is searched (k-NN) against every shard in Ray tasks, one task per
shard of queries; candidates are re-scored exactly with the embeddings dataset the version was
built from (or vectors reconstructed from the index). Products are linked when each is the
other's nearest other product at or above the threshold; groups by union-find.

Writes {out}/groups.parquet, pairs.parquet and items.parquet (what a later run reuses),
report.html, summary.md and, last, manifest.json. Default out: {index_root}/dedup/{version}.

Incremental: unless --full, the newest complete output of another version under
{index_root}/dedup/ (or --since URI) with the same model is reused: products whose photos
(image_uri set) are unchanged keep their candidate pairs, and only the photos of new or changed
products are queried (against the whole new index, so new-old pairs are found from the new
side). Contract 5 live updates do not exist yet; once they do, their items are new items here.
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
from visual_search import cluster, dedup, dedup_report, query, storage, versions

# bench/dedup.py --calibrate on products-dev (1,000 products + 200 copies, efficientnet_lite0_gem):
# the lowest threshold with mutual-NN pair precision >= 0.99 is 0.975, where injected-copy
# recall is only 0.015 (0.93: precision 0.96, recall 0.53); colour variants of one article
# score as high as the copies, so cosine alone cannot meet both targets with this model.
DEFAULT_THRESHOLD = 0.975


@dataclass(frozen=True)
class Config:
    index_root: str
    version: str | None = None
    out: str | None = None
    threshold: float = DEFAULT_THRESHOLD
    k: int = 10  # items per query: room for several photos of one product
    mutual_k: int = 1
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
    found = [f for f in found if f[2].get("model_id") == model]
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


def _pairs(cfg, version, docs, qids, dataset, old_pairs, names, codes):
    q, cand, scores = _candidates(version, dataset, qids, cfg.k)
    a, b, s = dedup.product_pairs(q, cand, scores, codes)
    if old_pairs is not None and old_pairs.num_rows:
        lookup = {n: i for i, n in enumerate(names)}
        oa = np.array([lookup[p] for p in old_pairs["product_a"].to_pylist()], np.int64)
        ob = np.array([lookup[p] for p in old_pairs["product_b"].to_pylist()], np.int64)
        os_ = old_pairs["score"].to_numpy().astype(np.float32)
        # product_pairs over both lists keeps the best score of a pair seen twice
        a, b, s = dedup.merge_pairs((a, b, s), (oa, ob, os_))
    return a, b, s, len(q)


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


def run(cfg: Config, curve: list[dict] | None = None) -> dict:
    """Dedup one version (cfg.version or CURRENT's); returns the manifest written last.
    `curve`: a calibration precision/recall curve to show in the report (bench/dedup.py)."""
    started = time.time()
    if cfg.s3_endpoint:
        storage.configure(cfg.s3_endpoint)
    if cfg.k < 1 or cfg.mutual_k < 1:
        raise ValueError("--k and --mutual-k must be >= 1")
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
    t0 = time.monotonic()
    a, b, s, queried = _pairs(cfg, version, docs, qids, dataset, old_pairs, names, codes)
    t_cand = time.monotonic() - t0
    edges = dedup.mutual_edges(a, b, s, cfg.threshold, cfg.mutual_k)
    groups = dedup.groups_from_edges(edges, names)
    t_group = time.monotonic() - t0 - t_cand
    pair_rows = pa.table(
        {
            "product_a": pa.array([names[i] for i in a.tolist()], pa.string()),
            "product_b": pa.array([names[i] for i in b.tolist()], pa.string()),
            "score": pa.array(s, pa.float32()),
        }
    )
    summary = {
        "version": version.manifest.version,
        "model_id": version.manifest.model.get("model_id"),
        "created_unix": time.time(),
        "threshold": cfg.threshold,
        "k": cfg.mutual_k,
        "items": len(docs),
        "products": len(names),
        "queried_items": queried,
        "reused_from": prev,
        "vectors": "embeddings dataset" if dataset is not None else "reconstructed from index",
        "pairs": len(a),
        "edges": len(edges),
        "groups": len(groups),
        "grouped_products": sum(len(g["members"]) for g in groups),
        "timings": {
            "candidates_s": round(t_cand, 2),
            "groups_s": round(t_group, 2),
            "total_s": round(time.time() - started, 2),
        },
    }
    _outputs(cfg, version, docs, groups, summary, pair_rows, curve)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--index-root", required=True, help="index root URI (versions/, CURRENT)")
    p.add_argument("--version", help="version to dedup (default: the one CURRENT names)")
    p.add_argument("--out", help="output folder (default: {index_root}/dedup/{version})")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--k", type=int, default=Config.k, help="neighbours per photo")
    p.add_argument("--mutual-k", type=int, default=Config.mutual_k, help=argparse.SUPPRESS)
    p.add_argument("--since", help="a previous dedup output to reuse (default: the newest)")
    p.add_argument("--full", action="store_true", help="query every item, reuse nothing")
    cli.add_s3_endpoint(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cli.exit_code("dedup", lambda: run(cli.config(Config, args)), (dedup.DedupError,))


if __name__ == "__main__":
    sys.exit(main())
