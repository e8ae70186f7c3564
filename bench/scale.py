"""Catalog-size scale: per-request cost and ingress memory at --small vs --large docs.

    python bench/scale.py [--images 200] [--small 100000] [--large 1000000] [--shards 2]
        [--requests 200] [--json bench/results/scale.json]
    smoke run:  python bench/scale.py --images 40 --small 5000 --large 20000 --requests 30

1. Data: --images products-dev photos (a seeded pick) embedded once by jobs/embed.run, then two
   indexes built by jobs/build_index.run at their defaults (factory "auto", recall-verified):
   the same real rows plus bench/serve.py's seeded synthetic filler up to --small and --large
   rows. No text tower (POST /search with a photo does not use it).
2. Local Ray and Serve on 127.0.0.1 (a free port), the HAProxy data plane, two apps of
   serve.app side by side, one per index (route prefixes /small and /large), with the logical
   CPUs sized so that both fit the machine.
3. Paired, at concurrency 1: each round sends the same request to both apps in a seeded random
   order, so that drifts of the machine's load fall on both sizes alike:
   - POST /search?k=10 with a real catalog photo;
   - GET /products/{id}/similar?k=10 of a seeded random product (real or filler).
   p50 and p90 per size and the large / small ratio of the p50s (the goal: <= 1.2).
4. After the requests, each app's ingress and shard replicas' PSS (/proc/PID/smaps_rollup),
   split into anonymous memory (the heap) and file-backed pages (the mapped index and docs:
   shared page cache the kernel can reclaim), and the large / small ratios.
Prints `key value` lines and writes everything to --json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time

import numpy as np
import psutil
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.serve import (  # noqa: E402
    finish,
    free_port,
    load_photos,
    say,
    start_local,
    wait_ready,
    write_combined,
)
from jobs import build_index  # noqa: E402
from jobs import embed as embed_job  # noqa: E402
from visual_search import catalog, storage, versions  # noqa: E402

DEFAULT_CATALOG = os.path.join(
    os.path.dirname(REPO), "shared", "data", "products-dev", "catalog.csv"
)
SIZES = ("small", "large")


def embed_real(args, work: str) -> str:
    """--images seeded catalog rows -> jobs/embed.run; returns the embeddings URI."""
    cat = catalog.read_catalog(args.catalog)
    rows = np.random.default_rng(args.seed).permutation(cat.table.num_rows)[: args.images]
    subset = cat.table.take(np.sort(rows))
    cat_uri = os.path.join(work, "catalog.parquet")
    storage.write_parquet(cat_uri, subset)
    real = os.path.join(work, "real")
    # keep_warm_s=0: the embedding actor exits once done, out of the replicas memory figures
    embed_job.run(embed_job.Config(catalog=cat_uri, out=real, keep_warm_s=0))
    return real


def build(real: str, n: int, args, work: str) -> dict:
    t = time.perf_counter()
    n_filler = max(0, n - args.images)
    emb, _ = write_combined(real, os.path.join(work, f"emb-{n}"), n_filler, 10, args.seed, 2)
    root = os.path.join(work, f"index-{n}")
    cfg = build_index.Config(embeddings=emb, index_root=root, shards=args.shards,
                             text_tower=False)  # fmt: skip
    build_index.run(cfg)
    shutil.rmtree(emb, ignore_errors=True)  # the index holds what it needs
    m = versions.open_version(root).manifest
    info = {"root": root, "docs": n, "factory": m.factory, "build_s": time.perf_counter() - t}
    say(f"built_{n}", json.dumps({k: v for k, v in info.items() if k != "root"}, default=str))
    return info


def deploy(roots: dict[str, str], base: str) -> None:
    from ray import serve

    from serve.app import AppArgs, build_app

    for name, root in roots.items():
        app_args = AppArgs(index_root=root, ingress_cpus=0.1, embedder_cpus=0.4, shard_cpus=0.1,
                           embedder_threads=1)  # fmt: skip
        serve.run(build_app(app_args), name=name, route_prefix=f"/{name}")
        wait_ready(f"{base}/{name}", 600)
        say(f"deployed_{name}", root)


def _one(session, method: str, url: str, **kw) -> float:
    t = time.perf_counter()
    r = session.request(method, url, timeout=60, **kw)
    ms = (time.perf_counter() - t) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"{method} {url}: {r.status_code} {r.text[:200]}")
    return ms


def paired(base: str, args, photos: list[tuple], pids: dict[str, list[str]]) -> dict:
    """{size: {"search": [ms...], "similar": [ms...]}}, the sizes in a random order per round."""
    rng = np.random.default_rng(args.seed + 1)
    lat = {s: {"search": [], "similar": []} for s in SIZES}
    with requests.Session() as session:
        for i in range(args.warmup + args.requests):
            _, data, ctype = photos[rng.integers(len(photos))]
            order = list(rng.permutation(SIZES))
            for size in order:
                files = {"image": ("q", data, ctype)}
                ms = _one(session, "POST", f"{base}/{size}/search?k=10", files=files)
                if i >= args.warmup:
                    lat[size]["search"].append(ms)
            for size in order:
                pid = pids[size][rng.integers(len(pids[size]))]
                ms = _one(session, "GET", f"{base}/{size}/products/{pid}/similar?k=10")
                if i >= args.warmup:
                    lat[size]["similar"].append(ms)
    return lat


ROLLUP = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")


def _rollup(pid: int) -> dict[str, int]:
    """PSS of a process and its split (bytes): anonymous (the heap) vs file-backed (mapped
    files: the index and the docs, page cache that the kernel can reclaim and that every
    replica on the node shares)."""
    out = dict.fromkeys(ROLLUP, 0)
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in out:
                out[key] = int(rest.split()[0]) * 1024
    return out


def replica_memory() -> dict[str, dict[str, dict[str, int]]]:
    """{"ingress" | "shards": {app: the summed smaps_rollup of its replicas}}."""
    out = {"ingress": {}, "shards": {}}
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            cmd = " ".join(p.info["cmdline"] or [])
            for size in SIZES:
                for role, tag in (("ingress", "Ingress"), ("shards", "ShardSearcher-")):
                    if f"ServeReplica:{size}:{tag}" in cmd:
                        got, mine = _rollup(p.pid), out[role].setdefault(size, {})
                        for key, value in got.items():
                            mine[key] = mine.get(key, 0) + value
    return out


def report(lat: dict, memory: dict, results: dict) -> None:
    for kind in ("search", "similar"):
        p50 = {s: float(np.percentile(lat[s][kind], 50)) for s in SIZES}
        for s in SIZES:
            say(f"{kind}_{s}_p50_ms", round(p50[s], 2))
            say(f"{kind}_{s}_p90_ms", round(float(np.percentile(lat[s][kind], 90)), 2))
        say(f"{kind}_p50_ratio_large_over_small", round(p50["large"] / p50["small"], 3))
        results[kind] = {
            "p50_ms": p50,
            "p90_ms": {s: float(np.percentile(lat[s][kind], 90)) for s in SIZES},
            "p50_ratio": p50["large"] / p50["small"],
            "requests": {s: len(lat[s][kind]) for s in SIZES},
        }
    for role, by_size in memory.items():
        for s in SIZES:
            for key, value in by_size.get(s, {}).items():
                say(f"{role}_{key.lower()}_{s}_mb", round(value / 2**20, 1))
        if by_size.get("small"):
            for key in ("Pss", "Pss_Anon"):
                ratio = by_size["large"][key] / max(1, by_size["small"][key])
                say(f"{role}_{key.lower()}_ratio_large_over_small", round(ratio, 3))
    results["memory_bytes"] = memory
    ingress = memory["ingress"]
    results["ingress_pss_bytes"] = {s: ingress.get(s, {}).get("Pss", 0) for s in SIZES}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--catalog", default=DEFAULT_CATALOG)
    p.add_argument("--images", type=int, default=200, help="catalog photos embedded and sent")
    p.add_argument("--small", type=int, default=100_000, help="docs of the small index")
    p.add_argument("--large", type=int, default=1_000_000, help="docs of the large index")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--requests", type=int, default=200, help="paired rounds measured")
    p.add_argument("--warmup", type=int, default=10, help="paired rounds left out first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="work folder (kept; default: a temporary one, removed)")
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "scale.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ray import serve

    from serve.app import AppArgs

    work, results = start_local(args, "bench-scale-")
    complete = False
    try:
        real = embed_real(args, work)
        max_upload = AppArgs.model_fields["max_upload_bytes"].default
        photos, _ = load_photos(real, 0, max_upload, args.seed)
        real_pids = [pid for pid, _, _ in photos]
        built = {s: build(real, getattr(args, s), args, work) for s in SIZES}
        results["built"] = {
            s: {k: v for k, v in b.items() if k != "root"} for s, b in built.items()
        }
        filler = {s: [f"filler-{i:06d}" for i in range(0, b["docs"] - args.images, 997)]
                  for s, b in built.items()}  # fmt: skip
        pids = {s: real_pids + filler[s][: len(real_pids)] for s in SIZES}
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy({s: b["root"] for s, b in built.items()}, base)
        report(paired(base, args, photos, pids), replica_memory(), results)
        complete = True
    finally:
        finish(args, work, results, complete)
    return 0


if __name__ == "__main__":
    sys.exit(main())
