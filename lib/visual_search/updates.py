"""The update log of Contract 5: durable, sequence-numbered upserts and deletes under
`{index_root}/updates/`, and their effect on one index version (`Overlay`).

The log is a chain of immutable segments `updates/segments/{n:012d}.parquet`, n = 1, 2, ...
Segment n holds the updates with seqs `first..last`, where `first` is segment n-1's `last` + 1.
A writer creates segment n only if it does not exist yet (conditional.create_exclusive), having read
segment n-1: any number of writers (ingress replicas, the stream job) share one log, and a writer
that loses a race reads the winner's segment and tries n+1. No seq is given twice or skipped.
Readers follow the chain by name (is segment n+1 there?), with no listing.

A version's manifest records `updates_through` = {"seq", "segment"}: what it folds in already.
New items get the global id DELTA_BASE + seq (no version's dense ids reach it), and live in
shard seq % shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from visual_search import conditional, schema, storage

log = logging.getLogger("visual_search.updates")

DELTA_BASE = 1 << 40
UPSERT, DELETE = "upsert", "delete"
MAX_SEGMENT_BYTES = 256 << 20
# Doc columns a PUT's metadata may not set: the log and the service own them.
RESERVED = frozenset({"id", "product_id", "image_uri", "embedding"})


class LogError(RuntimeError):
    """The log cannot be read or written (a broken chain, a malformed segment, no storage)."""


def model_key(model: dict) -> str:
    """A short fingerprint of a manifest's model dict: vectors are comparable only under one."""
    text = json.dumps(model, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def log_root(index_root: str) -> str:
    return storage.join(index_root, "updates")


def segment_uri(index_root: str, n: int) -> str:
    return storage.join(log_root(index_root), "segments", f"{n:012d}.parquet")


def image_uri(index_root: str, data: bytes, media_type: str | None) -> str:
    """Where a PUT's photo is kept: content-addressed, so a retried PUT writes the same name."""
    digest = hashlib.sha256(data).hexdigest()
    suffix = "." + (media_type or "x/img").split("/")[-1].replace("jpeg", "jpg")
    return storage.join(log_root(index_root), "images", digest[:2], f"{digest}{suffix}")


@dataclass(frozen=True)
class Update:
    op: str  # UPSERT or DELETE
    product_id: str
    image_uri: str | None = None
    metadata: dict = field(default_factory=dict)
    vector: np.ndarray | None = None  # float32 (d,), L2-normalised by the model
    model: str | None = None  # model_key of the vector
    source: str | None = None  # e.g. "feed:<file>#<row>": what made it (for idempotent feeds)
    seq: int = 0  # given when written

    @property
    def delta_id(self) -> int:
        return DELTA_BASE + self.seq


@dataclass(frozen=True)
class Position:
    """How far a reader or writer is: through `seq`, the last seq of segment `segment`."""

    seq: int = 0
    segment: int = 0

    @classmethod
    def of(cls, updates_through: dict | None) -> Position:
        d = updates_through or {}
        return cls(int(d.get("seq", 0)), int(d.get("segment", 0)))

    def as_dict(self) -> dict:
        return {"seq": self.seq, "segment": self.segment}


_SCHEMA_FIELDS = [
    ("seq", pa.int64()),
    ("op", pa.string()),
    ("product_id", pa.string()),
    ("image_uri", pa.string()),
    ("metadata", pa.string()),
    ("model", pa.string()),
    ("source", pa.string()),
    ("acked_unix", pa.float64()),
]


def _encode(updates: list[Update], first: int, dim: int) -> bytes:
    now = time.time()
    cols = {
        "seq": [first + i for i in range(len(updates))],
        "op": [u.op for u in updates],
        "product_id": [u.product_id for u in updates],
        "image_uri": [u.image_uri for u in updates],
        "metadata": [json.dumps(u.metadata, sort_keys=True) for u in updates],
        "model": [u.model for u in updates],
        "source": [u.source for u in updates],
        "acked_unix": [now] * len(updates),
    }
    arrays = [pa.array(cols[name], typ) for name, typ in _SCHEMA_FIELDS]
    vectors = np.zeros((len(updates), dim), np.float32)
    has = np.array([u.vector is not None for u in updates])
    for i, u in enumerate(updates):
        if u.vector is not None:
            vectors[i] = u.vector
    emb = schema.embedding_array(vectors)
    emb = pa.FixedSizeListArray.from_arrays(emb.values, dim, mask=pa.array(~has))
    names = [name for name, _ in _SCHEMA_FIELDS] + ["embedding"]
    table = pa.Table.from_arrays([*arrays, emb], names=names)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _decode(data: bytes, uri: str) -> list[Update]:
    try:
        table = pq.read_table(io.BytesIO(data))
        rows = table.drop_columns(["embedding"]).to_pylist()
        emb = table["embedding"].combine_chunks()
        dim = emb.type.list_size
        flat = emb.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        valid = emb.is_valid().to_numpy(zero_copy_only=False)
    except Exception as exc:
        raise LogError(f"{uri}: not an update segment: {exc}") from exc
    out = []
    for i, r in enumerate(rows):
        out.append(
            Update(
                op=r["op"],
                product_id=r["product_id"],
                image_uri=r["image_uri"],
                metadata=json.loads(r["metadata"] or "{}"),
                vector=flat[i].copy() if valid[i] else None,
                model=r["model"],
                source=r["source"],
                seq=int(r["seq"]),
            )
        )
    return out


def read_segment(index_root: str, n: int) -> list[Update] | None:
    """Segment n's updates in seq order; None when it does not exist (yet, or any more)."""
    uri = segment_uri(index_root, n)
    try:
        if not storage.exists(uri):  # the usual answer while following: one cheap probe
            return None
        data = storage.read_bytes(uri, MAX_SEGMENT_BYTES)
    except storage.StorageError as exc:
        raise LogError(str(exc)) from exc
    return _decode(data, uri)


def follow(index_root: str, after: Position) -> Iterator[tuple[Position, list[Update]]]:
    """(position after it, its updates) for every segment after `after`, in order, up to the
    last one written so far."""
    pos = after
    while (found := read_segment(index_root, pos.segment + 1)) is not None:
        if found and found[0].seq != pos.seq + 1:
            raise LogError(
                f"segment {pos.segment + 1} starts at seq {found[0].seq}, expected {pos.seq + 1}"
            )
        pos = Position(found[-1].seq if found else pos.seq, pos.segment + 1)
        yield pos, found


def tail(index_root: str, after: Position) -> Position:
    """The position of the last segment written, reading forward from `after`."""
    pos = after
    for later, _ in follow(index_root, after):
        pos = later
    return pos


def floor(index_root: str) -> Position:
    """The position up to which segments have been retired (updates/retired.json; nothing
    retired: Position())."""
    uri = storage.join(log_root(index_root), "retired.json")
    return Position.of(storage.read_json(uri)) if storage.exists(uri) else Position()


def retire(index_root: str, through: Position) -> int:
    """Delete the segments up to `through` (folded into versions no service reads any more);
    the floor is recorded first, so no writer ever re-creates a retired segment's name."""
    if through.segment <= floor(index_root).segment:
        return 0
    storage.write_json(storage.join(log_root(index_root), "retired.json"), through.as_dict())
    gone = 0
    for n in range(through.segment, 0, -1):
        uri = segment_uri(index_root, n)
        if not storage.exists(uri):
            break  # retired by an earlier call
        storage.delete(uri)
        gone += 1
    return gone


def check_reachable(index_root: str, start: Position) -> Position:
    """`start` when the log still has every segment after it; LogError when some are retired
    (a version that old cannot be brought up to date: serve a newer one)."""
    low = floor(index_root)
    if low.segment > start.segment:
        raise LogError(
            f"update log segments through {low.segment} are retired; a version folded up to "
            f"segment {start.segment} cannot follow it: publish a newer version (compact.py)"
        )
    return start


def snapshot(index_root: str, after: Position) -> Position:
    """The log's tail now, read from `after` (the live version's updates_through) or from the
    retired floor when that is further: what a catalog snapshot taken now already reflects."""
    low = floor(index_root)
    return tail(index_root, low if low.segment > after.segment else after)


class Writer:
    """Appends segments to one log; safe with any number of other writers (module docstring)."""

    def __init__(self, index_root: str, start: Position, dim: int):
        self.index_root, self.dim = index_root, dim
        self.position = start  # a guess: wrong guesses cost one read each

    def append(self, updates: list[Update]) -> list[Update]:
        """Write `updates` as one segment (durable when this returns); they come back with
        their seqs."""
        if not updates:
            return []
        self.position = snapshot(self.index_root, self.position)
        while True:
            n, first = self.position.segment + 1, self.position.seq + 1
            data = _encode(updates, first, self.dim)
            if conditional.create_exclusive(segment_uri(self.index_root, n), data):
                self.position = Position(first + len(updates) - 1, n)
                return [dataclasses.replace(u, seq=first + i) for i, u in enumerate(updates)]
            self.position = tail(self.index_root, self.position)  # another writer won n


class Overlay:
    """The log's effect on one version: tombstoned ids, and the docs of new items.

    `base_ids_of(product_id)` gives the version's own ids of a product. `on_add(update)` sees
    every upsert whose vector is usable (same model as the version), to index it.
    """

    def __init__(
        self,
        base_ids_of: Callable[[str], np.ndarray],
        start: Position,
        model: str,
        on_add: Callable[[Update], None] | None = None,
    ):
        self.base_ids_of, self.model, self.on_add = base_ids_of, model, on_add
        self.position = start
        self.dead: set[int] = set()  # ids never to be answered again
        self.gone: set[str] = set()  # products whose version rows are dead
        self.live: dict[str, int] = {}  # product -> the delta id of its latest upsert
        self.rows: dict[int, dict] = {}  # delta id -> its doc (product_id, image_uri, metadata)
        self.unusable = 0  # upserts whose vector came from another model (not searchable)
        self.version = 0  # bumped on every change (caches key on it)

    @property
    def seq(self) -> int:
        return self.position.seq

    def apply(self, pos: Position, updates: list[Update]) -> None:
        """Apply one segment (read at `pos`); a segment applied already is a no-op, so two
        readers racing to catch one overlay up cannot apply anything twice."""
        if pos.segment <= self.position.segment:
            return
        for u in updates:
            if u.seq <= self.position.seq:
                continue
            self._remove(u.product_id)
            if u.op == UPSERT:
                self._add(u)
        self.position = pos
        self.version += 1

    def _remove(self, product_id: str) -> None:
        if product_id not in self.gone:
            self.dead.update(int(i) for i in self.base_ids_of(product_id))
            self.gone.add(product_id)
        old = self.live.pop(product_id, None)
        if old is not None:
            self.dead.add(old)
            self.rows.pop(old, None)

    def _add(self, u: Update) -> None:
        gid = u.delta_id
        self.live[u.product_id] = gid
        self.rows[gid] = {**u.metadata, "product_id": u.product_id, "image_uri": u.image_uri}
        if u.vector is None or u.model != self.model:
            self.unusable += 1
            log.warning("update %d (%r): other model; not searchable", u.seq, u.product_id)
            return
        if self.on_add is not None:
            self.on_add(u)

    def ids_of(self, product_id: str) -> np.ndarray | None:
        """The product's ids after the log (None: the log has not touched it)."""
        if product_id in self.live:
            return np.array([self.live[product_id]], np.int64)
        if product_id in self.gone:
            return np.zeros(0, np.int64)
        return None

    def catch_up(self, index_root: str) -> int:
        """Apply every segment written since; returns how many updates that was."""
        n = 0
        for pos, found in follow(index_root, self.position):
            self.apply(pos, found)
            n += len(found)
        return n
