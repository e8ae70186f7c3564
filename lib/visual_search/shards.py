"""The Ray task bodies of the index build: train the template, fill a shard, verify a shard.

Each reads its own vectors from the embeddings dataset, so nothing large passes through the
driver; results carry only counts, checksums and top-k answers for the held-out queries.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from visual_search import index, storage
from visual_search.embeddings import Dataset
from visual_search.manifest import ShardRecord


def shard_file(i: int) -> str:
    return f"shard-{i:05d}.faiss"


def docs_file(i: int) -> str:
    return f"docs/shard-{i:05d}.parquet"


def train_template(
    dataset: Dataset, factory: str, metric: str, train_ids: np.ndarray, use_gpu: bool | None
) -> bytes:
    """Train one template on the sampled vectors; returns it serialised (untrained if Flat)."""
    template = index.make_template(factory, dataset.dim, metric)
    if not template.is_trained:
        _, x = dataset.read_ids(train_ids)
        index.train(template, x, use_gpu)
    return index.to_bytes(template)


def fill_shard(
    dataset: Dataset,
    template: bytes,
    i: int,
    id_range: tuple[int, int],
    version_root: str,
    queries: np.ndarray,
    k: int,
    grid: list[dict],
    metric: str,
) -> dict:
    """Add ids [lo, hi) to a copy of the template, write shard i and its docs, and answer the
    queries exactly and with every candidate parameter set (for tuning in the driver)."""
    lo, hi = id_range
    table = dataset.read_range(lo, hi)
    x = dataset.vectors(table)
    ids = table["id"].to_numpy()
    shard = index.from_bytes(template)
    shard.add_with_ids(x, ids)
    exact = index.exact_topk(x, ids, queries, k, metric)
    candidates = [index.search(shard, queries, k, p) for p in grid]
    sha256, size = index.write_index(shard, storage.join(version_root, shard_file(i)))
    docs = table.drop_columns(["embedding"])
    storage.write_parquet(storage.join(version_root, docs_file(i)), docs)
    record = ShardRecord(shard_file(i), sha256, int(shard.ntotal), size, (lo, hi), docs_file(i))
    return {"record": record, "exact": exact, "candidates": candidates}


def verify_shard(
    version_root: str, record: ShardRecord, queries: np.ndarray, k: int, params: dict
) -> tuple[np.ndarray, np.ndarray]:
    """Read shard back as written: checksum, counts, ids, then answer the queries."""
    shard = index.read_index(storage.join(version_root, record.file), sha256=record.sha256)
    if shard.ntotal != record.count:
        raise ValueError(f"{record.file}: {shard.ntotal} vectors, expected {record.count}")
    docs = storage.read_parquet(storage.join(version_root, record.docs), columns=["id"])["id"]
    lo, hi = record.id_range
    if not docs.combine_chunks().equals(pa.array(np.arange(lo, hi, dtype=np.int64))):
        raise ValueError(f"{record.docs}: ids are not the shard's range [{lo}, {hi})")
    return index.search(shard, queries, k, params)
