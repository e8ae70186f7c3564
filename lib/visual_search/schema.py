"""Arrow schemas and checks for the embeddings dataset (Contract 2)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

ERRORS_SCHEMA = pa.schema(
    [
        ("product_id", pa.string()),
        ("image_uri", pa.string()),
        ("error", pa.string()),
        ("detail", pa.string()),
    ]
)


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """float32 (n, d) -> fixed_size_list<float32>[d]."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list<float32>[d] -> float32 (n, d), without nulls."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise ValueError(f"embedding column must be fixed_size_list<float32>, not {column.type}")
    if column.null_count:
        raise ValueError(f"embedding column has {column.null_count} null rows")
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(-1, dim)
