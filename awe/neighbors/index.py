"""The nearest-neighbour index behind the affinity weights G (stage 2).

Every training example's stage-1 embedding e_i = x_i U is indexed (row i gets id i) and G looks up a
query's n nearest training rows by squared L2 distance. The index kind follows the data size:

* ``flat`` — exact search of every row, while that is fast enough: the vectors are kept in a faiss
  ``IndexFlatL2`` (the saved format), but searched by :func:`exact_knn`, a blocked torch GEMM with
  a two-level top-k, because the faiss-cpu wheel's exhaustive search runs at a quarter of torch's
  GEMM rate on the same cores (measured: 46 vs 180 GFLOP/s, 2 threads, D = 784);
* ``ivf`` — inverted lists over a k-means coarse quantizer (faiss ``IndexIVFFlat``): only the
  ``nprobe`` lists nearest the query are scanned, with exact distances to the rows found (no PQ);
* ``hnsw`` — a navigable small-world graph (faiss ``IndexHNSWFlat``), an option;
* ``bf16`` — every row scored, but from bfloat16 copies of the vectors (:func:`bf16_knn`: ~4x the
  float32 GEMM rate on CPUs with AMX or AVX512-BF16), the ``rerank`` best candidates beyond n
  re-ranked by exact float32 distance. The vectors are saved as for ``flat``.

``auto`` picks flat up to ``flat_max_rows`` rows and IVF beyond; an IVF index that would probe
more than a twelfth of its lists becomes ``bf16`` on CPUs with native bfloat16 products (flat
elsewhere, or when bf16 misses the recall target). For the approximate kinds, the search breadth
(IVF ``nprobe``, HNSW ``efSearch``, bf16 ``rerank``) is *calibrated* at build time unless given: the
smallest value on a fixed ladder whose recall@``calibrate_n`` against exact search, on a seeded
sample of ``recall_sample`` indexed rows queried leave-one-out, reaches ``target_recall`` with
margin (the mean minus two standard errors of the per-query recall must reach it). So the recall
bar holds on the data actually indexed, not only on the benchmark's; the value chosen and the
recall reached are in :attr:`NeighbourIndex.params` (written to ``config.json``).

Determinism: for a seed, flat and IVF builds are repeatable (the IVF k-means runs on a seeded
subsample with a seeded initialisation; the calibration sample is seeded too). HNSW graph
construction is repeatable only with one thread (faiss inserts rows concurrently).

Leave-one-out: ``search(..., exclude_ids=ids)`` never returns a query's own id; duplicates of the
query under other ids are kept. For flat and bf16 it runs on :mod:`awe.join`, and
:meth:`NeighbourIndex.leave_one_out` (build-g's search of every training row) computes each
pair's product once for both rows (the self-join), with the same result as that search.
Rows with fewer than n neighbours found are padded with id -1 and distance +inf (too few rows
indexed, or, for IVF, too few rows in the lists probed).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from awe.artifacts import atomic_path
from awe.cpu import check_int, native_bf16
from awe.errors import AweError, invalid
from awe.neighbors.exact import bf16_knn, bf16_rows, exact_knn, squared_norms
from awe.neighbors.join import JoinRows, join_search, self_join

INDEX_KINDS = ("auto", "flat", "bf16", "ivf", "hnsw")
DEFAULT_TARGET_RECALL = 0.95

_REBUILD = "rebuild it with `awe build-g`"
# IVF k-means: training rows per list (faiss warns below 39) and iterations.
_TRAIN_ROWS_PER_LIST = 40
_KMEANS_ITER = 10
# Search-breadth ladders tried by calibration, smallest first.
_NPROBE_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768,
                  1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
_EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
_RERANK_LADDER = (0, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Rows added to the index per call, between progress reports.
_ADD_CHUNK = 65536
# Defaults when calibration is switched off (calibrate_n=0) and nothing is given.
_DEFAULT_NPROBE = 16
# `--index auto`: an IVF index whose calibrated nprobe probes more than this share of its lists
# is replaced by exact search. Measured on 300k unclustered 128-d embeddings (2 threads): IVF
# costs ~5 µs a query per list probed (nprobe 96: 0.47 ms, 768: 4.6 ms a query) and exact_knn
# 0.92 ms a query, so they break even near nprobe 190 of 2191 lists. Both grow alike with N
# (lists hold N / nlist rows), so the share does not depend on N.
_IVF_MAX_PROBED = 1 / 12
_DEFAULT_EF = 128
_DEFAULT_RERANK = 16


@dataclass(frozen=True)
class IndexConfig:
    """How to build the neighbour index; every field has a CLI option of the same name."""

    kind: str = "auto"              # auto: flat while n_rows <= flat_max_rows, else ivf
    flat_max_rows: int = 100_000    # exact all-vs-all of 100k rows, D=128: ~16 s on 2 idle cores
    nlist: int | None = None        # IVF lists; None -> 4*sqrt(N), at most N/40
    nprobe: int | None = None       # None -> calibrated to target_recall
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int | None = None    # None -> calibrated to target_recall
    rerank: int | None = None       # bf16: candidates beyond n re-ranked; None -> calibrated
    recall_sample: int = 1000       # queries used to measure (and calibrate) recall
    # calibration: the recall's 2-SE lower bound must reach it
    target_recall: float = DEFAULT_TARGET_RECALL
    calibrate_n: int = 20           # recall@n used for calibration (G's n); 0 = no calibration
    seed: int = 0

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise invalid("kind", f"must be one of {', '.join(INDEX_KINDS)}, got {self.kind!r}")
        check_int("flat_max_rows", self.flat_max_rows, 0)
        check_int("nlist", self.nlist, 1, optional=True)
        check_int("nprobe", self.nprobe, 1, optional=True)
        if self.nlist is not None and self.nprobe is not None and self.nprobe > self.nlist:
            raise invalid("nprobe", f"must be <= nlist ({self.nlist}), got {self.nprobe}")
        check_int("hnsw_m", self.hnsw_m, 2)
        check_int("ef_construction", self.ef_construction, 1)
        check_int("ef_search", self.ef_search, 1, optional=True)
        check_int("rerank", self.rerank, 0, optional=True)
        check_int("recall_sample", self.recall_sample, 1)
        check_int("calibrate_n", self.calibrate_n, 0)
        check_int("seed", self.seed, 0)
        if (isinstance(self.target_recall, bool) or not isinstance(self.target_recall, (int, float))
                or not 0.0 < self.target_recall <= 1.0):
            raise invalid("target_recall", f"must be in (0, 1], got {self.target_recall!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IndexConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AweError(f"unknown index option(s) {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(known))}")
        return cls(**d)


def default_nlist(n_rows: int) -> int:
    """IVF lists for N rows: 4*sqrt(N), at most N/40 so k-means has 40 rows per list, at least 1."""
    return int(max(1, min(round(4 * math.sqrt(n_rows)), n_rows // _TRAIN_ROWS_PER_LIST)))


def _as_matrix(x: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise AweError(f"{what} must be a 2-d array [rows, dim], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise AweError(f"{what} have dimension {x.shape[1]}, the index has {dim}; {_REBUILD}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _drop_excluded(dist: np.ndarray, ids: np.ndarray, exclude: np.ndarray | None, n: int,
                   searched_extra: bool) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's excluded id (or, when absent and one extra column was searched, the last
    column), then cut or pad to ``n`` columns. Vectorised over rows."""
    ids = ids.astype(np.int64, copy=False)
    dist = dist.astype(np.float32, copy=False)
    missing = ids < 0
    if missing.any():
        dist = dist.copy()
        dist[missing] = np.inf
    if exclude is not None:
        ex = exclude[:, None]
        drop = (ids == ex) & (ex >= 0)
        drop &= np.cumsum(drop, axis=1) == 1          # first occurrence only
        if searched_extra:
            drop[~drop.any(axis=1), -1] = True
        if drop.any():
            order = np.argsort(drop, axis=1, kind="stable")   # kept columns first, in order
            ids = np.take_along_axis(ids, order, axis=1)
            dist = np.take_along_axis(dist, order, axis=1)
            kept = np.take_along_axis(~drop, order, axis=1)
            ids = np.where(kept, ids, -1)
            dist = np.where(kept, dist, np.float32(np.inf))
    b, k = ids.shape
    if k >= n:
        return np.ascontiguousarray(dist[:, :n]), np.ascontiguousarray(ids[:, :n])
    out_d = np.full((b, n), np.inf, dtype=np.float32)
    out_i = np.full((b, n), -1, dtype=np.int64)
    out_d[:, :k] = dist
    out_i[:, :k] = ids
    return out_d, out_i


def _recalls(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per query |approx ∩ exact| / |exact| (ids; -1 padding ignored; queries with no exact
    neighbour left out)."""
    hits = (approx[:, :, None] == exact[:, None, :]) & (exact[:, None, :] >= 0)
    found = hits.any(axis=1).sum(axis=1)
    size = (exact >= 0).sum(axis=1)
    ok = size > 0
    return found[ok] / size[ok]


def _recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact|."""
    per = _recalls(approx, exact)
    return float(per.mean()) if per.size else 1.0


def _faiss_reason(exc: Exception) -> str:
    """A short reason from a faiss read error (its text names C++ functions and source lines)."""
    text = " ".join(str(exc).split())
    if "read error" in text:
        return "truncated or unreadable"
    if "Error: " in text:
        reason = text.rsplit("Error: ", 1)[-1]
    elif ".cpp:" in text:       # "Error in <function> at <file>.cpp:<line>: <reason>"
        reason = text.split(".cpp:", 1)[1].split(": ", 1)[-1]
    else:
        reason = text or type(exc).__name__
    return reason if len(reason) <= 120 else reason[:117] + "..."


def _rows_to_index(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as a float32 matrix (no copy when they are one), checked for indexing."""
    x = _as_matrix(vectors, "embeddings")
    n_rows, dim = x.shape
    if n_rows == 0 or dim == 0:
        raise AweError(f"cannot build a neighbour index over {n_rows} rows of dimension {dim}")
    if not all(np.isfinite(x[i:i + 65536]).all() for i in range(0, n_rows, 65536)):
        raise AweError("embeddings contain NaN or infinite values; the stage-1 model diverged, "
                       "retrain it")
    return x


class NeighbourIndex:
    """A faiss index over N rows (ids 0..N-1), squared-L2 metric."""

    def __init__(self, index, kind: str, params: dict, rows: np.ndarray | None = None):
        """``index``: the faiss index; or None, and ``rows`` are searched exactly in place."""
        self.index = index
        self.kind = kind
        self.n_rows, self.dim = (int(index.ntotal), int(index.d)) if index is not None else (
            int(rows.shape[0]), int(rows.shape[1]))
        self.params = params
        self.timings: dict[str, float] = {}   # seconds of this process's build steps (not saved)
        # flat: the rows searched and their squared norms; for a faiss index a view of its
        # vectors, made on first search
        self._flat: tuple[np.ndarray, np.ndarray] | None = (
            None if rows is None else (rows, squared_norms(rows)))
        self._bf16 = None   # bf16: bf16_rows of the flat rows, made on first search
        self._join = None   # flat, bf16: the rows for leave-one-out search (awe.join)
        self.rerank = int(params.get("rerank", _DEFAULT_RERANK))

    @classmethod
    def exact_over(cls, vectors: np.ndarray, config: IndexConfig | None = None,
                   ) -> NeighbourIndex:
        """Exact search over ``vectors`` themselves, with no FAISS copy of them: for an index
        that is searched but never saved (the knn baselines of ``awe eval``). The caller keeps
        ``vectors`` unchanged while the index is used (a memory map stays valid after its file
        is unlinked, on POSIX). The same results as :meth:`build` with ``kind="flat"``."""
        config = config or IndexConfig()
        x = _rows_to_index(vectors)
        params = {"kind": "flat", "n_rows": int(x.shape[0]), "dim": int(x.shape[1]),
                  "metric": "l2", "seed": config.seed, "recall_sample": config.recall_sample}
        return cls(None, "flat", params, rows=x)

    def _flat_view(self) -> tuple[np.ndarray, np.ndarray]:
        """The flat index's vectors (a view of faiss's memory, no copy) and their squared norms.
        Set as one tuple: scoring threads search concurrently."""
        if self._flat is None:
            import faiss

            rows = faiss.rev_swig_ptr(self.index.get_xb(), self.n_rows * self.dim).reshape(
                self.n_rows, self.dim)
            self._flat = rows, squared_norms(rows)
        return self._flat

    def _bf16_view(self):
        """:func:`bf16_rows` of the indexed rows (made once; set as one tuple)."""
        if self._bf16 is None:
            self._bf16 = bf16_rows(self._flat_view()[0])
        return self._bf16

    def _join_rows(self):
        """:class:`awe.join.JoinRows` of the indexed rows in this kind's precision (made once;
        set as one object)."""
        if self._join is None:

            self._join = JoinRows(self._flat_view()[0],
                                  "bfloat16" if self.kind == "bf16" else "float32")
        return self._join

    def _joins(self) -> bool:
        """Whether leave-one-out search runs on :mod:`awe.join` (flat and bf16)."""
        return self.kind in ("flat", "bf16")

    def leave_one_out(self, vectors: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Every indexed row's ``n`` nearest other rows (``vectors``: the indexed rows), as
        ``search(vectors, n, exclude_ids=arange(N))`` returns them. For flat and bf16, from
        :func:`awe.join.self_join`: each pair's product computed once, the same result."""
        if not self._joins():
            return self.search(vectors, n, exclude_ids=np.arange(len(vectors), dtype=np.int64))
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if len(vectors) != self.n_rows:
            raise ValueError(f"leave_one_out needs the {self.n_rows} indexed rows, "
                             f"got {len(vectors)}")

        return self_join(self._join_rows(), n, self.rerank if self.kind == "bf16" else 0)

    # ----------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, vectors: np.ndarray, config: IndexConfig | None = None,
              progress: Callable[[int, int], None] | None = None) -> NeighbourIndex:
        """Index ``vectors`` (float32 [N, D]; row i gets id i). ``progress(rows_added, N)`` is
        called after each chunk of rows is added (an exception it raises aborts the build)."""
        import faiss

        config = config or IndexConfig()
        x = _rows_to_index(vectors)
        n_rows, dim = x.shape
        kind = config.kind
        if kind == "auto":
            kind = "flat" if n_rows <= config.flat_max_rows else "ivf"
        common = {"n_rows": int(n_rows), "dim": int(dim), "metric": "l2", "seed": config.seed,
                  "recall_sample": config.recall_sample}
        params: dict = {"kind": kind, **common}
        t0 = time.perf_counter()
        def add_all(index) -> None:
            for start in range(0, n_rows, _ADD_CHUNK):
                stop = min(start + _ADD_CHUNK, n_rows)
                index.add(x[start:stop])
                if progress is not None:
                    progress(stop, n_rows)

        if kind in ("flat", "bf16"):
            index = faiss.IndexFlatL2(dim)
            add_all(index)
        elif kind == "ivf":
            nlist = min(config.nlist or default_nlist(n_rows), n_rows)
            train_rows = min(n_rows, _TRAIN_ROWS_PER_LIST * nlist)
            rng = np.random.default_rng(config.seed)
            sample = (x if train_rows == n_rows
                      else x[np.sort(rng.choice(n_rows, size=train_rows, replace=False))])
            quantizer = faiss.IndexFlatL2(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
            index.own_fields = True
            quantizer.this.disown()
            index.cp.seed = int(config.seed)
            index.cp.niter = _KMEANS_ITER
            index.cp.min_points_per_centroid = 1      # small data: no faiss warning
            index.cp.max_points_per_centroid = 1 << 30  # we subsampled already
            index.train(sample)
            del sample
            add_all(index)
            params.update(nlist=int(nlist), train_rows=int(train_rows))
            if config.nprobe is not None:
                index.nprobe = min(config.nprobe, nlist)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_L2)
            index.hnsw.efConstruction = config.ef_construction
            add_all(index)
            params.update(hnsw_m=config.hnsw_m, ef_construction=config.ef_construction)
            if config.ef_search is not None:
                index.hnsw.efSearch = config.ef_search
        else:  # pragma: no cover - IndexConfig validates kind
            raise AssertionError(kind)
        built = cls(index, kind, params)
        built.timings["build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        built._calibrate(x, config)
        built.timings["calibrate_s"] = time.perf_counter() - t0
        if (config.kind == "auto" and kind == "ivf" and params.get("nprobe_calibrated")
                and params["nprobe"] > params["nlist"] * _IVF_MAX_PROBED):
            # embeddings without cluster structure: the recall target makes IVF probe a large
            # share of its lists, and scoring every row is then as fast or faster: from bf16
            # products where the CPU has them (if they reach the target), else exactly
            fallback = {"auto_fallback_from_ivf": {
                name: params[name] for name in ("nlist", "nprobe", "calibration")}}
            del built, index  # free the IVF copy of the vectors before the flat one is made
            t0 = time.perf_counter()
            flat = faiss.IndexFlatL2(dim)
            add_all(flat)
            built = None
            if native_bf16():
                built = cls(flat, "bf16", {"kind": "bf16", **common, **fallback})
                built._calibrate(x, config)
                # a given --rerank is not calibrated: it is used as given
                if not built.params.get("calibration", {"reached": True})["reached"]:
                    fallback["auto_fallback_from_bf16"] = {
                        name: built.params[name] for name in ("rerank", "calibration")}
                    built = None
            if built is None:
                built = cls(flat, "flat", {"kind": "flat", **common, **fallback})
            built.timings["build_s"] = time.perf_counter() - t0
        return built

    def _calibrate(self, x: np.ndarray, config: IndexConfig) -> None:
        """Choose nprobe / efSearch / rerank: given, else the smallest ladder value reaching the
        target."""
        if self.kind == "flat":
            return
        name, given, default = {"ivf": ("nprobe", config.nprobe, _DEFAULT_NPROBE),
                                "hnsw": ("ef_search", config.ef_search, _DEFAULT_EF),
                                "bf16": ("rerank", config.rerank, _DEFAULT_RERANK)}[self.kind]
        if given is not None or config.calibrate_n == 0:
            self._set_breadth(given if given is not None else default)
            self.params[name] = self._breadth()
            self.params[f"{name}_calibrated"] = False
            return
        n = config.calibrate_n
        if self.kind == "ivf":
            ladder = [v for v in _NPROBE_LADDER if v < self.params["nlist"]]
            ladder.append(self.params["nlist"])      # all lists: exact
            if config.kind == "auto":
                # auto replaces an IVF index probing more than this share: the first value past
                # it decides that as well as the full ladder would, at a fraction of its cost
                limit = self.params["nlist"] * _IVF_MAX_PROBED
                ladder = [v for v in ladder if v <= limit] + [v for v in ladder if v > limit][:1]
        elif self.kind == "hnsw":
            ladder = [v for v in _EF_LADDER if v >= n + 1] or [n + 1]
        else:
            ladder = list(_RERANK_LADDER)
        # Another sample than measure_recall's default (seed): the reported recall stays unbiased.
        queries, qids, exact = self._exact_sample(x, n, config.recall_sample, config.seed + 1)
        recall = bound = 0.0
        for value in ladder:
            self._set_breadth(value)
            _, approx = self.search(queries, n, exclude_ids=qids)
            per = _recalls(approx, exact)
            if per.size == 0:
                recall = bound = 1.0
                break
            recall = float(per.mean())
            # Lower confidence bound (2 standard errors) of the recall on the sample: the target
            # must hold on other queries too, and per-query recall varies a lot on clustered data.
            bound = recall - 2.0 * float(per.std()) / math.sqrt(per.size)
            if bound >= config.target_recall:
                break
        self.params[name] = self._breadth()
        self.params[f"{name}_calibrated"] = True
        self.params["calibration"] = {"n": n, "target_recall": config.target_recall,
                                      "queries": int(len(qids)), "recall": round(recall, 4),
                                      "recall_lower_bound": round(bound, 4),
                                      "reached": bool(bound >= config.target_recall)}

    def _set_breadth(self, value: int) -> None:
        if self.kind == "ivf":
            self.index.nprobe = int(min(value, self.index.nlist))
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = int(value)
        elif self.kind == "bf16":
            self.rerank = int(value)

    def _breadth(self) -> int:
        if self.kind == "bf16":
            return self.rerank
        return int(self.index.nprobe if self.kind == "ivf" else self.index.hnsw.efSearch)

    # ---------------------------------------------------------------------------------- search
    def search(self, queries: np.ndarray, n: int, exclude_ids: np.ndarray | None = None,
               batch_rows: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` nearest indexed rows of each query: (squared distances float32 [B, n],
        ids int64 [B, n]), nearest first. ``exclude_ids[b]`` (>= 0) is never returned for
        query b; -1 excludes nothing."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        q = _as_matrix(queries, "queries", self.dim)
        b = q.shape[0]
        if exclude_ids is not None:
            exclude_ids = np.asarray(exclude_ids, dtype=np.int64).reshape(-1)
            if exclude_ids.shape[0] != b:
                raise ValueError(f"exclude_ids has {exclude_ids.shape[0]} entries for {b} queries")
        if exclude_ids is not None and self._joins() and bool((exclude_ids >= 0).any()):
            return self._join_search(q, n, exclude_ids, batch_rows)
        extra = exclude_ids is not None
        k = min(n + int(extra), self.n_rows)
        searched_extra = extra and k == n + 1
        out_d = np.empty((b, n), dtype=np.float32)
        out_i = np.empty((b, n), dtype=np.int64)
        for start in range(0, b, batch_rows):
            stop = min(start + batch_rows, b)
            if self.kind == "flat":
                rows, sq_norms = self._flat_view()
                dist, ids = exact_knn(q[start:stop], rows, k, sq_norms)
            elif self.kind == "bf16":
                dist, ids = bf16_knn(q[start:stop], self._flat_view()[0], k, self.rerank,
                                     self._bf16_view())
            else:
                dist, ids = self.index.search(q[start:stop], k)
            ex = exclude_ids[start:stop] if extra else None
            out_d[start:stop], out_i[start:stop] = _drop_excluded(dist, ids, ex, n, searched_extra)
        return out_d, out_i

    def _join_search(self, q: np.ndarray, n: int, exclude_ids: np.ndarray,
                     batch_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Leave-one-out search with :meth:`leave_one_out`'s values (:func:`awe.join.join_search`):
        a shard of rows searched here gets the bits the whole self-join gives it."""

        rows = self._join_rows()
        rerank = self.rerank if self.kind == "bf16" else 0
        out_d = np.empty((q.shape[0], n), dtype=np.float32)
        out_i = np.empty((q.shape[0], n), dtype=np.int64)
        for start in range(0, q.shape[0], batch_rows):
            stop = min(start + batch_rows, q.shape[0])
            out_d[start:stop], out_i[start:stop] = join_search(
                rows, q[start:stop], exclude_ids[start:stop], n, rerank)
        return out_d, out_i

    def _exact_sample(self, vectors: np.ndarray, n: int, sample: int, seed: int):
        """A seeded sample of indexed rows, and their exact leave-one-out top-n ids."""
        x = _as_matrix(vectors, "embeddings", self.dim)
        if x.shape[0] != self.n_rows:
            raise ValueError(f"recall needs the {self.n_rows} indexed rows, got {x.shape[0]}")
        size = min(sample, self.n_rows)
        qids = np.sort(np.random.default_rng(seed).choice(self.n_rows, size=size, replace=False))
        qids = qids.astype(np.int64)
        queries = np.ascontiguousarray(x[qids])
        k = min(n + 1, self.n_rows)
        dist, ids = exact_knn(queries, x, k)
        _, exact = _drop_excluded(dist, ids, qids, n, k == n + 1)
        return queries, qids, exact

    def measure_recall(self, vectors: np.ndarray, n: int, sample: int | None = None,
                       seed: int = 0, leave_one_out: bool = True) -> float:
        """recall@n against exact search, with ``sample`` random indexed rows as queries."""
        if self.kind == "flat":
            return 1.0
        sample = sample or self.params.get("recall_sample", 1000)
        queries, qids, exact = self._exact_sample(vectors, n, sample, seed)
        if not leave_one_out:
            dist, ids = exact_knn(queries, _as_matrix(vectors, "embeddings"), n)
            _, exact = _drop_excluded(dist, ids, None, n, False)
        _, approx = self.search(queries, n, exclude_ids=qids if leave_one_out else None)
        return _recall(approx, exact)

    # ------------------------------------------------------------------------------- save/load
    def save(self, path: str | os.PathLike) -> None:
        """Write the index with faiss (atomic: a temporary name, then renamed)."""
        import faiss

        if self.index is None:
            raise ValueError("an index made by exact_over holds no FAISS index to save")
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, params: dict) -> NeighbourIndex:
        """Read an index written by :meth:`save` (faiss format, never pickle) with its params."""
        import faiss

        path = Path(path)
        if not path.is_file():
            raise AweError(f"{path}: missing neighbour index; {_REBUILD}")
        try:
            index = faiss.read_index(str(path))
        except (RuntimeError, OSError, ValueError) as exc:
            raise AweError(f"{path}: damaged neighbour index ({_faiss_reason(exc)}); "
                           f"{_REBUILD}") from exc
        types = {"flat": faiss.IndexFlatL2, "ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat}
        kind = params.get("kind")
        found = next((k for k, t in types.items() if isinstance(index, t)), None)
        if found == "flat" and kind == "bf16":     # the same vectors, searched from bf16 copies
            found = "bf16"
        if found is None or (kind is not None and found != kind):
            raise AweError(f"{path}: holds a {type(index).__name__}, config.json says "
                           f"{kind!r}; {_REBUILD}")
        for key, actual in (("n_rows", index.ntotal), ("dim", index.d)):
            if key in params and int(params[key]) != int(actual):
                raise AweError(f"{path}: index has {key}={actual}, config.json says "
                               f"{params[key]}; {_REBUILD}")
        if found == "ivf":
            index.nprobe = int(params.get("nprobe", _DEFAULT_NPROBE))
        elif found == "hnsw":
            index.hnsw.efSearch = int(params.get("ef_search", _DEFAULT_EF))
        return cls(index, found, dict(params, kind=found))

    def __repr__(self) -> str:
        extra = {k: self.params[k] for k in ("nlist", "nprobe", "ef_search", "rerank")
                 if k in self.params}
        return f"NeighbourIndex(kind={self.kind!r}, n_rows={self.n_rows}, dim={self.dim}, {extra})"
