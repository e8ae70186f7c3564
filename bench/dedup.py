"""Near-duplicate benchmark (Contract 6): threshold calibration on products-dev, and scale.

    python bench/dedup.py --calibrate [--catalog CSV] [--products 1000] [--copies 200]
        [--min-precision 0.99] [--work DIR] [--json bench/results/dedup-calibrate.json]
    python bench/dedup.py --scale [--n 1000000] [--d 1280] [--real EMBEDDINGS_URI]
        [--json bench/results/dedup-scale.json]

--calibrate: a seeded subset of the catalog plus injected copies of some of its products
(resized 0.5-0.8x, cropped up to 5% per side, re-encoded as JPEG q 50-80), embedded by
jobs/embed.run with the catalog's embedder, indexed by jobs/build_index.run and deduplicated
by jobs/dedup.run at a low threshold. Every mutual-NN edge is labelled: positive when it joins
a copy with its source, negative otherwise (two different catalog products, so a real twin in
products-dev counts against precision: the figure is conservative). Copies left ungrouped are
positives never reached. The curve gives the lowest threshold with precision >= the target;
the job is rerun there, with the curve in its report.html.

--scale: the candidate / edge / group stages of lib/visual_search/dedup.py on n vectors
(synthetic clustered unit vectors with 1% injected near-copies and 2% two-photo products,
plus the real vectors of --real), with an IVF-Flat index searched in this process by faiss's
own threads (IVF-Flat scores are exact inner products, so no re-scoring pass is needed).
Prints wall time per stage and peak RSS (psutil, sampled every 0.2 s, and ru_maxrss).
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
from visual_search import dedup, embeddings, images, storage

CATALOG = "/work/shared/data/products-dev/catalog.csv"
THRESHOLDS = np.round(np.arange(0.80, 0.996, 0.005), 3)


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


def label_edges(groups: dedup.Groups) -> tuple[list[tuple[str, str, float]], list[bool]]:
    """Each group's pair(s) to its representative, labelled copy-with-source or not."""
    edges, labels = [], []
    for members in groups.members.values():
        rep = members[0][0]
        for pid, score in members[1:]:
            a, b = sorted((rep, pid))
            edges.append((a, b, score))
            labels.append(b == f"dup-{a}" or a == f"dup-{b}")
    return edges, labels


def curve_from_groups(groups: dedup.Groups, copies: set[str]) -> tuple[list[dict], dict]:
    """PR curve over THRESHOLDS: edges scored and labelled, missed copies as unreachable."""
    edges, labels = label_edges(groups)
    found = {
        a if a.startswith("dup-") else b for (a, b, _), ok in zip(edges, labels, strict=True) if ok
    }
    missed = len(copies - found)
    scores = np.array([e[2] for e in edges] + [-np.inf] * missed)
    lab = np.array(labels + [True] * missed, bool)
    unrelated = [e for e, ok in zip(edges, labels, strict=True) if not ok]
    return dedup.pr_curve(scores, lab, THRESHOLDS), {"unrelated_edges": unrelated}


def _mixed(groups: dedup.Groups, table: pa.Table) -> list[dict]:
    """Groups that are not a copy with its source, with titles and categories to judge."""
    meta = {
        r["product_id"]: r for r in table.select(["product_id", "title", "category"]).to_pylist()
    }
    out = []
    for gid, members in groups.members.items():
        names = [m[0] for m in members]
        stems = {n.removeprefix("dup-") for n in names}
        if len(stems) > 1:
            out.append(
                {
                    "group_id": gid,
                    "members": [
                        {
                            "product_id": n,
                            "score": round(s, 4),
                            **{k: meta.get(n, {}).get(k) for k in ("title", "category")},
                        }
                        for n, s in members
                    ],
                    "same_category": len({meta.get(n, {}).get("category") for n in names}) == 1,
                }
            )
    return out


def calibrate(args) -> dict:
    work = args.work or tempfile.mkdtemp(prefix="bench-dedup-")
    t0 = time.monotonic()
    table = _subset(args.catalog, args.products, args.copies, work, args.seed)
    copies = {p for p in table["product_id"].to_pylist() if p.startswith("dup-")}
    pq.write_table(table, os.path.join(work, "catalog.parquet"))
    _say(f"{table.num_rows} photos ({len(copies)} injected copies) in {work}")
    emb, root = os.path.join(work, "emb"), os.path.join(work, "index")
    embed.run(embed.Config(catalog=os.path.join(work, "catalog.parquet"), out=emb, overwrite=True))
    t_embed = time.monotonic() - t0
    version = build_index.run(build_index.Config(embeddings=emb, index_root=root)).version
    low = dedup_job.Config(
        index_root=root,
        threshold=float(THRESHOLDS[0]),
        full=True,
        out=os.path.join(work, "dedup-low"),
    )
    dedup_job.run(low)
    groups = dedup.load_groups(low.out)
    present = set(groups.group_of) | set(
        storage.read_parquet(os.path.join(low.out, "items.parquet"))["product_id"].to_pylist()
    )
    copies = {c for c in copies if c in present and c.removeprefix("dup-") in present}
    curve, extra = curve_from_groups(groups, copies)
    chosen = dedup.choose_threshold(curve, args.min_precision)
    final = dedup_job.Config(index_root=root, threshold=chosen["threshold"], full=True)
    summary = dedup_job.run(final, curve=curve)
    final_groups = dedup.load_groups(dedup.output_root(root, version))
    mixed = _mixed(final_groups, table)
    result = {
        "catalog": args.catalog,
        "photos": table.num_rows,
        "copies_embedded_with_source": len(copies),
        "min_precision": args.min_precision,
        "chosen": chosen,
        "injected_copy_recall": chosen["recall"],
        "pair_precision": chosen["precision"],
        "groups_at_chosen": summary["groups"],
        "groups_not_copy_with_source": mixed,
        "unrelated_cross_category_groups": sum(not g["same_category"] for g in mixed),
        "low_threshold_unrelated_edges": len(extra["unrelated_edges"]),
        "curve": curve,
        "report": os.path.join(dedup.output_root(root, version), "report.html"),
        "embed_s": round(t_embed, 1),
        "total_s": round(time.monotonic() - t0, 1),
        "dedup_timings": summary["timings"],
    }
    _print_calibration(result)
    return result


def _print_calibration(r: dict) -> None:
    for p in r["curve"]:
        _say(
            f"t={p['threshold']:.3f} precision={p['precision']:.4f} recall={p['recall']:.4f} "
            f"tp={p['tp']} fp={p['fp']}"
        )
    c = r["chosen"]
    _say(
        f"chosen threshold {c['threshold']} (lowest with precision >= {r['min_precision']}): "
        f"precision {c['precision']:.4f}, injected-copy recall {c['recall']:.4f} "
        f"({c['tp']} of {r['copies_embedded_with_source']}), groups {r['groups_at_chosen']}"
    )
    _say(
        f"groups that are not a copy with its source: {len(r['groups_not_copy_with_source'])} "
        f"({r['unrelated_cross_category_groups']} across categories)"
    )
    for g in r["groups_not_copy_with_source"][:20]:
        _say(
            "  "
            + " | ".join(f"{m['product_id']} {m['title']} ({m['category']})" for m in g["members"])
        )


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


def synthetic(n: int, d: int, real: np.ndarray | None, seed: int = 0):
    """(vectors (n, d) unit float32, product code per row, {copy row: source row})."""
    rng = np.random.default_rng(seed)
    n_real = 0 if real is None else len(real)
    n_syn = n - n_real
    n_copy = n_syn // 100
    base = n_syn - n_copy
    centres = rng.standard_normal((1000, d), dtype=np.float32)
    x = np.empty((n, d), np.float32)
    for a in range(0, base, 100_000):  # chunks: bounded temporaries
        b = min(base, a + 100_000)
        x[a:b] = centres[rng.integers(0, 1000, b - a)]
        x[a:b] += 1.5 * rng.standard_normal((b - a, d), dtype=np.float32)
    src = rng.choice(base, n_copy, replace=False)
    x[base:n_syn] = x[src] + 0.12 * rng.standard_normal((n_copy, d), dtype=np.float32)
    if n_real:
        x[n_syn:] = real
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    codes = np.arange(n, dtype=np.int64)
    two = rng.choice(base - 1, base // 50, replace=False)  # 2% two-photo products
    two = two[~np.isin(two + 1, src) & ~np.isin(two, src)]
    codes[two + 1] = codes[two]
    _, codes = np.unique(codes, return_inverse=True)
    return x, codes, dict(zip(range(base, n_syn), src.tolist(), strict=True))


def scale(args) -> dict:
    import faiss

    real = None
    if args.real:
        ds = embeddings.open_dataset(args.real)
        real = np.concatenate([ds.vectors(storage.read_parquet(p.uri)) for p in ds.parts])
    timings = {}
    with PeakRSS() as mem:
        t = time.monotonic()
        x, codes, copy_of = synthetic(args.n, args.d if real is None else real.shape[1], real)
        timings["generate_s"] = time.monotonic() - t
        n, d = x.shape
        nlist = args.nlist or int(4 * np.sqrt(n))
        t = time.monotonic()
        ivf = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        train = x[np.random.default_rng(1).choice(n, min(n, 40 * nlist), replace=False)]
        ivf.train(train)
        ivf.add(x)
        ivf.nprobe = args.nprobe
        timings["index_s"] = time.monotonic() - t
        t = time.monotonic()
        cand = np.empty((n, args.k), np.int64)
        scores = np.empty((n, args.k), np.float32)
        for a in range(0, n, 20_000):
            s, i = ivf.search(x[a : a + 20_000], args.k + 1)
            i = np.where(i == np.arange(a, a + len(i))[:, None], -1, i)
            order = np.argsort(i < 0, axis=1, kind="stable")[:, : args.k]  # drop self
            cand[a : a + len(i)] = np.take_along_axis(i, order, 1)
            scores[a : a + len(i)] = np.take_along_axis(s, order, 1)
        scores[cand < 0] = -np.inf
        timings["candidates_s"] = time.monotonic() - t
        t = time.monotonic()
        pa_, pb, ps = dedup.product_pairs(np.arange(n), cand, scores, codes)
        edges = dedup.mutual_edges(pa_, pb, ps, args.threshold)
        names = [f"p{c:08d}" for c in range(int(codes.max()) + 1)]
        groups = dedup.groups_from_edges(edges, names)
        timings["edges_groups_s"] = time.monotonic() - t
    grouped = {frozenset(g["members"]) for g in groups}
    hit = sum(frozenset((names[codes[c]], names[codes[s]])) in grouped for c, s in copy_of.items())
    result = {
        "n": n,
        "d": d,
        "real_vectors": 0 if real is None else len(real),
        "nlist": nlist,
        "nprobe": args.nprobe,
        "k": args.k,
        "threshold": args.threshold,
        "faiss_threads": faiss.omp_get_max_threads(),
        "pairs": len(pa_),
        "edges": len(edges),
        "groups": len(groups),
        "injected_copies": len(copy_of),
        "injected_copy_recall": hit / max(len(copy_of), 1),
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
