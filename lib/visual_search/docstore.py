"""A version's docs as memory-mapped Arrow files on local disk, with a sorted product index.

The ingress looks rows up by global id (row == id) and ids up by product. Read into the heap,
the docs would make every replica's memory grow with the catalog, and a product lookup would
scan the whole product_id column. Instead the first process on a node writes them once as
uncompressed Arrow IPC (temp + rename), with the product ids sorted beside their row ids, and
every process maps the files: a request touches only the pages of its rows and a binary search's
20-odd keys, and the page cache is shared by all replicas on the node.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visual_search import storage

DOCS, PRODUCTS, ROOT = "docs.arrow", "products.arrow", "index_root.txt"
# Versions with at least this many docs are written by a child process (see _build_apart).
CHILD_ROWS = 100_000


@dataclass(frozen=True)
class ProductIndex:
    """product_id -> row ids through the sorted product ids (nulls left out)."""

    pids: pa.Array  # sorted
    rows: np.ndarray  # int64, the row of each sorted product id

    def __getitem__(self, i: int) -> str:  # bisect's view of the keys
        return self.pids[i].as_py()

    def __len__(self) -> int:
        return len(self.pids)

    def rows_of(self, product_id: str) -> np.ndarray:
        lo = bisect.bisect_left(self, product_id)
        hi = bisect.bisect_right(self, product_id, lo=lo)
        return np.sort(self.rows[lo:hi])


def cache_root(index_root: str) -> str:
    """This node's folder of mapped docs for one index root."""
    key = hashlib.sha256(storage.normalize(index_root).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), storage.CACHE_DIR, "docs", key)


def _folder(version) -> str:
    """Named by the version and its shards' checksums: a rebuilt name gets fresh files."""
    sums = "|".join([version.root, *(s.sha256 for s in version.manifest.shards)])
    key = hashlib.sha256(sums.encode()).hexdigest()[:16]
    return os.path.join(cache_root(version.index_root), f"{version.manifest.version}-{key}")


def _write_ipc(path: str, table: pa.Table) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(version, folder: str) -> None:
    table = version.read_docs().sort_by("id").combine_chunks()
    ids = table["id"].to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise ValueError(f"version {version.manifest.version}: docs ids are not dense")
    pids = table["product_id"].cast(pa.string())
    order = pc.array_sort_indices(pids, null_placement="at_end")
    order = order[: len(pids) - pids.null_count]
    products = pa.table({"product_id": pids.take(order), "row": order.cast(pa.int64())})
    os.makedirs(folder, exist_ok=True)
    storage.write_text(os.path.join(os.path.dirname(folder), ROOT), version.index_root)
    _write_ipc(os.path.join(folder, PRODUCTS), products.combine_chunks())
    _write_ipc(os.path.join(folder, DOCS), table)  # last: its presence means complete


def _map(path: str) -> pa.Table:
    with pa.memory_map(path, "r") as source:
        return pa.ipc.open_file(source).read_all()


def _array(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array, without a copy when it is one chunk (as written)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _build_apart(version, folder: str) -> None:
    """_build, in a child process for large versions: the build's peak (the decoded docs and
    their sort) would otherwise stay in a long-lived replica's allocator, and its memory would
    grow with the catalog after all."""
    if sum(s.count for s in version.manifest.shards) < CHILD_ROWS:
        _build(version, folder)
        pa.default_memory_pool().release_unused()
        return
    lib = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (lib, os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "visual_search.docstore"],
        input=pickle.dumps((version, folder)),
        capture_output=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    if done.returncode:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"building the docs of {version.manifest.version}: {err[-1:]}")


def open_docs(version) -> tuple[pa.Table, ProductIndex]:
    """(docs sorted by id, product index), both mapped from this node's cache."""
    folder = _folder(version)
    if not os.path.exists(os.path.join(folder, DOCS)):
        _build_apart(version, folder)
    products = _map(os.path.join(folder, PRODUCTS))
    index = ProductIndex(_array(products["product_id"]), _array(products["row"]).to_numpy())
    return _map(os.path.join(folder, DOCS)), index


def evict(index_root: str, keep: set[str]) -> list[str]:
    """Drop the mapped docs of this index root's versions not in `keep` (version names), and
    of local index roots that no longer exist; returns the folders removed. A mapped file in
    use stays readable until it is unmapped (POSIX)."""
    gone = []
    root = cache_root(index_root)
    if os.path.isdir(root):
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if os.path.isdir(path) and name.rsplit("-", 1)[0] not in keep:
                shutil.rmtree(path, ignore_errors=True)
                gone.append(path)
    parent = os.path.dirname(root)
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        marker = os.path.join(parent, name, ROOT)
        try:
            other = storage.read_text(marker)
        except (OSError, storage.StorageError):
            continue
        if not storage.is_s3(other) and not os.path.isdir(other):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            gone.append(os.path.join(parent, name))
    return gone


if __name__ == "__main__":  # _build_apart's child: (version, folder) pickled on stdin
    _build(*pickle.load(sys.stdin.buffer))
