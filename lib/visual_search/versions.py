"""Index versions under {index_root}: naming, CURRENT, opening for search, pruning.

A version folder counts as complete only once its manifest.json exists (written last) and no
PENDING marker (a gate still to pass) does, and CURRENT moves only forward, by compare-and-swap,
to a complete version; readers open versions through CURRENT. history/ records each move, so
prune spares what replicas may still serve.
"""

from __future__ import annotations

import calendar
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass

import faiss
import pyarrow as pa

from visual_search import conditional, docstore, fulltext, index, storage, updates
from visual_search.manifest import IndexManifest

log = logging.getLogger(__name__)


_last_ns = 0
# A version CURRENT named this recently may still be served (replicas switch in seconds).
RECENT_S = 600.0
# An incomplete version younger than this is another build in flight, not garbage.
GRACE_S = 24 * 3600.0
# Written before the manifest of a version a gate has yet to pass; deleted once it passes.
PENDING = "PENDING"
HISTORY = "history"  # {index_root}/history/{ns}-{hex}.json: one per move of CURRENT
# What new_version_id makes, and what CURRENT and callers may name: one plain folder name.
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_version_id(name: str) -> bool:
    """A plain version id: one folder name, no "/", ".." or absolute path."""
    return isinstance(name, str) and bool(_VERSION.fullmatch(name)) and ".." not in name


def check_version(name: str) -> str:
    """`name` when it is a plain version id, else ValueError."""
    if not is_version_id(name):
        raise ValueError(f"{name!r} is not a version id (letters, digits, '.', '_', '-')")
    return name


def new_version_id() -> str:
    """Sortable by creation time (microseconds, strictly increasing within a process), unique
    across concurrent builds (random suffix)."""
    global _last_ns
    ns = max(time.time_ns(), _last_ns + 1000)
    _last_ns = ns
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 10**9))
    return f"{stamp}.{ns // 1000 % 10**6:06d}Z-{uuid.uuid4().hex[:6]}"


def version_root(index_root: str, version: str) -> str:
    return storage.join(index_root, "versions", check_version(version))


class Superseded(RuntimeError):
    """CURRENT already names this version or a newer one: moving it would go backwards."""


def _parse(uri: str, raw: bytes | None) -> str | None:
    name = (raw or b"").decode("utf-8", "replace").strip()
    if not name:
        return None
    try:
        return check_version(name)
    except ValueError as exc:
        raise ValueError(f"{uri}: {exc}") from None


def current(index_root: str) -> str | None:
    """The live version named by CURRENT, or None before the first publish."""
    uri = storage.join(index_root, "CURRENT")
    if not storage.exists(uri):
        return None
    return _parse(uri, storage.read_bytes(uri, 4096))


def set_current(index_root: str, version: str) -> str | None:
    """Move CURRENT forward to a complete `version` by compare-and-swap (a conditional PUT on
    S3, a locked check-and-rename locally); returns the version it replaced.

    Raises Superseded when CURRENT names `version` or a newer one (ids sort by creation time),
    so two racing builds never move it backwards; the move is recorded in history/ first, so
    prune spares the replaced version for RECENT_S."""

    def refuse(live: str | None) -> None:
        if live is not None and live >= version:
            raise Superseded(f"CURRENT names {live}, not older than {version}; not moving it")
        if not is_complete(index_root, version):
            raise ValueError(
                f"version {version} is not complete (no manifest.json, or its gate pending); "
                "refusing to make it CURRENT"
            )

    return _move_current(index_root, version, refuse)


def _move_current(index_root: str, version: str, refuse, rollback: bool = False) -> str | None:
    """CURRENT -> `version` by compare-and-swap, recorded in history/ first; refuse(live)
    raises when the move is not allowed from what CURRENT names now. Returns the replaced."""
    uri = storage.join(index_root, "CURRENT")
    while True:
        raw = storage.read_bytes(uri, 4096) if storage.exists(uri) else None
        live = _parse(uri, raw)
        refuse(live)
        _record(index_root, live, version, rollback)
        if conditional.swap(uri, raw, (version + "\n").encode()):
            return live


def roll_back(index_root: str, version: str) -> str:
    """Move CURRENT back to an older complete `version` (an operator undoing a bad publish), by
    the same compare-and-swap; returns the version it replaced. Refused when `version` is not
    older than CURRENT, or is so old that the update log no longer holds the updates it would
    need (updates.check_reachable: they would be lost). The versions rolled back from stay (a
    complete version newer than CURRENT is never pruned) until a newer build publishes."""
    check_version(version)
    if not is_complete(index_root, version):
        raise ValueError(f"version {version} is not complete; refusing to make it CURRENT")
    manifest = storage.read_json(storage.join(version_root(index_root, version), "manifest.json"))
    updates.check_reachable(index_root, updates.Position.of(manifest.get("updates_through")))

    def refuse(live: str | None) -> None:
        if live is None or live <= version:
            raise ValueError(
                f"CURRENT names {live}, not newer than {version}: nothing to roll back"
            )

    return _move_current(index_root, version, refuse, rollback=True)


def _record(index_root: str, before: str | None, after: str, rollback: bool = False) -> None:
    ns = time.time_ns()
    entry = {"from": before, "to": after, "unix": ns / 1e9}
    if rollback:
        entry["rollback"] = True
    name = f"{ns:020d}-{uuid.uuid4().hex[:8]}.json"
    storage.write_bytes(storage.join(index_root, HISTORY, name), json.dumps(entry).encode())


def recently_current(index_root: str, recent_s: float | None = None) -> set[str]:
    """Versions CURRENT named within the last `recent_s` seconds (RECENT_S), from history/;
    history entries older than GRACE_S are deleted on the way."""
    root = storage.join(index_root, HISTORY)
    if not storage.exists(root):
        return set()
    now = time.time()
    cutoff = now - (RECENT_S if recent_s is None else recent_s)
    out: set[str] = set()
    for e in storage.list_files(root, (".json",)):
        stamp = e.uri.rsplit("/", 1)[1].split("-", 1)[0]
        if not stamp.isdigit():
            continue  # another writer's temp file, or not an entry
        unix = int(stamp) / 1e9
        if unix < now - GRACE_S:
            storage.delete(e.uri)
        elif unix >= cutoff:
            entry = json.loads(storage.read_bytes(e.uri, 4096))
            out.update(v for v in (entry.get("from"), entry.get("to")) if is_version_id(v or ""))
    return out


def is_complete(index_root: str, version: str) -> bool:
    """Has its manifest, and no gate still to pass (no PENDING)."""
    root = version_root(index_root, version)
    return storage.exists(storage.join(root, "manifest.json")) and not storage.exists(
        storage.join(root, PENDING)
    )


def created_unix(version: str) -> float:
    """When a version id was made (0.0 for ids new_version_id did not make)."""
    try:
        return float(calendar.timegm(time.strptime(version[:15], "%Y%m%dT%H%M%S")))
    except ValueError:
        return 0.0


def list_versions(index_root: str) -> dict[str, bool]:
    """version -> complete (has its manifest, no PENDING), for every folder under versions/."""
    root = storage.join(index_root, "versions")
    if not storage.exists(root):
        return {}
    files: dict[str, set[str]] = {}
    base = storage.normalize(root)
    for e in storage.list_files(root):
        name, _, rest = e.uri[len(base) + 1 :].partition("/")
        if is_version_id(name):  # else not a version folder this code wrote (never pruned)
            files.setdefault(name, set()).add(rest)
    return {v: "manifest.json" in f and PENDING not in f for v, f in sorted(files.items())}


def prune(
    index_root: str, keep: int, newest: str, protect: tuple[str | None, ...] = ()
) -> list[str]:
    """Delete all but the `keep` newest complete versions, and incomplete folders older than
    GRACE_S (failed builds). Never deleted: CURRENT, `newest`, `protect`, a version CURRENT named
    within RECENT_S (still served), a complete version newer than CURRENT (about to be
    published) and an incomplete one younger than GRACE_S (a build in flight)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    live = current(index_root)
    versions = list_versions(index_root)
    complete = [v for v, ok in versions.items() if ok]
    keep_set = set(complete[-keep:]) | {live, newest, *protect} | recently_current(index_root)
    young = time.time() - GRACE_S
    doomed = [
        v
        for v, ok in versions.items()
        if v not in keep_set and (created_unix(v) < young or (ok and live is not None and v < live))
    ]
    for v in doomed:
        storage.delete(version_root(index_root, v))
    return doomed


def withdraw(index_root: str, version: str) -> None:
    """Remove a version that must not be published (a gate refused it): its manifest first, so
    it is never seen complete again even if removing the rest fails."""
    if version == current(index_root):
        raise ValueError(f"version {version} is CURRENT; refusing to withdraw it")
    root = version_root(index_root, version)
    storage.delete(storage.join(root, "manifest.json"))
    storage.delete(root)


def evict_unused(index_root: str, loaded: str) -> list[str]:
    """Drop this node's S3 cache copies and mapped docs of versions not in use: in use are
    `loaded`, CURRENT and those CURRENT named within RECENT_S (other replicas may still serve
    them)."""
    use = {loaded, current(index_root), *recently_current(index_root)} - {None}
    gone = docstore.evict(index_root, use)
    if storage.is_s3(index_root):
        keep = {version_root(index_root, v) for v in use}
        gone += storage.evict_cache(storage.join(index_root, "versions"), keep)
    return gone


@dataclass(frozen=True)
class Version:
    """An opened, complete version: its manifest and where its files are."""

    index_root: str
    root: str
    manifest: IndexManifest

    def load_shard(self, i: int, mmap: bool = True) -> faiss.Index:
        """Shard i, checksum verified, count checked, tuned search parameters applied."""
        rec = self.manifest.shards[i]
        idx = index.read_index(storage.join(self.root, rec.file), sha256=rec.sha256, mmap=mmap)
        if idx.ntotal != rec.count:
            raise ValueError(f"{rec.file}: {idx.ntotal} vectors, the manifest says {rec.count}")
        index.apply_params(idx, self.manifest.search_params)
        try:
            evict_unused(self.index_root, self.manifest.version)
        except (OSError, ValueError) as exc:  # a cache left full must not fail a load
            log.warning("evicting unused versions from the S3 cache failed: %s", exc)
        return idx

    @property
    def filterable(self) -> dict[str, str]:
        """{column: "string" | "number"} that filter= accepts ({} for versions built before)."""
        return dict(self.manifest.filterable or {})

    @property
    def has_text(self) -> bool:
        return self.manifest.text is not None

    def load_text(self, i: int, verify: bool = True) -> fulltext.TextIndex | None:
        """Shard i's BM25 text index (checksums verified), or None when built without one."""
        if self.manifest.text is None:
            return None
        return fulltext.load_shard(self.root, self.manifest.text["shards"][i], verify)

    def read_docs(self, i: int | None = None) -> pa.Table:
        """The docs (id, product_id, image_uri, metadata) of shard i, or of all shards."""
        shards = self.manifest.shards if i is None else [self.manifest.shards[i]]
        return pa.concat_tables(
            storage.read_parquet(storage.join(self.root, s.docs)) for s in shards
        )


def open_version(index_root: str, version: str | None = None) -> Version:
    """Open `version`, or the one CURRENT names; fails if it is missing or incomplete."""
    version = version or current(index_root)
    if version is None:
        raise FileNotFoundError(f"{index_root}: no CURRENT version (nothing published yet)")
    root = version_root(index_root, version)
    if not storage.exists(storage.join(root, "manifest.json")):
        raise FileNotFoundError(f"{root}: no manifest.json (incomplete or missing version)")
    return Version(storage.normalize(index_root), root, IndexManifest.read(root))
