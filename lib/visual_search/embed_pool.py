"""A warm pool of embedding actors, shared and reused by the jobs of one Ray cluster.

Starting an embedding actor (a worker process, torch, the model, its first forward pass) takes
5-8 s on this machine: as long as embedding 1,000 photos. The pool's actors are detached and
named by what they run (the model as `embedders.describe` names it, with its weights' hash,
the device, torch threads, this package's code and the job's environment), so the next job
(an embed run, each stream micro-batch, an incremental re-index) finds them warm. An actor
exits after `keep_warm_s` without work; jobs that need the GPUs next call `release_idle`.

Without GPUs an actor reads, decodes and embeds its blocks itself, one step after the other,
each on all of its node's cores. Decoding beside the model on the same cores (Ray Data tasks
next to the actor) ran the model at 0.67 of its bare speed; taking turns runs both at full
speed: 0.98 of the limit 1/(1/a + 1/b) in one process (bench/embed.py --large). The next
block's reads (object store latency, little CPU) overlap the current block's compute. With
GPUs, CPU workers decode (Ray Data tasks) and the actors run the model; the next block's
transfer and conversion overlap the current forward pass.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visual_search import devices, images, schema

NAMESPACE = "visual_search"
PREFIX = "embed-"
KEEP_WARM_S = 300.0
INFLIGHT = 2  # calls queued per actor: one computing, the next one reading its images
IO_THREADS = 8  # reads per actor in flight (object stores are latency bound)
WARM_BATCH = 32  # the jobs' default batch size
MIN_IDLE_S = 2.0
RETRY_WAIT_S = 1.0
RETRIES = 2  # a block whose actor died goes to a new one under the same name this often


class PoolError(RuntimeError):
    """The pool's actors could not be started or lost a block too often."""


class EmbedWorker:
    """Ray actor (threaded, INFLIGHT calls): an embedder built once, embedding blocks of rows
    (row, image_uri) it reads and decodes itself, or (row, pixels, error, detail, decoded_at)
    decoded elsewhere (pipeline.decode_batch)."""

    def __init__(self, build: Callable, threads: int | None, keep_warm_s: float):
        from visual_search.pipeline import start_worker

        threads = min(threads, devices.cpu_count()) if threads else None
        start_worker(threads)
        self.embedder = build()
        self.threads = threads or devices.cpu_count()
        self.io = ThreadPoolExecutor(IO_THREADS)
        self.decoders = ThreadPoolExecutor(self.threads)
        self.compute = ThreadPoolExecutor(1)
        size = self.embedder.preprocess.size
        # One full batch: the first call at a shape sets up its kernels and grows the heap
        # (about 1 s on CPU), in the start-up and not in the first job's first block.
        zeros = np.zeros((WARM_BATCH, size, size, 3), np.uint8)
        self.compute.submit(self.embedder.embed, zeros).result()
        self.state = threading.Lock()
        self.calls, self.idle_since = 0, time.monotonic()
        self.computed_at = self.idle_since
        threading.Thread(target=self._retire_when_idle, args=(keep_warm_s,), daemon=True).start()

    def info(self) -> dict:
        return {
            "pid": os.getpid(),
            "device": str(self.embedder.device),
            "threads": self.threads,
            "model": self.embedder.describe(),
        }

    def embed(self, block: pa.Table, decode: tuple | None = None, part=None) -> pa.Table:
        """`decode`: (Preprocess, Limits) for a block of image URIs; `part`: (start, end) of
        the rows to embed, where the block is a slice of a bigger one."""
        if part is not None:
            block = block.slice(part[0], part[1] - part[0])
        with self._counted():
            read = self._read(block, decode[1]) if decode else None
            return self.compute.submit(self._compute, block, read, decode).result()

    def _compute(self, block: pa.Table, read: list | None, decode: tuple | None) -> pa.Table:
        """Decode (when `read`) and embed, on the one compute thread: torch keeps one OpenMP
        team (a team per calling thread left one spinning while the other worked)."""
        start = time.monotonic()
        waited = max(0.0, start - self.computed_at)
        if read is not None:
            block, pixels, ok = self._decode(block, read, *decode)
        else:
            block, pixels, ok = self._pixels(block)
        vectors = np.zeros((len(ok), self.embedder.dim), np.float32)
        vectors[ok] = self.embedder.embed(pixels)
        self.computed_at = time.monotonic()
        return self._output(block, vectors, ok, self.computed_at - start, waited)

    def retire(self, min_idle_s: float = 5.0) -> bool:
        """Exit when nothing ran for `min_idle_s` (release_idle: another job wants the GPU)."""
        return self._exit_if_idle(min_idle_s)

    @contextlib.contextmanager
    def _counted(self):
        with self.state:
            self.calls += 1
        try:
            yield
        finally:
            with self.state:
                self.calls -= 1
                self.idle_since = max(self.idle_since, time.monotonic())

    def _read(self, block: pa.Table, limits: images.Limits) -> list[tuple]:
        from visual_search.pipeline import read_image

        uris = block["image_uri"].to_pylist()
        return list(self.io.map(lambda u: read_image(u, limits), uris))

    def _decode(self, block, read, preprocess, limits) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """(the block's rows with their errors, the decoded pixels stacked, which rows decoded):
        each image's array is copied once, into the model's batch."""
        from visual_search.pipeline import decode_array

        def one(item):
            data, error, detail = item
            return (None, error, detail) if data is None else decode_array(data, preprocess, limits)

        done = list(self.decoders.map(one, read))
        arrays, errors, details = zip(*done, strict=True) if done else ((), (), ())
        ok = np.array([a is not None for a in arrays], bool)
        size = preprocess.size
        good = [a for a in arrays if a is not None]
        pixels = np.stack(good) if good else np.zeros((0, size, size, 3), np.uint8)
        rows = pa.table(
            {
                "row": block["row"],
                "error": pa.array(errors, pa.string()),
                "detail": pa.array(details, pa.string()),
                "decoded_at": pa.array([time.time()] * len(read), pa.float64()),
            }
        )
        return rows, pixels, ok

    def _pixels(self, block: pa.Table) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """The same for a block decoded elsewhere (pipeline.DECODED_SCHEMA)."""
        ok = pc.is_valid(block["pixels"]).to_numpy(zero_copy_only=False)
        size = self.embedder.preprocess.size
        good = block["pixels"].filter(pa.array(ok)).to_pylist()
        pixels = np.frombuffer(bytearray().join(good), np.uint8).reshape(-1, size, size, 3)
        return block, pixels, ok

    def _output(self, block, vectors, ok, busy_s: float, waited_s: float) -> pa.Table:
        """The rows' vectors (null where decoding failed), with this call's compute seconds
        and the seconds the actor waited for it spread over its rows (sums add up)."""
        column = schema.embedding_array(vectors)
        column = pa.FixedSizeListArray.from_arrays(
            column.values, self.embedder.dim, mask=pa.array(~ok)
        )
        n = max(block.num_rows, 1)
        return pa.table(
            {
                "row": block["row"],
                "embedding": column,
                "error": block["error"],
                "detail": block["detail"],
                "decoded_at": block["decoded_at"],
                "embed_s": pa.array([busy_s / n] * block.num_rows, pa.float64()),
                "waited_s": pa.array([waited_s / n] * block.num_rows, pa.float64()),
            }
        )

    def _exit_if_idle(self, min_idle_s: float) -> bool:
        import ray

        with self.state:
            if self.calls or time.monotonic() - self.idle_since < min_idle_s:
                return False
        ray.actor.exit_actor()  # raises SystemExit here; Ray ends the process
        return True

    def _retire_when_idle(self, keep_warm_s: float) -> None:
        # At least MIN_IDLE_S: a job's next call can be milliseconds behind the last one.
        keep_warm_s = max(keep_warm_s, MIN_IDLE_S)
        while True:
            time.sleep(max(0.2, min(keep_warm_s / 4, 10.0)))
            try:
                if self._exit_if_idle(keep_warm_s):
                    return
            except SystemExit:
                return


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """Hash of this package's source: a job with other code never reuses an older actor."""
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:12]


@dataclass
class Pool:
    """The warm actors for one model: found by name, else started (see `start`)."""

    build: Callable  # picklable: builds the embedder inside the actor
    model: dict  # what `build` makes, as embedders.describe names it
    gpus: float = 0.0
    concurrency: int | None = None  # actors; default: one per GPU, else one per CPU node
    threads: int | None = None  # torch threads per CPU actor; default: its node's CPUs
    keep_warm_s: float = KEEP_WARM_S
    runtime_env: dict | None = None
    actors: list = field(default_factory=list, init=False)
    placements: list = field(default_factory=list, init=False)
    started: dict = field(default_factory=dict, init=False)  # warm, start_s

    def start(self) -> Pool:
        """Look the actors up or start them, and wait until each has its model."""
        t0 = time.monotonic()
        self.placements = _placements(self.gpus, self.concurrency, self.threads)
        found = [_find(self._name(p)) for p in self.placements]
        self.actors = [a or self._create(p) for a, p in zip(found, self.placements, strict=True)]
        self._check(self._infos())
        self.started = {
            "actors": len(self.actors),
            "actors_warm": sum(a is not None for a in found),
            "actors_start_s": round(time.monotonic() - t0, 3),
        }
        return self

    @property
    def decodes(self) -> bool:
        """Whether the actors read and decode (no GPUs) or get decoded pixels."""
        return not self.gpus

    def map(self, blocks: Iterable, decode: tuple | None, ordered: bool = False) -> Iterator:
        """Embed each block (a table, an ObjectRef of one, or (ref, (start, end)) for a slice)
        on the least busy actor, INFLIGHT calls per actor; yields output tables as they come
        (in input order when `ordered`)."""
        pending: deque[_Call] = deque()
        load = [0] * len(self.actors)
        for block in blocks:
            while min(load) >= INFLIGHT:
                yield self._collect(pending, load, ordered)
            call = _Call(block, decode, int(np.argmin(load)))
            call.ref = self._submit(call)
            load[call.actor] += 1
            pending.append(call)
        while pending:
            yield self._collect(pending, load, ordered)

    def _collect(self, pending: deque, load: list[int], ordered: bool) -> pa.Table:
        import ray

        if ordered:
            call = pending.popleft()
        else:
            ready, _ = ray.wait([c.ref for c in pending], num_returns=1)
            call = next(c for c in pending if c.ref == ready[0])
            pending.remove(call)
        load[call.actor] -= 1
        return self._result(call)

    def _result(self, call: _Call) -> pa.Table:
        import ray

        for attempt in range(RETRIES + 1):
            try:
                return ray.get(call.ref)
            except ray.exceptions.RayActorError as exc:
                if attempt == RETRIES:
                    raise PoolError(f"embedding actor lost {RETRIES + 1} times: {exc}") from exc
                time.sleep(RETRY_WAIT_S * (attempt + 1))  # till the cluster knows it is gone
                placement = self.placements[call.actor]
                self.actors[call.actor] = _find(self._name(placement)) or self._create(placement)
                call.ref = self._submit(call)
        raise AssertionError("unreachable")

    def _submit(self, call: _Call):
        block, part = call.block if isinstance(call.block, tuple) else (call.block, None)
        return self.actors[call.actor].embed.remote(block, call.decode, part)

    def _name(self, placement: dict) -> str:
        what = {"model": self.model, "env": self.runtime_env, "code": code_digest()}
        key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
        return f"{PREFIX}{key[:16]}-{placement['where']}-t{placement['threads']}"

    def _create(self, placement: dict):
        import ray

        actor = ray.remote(EmbedWorker).options(
            name=self._name(placement),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_concurrency=INFLIGHT,
            runtime_env=self._actor_env(placement["threads"]),
            **placement["options"],
        )
        return actor.remote(self.build, placement["threads"], self.keep_warm_s)

    def _actor_env(self, threads: int | None) -> dict:
        env = dict(self.runtime_env or {})
        env["env_vars"] = {**env.get("env_vars", {}), **devices.KEEP_FREED_ENV}
        if threads:
            # Ray sets OMP_NUM_THREADS to the actor's num_cpus (0 here: 1): OpenMP (and any
            # BLAS that reads it) is told the actor's threads from the start, not only torch
            # through set_num_threads. No speed difference was measurable on 2 cores.
            env["env_vars"]["OMP_NUM_THREADS"] = str(threads)
        return env

    def _infos(self) -> list[dict]:
        import ray

        try:
            return ray.get([a.info.remote() for a in self.actors])
        except ray.exceptions.RayActorError as exc:
            raise PoolError(f"embedding actors failed to start: {exc}") from exc

    def _check(self, infos: list[dict]) -> None:
        def what(model: dict) -> dict:
            head = model.get("head") or {}
            return {k: model.get(k) for k in ("weights", "dim", "preprocess")} | {
                "head": head.get("sha256")
            }

        for info in infos:
            got, want = what(info["model"]), what(self.model)
            if got != want:
                raise PoolError(f"an embedding actor built {got}, expected {want}")


@dataclass
class _Call:
    block: object
    decode: tuple | None
    actor: int
    ref: object = None


def _placements(gpus: float, concurrency: int | None, threads: int | None) -> list[dict]:
    """Where each actor runs. GPU actors reserve a GPU each. CPU actors reserve no CPU (a warm
    actor idles without holding cores others need; while a job runs its threads use them) and
    are pinned to their nodes, one per node by default, with the node's CPUs as threads."""
    import ray

    if gpus:
        n = concurrency or max(1, int(gpus))
        return [{"where": f"gpu{i}", "threads": None, "options": {"num_gpus": 1}} for i in range(n)]
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [
        (n["NodeID"], int(n["Resources"].get("CPU", 0)))
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1
    ]
    if not nodes:
        raise PoolError("no live node with a CPU to embed on")
    n = concurrency or len(nodes)
    out = []
    for i in range(n):
        node, cpus = nodes[i % len(nodes)]
        per_node = len(range(i % len(nodes), n, len(nodes)))
        strategy = NodeAffinitySchedulingStrategy(node, soft=False)
        out.append(
            {
                "where": f"{node[:12]}-{i // len(nodes)}",
                "threads": threads or max(1, cpus // per_node),
                "options": {"num_cpus": 0, "scheduling_strategy": strategy},
            }
        )
    return out


def _find(name: str):
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def release_idle(min_idle_s: float = 5.0) -> int:
    """Ask every pool actor idle for `min_idle_s` to exit (before a job that needs the GPUs
    they hold); returns how many did."""
    import ray

    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and a["name"].startswith(PREFIX)
    ]
    handles = [h for h in map(_find, names) if h is not None]
    done = 0
    for h in handles:
        try:
            done += bool(ray.get(h.retire.remote(min_idle_s)))
        except ray.exceptions.RayActorError:
            done += 1  # it exited while answering
    return done


def blocks_of(ds) -> Iterator[tuple]:
    """A Ray Data dataset's output blocks, as (ObjectRef, (start, end)) for Pool.map: the
    blocks stay in the object store until an actor takes them."""
    for bundle in ds.iter_internal_ref_bundles():
        for entry, part in zip(bundle.blocks, bundle.slices, strict=True):
            span = (part.start_offset, part.end_offset) if part else (0, entry.metadata.num_rows)
            yield entry.ref, span
