"""Synthetic embeddings datasets (Contract 2) written directly, without running the embed job.

`write_embeddings_dataset(root, vectors)` writes embeddings/part-NNNNN.parquet, empty
errors/part-NNNNN.parquet and manifest.json (last), exactly the layout jobs/embed.py produces.
Row k of `vectors` gets product_id f"p{k:05d}" (see `product_id`), so a test can map a
product back to the vector it was given. `clustered_vectors` makes L2-normalised vectors with
cluster structure, so IVF recall measured on them means something.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from visual_search import schema
from visual_search.manifest import EmbeddingsManifest, FileRecord

MODEL_ID = "synthetic"


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def product_id(k: int) -> str:
    return f"p{k:05d}"


def clustered_vectors(n: int, d: int, seed: int = 0, clusters: int = 12) -> np.ndarray:
    """float32 (n, d), unit L2 norm: Gaussian blobs around random unit centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, n)
    x = centres[labels] + 0.25 * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def write_embeddings_dataset(
    root: str | os.PathLike,
    vectors: np.ndarray,
    part_rows: int = 50,
    metadata: dict | None = None,
    dim_override: dict[int, int] | None = None,
    manifest_order: list[int] | None = None,
    model_id: str = MODEL_ID,
) -> str:
    """Write a valid Contract 2 dataset holding `vectors` (n, d); returns its root as a string.

    - rows are cut into parts of `part_rows` (at least one part, empty when n == 0);
    - `metadata`: extra columns, name -> list of n values (default: title and category);
    - `dim_override`: part index -> dimension; that part's vectors are truncated / zero-padded
      to it (an inconsistent dataset; the manifest still says d);
    - `manifest_order`: the order in which the manifest lists the parts (default: by index).
      Global ids follow the manifest order, not the file names.
    """
    root = str(root)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be (n, d), got shape {vectors.shape}")
    n, d = vectors.shape
    os.makedirs(os.path.join(root, "embeddings"), exist_ok=True)
    os.makedirs(os.path.join(root, "errors"), exist_ok=True)
    if metadata is None:
        metadata = {
            "category": [f"cat{k % 5}" for k in range(n)],
            "title": [f"Product {k}" for k in range(n)],
        }
    starts = list(range(0, n, part_rows)) or [0]
    emb_files, err_files = [], []
    for i, lo in enumerate(starts):
        hi = min(lo + part_rows, n)
        x = vectors[lo:hi]
        dim = (dim_override or {}).get(i, d)
        if dim != d:
            x = np.pad(x, ((0, 0), (0, max(0, dim - d))))[:, :dim]
        cols = {
            "product_id": pa.array([product_id(k) for k in range(lo, hi)], pa.string()),
            "image_uri": pa.array([f"images/{product_id(k)}.jpg" for k in range(lo, hi)]),
        }
        for name, values in metadata.items():
            cols[name] = pa.array(list(values[lo:hi]))
        if len(x):
            cols["embedding"] = schema.embedding_array(x)
        else:
            cols["embedding"] = pa.array([], type=schema.embedding_type(dim))
        pq.write_table(pa.table(cols), os.path.join(root, "embeddings", part_name(i)))
        pq.write_table(
            schema.ERRORS_SCHEMA.empty_table(), os.path.join(root, "errors", part_name(i))
        )
        emb_files.append(FileRecord(f"embeddings/{part_name(i)}", hi - lo))
        err_files.append(FileRecord(f"errors/{part_name(i)}", 0))
    order = list(range(len(starts))) if manifest_order is None else list(manifest_order)
    if sorted(order) != list(range(len(starts))):
        raise ValueError(f"manifest_order must be a permutation of range({len(starts)})")
    manifest = EmbeddingsManifest(
        model={
            "model_id": model_id,
            "weights": "synthetic",
            "dim": d,
            "preprocess": {"size": 224, "mode": "synthetic"},
        },
        catalog={
            "uri": os.path.join(root, "catalog.parquet"),
            "kind": "table",
            "fingerprint": f"synthetic-{n}x{d}",
            "rows": n,
            "metadata_columns": sorted(metadata),
        },
        counts={"input": n, "embedded": n, "errors": 0, "errors_by_code": {}},
        partition_size=part_rows,
        embeddings=[emb_files[i] for i in order],
        errors=[err_files[i] for i in order],
        timings={"total_s": 0.0},
    )
    manifest.write(root)
    return root


def read_in_manifest_order(root: str) -> tuple[list[str], np.ndarray]:
    """(product ids, float32 vectors) of a dataset's rows in manifest file order: row i is the
    row that global id i must name. Read with plain pyarrow, independently of the library."""
    manifest = EmbeddingsManifest.read(root)
    tables = [pq.read_table(os.path.join(root, rec.path)) for rec in manifest.embeddings]
    table = pa.concat_tables(tables)
    pids = table["product_id"].to_pylist()
    flat = table["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return pids, flat.astype(np.float32).reshape(len(pids), manifest.dim)
