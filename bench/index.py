"""Index benchmark: our sharded build vs exact flat search vs autofaiss, all ratios from one run.

    python bench/index.py [--sizes 100000,1000000] [--budget 280000000] [--shards 2] [--threads 2]
                          [--real DATASET_URI] [--autofaiss] [--json bench/results/index.json]

Synthetic: faiss.contrib.datasets.SyntheticDataset(256, nt, n, 1000, metric="IP"), written as a
Contract 2 embeddings dataset and built by jobs/build_index.run (the same code platform
engineers run), with the given memory budget. Measured on the dataset's own held-out queries
against its exact ground truth: recall@10 of the sharded search (all shards searched in this
process, then merge_topk), queries/s against exact IndexFlatIP with the same threads and the
same 1,000 batched queries, bytes per vector (shard files) against flat's 4*d, build time and
peak memory (PSS of this process tree: driver, Ray daemons and workers). --autofaiss builds
the peer index on the same vectors, budget and threads in its own venv (bench/autofaiss_peer.py).
--real: an embeddings dataset from bench/embed.py (dataset vectors as queries, own id excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import faiss
import numpy as np
import psutil
import pyarrow as pa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jobs import build_index  # noqa: E402
from visual_search import embeddings, index, schema, storage, versions  # noqa: E402
from visual_search.manifest import EmbeddingsManifest, FileRecord  # noqa: E402
from visual_search.search import merge_topk  # noqa: E402

D = 256
K = 10
PEER_VENV = os.path.join(REPO, ".cache", "autofaiss-venv")


class PeakMemory:
    """Samples the PSS of this process and all its descendants (Ray daemons, workers)."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.peak = every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += p.memory_full_info().pss
            self.peak = max(self.peak, total)
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_dataset(root: str, vectors: np.ndarray, part_rows: int = 100_000) -> None:
    """vectors -> a Contract 2 embeddings dataset (product ids p0000000...)."""
    records = []
    for p, lo in enumerate(range(0, len(vectors), part_rows)):
        chunk = vectors[lo : lo + part_rows]
        ids = [f"p{i:07d}" for i in range(lo, lo + len(chunk))]
        table = pa.table(
            {
                "product_id": ids,
                "image_uri": [f"synthetic://{i}" for i in ids],
                "embedding": schema.embedding_array(chunk),
            }
        )
        name = f"embeddings/part-{p:05d}.parquet"
        storage.write_parquet(storage.join(root, name), table)
        records.append(FileRecord(name, len(chunk)))
    EmbeddingsManifest(
        model={"model_id": "synthetic", "weights": "none", "dim": vectors.shape[1]},
        catalog={"uri": "synthetic", "kind": "table", "fingerprint": "none", "rows": len(vectors)},
        counts={"input": len(vectors), "embedded": len(vectors), "errors": 0},
        partition_size=part_rows,
        embeddings=records,
        errors=[],
        timings={},
    ).write(root)


def sharded_search(root: str, queries: np.ndarray, k: int, reps: int = 3):
    """Search every shard of the CURRENT version and merge; best-of-reps queries/s."""
    version = versions.open_version(root)
    shards = [version.load_shard(i) for i in range(len(version.manifest.shards))]
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        parts = [s.search(queries, k) for s in shards]
        out = merge_topk(parts, k, version.manifest.metric)
        best = min(best, time.perf_counter() - t)
    return len(queries) / best, out[1], version.manifest


def flat_search(xb: np.ndarray, queries: np.ndarray, k: int, reps: int = 3) -> float:
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        flat.search(queries, k)
        best = min(best, time.perf_counter() - t)
    return len(queries) / best


def recall(found: np.ndarray, truth: np.ndarray, exclude=None) -> float:
    return index.recall_at_k(found, truth, K, exclude=exclude)


def run_peer(xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, budget: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        emb = os.path.join(tmp, "emb")
        os.makedirs(emb)
        np.save(os.path.join(emb, "part-0.npy"), xb)
        np.save(os.path.join(tmp, "q.npy"), xq)
        np.save(os.path.join(tmp, "gt.npy"), gt.astype(np.int64))
        out = os.path.join(tmp, "peer.json")
        peer = os.path.join(REPO, "bench", "autofaiss_peer.py")
        subprocess.run([sys.executable, peer, "--setup", PEER_VENV], check=True)
        cmd = [os.path.join(PEER_VENV, "bin", "python"), peer, "--run", "--embeddings", emb]
        cmd += ["--queries", os.path.join(tmp, "q.npy"), "--gt", os.path.join(tmp, "gt.npy")]
        cmd += ["--k", str(K), "--max-memory", f"{budget // 1_000_000}MB"]
        cmd += ["--threads", str(threads), "--out", out, "--metric", "ip"]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def bench_synthetic(n: int, args, work: str, with_peer: bool) -> dict:
    from faiss.contrib.datasets import SyntheticDataset

    ds = SyntheticDataset(D, min(200_000, n), n, 1000, metric="IP", seed=1338)
    xb, xq, gt = ds.get_database(), ds.get_queries(), ds.get_groundtruth(K)
    data = os.path.join(work, f"synthetic-{n}")
    write_dataset(data, xb)
    root = os.path.join(work, f"index-{n}")
    cfg = build_index.Config(
        embeddings=data,
        index_root=root,
        shards=args.shards,
        memory_budget=args.budget,
        factory=args.factory,
        target_recall=args.target_recall,
    )
    t = time.perf_counter()
    with PeakMemory() as mem:
        manifest = build_index.run(cfg)
    build_s = time.perf_counter() - t
    faiss.omp_set_num_threads(args.threads)
    qps, found, _ = sharded_search(root, xq, K)
    flat_qps = flat_search(xb, xq, K)
    out = {
        "n": n,
        "d": D,
        "factory": manifest.factory,
        "search_params": manifest.search_params,
        "shards": args.shards,
        "recall_at_10": round(recall(found, gt), 4),
        "recall_at_10_build_check": manifest.recall["recall_at_10"],
        "queries_per_s": round(qps, 1),
        "flat_queries_per_s": round(flat_qps, 1),
        "x_flat": round(qps / flat_qps, 2),
        "bytes_per_vector": round(manifest.timings["bytes"] / n, 1),
        "flat_bytes_per_vector": 4 * D,
        "bytes_vs_flat": round(manifest.timings["bytes"] / n / (4 * D), 3),
        "build_s": round(build_s, 1),
        "build_peak_pss_mib": round(mem.peak / 2**20),
    }
    if with_peer:
        peer = run_peer(xb, xq, gt, args.budget, args.threads)
        peer["x_flat"] = round(peer["queries_per_s"] / flat_qps, 2)
        out["autofaiss"] = peer
    return out


def bench_real(uri: str, args, work: str) -> dict:
    ds = embeddings.open_dataset(uri)
    root = os.path.join(work, "index-real")
    cfg = build_index.Config(
        embeddings=uri, index_root=root, shards=args.shards, memory_budget=args.budget
    )
    t = time.perf_counter()
    manifest = build_index.run(cfg)
    build_s = time.perf_counter() - t
    table = ds.read_range(0, ds.count, columns=["embedding"])
    xb = ds.vectors(table)
    rng = np.random.default_rng(0)
    qids = np.sort(rng.choice(ds.count, size=min(500, ds.count), replace=False))
    xq = xb[qids]
    faiss.omp_set_num_threads(args.threads)
    qps, found, _ = sharded_search(root, xq, K + 1)
    truth = index.exact_topk(xb, np.arange(ds.count), xq, K + 1, "ip")[1]
    flat_qps = flat_search(xb, xq, K + 1)
    return {
        "n": ds.count,
        "d": ds.dim,
        "factory": manifest.factory,
        "search_params": manifest.search_params,
        "recall_at_10": round(recall(found, truth, exclude=qids), 4),
        "queries_per_s": round(qps, 1),
        "x_flat": round(qps / flat_qps, 2),
        "bytes_vs_flat": round(manifest.timings["bytes"] / ds.count / (4 * ds.dim), 3),
        "build_s": round(build_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--budget", type=int, default=280_000_000, help="memory budget, bytes")
    p.add_argument("--factory", default="auto")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--real", help="embeddings dataset URI (e.g. from bench/embed.py)")
    p.add_argument("--autofaiss", action="store_true", help="also build the autofaiss peer")
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "index.json"))
    args = p.parse_args(argv)
    import ray

    ray.init(num_cpus=args.threads)
    results: dict = {"budget_bytes": args.budget, "threads": args.threads, "synthetic": {}}
    sizes = [int(s) for s in args.sizes.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="bench-index-") as work:
        for n in sizes:
            r = bench_synthetic(n, args, work, with_peer=args.autofaiss and n == max(sizes))
            results["synthetic"][str(n)] = r
            for key, value in r.items():
                print(f"synthetic[{n}] {key} {value}", flush=True)
        if len(sizes) >= 2:
            lo, hi = str(min(sizes)), str(max(sizes))
            syn = results["synthetic"]
            results["growth"] = {
                "vectors": max(sizes) / min(sizes),
                "build_s": round(syn[hi]["build_s"] / syn[lo]["build_s"], 2),
                "build_peak_pss": round(
                    syn[hi]["build_peak_pss_mib"] / syn[lo]["build_peak_pss_mib"], 2
                ),
            }
            print(f"growth {results['growth']}", flush=True)
        if args.real:
            results["real"] = bench_real(args.real, args, work)
            for key, value in results["real"].items():
                print(f"real {key} {value}", flush=True)
    storage.write_json(args.json, results)
    print(f"wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
