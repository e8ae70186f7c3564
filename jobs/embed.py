"""Embed a catalog (Contract 1) into an embeddings dataset (Contract 2) with Ray Data.

    python jobs/embed.py --catalog URI --out URI [--model NAME] [--batch-size N] [--concurrency N]

Streaming: list catalog -> blocks of rows to a warm pool of embedding actors (embed_pool.py:
started once, reused by the next jobs) -> without GPUs each actor reads, decodes and embeds its
blocks; with GPUs Ray Data decodes in CPU tasks and the actors (one GPU each) embed -> the
driver assembles fixed-size partitions by row number
and writes each one atomically as embeddings/part-NNNNN.parquet + errors/part-NNNNN.parquet.
A rerun with the same --out skips finished partitions; manifest.json is written last.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import cli
from visual_search import (
    catalog,
    cluster,
    devices,
    embed_pool,
    embedders,
    images,
    partitions,
    pipeline,
    storage,
)
from visual_search.manifest import EmbeddingsManifest


@dataclass(frozen=True)
class Config:
    catalog: str
    out: str
    model: str = embedders.DEFAULT_MODEL
    weights: str | None = None
    random_weights: bool = False
    preprocess: str = "pad"
    head: str | None = None  # projection head file (heads.py), run after the backbone
    # Images per model call. On CPU, 8 to 32 run at the same rate (149 / 145 / 143 images/s on
    # 2 cores) and 64 is slower (111): bench/embed.py --model-sweep. On a GPU use 128-256.
    batch_size: int = 32
    concurrency: int | None = None  # embedding actors; default: one per GPU, else one per node
    gpus: int | None = None  # GPUs to use (default: those the cluster has now; see --gpus)
    # CPU actors: torch threads, also the decoding threads (default: their node's cores)
    threads_per_actor: int | None = None
    # Where images are decoded: "actors" (each reads and decodes its own blocks, taking turns
    # with the model on all cores), "tasks" (Ray Data CPU tasks apart from the actors), or
    # "auto": actors without GPUs, tasks with them (embed_pool.py has the measurements).
    decode: str = "auto"
    decode_batch_size: int = 16  # "tasks": images per decode call, each read on a thread
    keep_warm_s: float = embed_pool.KEEP_WARM_S  # idle actors exit after this
    partition_size: int = 1000
    limits: images.Limits = images.Limits()
    device: str | None = None
    s3_endpoint: str | None = None
    overwrite: bool = False
    progress_every_s: float = 10.0
    # "tasks": object store bytes of decoded blocks in flight (None: 8 batches per actor,
    # >= 128 MiB).
    # Bounded so that fast decoding cannot run ahead of the model by the size of the catalog.
    inflight_bytes: int | None = None


class JobError(RuntimeError):
    """The job cannot start or its output would be inconsistent."""


def _plan(cfg: Config, cat: catalog.Catalog) -> dict:
    return {
        "catalog": storage.normalize(cfg.catalog),
        "fingerprint": cat.fingerprint(),
        "rows": cat.num_rows,
        "partition_size": cfg.partition_size,
        "model": cfg.model,
        "weights": cfg.weights,
        "preprocess": cfg.preprocess,
        "head": cfg.head,
        "limits": _limits_record(cfg.limits),
    }


def _limits_record(limits: images.Limits) -> dict:
    """The limits as _plan.json holds them (formats only when narrowed, as plans before the
    field existed recorded them)."""
    out = dataclasses.asdict(limits)
    formats = out.pop("formats")
    return out if tuple(formats) == images.FORMATS else {**out, "formats": list(formats)}


def _prepare_out(cfg: Config, plan: dict) -> None:
    """Check the output is writable and belongs to this same plan (else refuse, or wipe)."""
    plan_uri = storage.join(cfg.out, "_plan.json")
    if cfg.overwrite and storage.exists(cfg.out):
        storage.delete(cfg.out)
    storage.check_writable(cfg.out)
    if storage.exists(plan_uri):
        old = storage.read_json(plan_uri)
        if old != plan:
            changed = sorted(k for k in plan if old.get(k) != plan[k])
            raise JobError(
                f"{cfg.out} holds output of a different run (changed: {', '.join(changed)}); "
                "use another --out or pass --overwrite"
            )
    else:
        storage.write_json(plan_uri, plan)


class _Progress:
    """Console progress lines, and the run's rates: end to end, and steady (the middle of the
    run while decoding still ran, so that the model catching up on images decoded ahead while
    it started cannot pass for a rate both stages sustain)."""

    def __init__(self, total: int, every_s: float):
        self.total, self.every_s = total, every_s
        self.done = self.errors = 0
        self.start = self.last = time.time()
        self.decode_end = 0.0  # when the last block seen so far was decoded (Unix time)
        self.actors = {"embed_s": 0.0, "waited_s": 0.0}  # summed over the actors
        self.points: list[tuple[float, int]] = []  # (time, rows done) at each output batch

    def add(self, batch: pa.Table) -> None:
        self.done += batch.num_rows
        self.errors += batch["embedding"].null_count
        if batch.num_rows:
            self.decode_end = max(self.decode_end, pc.max(batch["decoded_at"]).as_py())
            for key in self.actors:
                self.actors[key] += pc.sum(batch[key]).as_py()
        now = time.time()
        self.points.append((now, self.done))
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            print(
                f"[embed] {self.done:,}/{self.total:,} images ({100 * self.done / self.total:.0f}%)"
                f", {self.errors:,} errors, {rate:.1f} images/s end to end, ETA {eta:.0f}s",
                flush=True,
            )

    def first_output_s(self) -> float | None:
        return self.points[0][0] - self.start if self.points else None

    def steady_rate(self) -> float | None:
        """Images/s from 25% to 75% of the rows, cut where decoding ended; None when under
        10% of the rows came out while both stages ran (the model was the whole run)."""
        lo = next((p for p in self.points if p[1] >= 0.25 * self.total), None)
        both = [p for p in self.points if p[0] <= self.decode_end and p[1] <= 0.75 * self.total]
        hi = both[-1] if both else None
        if lo is None or hi is None or hi[0] <= lo[0] or hi[1] - lo[1] < 0.1 * self.total:
            return None
        return (hi[1] - lo[1]) / (hi[0] - lo[0])

    def timings(self) -> dict:
        return {
            "first_output_s": _round(self.first_output_s()),
            "steady_images_per_s": _round(self.steady_rate()),
            "embed_actors_busy_s": round(self.actors["embed_s"], 2),
            "embed_actors_waited_s": round(self.actors["waited_s"], 2),
        }


def _stream(cfg: Config, cat: catalog.Catalog, todo_rows: pa.Array, pool: embed_pool.Pool):
    """The catalog rows still to do through the pool; yields output batches."""
    table = pa.table({"row": todo_rows, "image_uri": cat.table["image_uri"].take(todo_rows)})
    pre = embedders.preprocess_for(cfg.model, cfg.preprocess)
    where = f"{len(pool.actors)} {cfg.model} actor(s)" + (
        " on GPU, decoding in CPU tasks" if pool.gpus else " on CPU, each reading and decoding"
    )
    if _decodes_in_actors(cfg, pool):
        # A block is one model batch: the actor reads the next one while it embeds this one.
        blocks = [table.slice(i, cfg.batch_size) for i in range(0, len(table), cfg.batch_size)]
        print(f"[embed] {len(table):,} images in {len(blocks)} blocks; {where}", flush=True)
        yield from pool.map(blocks, (pre, cfg.limits))
        return
    print(f"[embed] {len(table):,} images; {where}", flush=True)
    yield from pool.map(embed_pool.blocks_of(_decoded(cfg, table, pre, len(pool.actors))), None)


def _decodes_in_actors(cfg: Config, pool: embed_pool.Pool) -> bool:
    return cfg.decode == "actors" or (cfg.decode == "auto" and pool.decodes)


def _decoded(cfg: Config, table: pa.Table, pre: images.Preprocess, actors: int):
    """Ray Data decoding on CPU workers, apart from the embedding actors, with at most
    `inflight_bytes` of decoded blocks in the object store (decoding cannot run ahead of the
    model by the size of the catalog)."""
    import ray

    n_cpus = int(ray.cluster_resources().get("CPU", 1))
    # Small blocks (16-64 rows) so that even a small catalog spreads over all decode workers
    # and the first decoded block reaches the model early.
    block = max(cfg.decode_batch_size, min(64, math.ceil(len(table) / (4 * n_cpus))))
    blocks = [table.slice(i, block) for i in range(0, len(table), block)]
    inflight = cfg.inflight_bytes or max(128 << 20, actors * cfg.batch_size * 8 * pre.size**2 * 3)
    ctx = ray.data.DataContext.get_current()
    saved_limits = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = saved_limits.copy(object_store_memory=inflight)
    try:
        decode = {"preprocess": pre, "limits": cfg.limits, "batch_size": cfg.decode_batch_size}
        # yield_cores: the model keeps its cores; decoding takes what it leaves
        return pipeline.decode_stage(ray.data.from_arrow(blocks), {**decode, "yield_cores": True})
    finally:
        ctx.execution_options.resource_limits = saved_limits


def start_pool(cfg: Config, model: dict) -> embed_pool.Pool:
    """The warm embedding actors for cfg's model (started when none are)."""
    build = functools.partial(
        embedders.create,
        cfg.model,
        weights=cfg.weights,
        device=cfg.device,
        random_weights=cfg.random_weights,
        preprocess_mode=cfg.preprocess,
        head=cfg.head,
    )
    return embed_pool.Pool(
        build,
        {**model, "device": cfg.device},
        gpus=devices.cluster_gpus(cfg.gpus),
        concurrency=cfg.concurrency,
        threads=cfg.threads_per_actor,
        keep_warm_s=cfg.keep_warm_s,
        runtime_env=cluster.runtime_env(),
    ).start()


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _embed_partitions(
    cfg: Config,
    cat: catalog.Catalog,
    model: dict,
    todo: list[int],
    writer: partitions.Writer,
) -> dict:
    """Stream the rows of the `todo` partitions through the pipeline into `writer`; returns
    the run's timings. Ray's own start is timed apart: a job on a running cluster has none."""
    ray_start = time.monotonic()
    if todo:
        cluster.init()
    t0 = time.monotonic()
    progress, started = _Progress(0, cfg.progress_every_s), {}
    if todo:
        pool = start_pool(cfg, model)
        started = pool.started
        print(
            f"[embed] {started['actors']} embedding actor(s) ready in "
            f"{started['actors_start_s']:.1f}s ({started['actors_warm']} already warm)",
            flush=True,
        )
        size = cfg.partition_size
        rows = pa.array(
            np.concatenate(
                [np.arange(p * size, min((p + 1) * size, cat.num_rows)) for p in todo]
            ).astype(np.int64)
        )
        progress.total = len(rows)
        for batch in _stream(cfg, cat, rows, pool):
            writer.add(batch)
            progress.add(batch)
        if writer.pending or len(writer.records) != len(todo):
            missing = sorted(set(todo) - set(writer.records))
            raise JobError(f"stream ended with partitions incomplete: {missing[:10]}")
    return {
        "ray_start_s": round(t0 - ray_start, 3),
        "pipeline_s": round(time.monotonic() - t0, 3),
        **started,
        **progress.timings(),
    }


def run(cfg: Config) -> EmbeddingsManifest:
    """Embed the catalog into cfg.out; returns the manifest written last."""
    started = time.time()
    if cfg.s3_endpoint:
        storage.configure(cfg.s3_endpoint)
    cat = catalog.read_catalog(cfg.catalog)
    if cfg.model not in embedders.REGISTRY:
        raise JobError(f"unknown model {cfg.model!r}; known: {', '.join(embedders.REGISTRY)}")
    model = embedders.describe(
        cfg.model, cfg.weights, cfg.random_weights, cfg.preprocess, head=cfg.head
    )
    plan = _plan(cfg, cat)
    _prepare_out(cfg, plan)
    n_parts = math.ceil(cat.num_rows / cfg.partition_size)
    done = partitions.finished(cfg.out, n_parts)
    todo = [i for i in range(n_parts) if i not in done]
    print(
        f"[embed] catalog {cfg.catalog}: {cat.num_rows:,} images in {n_parts} partitions; "
        f"{len(done)} already finished, {len(todo)} to do",
        flush=True,
    )

    writer = partitions.Writer(cfg.out, cfg.partition_size, cat)
    run_timings = _embed_partitions(cfg, cat, model, todo, writer)
    seconds = run_timings["pipeline_s"]
    processed = sum(e + r for e, r in writer.records.values())
    records = [writer.records.get(i) or partitions.part_rows(cfg.out, i) for i in range(n_parts)]
    timings = {
        "started_unix": started,
        "total_s": round(time.time() - started, 3),
        "processed_this_run": processed,
        # end to end: images / pipeline_s, the actors' start-up included
        "images_per_s": round(processed / seconds, 2) if processed else None,
        **run_timings,
    }
    manifest = partitions.write_manifest(
        cfg.out, model, cat, plan["fingerprint"], cfg.partition_size, records, timings
    )
    embedded, n_errors = manifest.counts["embedded"], manifest.counts["errors"]
    rate = "nothing to do"
    if processed:
        steady = timings["steady_images_per_s"]
        rate = f"{processed / seconds:.1f} images/s end to end" + (
            f" (steady {steady:.1f} while decoding ran)" if steady else ""
        )
    print(
        f"[embed] done: {cat.num_rows:,} images, {embedded:,} embedded, {n_errors:,} errors "
        f"{manifest.counts['errors_by_code']}, {processed:,} processed this run at {rate}, "
        f"{time.time() - started:.1f}s total -> {cfg.out}",
        flush=True,
    )
    return manifest


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The catalog and model options this job shares with jobs/reindex.py."""
    p.add_argument("--catalog", required=True, help="catalog table or image folder/prefix URI")
    p.add_argument("--model", default=embedders.DEFAULT_MODEL, choices=sorted(embedders.REGISTRY))
    p.add_argument("--weights", help="state dict URI (required for resnet50 and clip-vit-b-32)")
    p.add_argument("--preprocess", default="pad", choices=["pad", "crop"])
    p.add_argument("--head", help="projection head file URI (jobs/train_head.py output)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    p.add_argument(
        "--concurrency", type=int, help="embedding actors (default: one per GPU, else per node)"
    )


def config_from_args(args: argparse.Namespace, out: str | None = None) -> Config:
    """Config from this job's arguments, or from jobs/reindex.py's subset (the rest default)."""
    overrides = {"out": out} if out else {}
    if "max_bytes" in vars(args):
        overrides["limits"] = images.Limits(args.max_bytes, args.max_pixels, args.min_side)
    return cli.config(Config, args, **overrides)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="output dataset URI (local path or s3://)")
    p.add_argument("--gpus", type=int, help=devices.GPUS_HELP)
    p.add_argument("--threads-per-actor", type=int, help="torch threads per CPU actor")
    p.add_argument(
        "--decode",
        choices=["auto", "actors", "tasks"],
        default="auto",
        help="decode in the embedding actors or in CPU tasks (auto: actors without GPUs)",
    )
    p.add_argument(
        "--keep-warm",
        dest="keep_warm_s",
        type=float,
        default=embed_pool.KEEP_WARM_S,
        help="seconds idle embedding actors stay up for the next job",
    )
    p.add_argument("--partition-size", type=int, default=1000, help="rows per output file")
    p.add_argument("--max-pixels", type=int, default=images.Limits.max_pixels)
    p.add_argument("--max-bytes", type=int, default=images.Limits.max_bytes)
    p.add_argument("--min-side", type=int, default=images.Limits.min_side)
    p.add_argument("--device", help="torch device for the actors (default: auto)")
    cli.add_s3_endpoint(p)
    p.add_argument("--overwrite", action="store_true", help="delete --out first")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    errors = (JobError, embed_pool.PoolError)
    return cli.exit_code("embed", lambda: run(config_from_args(args)), errors, log=True)


if __name__ == "__main__":
    sys.exit(main())
