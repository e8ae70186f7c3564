"""The update log inside the service (Contract 5): following it, a shard's live view of one
version (tombstones + a delta index of new vectors), and group commit of the ingress's writes.

Every shard replica and every ingress replica follows the log by itself (updates.follow, every
POLL_S): there is no coordinator to fail. A shard answers with the seq it reflects; the ingress
answers with the smallest seq of its own docs and the shards it heard from.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from visual_search import background, filters, index, query, storage, updates
from visual_search.manifest import check_relative
from visual_search.search import merge_topk
from visual_search.versions import Version

log = logging.getLogger("visual_search.live")

POLL_S = 0.1  # how often a replica looks for the next segment (one existence check)
STALE_WAIT_S = 3.0  # how long min_seq waits for a replica to catch up before "stale"
MAX_COMMIT = 256  # updates per group-committed segment


class Follower:
    """Keeps one Overlay caught up with the log; reads off the event loop, applies under
    `lock` (a shard's searches run in threads)."""

    def __init__(self, index_root: str, overlay: updates.Overlay, lock=None):
        self.index_root, self.overlay = index_root, overlay
        self.lock = lock or contextlib.nullcontext()

    async def catch_up(self) -> int:
        start = self.overlay.position
        # Read at low priority: on a busy replica the searches go first. Applied here, at the
        # searches' priority, since they wait on the lock.
        found = await background.run(lambda: list(updates.follow(self.index_root, start)))
        with self.lock:
            for pos, batch in found:
                self.overlay.apply(pos, batch)
        return sum(len(batch) for _, batch in found)

    async def wait_for(self, seq: int, timeout_s: float = STALE_WAIT_S) -> bool:
        """True once the overlay reflects `seq` (False after timeout_s)."""
        deadline = time.monotonic() + timeout_s
        while self.overlay.seq < seq:
            await self.catch_up()
            if self.overlay.seq >= seq or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        return self.overlay.seq >= seq


async def follow_forever(targets: Callable[[], list[Follower]], poll_s: float = POLL_S) -> None:
    """Catch every follower `targets()` names up, forever (a replica's background task). A log
    that cannot be read is logged (once a minute) and retried: searches go on, on older data."""
    last_warning = 0.0
    while True:
        for follower in targets():
            try:
                await follower.catch_up()
            except (updates.LogError, OSError) as exc:
                if time.monotonic() - last_warning > 60:
                    log.warning("cannot follow the update log: %s", exc)
                    last_warning = time.monotonic()
        await asyncio.sleep(poll_s)


def empty_index(version: Version) -> faiss.Index:
    """An empty copy of the trained template the version's shards were filled from; a flat
    index of the same metric for versions built before templates were kept."""
    m = version.manifest
    if m.template:
        data = storage.read_bytes(storage.join(version.root, check_relative(m.template["file"])))
        if hashlib.sha256(data).hexdigest() != m.template["sha256"]:
            raise ValueError(f"version {m.version}: template.faiss fails its checksum")
        return index.from_bytes(data)
    metric = faiss.METRIC_INNER_PRODUCT if m.metric == "ip" else faiss.METRIC_L2
    return faiss.IndexIDMap2(faiss.IndexFlat(m.dim, metric))


@dataclass(frozen=True)
class _Snapshot:
    """What one search needs from the overlay, taken under the lock."""

    seq: int
    dead: np.ndarray  # tombstoned ids in this shard's base range
    delta_ids: np.ndarray  # live new ids this shard holds
    delta_rows: tuple[dict, ...]  # their docs

    @functools.cached_property
    def delta_docs(self) -> pa.Table:
        """The new items' docs as a table, for filters: built only when a filter needs it."""
        return pa.Table.from_pylist(list(self.delta_rows))


class LiveShard:
    """One shard of one version plus the update log: the version's vectors minus tombstones,
    and the new vectors of seq % shards == this shard in a delta index built from the same
    template (so compaction folds them in unchanged)."""

    def __init__(self, version: Version, i: int, index_root: str, mmap: bool = True):
        m = version.manifest
        self.base = query.ShardIndex(version, i, mmap)
        self.i, self.n, self.metric = i, len(m.shards), m.metric
        self.lo, self.hi = self.base.lo, self.base.hi
        self.delta = empty_index(version)
        self.vectors: dict[int, np.ndarray] = {}
        self.lock = threading.Lock()
        key = updates.model_key(m.model)
        start = updates.check_reachable(index_root, updates.Position.of(m.updates_through))
        self.overlay = updates.Overlay(self.base.ids_of, start, key, self._add)
        self.follower = Follower(index_root, self.overlay, self.lock)
        self._snap: _Snapshot | None = None
        self._snap_at = -1

    def _add(self, u: updates.Update) -> None:
        if u.seq % self.n == self.i:
            self.delta.add_with_ids(u.vector[None], np.array([u.delta_id], np.int64))
            self.vectors[u.delta_id] = u.vector

    def _snapshot(self) -> _Snapshot:
        """Under the lock: rebuilt only when the overlay has changed."""
        ov = self.overlay
        if self._snap_at != ov.version:
            dead = np.array(sorted(g for g in ov.dead if self.lo <= g < self.hi), np.int64)
            mine = [g for g in ov.live.values() if g in self.vectors]
            rows = tuple({**ov.rows[g], "id": g} for g in mine)
            self._snap = _Snapshot(ov.seq, dead, np.array(mine, np.int64), rows)
            self._snap_at = ov.version
        return self._snap

    def search(self, vectors: np.ndarray, k: int, flt: filters.Filter | None = None):
        """(scores, ids, seq): the k nearest live items, and the log seq they reflect."""
        with self.lock:
            snap = self._snapshot()
            delta = self._delta_search(snap, vectors, k, flt)
        base = self.base.search(vectors, k, flt, snap.dead)
        return (*merge_topk([base, delta], k, self.metric), snap.seq)

    def _delta_search(self, snap: _Snapshot, vectors: np.ndarray, k: int, flt):
        n = len(vectors)
        worst = -np.inf if self.metric == "ip" else np.inf
        empty = np.full((n, k), worst, np.float32), np.full((n, k), -1, np.int64)
        allowed = snap.delta_ids
        if flt and len(allowed):
            try:
                allowed = flt.ids(snap.delta_docs)
            except filters.FilterError:  # a field no new item has
                allowed = allowed[:0]
        if not len(allowed):
            return empty
        # The delta is small (compaction keeps it so): rank all of it, then keep the allowed.
        scores, ids = index.search(self.delta, vectors, self.delta.ntotal, self.base.params)
        out_s, out_i = empty
        for row in range(n):
            keep = np.isin(ids[row], allowed)
            found_s, found_i = scores[row][keep][:k], ids[row][keep][:k]
            out_s[row, : len(found_i)], out_i[row, : len(found_i)] = found_s, found_i
        return out_s, out_i

    def text_search(self, text: str, k: int, flt: filters.Filter | None = None):
        """(scores, ids, seq) by BM25 over the version's docs, tombstones left out (new items
        have no text index until compaction)."""
        with self.lock:
            snap = self._snapshot()
        scores, ids = self.base.text_search(text, k + len(snap.dead), flt)
        keep = ~np.isin(ids[0], snap.dead)
        out_s = np.full((1, k), -np.inf, np.float32)
        out_i = np.full((1, k), -1, np.int64)
        found_s, found_i = scores[0][keep][:k], ids[0][keep][:k]
        out_s[0, : len(found_i)], out_i[0, : len(found_i)] = found_s, found_i
        return out_s, out_i, snap.seq

    def reconstruct(self, gid: int) -> np.ndarray:
        if gid >= updates.DELTA_BASE:
            with self.lock:
                return self.vectors[gid]
        return self.base.reconstruct(gid)


def shard_of(gid: int, shards: int, ranges: list[tuple[int, int]]) -> int | None:
    """The shard holding a global id: new items by seq, the version's own by id range."""
    if gid >= updates.DELTA_BASE:
        return (gid - updates.DELTA_BASE) % shards
    return next((i for i, (lo, hi) in enumerate(ranges) if lo <= gid < hi), None)


class Committer:
    """Group commit: updates submitted while a segment is being written go into the next one
    together, so concurrent writes cost one durable write per batch, not one each."""

    def __init__(self, writer: updates.Writer):
        self.writer = writer
        self.pending: list[tuple[updates.Update, asyncio.Future]] = []
        self.task: asyncio.Task | None = None

    async def submit(self, update: updates.Update) -> updates.Update:
        """The update with its seq, once durable in the log (raises when it could not be)."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((update, future))
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:MAX_COMMIT], self.pending[MAX_COMMIT:]
            try:
                written = await asyncio.to_thread(self.writer.append, [u for u, _ in batch])
            except Exception as exc:  # nothing of this batch is acknowledged
                for _, future in batch:
                    future.set_exception(exc)
            else:
                for (_, future), done in zip(batch, written, strict=True):
                    future.set_result(done)


def check_metadata(metadata: dict, docs: pa.Table) -> dict:
    """A PUT's metadata as doc fields: only the catalog's own columns, each of its type;
    ValueError naming the first problem."""
    allowed = {f.name: f.type for f in docs.schema if f.name not in updates.RESERVED}
    out = {}
    for key, value in metadata.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise ValueError(f"metadata field {key!r} is not a catalog column (known: {known})")
        typ = allowed[key]
        typ = typ.value_type if pa.types.is_dictionary(typ) else typ
        numeric = pa.types.is_integer(typ) or pa.types.is_floating(typ)
        ok = (
            value is None
            or (numeric and isinstance(value, int | float) and not isinstance(value, bool))
            or (pa.types.is_string(typ) and isinstance(value, str) and len(value) <= 10_000)
            or (pa.types.is_boolean(typ) and isinstance(value, bool))
        )
        if not ok:
            raise ValueError(f"metadata field {key!r} must be of type {typ}, not {value!r:.100}")
        out[key] = value
    return out
