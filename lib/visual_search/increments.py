"""Incremental re-index: which catalog rows are new or changed since an embeddings dataset was
made, so that only those are embedded again.

A row's content key is "<size>:<mtime in ns>" of its image, from one stat (pyarrow FileInfo;
on S3 the object's size and LastModified, which every overwrite moves). Hashing the bytes would
be exact but reads every image again only to find the few that changed, which is most of what a
full re-index costs; a stat is enough as long as images are replaced by writing them (tools that
restore an old mtime on new bytes defeat it: run the re-index with --full then).

A dataset keeps the keys of its rows in `content_keys.parquet` (product_id, image_uri,
content_key; one row per embedded row, in id order), written once the dataset is complete. Error
rows are not keyed, so they are retried; a dataset without the file is re-embedded in full.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visual_search import catalog, embeddings, storage

KEYS_FILE = "content_keys.parquet"
PAIR = ["product_id", "image_uri"]
STAT_THREADS = 32  # stats are I/O-bound (one HEAD per object on S3)
STAT_CHUNK = 256


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A catalog as read now, the content key of each row, and a fingerprint of both."""

    catalog: catalog.Catalog
    keys: pa.Array  # string per catalog row; null when the image could not be stat'ed
    fingerprint: str  # changes with any row, column, order or image content key


def _stat(uris: list[str]) -> list[str | None]:
    out = []
    for uri in uris:
        try:
            fs, path = storage.resolve(uri)
            fi = fs.get_file_info(path)
        except (OSError, storage.StorageError):
            out.append(None)
            continue
        ok = fi.type == storage.pafs.FileType.File
        out.append(f"{fi.size}:{fi.mtime_ns}" if ok else None)
    return out


def content_keys(uris: list[str]) -> pa.Array:
    """The content key of each image URI (null for a missing or unreadable one)."""
    chunks = [uris[i : i + STAT_CHUNK] for i in range(0, len(uris), STAT_CHUNK)]
    with ThreadPoolExecutor(STAT_THREADS) as pool:
        keys = [k for chunk in pool.map(_stat, chunks) for k in chunk]
    return pa.array(keys, pa.string())


def _fingerprint(table: pa.Table) -> str:
    h = hashlib.sha256(table.schema.serialize().to_pybytes())
    for batch in table.to_batches(max_chunksize=65536):
        h.update(batch.serialize())
    return f"sha256:{h.hexdigest()}"


def snapshot(catalog_uri: str) -> Snapshot:
    """Read the catalog and stat every image once (before anything is embedded, so an image
    that changes during the re-index is seen as changed by the next one)."""
    cat = catalog.read_catalog(catalog_uri)
    keys = content_keys(cat.table["image_uri"].to_pylist())
    return Snapshot(cat, keys, _fingerprint(cat.table.append_column("content_key", keys)))


def catalog_rows(pairs: pa.Table, table: pa.Table) -> np.ndarray:
    """int64 catalog row of each (product_id, image_uri) of `pairs` (unique in a catalog)."""
    left = pairs.select(PAIR).append_column("_i", pa.array(np.arange(pairs.num_rows)))
    right = table.select(PAIR).append_column("_row", pa.array(np.arange(table.num_rows)))
    joined = left.join(right, PAIR, join_type="left outer").sort_by("_i")
    rows = joined["_row"]
    if rows.null_count:
        raise ValueError(f"{rows.null_count} rows are not in the catalog")
    return rows.to_numpy().astype(np.int64)


def write_keys(ds: embeddings.Dataset, snap: Snapshot) -> None:
    """Record the content keys of a complete dataset made from `snap`'s catalog."""
    pairs = ds.read_range(0, ds.count, columns=PAIR).select(PAIR)
    keys = snap.keys.take(pa.array(catalog_rows(pairs, snap.catalog.table)))
    storage.write_parquet(storage.join(ds.uri, KEYS_FILE), pairs.append_column("content_key", keys))


def read_keys(ds: embeddings.Dataset) -> pa.Table | None:
    """The dataset's keys with an int64 `id` column, or None when it has none that fit its rows."""
    uri = storage.join(ds.uri, KEYS_FILE)
    if not storage.exists(uri):
        return None
    keys = storage.read_parquet(uri)
    pairs = ds.read_range(0, ds.count, columns=PAIR).select(PAIR)
    if keys.num_rows != ds.count or not keys.select(PAIR).equals(pairs.combine_chunks()):
        return None
    return keys.append_column("id", pa.array(np.arange(ds.count, dtype=np.int64)))


def match(snap: Snapshot, keys: pa.Table) -> np.ndarray:
    """Per catalog row, the id of an earlier dataset row with the same image URI and content key
    (its vector can be reused), else -1."""
    on = ["image_uri", "content_key"]
    earlier = keys.group_by(on).aggregate([("id", "min")])
    rows = pa.table(
        {
            "image_uri": snap.catalog.table["image_uri"],
            "content_key": snap.keys,
            "_row": pa.array(np.arange(snap.catalog.num_rows)),
        }
    )
    joined = rows.join(earlier, on, join_type="left outer").sort_by("_row")
    return pc.fill_null(joined["id_min"], -1).to_numpy().astype(np.int64)
