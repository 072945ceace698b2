"""The neighbour search as a map over shards of query vectors on a Dask cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from awe.cpu import set_threads
from awe.dask_cluster import map_ordered, threads_per_worker, worker_cached
from awe.neighbors.index import NeighbourIndex

SEARCH_SHARD_ROWS = 4 * 16384  # a multiple of NeighbourIndex.search's chunk: the same bits


def search_task(index_path: str, params: dict, vectors_path: str, start: int, stop: int,
                n: int, threads: int):
    """Leave-one-out top-n of the indexed rows start..stop (the saved index, loaded once)."""

    def load():
        set_threads(threads)
        return NeighbourIndex.load(index_path, params)

    index = worker_cached("index", (index_path,), load)
    vectors = np.load(vectors_path, mmap_mode="r")
    rows = np.arange(start, stop, dtype=np.int64)
    return index.search(np.ascontiguousarray(vectors[start:stop]), n, rows)


def sharded_search(client, scratch_dir: Path, threads: int | None,
                   shard_rows: int | None = None):
    """A ``search_all(index, vectors, n)`` for :func:`awe.affinity.affinity_from_vectors` that
    searches every indexed row's leave-one-out neighbours on the cluster, shard by shard of query
    rows, every worker reading the same saved index. Equal to ``index.search(vectors, n,
    arange(N))``: the shards are whole chunks of that search."""
    threads = threads or threads_per_worker(client)
    shard_rows = shard_rows or SEARCH_SHARD_ROWS

    def search_all(index, vectors: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        scratch_dir.mkdir(parents=True, exist_ok=True)
        index_path = scratch_dir / "index.faiss"
        index.save(index_path)
        if isinstance(vectors, np.memmap) and vectors.filename:
            vectors_path = Path(vectors.filename)  # already on disk (a large build)
        else:
            vectors_path = scratch_dir / "vectors.npy"
            np.save(vectors_path, vectors)
        total = len(vectors)
        out_d = np.empty((total, n), dtype=np.float32)
        out_i = np.empty((total, n), dtype=np.int64)
        ranges = [(s, min(s + shard_rows, total)) for s in range(0, total, shard_rows)]
        params = {"kind": index.kind, **index.params}
        results = map_ordered(client, search_task,
                              [(str(index_path), params, str(vectors_path), s, e, n, threads)
                               for s, e in ranges])
        for (start, stop), (d, i) in zip(ranges, results, strict=True):
            out_d[start:stop], out_i[start:stop] = d, i
        return out_d, out_i

    return search_all
