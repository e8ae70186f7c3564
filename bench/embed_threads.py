"""Where a Serve replica should run the query model's forward pass: on its event-loop thread or
through asyncio.to_thread or a thread of its own, with 1 or 2 torch threads, in a Ray actor.

    python bench/embed_threads.py [--cpus 1] [--repeats 30] [--json PATH]

One 224 px image per call (a lone query), the default model, median ms per call, next to the
same call in this process. Ray sets OMP_NUM_THREADS = floor(num_cpus) in its workers; the
actor then sets torch's threads explicitly, as QueryEmbedder does (AppArgs.embedder_threads).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from visual_search import embedders, storage  # noqa: E402

PIXELS = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)


def timed(call, repeats: int) -> float:
    call()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(samples), 2)


async def timed_async(call, repeats: int) -> float:
    await call()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(samples), 2)


class Probe:
    """An async actor (like a Serve replica) holding the model; torch's threads are set in
    the constructor, as QueryEmbedder does."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.embedder = embedders.create(device="cpu")
        self.own = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    async def loop_thread(self, repeats: int) -> float:
        return timed(lambda: self.embedder.embed(PIXELS), repeats)

    async def worker_thread(self, repeats: int) -> float:
        return await timed_async(lambda: asyncio.to_thread(self.embedder.embed, PIXELS), repeats)

    async def own_thread(self, repeats: int) -> float:
        loop = asyncio.get_running_loop()
        return await timed_async(
            lambda: loop.run_in_executor(self.own, self.embedder.embed, PIXELS), repeats
        )


def main(argv: list[str] | None = None) -> int:
    import ray

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpus", type=float, default=1.0, help="the actor's num_cpus")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "embed_threads.json"))
    args = p.parse_args(argv)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        results = {"cores": os.cpu_count(), "actor_num_cpus": args.cpus}
        for threads in (1, 2):
            probe = ray.remote(num_cpus=args.cpus)(Probe).remote(threads)
            for where in ("loop_thread", "worker_thread", "own_thread"):
                ms = ray.get(getattr(probe, where).remote(args.repeats))
                results[f"actor_{where}_{threads}_threads_ms"] = ms
            ray.kill(probe)
        local = embedders.create(device="cpu")
        results["this_process_ms"] = timed(lambda: local.embed(PIXELS), args.repeats)
    finally:
        ray.shutdown()
    for key, value in results.items():
        print(key, value)
    storage.write_json(args.json, results)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
