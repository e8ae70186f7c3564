"""Contract 1: a catalog table (Parquet, CSV, JSONL) or a folder/prefix of images, as Arrow.

The result always has `product_id` and `image_uri` (absolute URIs) as strings first, then the
catalog's other columns (metadata, e.g. `title`, `category`) in their original order.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from visual_search import storage
from visual_search.images import SUFFIXES as IMAGE_SUFFIXES

REQUIRED = ("product_id", "image_uri")
# Columns the embeddings dataset adds; a catalog may not bring its own.
RESERVED = ("embedding", "error", "detail")
TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".ndjson": "json"}


class CatalogError(ValueError):
    """An invalid catalog; the message names the file, and the row and column where known."""


@dataclass(frozen=True)
class Catalog:
    uri: str
    kind: str  # "table" or "prefix"
    table: pa.Table

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def metadata_columns(self) -> list[str]:
        return [c for c in self.table.column_names if c not in REQUIRED]

    def fingerprint(self) -> str:
        """Changes when any (product_id, image_uri) row or the row order changes."""
        h = hashlib.sha256()
        for batch in self.table.select(list(REQUIRED)).to_batches(max_chunksize=65536):
            for col in batch.columns:
                h.update(b"\x00".join(s.encode() for s in col.to_pylist()))
                h.update(b"\x01")
        return f"sha256:{h.hexdigest()}"


def _table_kind(uri: str) -> str | None:
    lower = uri.lower()
    return next((k for s, k in TABLE_SUFFIXES.items() if lower.endswith(s)), None)


def _read_table(uri: str, kind: str) -> pa.Table:
    data = io.BytesIO(storage.read_bytes(uri))
    try:
        if kind == "parquet":
            return pq.read_table(data)
        if kind == "csv":
            # Ids stay strings ("00123" keeps its zeros).
            opts = pacsv.ConvertOptions(column_types={c: pa.string() for c in REQUIRED})
            return pacsv.read_csv(data, convert_options=opts)
        return pajson.read_json(data)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise CatalogError(f"{uri}: cannot parse as {kind}: {exc}") from exc


def _first_bad_row(mask: pa.Array) -> int:
    return pc.index(mask, True).as_py() + 1


def _validate(uri: str, table: pa.Table) -> pa.Table:
    names = table.column_names
    for col in REQUIRED:
        if col not in names:
            raise CatalogError(
                f"{uri}: missing required column {col!r} (columns: {', '.join(names)})"
            )
    for col in RESERVED:
        if col in names:
            raise CatalogError(f"{uri}: column {col!r} is reserved for the embeddings dataset")
    if table.num_rows == 0:
        raise CatalogError(f"{uri}: the catalog has no rows")
    for col in REQUIRED:
        arr = table[col]
        t = arr.type.value_type if pa.types.is_dictionary(arr.type) else arr.type
        if not any(
            f(t)
            for f in (
                pa.types.is_string,
                pa.types.is_large_string,
                pa.types.is_integer,
                pa.types.is_null,
            )
        ):
            raise CatalogError(f"{uri}: column {col!r} must hold strings, not {arr.type}")
        arr = arr.cast(pa.string()).combine_chunks()
        empty = pc.or_kleene(pc.is_null(arr), pc.equal(pc.utf8_trim_whitespace(arr), ""))
        empty = pc.fill_null(empty, True)
        if pc.any(empty).as_py():
            raise CatalogError(f"{uri}: row {_first_bad_row(empty)}, column {col!r}: empty value")
        table = table.set_column(names.index(col), col, arr)
    return table


def _absolute_uris(uri: str, table: pa.Table, base: str) -> pa.Table:
    out = []
    for i, value in enumerate(table["image_uri"].to_pylist(), start=1):
        if value.startswith(("s3://", "file://")) or value.startswith("/"):
            out.append(value)
        elif "://" in value:
            raise CatalogError(
                f"{uri}: row {i}, column 'image_uri': unsupported scheme in {value!r} "
                "(use a local path, file:// or s3://)"
            )
        else:
            out.append(storage.join(base, value))
    idx = table.column_names.index("image_uri")
    return table.set_column(idx, "image_uri", pa.array(out, pa.string()))


def _check_duplicates(uri: str, table: pa.Table) -> None:
    seen: dict[tuple[str, str], int] = {}
    pairs = zip(table["product_id"].to_pylist(), table["image_uri"].to_pylist(), strict=True)
    for i, pair in enumerate(pairs, start=1):
        if pair in seen:
            raise CatalogError(
                f"{uri}: row {i} repeats row {seen[pair]} "
                f"(product_id {pair[0]!r}, image_uri {pair[1]!r})"
            )
        seen[pair] = i


def _visible(base: str, entries: list[storage.FileEntry]) -> list[tuple[str, str]]:
    """(uri, path relative to base) of the files, hidden files and folders left out."""
    out = []
    for e in entries:
        rel = e.uri[len(base) :].lstrip("/")
        if not any(part.startswith(".") for part in rel.split("/")):
            out.append((e.uri, rel))
    return out


def _from_prefix(uri: str, files: list[tuple[str, str]]) -> pa.Table:
    pids, uris, cats = [], [], []
    for file_uri, rel in files:
        stem, _, _ = rel.rpartition(".")
        folder, _, _ = rel.rpartition("/")
        pids.append(stem)
        uris.append(file_uri)
        cats.append(folder.rpartition("/")[2] or None)
    return pa.table(
        {
            "product_id": pa.array(pids, pa.string()),
            "image_uri": pa.array(uris, pa.string()),
            "category": pa.array(cats, pa.string()),
        }
    )


def _finish_table(uri: str, table: pa.Table, base: str) -> pa.Table:
    """Validate, make image URIs absolute (relative ones are relative to base), order columns."""
    table = _absolute_uris(uri, _validate(uri, table), base)
    _check_duplicates(uri, table)
    rest = [c for c in table.column_names if c not in REQUIRED]
    return table.select([*REQUIRED, *rest])


def read_catalog(uri: str) -> Catalog:
    """Read and validate a catalog; fails fast (CatalogError / StorageError) naming the URI.

    A folder is a prefix of images, or (when it holds no images) a Parquet dataset of part files
    as Spark and Ray write them, whose relative image URIs are relative to the folder.
    """
    fi = storage.check_readable(uri)
    if fi.type == storage.pafs.FileType.Directory:
        base = storage.normalize(uri)
        files = _visible(base, storage.list_files(uri, suffixes=(*IMAGE_SUFFIXES, ".parquet")))
        imgs = [f for f in files if not f[1].lower().endswith(".parquet")]
        if imgs:
            return Catalog(uri, "prefix", _from_prefix(uri, imgs))
        if not files:
            raise CatalogError(f"{uri}: no images ({', '.join(IMAGE_SUFFIXES)}) below this prefix")
        parts = [_read_table(file_uri, "parquet") for file_uri, _ in files]
        table = pa.concat_tables(parts, promote_options="permissive")
        return Catalog(uri, "table", _finish_table(uri, table, base))
    kind = _table_kind(uri)
    if kind is None:
        raise CatalogError(
            f"{uri}: not a catalog table ({', '.join(TABLE_SUFFIXES)}) nor a folder of images"
        )
    return Catalog(uri, "table", _finish_table(uri, _read_table(uri, kind), storage.parent(uri)))
