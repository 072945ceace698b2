"""Leave-one-out nearest neighbours of every indexed row, each pair's distance computed once.

Stage 2 searches every training row against every other. Searched query by query, each pair
(i, j) is multiplied twice, once for i and once for j; the *self-join* here multiplies each
tile of pairs once and reads it in both directions: for row i against the rows j of a tile, and
for each row j against the rows i, halving the products that dominate build-g at scale.

The tile is a product of two copies of the rows, A_i = [-2(x_i - c), |x_i - c|^2, 1] and
B_j = [x_j - c, 1, |x_j - c|^2] (c the rows' mean), so that A_i . B_j is the squared distance
itself: both directions read the same value, and a value is smaller-is-nearer in either. A
value's bits depend on which of the two rows is on the A side (the norms are summed in another
order), so every pair is computed with the *smaller id on the A side*, here and in
:func:`join_search` (a block of queries with their ids against every row: what the Dask shards,
calibration and recall run). The GEMM's value for an entry does not depend on the blocks it is
computed in (tested), so both give the same bits and the same neighbours: a query's top is the
``depth`` smallest (value, id) pairs over all rows, whatever the order of the tiles.

Two precisions share the code: ``float32`` (the ``flat`` index: exact, the reported distance is
the value clamped at 0) and ``bfloat16`` (the ``bf16`` index: the norms as two bf16 parts, the
``depth = n + rerank`` smallest values re-ranked by float32 distances from the differences).

Each tile is screened per query against the running ``depth``-th smallest value: the minima of
strided groups of ``_GROUP`` entries (as int16 for bf16: non-negative bf16 values order as
their bits, and a negative rounding artefact counts as nearest) pick the groups that can hold
a better value, and only those are merged (:func:`awe.neighbours._merge_top`, ties by smaller
id).
"""

from __future__ import annotations

import math

import numpy as np

from awe.neighbors.merge import merge_top, nearest_first

# Queries (the A side) and rows (the B side) per tile; the groups whose minima screen a tile.
_ROW_BLOCK = 1024
_COLUMN_BLOCK = 8192
_GROUP = 32
_ROW_GROUP = 8
# Products have a multiple of this many rows on either side: MKL's few-row kernels sum in
# another order (see awe.neighbours._QUERY_PAD).
_PAD = 16
# Re-ranking (bf16): queries per gather of their candidates' rows.
_RERANK_BLOCK = 4096
_NORM_BLOCK = 16384
# JoinRows keeps its B copy while it takes at most this; wider rows (a baseline's 474 input
# features at 1M rows: 1.9 GB) are made block by block, for a few percent of the time.
_STORED_BYTES = 1 << 30


class JoinRows:
    """The B copy of the indexed rows for one precision, their mean, and the float32 rows."""

    def __init__(self, base: np.ndarray, precision: str):
        import torch

        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
        self.precision = precision
        self.dtype = torch.float32 if precision == "float32" else torch.bfloat16
        x = torch.from_numpy(np.ascontiguousarray(base, dtype=np.float32))
        self.x = x
        n, dim = x.shape
        self.n, self.dim = n, dim
        self.parts = 1 if precision == "float32" else 2      # the norm in how many values
        total = torch.zeros(dim, dtype=torch.float64)
        for start in range(0, n, _NORM_BLOCK):
            total += x[start:start + _NORM_BLOCK].sum(0, dtype=torch.float64)
        self.center = (total / max(n, 1)).float()
        self.width = dim + 2 * self.parts
        self.b = None
        if n * self.width * self.b_itemsize() <= _STORED_BYTES:
            self.b = torch.empty(n, self.width, dtype=self.dtype)
            for start in range(0, n, _NORM_BLOCK):
                self._fill(x[start:start + _NORM_BLOCK], self.b[start:start + _NORM_BLOCK])

    def b_itemsize(self) -> int:
        return 4 if self.precision == "float32" else 2

    def block(self, start: int, stop: int):
        """B rows start..stop: stored, or made from the float32 rows (the same bits)."""
        if self.b is not None:
            return self.b[start:stop]
        return self.b_of(self.x[start:stop])

    def _fill(self, rows, out) -> None:
        """B rows [x - c, 1 (x parts), norm parts] of float32 ``rows`` into ``out``."""
        dim, parts = self.dim, self.parts
        centred = rows - self.center
        sq = (centred * centred).sum(1)
        out[:, :dim] = centred
        out[:, dim:dim + parts] = 1.0
        if parts == 1:
            out[:, dim + 1] = sq
        else:
            hi = sq.bfloat16()
            out[:, dim + 2] = hi
            out[:, dim + 3] = sq - hi.float()

    def b_of(self, vectors) -> object:
        """B rows of other vectors (queries), float32 [m, D] -> [m, D + 2 parts]."""
        import torch

        out = torch.empty(vectors.shape[0], self.width, dtype=self.dtype)
        self._fill(vectors, out)
        return out

    def a_of(self, b) -> object:
        """The A rows [-2(x - c), norm parts, 1 (x parts)] of B rows: exact, -2 a power of 2."""
        import torch

        dim, parts = self.dim, self.parts
        return torch.cat([b[:, :dim] * -2.0, b[:, dim + parts:], b[:, dim:dim + parts]], dim=1)


class _Products:
    """Tiles A . B^T into one reused buffer: a fresh 32 MB tensor a tile cost page faults
    (~5 ms of a ~35 ms product)."""

    def __init__(self, dtype, rows: int, columns: int):
        import torch

        self.buffer = torch.empty(rows * columns, dtype=dtype)
        self.spare = torch.empty(rows * columns, dtype=dtype)   # the padded products' copy

    def mm(self, a, b, rows: int, columns: int):
        """a . b^T ([rows, columns] of it: a and b may carry padded rows), contiguous."""
        import torch

        out = self.buffer[:a.shape[0] * b.shape[0]].view(a.shape[0], b.shape[0])
        torch.mm(a, b.T, out=out)
        if out.shape == (rows, columns):
            return out
        return self.spare[:rows * columns].view(rows, columns).copy_(out[:rows, :columns])


def _padded(t, rows: int):
    """``t`` with zero rows added up to ``rows``."""
    import torch

    if t.shape[0] == rows:
        return t
    out = torch.zeros(rows, t.shape[1], dtype=t.dtype)
    out[:t.shape[0]] = t
    return out


def _pad(m: int) -> int:
    return -(-m // _PAD) * _PAD


class _Tops:
    """Each query's running ``depth`` smallest (value, id): stored negated for merge_top,
    which keeps the largest."""

    def __init__(self, m: int, depth: int):
        import torch

        self.neg = torch.full((m, depth), -math.inf)
        self.ids = torch.full((m, depth), -1, dtype=torch.int64)
        self.seen = torch.zeros(m, dtype=torch.int64)   # values merged so far, per query
        self.depth = depth

    def merge(self, start: int, stop: int, tile, along_rows: bool, ids_start: int) -> None:
        """Merge a tile's values into the tops of queries start..stop. ``along_rows``: the
        queries are the tile's rows and its columns the candidates (ids from ``ids_start``);
        else the queries are its columns and its rows the candidates."""

        view = tile if along_rows else tile.T
        neg, ids, seen = self.neg[start:stop], self.ids[start:stop], self.seen[start:stop]
        tau = -neg.amin(dim=1)                 # the depth-th smallest so far (inf: not full)
        width = view.shape[1]
        if bool((seen < self.depth).any()) and width >= self.depth:
            # a query's first values: none beyond this tile's own depth-th smallest can enter
            import torch

            kth = torch.topk(view.float(), self.depth, dim=1, largest=False).values.amax(1)
            tau = torch.minimum(tau, kth)
        seen += width
        q, c, values = _screened(tile, tau, along_rows)
        if q.numel():
            merge_top(neg, ids, q, -values, c + ids_start)


def _screened(tile, tau, along_rows: bool):
    """(query, candidate, value) of the tile's values <= the query's ``tau``, queries
    ascending: the groups whose minimum passes, then their values compared."""
    import torch

    m, w = tile.shape
    span = w if along_rows else m           # candidates per query
    group = _GROUP if along_rows else _ROW_GROUP
    if span % group:                      # partial groups: every value compared
        view = (tile if along_rows else tile.T).float()
        hit = (view <= tau[:, None]).nonzero()
        q, c = hit[:, 0], hit[:, 1]
        return q, c, view[q, c]
    bf16 = tile.dtype == torch.bfloat16
    if bf16:
        # tau's bits rounded down: a non-negative bf16 value <= tau has bits <= these; negative
        # values (rounding artefacts of near-zero distances) have negative bits and pass
        floor = tau.clamp(min=0.0).bfloat16()
        bound = floor.view(torch.int16) - (floor.float() > tau.clamp(min=0.0)).to(torch.int16)
        keyed = tile.view(torch.int16)
    else:
        bound, keyed = tau, tile
    stride = span // group
    if along_rows:
        if bf16:
            # strided groups of columns: torch's int16 minima over a contiguous run of 32 took
            # ~4x as long as over strided slabs, more than the extra cache lines of the gather
            minima = keyed.view(m, group, stride).amin(dim=1)        # [queries, groups]
            members, step = torch.arange(group) * stride, 1
        else:
            # groups of consecutive columns: a passing group's values are two cache lines
            minima = keyed.view(m, stride, group).amin(dim=2)        # [queries, groups]
            members, step = torch.arange(group), group
        hit = (minima <= bound[:, None]).nonzero()
        q, g = hit[:, 0], hit[:, 1]
        c = g[:, None] * step + members
        flat = q[:, None] * w + c
    else:
        # strided groups of rows (each value its own cache line either way): the minima of
        # _GROUP contiguous slabs, the fastest reduction
        members = torch.arange(group) * stride
        minima = keyed.view(group, stride, w).amin(dim=0)            # [stride, queries]
        hit = (minima.T <= bound[:, None]).nonzero()
        q, g = hit[:, 0], hit[:, 1]
        c = g[:, None] + members
        flat = c * w + q[:, None]
    # one index into the flat tile: 2-d advanced indexing cost ~5x more
    values = tile.view(-1).index_select(0, flat.view(-1)).view(flat.shape).float()
    keep = (values <= tau[q, None]).nonzero()
    kr, kc = keep[:, 0], keep[:, 1]
    return q[kr], c[kr, kc], values[kr, kc]


def self_join(rows: JoinRows, k: int, rerank: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every row's k nearest other rows: (squared distances float32 [N, k], ids int64 [N, k]),
    nearest first, equal distances by id, padded with (inf, -1) beyond N - 1 rows. ``rerank``
    (bf16): candidates beyond k re-ranked by float32 distance."""
    import torch

    n = rows.n
    k = int(k)
    depth = min(k + int(rerank), max(n - 1, 0))
    tops = _Tops(n, max(depth, 1))
    products = _Products(rows.dtype, min(_pad(n), _ROW_BLOCK), min(_pad(n), _COLUMN_BLOCK))
    for start in range(0, n, _ROW_BLOCK):
        stop = min(start + _ROW_BLOCK, n)
        a = rows.a_of(_padded(rows.block(start, stop), _pad(stop - start)))
        size = stop - start
        for c0 in range(start, n, _COLUMN_BLOCK):
            c1 = min(c0 + _COLUMN_BLOCK, n)
            tile = products.mm(a, _padded(rows.block(c0, c1), _pad(c1 - c0)), size, c1 - c0)
            if c0 == start:
                # the diagonal square: pair (i, j) from the row of the smaller id, both ways
                square = tile[:, :size]
                upper = torch.ones(size, size, dtype=torch.bool).triu_(1)
                both = tile.clone()
                both[:, :size] = torch.where(upper, square, square.T)
                both[:, :size].diagonal().fill_(math.inf)
                tops.merge(start, stop, both, True, c0)
                if c1 > stop:
                    tops.merge(stop, c1, tile[:, size:].contiguous(), False, start)
            else:
                tops.merge(start, stop, tile, True, c0)
                tops.merge(c0, c1, tile, False, start)
    return _finish(rows, tops, rows.x, k)


def join_search(rows: JoinRows, queries: np.ndarray, query_ids: np.ndarray, k: int,
                rerank: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of each query, never its own id, with :func:`self_join`'s values:
    the bits and neighbours it gives row ``query_ids[b]`` when ``queries[b]`` is that row.
    An id of -1 excludes nothing (the query on the A side of every pair)."""
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    qid = torch.from_numpy(np.asarray(query_ids, dtype=np.int64).reshape(-1))
    n = rows.n
    b = q.shape[0]
    k = int(k)
    excluded = int((qid >= 0).sum()) > 0
    depth = min(k + int(rerank), n - (1 if excluded else 0))
    out_d = np.full((b, k), np.inf, dtype=np.float32)
    out_i = np.full((b, k), -1, dtype=np.int64)
    if b == 0 or depth <= 0:
        return out_d, out_i
    products = _Products(rows.dtype, _pad(_COLUMN_BLOCK), _pad(min(b, _ROW_BLOCK)))
    for qa in range(0, b, _ROW_BLOCK):
        qq, ids = q[qa:qa + _ROW_BLOCK], qid[qa:qa + _ROW_BLOCK]
        m = qq.shape[0]
        bq = _padded(rows.b_of(qq), _pad(m))
        aq = rows.a_of(bq)
        tops = _Tops(m, depth)
        low, high = int(ids.min()), int(ids.max())
        for c0 in range(0, n, _COLUMN_BLOCK):
            c1 = min(c0 + _COLUMN_BLOCK, n)
            br = _padded(rows.block(c0, c1), _pad(c1 - c0))
            above = c1 - 1 > low       # some row above some query: the query on the A side
            below = c0 < high          # some row below some query: the row on the A side
            own = (ids >= c0) & (ids < c1)
            if above and below:        # the block holding the queries' own ids
                columns = torch.arange(c0, c1)
                tile = torch.where(columns[None, :] > ids[:, None],
                                   torch.mm(aq, br.T)[:m, :c1 - c0],
                                   torch.mm(rows.a_of(br), bq.T)[:c1 - c0, :m].T).contiguous()
                along_rows = True
            elif above:
                tile, along_rows = products.mm(aq, br, m, c1 - c0), True
            else:
                # the rows on the A side: queries are the product's columns, read in place
                tile, along_rows = products.mm(rows.a_of(br), bq, c1 - c0, m), False
            if bool(own.any()):
                q_own, c_own = own.nonzero().squeeze(1), ids[own] - c0
                if along_rows:
                    tile[q_own, c_own] = math.inf
                else:
                    tile[c_own, q_own] = math.inf
            tops.merge(0, m, tile, along_rows, c0)
        d, i = _finish(rows, tops, qq, k)
        out_d[qa:qa + m], out_i[qa:qa + m] = d, i
    return out_d, out_i


def _finish(rows: JoinRows, tops: _Tops, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Tops -> (distances, ids) [m, k], nearest first, equal distances by id: the value clamped
    at 0 (float32), or re-ranked by float32 distance from the differences (bf16)."""

    m = tops.ids.shape[0]
    out_d = np.full((m, k), np.inf, dtype=np.float32)
    out_i = np.full((m, k), -1, dtype=np.int64)
    width = min(k, tops.depth)
    for s in range(0, m, _RERANK_BLOCK):
        e = min(s + _RERANK_BLOCK, m)
        ids = tops.ids[s:e]
        if rows.precision == "float32":
            dist = (-tops.neg[s:e]).clamp_(min=0.0)
        else:
            diff = rows.x[ids.clamp(min=0).reshape(-1)].view(e - s, ids.shape[1], -1)
            dist = diff.sub_(queries[s:e, None, :]).square_().sum(dim=2)
        dist = dist.masked_fill_(ids < 0, math.inf).numpy()
        nearest_first(dist, ids.numpy(), out_d[s:e, :width], out_i[s:e, :width])
    return out_d, out_i
