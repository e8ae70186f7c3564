"""Query- and catalog-side levers on top of the tuned model, chosen on validation products.

    python bench/quality_levers.py [--work .cache/quality-bench]
        [--json bench/results/quality-levers.json]

Needs bench/quality.py's work folder (its tuned model, embeddings and query sets; the validation
queries are made here the same way: shopper profile, seed 1, up to 400 products). For the
validation and test queries, over the whole catalog (exact cosine, one row per product):
1. re-rank: the top 30 candidates' inlier counts (verify.py) once, then every combination of
   shortlist (10, 20, 30), bonus per inlier and cap, linear or sqrt in the inliers;
2. hubness (CSLS): cosine - beta * the candidate's mean cosine to its k nearest other products;
3. query flip: the query vector averaged with its mirror image's;
4. catalog crop views: each catalog photo also embedded from its centre 80%, a product scoring
   its best view;
5. query white balance: the query's border colour, when near-uniform and bright (a backdrop),
   scaled to white per channel (von Kries: images.balance_backdrop, what POST /search now
   does), before preprocessing; then with the service's re-rank, alone and with the flip.
Each lever's setting is the best on validation (ties: the simplest); test is reported for it.
Prints `key value` lines and writes --json.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import quality  # noqa: E402
from visual_search import catalog, embedders, embeddings, images, storage, tuning, verify  # noqa: E402

SHORTLIST = 30


class Catalog:
    def __init__(self, work: str):
        ds = embeddings.open_dataset(os.path.join(work, "emb-tuned"))
        t = ds.read_range(0, ds.count, columns=["product_id", "image_uri", "embedding"])
        self.x = ds.vectors(t)
        self.pid = np.asarray(t["product_id"].to_pylist())
        self.uri = t["image_uri"].to_pylist()
        self.products, self.inv = np.unique(self.pid, return_inverse=True)

    def grouped(self, scores: np.ndarray) -> np.ndarray:
        """(q, rows) scores -> (q, products): each product's best row."""
        out = np.full((len(scores), len(self.products)), -9.0, np.float32)
        for j, p in enumerate(self.inv):
            np.maximum(out[:, p], scores[:, j], out=out[:, p])
        return out

    def hubness(self, k: int) -> np.ndarray:
        """Each product's mean cosine to its k nearest other products."""
        g = self.grouped(self.x @ self.x.T)  # rows x products
        g[np.arange(len(self.x)), self.inv] = -9.0
        top = -np.sort(-g, axis=1)[:, :k].mean(1)
        out = np.zeros(len(self.products), np.float32)
        np.maximum.at(out, self.inv, top)
        return out


def embed_all(model, pixels: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(
        [model.embed(np.stack(pixels[i : i + 32])) for i in range(0, len(pixels), 32)]
    )


def crop_centre(img: Image.Image, keep: float) -> Image.Image:
    w, h = img.size
    cw, ch = int(w * keep), int(h * keep)
    return img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


def recall(ranked: np.ndarray, truth: np.ndarray) -> dict:
    return {"r1": round(float(np.mean(ranked[:, 0] == truth)), 4),
            "r10": round(float(np.mean((ranked[:, :10] == truth[:, None]).any(1))), 4)}  # fmt: skip


class Split:
    """One split's queries: photos, vectors (plain, flipped, white-balanced) and shortlists."""

    def __init__(self, work: str, name: str, cat: Catalog, model, pre):
        folder = os.path.join(work, f"queries-{name}")
        rows = pq.read_table(os.path.join(folder, "queries.parquet")).to_pylist()
        photos = [Image.open(os.path.join(folder, r["image_uri"])).convert("RGB") for r in rows]
        self.truth = np.searchsorted(cat.products, [r["product_id"] for r in rows])
        pixels = [pre(p) for p in photos]
        self.q = embed_all(model, pixels)
        self.q_flip = embed_all(model, [p[:, ::-1].copy() for p in pixels])
        self.pixels_wb = [pre(images.balance_backdrop(p)) for p in photos]
        self.q_wb = embed_all(model, self.pixels_wb)
        self.pixels = pixels
        self.scores = cat.grouped(self.q @ cat.x.T)
        self.top = np.argsort(-self.scores, 1)[:, :SHORTLIST]

    def inliers(self, cat: Catalog, pre, cache: verify.FeatureCache, wb: bool = False):
        """(q, SHORTLIST) inliers between each query and its candidates' first photo."""
        first = {p: j for j, p in reversed(list(enumerate(cat.inv)))}
        out = np.zeros(self.top.shape, np.int32)
        with ThreadPoolExecutor(4) as pool:
            for i, cand in enumerate(self.top):
                qf = verify.local_features((self.pixels_wb if wb else self.pixels)[i])
                rows = [first[c] for c in cand]
                feats = pool.map(lambda j: cache.get_or_read(j, cat.uri[j], pre), rows)
                out[i] = [0 if f is None else verify.inliers(qf, f) for f in feats]
        return out

    def with_queries(self, cat: Catalog, q: np.ndarray) -> Split:
        """A copy whose scores and shortlists are those of other query vectors."""
        other = copy.copy(self)
        other.q, other.scores = q, cat.grouped(q @ cat.x.T)
        other.top = np.argsort(-other.scores, 1)[:, :SHORTLIST]
        return other


def reranked(split: Split, inl: np.ndarray, n: int, weight: float, cap: int, form: str):
    bonus = np.minimum(inl[:, :n], cap).astype(np.float32)
    bonus = np.sqrt(bonus) if form == "sqrt" else bonus
    head = np.take_along_axis(split.scores, split.top[:, :n], 1) + weight * bonus
    order = np.argsort(-head, 1, kind="stable")
    return np.concatenate([np.take_along_axis(split.top[:, :n], order, 1), split.top[:, n:]], 1)


def ranked(cat: Catalog, q: np.ndarray, views: list[np.ndarray], penalty=None) -> np.ndarray:
    s = np.max([cat.grouped(q @ v.T) for v in views], axis=0)
    if penalty is not None:
        s = s - penalty
    return np.argsort(-s, 1)[:, :10]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default=os.path.join(REPO, ".cache", "quality-bench"))
    p.add_argument("--catalog", default=quality.DEFAULT_CATALOG)
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "quality-levers.json"))
    a = p.parse_args(argv)
    record = storage.read_json(os.path.join(a.work, "tune-record.json"))
    model = embedders.create(weights=record.get("weights"), head=record.get("head"))
    pre = model.preprocess
    cat_table = catalog.read_catalog(a.catalog)
    pids = np.asarray(cat_table.table["product_id"].to_pylist()).astype(str)
    splits = tuning.split_products(pids, seed=0)
    for name in ("val", "test"):
        quality.query_set(cat_table, name, splits, 400, os.path.join(a.work, f"queries-{name}"))
    cat = Catalog(a.work)
    data = {name: Split(a.work, name, cat, model, pre) for name in ("val", "test")}
    cache = verify.FeatureCache(1 << 30)
    inl = {name: s.inliers(cat, pre, cache) for name, s in data.items()}
    crops = embed_all(model, [pre(crop_centre(Image.open(u).convert("RGB"), 0.8)) for u in cat.uri])
    results = {}

    def report(lever: str, setting, fn) -> None:
        results[lever] = {
            "setting": setting,
            **{n: recall(fn(s, n), s.truth) for n, s in data.items()},
        }
        print(lever, json.dumps(results[lever]), flush=True)

    report("base", None, lambda s, n: s.top)
    report("rerank_service_default", [10, verify.WEIGHT, verify.CAP, "linear"],
           lambda s, n: reranked(s, inl[n], 10, verify.WEIGHT, verify.CAP, "linear"))  # fmt: skip
    grid = [
        (n, w, c, "linear")
        for n, w, c in itertools.product((10, 20, 30), (0.0025, 0.005, 0.01, 0.02), (25, 50, 100))
    ]
    grid += [
        (n, w, c, "sqrt")
        for n, w, c in itertools.product((10, 20, 30), (0.01, 0.02, 0.04, 0.08), (50, 500))
    ]
    val_r1 = [recall(reranked(data["val"], inl["val"], *g), data["val"].truth)["r1"] for g in grid]
    best = grid[
        int(np.argmax(val_r1))
    ]  # the first of ties: the shortest shortlist, smallest weight
    report("rerank_best_on_val", list(best), lambda s, n: reranked(s, inl[n], *best))
    hub = {k: cat.hubness(k) for k in (10, 50)}
    options = [(b, k) for b in (0.1, 0.2, 0.3, 0.5) for k in (10, 50)]
    val_hub = [
        recall(ranked(cat, data["val"].q, [cat.x], b * hub[k]), data["val"].truth)["r1"]
        for b, k in options
    ]
    b, k = options[int(np.argmax(val_hub))]
    report("csls_best_on_val", [b, k], lambda s, n: ranked(cat, s.q, [cat.x], b * hub[k]))

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    report("query_flip", None, lambda s, n: ranked(cat, unit(s.q + s.q_flip), [cat.x]))
    report("catalog_crop_views", 0.8, lambda s, n: ranked(cat, s.q, [cat.x, crops]))
    report("query_white_balance", None, lambda s, n: ranked(cat, s.q_wb, [cat.x]))
    # White balance, alone and with the flip, under the service's re-rank (SIFT on the balanced
    # photo, as the service would see it).
    default = (10, verify.WEIGHT, verify.CAP, "linear")
    for lever, flip in (("query_white_balance_rerank", False), ("query_wb_flip_rerank", True)):
        variant = {
            n: s.with_queries(cat, unit(s.q_wb + s.q_flip) if flip else s.q_wb)
            for n, s in data.items()
        }
        inl_wb = {n: v.inliers(cat, pre, cache, wb=True) for n, v in variant.items()}
        fn = lambda s, n, v=variant, i=inl_wb: reranked(v[n], i[n], *default)  # noqa: E731
        report(lever, list(default), fn)
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
