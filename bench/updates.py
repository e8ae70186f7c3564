"""Live catalog updates benchmark (Contract 5): write rates, freshness, query latency under
churn, and recall after churn.

    python bench/updates.py [--quick] [--products 40] [--put-threads 4] [--puts 200]
                            [--segments 40] [--segment-size 64] [--fresh 30]
                            [--queries 200] [--phase-seconds 20] [--churn-http-per-s 4]
                            [--vectors 20000] [--dim 64] [--factory IVF64,Flat]
                            [--parts 1,2,3,4,5] [--json bench/results/updates.json]
    smoke run:  python bench/updates.py --quick

Setup (parts 1-4): a catalog of --products drawn product photos (tests/conftest.py
draw_product), embedded by jobs/embed.run, indexed by jobs/build_index.run, served by
serve.app:build_app on a local Ray + Serve at 127.0.0.1 (as tests/test_live.py).
1. upserts/s with embedding: --put-threads clients PUT --puts distinct photos in all (new
   products) over HTTP; accepted/s, PUT latency, updates per log segment (group commit).
2. upserts/s vector-only: updates.Writer.append of --segments segments of --segment-size
   precomputed unit vectors (what jobs/stream.py does after embedding) into the same index
   root; appended/s, append latency, and how long until a search answer reflects the last one.
3. freshness: --fresh PUTs of distinct photos one by one; for each, the time from receiving the
   200 to the answer of the first search WITHOUT min_seq whose top-1 is that product (polled
   every --poll-ms, bounded by --fresh-timeout); p50/p99 (goal p99 <= 1 s).
4. query latency: the same --queries catalog photos (POST /search, concurrency 1) idle, while a
   thread PUTs/DELETEs over HTTP at --churn-http-per-s, idle again, while a thread appends
   vector-only segments to the log, and while the thread PUTs/DELETEs back to back (as fast as
   the ingress answers: on 2 cores its embedding takes CPU from the queries' own); p50/p99 and
   churn/idle ratios (goal <= 1.2). Idle is the two idle runs pooled, so that drift of a
   shared machine's load shows in both sides.
5. recall@10 after churn, in process (no Serve): --vectors synthetic vectors (the filler recipe
   of bench/serve.py, so that neighbours mean something) built with --factory; --churn of the
   catalog changed through the log (a third deletes, a third new photos of existing products,
   a third new products); queries answered by LiveShards merged with merge_topk, against exact
   search over the updated set and against a fresh build of the updated set from the same
   template. Recall of the version before churn is reported too.
Prints `key value` lines and writes everything to --json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

# conftest: draw_product, and (on import) Serve's data plane env with a 1 s drain and free
# HAProxy metrics/stats ports, so this Serve never collides with another one on the machine.
from conftest import draw_product  # noqa: E402
from synthetic import write_embeddings_dataset  # noqa: E402

from bench import serve as bench_serve  # noqa: E402
from jobs import build_index  # noqa: E402
from jobs import embed as embed_job  # noqa: E402
from visual_search import updates, versions  # noqa: E402
from visual_search.live import LiveShard  # noqa: E402
from visual_search.search import merge_topk  # noqa: E402
from visual_search.updates import DELETE, UPSERT, Position, Update, Writer  # noqa: E402

say = bench_serve.say
KEY_ENV = "VISUAL_SEARCH_API_KEY"
APP_NAME = "vs_updates"
SIZE = (128, 96)
K = 10
TIMEOUT = 60.0


# --- data -------------------------------------------------------------------------------------


def photo(seed: int) -> bytes:
    """A distinct JPEG product photo per seed (encoded before any timed section)."""
    buf = io.BytesIO()
    draw_product(seed, SIZE).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def write_catalog(root: str, n: int) -> str:
    """n drawn photos and a catalog table with title/category/price, as tests/test_live.py."""
    rows = []
    for i in range(n):
        draw_product(i, SIZE).save(os.path.join(root, f"p{i:03d}.jpg"), quality=95)
        rows.append(
            {
                "product_id": f"p{i:03d}",
                "image_uri": f"p{i:03d}.jpg",
                "title": f"P {i}",
                "category": "red" if i % 2 else "blue",
                "price": float(i),
            }
        )
    catalog = os.path.join(root, "catalog.parquet")
    pq.write_table(pa.Table.from_pylist(rows), catalog)
    return catalog


def build_service_index(args, work: str) -> str:
    """Embed the drawn catalog and publish one version; returns the index root."""
    cat_dir = os.path.join(work, "catalog")
    os.makedirs(cat_dir)
    catalog = write_catalog(cat_dir, args.products)
    emb = os.path.join(work, "emb")
    embed_job.run(embed_job.Config(catalog=catalog, out=emb, batch_size=16, keep_warm_s=0))
    index_root = os.path.join(work, "index")
    build_index.run(build_index.Config(embeddings=emb, index_root=index_root, shards=args.shards))
    return index_root


# --- HTTP -------------------------------------------------------------------------------------


class Client:
    """One requests.Session (one per thread: sessions are not shared across threads)."""

    def __init__(self, base: str, key: str):
        self.base, self.auth = base, {"X-API-Key": key}
        self.http = requests.Session()

    def put(self, pid: str, data: bytes, metadata: dict | None = None) -> requests.Response:
        files = {"image": ("p.jpg", data, "image/jpeg")}
        form = {"metadata": json.dumps(metadata)} if metadata is not None else {}
        url = f"{self.base}/products/{pid}"
        return self.http.put(url, files=files, data=form, headers=self.auth, timeout=TIMEOUT)

    def delete(self, pid: str) -> requests.Response:
        url = f"{self.base}/products/{pid}"
        return self.http.delete(url, headers=self.auth, timeout=TIMEOUT)

    def search(self, data: bytes, **params) -> requests.Response:
        headers = {"Content-Type": "application/octet-stream"}
        url = f"{self.base}/search"
        return self.http.post(url, data=data, params=params, headers=headers, timeout=TIMEOUT)

    def close(self) -> None:
        self.http.close()


def start_serve(args, index_root: str) -> str:
    """Serve the index on 127.0.0.1 (small CPU reservations, as tests/test_live.py, so that
    the replicas fit a 2-core Ray); returns the base URL once /readyz answers."""
    from ray import serve

    from serve.app import AppArgs, build_app

    port = bench_serve.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = AppArgs(index_root=index_root, shard_cpus=0.1, ingress_cpus=0.1, rerank=args.rerank)
    serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    bench_serve.wait_ready(base, 300)
    return base


def _pcts(values_s: list[float]) -> dict:
    """p50/p99/max in ms of a list of seconds (None when empty)."""
    if not values_s:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ms = np.array(values_s) * 1000
    p50, p99 = np.percentile(ms, [50, 99])
    return {
        "n": len(ms),
        "p50_ms": round(float(p50), 2),
        "p99_ms": round(float(p99), 2),
        "max_ms": round(float(ms.max()), 2),
    }


def log_segments(index_root: str) -> int:
    return updates.tail(index_root, Position()).segment


# --- 1. upserts/s with embedding ---------------------------------------------------------------


def _put_worker(base, key, jobs, barrier, out) -> None:
    """PUT each (pid, photo) in turn; records (latency s, status) per request."""
    client = Client(base, key)
    barrier.wait()
    try:
        for pid, data in jobs:
            t0 = time.perf_counter()
            try:
                status = str(client.put(pid, data, {"title": f"U {pid}"}).status_code)
            except requests.RequestException as exc:
                status = type(exc).__name__
            out.append((time.perf_counter() - t0, status))
    finally:
        client.close()


def bench_puts(base: str, key: str, index_root: str, args) -> dict:
    """Concurrent PUTs of new products: the accepted rate when the ingress embeds every photo,
    and how many updates each log segment took (the Committer's group commit)."""
    per = max(1, args.puts // args.put_threads)
    jobs = [
        [(f"up-{t}-{i}", photo(10_000 + t * per + i)) for i in range(per)]
        for t in range(args.put_threads)
    ]
    out: list[tuple[float, str]] = []
    barrier = threading.Barrier(args.put_threads + 1)
    threads = [
        threading.Thread(target=_put_worker, args=(base, key, j, barrier, out), daemon=True)
        for j in jobs
    ]
    seg0 = log_segments(index_root)
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(TIMEOUT * per + 30)
    seconds = time.perf_counter() - t0
    ok = [lat for lat, status in out if status == "200"]
    segs = log_segments(index_root) - seg0
    return {
        "threads": args.put_threads,
        "puts": len(out),
        "accepted": len(ok),
        "errors": dict(Counter(s for _, s in out if s != "200")),
        "seconds": round(seconds, 2),
        "accepted_per_s": round(len(ok) / seconds, 2),
        "latency": _pcts(ok),
        "segments": segs,
        "updates_per_segment": round(len(ok) / segs, 2) if segs else None,
    }


# --- 2. upserts/s vector-only ------------------------------------------------------------------


def vector_updates(index_root: str, n: int, seed: int, prefix: str) -> list[Update]:
    """n upserts of new products with precomputed unit vectors of the live model."""
    m = versions.open_version(index_root).manifest
    key = updates.model_key(m.model)
    x = np.random.default_rng(seed).standard_normal((n, m.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [
        Update(UPSERT, f"{prefix}{i}", f"synthetic://{prefix}{i}", {}, x[i], key, f"bench:{i}")
        for i in range(n)
    ]


def writer_for(index_root: str) -> Writer:
    """A Writer at the log's tail (as the stream job starts from its saved position)."""
    m = versions.open_version(index_root).manifest
    return Writer(index_root, updates.tail(index_root, Position.of(m.updates_through)), m.dim)


def wait_reflected(client: Client, query: bytes, seq: int, timeout_s: float) -> float | None:
    """Seconds until a search (no min_seq) answers with seq >= `seq`; None past timeout_s."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        r = client.search(query, k=1)
        if r.status_code == 200 and r.json()["seq"] >= seq:
            return time.perf_counter() - t0
        time.sleep(0.02)
    return None


def bench_vector_appends(base: str, key: str, index_root: str, args) -> dict:
    """What the stream job's writes cost without embedding: one segment per batch, durable on
    return; and how long the service takes to reflect the last one."""
    todo = vector_updates(index_root, args.segments * args.segment_size, args.seed, "vec-")
    batches = [todo[i : i + args.segment_size] for i in range(0, len(todo), args.segment_size)]
    writer = writer_for(index_root)
    lat, last = [], 0
    t0 = time.perf_counter()
    for batch in batches:
        t = time.perf_counter()
        last = writer.append(batch)[-1].seq
        lat.append(time.perf_counter() - t)
    seconds = time.perf_counter() - t0
    client = Client(base, key)
    try:
        reflected = wait_reflected(client, photo(1), last, 60)
    finally:
        client.close()
    return {
        "segments": len(batches),
        "segment_size": args.segment_size,
        "updates": len(todo),
        "seconds": round(seconds, 3),
        "updates_per_s": round(len(todo) / seconds, 1),
        "append_latency": _pcts(lat),
        "service_reflects_last_s": None if reflected is None else round(reflected, 3),
    }


# --- 3. freshness -----------------------------------------------------------------------------


def first_top1(client: Client, data: bytes, pid: str, t_ack: float, args) -> dict | None:
    """Poll a search without min_seq until its top-1 is `pid`: seconds from the ack to that
    answer (and to when it was sent), or None past --fresh-timeout."""
    polls = 0
    while time.perf_counter() - t_ack < args.fresh_timeout:
        t_sent = time.perf_counter()
        r = client.search(data, k=1)
        polls += 1
        rows = r.json()["results"] if r.status_code == 200 else []
        if rows and rows[0]["product_id"] == pid:
            done = time.perf_counter()
            return {"answer_s": done - t_ack, "sent_s": t_sent - t_ack, "polls": polls}
        time.sleep(args.poll_ms / 1000)
    return None


def bench_freshness(base: str, key: str, args) -> dict:
    """Ack-to-searchable time of new products, one PUT at a time (nothing else running)."""
    client = Client(base, key)
    found, missed, errors, polls = [], 0, Counter(), []
    try:
        for j in range(args.fresh):
            data, pid = photo(20_000 + j), f"fresh-{j}"
            r = client.put(pid, data)
            t_ack = time.perf_counter()
            if r.status_code != 200:
                errors[str(r.status_code)] += 1
                continue
            hit = first_top1(client, data, pid, t_ack, args)
            if hit is None:
                missed += 1
                continue
            found.append(hit)
            polls.append(hit["polls"])
    finally:
        client.close()
    answer = _pcts([h["answer_s"] for h in found])
    return {
        "puts": args.fresh,
        "found": len(found),
        "missed_within_timeout": missed,
        "timeout_s": args.fresh_timeout,
        "put_errors": dict(errors),
        "ack_to_answer": answer,
        "ack_to_sent": _pcts([h["sent_s"] for h in found]),
        "polls_p50": float(np.median(polls)) if polls else None,
        "goal_p99_le_1s_met": bool(found) and not missed and answer["p99_ms"] <= 1000,
    }


# --- 4. query latency idle vs churn -----------------------------------------------------------


class HttpChurn:
    """PUTs of new photos and DELETEs of earlier ones over HTTP from one thread, one every
    `every_s` (0: back to back, as fast as the ingress answers), until stopped (bounded by
    max_ops): the load catalog editors put on the ingress, embedding included."""

    def __init__(self, base: str, key: str, every_s: float = 0.0, keep=8, max_ops=100_000):
        self.client, self.keep, self.max_ops = Client(base, key), keep, max_ops
        self.every_s = every_s
        self.stop, self.ops, self.errors = threading.Event(), Counter(), Counter()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        live: list[str] = []
        for n in range(self.max_ops):
            if self.stop.is_set():
                break
            op = "delete" if len(live) >= self.keep else "put"
            try:
                if op == "delete":
                    r = self.client.delete(live.pop(0))
                else:
                    pid = f"churn-{n}"
                    r = self.client.put(pid, photo(30_000 + n))
                    if r.status_code == 200:
                        live.append(pid)
            except requests.RequestException as exc:
                self.errors[type(exc).__name__] += 1
                continue
            self.ops[op] += 1
            if r.status_code != 200:
                self.errors[str(r.status_code)] += 1
            self.stop.wait(self.every_s)
        self.client.close()


class VectorChurn:
    """Vector-only segments (upserts of new products, deletes of earlier ones) appended to the
    log every `every_s` until stopped: the index-side cost of updates without embedding."""

    def __init__(self, index_root: str, batch: int, every_s: float, seconds: float, seed: int):
        self.writer, self.batch, self.every_s = writer_for(index_root), batch, every_s
        bound = batch * (int(seconds / every_s) + 2)  # enough for the phase, then it stops
        self.pending = vector_updates(index_root, bound, seed, "vchurn-")
        self.stop, self.ops, self.errors = threading.Event(), Counter(), Counter()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        written: list[str] = []
        while not self.stop.is_set() and self.pending:
            ups, self.pending = self.pending[: self.batch], self.pending[self.batch :]
            dels = [Update(DELETE, pid) for pid in written[: self.batch // 2]]
            written = written[len(dels) :] + [u.product_id for u in ups]
            try:
                self.writer.append(ups + dels)
            except updates.LogError as exc:
                self.errors[type(exc).__name__] += 1
            self.ops["upsert"] += len(ups)
            self.ops["delete"] += len(dels)
            self.stop.wait(self.every_s)


def query_phase(url: str, photos: list, args, churn=None) -> dict:
    """One closed loop at concurrency 1 over the same photos (bounded by --queries and
    --phase-seconds), with `churn` running in its thread meanwhile."""
    if churn is not None:
        churn.thread.start()
    try:
        samples, seconds = bench_serve.run_load(
            url, photos, 1, args.phase_seconds, args.queries, TIMEOUT
        )
    finally:
        if churn is not None:
            churn.stop.set()
            churn.thread.join(TIMEOUT + 10)
    out = bench_serve.summarize(samples, seconds)
    out["_lat"] = [s.t1 - s.t0 for s in samples if s.status == "200"]
    if churn is not None:
        out["churn_ops"] = dict(churn.ops)
        out["churn_errors"] = dict(churn.errors)
        out["churn_ops_per_s"] = round(sum(churn.ops.values()) / seconds, 2)
    return out


def bench_query_latency(base: str, key: str, index_root: str, args) -> dict:
    """Idle, paced HTTP churn, idle, vector churn, HTTP churn back to back; ratios against the
    pooled idle runs."""
    url = f"{base}/search?k={K}"
    photos = [(f"p{i:03d}", photo(i), "image/jpeg") for i in range(args.products)]
    bench_serve.run_load(url, photos, 1, 30, 5, TIMEOUT)  # warm-up
    phases = {"idle_1": query_phase(url, photos, args)}
    paced = HttpChurn(base, key, 1 / args.churn_http_per_s)
    phases["churn_http"] = query_phase(url, photos, args, paced)
    phases["idle_2"] = query_phase(url, photos, args)
    every_s = args.churn_every_ms / 1000
    vchurn = VectorChurn(index_root, args.churn_batch, every_s, args.phase_seconds, args.seed + 7)
    phases["churn_vectors"] = query_phase(url, photos, args, vchurn)
    phases["churn_http_max"] = query_phase(url, photos, args, HttpChurn(base, key))
    idle = _pcts(phases["idle_1"]["_lat"] + phases["idle_2"]["_lat"])
    out: dict = {"idle_pooled": idle, "churn_http_per_s": args.churn_http_per_s}
    for name in ("churn_http", "churn_vectors", "churn_http_max"):
        busy = _pcts(phases[name]["_lat"])
        out[f"ratio_p50_{name}"] = round(busy["p50_ms"] / idle["p50_ms"], 3)
        out[f"ratio_p99_{name}"] = round(busy["p99_ms"] / idle["p99_ms"], 3)
    out["ratio_idle_2_over_idle_1_p50"] = round(
        phases["idle_2"]["p50_ms"] / phases["idle_1"]["p50_ms"], 3
    )
    for p in phases.values():
        p.pop("_lat")
    out["phases"] = phases
    return out


# --- 5. recall after churn --------------------------------------------------------------------


def churn_plan(n: int, fraction: float, rng) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows to delete, rows to re-photograph, count of new products): `fraction` of the
    catalog changed, a third each."""
    m = max(3, int(n * fraction)) // 3
    rows = rng.permutation(n)[: 2 * m]
    return np.sort(rows[:m]), np.sort(rows[m:]), m


def apply_churn(index_root, pids, x, args) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Write the churn to the log in --segment-size segments; returns the updated catalog as
    (product ids, vectors, the global ids the live service gives them)."""
    rng = np.random.default_rng(args.seed + 1)
    dead, replaced, m_new = churn_plan(len(pids), args.churn, rng)
    fresh = bench_serve.filler_vectors(len(replaced) + m_new, x.shape[1], 10, args.seed, 1)
    key = updates.model_key(versions.open_version(index_root).manifest.model)
    ups = [pids[r] for r in replaced] + [f"new{j:05d}" for j in range(m_new)]
    log = [Update(DELETE, pids[r]) for r in dead] + [
        Update(UPSERT, pid, f"synthetic://{pid}", {}, fresh[j], key) for j, pid in enumerate(ups)
    ]
    order = rng.permutation(len(log))
    log = [log[i] for i in order]
    writer, written = writer_for(index_root), []
    for i in range(0, len(log), args.segment_size):
        written += writer.append(log[i : i + args.segment_size])
    gone = set(dead.tolist()) | set(replaced.tolist())
    keep = np.array([i for i in range(len(pids)) if i not in gone], np.int64)
    seq_of = {u.product_id: u.seq for u in written if u.op == UPSERT}
    out_pids = [pids[i] for i in keep] + ups
    out_x = np.concatenate([x[keep], fresh])
    out_ids = np.concatenate([keep, [updates.DELTA_BASE + seq_of[p] for p in ups]])
    return out_pids, out_x, out_ids.astype(np.int64)


def live_search(index_root: str, queries: np.ndarray) -> tuple[np.ndarray, dict]:
    """Top-K ids from LiveShards of the current version caught up with the log, merged."""
    version = versions.open_version(index_root)
    shards = [LiveShard(version, i, index_root) for i in range(len(version.manifest.shards))]
    for s in shards:
        s.overlay.catch_up(index_root)
    parts = [s.search(queries, K)[:2] for s in shards]
    ids = merge_topk(parts, K, version.manifest.metric)[1]
    info = {"search_params": version.manifest.search_params, "seq": shards[0].overlay.seq}
    info["delta_vectors"] = sum(int(s.delta.ntotal) for s in shards)
    return ids, info


def exact_topk(x: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exact inner-product top-K global ids over (x, ids), in numpy."""
    scores = queries @ x.T
    top = np.argpartition(-scores, K, axis=1)[:, :K]
    return ids[top]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found & truth| / K per query (ids, order ignored: ties may come in any order)."""
    hits = [len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]
    return round(float(np.mean(hits)), 4)


def build(work: str, name: str, pids: list[str], x: np.ndarray, args, template=None) -> str:
    """Write (pids, x) as an embeddings dataset and build one version of it; returns its
    index root. Row i of the dataset gets version id i."""
    data = write_embeddings_dataset(os.path.join(work, f"{name}-emb"), x, part_rows=5000)
    _rename_products(data, pids)
    root = os.path.join(work, f"{name}-index")
    cfg = build_index.Config(
        embeddings=data,
        index_root=root,
        shards=args.shards,
        factory=args.factory,
        text=False,
        target_recall=args.target_recall,
        template=template,
        seed=args.seed,
    )
    build_index.run(cfg)
    return root


def _rename_products(data: str, pids: list[str]) -> None:
    """write_embeddings_dataset names rows p00000...: give them the catalog's product ids."""
    folder = os.path.join(data, "embeddings")
    start = 0
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        t = pq.read_table(path)
        col = pa.array(pids[start : start + t.num_rows], pa.string())
        pq.write_table(
            t.set_column(t.schema.get_field_index("product_id"), "product_id", col), path
        )
        start += t.num_rows


def bench_recall(args, work: str) -> dict:
    """Recall@10 of the live view (version + churned log) vs exact search and vs a fresh build
    of the updated catalog from the same template."""
    x = bench_serve.filler_vectors(args.vectors, args.dim, 10, args.seed, 0)
    queries = bench_serve.filler_vectors(args.recall_queries, args.dim, 10, args.seed, 2)
    pids = [f"p{i:06d}" for i in range(len(x))]
    t = time.perf_counter()
    root = build(work, "base", pids, x, args)
    before, _ = live_search(root, queries)
    base_recall = recall(before, exact_topk(x, np.arange(len(x)), queries))
    new_pids, new_x, new_ids = apply_churn(root, pids, x, args)
    live_ids, info = live_search(root, queries)
    truth = exact_topk(new_x, new_ids, queries)
    version = versions.open_version(root)
    template = os.path.join(version.root, version.manifest.template["file"])
    fresh_root = build(work, "fresh", new_pids, new_x, args, template)
    fresh_rows, fresh_info = live_search(fresh_root, queries)
    fresh_ids = np.where(fresh_rows >= 0, new_ids[np.maximum(fresh_rows, 0)], -1)
    out = {
        "vectors": len(x),
        "dim": args.dim,
        "factory": args.factory,
        "churn_fraction": args.churn,
        "updates": info["seq"],
        "delta_vectors": info["delta_vectors"],
        "queries": len(queries),
        "search_params_live": info["search_params"],
        "search_params_fresh": fresh_info["search_params"],
        "recall_at_10_before_churn": base_recall,
        "recall_at_10_live_vs_exact": recall(live_ids, truth),
        "recall_at_10_fresh_vs_exact": recall(fresh_ids, truth),
        "overlap_at_10_live_vs_fresh": recall(live_ids, fresh_ids),
        "seconds": round(time.perf_counter() - t, 1),
    }
    out["ratio_live_over_fresh_recall"] = round(
        out["recall_at_10_live_vs_exact"] / out["recall_at_10_fresh_vs_exact"], 4
    )
    return out


# --- main -------------------------------------------------------------------------------------

QUICK = {
    "products": 12,
    "puts": 24,
    "segments": 8,
    "fresh": 8,
    "queries": 40,
    "phase_seconds": 6.0,
    "vectors": 4000,
    "dim": 32,
    "factory": "IVF16,Flat",
    "recall_queries": 200,
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: " + json.dumps(QUICK))
    p.add_argument("--parts", default="1,2,3,4,5", help="which parts to run")
    p.add_argument("--products", type=int, default=40, help="drawn catalog photos")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--rerank", type=int, default=0, help="AppArgs.rerank (0: off, as the tests)")
    p.add_argument("--put-threads", type=int, default=4)
    p.add_argument("--puts", type=int, default=200, help="PUTs in all (part 1)")
    p.add_argument("--segments", type=int, default=40, help="vector-only segments (part 2)")
    p.add_argument("--segment-size", type=int, default=64, help="updates per segment (2, 5)")
    p.add_argument("--fresh", type=int, default=30, help="PUTs timed to searchable (part 3)")
    p.add_argument("--fresh-timeout", type=float, default=10.0, help="bound per PUT, seconds")
    p.add_argument("--poll-ms", type=float, default=10.0)
    p.add_argument("--queries", type=int, default=200, help="queries per phase (part 4)")
    p.add_argument("--phase-seconds", type=float, default=20.0, help="bound per phase (part 4)")
    # 4/s: 2 photo PUTs + 2 DELETEs a second, 345k catalog edits a day. churn_http_max runs
    # them back to back, as fast as one ingress on the machine answers (CPU-bound embedding).
    p.add_argument("--churn-http-per-s", type=float, default=4.0, help="paced HTTP churn rate")
    p.add_argument("--churn-batch", type=int, default=8, help="vector churn segment size")
    p.add_argument("--churn-every-ms", type=float, default=50.0, help="vector churn interval")
    p.add_argument("--vectors", type=int, default=20_000, help="recall catalog (part 5)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--factory", default="IVF64,Flat")
    p.add_argument("--target-recall", type=float, default=0.95, help="build's tuning target")
    p.add_argument("--churn", type=float, default=0.10, help="fraction changed (part 5)")
    p.add_argument("--recall-queries", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="work folder (kept; default: a temporary one, removed)")
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "updates.json"))
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    return args


def report(prefix: str, d: dict) -> None:
    """Print a part's figures as `key value` lines (nested dicts as JSON)."""
    for key, value in d.items():
        if key != "phases":
            say(f"{prefix}_{key}", value)


def run_http_parts(args, parts: set[str], work: str, results: dict) -> None:
    """Parts 1-4 on one served catalog (part 2 last: its vectors stay in the delta)."""
    key = os.environ[KEY_ENV]
    index_root = build_service_index(args, work)
    base = start_serve(args, index_root)
    steps = [
        ("1", "puts", lambda: bench_puts(base, key, index_root, args)),
        ("3", "freshness", lambda: bench_freshness(base, key, args)),
        ("4", "query_latency", lambda: bench_query_latency(base, key, index_root, args)),
        ("2", "vector_appends", lambda: bench_vector_appends(base, key, index_root, args)),
    ]
    for part, name, step in steps:
        if part in parts:
            results[name] = step()
            report(name, results[name])
    results["log_segments_total"] = log_segments(index_root)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import ray
    from ray import serve

    parts = set(args.parts.split(","))
    work = args.work or tempfile.mkdtemp(prefix="bench-updates-")
    os.makedirs(work, exist_ok=True)
    results: dict = {"args": vars(args), "loadavg_start": os.getloadavg()}
    complete = False
    os.environ.setdefault(KEY_ENV, secrets.token_hex(16))  # before ray.init: replicas read it
    os.environ.pop("RAY_ADDRESS", None)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        if parts & {"1", "2", "3", "4"}:
            run_http_parts(args, parts, work, results)
            serve.shutdown()  # free the replicas' CPUs for part 5's builds
        if "5" in parts:
            results["recall"] = bench_recall(args, work)
            report("recall", results["recall"])
        complete = True
    finally:
        bench_serve.finish(args, work, results, complete)
    return 0


if __name__ == "__main__":
    sys.exit(main())
