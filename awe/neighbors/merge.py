"""Running top-k merges shared by the exact search and the self-join."""

from __future__ import annotations

import math

import numpy as np


def block_top(scores, k: int, group: int = 64):
    """(values, columns) of the k largest of each row of ``scores`` [B, M], unsorted.

    Rows of many columns take two levels: the maxima of groups of ``group`` columns, the k
    groups of largest maxima, then the k largest among those groups' columns. Exact: each of a
    row's k largest values lies in a group whose maximum is among the k largest maxima. One pass
    over the block plus a top-k of M/64 values costs ~10x less than ``torch.topk`` over M.
    """
    import torch

    rows, m = scores.shape
    grouped = (m // group) * group
    if k * group * 4 > grouped:
        return torch.topk(scores, k, dim=1, sorted=False)
    maxima = scores[:, :grouped].reshape(rows, grouped // group, group).amax(dim=2)
    _, groups = torch.topk(maxima, k, dim=1, sorted=False)
    columns = (groups[:, :, None] * group
               + torch.arange(group, dtype=groups.dtype)).reshape(rows, k * group)
    if grouped < m:     # the last partial group joins the candidates whole
        tail = torch.arange(grouped, m, dtype=groups.dtype).expand(rows, m - grouped)
        columns = torch.cat([columns, tail], dim=1)
    values, picked = torch.topk(torch.gather(scores, 1, columns), k, dim=1, sorted=False)
    return values, torch.gather(columns, 1, picked)


def nearest_first(dist: np.ndarray, cand: np.ndarray, out_d: np.ndarray,
                   out_i: np.ndarray) -> None:
    """The out_d.shape[1] nearest of each row's candidates (dist, cand [B, M]) into out_d /
    out_i, nearest first, equal distances by id."""
    order = np.lexsort((cand, dist), axis=-1)[:, :out_d.shape[1]]
    out_d[:] = np.take_along_axis(dist, order, axis=1)
    out_i[:] = np.take_along_axis(cand, order, axis=1)


def order_keys(values, ids):
    """int64 keys ordering (value, id) pairs by value, then by smaller id: bf16 scores tie
    often, and ``torch.topk``'s choice among equal values can change with the tensor's shape
    (with the batch of queries), where the neighbours must not. ``ids`` >= -1, < 2**32 - 1."""
    import torch

    bits = values.contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)          # float order as signed int32
    return (ordered.to(torch.int64) << 32) + ((1 << 32) - 2 - ids)


def merge_top(top_v, top_i, rows, values, ids) -> None:
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
    _, picked = torch.topk(order_keys(all_v, all_i), depth, dim=1, sorted=False)
    top_v[touched] = torch.gather(all_v, 1, picked)
    top_i[touched] = torch.gather(all_i, 1, picked)
