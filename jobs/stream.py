"""Follow a change feed into the update log (Contract 5): at-least-once input, exactly-once effect.

    python jobs/stream.py --index-root URI --feed URI [--poll-s S] [--batch-rows N] [--once]
        [--s3-endpoint URL]

The feed is a folder or prefix where CSV files land; they are processed in file-name order
(names are paths below the feed; hidden names, "." or "_" first, are skipped). Each file has a
header `op,product_id,image_uri[,metadata columns...]` and rows
- `upsert,<product_id>,<image_uri>,...`: the photo is decoded and embedded with the live
  version's model; image URIs may be relative to the file's folder;
- `delete,<product_id>,,...`: the image and metadata cells are ignored.
Metadata cells become the update's metadata dict; an empty cell means "no value" (the key is
left out, since an upsert replaces all of a product's metadata); columns the live version
declares numeric filter fields become floats. Row N is the N-th record after the header.

Rules for producers: a file is immutable once landed. Write it atomically (to a hidden name,
then rename; one PUT on S3); a file that changes after it was read is never read again (a
warning says so). File names must be unique among all feeds of one index root: log entries
name their row as source `feed:<file name>#<row>`.

Micro-batches of --batch-rows rows are decoded (CPU tasks) and embedded (actor pool, a GPU per
actor when the cluster has one) with Ray Data, a round of --round-batches batches per pipeline
(the model loads once per round), and each batch is written to the log as one segment.
Bad images and malformed rows become error records, one JSON object per row at
`{index_root}/updates/errors/{feed key}/{file}/{row:08d}.json` (file, row, product_id,
image_uri, error, detail), written before the batch's segment: a retried row rewrites the
same object, so a crash never leaves one twice.

Exactly once: `{index_root}/updates/feeds/{feed key}.json` (rewritten after every batch) holds
the files done, the rows handled in files still in progress, and the log position it reflects.
On start, the log segments after that position are scanned for this feed's sources, so a batch
whose segment landed just before a crash is not written again. One stream job per feed.

Runs until SIGTERM or SIGINT (the batch in hand is finished; exit 0); --once processes what is
there and exits. Progress goes to stdout every few seconds (and to Ray metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import cli
from visual_search import (
    cluster,
    devices,
    embed_pool,
    embedders,
    images,
    pipeline,
    schema,
    storage,
    updates,
    versions,
)
from visual_search.feed import (
    DETAIL_MAX,
    FeedError,
    FeedState,
    Row,
    error_uri,
    list_feed,
    parse_file,
)
from visual_search.updates import DELETE, UPSERT, Position, Update

MAX_FILE_BYTES = 256 << 20
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # finish the batch in hand, exit 0


@dataclass(frozen=True)
class Config:
    index_root: str
    feed: str
    poll_s: float = 2.0
    batch_rows: int = 64
    round_batches: int = 8  # batches embedded per round (the actors stay warm between rounds)
    once: bool = False
    s3_endpoint: str | None = None
    progress_every_s: float = 5.0
    gpus: int | None = None
    device: str | None = None
    embed_batch_size: int = 32
    decode_batch_size: int = 8
    limits: images.Limits = images.Limits()


class StreamError(RuntimeError):
    """The stream cannot start or go on (no live version, a broken log or checkpoint)."""


# ------------------------------------------------------------------------ embedding


def embed_uris(cfg: Config, model: dict, table: pa.Table) -> Iterator[pa.Table]:
    """(row, image_uri) -> batches of (row, embedding | null, error, detail), in input order
    (batches are committed in feed order as soon as their rows are embedded), on the warm
    embedding actors of the live version's model (embed_pool.py)."""
    pool = _pool(cfg, model)
    mode = model.get("preprocess", {}).get("mode", "pad")
    preprocess = embedders.preprocess_for(model["model_id"], mode)
    if pool.decodes:
        size = cfg.embed_batch_size
        blocks = [table.slice(i, size) for i in range(0, len(table), size)]
        yield from pool.map(blocks, (preprocess, cfg.limits), ordered=True)
        return
    yield from pool.map(embed_pool.blocks_of(_decoded(cfg, preprocess, table)), None, ordered=True)


def _pool(cfg: Config, model: dict) -> embed_pool.Pool:
    """The live model's actors: from_model_dict refuses weights other than the version's."""
    build = functools.partial(embedders.from_model_dict, model, device=cfg.device)
    gpus = devices.cluster_gpus(cfg.gpus)
    env = cluster.runtime_env()
    return embed_pool.Pool(build, {**model, "device": cfg.device}, gpus, runtime_env=env).start()


def _decoded(cfg: Config, preprocess: images.Preprocess, table: pa.Table):
    """Ray Data decoding in CPU tasks (GPU actors), keeping the feed's order."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    # Set before the dataset is made, which takes its own copy of the context.
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    try:
        block = max(1, min(cfg.decode_batch_size, math.ceil(len(table) / 4)))
        ds = ray.data.from_arrow([table.slice(i, block) for i in range(0, len(table), block)])
        decode = {"preprocess": preprocess, "limits": cfg.limits}
        return pipeline.decode_stage(ds, {**decode, "batch_size": cfg.decode_batch_size})
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def _results(batch: pa.Table) -> dict[int, tuple[np.ndarray | None, str | None, str | None]]:
    """An embed_uris batch as {row: (vector | None, error, detail)}."""
    ok = pc.is_valid(batch["embedding"]).to_numpy(zero_copy_only=False)
    vectors = schema.embedding_matrix(batch["embedding"].filter(pa.array(ok)))
    good = iter(vectors)
    rows, errors, details = (batch[c].to_pylist() for c in ("row", "error", "detail"))
    return {
        r: (next(good) if k else None, e, d)
        for r, k, e, d in zip(rows, ok, errors, details, strict=True)
    }


# ------------------------------------------------------------------------ the job


class _Progress:
    """Progress lines every few seconds on stdout, and the same numbers as Ray metrics."""

    def __init__(self, every_s: float):
        from ray.util import metrics

        self.every_s, self.start, self.last = every_s, time.monotonic(), 0.0
        self.rows = self.errors = self.written = 0
        self.rows_metric = metrics.Counter("visual_search_stream_rows", "feed rows handled")
        self.lag_metric = metrics.Gauge("visual_search_stream_lag_rows", "feed rows pending")
        self.seq_metric = metrics.Gauge("visual_search_stream_last_seq", "last seq written")

    def add(self, rows: int, errors: int, written: int) -> None:
        self.rows += rows
        self.errors += errors
        self.written += written
        if rows:
            self.rows_metric.inc(rows)

    def rate(self) -> float:
        return self.rows / max(time.monotonic() - self.start, 1e-9)

    def report(self, lag_rows: int, lag_files: int, seq: int, force: bool = False) -> None:
        now = time.monotonic()
        self.lag_metric.set(lag_rows)
        self.seq_metric.set(seq)
        if force or now - self.last >= self.every_s:
            self.last = now
            print(
                f"[stream] lag {lag_rows:,} rows + {lag_files:,} unread files; {self.rows:,} rows "
                f"({self.written:,} written, {self.errors:,} errors) at {self.rate():.1f} rows/s; "
                f"last seq {seq}",
                flush=True,
            )


class _Stream:
    """One stream job's state: the live version, the log writer, the feed's files and rows."""

    def __init__(self, cfg: Config, stop: threading.Event):
        self.cfg, self.stop = cfg, stop
        self.state = FeedState.load(cfg.index_root, cfg.feed)
        self.rows: dict[str, list[Row]] = {}  # parsed files not done yet
        self.sizes: dict[str, int] = {}
        self.warned: set[str] = set()
        self.version = self.writer = None
        self.progress = _Progress(cfg.progress_every_s)

    def live(self) -> None:
        """Follow CURRENT: upserts are embedded with the live version's model."""
        name = versions.current(self.cfg.index_root)
        if self.version is not None and name == self.version.manifest.version:
            return
        try:
            self.version = versions.open_version(self.cfg.index_root, name)
        except (FileNotFoundError, ValueError) as exc:
            raise StreamError(str(exc)) from exc
        m = self.version.manifest
        start = max(self.state.position, Position.of(m.updates_through), key=lambda p: p.segment)
        self.writer = updates.Writer(self.cfg.index_root, start, m.dim)
        self.model_key = updates.model_key(m.model)
        self.numbers = frozenset(c for c, t in self.version.filterable.items() if t == "number")

    def scan(self) -> None:
        """Pick up newly landed files; warn once about done files that changed."""
        for name, size in list_feed(self.cfg.feed).items():
            if name in self.state.done:
                if size != self.state.done[name] and name not in self.warned:
                    self.warned.add(name)
                    print(f"[stream] warning: {name} changed after it was read; not re-read")
            else:
                self.sizes.setdefault(name, size)

    def _rows_of(self, name: str) -> list[Row]:
        if name not in self.rows:
            uri = storage.join(self.cfg.feed, name)
            try:
                data = storage.read_bytes(uri, MAX_FILE_BYTES)
            except storage.TooLarge as exc:
                self.rows[name] = [Row(name, 0, error="too_large", detail=str(exc)[:DETAIL_MAX])]
            else:
                self.rows[name] = parse_file(name, uri, data, self.numbers)
        return self.rows[name]

    def pending(self, limit: int) -> list[Row]:
        """Up to `limit` rows not yet handled, in feed order; files found all done are marked."""
        out: list[Row] = []
        for name in sorted(self.sizes):
            handled = self.state.handled.get(name, set())
            todo = [r for r in self._rows_of(name) if r.row not in handled]
            if not todo:
                self._finish(name)
                continue
            out.extend(todo[: limit - len(out)])
            if len(out) >= limit:
                break
        return out

    def _finish(self, name: str) -> None:
        self.state.done[name] = self.sizes.pop(name)
        self.state.handled.pop(name, None)
        self.rows.pop(name, None)

    def lag(self) -> tuple[int, int]:
        """(rows pending in files read, files not read yet)."""
        rows = sum(
            len(self.rows[n]) - len(self.state.handled.get(n, ()))
            for n in self.sizes
            if n in self.rows
        )
        return rows, sum(1 for n in self.sizes if n not in self.rows)

    def report(self, force: bool = False) -> None:
        self.progress.report(*self.lag(), self.state.position.seq, force)

    def run_round(self) -> int:
        """Embed and commit up to one round of pending rows; returns how many were handled."""
        self.live()
        rows = self.pending(self.cfg.batch_rows * self.cfg.round_batches)
        ups = [i for i, r in enumerate(rows) if r.error is None and r.op == UPSERT]
        uris = [rows[i].image_uri for i in ups]
        table = pa.table(
            {"row": pa.array(ups, pa.int64()), "image_uri": pa.array(uris, pa.string())}
        )
        batches = embed_uris(self.cfg, self.version.manifest.model, table)
        results: dict[int, tuple] = {}
        done = 0
        try:
            for lo in range(0, len(rows), self.cfg.batch_rows):
                hi = min(lo + self.cfg.batch_rows, len(rows))
                while any(i not in results for i in ups if lo <= i < hi):
                    if (batch := next(batches, None)) is None:
                        raise StreamError("the embedding pipeline ended before every row came out")
                    results.update(_results(batch))
                self._commit(rows[lo:hi], [results.get(i) for i in range(lo, hi)])
                done += hi - lo
                self.report()
                if self.stop.is_set():
                    break
        finally:
            batches.close()  # a generator not started yet: no pipeline ever ran
        return done

    def _commit(self, rows: list[Row], embedded: list[tuple | None]) -> None:
        """Errors first (idempotent by name), then the segment, then the checkpoint."""
        good, bad = [], []
        for row, res in zip(rows, embedded, strict=True):
            if res is not None and res[0] is None:
                row = dataclasses.replace(row, error=res[1], detail=res[2])
            if row.error:
                bad.append(row)
            else:
                good.append(self._update(row, res))
        for row in bad:
            self._write_error(row)
        written = self.writer.append(good)
        if written:
            self.state.position = self.writer.position
        for row in rows:
            self.state.handled.setdefault(row.file, set()).add(row.row)
        for name in {r.file for r in rows}:
            if all(r.row in self.state.handled[name] for r in self.rows[name]):
                self._finish(name)
        self.state.save(self.cfg.index_root, self.cfg.feed)
        self.progress.add(len(rows), len(bad), len(written))

    def _update(self, row: Row, res: tuple | None) -> Update:
        if row.op == DELETE:
            return Update(DELETE, row.product_id, source=row.source)
        return Update(
            UPSERT, row.product_id, row.image_uri, row.metadata, res[0], self.model_key, row.source
        )

    def _write_error(self, row: Row) -> None:
        record = {
            "file": row.file,
            "row": row.row,
            "product_id": row.product_id or None,
            "image_uri": row.image_uri,
            "error": row.error,
            "detail": row.detail,
            "feed": storage.normalize(self.cfg.feed),
            "unix": time.time(),
        }
        storage.write_json(error_uri(self.cfg.index_root, self.cfg.feed, row.file, row.row), record)


def run(cfg: Config, stop: threading.Event | None = None) -> dict:
    """Follow the feed until `stop` is set (or, with cfg.once, until nothing is pending);
    returns the counts of this run."""
    if cfg.s3_endpoint:
        storage.configure(cfg.s3_endpoint)
    if cfg.batch_rows < 1 or cfg.round_batches < 1 or cfg.poll_s < 0:
        raise ValueError("--batch-rows and --round-batches must be >= 1, --poll-s >= 0")
    if not storage.exists(cfg.feed) and cfg.once:
        raise ValueError(f"{cfg.feed}: no such feed folder or prefix")
    stop = stop or threading.Event()
    cluster.init()
    job = _Stream(cfg, stop)
    job.live()
    print(
        f"[stream] {cfg.feed} -> {cfg.index_root} (version {job.version.manifest.version}); "
        f"from seq {job.state.position.seq}, {len(job.state.done)} files done",
        flush=True,
    )
    while not stop.is_set():
        if storage.exists(cfg.feed):
            job.scan()
        if job.run_round() == 0:
            if cfg.once:
                break
            job.report()
            stop.wait(cfg.poll_s)
    job.report(force=True)
    p = job.progress
    return {
        "rows": p.rows,
        "written": p.written,
        "errors": p.errors,
        "last_seq": job.state.position.seq,
        "rows_per_s": round(p.rate(), 2),
    }


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_index_root(p, "index root URI (CURRENT, updates/)")
    p.add_argument("--feed", required=True, help="folder or prefix where the CSV files land")
    p.add_argument("--poll-s", type=float, default=Config.poll_s, help="seconds between listings")
    p.add_argument("--batch-rows", type=int, default=Config.batch_rows, help="rows per segment")
    p.add_argument(
        "--round-batches",
        type=int,
        default=Config.round_batches,
        help="batches per Ray Data pipeline",
    )
    p.add_argument("--once", action="store_true", help="process what is there, then exit")
    p.add_argument("--gpus", type=int, help=devices.GPUS_HELP)
    p.add_argument("--device", help="torch device for the actors (default: auto)")
    cli.add_s3_endpoint(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop = threading.Event()
    cluster.init()  # first: Ray's own SIGTERM handler (abort) must not replace ours
    saved = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    try:
        errors = (StreamError, FeedError, updates.LogError)
        return cli.exit_code("stream", lambda: run(cli.config(Config, args), stop), errors)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
