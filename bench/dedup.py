"""Near-duplicate benchmark (Contract 6): threshold calibration on products-dev, and scale.

    python bench/dedup.py --calibrate [--catalog CSV] [--products 1000] [--copies 200]
        [--min-precision 0.99] [--work DIR] [--json bench/results/dedup-calibrate.json]
    python bench/dedup.py --scale [--n 1000000] [--d 1280] [--real EMBEDDINGS_URI]
        [--json bench/results/dedup-scale.json]

--calibrate: a seeded subset of the catalog plus injected copies of some of its products
(resized 0.5-0.8x, cropped up to 5% per side, re-encoded as JPEG q 50-80), embedded by
jobs/embed.run with the catalog's embedder (skipped when --work holds that embedding already),
indexed by jobs/build_index.run and deduplicated by jobs/dedup.run with a low copy threshold,
which verifies every candidate pair above the embedding threshold. The job's own grouping
(jobs/dedup.group_pairs) is then redone on those scores at each threshold: precision over
every two members of a group (right when a copy with its source, so a real twin in
products-dev counts against it unless listed in SAME_PHOTO: precision_judged), recall = the
injected copies grouped with their source. The same curve on cosine alone is kept for
comparison. The lowest threshold with precision >= the target (there and above) is chosen; the
job is rerun there (reusing the scores), with the curve in its report.html. The best-scoring
pairs that are not copies are printed, to be judged by eye.

--scale: the candidate / verification / group stages of jobs/dedup.py on n vectors (synthetic
clustered unit vectors with 1% injected near-copies and 2% two-photo products, plus the real
vectors of --real, e.g. a calibration run's emb/ with its photos), with an IVF-Flat index
searched in this process by faiss's own threads (IVF-Flat scores are exact inner products, so
no re-scoring pass is needed). Only pairs above the embedding threshold are verified: the real
ones from their photos (timed), the synthetic ones (no photo) from the generator's truth, their
count times the measured cost per pair giving the projected verification time. Prints wall
time per stage and peak RSS (psutil, sampled every 0.2 s, and ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from PIL import Image

from jobs import build_index, embed, make_queries
from jobs import dedup as dedup_job
from visual_search import dedup, dedup_verify, embedders, embeddings, images, storage

CATALOG = "/work/shared/data/products-dev/catalog.csv"
THRESHOLDS = np.round(np.arange(0.80, 0.996, 0.005), 3)  # cosine
COPY_THRESHOLDS = np.round(np.arange(0.90, 0.996, 0.0025), 4)
# Pairs of products-dev ids that are one photo, judged by eye among the top false pairs of a
# calibration run (bench/dedup.py prints them); precision_judged counts them as right.
SAME_PHOTO: list[tuple[str, str]] = []


def _say(msg: str) -> None:
    print(f"[bench-dedup] {msg}", flush=True)


# --------------------------------------------------------------------------- calibration


def make_copy(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, dict]:
    """A re-listed copy: resized 0.5-0.8x, cropped up to 5% per side, JPEG q 50-80."""
    f = float(rng.uniform(0.5, 0.8))
    img = img.resize(
        (max(32, round(img.width * f)), max(32, round(img.height * f))),
        Image.Resampling.BILINEAR,
    )
    w, h = img.size
    left, top, right, bottom = (rng.uniform(0, 0.05, 4) * [w, h, w, h]).astype(int).tolist()
    img = img.crop((left, top, w - right, h - bottom))
    q = int(rng.integers(50, 81))
    return make_queries.encode_jpeg(img, q), {"scale": round(f, 3), "quality": q}


def _subset(csv: str, products: int, copies: int, work: str, seed: int) -> pa.Table:
    table = pcsv.read_csv(csv, convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
    table = table.cast(pa.schema([(f.name, pa.string()) for f in table.schema]))
    base = os.path.dirname(os.path.abspath(csv))
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(table.num_rows, min(products, table.num_rows), replace=False))
    rows = table.take(pa.array(pick)).to_pylist()
    for r in rows:
        r["image_uri"] = os.path.join(base, r["image_uri"])
    os.makedirs(os.path.join(work, "copies"), exist_ok=True)
    made = []
    for j in rng.choice(len(rows), min(copies, len(rows)), replace=False).tolist():
        src = rows[j]
        try:
            img = images.to_rgb(images.decode(storage.read_bytes(src["image_uri"])))
        except (OSError, ValueError) as exc:
            _say(f"skip source {src['product_id']}: {exc}")
            continue
        data, _ = make_copy(img, np.random.default_rng([seed, j]))
        path = os.path.join(work, "copies", f"dup-{src['product_id']}.jpg")
        with open(path, "wb") as f:
            f.write(data)
        made.append({**src, "product_id": f"dup-{src['product_id']}", "image_uri": path})
    return pa.Table.from_pylist(rows + made)


def is_copy_pair(a: str, b: str) -> bool:
    return b == f"dup-{a}" or a == f"dup-{b}"


def load_pairs(out: str) -> tuple[dict, list[str]]:
    """A dedup output's scored pairs as jobs/dedup.group_pairs takes them, and the names."""
    names = sorted(set(storage.read_parquet(os.path.join(out, "items.parquet"))["product_id"]
                       .to_pylist()))  # fmt: skip
    code = {n: i for i, n in enumerate(names)}
    t = storage.read_parquet(os.path.join(out, "pairs.parquet"))
    pairs = {
        "a": np.array([code[p] for p in t["product_a"].to_pylist()], np.int64),
        "b": np.array([code[p] for p in t["product_b"].to_pylist()], np.int64),
        "score": t["score"].to_numpy(),
        "copy": t["copy_score"].to_numpy(),
    }
    return pairs, names


def group_metrics(groups: list[dict], copies: set[str], same: set[frozenset]) -> dict:
    """Pair precision over every two members of a group (copy with its source = right), and
    recall = injected copies grouped with their source; `same`: product pairs judged one
    photo by eye, counted right in precision_judged."""
    tp = fp = judged = 0
    found = set()
    for g in groups:
        members = sorted(g["members"])
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                if is_copy_pair(a, b):
                    tp += 1
                    found.add(a if a.startswith("dup-") else b)
                else:
                    fp += 1
                    judged += frozenset((a.removeprefix("dup-"), b.removeprefix("dup-"))) in same
    n = tp + fp
    return {
        "precision": tp / n if n else 1.0,
        "precision_judged": (tp + judged) / n if n else 1.0,
        "recall": len(found & copies) / max(len(copies), 1),
        "tp": tp,
        "fp": fp,
        "groups": len(groups),
    }


def group_curve(pairs, names, copies, key, thresholds, mutual_k, same=frozenset()) -> list[dict]:
    """group_metrics of jobs/dedup's grouping at each threshold, on the pairs' `key` score
    ("copy": the verified copy score; "score": cosine alone, for comparison)."""
    scored = {**pairs, "copy": pairs[key]}
    curve = []
    for t in thresholds.tolist():
        _, groups = dedup_job.group_pairs(scored, names, t, mutual_k)
        curve.append({"threshold": round(t, 4), **group_metrics(groups, copies, set(same))})
    return curve


def top_false_pairs(pairs, names, meta: dict, n: int = 12) -> list[dict]:
    """The best-scoring verified pairs that are not a copy with its source, to judge by eye."""
    wrong = [
        j
        for j in np.argsort(-np.nan_to_num(pairs["copy"], nan=-1.0)).tolist()[: 50 * n]
        if not is_copy_pair(names[pairs["a"][j]], names[pairs["b"][j]])
    ][:n]
    return [
        {
            "pair": [names[pairs["a"][j]], names[pairs["b"][j]]],
            "copy_score": round(float(pairs["copy"][j]), 4),
            "cosine": round(float(pairs["score"][j]), 4),
            "titles": [meta.get(names[pairs[c][j]].removeprefix("dup-")) for c in ("a", "b")],
        }
        for j in wrong
    ]


def calibrate(args) -> dict:
    work = args.work or tempfile.mkdtemp(prefix="bench-dedup-")
    t0 = time.monotonic()
    table = _subset(args.catalog, args.products, args.copies, work, args.seed)
    pq.write_table(table, os.path.join(work, "catalog.parquet"))
    emb, root = os.path.join(work, "emb"), os.path.join(work, "index")
    if not os.path.exists(os.path.join(emb, "manifest.json")):
        catalog = os.path.join(work, "catalog.parquet")
        embed.run(embed.Config(catalog=catalog, out=emb, overwrite=True))
    t_embed = time.monotonic() - t0
    version = build_index.run(build_index.Config(embeddings=emb, index_root=root)).version
    low = dedup_job.Config(index_root=root, threshold=0.9, full=True, out=f"{work}/dedup-low")
    low_summary = dedup_job.run(low)
    pairs, names = load_pairs(low.out)
    present = set(names)
    copies = {p for p in present if p.startswith("dup-") and p.removeprefix("dup-") in present}
    _say(f"{len(names)} products ({len(copies)} injected copies embedded with their source)")
    found = {
        names[x] if names[x].startswith("dup-") else names[y]
        for x, y, s in zip(pairs["a"], pairs["b"], pairs["score"], strict=True)
        if s >= low.embedding_threshold and is_copy_pair(names[x], names[y])
    }
    mk, same = low.mutual_k, {frozenset(p) for p in SAME_PHOTO}
    curve = group_curve(pairs, names, copies, "copy", COPY_THRESHOLDS, mk, same)
    cosine = group_curve(pairs, names, copies, "score", THRESHOLDS, mk)
    chosen = dedup.choose_threshold(curve, args.min_precision)
    final = dedup_job.Config(index_root=root, threshold=chosen["threshold"], since=low.out)
    summary = dedup_job.run(final, curve=curve)
    meta = dict(zip(table["product_id"].to_pylist(), table["title"].to_pylist(), strict=True))
    result = {
        "catalog": args.catalog,
        "photos": table.num_rows,
        "copies_embedded_with_source": len(copies),
        "min_precision": args.min_precision,
        "embedding_threshold": low.embedding_threshold,
        "candidate_recall": len(found & copies) / max(len(copies), 1),
        "pairs": low_summary["pairs"],
        "verified_pairs": low_summary["verified_pairs"],
        "mutual_k": mk,
        "chosen": chosen,
        "at_default": next(
            (p for p in curve if abs(p["threshold"] - dedup_job.DEFAULT_THRESHOLD) < 1e-9), None
        ),
        "cosine_only_best": _best(cosine, args.min_precision),
        "groups_at_chosen": summary["groups"],
        "top_false_pairs": top_false_pairs(pairs, names, meta),
        "same_photo_by_eye": sorted(sorted(p) for p in same),
        "curve": curve,
        "cosine_curve": cosine,
        "report": os.path.join(dedup.output_root(root, version), "report.html"),
        "embed_s": round(t_embed, 1),
        "total_s": round(time.monotonic() - t0, 1),
        "dedup_timings": low_summary["timings"],
    }
    _print_calibration(result)
    return result


def _best(curve: list[dict], min_precision: float) -> dict:
    """The highest-recall point of a curve with precision >= min_precision (else the most
    precise one)."""
    ok = [p for p in curve if p["precision"] >= min_precision]
    return max(ok, key=lambda p: p["recall"]) if ok else max(curve, key=lambda p: p["precision"])


def _print_calibration(r: dict) -> None:
    for p in r["curve"]:
        _say(
            f"copy t={p['threshold']:.4f} precision={p['precision']:.4f} "
            f"(judged {p['precision_judged']:.4f}) recall={p['recall']:.4f} "
            f"tp={p['tp']} fp={p['fp']}"
        )
    c, b = r["chosen"], r["cosine_only_best"]
    _say(
        f"candidates: {r['pairs']} pairs, {r['verified_pairs']} verified (cosine >= "
        f"{r['embedding_threshold']}), candidate recall {r['candidate_recall']:.4f}"
    )
    _say(
        f"chosen copy threshold {c['threshold']} (lowest with precision >= {r['min_precision']}"
        f" there and above): precision {c['precision']:.4f} (judged by eye "
        f"{c['precision_judged']:.4f}), injected copies grouped with their source "
        f"{c['recall']:.4f} of {r['copies_embedded_with_source']}, groups {r['groups_at_chosen']}"
    )
    if r["at_default"]:
        d = r["at_default"]
        _say(
            f"at the job's default {d['threshold']}: precision {d['precision']:.4f}, "
            f"recall {d['recall']:.4f}"
        )
    _say(
        f"cosine alone, same grouping: best recall at precision >= {r['min_precision']}: "
        f"t={b['threshold']} precision {b['precision']:.4f} recall {b['recall']:.4f}"
    )
    for f in r["top_false_pairs"]:
        _say(f"  not a copy: {f['pair']} copy {f['copy_score']} cosine {f['cosine']} {f['titles']}")


# ---------------------------------------------------------------------------------- scale


class PeakRSS:
    """Peak resident memory of this process, sampled by a thread (psutil)."""

    def __init__(self, every_s: float = 0.2) -> None:
        import psutil

        self.proc, self.every_s, self.peak = psutil.Process(), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic(n: int, d: int, real: np.ndarray | None, seed: int = 0, chunk: int = 100_000):
    """(vectors (n, d) unit, stored float16 to halve the footprint (the index gets them as
    float32), product code per row, {copy row: source row}). Rows: clustered vectors, then 1%
    near-copies of some of them, then the real ones."""
    rng = np.random.default_rng(seed)
    n_real = 0 if real is None else len(real)
    n_syn = n - n_real
    n_copy = n_syn // 100
    base = n_syn - n_copy
    centres = rng.standard_normal((1000, d), dtype=np.float32)
    x = np.empty((n, d), np.float16)
    for a in range(0, base, chunk):  # chunks: bounded temporaries
        b = min(base, a + chunk)
        v = centres[rng.integers(0, 1000, b - a)]
        x[a:b] = _unit_rows(v + 1.5 * rng.standard_normal((b - a, d), dtype=np.float32))
    src = rng.choice(base, n_copy, replace=False)
    noise = 0.12 / np.sqrt(3.25 * d)  # 0.12 at the scale of the unnormalised base vectors
    for a in range(0, n_copy, chunk):
        s = src[a : a + chunk]
        v = x[s].astype(np.float32) + noise * rng.standard_normal((len(s), d), dtype=np.float32)
        x[base + a : base + a + len(s)] = _unit_rows(v)
    if n_real:
        x[n_syn:] = _unit_rows(real)
    codes = np.arange(n, dtype=np.int64)
    two = rng.choice(base - 1, base // 50, replace=False)  # 2% two-photo products
    two = two[~np.isin(two + 1, src) & ~np.isin(two, src)]
    codes[two + 1] = codes[two]
    _, codes = np.unique(codes, return_inverse=True)
    return x, codes, dict(zip(range(base, n_syn), src.tolist(), strict=True))


def _real(uri: str | None):
    """(vectors, product ids, image uris, preprocess) of an embeddings dataset, or Nones."""
    if not uri:
        return None, None, None, None
    ds = embeddings.open_dataset(uri)
    tables = [storage.read_parquet(p.uri) for p in ds.parts]
    x = np.concatenate([ds.vectors(t) for t in tables])
    col = {c: np.concatenate([t[c].to_numpy(zero_copy_only=False) for t in tables])
           for c in ("product_id", "image_uri")}  # fmt: skip
    model = ds.manifest.model
    pre = embedders.preprocess_for(model["model_id"], model.get("preprocess", {}).get("mode"))
    return x, col["product_id"], col["image_uri"], pre


def _search(x: np.ndarray, args, timings: dict):
    """IVF-Flat k-NN of every row against all (self dropped): (candidates, exact scores)."""
    import faiss

    n, d = x.shape
    nlist = args.nlist or int(4 * np.sqrt(n))
    t = time.monotonic()
    ivf = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    sample = np.sort(np.random.default_rng(1).choice(n, min(n, 40 * nlist), replace=False))
    ivf.train(x[sample].astype(np.float32))
    for a in range(0, n, 100_000):
        ivf.add(x[a : a + 100_000].astype(np.float32))
    ivf.nprobe = args.nprobe
    timings["index_s"] = time.monotonic() - t
    t = time.monotonic()
    cand = np.empty((n, args.k), np.int64)
    scores = np.empty((n, args.k), np.float32)
    for a in range(0, n, 20_000):
        s, i = ivf.search(x[a : a + 20_000].astype(np.float32), args.k + 1)
        i = np.where(i == np.arange(a, a + len(i))[:, None], -1, i)
        order = np.argsort(i < 0, axis=1, kind="stable")[:, : args.k]  # drop self
        cand[a : a + len(i)] = np.take_along_axis(i, order, 1)
        scores[a : a + len(i)] = np.take_along_axis(s, order, 1)
    scores[cand < 0] = -np.inf
    timings["candidates_s"] = time.monotonic() - t
    return cand, scores, nlist


def _copy_scores(pairs: dict, n_syn: int, src_of: np.ndarray, uris, pre, timings: dict) -> dict:
    """Copy scores of the pairs above the embedding threshold: verified from the photos when
    both are real; synthetic vectors have no photo, so theirs come from the generator's truth
    (1 for an injected copy with its source, else 0) and their cost is counted, not paid."""
    ia, ib, above = pairs["ia"], pairs["ib"], pairs["above"]
    real = above & (ia >= n_syn) & (ib >= n_syn)
    syn = above & (ia < n_syn) & (ib < n_syn)
    pairs["copy"] = np.full(len(ia), np.nan, np.float32)
    truth = (src_of[np.minimum(ia, n_syn - 1)] == ib) | (src_of[np.minimum(ib, n_syn - 1)] == ia)
    pairs["copy"][syn] = truth[syn].astype(np.float32)
    pairs["copy"][above & ~real & ~syn] = 0.0  # a synthetic vector with a real photo
    t = time.monotonic()
    if real.any():
        todo = np.flatnonzero(real)
        photo_pairs = list(zip(uris[ia[todo] - n_syn], uris[ib[todo] - n_syn], strict=True))
        pairs["copy"][todo] = dedup_verify.score_uri_pairs(photo_pairs, pre)
    timings["verify_real_s"] = time.monotonic() - t
    n_real = len(uris) if uris is not None else 0
    per_pair = timings["verify_real_s"] / int(real.sum()) if real.any() else None
    density = int(real.sum()) / n_real if n_real else None  # real pairs to verify per photo
    n = n_syn + n_real
    return {
        "pairs_above_embedding_threshold": int(above.sum()),
        "verified_real_pairs": int(real.sum()),
        "synthetic_pairs_scored_by_truth": int(syn.sum()),
        "verify_s_per_pair": None if per_pair is None else round(per_pair, 4),
        "projected_verify_s_these_pairs_one_core": (
            None if per_pair is None else round(per_pair * int(above.sum()), 1)
        ),
        "real_pairs_per_photo": None if density is None else round(density, 3),
        "projected_verify_s_all_n_at_real_density_one_core": (
            None if per_pair is None else round(per_pair * density * n, 1)
        ),
    }


def scale(args) -> dict:
    import faiss

    real, real_pids, uris, pre = _real(args.real)
    timings: dict[str, float] = {}
    with PeakRSS() as mem:
        t = time.monotonic()
        x, codes, copy_of = synthetic(args.n, args.d if real is None else real.shape[1], real)
        timings["generate_s"] = time.monotonic() - t
        n, d = x.shape
        n_syn = n - (0 if real is None else len(real))
        cand, scores, nlist = _search(x, args, timings)
        del x
        t = time.monotonic()
        a, b, s, ia, ib = dedup.product_pairs(np.arange(n), cand, scores, codes)
        del cand, scores
        pairs = {"a": a, "b": b, "score": s, "ia": ia, "ib": ib}
        pairs["above"] = s >= args.embedding_threshold
        timings["pairs_s"] = time.monotonic() - t
        src_of = np.full(max(n_syn, 1), -1, np.int64)
        src_of[list(copy_of)] = list(copy_of.values())
        verify = _copy_scores(pairs, n_syn, src_of, uris, pre, timings)
        t = time.monotonic()
        names = [f"s{c:08d}" for c in range(int(codes.max()) + 1)]
        for row in range(n_syn, n):
            names[codes[row]] = str(real_pids[row - n_syn])
        edges, groups = dedup_job.group_pairs(pairs, names, args.threshold, args.mutual_k)
        timings["edges_groups_s"] = time.monotonic() - t
    group_of = {p: g["group_id"] for g in groups for p in g["members"]}
    hit = sum(
        group_of.get(names[codes[c]], -1) == group_of.get(names[codes[s]], -2)
        for c, s in copy_of.items()
    )
    real_copies = [p for p in names if p.startswith("dup-") and p.removeprefix("dup-") in names]
    real_hit = sum(group_of.get(p, -1) == group_of.get(p.removeprefix("dup-"), -2)
                   for p in real_copies)  # fmt: skip
    result = {
        "n": n,
        "d": d,
        "real_vectors": 0 if real is None else len(real),
        "nlist": nlist,
        "nprobe": args.nprobe,
        "k": args.k,
        "mutual_k": args.mutual_k,
        "threshold": args.threshold,
        "embedding_threshold": args.embedding_threshold,
        "faiss_threads": faiss.omp_get_max_threads(),
        "pairs": len(a),
        **verify,
        "edges": len(edges),
        "groups": len(groups),
        "largest_group": max((len(g["members"]) for g in groups), default=0),
        "injected_copies": len(copy_of),
        "injected_copy_recall": hit / max(len(copy_of), 1),
        "real_copies": len(real_copies),
        "real_copy_recall": real_hit / max(len(real_copies), 1),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "wall_s": round(sum(timings.values()), 1),
        "peak_rss_gib": round(mem.peak / 2**30, 2),
        "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    _say(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--calibrate", action="store_true")
    p.add_argument("--scale", action="store_true")
    p.add_argument("--catalog", default=CATALOG)
    p.add_argument("--products", type=int, default=1000)
    p.add_argument("--copies", type=int, default=200)
    p.add_argument("--min-precision", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="calibration work folder (default: a new temp folder)")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=1280)
    p.add_argument("--real", help="embeddings dataset whose vectors join the synthetic ones")
    p.add_argument("--nlist", type=int, default=0)
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threshold", type=float, default=dedup_job.DEFAULT_THRESHOLD)
    p.add_argument(
        "--embedding-threshold", type=float, default=dedup_job.DEFAULT_EMBEDDING_THRESHOLD
    )
    p.add_argument("--mutual-k", type=int, default=dedup_job.Config.mutual_k)
    p.add_argument("--json", help="result file (default: bench/results/dedup-{mode}.json)")
    args = p.parse_args(argv)
    if args.calibrate == args.scale:
        p.error("give exactly one of --calibrate / --scale")
    mode = "calibrate" if args.calibrate else "scale"
    result = calibrate(args) if args.calibrate else scale(args)
    out = args.json or os.path.join(os.path.dirname(__file__), "results", f"dedup-{mode}.json")
    storage.write_json(out, result)
    _say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
