"""The top k of f(x, y) = e . V_y + beta_y over every label from bfloat16 products, exactly.

Scoring every label in float32 and selecting the top k cost ~10 µs a row at L = 1000 on
one core (Intel, AMX, 2 cores). Here the [B, L] product is taken from bfloat16 copies of e
and [V | beta] (native bfloat16 products on CPUs with AMX or AVX512-BF16: 1.0-1.5 µs a row),
its error bounded a row, and only the labels that the bound cannot rule out (~13 of 1000)
are scored in float32: ~6 µs a row in all. The result is the float32 top k itself, ties by
lower label id, not an approximation of it:

* ``a(y)``, the bfloat16 score, is within ``b0 + u1 |a(y)|`` of ``r(y)``, the float32 score
  (:func:`_row_bounds`: the two inputs' rounding, which is known, float32 accumulation, the
  output's rounding).
* ``t``, the k-th largest of the maxima of strided column groups (as
  :func:`awe.evaluate._threshold_top`), has k labels with ``a >= t``, so the k-th best
  ``r`` is at least ``(1 - u1) t - b0``; a label that reaches it (or ties with it) has
  ``a >= cut = ((1 - u1) t - 2 b0) / (1 + u1)``.
* With ``cut > 0`` the comparison runs on the bfloat16 bit patterns as int16 (non-negative
  floats order like their bits; negatives read as negative ints and fall below any cut).

A row whose cut is not positive, whose scores could overflow, whose features are not finite,
or with more than a quarter of its labels at or above the cut, is left to the caller: its
candidate slots hold -1, and :func:`awe.evaluate.ranked_top_k` scores it densely.

The Wsabie stage ranks through :func:`screened_scores`, and the AWE stage's rows with fewer
than k G labels through :func:`screened_after_candidates`. docs/method.md (section 5)
and docs/benchmarks.md have the measurements.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

from awe.cpu import has_amx, native_bf16
from awe.csr import Csr, pad_rows
from awe.ranking.dots import sampled_dots
from awe.ranking.topk import (
    THRESHOLD_MIN_LABELS_PER_K,
    CandidateScores,
    excluded_ids,
    group_maxima,
    mask_excluded,
    ranked_top_k,
    top_k,
)

BF16_UNIT = 2.0 ** -8          # unit roundoff of bfloat16 (8 significand bits, nearest even)
FLOAT32_UNIT = 2.0 ** -24
BF16_EXPONENT_ALL_ONES = 0x7F80  # the bits of +inf; at or above it: inf or NaN
PAD_ROWS = 32
MAX_SAFE = 1e37                # ||e|| max ||V_y|| beyond this: float32 sums could overflow


def use_screen(requested: bool | None) -> bool:
    """Whether to rank through :func:`screened_scores`: as ``requested``; None (automatic):
    on CPUs with native bfloat16 products (elsewhere torch emulates them, slower than the
    float32 product). Either way the ranking is the float32 one."""
    return native_bf16() if requested is None else bool(requested)


def pad_width() -> int:
    """The width of e . [V | beta | 0...] is a multiple of this: 32 with AMX, whose tiles
    hold 32 bfloat16 values; else 2 (AVX512-BF16 multiplies pairs). Padding D + 1 = 129 to
    160 cost AVX512-BF16 (AMD EPYC, 1 thread, 4096 x 1000) 1.77 us a row against 1.48 at 130."""

    return 32 if has_amx() else 2


class ScreenTable:
    """The bfloat16 copy of [V | beta] that :func:`screened_scores` multiplies, with the
    constants of its error bound. Built once a model (~45 ms at 21,000 labels)."""

    def __init__(self, table: torch.Tensor, bias: torch.Tensor | None):
        table = table.detach().float()
        n_labels, dim = table.shape
        self.table, self.dim = table, dim
        self.bias = None if bias is None else bias.detach().float()
        pad = pad_width()
        width = -(-(dim + 1) // pad) * pad
        full = torch.zeros(n_labels, width)
        full[:, :dim] = table
        if self.bias is not None:
            full[:, dim] = self.bias
        low = full.to(torch.bfloat16)
        self.low_t = low.T.contiguous()        # [width, L]: the product's layout
        self.width = width
        # float32 norms (relative error below (D + 1) 2^-24) enlarged by 0.1%
        rounded = low.float()
        norm = torch.linalg.vector_norm
        self.norm_low = 1.001 * float(norm(rounded, dim=1).max())          # max ||v^_y||
        self.norm_full = 1.001 * float(norm(full, dim=1).max())            # max ||v_y||
        self.rounding = 1.001 * float(norm(full - rounded, dim=1).max())   # max ||v - v^||
        self.usable = bool(np.isfinite([self.norm_low, self.norm_full]).all()
                           and self.norm_full < MAX_SAFE)
        self._scratch = threading.local()
        self.usable = self.usable and self._bound_holds_on_probes()

    def _bound_holds_on_probes(self, n_probes: int = 16) -> bool:
        """The error bound checked on probe rows (the first labels' own vectors, which score
        high, and gaussian rows of their size) against the float32 scores of every label: a
        bfloat16 product that does not accumulate in float32, as the bound assumes, fails it
        by far, and the screen stays off for the model."""
        probes = self.table[:n_probes]
        scale = float(probes.norm(dim=1).mean()) / max(1.0, self.dim ** 0.5)
        noise = torch.randn(len(probes), self.dim,
                            generator=torch.Generator().manual_seed(0)) * scale
        e = torch.cat([probes, noise])
        low = self.rows(e)
        approx = (low @ self.low_t).float()
        exact = e @ self.table.T
        if self.bias is not None:
            exact += self.bias
        b0, u1, finite = _row_bounds(e, low, self)
        # in float32: the bound is several times the errors seen, and a false alarm only
        # keeps the screen off
        allowed = approx.abs().mul_(u1).add_(torch.from_numpy(b0.astype(np.float32))[:, None])
        return bool(finite.all() and (approx.sub_(exact).abs_() <= allowed).all())

    def rows(self, e: torch.Tensor, n_rows: int | None = None) -> torch.Tensor:
        """[e | 1 | 0...] in bfloat16 (rounded to nearest even), [n_rows, width]: the product's
        left side; rows past len(e) are zeros (padding)."""
        low = torch.zeros(n_rows or len(e), self.width, dtype=torch.bfloat16)
        low[:len(e), :self.dim] = e
        low[:len(e), self.dim] = 1.0
        return low

    def scratch(self, n_rows: int) -> tuple[torch.Tensor, np.ndarray]:
        """This thread's [n_rows, L] product and mask buffers: allocated once, not every batch
        (fresh 8 MB blocks cost page faults, ~1 µs of system time a row)."""
        local = self._scratch
        size = n_rows * self.n_labels
        if getattr(local, "size", 0) < size:
            local.product = torch.empty(size, dtype=torch.bfloat16)
            local.mask = np.empty(size, dtype=bool)
            local.size = size
        return (local.product[:size].view(n_rows, self.n_labels),
                local.mask[:size].reshape(n_rows, self.n_labels))

    @property
    def n_labels(self) -> int:
        return self.table.shape[0]


def screened_scores(e: torch.Tensor, table: ScreenTable, k: int, exclude: Csr | None,
                    dense: Callable[[torch.Tensor], torch.Tensor]) -> CandidateScores | None:
    """The top-k candidates of every row of ``e`` [B, D] under e . V_y + beta_y, as ranked
    :class:`CandidateScores` (float32 values, best first, ties by lower id); rows'
    ``exclude`` labels are never candidates. ``dense(positions)`` gives the float32 [n, L]
    scores of the rows left (slots -1). None where screening does not apply (too few
    labels, not on CPU)."""
    n_rows = e.shape[0]
    n_labels = table.n_labels
    if (not table.usable or n_rows == 0 or e.device.type != "cpu"
            or n_labels < THRESHOLD_MIN_LABELS_PER_K * k):
        return None
    e = e.detach().float()
    # rows padded to a multiple of 32: oneDNN's bfloat16 product took 2-3x longer a row at
    # 399 or 799 rows than at 384, 416 or 768 (L = 21,000)
    padded = -(-n_rows // PAD_ROWS) * PAD_ROWS
    low = table.rows(e, padded)
    product, mask = table.scratch(padded)
    torch.matmul(low, table.low_t, out=product)
    bits = product.view(torch.int16).numpy()[:n_rows]  # [B, L] bfloat16 as int16
    mask = mask[:n_rows]
    low = low[:n_rows]
    if exclude is not None and exclude.nnz:
        bits[exclude.row_of_entry(), exclude.indices] = np.iinfo(np.int16).min
    b0, u1, finite = _row_bounds(e, low, table)
    group_max, n_groups = group_maxima(bits, k)
    t_bits = np.partition(group_max, n_groups - k, axis=1)[:, n_groups - k]
    t = (t_bits.astype(np.int32) << 16).view(np.float32).astype(np.float64)
    left = ~finite | (t_bits < 0) | (group_max >= BF16_EXPONENT_ALL_ONES).any(axis=1)
    cut = ((1.0 - u1) * np.where(left, 0.0, t) - 2.0 * b0) / (1.0 + u1)
    left |= ~(cut > 0)
    cut_bits = _bf16_bits_at_most(np.where(left, np.inf, cut))
    np.greater_equal(bits, cut_bits[:, None], out=mask)
    flat = np.flatnonzero(mask)      # row-major: ids ascending within a row
    rows, cols = np.divmod(flat, n_labels)
    counts = np.bincount(rows, minlength=n_rows)
    dropped = left | (counts > n_labels // 4)   # a left row's NaN bits pass any cut
    if dropped.any():
        cols = cols[~dropped[rows]]
        counts[dropped] = 0
    values = _float32_scores(e, table, counts, cols).numpy()
    ids, values = _best_first(counts, cols, values, k, n_labels)
    return CandidateScores(ids, values, dense, ranked=True)


def screened_after_candidates(e: torch.Tensor, table: ScreenTable, ids: torch.Tensor,
                              values: torch.Tensor, exclude: Csr | None, k: int,
                              dense: Callable[[torch.Tensor], torch.Tensor],
                              ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The top k of rows ranked as :func:`awe.model.awe_scores_around` ranks them, without its
    [n, L] table: the candidates (``ids`` [n, W] ascending, -1 padding, and their
    ``values``) first, by value; then every other label by its score s = e . V_y + beta_y,
    shown as s - max s + (the lowest candidate value) - 1. The rows' ``exclude`` labels are
    never ranked. Rows the screen leaves, or whose shown scores tie across the cut, come
    from ``dense(positions)`` (that table). None where the screen does not apply.

    For AWE's rows with fewer than k G labels (b = 0): at L = 21,000 their dense table cost
    the stage-3 product over every label, and its top k."""
    n_rows = len(ids)
    valid = ids >= 0
    lowest = torch.where(valid, values, torch.inf).amin(1)
    lowest = torch.where(torch.isfinite(lowest), lowest, 0.0)
    apart = _joined(Csr.from_lengths(valid.sum(1).numpy(), ids[valid].numpy()), exclude)

    def plain(at: torch.Tensor) -> torch.Tensor:
        base = e.index_select(0, at) @ table.table.T
        return base if table.bias is None else base + table.bias

    found = screened_scores(e, table, k + 1, apart, plain)
    if found is None:
        return None

    rest_ids, rest_base = ranked_top_k(found, k + 1, apart)
    # max s over every label: the screened best, or one of the labels ranked apart
    apart_base = _float32_scores(e, table, apart.lengths, apart.indices).numpy()
    apart_max = np.full(n_rows, -np.inf, dtype=np.float32)
    np.maximum.at(apart_max, apart.row_of_entry(), apart_base)
    top = torch.maximum(rest_base[:, 0], torch.from_numpy(apart_max))
    shown = rest_base.sub(top[:, None]).add_(lowest[:, None]).sub_(1)
    shown[rest_ids < 0] = -torch.inf
    # the ranking is by the shown scores: where rounding makes two of them equal, ties go by id,
    # which the screen's order by s does not give
    tied = ((shown[:, 1:] == shown[:, :-1]) & torch.isfinite(shown[:, 1:])).any(1)
    kept = values.masked_fill(~valid, -torch.inf)
    if exclude is not None and exclude.nnz:
        kept = kept.masked_fill(excluded_ids(ids, exclude), -torch.inf)
    # candidates above every other label (shown <= lowest - 1): one stable sort keeps the
    # candidates' ties by id and the rest in their order
    merged_vals, order = torch.sort(torch.cat([kept, shown], dim=1), dim=1, descending=True,
                                    stable=True)
    merged_ids = torch.cat([ids, rest_ids], dim=1).gather(1, order)[:, :k]
    merged_vals = merged_vals[:, :k]
    merged_ids = merged_ids.masked_fill(torch.isneginf(merged_vals), -1)
    if tied.any():
        at = tied.nonzero()[:, 0]
        table_rows = dense(at).float()
        if exclude is not None:
            mask_excluded(table_rows, exclude.take(at.numpy()))
        merged_ids[at], merged_vals[at] = top_k(table_rows, k)
    return merged_ids, merged_vals


def _joined(first: Csr, second: Csr | None) -> Csr:
    """Each row's entries of both (duplicates kept: the screen masks an entry twice)."""
    if second is None or not second.nnz:
        return first
    rows = np.concatenate([first.row_of_entry(), second.row_of_entry()])
    order = np.argsort(rows, kind="stable")
    cols = np.concatenate([first.indices, second.indices])[order]
    return Csr.from_lengths(np.bincount(rows, minlength=first.n_rows), cols)


def _best_first(counts: np.ndarray, cols: np.ndarray, values: np.ndarray, k: int,
                n_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row's candidates (``counts`` a row, ids ``cols`` ascending within a
    row, float32 ``values``), best first, ties by lower id: (ids [B, k], -1 past a row's
    candidates; values [B, k], -inf there).

    One sort of uint64 keys (row, value descending, id), where they fit in 64 bits (4096 rows
    and 1M labels: 12 + 32 + 20): ~4x faster than sorting the padded [B, widest] table."""
    n_rows = len(counts)
    row_bits, col_bits = int(n_rows - 1).bit_length(), int(n_labels - 1).bit_length()
    if row_bits + col_bits > 32 or len(cols) == 0:
        ids, padded = pad_rows(Csr.from_lengths(counts, cols, values))
        padded[ids < 0] = -np.inf
        # stable: among equal scores the lower id (first in the row) stays first
        padded, order = torch.sort(padded, dim=1, descending=True, stable=True)
        ids = ids.gather(1, order)[:, :k]
        width = ids.shape[1]
        if width < k:
            ids = torch.cat([ids, ids.new_full((n_rows, k - width), -1)], dim=1)
            padded = torch.cat([padded[:, :k], padded.new_full((n_rows, k - width),
                                                               float("-inf"))], dim=1)
        return ids, padded[:, :k]
    bits = (values + np.float32(0.0)).view(np.uint32)  # -0.0 ties with 0.0 as it compares
    # float order as unsigned order: negatives flipped whole, positives above them
    ascending = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))
    rows = np.repeat(np.arange(n_rows, dtype=np.uint64), counts)
    keys = ((rows << np.uint64(32 + col_bits))
            | ((~ascending).astype(np.uint64) << np.uint64(col_bits))
            | cols.astype(np.uint64))
    keys.sort()
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    slot = np.arange(k)
    present = slot < counts[:, None]
    chosen = keys[np.minimum(starts[:, None] + slot, len(keys) - 1)]
    ids = np.where(present, (chosen & np.uint64((1 << col_bits) - 1)).astype(np.int64), -1)
    order = (~(chosen >> np.uint64(col_bits)).astype(np.uint32))
    restored = np.where(order >> 31, order & np.uint32(0x7FFFFFFF), ~order).view(np.float32)
    return (torch.from_numpy(ids),
            torch.from_numpy(np.where(present, restored, np.float32(-np.inf))))


def _row_bounds(e: torch.Tensor, low: torch.Tensor, table: ScreenTable,
                ) -> tuple[np.ndarray, float, np.ndarray]:
    """(b0 [B], u1, finite [B]): |a(y) - r(y)| <= b0 + u1 |a(y)| for every label y, where
    a(y) is the bfloat16 product's score and r(y) the float32 one.

    With e' = [e | 1], its bfloat16 copy e^ and v, v^ the rows of [V | beta]:
    e' . v - e^ . v^ = e' . (v - v^) + (e' - e^) . v^ (both roundings known, bounded by
    Cauchy-Schwarz); float32 accumulation of either sum adds at most gamma (||e'|| + ||e^||)
    max ||v||, gamma = (D + 2) 2^-24 (1.01 for the products of the norms); the output is
    rounded to nearest: |a - acc| <= u |acc| <= u / (1 - u) |a|. Norms are taken in float32
    (relative error below (D + 1) 2^-24) and enlarged by 0.1%; a flat 1e-30 covers the
    denormals AMX flushes to zero.
    """
    rounded = low[:, :table.dim].float()
    norm_e = torch.linalg.vector_norm(e, dim=1).numpy().astype(np.float64)
    norm_full = np.sqrt(norm_e * norm_e + 1.0)
    norm_r = torch.linalg.vector_norm(rounded, dim=1).numpy().astype(np.float64)
    norm_low = np.sqrt(norm_r * norm_r + 1.0)
    rounding = torch.linalg.vector_norm(e - rounded, dim=1).numpy().astype(np.float64)
    gamma = 1.01 * (table.dim + 2) * FLOAT32_UNIT
    biggest = max(table.norm_full, table.norm_low)
    b0 = (norm_full * table.rounding + rounding * table.norm_low
          + gamma * (norm_full + norm_low) * biggest) * 1.001 + 1e-30
    finite = np.isfinite(norm_e) & (norm_full * biggest < MAX_SAFE)
    return np.where(finite, b0, np.inf), BF16_UNIT / (1 - BF16_UNIT), finite


def _bf16_bits_at_most(values: np.ndarray) -> np.ndarray:
    """int16 bits of the largest bfloat16 <= each positive value (+inf: above every finite
    bit pattern, so a left row has no candidate)."""
    single = values.astype(np.float32)
    high = single.astype(np.float64) > values
    single[high] = np.nextafter(single[high], np.float32(0))
    # truncating a positive float32 to its top 16 bits rounds it down
    bits = (single.view(np.int32) >> 16).astype(np.int32)
    return np.where(np.isinf(values), np.iinfo(np.int16).max, bits).astype(np.int16)


def _float32_scores(e: torch.Tensor, table: ScreenTable, counts: np.ndarray,
                    cols: np.ndarray) -> torch.Tensor:
    """e[row] . V[col] (+ beta[col]) in float32 at the CSR pattern (``counts`` a row, their
    ``cols``): one sampled product, one dot per candidate."""

    cols_t = torch.from_numpy(cols)
    if len(cols) == 0:
        return torch.zeros(0)
    dots = sampled_dots(e, table.table, torch.from_numpy(np.r_[0, np.cumsum(counts)]), cols_t)
    if table.bias is not None:
        dots = dots + table.bias.index_select(0, cols_t)
    return dots
