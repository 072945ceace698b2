"""Exact k nearest rows between sparse inputs, without a dense copy of them.

:func:`awe.neighbors.exact.exact_knn` multiplies dense float32 matrices, so searching sparse
text in its input space would first expand every row to the full vocabulary (24k rows x 13k
TF-IDF terms are 1.2 GB of float32, most of it zeros, and every zero multiplied).
:func:`sparse_knn` answers in the same form from the rows as they are stored
(:class:`awe.csr.Csr`).

How: the base rows are taken a block at a time, and only the block is expanded, as a dense
[terms of the block x rows of the block] matrix; a query's scores against the block are then one
weighted sum of that matrix's rows, one per stored entry of the query (``embedding_bag`` with
per-sample weights: contiguous, vectorised, threaded over queries). So the work is
(stored entries of the queries) x (base rows), never (queries x base x vocabulary); a query term
absent from the block is dropped before the sum. Each block's scores are cut to their k best and
merged into a running top k per query.

Determinism: a score is the sum of a query's entries in term order, each times one number of the
block matrix, so it does not depend on which other rows share its block: the blocks' sizes, the
thread count and the query batch do not change a bit of it (tested here; torch does not document
the order of embedding_bag's sums). Equal scores are ranked by smaller id everywhere, inside a
block as well as in the merge (``torch.topk``'s choice among equal values is not specified), and
sparse rows tie often: duplicate rows, and the many rows sharing no term with a query, which all
score 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from awe import artifacts
from awe.csr import Csr
from awe.errors import AweError

METRICS = ("cosine", "l2")

# base rows expanded at a time: the block matrix holds (terms in the block) x _BASE_BLOCK float32
# (13k terms: 54 MB). Debtags self-kNN (24k rows, 13k terms, k = 20, one thread) took the least
# CPU time at 1024 of 512, 1024, 2048 and 4096
_BASE_BLOCK = 1024
# queries scored against a block at a time: a [_QUERY_BLOCK x _BASE_BLOCK] float32 score block
_QUERY_BLOCK = 1024
# _merge_block screens a score block by the maxima of groups of this many columns
_GROUP = 32
# key of an empty slot of a running top k: below every (score, id) key
_EMPTY = -(1 << 63)


def sparse_knn(queries: Csr, base: Csr, k: int, *, metric: str = "cosine",
               exclude_self: bool = False, exclude_ids: np.ndarray | None = None,
               block_rows: int = _BASE_BLOCK, query_rows: int = _QUERY_BLOCK,
               threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of ``base`` for each row of ``queries``, as
    :func:`awe.neighbors.exact.exact_knn` returns them: (distances float32 [B, k], ids int64
    [B, k]), nearest first, equal distances by id; k is cut to the rows of ``base``.

    ``metric``: ``"cosine"`` — distance 1 - cos(q, x) of the L2-normalised rows, clamped at 0; an
    all-zero row has cosine 0 with every row (distance 1), not NaN; ``"l2"`` — squared Euclidean
    |q|^2 + |x|^2 - 2 q.x, clamped at 0, as exact_knn computes it.

    ``exclude_self`` (leave-one-out, ``queries`` being the rows of ``base``): query i never
    returns id i. ``exclude_ids[i]`` (>= 0) is never returned for query i (-1: none), as in
    :meth:`awe.neighbors.index.NeighbourIndex.search`. A slot left with no row, which only exclusion
    causes (k = all the base rows), holds id -1 and distance +inf.

    Rows are lists of term ids (>= 0) with float32 values (``values=None``: every value 1); a
    term listed twice in a row counts with the sum of its values, as in a dense row. Memory:
    the running top k (B x k int64), a few copies of one [``query_rows`` x ``block_rows``] score
    block and one expanded block of base rows (its distinct terms x ``block_rows`` float32),
    beside a normalised copy of the stored entries; never B x base rows or rows x vocabulary.
    ``threads``: torch threads for this call (None: as set); the caller's setting is restored.
    """
    import torch

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    for name, value in (("block_rows", block_rows), ("query_rows", query_rows)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or threads < 1
                                or not isinstance(threads, (int, np.integer))):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    n_q, n_base = queries.n_rows, base.n_rows
    exclude = _exclusions(n_q, n_base, exclude_self, exclude_ids)
    k = min(int(k), n_base)
    out_d = np.empty((n_q, k), dtype=np.float32)
    out_i = np.empty((n_q, k), dtype=np.int64)
    if n_q == 0 or k == 0:
        return out_d, out_i
    if n_base >= (1 << 32) - 2:
        raise ValueError(f"base has {n_base} rows; ids must fit in 32 bits")

    q_ptr, q_idx, q_val, q_sq = _prepared(queries, "queries", metric)
    b_ptr, b_idx, b_val, b_sq = _prepared(base, "base", metric)
    n_terms = int(max(q_idx.max(initial=-1), b_idx.max(initial=-1))) + 1

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        top = _search(q_ptr, q_idx, q_val, b_ptr, b_idx, b_val, b_sq, metric, exclude, k,
                      n_terms, int(block_rows), int(query_rows))
    finally:
        torch.set_num_threads(before)

    keys, _ = torch.sort(top, dim=1, descending=True)
    scores, ids = _decode(keys)
    scores, ids = scores.numpy(), ids.numpy()
    missing = (keys == _EMPTY).numpy() | np.isneginf(scores)
    with np.errstate(invalid="ignore", over="ignore"):
        if metric == "cosine":
            dist = np.maximum(np.float32(1.0) - scores, np.float32(0.0))
        else:
            dist = np.maximum(q_sq[:, None] - scores, np.float32(0.0))
    dist[missing] = np.inf
    ids[missing] = -1
    # nearest first, equal distances by id (the scores' order up to rounding of the subtraction)
    order = np.lexsort((ids, dist), axis=-1)
    out_d[:] = np.take_along_axis(dist, order, axis=1)
    out_i[:] = np.take_along_axis(ids, order, axis=1)
    return out_d, out_i


def _exclusions(n_q: int, n_base: int, exclude_self: bool,
                exclude_ids: np.ndarray | None) -> np.ndarray | None:
    if exclude_self and exclude_ids is not None:
        raise ValueError("give exclude_self or exclude_ids, not both")
    if exclude_self:
        if n_q != n_base:
            raise ValueError(f"exclude_self needs the base rows as queries: {n_q} queries, "
                             f"{n_base} base rows")
        return np.arange(n_q, dtype=np.int64)
    if exclude_ids is None:
        return None
    exclude = np.asarray(exclude_ids, dtype=np.int64).reshape(-1)
    if exclude.shape[0] != n_q:
        raise ValueError(f"exclude_ids has {exclude.shape[0]} entries for {n_q} queries")
    return exclude


def _prepared(rows: Csr, what: str, metric: str):
    """(indptr, term ids, values, |row|^2) as contiguous arrays: terms sorted and distinct within
    rows, values float32, normalised to unit rows for cosine (|row|^2 then unused)."""
    indptr = np.ascontiguousarray(rows.indptr, dtype=np.int64)
    ids = np.ascontiguousarray(rows.indices, dtype=np.int64)
    n = rows.n_rows
    if rows.values is None:
        values = np.ones(len(ids), dtype=np.float32)
    else:
        values = np.ascontiguousarray(rows.values, dtype=np.float32)
        if values.shape != ids.shape:
            raise ValueError(f"{what}: {len(values)} values for {len(ids)} ids")
        if not np.isfinite(values).all():
            raise ValueError(f"{what} hold NaN or infinite values")
    if len(ids) and ids.min() < 0:
        raise ValueError(f"{what} hold a negative term id")
    row = rows.row_of_entry()
    if len(ids) > 1:
        same_row = row[1:] == row[:-1]
        if (same_row & (ids[1:] <= ids[:-1])).any():
            # sort within rows and sum repeated terms once, so a score never depends on the
            # order the entries came in
            order = np.lexsort((ids, row))
            row, ids, values = row[order], ids[order], values[order]
            first = np.ones(len(ids), dtype=bool)
            first[1:] = (row[1:] != row[:-1]) | (ids[1:] != ids[:-1])
            starts = np.flatnonzero(first)
            values = np.add.reduceat(values.astype(np.float64), starts).astype(np.float32)
            row, ids = row[starts], ids[starts]
            indptr = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(np.bincount(row, minlength=n), out=indptr[1:])
    sq = np.bincount(row, weights=np.square(values, dtype=np.float64), minlength=n)
    if metric == "cosine":
        norm = np.sqrt(sq)
        scale = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
        values = (values * scale[row]).astype(np.float32)
    return indptr, ids, values, sq.astype(np.float32)


def _search(q_ptr, q_idx, q_val, b_ptr, b_idx, b_val, b_sq, metric, exclude, k, n_terms,
            block_rows, query_rows):
    """Every query's top k (score, id) keys [n_q, k]: score q.x (cosine of unit rows) or
    2 q.x - |x|^2 (l2), larger nearer."""
    import torch

    n_q, n_base = len(q_ptr) - 1, len(b_ptr) - 1
    threads = torch.get_num_threads()
    top = torch.full((n_q, k), _EMPTY, dtype=torch.int64)
    q_idx_t, q_val_t = torch.from_numpy(q_idx), torch.from_numpy(q_val)
    b_sq_t = torch.from_numpy(b_sq)
    local = np.full(n_terms, -1, dtype=np.int64)    # term -> row of the block matrix
    for start in range(0, n_base, block_rows):
        stop = min(start + block_rows, n_base)
        m = stop - start
        lo, hi = int(b_ptr[start]), int(b_ptr[stop])
        terms = np.unique(b_idx[lo:hi])
        local[terms] = np.arange(len(terms))
        matrix = torch.zeros(max(len(terms), 1), m)
        rows_of = np.repeat(np.arange(m, dtype=np.int64), np.diff(b_ptr[start:stop + 1]))
        matrix[torch.from_numpy(local[b_idx[lo:hi]]), torch.from_numpy(rows_of)] = (
            torch.from_numpy(b_val[lo:hi]))
        local_t = torch.from_numpy(local)
        for qa in range(0, n_q, query_rows):
            qb = min(qa + query_rows, n_q)
            qlo, qhi = int(q_ptr[qa]), int(q_ptr[qb])
            mapped = local_t[q_idx_t[qlo:qhi]]
            kept = mapped >= 0
            # offsets of the kept entries: kept entries before each query's first entry
            before = torch.zeros(qhi - qlo + 1, dtype=torch.int64)
            torch.cumsum(kept, 0, out=before[1:])
            offsets = before[torch.from_numpy(q_ptr[qa:qb + 1] - qlo)]
            scores = torch.nn.functional.embedding_bag(
                mapped[kept], matrix, offsets, mode="sum",
                per_sample_weights=q_val_t[qlo:qhi][kept], include_last_offset=True)
            if metric == "l2":
                scores.mul_(2.0).sub_(b_sq_t[start:stop])
            if exclude is not None:
                ex = exclude[qa:qb]
                hit = np.flatnonzero((ex >= start) & (ex < stop))
                scores[torch.from_numpy(hit), torch.from_numpy(ex[hit] - start)] = -np.inf
            # the merge is a few passes over the block and many small ops: on one thread, as
            # a parallel small op on a busy machine waits for its second thread (10k debtags
            # rows, threads=2, shared 2-core machine: 9-11 s against 16-20 s on two)
            torch.set_num_threads(1)
            try:
                _merge_block(top[qa:qb], scores, start)
            finally:
                torch.set_num_threads(threads)
        local[terms] = -1
    return top


def _merge_block(top, scores, offset: int) -> None:
    """Merge a block's scores [B, M] (ids ``offset`` + column) into the running top keys [B, k].

    The block's ids are larger than every id already in ``top``, so with a full top a column
    enters only if its score beats the kth score strictly, and few do once the first blocks
    have been seen. They are found from the maxima of groups of ``_GROUP`` columns (one pass
    over the block): only groups whose maximum passes are read again, unless so many pass that
    one comparison over the whole block is cheaper. Excluded columns (score -inf) never pass."""
    import torch

    k = top.shape[1]
    rows, m = scores.shape
    kth = top.amin(dim=1)
    threshold, _ = _decode(kth)
    filling = torch.nonzero(kth == _EMPTY).reshape(-1)
    if len(filling):
        # rows with fewer than k ids so far (the first block): every column is a candidate
        part = scores if len(filling) == rows else scores[filling]
        keys = _keys(part + 0.0, torch.arange(offset, offset + m).expand(len(filling), m))
        merged = torch.cat([top[filling], keys], dim=1)
        top[filling] = torch.topk(merged, k, dim=1, sorted=False).values
        if len(filling) == rows:
            return
        threshold[filling] = torch.inf
    n_groups = -(-m // _GROUP)
    full = (m // _GROUP) * _GROUP
    maxima = torch.empty(rows, n_groups)
    torch.amax(scores[:, :full].reshape(rows, full // _GROUP, _GROUP), dim=2,
               out=maxima[:, :full // _GROUP])
    if full < m:
        maxima[:, -1] = scores[:, full:].amax(dim=1)
    hot = maxima > threshold[:, None]
    n_hot = int(hot.sum())
    if n_hot == 0:
        return
    if n_hot * _GROUP * 4 > rows * m:
        row, col = torch.nonzero(scores > threshold[:, None], as_tuple=True)
        values = scores[row, col]
    else:
        row, group = torch.nonzero(hot, as_tuple=True)
        cols = (group[:, None] * _GROUP + torch.arange(_GROUP)).clamp_(max=m - 1)
        values = scores[row[:, None], cols]
        # a clamped column repeats the last one, which the mask keeps only once
        keep = values > threshold[row, None]
        keep[:, 1:] &= cols[:, 1:] != cols[:, :-1]
        hit, j = torch.nonzero(keep, as_tuple=True)
        row, col, values = row[hit], cols[hit, j], values[hit, j]
    keys = _keys(values + 0.0, col + offset)     # + 0.0: -0.0 becomes 0.0, one key for both
    # each touched row's passing columns side by side, then merged with its top
    touched, per_row = torch.unique_consecutive(row, return_counts=True)
    first = torch.cumsum(per_row, 0) - per_row
    slot = torch.repeat_interleave(torch.arange(len(touched)), per_row)
    within = torch.arange(len(row)) - first[slot]
    grid = torch.full((len(touched), k + int(per_row.max())), _EMPTY, dtype=torch.int64)
    grid[:, :k] = top[touched]
    grid[slot, within + k] = keys
    top[touched] = torch.topk(grid, k, dim=1, sorted=False).values


def _keys(values, ids):
    """int64 keys ordering (float32 value, id) pairs by value, then by smaller id (0 <= id <
    2**32 - 1): the high 32 bits are the value's bits made to sort as a signed integer."""
    import torch

    bits = values.contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(torch.int64) << 32) + ((1 << 32) - 1 - ids)


def _decode(keys):
    """(values float32, ids int64) of :func:`_keys`."""
    import torch

    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    ids = (1 << 32) - 1 - (keys & 0xFFFFFFFF)
    return bits.view(torch.float32), ids


class SparseIndex:
    """Exact search over sparse rows by squared L2 (:func:`sparse_knn`), without a dense copy of
    them: the input-space index of sparse inputs (G_orig, the knn-input row). Cosine search is L2
    over rows normalised to unit length (2 - 2 cos), which the caller's rows already are. Offers
    the parts of :class:`awe.neighbors.index.NeighbourIndex` that G uses; saved as safetensors."""

    kind = "sparse"

    def __init__(self, rows: Csr, params: dict | None = None):
        values = rows.values if rows.values is not None else np.ones(len(rows.indices),
                                                                      dtype=np.float32)
        self.rows = Csr(np.asarray(rows.indptr, dtype=np.int64),
                        np.asarray(rows.indices, dtype=np.int64),
                        np.asarray(values, dtype=np.float32))
        self.n_rows = self.rows.n_rows
        self.index = None
        self.params = {**(params or {}), "kind": "sparse", "n_rows": self.n_rows, "metric": "l2"}
        self.timings: dict[str, float] = {}

    def search(self, queries: Csr, n: int, exclude_ids: np.ndarray | None = None,
               batch_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` nearest rows of each query (squared distances, ids), nearest first, equal
        distances by id; ``exclude_ids[b]`` (>= 0) is never returned for query b; columns
        beyond the rows hold id -1 and distance +inf."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        dist, ids = sparse_knn(queries, self.rows, int(n), metric="l2", exclude_ids=exclude_ids)
        if exclude_ids is not None:  # an excluded id leaves its slot empty
            dist[ids < 0] = np.inf
        if ids.shape[1] < n:
            out_d = np.full((ids.shape[0], n), np.inf, dtype=np.float32)
            out_i = np.full((ids.shape[0], n), -1, dtype=np.int64)
            out_d[:, :ids.shape[1]], out_i[:, :ids.shape[1]] = dist, ids
            return out_d, out_i
        return dist, ids

    def leave_one_out(self, vectors: Csr, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Every indexed row's ``n`` nearest other rows (``vectors``: the indexed rows)."""
        return self.search(vectors, n, np.arange(vectors.n_rows, dtype=np.int64))

    def measure_recall(self, vectors, n: int, sample: int | None = None, seed: int = 0,
                       leave_one_out: bool = True) -> float:
        return 1.0  # exact

    def save(self, path) -> None:
        import torch

        artifacts.write_tensors(path, {"indptr": torch.from_numpy(self.rows.indptr),
                                       "indices": torch.from_numpy(self.rows.indices),
                                       "values": torch.from_numpy(self.rows.values)},
                                {"kind": "sparse"})

    @classmethod
    def load(cls, path, params: dict) -> SparseIndex:
        path = Path(path)
        if not path.is_file():
            raise AweError(f"{path}: missing neighbour index; run `awe build-g` again")
        tensors = artifacts.read_tensors(path)
        try:
            rows = Csr(tensors["indptr"].numpy(), tensors["indices"].numpy(),
                       tensors["values"].numpy())
        except KeyError as exc:
            raise AweError(f"{path}: not a sparse neighbour index (missing {exc}); run "
                           f"`awe build-g` again") from exc
        if rows.n_rows != int(params.get("n_rows", rows.n_rows)):
            raise AweError(f"{path}: index has {rows.n_rows} rows, config.json says "
                           f"{params['n_rows']}; run `awe build-g` again")
        return cls(rows, {k: v for k, v in params.items() if k not in ("kind", "n_rows")})

    def __repr__(self) -> str:
        return f"SparseIndex(n_rows={self.n_rows})"
