"""Affinity kernels, label aggregation (sum / max) and G's normalisation: pure functions."""

from __future__ import annotations

import numpy as np
import torch

from awe.csr import Csr
from awe.errors import AweError

KERNELS = ("gaussian", "embedded-gaussian", "cosine", "dot", "uniform")
AGGREGATES = ("sum", "max")
SPACES = ("wsabie", "input")
LABEL_KERNELS = ("exact", "embedding")
NORMALIZE = ("none", "max")


# ----------------------------------------------------------------------------- pure pieces


def kernel_weights(kernel: str, sq_dists: np.ndarray, query_sq_norms: np.ndarray,
                   neighbour_sq_norms: np.ndarray, lam: float) -> np.ndarray:
    """k(e, e_i) for every query (rows) and neighbour slot (columns), float32 [B, n].

    Only squared distances and squared norms are needed: e . e_i = (|e|^2 + |e_i|^2 - d^2) / 2.
    Slots with an infinite distance (no neighbour) get weight 0.
    """
    d2 = np.asarray(sq_dists, dtype=np.float64)
    valid = np.isfinite(d2)
    d2 = np.where(valid, d2, 0.0)
    if kernel == "gaussian":
        w = np.exp(-lam * d2)
    elif kernel == "uniform":
        w = np.ones_like(d2)
    else:
        qn = np.asarray(query_sq_norms, dtype=np.float64)[:, None]
        nn = np.where(valid, np.asarray(neighbour_sq_norms, dtype=np.float64), 0.0)
        dot = (qn + nn - d2) / 2
        if kernel == "dot":
            w = np.maximum(dot, 0.0)
        elif kernel == "cosine":
            norm = np.sqrt(qn * nn)
            w = np.exp(np.divide(dot, norm, out=np.zeros_like(dot), where=norm > 0))
        elif kernel == "embedded-gaussian":
            if np.any(dot[valid] > 80):
                raise AweError("--kernel embedded-gaussian: e . e_i exceeds 80 and exp overflows; "
                               "use --kernel cosine or gaussian, or set --max-norm in stage 1")
            w = np.exp(dot)
        else:
            raise AweError(f"unknown kernel {kernel!r}")
    return np.where(valid, w, 0.0).astype(np.float32)


def normalize_rows(g: Csr) -> Csr:
    """Each row of G divided by its largest weight (rows of zeros stay zero)."""
    if g.nnz == 0:
        return g
    starts = g.indptr[:-1][g.lengths > 0]
    row_max = np.zeros(g.n_rows, dtype=np.float32)
    row_max[g.lengths > 0] = np.maximum.reduceat(g.values, starts)
    scale = np.repeat(row_max, g.lengths)
    values = np.divide(g.values, scale, out=np.zeros_like(g.values), where=scale > 0)
    return Csr(g.indptr, g.indices, values.astype(np.float32))


def default_lambda(sq_dists: np.ndarray) -> float:
    """1 / the median squared neighbour distance (ignoring exact duplicates and padding)."""
    d2 = np.asarray(sq_dists, dtype=np.float64).ravel()
    d2 = d2[np.isfinite(d2) & (d2 > 0)]
    if len(d2) == 0:
        return 1.0
    return float(1.0 / np.median(d2))


def aggregate_labels(weights: np.ndarray, neighbour_ids: np.ndarray, train_labels: Csr,
                     n_labels: int, aggregate: str) -> Csr:
    """G rows: for each query, AGG over neighbours of weight * [y in labels(neighbour)].

    ``neighbour_ids`` [B, n] index ``train_labels`` rows (-1: no neighbour). Returns a Csr with
    label ids sorted within each row and float32 weights; labels no neighbour carries are absent.
    """
    n_queries, n_slots = neighbour_ids.shape
    ids = neighbour_ids.ravel()
    valid = ids >= 0
    query_of_slot = np.repeat(np.arange(n_queries, dtype=np.int64), n_slots)[valid]
    slot_weight = weights.ravel()[valid]
    ids = ids[valid]
    lengths = train_labels.indptr[ids + 1] - train_labels.indptr[ids]
    labels = train_labels.indices[train_labels.entry_positions(ids)]
    queries = np.repeat(query_of_slot, lengths)
    values = np.repeat(slot_weight, lengths).astype(np.float64)
    return _reduce_by_key(queries, labels, values, n_queries, n_labels, aggregate)


def _reduce_by_key(queries: np.ndarray, labels: np.ndarray, values: np.ndarray, n_queries: int,
                   n_labels: int, aggregate: str) -> Csr:
    keys = queries * n_labels + labels
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    if len(keys) == 0:
        return Csr.empty(n_queries, with_values=True)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    reduce = np.add if aggregate == "sum" else np.maximum
    reduced = reduce.reduceat(values, starts)
    unique = keys[starts]
    lengths = np.bincount(unique // n_labels, minlength=n_queries)
    return Csr.from_lengths(lengths, unique % n_labels, reduced.astype(np.float32))


def soft_label_affinity(weights: np.ndarray, neighbour_ids: np.ndarray, train_labels: Csr,
                        label_vectors: torch.Tensor, label_lambda: float, aggregate: str,
                        top: int) -> Csr:
    """G with the footnote's label kernel, truncated to the ``top`` largest labels per row.

    G(x, y) = AGG_i k_i * max_{y_i in labels(x_i)} exp(-lambda_y ||V_y - V_{y_i}||^2).
    """
    n_queries, n_slots = neighbour_ids.shape
    n_labels = label_vectors.shape[0]
    ids = neighbour_ids.ravel()
    valid = ids >= 0
    slot = np.flatnonzero(valid)  # flat (query, slot) position of each real neighbour
    ids = ids[valid]
    lengths = train_labels.indptr[ids + 1] - train_labels.indptr[ids]
    their_labels = train_labels.indices[train_labels.entry_positions(ids)]
    slot_of_label = torch.from_numpy(np.repeat(slot, lengths))
    v = label_vectors.float()
    sq = (v * v).sum(1)
    uniq, inverse = np.unique(their_labels, return_inverse=True)
    u = torch.from_numpy(uniq)
    # similarity of each distinct neighbour label to every label: [U, L]
    d2 = (sq[u, None] + sq[None, :] - 2 * v[u] @ v.T).clamp(min=0)
    sim = torch.exp(-label_lambda * d2)
    match = torch.zeros(n_queries * n_slots, n_labels)
    index = slot_of_label[:, None].expand(-1, n_labels)
    match.scatter_reduce_(0, index, sim[torch.from_numpy(inverse)], reduce="amax",
                          include_self=True)
    weighted = match.view(n_queries, n_slots, n_labels) * torch.from_numpy(
        weights.astype(np.float32)).unsqueeze(-1)
    g = weighted.sum(1) if aggregate == "sum" else weighted.amax(1)
    top = min(top, n_labels)
    values, labels = torch.topk(g, top, dim=1)
    keep = values > 0
    order = torch.argsort(torch.where(keep, labels, n_labels), dim=1)  # ids ascending, dropped last
    labels, values, keep = (t.gather(1, order) for t in (labels, values, keep))
    return Csr.from_lengths(keep.sum(1).numpy(), labels[keep].numpy().astype(np.int64),
                            values[keep].numpy().astype(np.float32))


def default_label_lambda(label_vectors: torch.Tensor, sample: int = 2000, seed: int = 0) -> float:
    """1 / the median squared distance between (a sample of) label vectors."""
    v = label_vectors.float()
    if len(v) > sample:
        v = v[torch.randperm(len(v), generator=torch.Generator().manual_seed(seed))[:sample]]
    d2 = torch.cdist(v, v).pow(2)
    off = d2[~torch.eye(len(v), dtype=torch.bool)]
    off = off[off > 0]
    return 1.0 if off.numel() == 0 else float(1.0 / off.median())
