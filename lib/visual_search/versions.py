"""Index versions under {index_root}: naming, CURRENT, opening for search, pruning.

A version folder counts as complete only once its manifest.json exists (written last), and
CURRENT moves to a version only after that; readers open versions through CURRENT.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass

import faiss
import pyarrow as pa

from visual_search import fulltext, index, storage
from visual_search.manifest import IndexManifest

log = logging.getLogger(__name__)


_last_ns = 0
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


def current(index_root: str) -> str | None:
    """The live version named by CURRENT, or None before the first publish."""
    uri = storage.join(index_root, "CURRENT")
    if not storage.exists(uri):
        return None
    name = storage.read_bytes(uri, 4096).decode("utf-8", "replace").strip()
    if not name:
        return None
    try:
        return check_version(name)
    except ValueError as exc:
        raise ValueError(f"{uri}: {exc}") from None


def set_current(index_root: str, version: str) -> None:
    """Move CURRENT in one atomic step (temp + rename locally, one PUT on S3)."""
    if not storage.exists(storage.join(version_root(index_root, version), "manifest.json")):
        raise ValueError(f"version {version} has no manifest.json; refusing to make it CURRENT")
    storage.write_text(storage.join(index_root, "CURRENT"), version + "\n")


def list_versions(index_root: str) -> dict[str, bool]:
    """version -> complete (has its manifest), for every folder under versions/."""
    root = storage.join(index_root, "versions")
    if not storage.exists(root):
        return {}
    out: dict[str, bool] = {}
    base = storage.normalize(root)
    for e in storage.list_files(root):
        name, _, rest = e.uri[len(base) + 1 :].partition("/")
        if not is_version_id(name):
            continue  # not a version folder this code wrote (and never one to prune)
        out[name] = out.get(name, False) or rest == "manifest.json"
    return dict(sorted(out.items()))


def prune(
    index_root: str, keep: int, newest: str, protect: tuple[str | None, ...] = ()
) -> list[str]:
    """Delete all but the `keep` newest complete versions (never CURRENT nor `protect`, e.g. the
    version live until a moment ago), plus incomplete folders older than `newest` (failed
    builds); newer incomplete ones may be builds in flight."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    live = current(index_root)
    versions = list_versions(index_root)
    complete = [v for v, ok in versions.items() if ok]
    keep_set = set(complete[-keep:]) | {live, newest, *protect}
    doomed = [v for v, ok in versions.items() if v not in keep_set and (ok or v < newest)]
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
