"""Writing the data contract: arrow list columns built without Python loops, and parquet files
written atomically with the task in their metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from awe.artifacts import atomic_path


def list_array(values: np.ndarray | pa.Array, lengths: np.ndarray,
               value_type: pa.DataType) -> pa.ListArray:
    """A list array whose row i holds the next ``lengths[i]`` entries of ``values``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    if not isinstance(values, pa.Array):
        values = pa.array(values, type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)


def dense_column(x: np.ndarray) -> pa.ListArray:
    """Rows of a 2-d array as list<float32>."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    return list_array(x.reshape(-1), np.full(n, d, dtype=np.int64), pa.float32())


def string_labels(names: np.ndarray, flat_idx: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """list<string> from label indices into ``names`` (decoded by arrow, no Python loop)."""
    dictionary = pa.array(names.tolist(), type=pa.string())
    flat = pa.DictionaryArray.from_arrays(pa.array(flat_idx, type=pa.int32()), dictionary)
    return list_array(flat.cast(pa.string()), lengths, pa.string())


def write_table(path: Path, table: pa.Table, metadata: dict[bytes, bytes] | None = None) -> None:
    """Write a parquet file atomically (used for small outputs and tests)."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)
