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

import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .artifacts import atomic_path
from .errors import AweError

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
# exact_knn: queries and indexed rows per distance block (a 64 MB float32 block), and the group
# width of its first-level top-k (the maxima of groups of this many columns).
_QUERY_BLOCK = 1024
_BASE_BLOCK = 16384
_GROUP = 64
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
# bf16_knn: queries and rows per product block (16 MB of bf16 scores), and the members of each
# strided group whose maximum screens the block (measured on 1M x 128, 2 threads: 1024 x 8192
# blocks beat 512 or 2048 queries and 4096 or 16384 rows)
_BF16_QUERY_BLOCK = 1024
_BF16_BASE_BLOCK = 8192
_BF16_GROUP = 32


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
            raise AweError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {self.kind!r}")
        _check_int("--flat-max-rows", self.flat_max_rows, 0)
        _check_int("--nlist", self.nlist, 1, optional=True)
        _check_int("--nprobe", self.nprobe, 1, optional=True)
        if self.nlist is not None and self.nprobe is not None and self.nprobe > self.nlist:
            raise AweError(f"--nprobe ({self.nprobe}) must be <= --nlist ({self.nlist})")
        _check_int("--hnsw-m", self.hnsw_m, 2)
        _check_int("--ef-construction", self.ef_construction, 1)
        _check_int("--ef-search", self.ef_search, 1, optional=True)
        _check_int("--rerank", self.rerank, 0, optional=True)
        _check_int("--recall-sample", self.recall_sample, 1)
        _check_int("--calibrate-n", self.calibrate_n, 0)
        _check_int("--seed", self.seed, 0)
        if (isinstance(self.target_recall, bool) or not isinstance(self.target_recall, (int, float))
                or not 0.0 < self.target_recall <= 1.0):
            raise AweError(f"--target-recall must be in (0, 1], got {self.target_recall!r}")

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


def _check_int(option: str, value, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise AweError(f"{option} must be an integer >= {minimum}, got {value!r}")


def set_threads(n: int | None) -> None:
    """Use ``n`` threads for faiss and torch (exact search runs in torch; all cores when None:
    the libraries' defaults)."""
    if n is None:
        return
    _check_int("--threads", n, 1)
    import faiss
    import torch

    faiss.omp_set_num_threads(int(n))
    torch.set_num_threads(int(n))


def _block_top(scores, k: int):
    """(values, columns) of the k largest of each row of ``scores`` [B, M], unsorted.

    Rows of many columns take two levels: the maxima of groups of ``_GROUP`` columns, the k
    groups of largest maxima, then the k largest among those groups' columns. Exact: each of a
    row's k largest values lies in a group whose maximum is among the k largest maxima. One pass
    over the block plus a top-k of M/64 values costs ~10x less than ``torch.topk`` over M.
    """
    import torch

    rows, m = scores.shape
    grouped = (m // _GROUP) * _GROUP
    if k * _GROUP * 4 > grouped:
        return torch.topk(scores, k, dim=1, sorted=False)
    maxima = scores[:, :grouped].reshape(rows, grouped // _GROUP, _GROUP).amax(dim=2)
    _, groups = torch.topk(maxima, k, dim=1, sorted=False)
    columns = (groups[:, :, None] * _GROUP
               + torch.arange(_GROUP, dtype=groups.dtype)).reshape(rows, k * _GROUP)
    if grouped < m:     # the last partial group joins the candidates whole
        tail = torch.arange(grouped, m, dtype=groups.dtype).expand(rows, m - grouped)
        columns = torch.cat([columns, tail], dim=1)
    values, picked = torch.topk(torch.gather(scores, 1, columns), k, dim=1, sorted=False)
    return values, torch.gather(columns, 1, picked)


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
    [q | 1] and [2x | -|x|^2] into a reused buffer, its top-k by :func:`_block_top`, and the
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
            v, c = _block_top(block, min(k, m))
            values.append(v)
            ids.append(c + xa)
        v, c = torch.cat(values, dim=1), torch.cat(ids, dim=1)
        dist = ((qq * qq).sum(dim=1, keepdim=True) - v).clamp_(min=0.0).numpy()
        # nearest first, equal distances by id: the order does not depend on the block layout
        _nearest_first(dist, c.numpy(), out_d[qa:qa + qq.shape[0]], out_i[qa:qa + qq.shape[0]])
    return out_d, out_i


def _nearest_first(dist: np.ndarray, cand: np.ndarray, out_d: np.ndarray,
                   out_i: np.ndarray) -> None:
    """The out_d.shape[1] nearest of each row's candidates (dist, cand [B, M]) into out_d /
    out_i, nearest first, equal distances by id."""
    order = np.lexsort((cand, dist), axis=-1)[:, :out_d.shape[1]]
    out_d[:] = np.take_along_axis(dist, order, axis=1)
    out_i[:] = np.take_along_axis(cand, order, axis=1)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX512-BF16, from
    Linux's /proc/cpuinfo flags). Elsewhere torch emulates bf16 products, slower than float32,
    so ``auto`` does not choose the ``bf16`` index there."""
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


@functools.cache
def has_amx() -> bool:
    """Whether this CPU has AMX tiles for bfloat16 products (``amx_bf16``)."""
    return "amx_bf16" in _cpu_flags()


@functools.cache
def _cpu_flags() -> set[str]:
    try:
        return _cpuinfo_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return set()


def _cpuinfo_flags(text: str) -> set[str]:
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                     if line.startswith("flags")), []))


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


def _order_keys(values, ids):
    """int64 keys ordering (value, id) pairs by value, then by smaller id: bf16 scores tie
    often, and ``torch.topk``'s choice among equal values can change with the tensor's shape
    (with the batch of queries), where the neighbours must not. ``ids`` >= -1, < 2**32 - 1."""
    import torch

    bits = values.contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)          # float order as signed int32
    return (ordered.to(torch.int64) << 32) + ((1 << 32) - 2 - ids)


def _merge_top(top_v, top_i, rows, values, ids) -> None:
    """Merge candidates (rows ascending, values, ids) into each row's running top
    (``top_v``/``top_i`` [m, depth], in place): the depth largest values, equal ones by
    smaller id."""
    import torch

    m, depth = top_v.shape
    counts = torch.bincount(rows, minlength=m)
    touched = counts.nonzero().squeeze(1)
    width = int(counts.max())
    slot = torch.arange(rows.shape[0]) - (torch.cumsum(counts, 0) - counts)[rows]
    new_v = torch.full((m, width), -math.inf)
    new_i = torch.full((m, width), -1, dtype=torch.int64)
    new_v[rows, slot] = values
    new_i[rows, slot] = ids
    all_v = torch.cat([top_v[touched], new_v[touched]], dim=1)
    all_i = torch.cat([top_i[touched], new_i[touched]], dim=1)
    _, picked = torch.topk(_order_keys(all_v, all_i), depth, dim=1, sorted=False)
    top_v[touched] = torch.gather(all_v, 1, picked)
    top_i[touched] = torch.gather(all_i, 1, picked)


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
    cut = _block_top(values, depth)[0].amin(dim=1)
    hit = (values >= cut[:, None]).nonzero()
    top_v = torch.full((m, depth), -math.inf)
    top_i = torch.full((m, depth), -1, dtype=torch.int64)
    _merge_top(top_v, top_i, hit[:, 0], values[hit[:, 0], hit[:, 1]], hit[:, 1])
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
            _merge_top(top_v, top_i, r, values[r, c], c + start)
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
        _merge_top(top_v, top_i, r[kr], values[kr, kc], columns[kr, kc] + start)
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
        _nearest_first(diff.square_().sum(dim=2).numpy(), ids.numpy(), out_d[qa:qa + m],
                       out_i[qa:qa + m])
    return out_d, out_i


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
            from .join import JoinRows

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
        from .join import self_join

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
        from .join import join_search

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
