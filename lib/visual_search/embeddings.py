"""Reading an embeddings dataset (Contract 2) by global id: validation, ranges, samples, docs;
writing derived datasets (projected vectors, compacted rows)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from visual_search import schema, storage
from visual_search.manifest import EmbeddingsManifest, FileRecord, code_version


class DatasetError(ValueError):
    """The embeddings dataset is missing, empty or inconsistent; the message says where."""


@dataclass(frozen=True)
class Part:
    uri: str
    first_id: int  # global id of its first row
    rows: int


@dataclass(frozen=True)
class Dataset:
    """An embeddings dataset whose rows carry dense global ids in manifest file order."""

    uri: str
    manifest: EmbeddingsManifest
    parts: tuple[Part, ...]

    @property
    def count(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def read_range(self, lo: int, hi: int, columns: list[str] | None = None) -> pa.Table:
        """Rows with global ids [lo, hi), with an int64 `id` column first."""
        pieces = []
        for p in self.parts:
            a, b = max(lo, p.first_id), min(hi, p.first_id + p.rows)
            if a >= b:
                continue
            t = storage.read_parquet(p.uri, columns=columns).slice(a - p.first_id, b - a)
            ids = pa.array(np.arange(a, b, dtype=np.int64))
            pieces.append(t.add_column(0, "id", ids))
        if not pieces:
            raise DatasetError(f"{self.uri}: no rows in id range [{lo}, {hi})")
        return pa.concat_tables(pieces)

    def vectors(self, table: pa.Table) -> np.ndarray:
        """float32 (n, dim) from a table's embedding column, checked to be finite."""
        mat = schema.embedding_matrix(table["embedding"])
        if mat.shape[1] != self.dim:
            raise DatasetError(f"{self.uri}: vectors of dimension {mat.shape[1]}, not {self.dim}")
        bad = ~np.isfinite(mat).all(axis=1)
        if bad.any():
            first = int(table["id"][int(np.argmax(bad))].as_py())
            raise DatasetError(
                f"{self.uri}: {int(bad.sum())} vectors with NaN/inf values (first: id {first}, "
                f"{self.locate(first)})"
            )
        return mat

    def read_ids(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of the given global ids (any order) -> (sorted ids, float32 (n, dim))."""
        ids = np.unique(ids.astype(np.int64))
        out_ids, mats = [], []
        for p in self.parts:
            sel = ids[(ids >= p.first_id) & (ids < p.first_id + p.rows)]
            if not len(sel):
                continue
            t = storage.read_parquet(p.uri, columns=["embedding"]).take(sel - p.first_id)
            t = t.add_column(0, "id", pa.array(sel))
            mats.append(self.vectors(t))
            out_ids.append(sel)
        return np.concatenate(out_ids), np.concatenate(mats)

    def locate(self, gid: int) -> str:
        for p in self.parts:
            if p.first_id <= gid < p.first_id + p.rows:
                return f"{p.uri} row {gid - p.first_id}"
        return "outside the dataset"


def open_dataset(uri: str) -> Dataset:
    """Validate the dataset against its manifest (footers only, no vector data read)."""
    manifest_uri = storage.join(uri, "manifest.json")
    if not storage.exists(manifest_uri):
        raise DatasetError(f"{uri}: no manifest.json (missing, or the embed job did not finish)")
    try:
        manifest = EmbeddingsManifest.read(uri)
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{manifest_uri}: invalid manifest: {exc}") from exc
    parts, next_id = [], 0
    for rec in manifest.embeddings:
        part_uri = storage.join(uri, rec.path)
        if not storage.exists(part_uri):
            raise DatasetError(f"{part_uri}: listed in the manifest but missing")
        fs, path = storage.resolve(part_uri)
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f)
            rows, arrow_schema = meta.metadata.num_rows, meta.schema_arrow
        if rows != rec.rows:
            raise DatasetError(f"{part_uri}: {rows} rows, the manifest says {rec.rows}")
        field = arrow_schema.field("embedding") if "embedding" in arrow_schema.names else None
        if field is None or not pa.types.is_fixed_size_list(field.type):
            raise DatasetError(f"{part_uri}: no fixed_size_list embedding column")
        if field.type.list_size != manifest.dim:
            raise DatasetError(
                f"{part_uri}: embeddings of dimension {field.type.list_size}, "
                f"the manifest says {manifest.dim}"
            )
        if rows:
            parts.append(Part(part_uri, next_id, rows))
            next_id += rows
    if next_id != manifest.counts["embedded"]:
        raise DatasetError(
            f"{uri}: files hold {next_id} rows, the manifest counts {manifest.counts['embedded']}"
        )
    if next_id == 0:
        raise DatasetError(f"{uri}: the dataset has no embeddings")
    return Dataset(storage.normalize(uri), manifest, tuple(parts))


def project(ds: Dataset, out: str, fn: Callable[[np.ndarray], np.ndarray], model: dict) -> Dataset:
    """A new dataset at `out`: the same rows and files with each vector mapped through `fn`
    (float32 (n, d) -> (n, model["dim"])), described as made by `model`; manifest last."""
    started = time.time()
    storage.delete(storage.join(out, "manifest.json"))  # incomplete until the new one is written
    for rec in ds.manifest.embeddings:  # every listed file, empty ones too
        table = storage.read_parquet(storage.join(ds.uri, rec.path))
        if table.num_rows:
            vectors = fn(schema.embedding_matrix(table["embedding"]))
            table = table.set_column(
                table.column_names.index("embedding"), "embedding", schema.embedding_array(vectors)
            )
        else:
            empty = pa.array([], schema.embedding_type(model["dim"]))
            table = table.set_column(table.column_names.index("embedding"), "embedding", empty)
        storage.write_parquet(storage.join(out, rec.path), table)
    for rec in ds.manifest.errors:
        storage.write_parquet(
            storage.join(out, rec.path), storage.read_parquet(storage.join(ds.uri, rec.path))
        )
    timings = {"projected_from": ds.uri, "total_s": round(time.time() - started, 3)}
    manifest = dataclasses.replace(ds.manifest, model=model, timings=timings)
    manifest.write(out)
    return open_dataset(out)


def replace_vectors(ds: Dataset, out: str, vectors: np.ndarray, model: dict) -> Dataset:
    """`project` with new vectors given for every row, in read order (read_range(0, count))."""
    if len(vectors) != ds.count:
        raise ValueError(f"{len(vectors)} vectors for a dataset of {ds.count} rows")
    done = 0

    def take(v: np.ndarray) -> np.ndarray:
        nonlocal done
        done += len(v)
        return np.asarray(vectors[done - len(v) : done], np.float32)

    return project(ds, out, take, model)


def write_dataset(
    out: str, tables: Iterable[pa.Table], like: EmbeddingsManifest, **changes
) -> Dataset:
    """A new dataset at `out`: one embeddings part per table, in order (ids follow it), no error
    parts, described as `like` with `changes` and the new counts; manifest last, so a crash
    leaves nothing that opens."""
    started = time.time()
    storage.delete(storage.join(out, "manifest.json"))
    records = []
    for i, table in enumerate(tables):
        rec = FileRecord(f"embeddings/part-{i:05d}.parquet", table.num_rows)
        storage.write_parquet(storage.join(out, rec.path), table)
        records.append(rec)
    n = sum(r.rows for r in records)
    catalog = {**changes.pop("catalog", like.catalog), "rows": n}  # every row made it
    fields = {
        "catalog": catalog,
        "counts": {"input": n, "embedded": n, "errors": 0, "errors_by_code": {}},
        "timings": {"total_s": round(time.time() - started, 3)},
        **changes,
    }
    manifest = dataclasses.replace(
        like, embeddings=records, errors=[], code_version=code_version(), **fields
    )
    manifest.write(out)
    return open_dataset(out)


def embed_photos(model: dict, uris: list[str], batch: int = 32) -> np.ndarray:
    """float32 (len(uris), dim): the photos embedded with the model a manifest's `model` entry
    names (a Ray task body: the model loads where it runs). Raises DatasetError naming the
    photos that cannot be read or decoded, since a derived dataset must not lose rows."""
    from visual_search import embedders, images  # torch: only where photos are embedded
    from visual_search.pipeline import read_and_decode

    embedder = embedders.from_model_dict(model)
    size, out, failed = embedder.preprocess.size, [], []
    for lo in range(0, len(uris), batch):
        pixels = []
        for uri in uris[lo : lo + batch]:
            data, code, detail = read_and_decode(uri, embedder.preprocess, images.Limits())
            if data is None:
                failed.append(f"{uri} ({code}: {detail})")
            else:
                pixels.append(data)
        if pixels and not failed:
            x = np.frombuffer(b"".join(pixels), np.uint8).reshape(-1, size, size, 3)
            out.append(embedder.embed(x))
    if failed:
        raise DatasetError(f"{len(failed)} of {len(uris)} photos failed; first: {failed[0]}")
    return np.concatenate(out) if out else np.zeros((0, embedder.dim), np.float32)
