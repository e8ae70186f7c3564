"""FAISS index candidates for the large-catalog index vs exact search, all ratios from one run.

    python bench/explore_index.py [--n 1000000] [--nt 200000] [--nq 1000] [--threads 2]
                                  [--configs pqfs_refine_sq6,rabitqfs4] [--reps 3]

Data: faiss.contrib.datasets.SyntheticDataset(256, nt, n, nq, metric="IP") (not normalised; the
training vectors are the dataset's separate training set). Ground truth: exact top-10 by inner
product (ds.get_groundtruth). Targets, each config and search setting against them:
  recall@10 >= 0.95   (mean |top10 & exact top10| / 10)
  q/s >= 20x exact IndexFlatIP (same threads, the same nq queries in one search call)
  bytes/vector <= 1/4 of flat (1024/4 = 256), from len(faiss.serialize_index(index)) / n with
  int64 ids added through add_with_ids (ids included).
Timing: the best of `--reps` calls (the machine may be shared); flat is timed just before and just
after each config's sweep, and that config's x flat uses the mean of the two. Build seconds =
train + add (coarse k-means included).
One line per (config, search setting); `ok` when all three targets are met.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
from faiss.contrib.datasets import SyntheticDataset

D = 256
ID_OFFSET = 10**9  # external ids != row numbers, to catch id bugs

# name -> (factory, [search settings]). "IDMap," is needed in front of a Refine: IndexRefine has
# no add_with_ids; the IVF below it then stores row numbers (8 B) and IDMap the ids (8 B).
CONFIGS: dict[str, tuple[str, list[dict]]] = {
    "pqfs_refine_sq6": (
        "IDMap,IVF4096,PQ64x4fs,Refine(SQ6)",
        [dict(nprobe=p, k_factor=k) for p in (32, 48, 64) for k in (4, 8)],
    ),
    "rabitqfs_refine_sq6": (
        "IDMap,IVF4096,RaBitQfs,Refine(SQ6)",
        [dict(nprobe=p, k_factor=4, qb=8) for p in (32, 48, 64)],
    ),
    "rabitqfs4": ("IVF4096,RaBitQfs4", [dict(nprobe=p, qb=8) for p in (32, 64)]),
    "sq8": ("IVF4096,SQ8", [dict(nprobe=p) for p in (32, 48)]),
    "sq6": ("IVF4096,SQ6", [dict(nprobe=p) for p in (32, 48)]),
}
DEFAULT = "pqfs_refine_sq6,rabitqfs_refine_sq6,rabitqfs4"


def ivf_of(index: faiss.Index) -> faiss.IndexIVF:
    # extract_index_ivf returns a plain IndexIVF proxy: downcast it to reach qb and friends
    return faiss.downcast_index(faiss.extract_index_ivf(index))


def refine_of(index: faiss.Index) -> faiss.IndexRefine | None:
    while True:
        index = faiss.downcast_index(index)
        if isinstance(index, faiss.IndexRefine):
            return index
        if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexPreTransform):
            index = index.index
        else:
            return None


def set_search(index: faiss.Index, nprobe=None, k_factor=None, qb=None, efSearch=None) -> None:
    ivf = ivf_of(index)
    if nprobe is not None:
        ivf.nprobe = nprobe
    if qb is not None:
        ivf.qb = qb  # IndexIVFRaBitQ(FastScan) only
    if efSearch is not None:  # IVFxxx_HNSW32 coarse quantizer
        faiss.downcast_index(ivf.quantizer).hnsw.efSearch = efSearch
    if k_factor is not None:
        refine_of(index).k_factor = k_factor


def recall_at_10(ids: np.ndarray, gt: np.ndarray) -> float:
    ids = np.where(ids >= ID_OFFSET, ids - ID_OFFSET, ids)
    return float(
        np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(ids, gt, strict=True)])
    )


def timed_search(index: faiss.Index, xq: np.ndarray, reps: int) -> tuple[float, np.ndarray]:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        _, ids = index.search(xq, 10)
        best = min(best, time.perf_counter() - t)
    return len(xq) / best, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--nt", type=int, default=200_000)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1338)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--configs", default=DEFAULT, help=f"comma list of {','.join(CONFIGS)}")
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)

    t = time.perf_counter()
    ds = SyntheticDataset(D, args.nt, args.n, args.nq, metric="IP", seed=args.seed)
    xb, xq, xt = ds.get_database(), ds.get_queries(), ds.get_train()
    gt = ds.get_groundtruth(10)
    print(
        f"# data n={args.n} nt={args.nt} nq={args.nq} d={D} threads={args.threads} "
        f"({time.perf_counter() - t:.0f}s incl. exact ground truth)",
        flush=True,
    )
    flat = faiss.IndexFlatIP(D)
    flat.add(xb)

    flat_bpv = len(faiss.serialize_index(flat)) / args.n
    rows, flats = [], []
    for name in args.configs.split(","):
        factory, settings = CONFIGS[name]
        index = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        index.train(xt)
        t1 = time.perf_counter()
        index.add_with_ids(xb, np.arange(args.n, dtype="int64") + ID_OFFSET)
        t2 = time.perf_counter()
        bpv = len(faiss.serialize_index(index)) / args.n
        f0 = timed_search(flat, xq, args.reps)[0]
        res = []
        for s in settings:
            set_search(index, **s)
            qps, ids = timed_search(index, xq, args.reps)
            res.append((s, recall_at_10(ids, gt), qps))
        f1 = timed_search(flat, xq, args.reps)[0]
        print(
            f"# {factory}: train {t1 - t0:.0f}s add {t2 - t1:.0f}s {bpv:.1f} bytes/vector; "
            f"flat before/after {f0:.0f}/{f1:.0f} q/s",
            flush=True,
        )
        flats += [f0, f1]
        rows += [(factory, s, rec, qps, (f0 + f1) / 2, bpv, t2 - t0) for s, rec, qps in res]
        del index

    print(
        f"{'factory':38s} {'search params':34s} {'R@10':>6s} {'q/s':>7s} {'x flat':>6s} "
        f"{'B/vec':>6s} {'build s':>7s}  targets"
    )
    fq = float(np.mean(flats)) if flats else timed_search(flat, xq, args.reps)[0]
    rows.insert(0, ("IndexFlatIP (exact)", {}, 1.0, fq, fq, flat_bpv, 0.0))
    for factory, s, rec, qps, fq, bpv, build in rows:
        ok = rec >= 0.95 and qps >= 20 * fq and bpv <= D
        params = " ".join(f"{k}={v}" for k, v in s.items())
        print(
            f"{factory:38s} {params:34s} {rec:6.3f} {qps:7.0f} {qps / fq:6.1f} "
            f"{bpv:6.1f} {build:7.0f}  {'ok' if ok else '-'}",
            flush=True,
        )


if __name__ == "__main__":
    main()
