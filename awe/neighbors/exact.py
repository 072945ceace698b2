"""Exact k-nearest-neighbour search over dense rows (float32, and bf16 with float32 rerank)."""

from __future__ import annotations

import math

import numpy as np

from awe.neighbors.merge import block_top, merge_top, nearest_first

# exact_knn: queries and indexed rows per distance block (a 64 MB float32 block), and the group
# width of its first-level top-k (the maxima of groups of this many columns).
_QUERY_BLOCK = 1024
_BASE_BLOCK = 16384
_GROUP = 64
# bf16_knn: queries and rows per product block (16 MB of bf16 scores), and the members of each
# strided group whose maximum screens the block (measured on 1M x 128, 2 threads: 1024 x 8192
# blocks beat 512 or 2048 queries and 4096 or 16384 rows)
_BF16_QUERY_BLOCK = 1024
_BF16_BASE_BLOCK = 8192
_BF16_GROUP = 32
# exact_knn's products have a multiple of this many query rows (zero rows padded in). MKL's
# kernels for a few rows sum in another order (AMD EPYC, torch 2.13: M = 1-3 on one thread,
# M < 12 and not a multiple of 4 on two), so a row's distances would depend on how many rows
# were searched with it: 7-row batches and 100-row ones differed by 1e-5. From 12 rows on,
# every M gave the same bits.
_QUERY_PAD = 16
# exact_knn multiplies by a [2x | -|x|^2] copy of the base while it takes at most this many bytes
_AUGMENTED_CACHE = 256 << 20
# squared_norms: rows per block
_NORM_BLOCK = 16384


def squared_norms(rows: np.ndarray) -> np.ndarray:
    """|x|^2 of every row, float32, as :func:`exact_knn` computes them (the same bits whether
    computed there or passed in)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    # in blocks of rows: x * x of all rows at once is a temporary copy of them (1.9 GB for the
    # knn-input row at 1M x 474); each row's sum is the same bits either way (tested)
    out = torch.empty(x.shape[0], dtype=torch.float32)
    for start in range(0, x.shape[0], _NORM_BLOCK):
        block = x[start:start + _NORM_BLOCK]
        torch.sum(block * block, dim=1, out=out[start:start + _NORM_BLOCK])
    return out.numpy()


def exact_knn(queries: np.ndarray, base: np.ndarray, k: int,
              base_sq_norms: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared-L2 k nearest rows of ``base`` for each query: (distances float32 [B, k],
    ids int64 [B, k]), nearest first, equal distances by id; k is cut to the rows of ``base``.

    Distances are |q|^2 + |x|^2 - 2 q.x (clamped at 0), as faiss computes them, in blocks of
    ``_QUERY_BLOCK`` x ``_BASE_BLOCK``: the block is 2 q.x - |x|^2 from one product of
    [q | 1] and [2x | -|x|^2] into a reused buffer, its top-k by :func:`block_top`, and the
    blocks' candidates merged per query.
    Runs on torch's threads. ``base_sq_norms`` (|x|^2 per row) saves recomputing them per call.
    """
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    x = torch.from_numpy(np.ascontiguousarray(base, dtype=np.float32))
    n_base = x.shape[0]
    k = min(int(k), n_base)
    b = q.shape[0]
    out_d = np.empty((b, k), dtype=np.float32)
    out_i = np.empty((b, k), dtype=np.int64)
    if b == 0 or k == 0:
        return out_d, out_i
    if base_sq_norms is None:
        base_sq_norms = squared_norms(base)
    neg_sq = -torch.from_numpy(np.asarray(base_sq_norms, dtype=np.float32))
    padded_rows = -(-min(_QUERY_BLOCK, b) // _QUERY_PAD) * _QUERY_PAD
    buffer = torch.empty(padded_rows * min(_BASE_BLOCK, n_base))
    dim = x.shape[1]
    # [2x | -|x|^2] against [q | 1]: 2 q.x - |x|^2 from one GEMM, where addmm's added bias
    # cost a second pass over the block (1024 x 16384 at D = 64: 28.7 -> 18.9 ms). That copy
    # of the base is made once a call while it takes at most _AUGMENTED_CACHE bytes; a larger
    # base (knn-input at 1M x 474: 1.9 GB) keeps addmm, with no copy.
    augmented = None
    if n_base * (dim + 1) * 4 <= _AUGMENTED_CACHE:
        augmented = torch.empty(n_base, dim + 1)
        torch.mul(x, 2.0, out=augmented[:, :dim])
        augmented[:, dim] = neg_sq
    left = torch.zeros(padded_rows, dim + (augmented is not None))
    if augmented is not None:
        left[:, dim] = 1.0
    for qa in range(0, b, _QUERY_BLOCK):
        qq = q[qa:qa + _QUERY_BLOCK]
        rows = -(-qq.shape[0] // _QUERY_PAD) * _QUERY_PAD
        if rows == qq.shape[0] and augmented is None:
            block_queries = qq
        else:
            block_queries = left[:rows]
            block_queries[:qq.shape[0], :dim] = qq
            block_queries[qq.shape[0]:, :dim] = 0.0
        values, ids = [], []
        for xa in range(0, n_base, _BASE_BLOCK):
            m = min(_BASE_BLOCK, n_base - xa)
            block = buffer[:rows * m].view(rows, m)
            if augmented is None:
                torch.addmm(neg_sq[xa:xa + m], block_queries, x[xa:xa + m].T, alpha=2.0,
                            out=block)
            else:
                torch.mm(block_queries, augmented[xa:xa + m].T, out=block)
            block = block[:qq.shape[0]]
            v, c = block_top(block, min(k, m), _GROUP)
            values.append(v)
            ids.append(c + xa)
        v, c = torch.cat(values, dim=1), torch.cat(ids, dim=1)
        dist = ((qq * qq).sum(dim=1, keepdim=True) - v).clamp_(min=0.0).numpy()
        # nearest first, equal distances by id: the order does not depend on the block layout
        nearest_first(dist, c.numpy(), out_d[qa:qa + qq.shape[0]], out_i[qa:qa + qq.shape[0]])
    return out_d, out_i


def bf16_rows(base: np.ndarray):
    """The bfloat16 copy of ``base`` that :func:`bf16_knn` scores, and the rows' mean c.

    Row i is [x_i - c, -hi_i, -lo_i, 1] with hi + lo = |x_i - c|^2 split over two bfloat16
    values: the norm in one would carry 8 bits, the largest error of the scores. Centring keeps
    the norms, and so the scores' rounding, small where the rows lie far from the origin."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(base, dtype=np.float32))
    n, dim = x.shape
    total = torch.zeros(dim, dtype=torch.float64)
    for start in range(0, n, _NORM_BLOCK):
        total += x[start:start + _NORM_BLOCK].sum(0, dtype=torch.float64)
    center = (total / max(n, 1)).float()
    rows = torch.empty(n, dim + 4, dtype=torch.bfloat16)
    for start in range(0, n, _NORM_BLOCK):
        block = x[start:start + _NORM_BLOCK] - center
        sq = (block * block).sum(1)
        hi = sq.bfloat16()
        out = rows[start:start + _NORM_BLOCK]
        out[:, :dim] = block
        out[:, dim] = -hi
        out[:, dim + 1] = -(sq - hi.float())
        out[:, dim + 2] = 1.0
        out[:, dim + 3] = 0.0     # an even width: AMX multiplies pairs of bf16 values
    return rows, center


def _bf16_candidates(queries, rows, center, depth: int, buffer, float_buffer):
    """Ids [m, depth] of the rows of largest approximate score 2 q.x - |x|^2 (centred), for
    each query of ``queries`` (float32 [m, D]); ``rows, center`` from :func:`bf16_rows`.

    The first block of rows gives each query's running top ``depth`` exactly (of the bf16
    scores); each later block is screened: its scores are shifted per query (the product's
    last column) so that the running threshold sits at a small positive value, where bf16's
    bits compare as int16; the maxima of strided groups of ``_BF16_GROUP`` columns, taken as
    int16, find the groups holding a score above the threshold (after a few blocks, about
    depth / blocks seen a query), and only their scores are merged into the top. ``buffer``
    (bf16) and ``float_buffer`` (float32) hold a block of scores: reused, as a fresh 32 MB
    tensor a block cost more in page faults than its conversion (82 against ~4 ms)."""
    import torch

    m, dim = queries.shape
    n = rows.shape[0]
    q = torch.zeros(m, dim + 4, dtype=torch.bfloat16)
    q[:, :dim] = 2.0 * (queries - center)
    q[:, dim] = 1.0
    q[:, dim + 1] = 1.0
    first = min(n, max(_BF16_BASE_BLOCK, depth))
    scores = buffer[:m * first].view(m, first)
    torch.mm(q, rows[:first].T, out=scores)
    values = float_buffer[:m * first].view(m, first).copy_(scores)
    # the first block's top: every score at or above each query's depth-th, merged by
    # (score, id) so that ties at the cut go to the smaller ids
    cut = block_top(values, depth, _GROUP)[0].amin(dim=1)
    hit = (values >= cut[:, None]).nonzero()
    top_v = torch.full((m, depth), -math.inf)
    top_i = torch.full((m, depth), -1, dtype=torch.int64)
    merge_top(top_v, top_i, hit[:, 0], values[hit[:, 0], hit[:, 1]], hit[:, 1])
    members = torch.arange(_BF16_GROUP)
    for start in range(first, n, _BF16_BASE_BLOCK):
        tau = top_v.amin(dim=1)
        # shift = bf16(delta - tau), delta = |tau| / 64: the shifted threshold tau + shift is
        # positive whatever bf16's rounding of the shift (it errs by at most |shift| / 512)
        shift = (tau.abs() / 64 + 1e-30 - tau).bfloat16()
        q[:, dim + 2] = shift
        beta = shift.float()
        # its bits, rounded down (a bf16 score above the threshold has larger int16 bits)
        threshold = (tau + beta).bfloat16()
        bits = threshold.view(torch.int16) - (threshold.float() > tau + beta).to(torch.int16)
        width = min(_BF16_BASE_BLOCK, n - start)
        scores = buffer[:m * width].view(m, width)
        torch.mm(q, rows[start:start + width].T, out=scores)
        if width % _BF16_GROUP:      # the last, partial block: every score compared
            values = float_buffer[:m * width].view(m, width).copy_(scores).sub_(beta[:, None])
            hit = (values > tau[:, None]).nonzero()
            r, c = hit[:, 0], hit[:, 1]
            merge_top(top_v, top_i, r, values[r, c], c + start)
            continue
        stride = width // _BF16_GROUP
        maxima = scores.view(torch.int16).view(m, _BF16_GROUP, stride).amax(dim=1)
        hit = (maxima > bits[:, None]).nonzero()
        if hit.shape[0] == 0:
            continue
        r, c = hit[:, 0], hit[:, 1]
        columns = c[:, None] + members * stride
        values = scores[r[:, None], columns].float() - beta[r, None]
        keep = (values > tau[r, None]).nonzero()
        kr, kc = keep[:, 0], keep[:, 1]
        merge_top(top_v, top_i, r[kr], values[kr, kc], columns[kr, kc] + start)
    return top_i


def bf16_knn(queries: np.ndarray, base: np.ndarray, k: int, rerank: int,
             prepared=None) -> tuple[np.ndarray, np.ndarray]:
    """Squared-L2 k nearest rows of ``base`` for each query, as :func:`exact_knn` returns
    them, with every row scored from bfloat16 products: the ``k + rerank`` rows of largest
    approximate score (:func:`_bf16_candidates`) are re-ranked by their float32 distance
    |x - q|^2 and the k nearest kept (nearest first, equal distances by id). Summed from the
    differences, these distances can differ from :func:`exact_knn`'s (|q|^2 + |x|^2 - 2 q.x,
    faiss's formula) in the last bits, more where the rows lie far from the origin.

    Approximate: a neighbour is missed when rounding puts it outside the candidates (equal
    bf16 scores at the cut: the smaller ids are candidates), so the
    index measures (and calibrates ``rerank`` to) the recall. ``prepared`` is
    :func:`bf16_rows` of ``base``."""
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    x = torch.from_numpy(np.ascontiguousarray(base, dtype=np.float32))
    n_base = x.shape[0]
    k = min(int(k), n_base)
    depth = min(k + int(rerank), n_base)
    b = q.shape[0]
    out_d = np.empty((b, k), dtype=np.float32)
    out_i = np.empty((b, k), dtype=np.int64)
    if b == 0 or k == 0:
        return out_d, out_i
    rows, center = prepared if prepared is not None else bf16_rows(base)
    size = min(_BF16_QUERY_BLOCK, b) * min(max(_BF16_BASE_BLOCK, depth), n_base)
    buffer = torch.empty(size, dtype=torch.bfloat16)
    float_buffer = torch.empty(size, dtype=torch.float32)
    for qa in range(0, b, _BF16_QUERY_BLOCK):
        qq = q[qa:qa + _BF16_QUERY_BLOCK]
        m = qq.shape[0]
        ids = _bf16_candidates(qq, rows, center, depth, buffer, float_buffer)
        # |x - q|^2 summed from the differences: no cancellation of large norms
        diff = x[ids.reshape(-1)].view(m, depth, -1).sub_(qq[:, None, :])
        nearest_first(diff.square_().sum(dim=2).numpy(), ids.numpy(), out_d[qa:qa + m],
                       out_i[qa:qa + m])
    return out_d, out_i
