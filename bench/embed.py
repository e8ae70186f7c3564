"""Embedding pipeline benchmark on real catalog images (openclipart), all ratios from one run.

    python bench/embed.py [--images 2000] [--memory-sizes 1000,8000] [--json FILE]

(a) read + decode + preprocess alone, all cores (a process pool), images/s
(b) bare model forward pass over the already preprocessed pixels, all cores, images/s
(c) the whole Ray Data job in steady state (Ray start and actor start-up excluded), images/s
On one machine both stages share the cores, so the limit for (c) is 1 / (1/a + 1/b); on a
cluster, with decoding and the model on different workers, it is min(a, b).
Memory: the job on two catalog sizes in fresh processes; peak PSS of the whole process tree
(driver, Ray daemons, workers; shared pages counted once in total).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jobs import embed as embed_job  # noqa: E402
from visual_search import devices, embedders, images, sample, storage  # noqa: E402
from visual_search.pipeline import read_and_decode  # noqa: E402

PRE = embedders.preprocess_for(embedders.DEFAULT_MODEL)
LIMITS = images.Limits()


def _decode(uri: str) -> bytes | None:
    return read_and_decode(uri, PRE, LIMITS)[0]


def measure_decode(uris: list[str], workers: int) -> tuple[float, np.ndarray]:
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_decode, uris[: workers * 4])  # warm the workers
        t = time.perf_counter()
        out = pool.map(_decode, uris, chunksize=8)
        seconds = time.perf_counter() - t
    good = [b for b in out if b is not None]
    pixels = np.frombuffer(bytearray().join(good), np.uint8).reshape(-1, PRE.size, PRE.size, 3)
    return len(uris) / seconds, pixels


def measure_model(pixels: np.ndarray, batch_size: int, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    emb = embedders.create(device="cpu")
    emb.embed(pixels[:batch_size])
    t = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        emb.embed(pixels[i : i + batch_size])
    return len(pixels) / (time.perf_counter() - t)


def measure_job(catalog_uri: str, work: str, **overrides) -> dict:
    import ray

    ray.init(ignore_reinit_error=True)
    cfg = embed_job.Config(catalog=catalog_uri, out=work, overwrite=True, **overrides)
    manifest = embed_job.run(cfg)
    return manifest.timings


def _tree_pss(root: psutil.Process) -> tuple[int, dict[str, int]]:
    """PSS of a process tree, in total and by process name (Ray names its workers)."""
    by_name: dict[str, int] = {}
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            name = p.name()
            by_name[name] = by_name.get(name, 0) + p.memory_full_info().pss
    return sum(by_name.values()), by_name


def measure_memory(catalog_uri: str, work: str) -> dict:
    """Run the job in a fresh process (its own local Ray) and sample the tree's PSS."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, os.path.join(REPO, "jobs", "embed.py"), "--catalog", catalog_uri]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [*cmd, "--out", work, "--overwrite"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        root = psutil.Process(proc.pid)
        peak, at_peak, t0 = 0, {}, time.time()
        while proc.poll() is None:
            total, by_name = _tree_pss(root)
            if total > peak:
                peak, at_peak = total, by_name
            time.sleep(0.5)
        log.seek(0)
        lines = log.read().splitlines()
    if proc.returncode != 0:
        raise RuntimeError("embed job failed:\n" + "\n".join(lines[-30:]))
    summary = next((ln for ln in reversed(lines) if ln.startswith("[embed] done")), "")
    top = sorted(at_peak.items(), key=lambda kv: -kv[1])[:8]
    return {
        "peak_pss_bytes": peak,
        "peak_by_process_mib": {name: round(b / 2**20) for name, b in top},
        "wall_s": round(time.time() - t0, 1),
        "summary": summary,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--memory-sizes", default="1000,8000")
    p.add_argument("--cache", default=os.path.join(REPO, ".cache"))
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "embed.json"))
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)

    cores = devices.cpu_count()
    folder = sample.fetch_openclipart(args.cache)
    work = tempfile.mkdtemp(prefix="bench-embed-")
    cat_uri = os.path.join(work, "catalog.parquet")
    table = sample.sample_table(folder, args.images)
    storage.write_parquet(cat_uri, table)
    uris = table["image_uri"].to_pylist()
    print(f"bench/embed: {len(uris)} openclipart images, {cores} cores", flush=True)

    a, pixels = measure_decode(uris, cores)
    print(f"a_decode_images_per_s {a:.1f}", flush=True)
    b = measure_model(pixels, args.batch_size, cores)
    print(f"b_model_images_per_s {b:.1f}", flush=True)
    timings = measure_job(cat_uri, os.path.join(work, "out"), batch_size=args.batch_size)
    c = timings["steady_images_per_s"]
    limit_one_machine = 1 / (1 / a + 1 / b)
    results = {
        "images": len(uris),
        "cores": cores,
        "a_decode_images_per_s": round(a, 1),
        "b_model_images_per_s": round(b, 1),
        "a_over_b": round(a / b, 2),
        "c_job_steady_images_per_s": c,
        "c_job_overall_images_per_s": timings["images_per_s"],
        "limit_one_machine": round(limit_one_machine, 1),
        "c_over_limit": round(c / limit_one_machine, 3),
        "limit_cluster_min_a_b": round(min(a, b), 1),
    }
    for key in ("a_over_b", "c_job_steady_images_per_s", "limit_one_machine", "c_over_limit"):
        print(f"{key} {results[key]}", flush=True)

    import ray

    ray.shutdown()  # each memory run starts its own Ray, as a fresh job would
    memory = {}
    for n in [int(x) for x in args.memory_sizes.split(",") if x]:
        uri = os.path.join(work, f"catalog-{n}.parquet")
        storage.write_parquet(uri, sample.sample_table(folder, n))
        m = measure_memory(uri, os.path.join(work, f"out-{n}"))
        memory[n] = m
        print(f"memory_peak_pss_mib[{n}] {m['peak_pss_bytes'] / 2**20:.0f}", flush=True)
    if len(memory) >= 2:
        lo, hi = min(memory), max(memory)
        ratio = memory[hi]["peak_pss_bytes"] / memory[lo]["peak_pss_bytes"]
        results["memory_peak_ratio"] = round(ratio, 3)
        print(f"memory_peak_ratio {hi}/{lo} {ratio:.3f}", flush=True)
    results["memory"] = {str(k): v for k, v in memory.items()}
    storage.write_json(args.json, results)
    print(f"wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
