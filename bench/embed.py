"""Embedding pipeline benchmark on real catalog images (openclipart), all ratios from one run.

    python bench/embed.py [--images 2000] [--memory-sizes 1000,8000] [--json FILE]
    python bench/embed.py --large [--sizes 1000,10000] [--runs 3] [--json FILE]
    python bench/embed.py --model-sweep
    python bench/embed.py --alternation [--sizes 1000] [--runs 3]

--large: products-dev photos at 1200x1600 as JPEG q90 and as PNG (bench/large_catalog.py). For
each format and size: a, b, the limit, and the job end to end (images / pipeline_s, finding or
starting the actors included): first one cold run in a fresh Ray (the actors start in the job),
then the median of --runs runs (--big-runs over 1,000 images) in that Ray, where the actors are
warm as for a cluster's next job (embed_pool.py); with the steady rate, first output, the
actors' busy and input-wait seconds, and one run's peak memory in a fresh process.

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
    # forkserver, not fork: --large measures a again after ray.init, and a child forked from
    # a process with Ray's threads running hung in one run
    with mp.get_context("forkserver").Pool(workers) as pool:
        pool.map(_decode, uris[: workers * 4])  # warm the workers
        t = time.perf_counter()
        out = pool.map(_decode, uris, chunksize=8)
        seconds = time.perf_counter() - t
    good = [b for b in out if b is not None]
    pixels = np.frombuffer(bytearray().join(good), np.uint8).reshape(-1, PRE.size, PRE.size, 3)
    return len(uris) / seconds, pixels


def measure_model(
    pixels: np.ndarray, batch_size: int, threads: int, keep_freed=True, fold=True
) -> float:
    """The bare model's images/s; set up as the job's actors are (threads, freed tensors kept,
    BatchNorm folded) unless `keep_freed` is False (glibc's defaults) or `fold` is False (the
    model as trained), for --model-sweep."""
    import torch

    from visual_search.pipeline import start_worker

    if keep_freed:
        start_worker(threads)
    else:
        torch.set_num_threads(threads)
    emb = embedders.create(device="cpu", for_training=not fold)
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


def _per_process(root: psutil.Process, measure) -> dict[int, tuple[str, float]]:
    """measure(p) of each process in root's tree (Ray's local head and workers are in the
    driver's), by pid: (name, value); processes that exit meanwhile are left out."""
    out = {}
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            out[p.pid] = (p.name(), measure(p))
    return out


def _tree_pss(root: psutil.Process) -> tuple[int, dict[str, int]]:
    """PSS of a process tree, in total and by process name (Ray names its workers)."""
    by_name: dict[str, int] = {}
    for name, pss in _per_process(root, lambda p: p.memory_full_info().pss).values():
        by_name[name] = by_name.get(name, 0) + pss
    return sum(by_name.values()), by_name


def _tree_cpu(root: psutil.Process) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of each process in root's tree, by pid."""
    return _per_process(root, lambda p: sum(p.cpu_times()[:2]))


def measure_job_cpu(catalog_uri: str, work: str, cores: int, **overrides) -> dict:
    """measure_job, and where the cores' seconds went during it: the embedding actors, this
    driver, the rest of Ray (raylet, GCS, idle workers), and idle."""
    root = psutil.Process()
    before, t = _tree_cpu(root), time.perf_counter()
    timings = measure_job(catalog_uri, work, **overrides)
    wall, after = time.perf_counter() - t, _tree_cpu(root)
    used = {"actors": 0.0, "driver": 0.0, "rest_of_ray": 0.0}
    for pid, (name, cpu) in after.items():
        spent = cpu - before.get(pid, (name, 0.0))[1]
        key = "driver" if pid == root.pid else "actors" if "EmbedWorker" in name else "rest_of_ray"
        used[key] += spent
    share = {k: round(v / (wall * cores), 3) for k, v in used.items()}
    share["idle"] = round(1 - sum(share.values()), 3)
    return timings | {"cpu_share": share}


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


def _job_runs(catalog_uri: str, work: str, runs: int, batch_size: int) -> dict:
    """The job `runs` times on one catalog in one Ray: the median run's timings and every run's
    rate. The first run of a fresh Ray starts the embedding actors (cold); later runs find
    them warm, as a cluster's next job does (embed_pool.py). Callers shut Ray down between
    catalogs whose cold run they want."""
    keys = ("images_per_s", "steady_images_per_s", "first_output_s", "pipeline_s")
    keys += ("embed_actors_busy_s", "embed_actors_waited_s", "actors_start_s", "actors_warm")
    timings = [measure_job(catalog_uri, work, batch_size=batch_size) for _ in range(runs)]
    ranked = sorted(timings, key=lambda t: t["images_per_s"])
    median = ranked[len(ranked) // 2]
    return {
        **{k: median.get(k) for k in keys},
        "runs": [t["images_per_s"] for t in timings],
        "runs_actors_warm": [t.get("actors_warm") for t in timings],
    }


def _cold_run(catalog_uri: str, batch_size: int) -> dict:
    """One run in a fresh Ray: the actors' start-up in the job, as on a new cluster."""
    import ray

    ray.shutdown()
    t = measure_job(catalog_uri, tempfile.mkdtemp(prefix="bench-embed-"), batch_size=batch_size)
    keys = ("images_per_s", "pipeline_s", "actors_start_s", "first_output_s", "actors_warm")
    return {k: t.get(k) for k in keys}


def large(args, cores: int) -> dict:
    """The --large figures: {format: {a, b, limit, size: job figures, memory_N}}."""
    import ray

    from bench import large_catalog

    out, sizes, smallest = {}, [int(x) for x in args.sizes.split(",") if x], {}
    for fmt in ("jpeg", "png"):
        uris = {n: large_catalog.make(args.large_dir, fmt, n) for n in sizes}
        smallest[fmt] = uris[min(sizes)]
        uris_small = storage.read_parquet(smallest[fmt])["image_uri"].to_pylist()
        a, pixels = measure_decode(uris_small, cores)
        b = measure_model(pixels, args.batch_size, cores)
        print(f"{fmt} a {a:.1f} b {b:.1f} a/b {a / b:.2f}", flush=True)
        jobs = {}
        for n, uri in uris.items():
            cold = _cold_run(uri, args.batch_size)
            print(f"{fmt} {n} cold (actors started in the job) {cold}", flush=True)
            runs = args.runs if n <= 1000 else args.big_runs
            job = _job_runs(uri, tempfile.mkdtemp(prefix="bench-embed-"), runs, args.batch_size)
            jobs[n] = {**job, "cold": cold}
        # This machine's speed drifts by 15% over minutes: a and b again after the runs, and
        # the limit from their means.
        a2, pixels = measure_decode(uris_small, cores)
        b2 = measure_model(pixels, args.batch_size, cores)
        a_mean, b_mean = (a + a2) / 2, (b + b2) / 2
        limit = 1 / (1 / a_mean + 1 / b_mean)
        fig = {
            "a": round(a_mean, 1),
            "b": round(b_mean, 1),
            "a_before_after": [round(a, 1), round(a2, 1)],
            "b_before_after": [round(b, 1), round(b2, 1)],
            "a_over_b": round(a_mean / b_mean, 2),
            "limit": round(limit, 1),
        }
        print(f"{fmt} a {a2:.1f} b {b2:.1f} after the runs; limit {limit:.1f}", flush=True)
        for n, job in jobs.items():
            job["end_to_end_over_limit"] = round(job["images_per_s"] / limit, 3)
            job["cold"]["end_to_end_over_limit"] = round(job["cold"]["images_per_s"] / limit, 3)
            fig[str(n)] = job
            print(f"{fmt} {n} job_end_to_end {job['images_per_s']} (runs {job['runs']}) "
                  f"over_limit {job['end_to_end_over_limit']} steady {job['steady_images_per_s']} "
                  f"first_output_s {job['first_output_s']} actors_busy_s "
                  f"{job['embed_actors_busy_s']} actors_waited_s {job['embed_actors_waited_s']} "
                  f"cold_over_limit {job['cold']['end_to_end_over_limit']}",
                  flush=True)  # fmt: skip
        out[fmt] = fig
    ray.shutdown()  # the memory runs start their own Ray, as a fresh job does
    for fmt, uri in smallest.items():
        m = measure_memory(uri, tempfile.mkdtemp(prefix="bench-embed-"))
        out[fmt][f"memory_{min(sizes)}"] = m
        print(
            f"{fmt} {min(sizes)} memory_peak_pss_mib {m['peak_pss_bytes'] / 2**20:.0f}", flush=True
        )
    return {"cores": cores, "batch_size": args.batch_size, **out}


SWEEP = {"kept": (True, True), "kept_unfolded": (True, False), "glibc_default": (False, True)}


def model_sweep(args, cores: int) -> dict:
    """--model-sweep: the bare model's images/s by batch size as the actors run it (freed
    memory kept, BatchNorm folded), unfolded, and with glibc's allocator defaults; a fresh
    process each, since the allocator setting cannot be undone."""
    out = {}
    for variant, (keep, fold) in SWEEP.items():
        for batch in (8, 16, 32, 64):
            code = (
                "import sys; sys.path.insert(0, sys.argv[1]); import numpy as np; "
                "from bench import embed as e; "
                "px = np.random.default_rng(0).integers(0, 256, (256, 224, 224, 3), np.uint8); "
                "print(e.measure_model(px, *map(int, sys.argv[2:])))"
            )
            argv = map(str, (batch, cores, int(keep), int(fold)))  # measure_model's arguments
            cmd = [sys.executable, "-c", code, REPO, *argv]
            run = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rate = float(run.stdout.split()[-1])
            out[f"b_batch_{batch}_{variant}"] = round(rate, 1)
            print(f"b batch {batch} {variant} {rate:.1f}", flush=True)
    for batch in (8, 16, 32, 64):
        ratio = out[f"b_batch_{batch}_kept"] / out[f"b_batch_{batch}_kept_unfolded"]
        out[f"folded_over_unfolded_batch_{batch}"] = round(ratio, 3)
        print(f"folded_over_unfolded batch {batch} {ratio:.3f}", flush=True)
    return {"cores": cores, **out}


def measure_alternation(uris: list[str], batch_size: int, threads: int) -> tuple[float, float]:
    """The embed actor's loop in this process, without Ray: read the next batch on IO_THREADS
    while this one decodes (on `threads` threads), then embeds it; (images/s, the share of
    `threads` cores this process kept busy)."""
    from concurrent.futures import ThreadPoolExecutor

    from visual_search.embed_pool import IO_THREADS
    from visual_search.pipeline import decode_array, read_image, start_worker

    start_worker(threads)
    emb = embedders.create(device="cpu")
    emb.embed(np.zeros((batch_size, PRE.size, PRE.size, 3), np.uint8))
    batches = [uris[i : i + batch_size] for i in range(0, len(uris), batch_size)]
    with ThreadPoolExecutor(IO_THREADS) as io, ThreadPoolExecutor(threads) as decoders:
        cpu, t = time.process_time(), time.perf_counter()
        reads = io.map(lambda u: read_image(u, LIMITS), batches[0])
        for nxt in [*batches[1:], []]:
            ahead = [io.submit(read_image, u, LIMITS) for u in nxt]
            decoded = decoders.map(lambda r: r[0] and decode_array(r[0], PRE, LIMITS)[0], reads)
            emb.embed(np.stack([a for a in decoded if a is not None]))
            reads = [f.result() for f in ahead]
        wall = time.perf_counter() - t
        return len(uris) / wall, (time.process_time() - cpu) / (wall * threads)


def alternation(args, cores: int) -> dict:
    """--alternation: the same loop in this process against the warm job, taken in turns on
    the --sizes' smallest JPEG catalog (this machine drifts by 15% over minutes)."""
    import ray

    from bench import large_catalog

    uri = large_catalog.make(args.large_dir, "jpeg", min(int(x) for x in args.sizes.split(",")))
    uris = storage.read_parquet(uri)["image_uri"].to_pylist()
    work = tempfile.mkdtemp(prefix="bench-embed-")
    measure_job(uri, work, batch_size=args.batch_size)  # starts the actor: the runs find it warm
    loop, loop_busy, job, shares = [], [], [], []
    for _ in range(args.runs):
        rate, busy = measure_alternation(uris, args.batch_size, cores)
        loop.append(rate)
        loop_busy.append(round(busy, 3))
        timings = measure_job_cpu(uri, work, cores, batch_size=args.batch_size)
        job.append(timings["images_per_s"])
        shares.append(timings["cpu_share"])
        print(f"alternation in process {loop[-1]:.1f} job {job[-1]:.1f} images/s", flush=True)
        print(f"loop_cpu_busy {loop_busy[-1]} job_cpu_share {shares[-1]}", flush=True)
    ray.shutdown()
    ratio = float(np.median(np.array(job) / np.array(loop)))
    print(f"job_over_in_process_loop {ratio:.3f}", flush=True)
    return {"cores": cores, "images": len(uris), "in_process_loop": [round(x, 1) for x in loop],
            "in_process_loop_cpu_busy": loop_busy, "job_warm": job, "job_cpu_share": shares,
            "job_over_in_process_loop": round(ratio, 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--large", action="store_true", help="1200x1600 product photos, JPEG and PNG")
    p.add_argument("--model-sweep", action="store_true", help="bare model by batch size")
    p.add_argument(
        "--alternation", action="store_true", help="the actor's loop in process vs the job"
    )
    p.add_argument("--sizes", default="1000,10000", help="--large: catalog sizes")
    p.add_argument("--runs", type=int, default=3, help="--large: job runs per catalog (median)")
    p.add_argument("--big-runs", type=int, default=3, help="--large: runs over 1,000 images")
    p.add_argument("--large-dir", default=os.path.join(REPO, ".cache", "large"))
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--memory-sizes", default="1000,8000")
    p.add_argument("--cache", default=os.path.join(REPO, ".cache"))
    p.add_argument(
        "--json", help="default: bench/results/embed[-large|-model-sweep|-alternation].json"
    )
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)

    cores = devices.cpu_count()
    modes = {"-large": large, "-model-sweep": model_sweep, "-alternation": alternation}
    mode = next((m for m in modes if getattr(args, m[1:].replace("-", "_"))), "")
    args.json = args.json or os.path.join(REPO, "bench", "results", f"embed{mode}.json")
    if mode:
        storage.write_json(args.json, modes[mode](args, cores))
        print(f"wrote {args.json}", flush=True)
        return 0
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
