"""Text and hybrid search quality on products-dev (bench/quality.py --text): BM25 against the
semantic text tower against their fusion, on test products only.

    python bench/quality.py --text [--catalog ...] [--work .cache/quality-bench]
        [--json bench/results/quality-text.json]

1. Vectors: the quality bench's cached embeddings (the catalog-tuned model when it is there,
   as the default re-index serves it; else the untuned ones), else jobs/embed.py.
2. Split by product (`tuning.split_products`, seed 0). The tower (texttower.train_and_tune:
   trained, its fusion weights tuned on held-out train products, then refit) sees the train
   products' rows only; the gallery is an index version of the test products alone, built by
   jobs/build_index.py (BM25 per shard, no tower of its own).
3. Searched in process with the service's own functions: query.ShardIndex.search (vectors) and
   .text_search (BM25), query.widening_search + query.results (one result per product),
   query.fuse (the tuned weighted RRF, depth ingress_state.fusion_width), texttower.compose
   (the photo's vector moved toward the words') and, for POST /search?q=, the photo's ranking
   among the products matching the words (`words`: a filters.Filter words filter) fused first
   (query.words_weight); `fused` is the fusion without it, `hybrid` what the service answers.
4. Figures, in two variants: `all_text` (the docs' text = title + the short metadata columns,
   as the build indexes a catalog) and `titles_only` (category, colour and the other labels
   dropped from the docs: only judged by, so words must be learned from the photos):
   titles as queries (R@10 of a product with that title); "<colour> <article type>" (P@10 by
   the labels; pairs with >= 10 test products); a test product's photo (its stored vector) + a
   colour word C not its own, for its type T where (C, T) has >= 10 test products (P@10 of
   type T in colour C); median latency of text and image queries (in process; an uploaded
   photo's decode and embedding are not included).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time

import numpy as np
import pyarrow as pa
import ray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jobs import build_index, embed  # noqa: E402
from visual_search import (  # noqa: E402
    embeddings,
    filters,
    fulltext,
    query,
    texttower,
    tuning,
    versions,
)
from visual_search.ingress_state import fusion_width  # noqa: E402

K = 10
LABELS = ("category", "colour", "gender", "master", "sub", "source")
GOALS = {"title_r10": 0.95, "colour_type_p10": 0.8, "photo_colour_p10": 0.6}


class Gallery:
    """The test products' version, searched the way the ingress does, in process."""

    def __init__(self, index_root: str):
        version = versions.open_version(index_root)
        self.shards = [query.ShardIndex(version, i) for i in range(len(version.manifest.shards))]
        self.docs = query.Docs.load(version)
        self.metric = version.manifest.metric

    def _ranking(self, search, metric: str, width: int) -> list[dict]:
        async def fan_out(w):
            return [search(s, w) for s in self.shards]

        hits = asyncio.run(query.widening_search(fan_out, metric, self.docs, width))
        return query.results(self.docs, hits)

    def vector(self, v: np.ndarray, width: int = K, words: str = "") -> list[dict]:
        flt = filters.Filter(words=words) if words else None
        return self._ranking(lambda s, w: s.search(v, w, flt), self.metric, width)

    def text(self, q: str, width: int = K) -> list[dict]:
        return self._ranking(lambda s, w: s.text_search(q, w), "ip", width)


def rankings(gallery: Gallery, tower, q: str, photo: np.ndarray | None, record: dict) -> dict:
    """Each ranking of one query and its fusion (as GET / POST /search?q= fuse them)."""
    width = fusion_width(K)
    words = tower.encode([q])
    out = {"bm25": gallery.text(q, width)}
    if photo is None:
        out["tower"] = gallery.vector(words, width)
        kinds, names = ("bm25", "tower"), ("text", "semantic")
        weights = record["fusion"]["text"]["weights"]
    else:
        out["image"] = gallery.vector(photo, width)
        out["tower"] = gallery.vector(texttower.compose(photo, words), width)
        kinds, names = ("image", "tower", "bm25"), ("image", "semantic", "text")
        weights = record["fusion"]["hybrid"]["weights"]
        out["words"] = gallery.vector(photo, K, words=q)
        out["fused"] = query.fuse([out[n] for n in kinds], K, names, weights)
        weights = {n: 1.0 for n in names} | weights
        weights["words"] = query.words_weight(weights, names, K)
        kinds, names = (*kinds, "words"), (*names, "words")
    out["hybrid"] = query.fuse([out[n] for n in kinds], K, names, weights)
    return {n: r[:K] for n, r in out.items()}


def _subset(ds, table: pa.Table, rows: np.ndarray, drop: tuple[str, ...], out: str):
    if not os.path.exists(os.path.join(out, "manifest.json")):
        part = table.take(pa.array(rows)).drop_columns(["id", *drop])
        embeddings.write_dataset(out, [part], ds.manifest)
    return embeddings.open_dataset(out)


def title_queries(labels: dict, rng, n: int) -> list[tuple[str, set]]:
    titles = labels["title"]
    by_title: dict[str, set] = {}
    for pid, t in zip(labels["product_id"], titles, strict=True):
        by_title.setdefault(t.casefold(), set()).add(pid)
    rows = [i for i, t in enumerate(titles) if t.strip()]
    chosen = rng.permutation(rows)[:n]
    return [(titles[i], by_title[titles[i].casefold()]) for i in chosen]


def colour_type_pairs(labels: dict) -> dict[tuple[str, str], set]:
    pairs: dict[tuple[str, str], set] = {}
    for pid, c, t in zip(labels["product_id"], labels["colour"], labels["category"], strict=True):
        if c and t:
            pairs.setdefault((c, t), set()).add(pid)
    return {p: s for p, s in pairs.items() if len(s) >= K}


def photo_colour_queries(labels, pairs, vectors, rng, n):
    """(colour word, photo vector, relevant products) for up to n test products."""
    out = []
    for i in rng.permutation(len(labels["product_id"])):
        own_c, t = labels["colour"][i], labels["category"][i]
        colours = sorted(c for c, tt in pairs if tt == t and c != own_c)
        if colours:
            c = colours[rng.integers(len(colours))]
            out.append((c, vectors[i : i + 1], pairs[(c, t)]))
        if len(out) == n:
            break
    return out


def _score(ranking: list[dict], relevant: set, recall: bool) -> float:
    found = [r["product_id"] in relevant for r in ranking[:K]]
    return float(any(found)) if recall else sum(found) / K


def evaluate(gallery, tower, record, queries, recall: bool) -> dict:
    totals: dict[str, list[float]] = {}
    for q, photo, relevant in queries:
        for name, ranking in rankings(gallery, tower, q, photo, record).items():
            totals.setdefault(name, []).append(_score(ranking, relevant, recall))
    return {n: round(float(np.mean(v)), 4) for n, v in totals.items()} | {"queries": len(queries)}


def latency(gallery, tower, record, texts, photos) -> dict:
    def median_ms(fn, items):
        times = []
        for item in items:
            t0 = time.perf_counter()
            fn(item)
            times.append((time.perf_counter() - t0) * 1000)
        return round(statistics.median(times), 2)

    return {
        "bm25_ms": median_ms(lambda q: gallery.text(q), texts),
        "tower_encode_ms": median_ms(lambda q: tower.encode([q]), texts),
        "text_hybrid_ms": median_ms(lambda q: rankings(gallery, tower, q, None, record), texts),
        "image_ms": median_ms(lambda v: gallery.vector(v), photos),
        "method": "in process, median per query; an upload's decode + embedding not included",
    }


def variant(name, ds, table, splits, work, drop, labels, test_vectors) -> dict:
    """Train the tower on the train rows, build the test gallery, measure every figure."""
    train_rows, test_rows = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")
    train_ds = _subset(ds, table, train_rows, drop, os.path.join(work, f"{name}-train"))
    test_ds = _subset(ds, table, test_rows, drop, os.path.join(work, f"{name}-test"))
    root = os.path.join(work, f"{name}-index")
    if versions.current(root) is None:
        cfg = build_index.Config(embeddings=test_ds.uri, index_root=root, text_tower=False)
        build_index.run(cfg)
    t = train_ds.read_range(0, train_ds.count)
    t0 = time.time()
    tower, record = texttower.train_and_tune(t.drop_columns(["embedding"]), train_ds.vectors(t))
    print(f"{name} tower: {record['rows']} train rows, {time.time() - t0:.1f}s, held-out title "
          f"R@10 {record['heldout']['title_r10']}, weights {record['fusion']['text']['weights']}"
          f" / {record['fusion']['hybrid']['weights']}", flush=True)  # fmt: skip
    gallery = Gallery(root)
    rng = np.random.default_rng(0)
    pairs = colour_type_pairs(labels)
    titles = [(q, None, rel) for q, rel in title_queries(labels, rng, 400)]
    colour_type = [(f"{c} {t}", None, rel) for (c, t), rel in sorted(pairs.items())]
    photo_colour = photo_colour_queries(labels, pairs, test_vectors, rng, 300)
    out = {
        "tower": {k: record[k] for k in ("rows", "seconds", "device", "heldout", "fusion")},
        "title_r10": evaluate(gallery, tower, record, titles, recall=True),
        "colour_type_p10": evaluate(gallery, tower, record, colour_type, recall=False),
        "photo_colour_p10": evaluate(gallery, tower, record, photo_colour, recall=False),
        "latency": latency(
            gallery,
            tower,
            record,
            [q for q, *_ in titles[:200]],
            [test_vectors[i : i + 1] for i in range(200)],
        ),  # fmt: skip
    }
    for key in ("title_r10", "colour_type_p10", "photo_colour_p10", "latency"):
        print(name, key, " ".join(f"{k} {v}" for k, v in out[key].items()), flush=True)
    return out


def run(catalog_uri: str, work: str, json_out: str) -> dict:
    cached = [os.path.join(work, n) for n in ("emb-tuned", "emb")]
    emb = next((p for p in cached if os.path.exists(os.path.join(p, "manifest.json"))), None)
    if emb is None:
        emb = cached[1]
        embed.run(embed.Config(catalog_uri, emb))
    ds = embeddings.open_dataset(emb)
    table = ds.read_range(0, ds.count)
    pids = np.asarray(table["product_id"].to_pylist()).astype(str)
    splits = tuning.split_products(pids, seed=0)
    test = np.flatnonzero(splits == "test")
    test_table = table.take(pa.array(test))
    labels = {c: [v or "" for v in test_table[c].to_pylist()] for c in ("product_id", "title",
              "colour", "category")}  # fmt: skip
    test_vectors = tuning.unit(ds.vectors(test_table))
    text_work = os.path.join(work, "text")
    results = {"catalog": catalog_uri, "embeddings": emb, "model": ds.manifest.model,
               "test_products": len(set(pids[test])), "goals": GOALS}  # fmt: skip
    for name, drop in (("all_text", ()), ("titles_only", LABELS)):
        drop = tuple(c for c in drop if c in table.column_names)
        args = (ds, table, splits, text_work, drop, labels, test_vectors)
        results[name] = variant(name, *args)
        results[name]["text_columns"] = fulltext.text_columns(table.drop_columns(list(drop)))
    best = results["all_text"]
    results["goals_met"] = {g: best[g]["hybrid"] >= v for g, v in GOALS.items()}
    print("goals_met (all_text, hybrid)", results["goals_met"])
    os.makedirs(os.path.dirname(json_out), exist_ok=True)
    with open(json_out + ".tmp", "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    os.replace(json_out + ".tmp", json_out)
    print(f"wrote {json_out}")
    ray.shutdown()  # build_index started it
    return results
