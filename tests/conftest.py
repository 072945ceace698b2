"""Shared test helpers: tiny parquet files built with pyarrow under pytest's tmp_path."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def write_parquet(path: Path, columns: dict | pa.Table, types: dict | None = None) -> Path:
    """Write ``columns`` ({name: list}) to ``path`` as parquet; ``types`` pins arrow types."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(columns, pa.Table):
        table = columns
    else:
        types = types or {}
        table = pa.table({name: pa.array(values, type=types.get(name))
                          for name, values in columns.items()})
    pq.write_table(table, path)
    return path


@pytest.fixture
def write():
    """The :func:`write_parquet` helper as a fixture."""
    return write_parquet
