"""Dot products of embeddings with a few rows of a label table each (gathered or sampled)."""

from __future__ import annotations

import warnings

import torch


def gathered_dots(e: torch.Tensor, table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """out[b, k] = e[b] . table[labels[b, k]] for e [B, D], labels [B, K] (no autograd).

    On CPU this is one sampled matrix product (SDDMM) over a CSR pattern with row b holding
    labels[b, :] in draw order: torch's kernel computes one dot product per stored entry and
    neither needs sorted nor unique columns (tests check it against the gather), so the [B, K, D]
    gather is never materialised (3x faster). torch refuses more entries per row than columns
    (K > labels), and CUDA's kernel wants a valid CSR: there, gather, multiply, sum.
    """
    n, k = labels.shape
    if e.device.type != "cpu" or labels.numel() == 0 or k > table.shape[0]:
        v = table.index_select(0, labels.reshape(-1)).view(n, k, -1)
        return v.mul_(e.unsqueeze(1)).sum(-1)
    crow = torch.arange(0, n * k + 1, k, device=e.device)
    return sampled_dots(e, table, crow, labels.reshape(-1)).view(n, k)


def sampled_dots(e: torch.Tensor, table: torch.Tensor, crow: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
    """e[row] . table[col] for the entries of a CSR pattern (row pointers ``crow``, column ids
    ``cols``), in entry order: torch's sampled product, one dot an entry (CPU)."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, cols, e.new_zeros(len(cols)),
                                          size=(e.shape[0], table.shape[0]),
                                          check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, e, table.T, beta=0.0).values()
