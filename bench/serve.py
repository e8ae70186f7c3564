"""Serving benchmark: the Ray Serve app under HTTP load, against the same path in process.

    python bench/serve.py [--images 1000 | --embeddings URI] [--vectors 100000] [--shards 2]
                          [--concurrency 1,8,32] [--seconds 20] [--max-requests 20000]
                          [--json bench/results/serve.json]
    smoke run:  python bench/serve.py --images 200 --filler 20000 --seconds 3

1. Data: openclipart sample photos (visual_search.sample) embedded by jobs/embed.run (or an
   existing dataset, --embeddings), plus seeded synthetic filler up to --vectors rows, written
   as one Contract 2 dataset (real rows keep image_uri/title/category; filler rows are
   "filler-NNNNNN", category "filler"), then indexed by jobs/build_index.run.
   The filler follows faiss's SyntheticDataset recipe (as bench/index.py): a 10-d latent
   Gaussian mapped to the model's dimension, then L2-normalised, so that it has neighbour
   structure like real embeddings (100k rows, IDMap,IVF1024,PQ320x4fs,RFlat: recall@10 0.93 at
   nprobe 16, 0.985 at 32). Isotropic noise (--filler-latent-dim 0) has none: its true
   neighbours are barely nearer than any other row. (Gaussian clusters around 100 random
   centres failed the build's recall gate: recall@10 0.375 at best, as PQ codes cannot rank
   the near-equidistant members of a 1,000-row cluster within k_factor 4.)
2. Local Ray (num_cpus = cores) started with cluster.SERVE_ENV (Serve's HAProxy data plane;
   --python-proxy: Ray's default), Serve on 127.0.0.1 and a free port, serve.app:build_app.
3. Closed-loop HTTP clients (asyncio + aiohttp) upload real catalog photos (raw body,
   POST /search?k=10) at each concurrency, each level bounded by --seconds and --max-requests:
   p50/p99 latency, requests/s, errors by status, and how often the photo's own product is
   the top answer.
4. In-process baseline at concurrency 1, the app's work without Serve: images.load (with the
   backdrop balance) + Embedder.embed + inprocess.Searcher + the geometric re-rank of the top
   AppArgs.rerank products (evaluation.rerank_top) over the same photos, with the torch threads
   of the replica that embeds (AppArgs.embedder_threads, else Ray's default: OMP_NUM_THREADS =
   floor(num_cpus), at least 1, checked with a probe actor of the same num_cpus) and the FAISS
   threads the ShardSearcher replicas get. HTTP and in-process queries alternate one by one,
   so both see the same background load; ratio http_p50 / inproc_p50 (target <= 1.3). The
   in-process path with all cores (torch and FAISS threads = cores) and the ratio against it
   are reported too: the serving overhead plus what the replica's thread count costs.
5. Reload under load: a concurrency-8 loop runs while a new version is built (another seed,
   as a separate job: its own process and local Ray, since the replicas hold most of this
   Ray's logical CPUs) and POST /admin/reload switches to it; failed requests in the reload
   window, and which version each answer came from.
Prints `key value` lines and writes everything to --json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import mimetypes
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.index import PeakMemory  # noqa: E402
from jobs import build_index  # noqa: E402
from jobs import embed as embed_job  # noqa: E402
from visual_search import (  # noqa: E402
    cluster,
    devices,
    embedders,
    embeddings,
    evaluation,
    images,
    inprocess,
    sample,
    schema,
    storage,
    verify,
    versions,
)
from visual_search.manifest import EmbeddingsManifest, FileRecord  # noqa: E402

APP_NAME = "visual_search"
PART_ROWS = 25_000


def say(key: str, value) -> None:
    if isinstance(value, float):
        value = round(value, 3)
    elif isinstance(value, dict):
        value = json.dumps(value, sort_keys=True)
    print(f"{key} {value}", flush=True)


# --- data -------------------------------------------------------------------------------------


def embed_sample(args, work: str) -> str:
    """openclipart photos -> catalog table -> jobs/embed.run; returns the dataset URI."""
    folder = sample.fetch_openclipart(args.cache)
    cat_uri = os.path.join(work, f"catalog-{args.images}.parquet")
    storage.write_parquet(cat_uri, sample.sample_table(folder, args.images))
    # A rerun with the same --work and --images resumes (finished partitions are kept).
    out = os.path.join(work, f"real-{args.images}")
    # keep_warm_s=0: the embedding actor exits once done, out of the serving memory figures
    embed_job.run(embed_job.Config(catalog=cat_uri, out=out, keep_warm_s=0))
    return out


def filler_vectors(n: int, d: int, latent: int, seed: int, part: int) -> np.ndarray:
    """n L2-normalised float32 vectors with the recipe of faiss.contrib.datasets.SyntheticDataset
    (as in bench/index.py): a `latent`-dimensional Gaussian, a random linear map to d
    dimensions with random per-dimension scales, then sin. The map depends on the seed alone,
    the rows on (seed, part). latent 0: isotropic Gaussian noise."""
    rng = np.random.default_rng([seed, part])
    if latent:
        maps = np.random.default_rng([seed, 10**6])
        proj = maps.random((latent, d), dtype=np.float32)
        scale = maps.random(d, dtype=np.float32) * 4 + 0.1
        x = np.sin((rng.standard_normal((n, latent), dtype=np.float32) @ proj) * scale)
    else:
        x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32, copy=False)


def write_combined(real_uri: str, out: str, n_filler: int, latent: int, seed: int, parts_min: int):
    """Real rows + filler as one Contract 2 dataset; the real rows spread evenly over the parts
    (so every shard holds some). Returns (uri, real row count)."""
    real = embeddings.open_dataset(real_uri)
    table = real.read_range(0, real.count).drop_columns(["id"]).replace_schema_metadata(None)
    total = real.count + n_filler
    n_parts = max(parts_min, math.ceil(total / PART_ROWS))
    real_slices = np.array_split(np.arange(real.count), n_parts)
    fill_slices = np.array_split(np.arange(n_filler), n_parts)
    if storage.exists(out):
        storage.delete(out)
    records, err_records = [], []
    real_errors = [
        storage.read_parquet(storage.join(real_uri, r.path)) for r in real.manifest.errors if r.rows
    ]
    errors = pa.concat_tables(real_errors) if real_errors else schema.ERRORS_SCHEMA.empty_table()
    for p in range(n_parts):
        r_ids, f_ids = real_slices[p], fill_slices[p]
        pieces = [table.take(pa.array(r_ids))] if len(r_ids) else []
        if len(f_ids):
            names = [f"filler-{i:06d}" for i in f_ids]
            vecs = filler_vectors(len(f_ids), real.dim, latent, seed, p)
            cols = {
                "product_id": pa.array(names),
                "image_uri": pa.array([f"synthetic://{n}" for n in names]),
                "title": pa.array([f"Filler {i}" for i in f_ids]),
                "category": pa.array(["filler"] * len(f_ids)),
                "embedding": schema.embedding_array(vecs),
            }
            arrays = [
                cols[f.name].cast(f.type) if f.name in cols else pa.nulls(len(f_ids), f.type)
                for f in table.schema
            ]
            pieces.append(pa.Table.from_arrays(arrays, schema=table.schema))
        part = pa.concat_tables(pieces)
        name = f"part-{p:05d}.parquet"
        storage.write_parquet(storage.join(out, "embeddings", name), part)
        part_errors = errors if p == 0 else schema.ERRORS_SCHEMA.empty_table()
        storage.write_parquet(storage.join(out, "errors", name), part_errors)
        records.append(FileRecord(f"embeddings/{name}", part.num_rows))
        err_records.append(FileRecord(f"errors/{name}", part_errors.num_rows))
    m = real.manifest
    EmbeddingsManifest(
        model=m.model,
        catalog={
            **m.catalog,
            "uri": f"{m.catalog.get('uri')} + {n_filler} synthetic filler rows",
            "fingerprint": f"{m.catalog.get('fingerprint')}+filler-{n_filler}-{latent}-{seed}",
            "rows": m.counts["input"] + n_filler,
        },
        counts={
            **m.counts,
            "input": m.counts["input"] + n_filler,
            "embedded": m.counts["embedded"] + n_filler,
        },
        partition_size=PART_ROWS,
        embeddings=records,
        errors=err_records,
        timings={"note": "bench/serve.py: real embeddings + synthetic filler"},
    ).write(out)
    return out, real.count


def load_photos(real_uri: str, limit: int, max_bytes: int, seed: int) -> tuple[list, int]:
    """[(product_id, bytes, content type)] of the real rows (an even spread), shuffled."""
    ds = embeddings.open_dataset(real_uri)
    rows = ds.read_range(0, ds.count, columns=["product_id", "image_uri"]).to_pylist()
    if limit and limit < len(rows):
        step = len(rows) / limit
        rows = [rows[int(i * step)] for i in range(limit)]
    photos, skipped = [], 0
    for row in rows:
        try:
            data = storage.read_bytes(row["image_uri"], max_bytes)
        except storage.TooLarge:
            skipped += 1
            continue
        ctype = mimetypes.guess_type(row["image_uri"])[0] or "application/octet-stream"
        photos.append((row["product_id"], data, ctype))
    order = np.random.default_rng(seed).permutation(len(photos))
    return [photos[i] for i in order], skipped


# --- the reload build, as a separate job ------------------------------------------------------


def build_job(cfg: dict) -> int:
    """`bench/serve.py _build CONFIG_JSON`: build_index.run in a fresh local Ray."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=devices.cpu_count(), include_dashboard=False)
    try:
        manifest = build_index.run(build_index.Config(**cfg))
    finally:
        ray.shutdown()
    print(f"[bench/serve build] version {manifest.version}", flush=True)
    return 0


# --- HTTP load --------------------------------------------------------------------------------


@dataclass
class Sample:
    t0: float
    t1: float
    status: str
    version: str | None = None
    self_top1: bool | None = None
    self_top10: bool | None = None
    took_ms: float | None = None  # the ingress's own measure (handler start to answer)


async def _worker(session, url, photos, counter, deadline, stop, max_requests, out):
    import aiohttp

    while time.perf_counter() < deadline and not (stop is not None and stop.is_set()):
        i = next(counter)
        if i >= max_requests:
            return
        pid, data, ctype = photos[i % len(photos)]
        t0 = time.perf_counter()
        body = b""
        try:
            async with session.post(url, data=data, headers={"Content-Type": ctype}) as resp:
                body = await resp.read()
                status = str(resp.status)
        except TimeoutError:
            status = "timeout"
        except aiohttp.ClientError as exc:
            status = type(exc).__name__
        s = Sample(t0, time.perf_counter(), status)
        if status == "200":
            try:
                doc = json.loads(body)
                s.version = doc["index_version"]
                s.took_ms = doc.get("took_ms")
                found = [r["product_id"] for r in doc["results"]]
                s.self_top1 = bool(found) and found[0] == pid
                s.self_top10 = pid in found
            except (ValueError, KeyError, TypeError):
                s.status = "200-bad-json"
        out.append(s)


async def _drive(url, photos, concurrency, seconds, max_requests, timeout, stop, out):
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        counter = itertools.count()
        deadline = time.perf_counter() + seconds
        await asyncio.gather(
            *(
                _worker(session, url, photos, counter, deadline, stop, max_requests, out)
                for _ in range(concurrency)
            )
        )


def run_load(url, photos, concurrency, seconds, max_requests, timeout, stop=None, out=None):
    """Closed loop: `concurrency` clients, each sending its next request as soon as the last
    one is answered, until `seconds` pass, `max_requests` were sent, or `stop` is set."""
    out = [] if out is None else out
    t = time.perf_counter()
    asyncio.run(_drive(url, photos, concurrency, seconds, max_requests, timeout, stop, out))
    return out, time.perf_counter() - t


def _p50(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.percentile(values, 50)), 2) if values else None


def server_timing(header: str) -> dict[str, float]:
    """'embed;dur=15.2, search;dur=3.1' -> {'embed': 15.2, 'search': 3.1}"""
    out = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if name and key == "dur":
                out[name] = float(value)
    return out


def summarize(samples: list[Sample], seconds: float | None = None) -> dict:
    ok = [s for s in samples if s.status == "200"]
    lat = np.array([(s.t1 - s.t0) * 1000 for s in ok])
    out = {
        "requests": len(samples),
        "ok": len(ok),
        "errors": dict(Counter(s.status for s in samples if s.status != "200")),
    }
    if seconds:
        out["seconds"] = round(seconds, 2)
        out["requests_per_s"] = round(len(ok) / seconds, 2)
    if len(lat):
        p50, p90, p99 = np.percentile(lat, [50, 90, 99])
        out.update(
            p50_ms=round(float(p50), 2),
            p90_ms=round(float(p90), 2),
            p99_ms=round(float(p99), 2),
            mean_ms=round(float(lat.mean()), 2),
            max_ms=round(float(lat.max()), 2),
            self_top1=round(float(np.mean([s.self_top1 for s in ok])), 4),
            self_top10=round(float(np.mean([s.self_top10 for s in ok])), 4),
            server_took_p50_ms=_p50([s.took_ms for s in ok]),
        )
    return out


# --- in process -------------------------------------------------------------------------------


class InProcess:
    """The Serve app's query path in this process, doing the app's work: decode (with its
    backdrop balance), embed, then inprocess.Searcher (every shard searched, widened, merged,
    the docs joined) and the geometric re-rank of the top `rerank` products (what
    jobs/evaluate.py measures); no HTTP, no Serve, no Ray."""

    def __init__(self, index_root: str, app_args, k: int):
        self.searcher = inprocess.Searcher(versions.open_version(index_root))
        self.embedder = embedders.from_model_dict(
            self.searcher.version.manifest.model, app_args.weights
        )
        self.limits = images.Limits(max_bytes=app_args.max_upload_bytes)
        self.backdrop, self.rerank = app_args.backdrop_balance, app_args.rerank
        self.cache = verify.FeatureCache(evaluation.FEATURE_CACHE_BYTES)
        self.pool = ThreadPoolExecutor(8)  # catalog photos read as the ingress's threads do
        self.k = k
        self.stages: list[tuple[float, ...]] = []  # decode, embed, search+docs, rerank (s)

    def query(self, data: bytes) -> list[dict]:
        pre = self.embedder.preprocess
        t0 = time.perf_counter()
        pixels = images.load(data, pre, self.limits, self.backdrop)
        t1 = time.perf_counter()
        vector = self.embedder.embed(pixels[None])
        t2 = time.perf_counter()
        rows = self.searcher.search(vector, max(self.k, self.rerank))
        t3 = time.perf_counter()
        if self.rerank and rows:
            features = verify.local_features(pixels)
            rows = evaluation.rerank_top(rows, features, self.rerank, self.cache, pre, self.pool)
        self.stages.append((t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3))
        return rows[: self.k]

    def stage_p50_ms(self, last: int) -> dict:
        st = np.array(self.stages[-last:]) * 1000 if last else np.zeros((0, 4))
        if not len(st):
            return {}
        p50 = np.percentile(st, 50, axis=0)
        names = ("decode", "embed", "search_docs", "rerank")
        return {k: round(float(v), 2) for k, v in zip(names, p50, strict=True)}

    def close(self) -> None:
        self.searcher.close()


@contextlib.contextmanager
def threads(torch_threads: int, faiss_threads: int):
    import faiss
    import torch

    saved = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        faiss.omp_set_num_threads(saved[1])


def _latency(lat: list[float], top1: list[bool]) -> dict:
    lat_ms = np.array(lat) * 1000
    return {
        "requests": len(lat_ms),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
        "self_top1": round(float(np.mean(top1)), 4),
    }


def paired_c1(url, photos, inproc: InProcess, seconds, max_requests, timeout) -> dict:
    """HTTP and in-process queries alternated one by one over the same photos (which goes first
    alternates too), so both see the same background load on a shared machine."""
    import aiohttp

    loop = asyncio.new_event_loop()
    http, local, http_top1, local_top1, errors, took = [], [], [], [], Counter(), []
    stages: dict[str, list[float]] = {}

    async def post(session, data, ctype):
        async with session.post(url, data=data, headers={"Content-Type": ctype}) as resp:
            return resp.status, await resp.read(), resp.headers.get("Server-Timing", "")

    async def open_session():
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    session = loop.run_until_complete(open_session())
    try:
        deadline = time.perf_counter() + seconds
        for i in range(-1, max_requests):  # i = -1: one unmeasured pair to warm up
            if time.perf_counter() >= deadline:
                break
            pid, data, ctype = photos[i % len(photos)]
            for which in ("http", "local") if i % 2 == 0 else ("local", "http"):
                t0 = time.perf_counter()
                if which == "local":
                    rows = inproc.query(data)
                    if i >= 0:
                        local.append(time.perf_counter() - t0)
                        local_top1.append(bool(rows) and rows[0]["product_id"] == pid)
                    continue
                status, body, timing = loop.run_until_complete(post(session, data, ctype))
                if i < 0:
                    continue
                if status != 200:
                    errors[str(status)] += 1
                    continue
                http.append(time.perf_counter() - t0)
                doc = json.loads(body)
                took.append(doc.get("took_ms"))
                for name, ms in server_timing(timing).items():
                    stages.setdefault(name, []).append(ms)
                found = doc["results"]
                http_top1.append(bool(found) and found[0]["product_id"] == pid)
    finally:
        loop.run_until_complete(session.close())
        loop.close()
    out = {"http": _latency(http, http_top1), "inproc": _latency(local, local_top1)}
    out["http"]["errors"] = dict(errors)
    out["http"]["server_took_p50_ms"] = _p50(took)
    out["http"]["server_stages_p50_ms"] = {name: _p50(ms) for name, ms in stages.items()}
    out["inproc"]["stages_p50_ms"] = inproc.stage_p50_ms(len(local))
    out["ratio_p50"] = round(out["http"]["p50_ms"] / out["inproc"]["p50_ms"], 3)
    return out


def inproc_alone(photos, inproc: InProcess, seconds, max_requests) -> dict:
    lat, top1 = [], []
    deadline = time.perf_counter() + seconds
    for i in range(-1, max_requests):
        if time.perf_counter() >= deadline:
            break
        pid, data, _ = photos[i % len(photos)]
        t0 = time.perf_counter()
        rows = inproc.query(data)
        if i >= 0:
            lat.append(time.perf_counter() - t0)
            top1.append(bool(rows) and rows[0]["product_id"] == pid)
    return _latency(lat, top1)


def actor_threads(num_cpus: float) -> dict:
    """torch and FAISS threads in a Ray actor given num_cpus (Ray sets OMP_NUM_THREADS to
    floor(num_cpus), at least 1, in workers), as the Serve replicas get them."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    class Probe:
        def threads(self) -> dict:
            import faiss
            import torch

            return {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads()}

    probe = Probe.remote()
    try:
        return ray.get(probe.threads.remote(), timeout=300)
    finally:
        ray.kill(probe)


def serve_log_summary() -> dict:
    """WARNING/ERROR lines of this Ray session's Serve logs, counted by deployment and message."""
    import re

    import ray

    counts: Counter[str] = Counter()
    with contextlib.suppress(Exception):
        logs = os.path.join(
            ray._private.worker._global_node.get_session_dir_path(), "logs", "serve"
        )
        for name in sorted(os.listdir(logs)):
            with open(os.path.join(logs, name), errors="replace") as f:
                for line in f:
                    if not line.startswith(("WARNING", "ERROR")):
                        continue
                    head, _, msg = line.partition(" -- ")
                    who = head.split()[3] if len(head.split()) > 3 else "?"
                    msg = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", msg.strip())[:300]
                    counts[f"{line.split()[0]} {who}: {msg}"] += 1
    return dict(counts.most_common(30))


# --- Serve ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(requests.RequestException):
            r = requests.get(f"{base}/readyz", timeout=5)
            if r.status_code == 200:
                return r.json()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base}/readyz not ready after {timeout}s")
        time.sleep(0.5)


def reload_under_load(args, base, photos, build_cfg: dict, headers: dict) -> dict:
    """A concurrency-8 loop (bounded by --reload-timeout) across build + POST /admin/reload."""
    samples: list[Sample] = []
    stop = threading.Event()
    loop = threading.Thread(
        target=run_load,
        args=(f"{base}/search?k={args.k}", photos, args.reload_concurrency),
        kwargs={
            "seconds": args.reload_timeout,
            "max_requests": 10**9,
            "timeout": args.request_timeout,
            "stop": stop,
            "out": samples,
        },
        daemon=True,
    )
    before = requests.get(f"{base}/version", timeout=30).json()["index_version"]
    t_start = time.perf_counter()
    loop.start()
    try:
        time.sleep(args.reload_settle)
        t_build0 = time.perf_counter()
        cmd = [sys.executable, os.path.abspath(__file__), "_build", json.dumps(build_cfg)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        subprocess.run(cmd, check=True, env=env, timeout=args.reload_timeout)
        t_build1 = time.perf_counter()
        target = versions.current(build_cfg["index_root"])
        t_r0 = time.perf_counter()
        r = requests.post(f"{base}/admin/reload", headers=headers, timeout=args.request_timeout)
        t_r1 = time.perf_counter()
        answer = r.json()
        time.sleep(args.reload_settle)
    finally:
        stop.set()
        loop.join(args.request_timeout + 30)
    t_end = time.perf_counter()
    after = requests.get(f"{base}/version", timeout=30).json()["index_version"]

    def window(a, b):  # requests in flight at any moment of [a, b]
        return [s for s in samples if s.t0 <= b and s.t1 >= a]

    failed = [s for s in samples if s.status != "200"]
    in_reload = window(t_r0, t_r1)
    new_before = [s for s in samples if s.t1 < t_r0 and s.version == target]
    old_after = [s for s in samples if s.t0 > t_r1 and s.version == before]
    first_new = min((s.t1 for s in samples if s.version == target), default=None)
    return {
        "concurrency": args.reload_concurrency,
        "reload_status": r.status_code,
        "reload_answer": answer,
        "version_before": before,
        "version_built": target,
        "version_after": after,
        "switched": after == target and after != before,
        "build_s": round(t_build1 - t_build0, 2),
        "reload_s": round(t_r1 - t_r0, 3),
        "total": summarize(samples, t_end - t_start),
        "before_build": summarize([s for s in samples if s.t1 < t_build0]),
        "during_build": summarize(window(t_build0, t_build1)),
        "during_reload": summarize(in_reload),
        "after_reload": summarize([s for s in samples if s.t0 > t_r1]),
        "failed_total": len(failed),
        "failed_in_reload_window": sum(s.status != "200" for s in in_reload),
        "answers_by_version": dict(Counter(s.version for s in samples if s.version)),
        "new_version_answers_before_reload": len(new_before),
        "old_version_answers_after_reload": len(old_after),
        "first_new_answer_after_reload_start_s": (
            None if first_new is None else round(first_new - t_r0, 3)
        ),
    }


# --- main -------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="openclipart photos to embed")
    p.add_argument("--embeddings", help="use this embeddings dataset instead of embedding photos")
    p.add_argument("--vectors", type=int, default=100_000, help="index size (real + filler)")
    p.add_argument("--filler", type=int, help="filler rows (default: up to --vectors)")
    p.add_argument(
        "--filler-latent-dim", type=int, default=10, help="filler's intrinsic dim; 0: isotropic"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--factory", default="auto")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--seconds", type=float, default=20.0, help="per load level")
    p.add_argument("--max-requests", type=int, default=20_000, help="per load level")
    p.add_argument("--warmup", type=int, default=10, help="requests before measuring")
    p.add_argument("--photos", type=int, default=500, help="distinct query photos")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--reload-concurrency", type=int, default=8)
    p.add_argument("--reload-settle", type=float, default=5.0, help="load before/after, seconds")
    p.add_argument("--reload-timeout", type=float, default=1800.0, help="bound of the reload run")
    p.add_argument("--no-reload", action="store_true")
    p.add_argument("--weights", help="model weights URI (models other than efficientnet_lite0)")
    p.add_argument("--embedder-replicas", type=int, default=1)
    p.add_argument(
        "--embedder-threads", type=int, default=0, help="torch threads, 0: Ray's default"
    )
    p.add_argument(
        "--python-proxy",
        action="store_true",
        help="Ray Serve's default data plane (Python proxy) instead of cluster.SERVE_ENV",
    )
    p.add_argument("--shard-replicas", type=int, default=1)
    p.add_argument(
        "--embedder-deployment",
        action="store_true",
        help="embed in a QueryEmbedder deployment (embed_in_ingress=False), not the ingress",
    )
    p.add_argument("--max-inflight", type=int, default=64)
    p.add_argument(
        "--rerank", type=int, default=10, help="AppArgs.rerank, in the app and in process"
    )
    p.add_argument("--ray-logs", action="store_true", help="stream replica logs to this console")
    p.add_argument("--cache", default=os.path.join(REPO, ".cache"))
    p.add_argument("--work", help="work folder (kept; default: a temporary one, removed)")
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "serve.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_build"]:
        return build_job(json.loads(argv[1]))
    args = parse_args(argv)
    import ray
    from ray import serve

    from serve import app as serve_app
    from serve.app import AppArgs, build_app

    cores = devices.cpu_count()
    work = args.work or tempfile.mkdtemp(prefix="bench-serve-")
    os.makedirs(work, exist_ok=True)
    results: dict = {"cores": cores, "args": vars(args), "loadavg_start": os.getloadavg()}
    os.environ.pop("RAY_ADDRESS", None)
    if args.python_proxy:  # Ray Serve's default data plane, for comparison
        for key in cluster.SERVE_ENV:
            os.environ[key] = "0"
    results["serve_env"] = cluster.use_serve_env(drain_s=1)
    say("serve_env", results["serve_env"])
    complete = False
    # /admin/reload fails closed without a key: the replicas inherit this one from ray.init.
    os.environ.setdefault(AppArgs.model_fields["api_key_env"].default, secrets.token_hex(16))
    try:
        ray.init(
            address="local", num_cpus=cores, include_dashboard=False, log_to_driver=args.ray_logs
        )
        # 1. data and the first version
        t = time.perf_counter()
        real_uri = args.embeddings or embed_sample(args, work)
        real_count = embeddings.open_dataset(real_uri).count
        n_filler = args.filler if args.filler is not None else max(0, args.vectors - real_count)
        combined, _ = write_combined(
            real_uri,
            os.path.join(work, "combined"),
            n_filler,
            args.filler_latent_dim,
            args.seed,
            args.shards,
        )
        results["data"] = {
            "real_uri": real_uri,
            "real_rows": real_count,
            "filler_rows": n_filler,
            "vectors": real_count + n_filler,
            "prepare_s": round(time.perf_counter() - t, 1),
        }
        for key, value in results["data"].items():
            say(f"data_{key}", value)
        index_root = os.path.join(work, "index")
        if storage.exists(index_root):
            storage.delete(index_root)
        build_cfg = {
            "embeddings": combined,
            "index_root": index_root,
            "shards": args.shards,
            "factory": args.factory,
            "seed": args.seed,
            # The filler rows' titles name no product: a text tower would learn nothing from
            # them (held-out R@10 0.000) in 520 s of a 100k-row build.
            "text_tower": False,
        }
        t = time.perf_counter()
        manifest = build_index.run(build_index.Config(**build_cfg))
        results["index"] = {
            "version": manifest.version,
            "count": manifest.count,
            "dim": manifest.dim,
            "factory": manifest.factory,
            "search_params": manifest.search_params,
            "shards": len(manifest.shards),
            "recall_at_10": manifest.recall["recall_at_10"],
            "build_s": round(time.perf_counter() - t, 1),
        }
        for key, value in results["index"].items():
            say(f"index_{key}", value)

        extra = {"embed_in_ingress": False} if args.embedder_deployment else {}
        app_args = AppArgs(
            **extra,
            embedder_threads=args.embedder_threads,
            index_root=index_root,
            weights=args.weights,
            shard_replicas=args.shard_replicas,
            embedder_replicas=args.embedder_replicas,
            max_inflight=args.max_inflight,
            rerank=args.rerank,
        )
        photos, skipped = load_photos(real_uri, args.photos, app_args.max_upload_bytes, args.seed)
        results["photos"] = {"count": len(photos), "skipped_too_large": skipped}
        say("photos", len(photos))

        # threads the replicas get: AppArgs.embedder_threads when set, else Ray's default for
        # the replica's num_cpus (checked with a probe actor of the same num_cpus)
        embed_cpus = app_args.embedder_cpus + (
            app_args.ingress_cpus if app_args.embeds_in_ingress else 0
        )
        embed_threads = actor_threads(embed_cpus)
        if app_args.embedder_threads:
            embed_threads["torch"] = app_args.embedder_threads
        shards = len(versions.open_version(index_root).manifest.shards)
        shard_threads = actor_threads(serve_app.shard_cpus(app_args, shards))
        results["replica_threads"] = {"embedder": embed_threads, "shard": shard_threads}
        say("replica_threads", results["replica_threads"])
        inproc = InProcess(index_root, app_args, args.k)

        # 2. Serve
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t = time.perf_counter()
        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
        results["serve"] = {
            "app_args": app_args.model_dump(),
            "embeds_in_ingress": app_args.embeds_in_ingress,
            "ready": wait_ready(base, 300),
            "start_s": round(time.perf_counter() - t, 1),
        }
        say("serve_start_s", results["serve"]["start_s"])
        url = f"{base}/search?k={args.k}"
        warm, _ = run_load(url, photos, 1, 120, args.warmup, args.request_timeout)
        say("warmup", summarize(warm)["errors"] or "ok")

        # 3. + 4. load levels; the in-process baseline right after concurrency 1
        results["levels"] = {}
        with PeakMemory(every_s=5.0) as mem:
            for c in [int(x) for x in args.concurrency.split(",") if x]:
                load = os.getloadavg()[0]
                samples, secs = run_load(
                    url, photos, c, args.seconds, args.max_requests, args.request_timeout
                )
                r = {"concurrency": c, **summarize(samples, secs), "loadavg_1m_before": load}
                results["levels"][str(c)] = r
                for key in ("p50_ms", "p99_ms", "requests_per_s", "requests", "errors"):
                    say(f"c{c}_{key}", r.get(key))
                say(f"c{c}_self_top1", r.get("self_top1"))
                say(f"c{c}_server_took_p50_ms", r.get("server_took_p50_ms"))
                if c != 1:
                    continue
                # The re-rank's catalog features are cached: one in-process pass over the
                # photos puts its cache at least where the levels above put the ingress's.
                for _, data, _ in photos:
                    inproc.query(data)
                with threads(embed_threads["torch"], shard_threads["faiss"]):
                    pair = paired_c1(
                        url, photos, inproc, args.seconds, args.max_requests, args.request_timeout
                    )
                with threads(cores, cores):
                    alone = inproc_alone(photos, inproc, args.seconds, args.max_requests)
                pair["inproc"]["threads"] = {
                    "torch": embed_threads["torch"],
                    "faiss": shard_threads["faiss"],
                }
                alone["threads"] = {"torch": cores, "faiss": cores}
                results["c1_paired"] = pair
                results["inproc_all_cores"] = alone
                results["ratio_http_over_inproc_all_cores_p50_c1"] = round(
                    pair["http"]["p50_ms"] / alone["p50_ms"], 3
                )
                say("c1_paired_http_p50_ms", pair["http"]["p50_ms"])
                say("c1_paired_inproc_p50_ms", pair["inproc"]["p50_ms"])
                say("c1_paired_http_server_took_p50_ms", pair["http"]["server_took_p50_ms"])
                say("c1_paired_inproc_stages_p50_ms", pair["inproc"]["stages_p50_ms"])
                say("c1_paired_http_server_stages_p50_ms", pair["http"]["server_stages_p50_ms"])
                say("c1_paired_requests", pair["http"]["requests"])
                say("c1_paired_http_errors", pair["http"]["errors"])
                say("ratio_http_over_inproc_p50_c1", pair["ratio_p50"])
                say("ratio_target_le_1_3_met", pair["ratio_p50"] <= 1.3)
                say("inproc_all_cores_p50_ms", alone["p50_ms"])
                say(
                    "ratio_http_over_inproc_all_cores_p50_c1",
                    results["ratio_http_over_inproc_all_cores_p50_c1"],
                )
        results["serve_peak_pss_mib"] = round(mem.peak / 2**20)
        say("serve_peak_pss_mib", results["serve_peak_pss_mib"])

        # 5. reload under load
        if not args.no_reload:
            key = os.environ.get(app_args.api_key_env)
            headers = {"X-API-Key": key} if key else {}
            rel = reload_under_load(
                args, base, photos, {**build_cfg, "seed": args.seed + 1}, headers
            )
            results["reload"] = rel
            for key in (
                "switched",
                "version_before",
                "version_after",
                "build_s",
                "reload_s",
                "failed_total",
                "failed_in_reload_window",
                "answers_by_version",
                "new_version_answers_before_reload",
                "old_version_answers_after_reload",
                "first_new_answer_after_reload_start_s",
            ):
                say(f"reload_{key}", rel[key])
            for phase in ("before_build", "during_build", "during_reload", "after_reload"):
                ph = rel[phase]
                say(
                    f"reload_{phase}",
                    f"n={ph['requests']} p50_ms={ph.get('p50_ms')} errors={ph['errors']}",
                )
        results["serve_log_warnings"] = serve_log_summary()
        say("serve_log_warning_lines", sum(results["serve_log_warnings"].values()))
        for line, n in list(results["serve_log_warnings"].items())[:8]:
            print(f"  {n}x {line[:200]}", flush=True)
        complete = True
    finally:
        # 6. teardown (every load loop has already stopped on its own bound)
        finish(args, work, results, complete)
    return 0


def start_local(args, prefix: str) -> tuple[str, dict]:
    """A bench run's start: its work folder (--work or a temporary one), its results (cores,
    args), and local Ray on 127.0.0.1 with the HAProxy data plane and an admin key that the
    replicas inherit (/admin/reload fails closed without one). Undone by finish."""
    import ray

    from serve.app import AppArgs

    work = args.work or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(work, exist_ok=True)
    results = {"cores": devices.cpu_count(), "args": dict(vars(args)), "complete": False}
    results["loadavg_start"] = os.getloadavg()
    os.environ.pop("RAY_ADDRESS", None)
    results["serve_env"] = cluster.use_serve_env(drain_s=1)
    os.environ.setdefault(AppArgs.model_fields["api_key_env"].default, secrets.token_hex(16))
    ray.init(address="local", num_cpus=devices.cpu_count(), include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    return work, results


def finish(args, work: str, results: dict, complete: bool) -> None:
    """A bench run's teardown: Serve and Ray stopped, its temp folder removed (unless --work
    named one), the figures written to --json, marked partial when the run failed."""
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.shutdown()
    ray.shutdown()
    results["loadavg_end"] = os.getloadavg()
    results["complete"] = complete
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    storage.write_text(args.json, json.dumps(results, indent=2, sort_keys=True, default=str))
    print(f"wrote {args.json}{'' if complete else ' (partial: the run failed)'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
