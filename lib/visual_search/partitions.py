"""The embeddings dataset (Contract 2) as the embed job lays it out: fixed-size partitions by
catalog row, each one `embeddings/part-NNNNN.parquet` + `errors/part-NNNNN.parquet` (errors
first: a partition is finished when both exist), and the manifest last, after the counts are
checked against the catalog. `assemble` makes the same layout from vectors that exist already.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visual_search import catalog, embeddings, schema, storage
from visual_search.embeddings import DatasetError
from visual_search.manifest import EmbeddingsManifest, FileRecord

SUBDIRS = ("embeddings", "errors")


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def finished(out: str, n_parts: int) -> set[int]:
    def names(sub: str) -> set[str]:
        uri = storage.join(out, sub)
        if not storage.exists(uri):
            return set()
        return {e.uri.rpartition("/")[2] for e in storage.list_files(uri, suffixes=(".parquet",))}

    both = names("embeddings") & names("errors")
    return {i for i in range(n_parts) if part_name(i) in both}


class Writer:
    """Collects streamed rows by partition and writes each partition once it is complete."""

    def __init__(self, out: str, partition_size: int, cat: catalog.Catalog):
        self.out, self.partition_size, self.cat = out, partition_size, cat
        self.pending: dict[int, list[pa.Table]] = {}
        self.seen: dict[int, int] = {}
        self.records: dict[int, tuple[int, int]] = {}

    def _expected(self, part: int) -> int:
        start = part * self.partition_size
        return min(self.partition_size, self.cat.num_rows - start)

    def add(self, batch: pa.Table) -> None:
        parts = pc.divide(batch["row"], self.partition_size).to_numpy()
        for part in sorted(set(parts.tolist())):
            piece = batch.filter(pa.array(parts == part))
            self.pending.setdefault(part, []).append(piece)
            self.seen[part] = self.seen.get(part, 0) + piece.num_rows
            if self.seen[part] > self._expected(part):
                raise DatasetError(f"partition {part}: more rows than the catalog has (duplicates)")
            if self.seen[part] == self._expected(part):
                self._write(part, pa.concat_tables(self.pending.pop(part)))

    def _write(self, part: int, rows: pa.Table) -> None:
        rows = rows.sort_by("row")
        start = part * self.partition_size
        expected = pa.array(range(start, start + self._expected(part)), pa.int64())
        if not rows["row"].combine_chunks().equals(expected):
            raise DatasetError(f"partition {part}: rows do not match the catalog's rows")
        meta = self.cat.table.take(rows["row"])
        self.records[part] = write_partition(
            self.out, part, meta, rows["embedding"], rows["error"], rows["detail"]
        )


def write_partition(
    out: str,
    part: int,
    meta: pa.Table,
    embedding: pa.Array,
    error: pa.Array,
    detail: pa.Array,
) -> tuple[int, int]:
    """Write partition `part`: the catalog rows `meta` whose `embedding` is valid go to
    embeddings/, the others with their `error` and `detail` to errors/; (embedded, errors)."""
    if isinstance(embedding, pa.ChunkedArray):
        embedding = embedding.combine_chunks()
    ok = pc.is_valid(embedding)
    field = pa.field("embedding", schema.embedding_type(embedding.type.list_size))
    good = meta.filter(ok).append_column(field, embedding.filter(ok))
    bad = pc.invert(ok)
    errors = pa.table(
        [
            meta["product_id"].filter(bad),
            meta["image_uri"].filter(bad),
            error.filter(bad),
            detail.filter(bad),
        ],
        schema=schema.ERRORS_SCHEMA,
    )
    # Errors first: a partition counts as finished only when both files exist.
    storage.write_parquet(storage.join(out, "errors", part_name(part)), errors)
    storage.write_parquet(storage.join(out, "embeddings", part_name(part)), good)
    return good.num_rows, errors.num_rows


def _errors_by_code(out: str, names: list[str]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for name in names:
        col = storage.read_parquet(storage.join(out, "errors", name), columns=["error"])["error"]
        counts.update(col.to_pylist())
    return dict(sorted(counts.items()))


def part_rows(out: str, part: int) -> tuple[int, int]:
    """(embedded, errors) of a partition a previous run finished."""
    name = part_name(part)
    return tuple(storage.parquet_num_rows(storage.join(out, sub, name)) for sub in SUBDIRS)


def write_manifest(
    out: str,
    model: dict,
    cat: catalog.Catalog,
    fingerprint: str,
    partition_size: int,
    records: list[tuple[int, int]],
    timings: dict,
    counts: dict | None = None,
) -> EmbeddingsManifest:
    """Check the counts of the written partitions against the catalog, then the manifest, last."""
    names = [part_name(i) for i in range(len(records))]
    embedded = sum(r[0] for r in records)
    n_errors = sum(r[1] for r in records)
    if embedded + n_errors != cat.num_rows:
        raise DatasetError(
            f"count mismatch: catalog has {cat.num_rows} rows but {embedded} embedded + "
            f"{n_errors} errors were written; manifest not written"
        )
    manifest = EmbeddingsManifest(
        model=model,
        catalog={
            "uri": storage.normalize(cat.uri),
            "kind": cat.kind,
            "fingerprint": fingerprint,
            "rows": cat.num_rows,
            "metadata_columns": cat.metadata_columns,
        },
        counts={
            "input": cat.num_rows,
            "embedded": embedded,
            "errors": n_errors,
            "errors_by_code": _errors_by_code(out, names),
            **(counts or {}),
        },
        partition_size=partition_size,
        embeddings=[
            FileRecord(f"embeddings/{n}", r[0]) for n, r in zip(names, records, strict=True)
        ],
        errors=[FileRecord(f"errors/{n}", r[1]) for n, r in zip(names, records, strict=True)],
        timings=timings,
    )
    manifest.write(out)
    return manifest


def assemble(
    out: str,
    cat: catalog.Catalog,
    model: dict,
    sources: list[tuple[embeddings.Dataset, np.ndarray]],
    errors: pa.Table,
    partition_size: int,
    counts: dict,
) -> EmbeddingsManifest:
    """A complete dataset at `out` of every row of `cat`, laid out as `run` writes it, from
    vectors already made: `sources` are (dataset, int64 id of each catalog row in it or -1);
    a row no source has is an error, with its `row`, `error` and `detail` in `errors`."""
    started = time.time()
    storage.delete(storage.join(out, "manifest.json"))  # incomplete until the new one is written
    records = []
    for part in range(math.ceil(cat.num_rows / partition_size)):
        lo, hi = part * partition_size, min(cat.num_rows, (part + 1) * partition_size)
        vectors = np.zeros((hi - lo, model["dim"]), np.float32)
        found = np.zeros(hi - lo, bool)
        for ds, ids in sources:
            sel = np.flatnonzero(ids[lo:hi] >= 0)
            if len(sel):
                got, mat = ds.read_ids(ids[lo + sel])
                vectors[sel] = mat[np.searchsorted(got, ids[lo + sel])]
                found[sel] = True
        error, detail = _errors_between(errors, lo, hi)
        if (~found & pc.is_null(error).to_numpy(zero_copy_only=False)).any():
            raise DatasetError(f"partition {part}: rows with neither a vector nor an error")
        embedding = pa.FixedSizeListArray.from_arrays(
            schema.embedding_array(vectors).values, model["dim"], mask=pa.array(~found)
        )
        meta = cat.table.slice(lo, hi - lo)
        records.append(write_partition(out, part, meta, embedding, error, detail))
    timings = {"started_unix": started, "total_s": round(time.time() - started, 3)}
    return write_manifest(
        out, model, cat, cat.fingerprint(), partition_size, records, timings, counts
    )


def _errors_between(errors: pa.Table, lo: int, hi: int) -> tuple[pa.Array, pa.Array]:
    """(error, detail) of catalog rows [lo, hi): null where `errors` has no row."""
    rows = errors["row"].to_numpy()
    inside = np.flatnonzero((rows >= lo) & (rows < hi))
    out = [np.full(hi - lo, None, object) for _ in range(2)]
    for values, column in zip(out, ("error", "detail"), strict=True):
        values[rows[inside] - lo] = errors[column].take(pa.array(inside)).to_pylist()
    return tuple(pa.array(v, pa.string()) for v in out)
