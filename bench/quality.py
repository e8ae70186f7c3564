"""Retrieval quality on real product photos: the untuned model against the catalog-tuned one.

    python bench/quality.py [--catalog ../shared/data/products-dev/catalog.csv]
        [--work .cache/quality-bench] [--products 400] [--json bench/results/quality.json]

1. Split by product (`tuning.split_products`, seed 0: 60% train, 20% validation, 20% test),
   the split the re-index's tuning stage uses.
2. Untuned: jobs/embed.py + jobs/build_index.py on the whole catalog (what --no-tune builds).
3. Tuned: jobs/tune.py on those vectors (its default method: the backbone's last stage
   fine-tuned on re-photographs of the train products, the epoch chosen on validation
   products; refit off), so the model has seen nothing of the test products; then
   jobs/build_index.py.
4. Queries (jobs/make_queries.py --profile shopper, seed 1: crop keeping 70-90%, ±10°, colour
   shifts, JPEG 40; another distribution and seed than the tuning stage's own held-out queries)
   of up to --products test and train products, searched among the whole catalog through
   jobs/evaluate.py, the service's query path, re-rank and backdrop white balance included
   (and the tuned model once without the balance): instance recall@1/@10.
   Category precision@10 of /similar: jobs/evaluate.py --leave-one-out over the same products
   (own category first, as /similar answers), and of the nearest products alone
   (category_p10_nearest, --any-category: what the model's vectors give by themselves).
5. The tuned model's embedding throughput against the untuned one's (in process, same batch).
6. The average-pooled backbone (`efficientnet_lite0`, the default before GeM) on the test
   products, untuned, for the pooling choice.
Every step is skipped when its output exists, so a rerun resumes; --fresh starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

import numpy as np
import pyarrow as pa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jobs import build_index, embed, evaluate, make_queries, tune  # noqa: E402
from visual_search import catalog, embedders, storage, tuning, versions  # noqa: E402

DEFAULT_CATALOG = os.path.join(
    os.path.dirname(REPO), "shared", "data", "products-dev", "catalog.csv"
)


def _once(marker: str, fn) -> None:
    if not os.path.exists(marker):
        fn()


def build(embeddings_uri: str, root: str) -> None:
    if versions.current(root) is None:
        build_index.run(build_index.Config(embeddings=embeddings_uri, index_root=root))


def query_set(cat: catalog.Catalog, split: str, splits, n: int, out: str) -> str:
    """Shopper-style queries of up to n products of one split (seeded pick)."""
    table = os.path.join(out, "queries.parquet")
    if os.path.exists(table):
        return table
    pids = np.asarray(cat.table["product_id"].to_pylist())
    products = np.unique(pids[splits == split])
    chosen = set(np.random.default_rng(1).permutation(products)[:n].tolist())
    rows = [i for i, p in enumerate(pids) if p in chosen]
    src = out + "-sources.parquet"
    keep = ["product_id", "image_uri"] + (
        ["category"] if "category" in cat.table.column_names else []
    )
    storage.write_parquet(src, cat.table.select(keep).take(pa.array(rows)))
    make_queries.run(make_queries.Config(src, out, seed=1, profile="shopper"))
    return table


def evaluate_once(out: str, cfg: evaluate.Config) -> dict:
    report = os.path.join(out, "report.json")
    if not os.path.exists(report):
        evaluate.run(dataclasses.replace(cfg, out=out))
    with open(report) as f:
        return json.load(f)


def figures(
    root: str, queries: str, products: list[str], out: str, rerank: int, backdrop: bool = True
) -> dict:
    """Instance figures of the queries (re-ranked or not; backdrop balanced or not, as POST
    /search's backdrop_balance) and /similar's over the products."""
    inst = evaluate_once(
        f"{out}-instance-rerank{rerank}" + ("" if backdrop else "-raw"),
        evaluate.Config(
            index_root=root, queries=queries, ks=(1, 10), rerank=rerank, backdrop_balance=backdrop
        ),
    )
    similar = evaluate.Config(
        index_root=root, leave_one_out=True, ks=(10,), limit=0, products=tuple(products)
    )
    cat = evaluate_once(out + "-similar", similar)
    nearest = evaluate_once(
        out + "-similar-nearest", dataclasses.replace(similar, same_category=False)
    )
    return {
        "instance_r1": inst["instance"]["recall@1"],
        "instance_r10": inst["instance"]["recall@10"],
        "category_p10": cat["category"]["precision@10"],
        "category_p10_nearest": nearest["category"]["precision@10"],
        "predicted_category_accuracy": inst.get("predicted_category_accuracy"),
        "queries": inst["evaluated"],
    }


def throughput_ratio(record: dict, n: int = 256) -> float:
    """Tuned / untuned images per second of the embedder, one process, batches of 32."""
    px = np.random.default_rng(0).integers(0, 256, (32, 224, 224, 3), dtype=np.uint8)
    tuned = embedders.create(weights=record.get("weights"), head=record.get("head"))
    rates = []
    for model in (embedders.create(), tuned):
        model.embed(px)
        t0 = time.perf_counter()
        for _ in range(n // 32):
            model.embed(px)
        rates.append(n / (time.perf_counter() - t0))
    return round(rates[1] / rates[0], 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--catalog", default=DEFAULT_CATALOG)
    p.add_argument("--work", default=os.path.join(REPO, ".cache", "quality-bench"))
    p.add_argument("--products", type=int, default=400, help="products queried per split")
    p.add_argument("--rerank", type=int, default=10, help="re-ranked candidates (0: off)")
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "quality.json"))
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--text", action="store_true", help="text search instead (quality_text.py)")
    a = p.parse_args(argv)
    if a.text:
        import quality_text

        json_out = a.json.replace("quality.json", "quality-text.json")
        quality_text.run(a.catalog, a.work, json_out)
        return 0
    if a.fresh:
        shutil.rmtree(a.work, ignore_errors=True)
    w = lambda *parts: os.path.join(a.work, *parts)  # noqa: E731
    cat = catalog.read_catalog(a.catalog)
    pids = np.asarray(cat.table["product_id"].to_pylist()).astype(str)
    splits = tuning.split_products(pids, seed=0)

    _once(w("emb", "manifest.json"), lambda: embed.run(embed.Config(a.catalog, w("emb"))))
    build(w("emb"), w("untuned"))
    record_path = w("tune-record.json")
    if not os.path.exists(record_path):
        cfg = tune.Config(w("emb"), w("tuned"), w("emb-tuned"), refit=False, write_rejected=True)
        storage.write_json(record_path, tune.run(cfg))
    record = storage.read_json(record_path)
    print(f"tuned_model_kept {int(record['kept'])} ({record['decision']})")
    build(w("emb-tuned"), w("tuned"))

    results = {"catalog": a.catalog, "products_per_split": a.products, "rerank": a.rerank}
    for split in ("test", "train"):
        queries = query_set(cat, split, splits, a.products, w(f"queries-{split}"))
        chosen = sorted(set(pids[splits == split]))
        for name in ("untuned", "tuned"):
            for rr in sorted({0, a.rerank}):
                key = f"{name}_{split}" + ("" if rr else "_no_rerank")
                out = w(f"eval-{name}_{split}")
                results[key] = figures(w(name), queries, chosen, out, rr)
                print(key, " ".join(f"{k} {v}" for k, v in results[key].items()), flush=True)
        # The service's query-side backdrop white balance off (backdrop_balance=False).
        key = f"tuned_{split}_no_backdrop_balance"
        out = w(f"eval-tuned_{split}")
        results[key] = figures(w("tuned"), queries, chosen, out, a.rerank, backdrop=False)
        print(key, " ".join(f"{k} {v}" for k, v in results[key].items()), flush=True)
    _once(
        w("emb-avg", "manifest.json"),
        lambda: embed.run(embed.Config(a.catalog, w("emb-avg"), model="efficientnet_lite0")),
    )
    build(w("emb-avg"), w("untuned-avg"))
    queries = query_set(cat, "test", splits, a.products, w("queries-test"))
    chosen = sorted(set(pids[splits == "test"]))
    results["untuned_avg_test_no_rerank"] = figures(
        w("untuned-avg"), queries, chosen, w("eval-untuned-avg"), 0
    )
    print("untuned_avg_test_no_rerank", results["untuned_avg_test_no_rerank"], flush=True)
    results["train_s"] = record["train_s"]
    results["tune_s"] = record["seconds"]
    results["embed_s"] = storage.read_json(w("emb", "manifest.json"))["timings"]["total_s"]
    keys = ("method", "kept", "mix", "decision", "classes", "products", "untuned", "tuned",
            "history", "trained")  # fmt: skip
    results["tuning"] = {k: record[k] for k in keys if k in record}
    results["throughput_ratio"] = throughput_ratio(record)
    for name in ("train_s", "tune_s", "embed_s", "throughput_ratio"):
        print(name, results[name])
    # What the default re-index serves: the tuned model only when the tuning stage kept it.
    served = "tuned_test" if record["kept"] else "untuned_test"
    results["default_reindex"] = {"model": served, **results[served]}
    print("default_reindex", served, results[served]["instance_r1"])
    best = results[served]["instance_r1"]
    for base in ("untuned_test_no_rerank", "untuned_avg_test_no_rerank"):
        results[f"test_r1_gain_over_{base}"] = round(best - results[base]["instance_r1"], 4)
        print(f"test_r1_gain_over_{base}", results[f"test_r1_gain_over_{base}"])
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
