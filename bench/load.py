"""Load benchmark: the Serve app under locust, from capacity to 3x overload and a soak.

    python bench/load.py [--images 300] [--vectors 100000] [--shards 2] [--replicas 1,2]
        [--step-seconds 20] [--ramp-seconds 60] [--hold-seconds 30] [--soak-seconds 600]
        [--max-inflight 16] [--json bench/results/load.json]
    smoke run:  python bench/load.py --images 60 --vectors 5000 --step-seconds 5 \\
        --ramp-seconds 10 --hold-seconds 5 --soak-seconds 20 --replicas 1

1. Data: --images products-dev photos (a seeded pick) embedded by jobs/embed.run, plus
   bench/serve.py's seeded synthetic filler up to --vectors rows, indexed in --shards shards.
2. Local Ray and Serve on 127.0.0.1 (a free port), the HAProxy data plane, serve.app with
   AppArgs at their defaults except the logical CPUs (so that 2 ingress replicas fit 2 cores)
   and --max-inflight (searches in flight per ingress replica before a JSON 503).
3. locust (bench/locustfile.py) in its own process, headless, 127.0.0.1 only; every run ends
   with its plan. The users upload the catalog's photos to POST /search?k=10.
   - capacity: closed-loop users (1, 2, 4, 8 ...: --capacity-users), --step-seconds each;
     capacity = the most requests/s answered 200 at a step whose p99 <= 500 ms with 0 errors
     (the first 2 s of each step left out, as warm-up of the new users).
   - ramp: offered load from 0.25x to 3x capacity over --ramp-seconds, then 3x for
     --hold-seconds. Users are paced (at most capacity / (2 * max_inflight) requests/s each,
     more than an admitted request's worst wait), so the offered rate does not fall when
     answers slow down. Every answer must be a 200 or a JSON 429/503; p99 of the 200s, by
     phase.
   - soak: the capacity step's closed-loop users for --soak-seconds: errors, p50/p99, ok/s
     against the capacity, and the PSS of the Ray
     processes (the replicas, raylet, GCS and HAProxy: locust excluded) sampled every 10 s,
     first minute against last minute.
   - the capacity again with each --replicas count of ingress replicas (ramp and soak run
     with the first).
   A Serve replica process replaced during a phase (a crash, an OOM kill) is counted.
Prints `key value` lines and writes everything to --json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.serve import (  # noqa: E402
    finish,
    free_port,
    say,
    start_local,
    wait_ready,
    write_combined,
)
from jobs import build_index  # noqa: E402
from jobs import embed as embed_job  # noqa: E402
from visual_search import catalog, storage  # noqa: E402

LOCUSTFILE = os.path.join(REPO, "bench", "locustfile.py")
DEFAULT_CATALOG = os.path.join(
    os.path.dirname(REPO), "shared", "data", "products-dev", "catalog.csv"
)
P99_TARGET_MS = 500.0
WARM_S = 2.0  # left out at the start of each capacity step
APP_NAME = "load"


# --- data -------------------------------------------------------------------------------------


def prepare(args, work: str) -> tuple[str, list[str]]:
    """-> (index root, local paths of the query photos)."""
    cat = catalog.read_catalog(args.catalog)
    rows = np.random.default_rng(args.seed).permutation(cat.table.num_rows)[: args.images]
    subset = cat.table.take(np.sort(rows))
    cat_uri = os.path.join(work, "catalog.parquet")
    storage.write_parquet(cat_uri, subset)
    real = os.path.join(work, "real")
    # keep_warm_s=0: the embedding actor exits once done, out of the soak's memory series
    embed_job.run(embed_job.Config(catalog=cat_uri, out=real, keep_warm_s=0))
    n_filler = max(0, args.vectors - subset.num_rows)
    combined, _ = write_combined(real, os.path.join(work, "combined"), n_filler, 10, args.seed, 2)
    root = os.path.join(work, "index")
    # POST /search with a photo uses no text tower: not trained here (minutes on 100k rows).
    cfg = build_index.Config(embeddings=combined, index_root=root, shards=args.shards,
                             text_tower=False)  # fmt: skip
    build_index.run(cfg)
    photos = [u for u in subset["image_uri"].to_pylist() if os.path.exists(u)]
    if not photos:
        raise SystemExit(f"no local photos in {args.catalog}")
    return root, photos


# --- locust -----------------------------------------------------------------------------------


def run_locust(base: str, plan: list[dict], photos_file: str, work: str, timeout: float):
    """One locust run of `plan` -> its samples [[t_start_s, latency_ms, status], ...]."""
    out = os.path.join(work, f"samples-{time.monotonic_ns()}.json")
    env = {
        **os.environ,
        "LOAD_PLAN": json.dumps(plan),
        "LOAD_PHOTOS": photos_file,
        "LOAD_OUT": out,
        "LOAD_TIMEOUT": str(timeout),
    }
    cmd = [sys.executable, "-m", "locust", "-f", LOCUSTFILE, "--headless", "--host", base,
           "--only-summary", "--loglevel", "WARNING"]  # fmt: skip
    bound = sum(s["seconds"] for s in plan) + timeout + 60
    with open(os.path.join(work, "locust.log"), "a") as log:
        # locust exits 1 when any request failed: the samples say which, so rc is not checked.
        subprocess.run(cmd, env=env, stdout=log, stderr=log, timeout=bound, check=False)
    if not os.path.exists(out):
        raise RuntimeError(f"locust wrote no samples; see {work}/locust.log")
    with open(out) as f:
        return json.load(f)


def stats(samples: list, t0: float = 0.0, t1: float = math.inf) -> dict:
    """Figures of the samples started in [t0, t1)."""
    window = [s for s in samples if t0 <= s[0] < t1]
    ok = np.array([s[1] for s in window if s[2] == "200"])
    statuses = Counter(s[2] for s in window)
    reasons = Counter(f"{s[2]} {s[3]}" for s in window if len(s) > 3)
    span = (min(t1, max((s[0] for s in window), default=t0)) - t0) or 1e-9
    errors = {k: v for k, v in statuses.items() if k not in ("200", "429", "503")}
    return {
        "requests": len(window),
        "statuses": dict(statuses),
        "errors": sum(errors.values()),  # neither a 200 nor a JSON 429/503
        "error_kinds": errors,
        "non_200": len(window) - len(ok),
        "error_codes": dict(reasons),
        "ok_per_s": round(len(ok) / span, 2),
        "p50_ms": round(float(np.percentile(ok, 50)), 1) if len(ok) else None,
        "p99_ms": round(float(np.percentile(ok, 99)), 1) if len(ok) else None,
    }


def stage_bounds(plan: list[dict]) -> list[tuple[float, float]]:
    ends = np.cumsum([s["seconds"] for s in plan])
    return [(float(e - s["seconds"]), float(e)) for s, e in zip(plan, ends, strict=True)]


def capacity(samples: list, plan: list[dict]) -> tuple[float | None, list[dict]]:
    """(the best ok/s at a step with p99 <= target and 0 errors, or None; each step's stats,
    the one that gave the capacity marked `capacity`)."""
    steps = []
    for stage, (t0, t1) in zip(plan, stage_bounds(plan), strict=True):
        steps.append({"users": stage["users"], **stats(samples, t0 + WARM_S, t1)})
    fine = [s for s in steps if s["p99_ms"] is not None and s["p99_ms"] <= P99_TARGET_MS]
    fine = [s for s in fine if not s["errors"]]
    if not fine:
        return None, steps
    best = max(fine, key=lambda s: s["ok_per_s"])
    best["capacity"] = True
    return best["ok_per_s"], steps


def ramp_plan(cap: float, max_inflight: int, ramp_s: float, hold_s: float) -> list[dict]:
    """Paced users offering 0.25x..3x `cap` requests/s in 5 s stages, then 3x for hold_s."""
    per_user = cap / (2 * max_inflight)
    n = max(1, round(ramp_s / 5))
    targets = [cap * (0.25 + 2.75 * i / max(1, n - 1)) for i in range(n)]
    plan = [{"seconds": ramp_s / n, "users": math.ceil(t / per_user), "rate": per_user}
            for t in targets]  # fmt: skip
    plan.append({"seconds": hold_s, "users": math.ceil(3 * cap / per_user), "rate": per_user})
    return plan


# --- the service ------------------------------------------------------------------------------


class RayMemory:
    """PSS of this process's descendants (Ray's daemons and workers), locust excluded, every
    `every_s`; also the pids of the Serve replicas seen, to count replaced ones."""

    def __init__(self, every_s: float = 10.0):
        self.every_s, self.series, self.replicas = every_s, [], {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    def sample(self) -> int:
        total = 0
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(p.cmdline())
                if "locust" in cmd:
                    continue
                if "ServeReplica" in cmd:
                    self.replicas.setdefault(cmd.split("ServeReplica:")[-1][:80], set()).add(p.pid)
                total += p.memory_full_info().pss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.series.append((round(time.monotonic() - self.t0, 1), self.sample()))
            self._stop.wait(self.every_s)

    def replaced(self) -> int:
        return sum(len(pids) - 1 for pids in self.replicas.values())

    def __enter__(self) -> RayMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def deploy(index_root: str, args, replicas: int, base: str) -> None:
    from ray import serve

    from serve.app import AppArgs, build_app

    app_args = AppArgs(
        index_root=index_root,
        ingress_replicas=replicas,
        ingress_cpus=0.1,
        embedder_cpus=0.5,
        shard_cpus=0.1,
        embedder_threads=1,
        max_inflight=args.max_inflight,
    )
    serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
    wait_ready(base, 300)
    say(f"deployed_ingress_replicas {replicas}", json.dumps(app_args.model_dump(), default=str))


def measure_capacity(base, args, photos_file, work, label: str) -> tuple[float, int]:
    users = [int(u) for u in args.capacity_users.split(",")]
    plan = [{"seconds": args.step_seconds, "users": u, "rate": 0} for u in users]
    run_locust(base, [{"seconds": 5, "users": 1, "rate": 0}], photos_file, work, args.timeout)
    cap, steps = capacity(run_locust(base, plan, photos_file, work, args.timeout), plan)
    for s in steps:
        say(f"{label}_users{s['users']}", {k: s[k] for k in ("ok_per_s", "p50_ms", "p99_ms",
                                                              "errors")})  # fmt: skip
    say(f"{label}_capacity_rps", cap)
    args.results[label] = {"capacity_rps": cap, "steps": steps}
    return cap, next((s["users"] for s in steps if s.get("capacity")), None)


def overload(base, args, photos_file, work, cap: float) -> None:
    plan = ramp_plan(cap, args.max_inflight, args.ramp_seconds, args.hold_seconds)
    with RayMemory(every_s=5.0) as mem:
        samples = run_locust(base, plan, photos_file, work, args.timeout)
    bounds = stage_bounds(plan)
    phases = {
        "ramp": stats(samples, 0, bounds[-1][0]),
        "hold_3x": stats(samples, bounds[-1][0], bounds[-1][1]),
        "all": stats(samples),
    }
    r = {"plan": plan, **phases, "peak_pss_mib": round(max(m for _, m in mem.series) / 2**20),
         "replicas_replaced": mem.replaced()}  # fmt: skip
    r["only_200_or_json_429_503"] = phases["all"]["errors"] == 0
    args.results["overload"] = r
    for phase in phases:
        say(f"overload_{phase}", phases[phase])
    for key in ("only_200_or_json_429_503", "peak_pss_mib", "replicas_replaced"):
        say(f"overload_{key}", r[key])


def soak(base, args, photos_file, work, cap: float, users: int) -> None:
    """The load that gave the capacity (its closed-loop users), held for --soak-seconds. An
    open-loop rate equal to the capacity is a queue at 100% utilisation, which grows without
    bound by any run's chance variation (the soak at the paced capacity rate answered 1,173 of
    13,239 requests 503 `overloaded`, p50 711 ms)."""
    plan = [{"seconds": args.soak_seconds, "users": users, "rate": 0}]
    with RayMemory(every_s=10.0) as mem:
        samples = run_locust(base, plan, photos_file, work, args.timeout)
    minute = min(60.0, args.soak_seconds / 4)
    first = [m for t, m in mem.series if t <= minute]
    last = [m for t, m in mem.series if t >= mem.series[-1][0] - minute]
    r = {
        **stats(samples),
        "users": users,
        "capacity_rps": cap,
        "pss_first_mib": round(np.mean(first) / 2**20),
        "pss_last_mib": round(np.mean(last) / 2**20),
        "pss_series_mib": [(t, round(m / 2**20)) for t, m in mem.series],
        "replicas_replaced": mem.replaced(),
    }
    r["pss_last_over_first"] = round(r["pss_last_mib"] / r["pss_first_mib"], 3)
    r["ok_over_capacity"] = round(r["ok_per_s"] / cap, 3)
    args.results["soak"] = r
    for key in (
        "requests",
        "ok_per_s",
        "errors",
        "non_200",
        "statuses",
        "p50_ms",
        "p99_ms",
        "pss_first_mib",
        "pss_last_mib",
        "pss_last_over_first",
        "ok_over_capacity",
        "replicas_replaced",
    ):
        say(f"soak_{key}", r[key])  # fmt: skip


# --- main -------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--catalog", default=DEFAULT_CATALOG)
    p.add_argument("--images", type=int, default=300, help="catalog photos embedded and sent")
    p.add_argument("--vectors", type=int, default=100_000, help="index size (real + filler)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicas", default="1,2", help="ingress replica counts measured")
    p.add_argument("--capacity-users", default="1,2,4,8")
    p.add_argument("--step-seconds", type=float, default=20.0)
    p.add_argument("--ramp-seconds", type=float, default=60.0)
    p.add_argument("--hold-seconds", type=float, default=30.0)
    p.add_argument("--soak-seconds", type=float, default=600.0)
    p.add_argument("--max-inflight", type=int, default=16)
    p.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    p.add_argument("--work", help="work folder (kept; default: a temporary one, removed)")
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "load.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ray import serve

    work, args.results = start_local(args, "bench-load-")
    complete = False
    try:
        t = time.perf_counter()
        index_root, photos = prepare(args, work)
        say("prepare_s", round(time.perf_counter() - t, 1))
        photos_file = os.path.join(work, "photos.txt")
        storage.write_text(photos_file, "\n".join(photos))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for i, replicas in enumerate(int(r) for r in args.replicas.split(",")):
            deploy(index_root, args, replicas, base)
            cap, users = measure_capacity(base, args, photos_file, work, f"replicas{replicas}")
            if i == 0 and cap:
                overload(base, args, photos_file, work, cap)
                soak(base, args, photos_file, work, cap, users)
        complete = True
    finally:
        finish(args, work, args.results, complete)
    return 0


if __name__ == "__main__":
    sys.exit(main())
