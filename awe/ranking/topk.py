"""Ranking metrics: P@k, R@k, NDCG@k (binary gains) and MAP@k.

P@k = hits in the top k / k, averaged over rows with at least one true label (the paper's and
LightFM's definition). Labels unknown to the model count as true labels that are never hit. Labels
in a row's ``exclude`` list are removed from its ranking. Ties in score are broken by the lower
label id, so results never depend on the sort's whim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from awe.csr import Csr, contains, pad_rows
from awe.io.reader import Examples

# rows x labels ranked at once where memory is bounded (`awe eval` at large L, validation when
# streaming, `awe score`): 8M float32 scores, 32 MB a [rows, labels] temporary (21k labels: 399
# rows instead of ~900 MB of temporaries at 2048)
SCORES_PER_BATCH = 1 << 23
# k up to which the top k + 1 come from FAISS's heaps on CPU (faster than torch.topk: 1.5x at
# L = 1000, 2.7x at L = 21,000 for k = 10; 1.4x at k = 30)
HEAP_MAX_K = 32
# `_threshold_top`: columns a strided group (whose maxima give the threshold), and at most this
# many groups (at L = 21,000, partitioning 2,625 maxima cost as much as the comparison pass,
# 4.3 µs a row); a row with more than THRESHOLD_MAX_SHARE x k scores at or above its
# threshold (ties) goes to the heaps, as does L < 16 k (where they are as fast)
THRESHOLD_GROUP = 8
THRESHOLD_MAX_GROUPS = 256
THRESHOLD_MAX_SHARE = 4
THRESHOLD_MIN_LABELS_PER_K = 16


@dataclass
class CandidateScores:
    """A batch's ranking given by a few candidate labels a row that outrank all its other
    labels (stage 3 with b = 0: the labels G weighs, scored (G + 0) * s), so that its top k
    needs no [B, L] scores: ``ids`` [B, W] ascending within a row (-1: padding), ``values``
    [B, W]; ``dense(positions)`` gives the full [n, L] scores of those batch rows, for the rows
    with fewer than k candidates left (after their exclusions)."""

    ids: torch.Tensor
    values: torch.Tensor
    dense: Callable[[torch.Tensor], torch.Tensor]
    # ids already best first (score descending, then id), padding last: the top k' are the
    # first k' slots while no exclusion removes a candidate
    ranked: bool = False
    # the top k (ids, values) of the rows at ``positions`` with fewer than k candidates left,
    # their exclusions given, without a [n, L] table: rest(positions, exclude, k); None, or
    # None returned: ``dense``
    rest: Callable[[torch.Tensor, Csr | None, int],
                   tuple[torch.Tensor, torch.Tensor] | None] | None = None


def ranked_batches(score_rows: Callable[[Examples, np.ndarray], torch.Tensor | CandidateScores],
                   examples: Examples, k: int, batch_rows: int,
                   ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(rows, top-k label ids, their scores) of every batch of ``batch_rows`` rows of
    ``examples``, ranked by ``score_rows(examples, rows)`` without each row's ``exclude`` labels
    (:func:`ranked_top_k`): the ranking loop of ``awe eval`` and ``awe score``."""
    for start in range(0, len(examples), batch_rows):
        rows = np.arange(start, min(start + batch_rows, len(examples)))
        scores = score_rows(examples, rows)
        exclude = None if examples.exclude is None else examples.exclude.take(rows)
        ids, values = ranked_top_k(scores, k, exclude)
        yield rows, ids, values


def ranked_top_k(scores: torch.Tensor | CandidateScores, k: int,
                 exclude: Csr | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_k` of a batch's scores without its rows' ``exclude`` labels: dense [B, L]
    scores (masked in place), or :class:`CandidateScores` (the same ranking: a row whose
    candidates leave k takes their top k, ties by lower id; the others are ranked dense)."""
    if not isinstance(scores, CandidateScores):
        scores = scores.float()
        if exclude is not None:
            mask_excluded(scores, exclude)
        return top_k(scores, k)
    ids = scores.ids
    values = scores.values.float()
    dropped = (ids < 0) | torch.isnan(values)
    if exclude is not None and exclude.nnz:
        dropped |= excluded_ids(ids, exclude)
    values = values.masked_fill(dropped, float("-inf"))
    if scores.ranked and not bool((dropped & (ids >= 0)).any()):
        top_ids, top_vals = _first_slots(ids, values, k)
    else:
        top_ids, top_vals = top_k(values, k)
    found = top_ids >= 0
    top_ids = torch.where(found, ids.gather(1, top_ids.clamp(min=0)), top_ids)
    short = (~found).any(1).nonzero()[:, 0]
    if short.numel():  # fewer than k candidates: the row's other labels come next
        left_out = None if exclude is None else exclude.take(short.cpu().numpy())
        found = None if scores.rest is None else scores.rest(short, left_out, k)
        if found is None:
            dense = scores.dense(short).float()
            if left_out is not None:
                mask_excluded(dense, left_out)
            found = top_k(dense, k)
        top_ids[short], top_vals[short] = found
    return top_ids, top_vals


def excluded_ids(ids: torch.Tensor, exclude: Csr) -> torch.Tensor:
    """Which entries of ``ids`` [B, W] (-1 padding: never) are in their row's ``exclude``."""
    n_cols = int(max(ids.max(), exclude.indices.max())) + 1
    keys = np.arange(len(ids), dtype=np.int64)[:, None] * n_cols + ids.clamp(min=0).cpu().numpy()
    return torch.from_numpy(contains(exclude.keys(n_cols), keys)).to(ids.device) & (ids >= 0)


def _first_slots(ids: torch.Tensor, values: torch.Tensor, k: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k slots of ranked candidates as :func:`top_k` returns them (slot numbers into
    ``ids``; -1 and -inf past a row's candidates)."""
    width = min(k, ids.shape[1])
    slots = torch.arange(width).expand(len(ids), width).clone()
    vals = values[:, :width].clone()
    slots[ids[:, :width] < 0] = -1
    if width < k:
        slots = torch.cat([slots, slots.new_full((len(ids), k - width), -1)], dim=1)
        vals = torch.cat([vals, vals.new_full((len(ids), k - width), float("-inf"))], dim=1)
    return slots, vals


def mask_excluded(scores: torch.Tensor, exclude: Csr | None) -> torch.Tensor:
    """Set the scores of each row's excluded labels to -inf (in place)."""
    if exclude is not None and exclude.nnz:
        rows = torch.from_numpy(exclude.row_of_entry()).to(scores.device)
        cols = torch.from_numpy(exclude.indices).to(scores.device)
        scores[rows, cols] = float("-inf")
    return scores


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k label ids and scores per row, ties broken by lower label id.

    Returns (ids [B, k] int64, scores [B, k]); when fewer than k labels have a score above -inf
    the remaining slots hold id -1 and score -inf. NaN scores rank last: they count as -inf
    (never chosen, never a hit), whatever produced them (an overflow, a damaged model).

    On CPU with L >= 16 k (float32), most rows are settled by a threshold from their groups'
    maxima (:func:`_threshold_top`: 1.3x faster than the heaps at L = 1000, k = 10). The others,
    and other devices, take :func:`_top_k_settled` (the k + 1 largest, then an exact path for
    ties across the cut).
    """
    n_rows, n_labels = scores.shape
    k_eff = min(k, n_labels)
    if k_eff == n_labels or n_rows == 0:
        ids, vals = _top_k_exact(_without_nan(scores), k_eff)
    elif (scores.device.type == "cpu" and scores.dtype == torch.float32
          and n_labels >= THRESHOLD_MIN_LABELS_PER_K * k_eff):
        found = _threshold_top(scores, k_eff)
        if found is None:
            ids, vals = _top_k_settled(scores, k_eff)
        else:
            ids, vals, left = found
            if len(left):
                rows = torch.from_numpy(left)
                ids[rows], vals[rows] = _top_k_settled(scores[rows], k_eff)
    else:
        ids, vals = _top_k_settled(scores, k_eff)
    ids = torch.where(torch.isneginf(vals), torch.full_like(ids, -1), ids)
    if k_eff < k:
        pad = k - k_eff
        ids = torch.cat([ids, ids.new_full((n_rows, pad), -1)], dim=1)
        vals = torch.cat([vals, vals.new_full((n_rows, pad), float("-inf"))], dim=1)
    return ids, vals


def _top_k_settled(scores: torch.Tensor, k_eff: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k_eff (< L) from the k_eff + 1 largest of each row (:func:`_largest`): where the
    k-th is above the (k + 1)-th the set is settled and only its order is sorted; rows with a
    tie across the cut or a NaN take :func:`_top_k_exact`."""
    vals, ids = _largest(scores, k_eff + 1)
    # topk ranks NaN above everything: a row with a NaN has one in its top k + 1
    # (a row with fewer than k scores above -inf ties at the cut: -inf == -inf)
    unsettled = (vals[:, k_eff - 1] == vals[:, k_eff]) | torch.isnan(vals).any(1)
    ids, vals = _by_score_then_id(ids[:, :k_eff], vals[:, :k_eff])
    if bool(unsettled.any()):
        rows = unsettled.nonzero()[:, 0]
        ids[rows], vals[rows] = _top_k_exact(_without_nan(scores[rows]), k_eff)
    return ids, vals


def _threshold_top(scores: torch.Tensor, k: int,
                   ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray] | None:
    """The top k of the rows that a threshold settles, best first, ties by lower id:
    (ids [B, k], values [B, k], rows left to the caller).

    The threshold t of a row is the k-th largest maximum of its groups of columns (column c in
    group c mod G): k groups hold a score >= t, so the k best scores are all >= t, and so is
    every score equal to the k-th. Those few columns (about k + 1 at L = 1000, k = 10) are
    found with one comparison and one ``flatnonzero`` over the block and sorted; no heap or
    ``topk`` touches the other L - k. Rows whose threshold is -inf or NaN (NaN scores rank last
    elsewhere) or that have more than ``THRESHOLD_MAX_SHARE`` x k columns at or above it
    (ties) are left: their slots hold -1 and -inf. None: most rows would be left (a knn row's
    dense G is mostly zeros at its threshold), so none is taken.
    """
    values = scores.detach().numpy()
    n_rows, n_labels = values.shape
    group_max, n_groups = group_maxima(values, k)
    threshold = np.partition(group_max, n_groups - k, axis=1)[:, n_groups - k]
    # rows left before the pass over the block: a NaN, no finite threshold, or many groups
    # reaching it (ties: a knn row's dense G is mostly zeros, threshold 0)
    left = (~np.isfinite(threshold) | np.isnan(group_max).any(axis=1)
            | (np.count_nonzero(group_max >= threshold[:, None], axis=1)
               > THRESHOLD_MAX_SHARE * k))
    if 2 * np.count_nonzero(left) > n_rows:  # mostly ties (knn rows): not worth a pass
        return None
    flat = np.flatnonzero(values >= np.where(left, np.inf, threshold)[:, None])  # row-major
    rows, cols = np.divmod(flat, n_labels)
    counts = np.bincount(rows, minlength=n_rows)
    left |= counts > THRESHOLD_MAX_SHARE * k
    if 2 * np.count_nonzero(left) > n_rows:
        return None
    if left.any():
        kept = ~left[rows]
        flat, cols = flat[kept], cols[kept]
        counts[left] = 0
    # at least one row is settled, so the widest row holds >= k columns
    top_ids, top_vals = pad_rows(Csr.from_lengths(counts, cols, values.reshape(-1)[flat]))
    top_vals[top_ids < 0] = -np.inf
    # stable: among equal scores the lower column (found first) stays first
    top_vals, order = torch.sort(top_vals, dim=1, descending=True, stable=True)
    return top_ids.gather(1, order[:, :k]), top_vals[:, :k], np.flatnonzero(left)


def group_maxima(values: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """(maxima [B, G], G) of the strided column groups of ``values`` [B, L] (column c in group
    c mod G; G = L / ``THRESHOLD_GROUP``, at least k, at most ``THRESHOLD_MAX_GROUPS``): each of
    G groups holds a maximum, so the k-th largest maximum is at most the k-th largest value."""
    n_rows, n_labels = values.shape
    n_groups = max(k, min(n_labels // THRESHOLD_GROUP, THRESHOLD_MAX_GROUPS))
    per_group = n_labels // n_groups
    bulk = n_groups * per_group
    group_max = values[:, :bulk].reshape(n_rows, per_group, n_groups).max(axis=1)
    if bulk < n_labels:  # the last columns join groups 0, 1, ... (still column c mod G)
        tail = values[:, bulk:]
        np.maximum(group_max[:, :tail.shape[1]], tail, out=group_max[:, :tail.shape[1]])
    return group_max, n_groups


def _largest(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k largest scores of every row, largest first, in any order among
    equal values; ids -1 fill rows with fewer than k scores above -inf.

    On CPU, FAISS's k-heaps (one pass per row, comparing each score with the heap's least;
    NaN never enters): 3.4 µs a row at L = 1000, k = 11, where ``torch.topk`` takes 5-6 µs
    (1 thread); the kernel releases the GIL, as `awe score`'s threads need. Elsewhere
    ``torch.topk`` (which ranks NaN first: :func:`top_k` sends such rows to the exact path),
    also for k > ``HEAP_MAX_K``, where the heaps' insertions cost more than topk (k = 100:
    26 vs 15 µs a row).
    """
    if scores.device.type != "cpu" or scores.dtype != torch.float32 or k > HEAP_MAX_K:
        return torch.topk(scores, k, dim=1)
    import faiss

    values = np.empty((scores.shape[0], k), dtype=np.float32)
    ids = np.empty((scores.shape[0], k), dtype=np.int64)
    source = np.ascontiguousarray(scores.detach().numpy())
    heaps = faiss.float_minheap_array_t()
    heaps.nh, heaps.k = scores.shape[0], k
    heaps.val, heaps.ids = faiss.swig_ptr(values), faiss.swig_ptr(ids)
    heaps.heapify()
    heaps.addn(scores.shape[1], faiss.swig_ptr(source), 0, 0, scores.shape[0])
    heaps.reorder()
    values[ids < 0] = -np.inf  # an empty slot holds -FLT_MAX
    return torch.from_numpy(values), torch.from_numpy(ids)


def _without_nan(scores: torch.Tensor) -> torch.Tensor:
    nan = torch.isnan(scores)
    return scores.masked_fill(nan, float("-inf")) if bool(nan.any()) else scores


def _by_score_then_id(ids: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(ids, dim=1)
    ids, vals = ids.gather(1, order), vals.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return ids.gather(1, order), vals.gather(1, order)


def _top_k_exact(scores: torch.Tensor, k_eff: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k_eff (<= L) of every row, ties at the cut broken by lower label id: several passes
    over [B, L], for the rows :func:`top_k` cannot settle from topk alone."""
    n_rows = scores.shape[0]
    kth = torch.topk(scores, k_eff, dim=1).values[:, -1:]
    above = scores > kth
    at = scores == kth
    room = k_eff - above.sum(dim=1, keepdim=True)
    chosen = above | (at & (torch.cumsum(at.to(torch.int32), dim=1) <= room))
    ids = chosen.nonzero()[:, 1].view(n_rows, k_eff)  # ascending label id within each row
    return _by_score_then_id(ids, scores.gather(1, ids))
