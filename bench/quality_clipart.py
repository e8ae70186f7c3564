"""Retrieval quality on openclipart: the plain backbone against the improvements, in one run.

    python bench/quality_clipart.py [--queries 1000] [--work .cache/quality-bench]
                                    [--json bench/results/quality-clipart.json]

1. Catalog: every openclipart PNG (`visual_search.sample`), byte-identical files dropped
   (openclipart ships one drawing under several folders; as separate products they would make
   instance ground truth ambiguous), split by content hash into train / eval, so no evaluated
   item is trained on.
2. Embeddings (jobs/embed.py): train with the plain backbone; eval with each variant.
3. Heads (jobs/train_head.py) on the train features: PCA-whitening and the metric-learning head,
   with and without instance-level learning on re-photographed copies of the train photos
   (jobs/make_queries.py over the train catalog, other seed, 2 copies per product).
4. One index per eval variant (jobs/build_index.py), queries made from eval photos
   (jobs/make_queries.py), and jobs/evaluate.py: instance level on the augmented queries,
   category level leave-one-out over every eval photo (category folders as labels).
Every step is skipped when its output exists, so a rerun resumes; --fresh starts over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np
import pyarrow as pa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.quality import evaluate_once  # noqa: E402
from jobs import build_index, embed, evaluate, make_queries, train_head  # noqa: E402
from visual_search import embeddings, sample, storage, versions  # noqa: E402

# openclipart's folder of hundreds of near-identical stars that differ mostly in colour: the
# instance figures are also given without it.
HARD = "stars"
# name -> (embed options, head to train or None); heads are trained on the plain train features.
VARIANTS = {
    "plain": ({}, None),
    "crop": ({"preprocess": "crop"}, None),
    "gem": ({"model": "efficientnet_lite0_gem"}, None),
    "pca256": ({}, {"method": "pca", "dim": 256}),
    "metric256": ({}, {"method": "metric", "dim": 256}),
    "metric256_views": ({}, {"method": "metric", "dim": 256, "views": True}),
}


def split_catalog(work: str) -> tuple[str, str, dict]:
    """(train, eval) catalog paths: duplicates dropped, split by content hash."""
    train_uri, eval_uri = os.path.join(work, "train.parquet"), os.path.join(work, "eval.parquet")
    stats_uri = os.path.join(work, "catalog.json")
    if os.path.exists(stats_uri):
        return train_uri, eval_uri, json.load(open(stats_uri))
    table = sample.sample_table(sample.fetch_openclipart(os.path.join(REPO, ".cache")))
    seen, keep, side = set(), [], []
    for i, uri in enumerate(table["image_uri"].to_pylist()):
        with open(uri, "rb") as f:
            digest = hashlib.sha256(f.read()).digest()
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
            side.append(digest[0] % 2)
    dropped = table.num_rows - len(keep)
    table = table.take(keep)
    is_eval = pa.array([s == 1 for s in side])
    storage.write_parquet(train_uri, table.filter(pa.compute.invert(is_eval)))
    storage.write_parquet(eval_uri, table.filter(is_eval))
    stats = {
        "photos_kept": table.num_rows,
        "duplicates_dropped": dropped,
        "train": len(side) - sum(side),
        "eval": sum(side),
        "categories": len(set(table["category"].to_pylist())),
    }
    storage.write_json(stats_uri, stats)
    return train_uri, eval_uri, stats


def embed_once(catalog: str, out: str, **opts) -> str:
    if not storage.exists(storage.join(out, "manifest.json")):
        embed.run(embed.Config(catalog=catalog, out=out, **opts))
    return out


def train_views(train_catalog: str, w) -> str:
    """Embeddings of 2 re-photographed copies of every train photo (the head's instance task)."""
    table = w("train-aug", "queries.parquet")
    if not os.path.exists(table):
        cfg = make_queries.Config(train_catalog, w("train-aug"), per_product=2, seed=7)
        make_queries.run(cfg)
    return embed_once(table, w("emb-train-aug"))


def index_once(embeddings: str, root: str) -> str:
    if versions.current(root) is None:
        build_index.run(build_index.Config(embeddings=embeddings, index_root=root))
    return root


def recall_at_1_without(report: dict, category: str) -> float | None:
    """Instance recall@1 over the queries outside one category (from the per-category rows)."""
    overall, rows = report["instance"], report["per_category"]
    left = rows.get(category, {}).get("instance") or {"queries": 0, "recall@1": 0.0}
    n = overall["queries"] - left["queries"]
    hits = overall["recall@1"] * overall["queries"] - left["recall@1"] * left["queries"]
    return round(hits / n, 4) if n else None


def near_duplicate_share(uri: str, threshold: float = 0.95) -> float:
    """Share of catalog photos with another photo at cosine >= threshold (ambiguous instances)."""
    ds = embeddings.open_dataset(uri)
    x = ds.vectors(ds.read_range(0, ds.count, columns=["embedding"]))
    sims = x @ x.T
    np.fill_diagonal(sims, -1.0)
    return round(float((sims.max(axis=1) >= threshold).mean()), 4)


def pick(summary: dict | None, key: str) -> float | None:
    return None if summary is None or summary.get(key) is None else round(summary[key], 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--queries", type=int, default=1000, help="eval products re-photographed")
    p.add_argument("--work", default=os.path.join(REPO, ".cache", "quality-clipart-bench"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "quality-clipart.json"))
    p.add_argument("--fresh", action="store_true", help="delete --work first")
    args = p.parse_args(argv)
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work, exist_ok=True)
    started = time.time()
    w = lambda *parts: os.path.join(args.work, *parts)  # noqa: E731

    train_cat, eval_cat, stats = split_catalog(args.work)
    print(f"catalog {stats}", flush=True)
    train_emb = embed_once(train_cat, w("emb-train-plain"))
    queries = w("queries", "queries.parquet")
    if not os.path.exists(queries):
        make_queries.run(make_queries.Config(eval_cat, w("queries"), limit=args.queries, seed=0))

    rows = {}
    for name in args.variants.split(","):
        opts, head = VARIANTS[name]
        if head:
            head_uri = w(f"head-{name}.pt")
            if head.get("views"):
                head = {**head, "views": train_views(train_cat, w)}
            if not os.path.exists(head_uri):
                train_head.run(train_head.Config(embeddings=train_emb, out=head_uri, **head))
            opts = {**opts, "head": head_uri}
        emb = embed_once(eval_cat, w(f"emb-eval-{name}"), **opts)
        root = index_once(emb, w(f"index-{name}"))
        inst = evaluate_once(
            w(f"eval-{name}", "instance"),
            evaluate.Config(index_root=root, queries=queries, ks=(1, 5, 10)),
        )
        cat = evaluate_once(
            w(f"eval-{name}", "category"),
            evaluate.Config(index_root=root, leave_one_out=True, limit=0, ks=(1, 5, 10)),
        )
        rows[name] = {
            "dim": inst["model"]["dim"],
            "instance_recall@1": pick(inst["instance"], "recall@1"),
            "instance_recall@10": pick(inst["instance"], "recall@10"),
            "instance_map@10": pick(inst["instance"], "map@10"),
            f"instance_recall@1_without_{HARD}": recall_at_1_without(inst, HARD),
            "category_map@10": pick(cat["category"], "map@10"),
            "category_precision@10": pick(cat["category"], "precision@10"),
            "category_recall@1": pick(cat["category"], "recall@1"),
            "queries": inst["evaluated"],
            "category_queries": cat["evaluated"],
        }
    near = near_duplicate_share(w("emb-eval-plain"))
    print(f"eval photos with a near-duplicate (plain backbone cosine >= 0.95): {near}")
    base = rows.get("plain", {}).get("category_map@10")
    print(
        f"\nvariant          dim  inst_R@1  (w/o {HARD})  inst_R@10  cat_mAP@10  cat_P@10  "
        "vs plain (cat mAP@10)"
    )
    for name, r in rows.items():
        rel = f"{r['category_map@10'] / base - 1:+.1%}" if base else "-"
        print(
            f"{name:<16} {r['dim']:>4}  {r['instance_recall@1']:>8}  "
            f"{r[f'instance_recall@1_without_{HARD}']:>11}  {r['instance_recall@10']:>9}"
            f"  {r['category_map@10']:>10}  {r['category_precision@10']:>8}  {rel}"
        )
        print(
            f"quality_{name} dim {r['dim']} instance_recall_at_1 {r['instance_recall@1']} "
            f"category_map_at_10 {r['category_map@10']}",
            flush=True,
        )
    result = {
        "catalog": stats,
        "eval_near_duplicate_share": near,
        "queries": args.queries,
        "variants": rows,
        "seconds": round(time.time() - started, 1),
    }
    storage.write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
