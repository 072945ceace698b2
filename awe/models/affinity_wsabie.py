"""The AWE model f(x, y) = (G(x, y) + b_y) * (x U') . V'_y and its sparse G table."""

from __future__ import annotations

import numpy as np
import torch

from awe.csr import Csr, PaddedRows, pad_rows
from awe.errors import AweError
from awe.io.reader import Examples
from awe.models.wsabie import ModelShape, Wsabie
from awe.ranking.dots import gathered_dots
from awe.ranking.topk import CandidateScores

# rank stage 3 from G's labels alone while a row holds at most this share of the labels
# (ImageNet-like: 20 of 21k); wider rows take the GEMM over all labels (ML100K's G rows hold up
# to 957 of 1396 labels: `awe eval`'s awe row took 0.63 s from the candidates, 0.55 s dense)
CANDIDATES_MAX_SHARE = 1 / 8


class AffinityWsabie(Wsabie):
    """Stage 3 (AWE): f(x, y) = (G(x, y) + b) * ((x U') . V'_y + beta_y), G fixed from stage 2.

    ``beta`` (``label_bias``, optional) is a learned per-label offset of the embedding score;
    None keeps the paper's model. ``rows`` arguments index the examples last passed to
    :meth:`bind`, whose ``affinity`` holds G.
    """

    def __init__(self, shape: ModelShape, bias: float = 0.0, init_scale: float = 0.1,
                 generator: torch.Generator | None = None, label_bias: float | None = None):
        super().__init__(shape, init_scale, generator, label_bias)
        self.bias = float(bias)
        self._table: AffinityTable | None = None
        self._candidates: tuple[torch.Tensor, torch.Tensor] | None = None

    def bind(self, examples: Examples) -> None:
        if examples.affinity is None or examples.affinity.n_rows != len(examples):
            raise AweError("stage 3 needs the affinity weights G of every row: run "
                           "`awe build-g` before `awe retrain`")
        self._table = AffinityTable(examples.affinity, self.shape.n_labels,
                                    self.V.weight.device)
        self._candidates = None

    def negative_candidates(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The labels G carries for each of ``rows`` (bound rows): (ids [B, W], -1 padding,
        their counts [B]), for WARP negatives drawn among G's labels only
        (``TrainConfig.negatives_from="g"``)."""
        if self._candidates is None:
            g = self._table.g
            ids, weights = pad_rows(g, torch.int64, self.V.weight.device)
            if weights is not None:  # a weight of 0 is no candidate (awe_ranking_scores)
                ids = ids.masked_fill(weights == 0, -1)
                ids = torch.sort(ids, dim=1, descending=True).values  # -1 padding last
            self._candidates = ids, (ids >= 0).sum(1)
        ids, counts = self._candidates
        return ids.index_select(0, rows), counts.index_select(0, rows)

    def pair_weight(self, labels: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return self._table.lookup(rows, labels) + self.bias

    def all_scores(self, e: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return awe_ranking_scores(self._table.dense_rows(rows) + self.bias,
                                  self.all_scores_plain(e))

    def candidate_scores(self, e: torch.Tensor, rows: torch.Tensor,
                         g: Csr | None = None) -> CandidateScores | None:
        """The ranking of :meth:`all_scores` from G's labels alone, when they outrank every
        other label (b = 0: the others score 0 * s and follow): (G x s) at G's entries,
        ``g`` (those rows' G) or the bound rows' G. None when b != 0 (every label weighs)."""
        if self.bias != 0:
            return None
        if g is None:
            g = self._table.g.take(rows.cpu().numpy())
        if int(g.lengths.max(initial=0)) > CANDIDATES_MAX_SHARE * self.shape.n_labels:
            return None  # wide rows: one GEMM over all labels costs less than gathered dots
        ids, weights = pad_rows(g, torch.int64, e.device)
        # ascending ids within a row: top_k's ties (by position) are then ties by label id
        order = torch.argsort(ids.masked_fill(ids < 0, self.shape.n_labels), dim=1)
        ids, weights = ids.gather(1, order), weights.gather(1, order)
        base = gathered_dots(e, self.V.weight, ids.clamp(min=0))
        offset = self.pair_offset(ids.clamp(min=0))
        if offset is not None:
            base = base + offset
        # a weight of 0 makes no candidate (awe_ranking_scores): dropped like the padding
        ids = ids.masked_fill(weights == 0, -1)
        values = weights * base

        @torch.no_grad()
        def dense(at: torch.Tensor) -> torch.Tensor:
            return awe_scores_around(self.all_scores_plain(e.index_select(0, at)),
                                     ids.index_select(0, at), values.index_select(0, at))
        return CandidateScores(ids, values, dense)

    def all_scores_plain(self, e: torch.Tensor) -> torch.Tensor:
        """(x U') . V'_y + beta_y for every label, before the G weighting: [B, L]."""
        return super().all_scores(e)


def awe_scores_around(base: torch.Tensor, ids: torch.Tensor, values: torch.Tensor,
                      ) -> torch.Tensor:
    """:func:`awe_ranking_scores` of rows given as their base scores [B, L] (overwritten) and
    their candidates (``ids`` [B, W], -1 padding; ``values`` = weight x base there): the
    non-candidates shifted below the lowest candidate, the candidates' values put in. Three
    passes over [B, L] where the weight matrix took eight."""
    valid = ids >= 0
    lowest = torch.where(valid, values, torch.inf).amin(1, keepdim=True)
    lowest = torch.where(torch.isfinite(lowest), lowest, 0.0)
    out = base.sub_(base.amax(1, keepdim=True)).add_(lowest).sub_(1)
    at = valid.nonzero()
    out[at[:, 0], ids[at[:, 0], at[:, 1]]] = values[at[:, 0], at[:, 1]].to(out.dtype)
    return out


def awe_ranking_scores(weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Scores that rank labels by f = weight * base, the labels with weight 0 last.

    With b = 0 a label no neighbour carries has f = 0 whatever the model, so it is no candidate:
    it would otherwise outrank every candidate with a negative base score. Those labels follow
    the candidates in the order of their base (stage-3 embedding) score.
    """
    f = weight * base
    candidate = weight != 0
    if bool(candidate.all()):
        return f
    lowest = torch.where(candidate, f, torch.inf).amin(1, keepdim=True)
    lowest = torch.where(torch.isfinite(lowest), lowest, 0.0)
    return torch.where(candidate, f, base - base.amax(1, keepdim=True) + lowest - 1)


class AffinityTable:
    """G of a set of rows, looked up per (row, label) pair in one vectorised call.

    A dense rows x labels matrix while it is small, else :class:`~awe.warp.PaddedRows` while
    rows hold about the same number of labels (max aggregation: at most n), else sorted keys
    row * L + label with their weights, searched with ``searchsorted``; absent pairs weigh 0.
    """

    DENSE_LIMIT = 1 << 25  # floats of dense G we are glad to hold (128 MiB)

    def __init__(self, g: Csr, n_labels: int, device: torch.device | str = "cpu"):
        self.n_labels = n_labels
        self.g = g
        self.dense = self.padded = self.keys = self.values = None
        if g.n_rows * n_labels <= self.DENSE_LIMIT:
            self.dense = g.to_dense(n_labels, device)
        elif PaddedRows.fits(g, n_labels):
            self.padded = PaddedRows(g, device)
        else:
            self.keys = torch.from_numpy(g.keys(n_labels)).to(device)
            self.values = torch.from_numpy(g.values.astype(np.float32)).to(device)
        self.device = device

    def lookup(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """G at (rows[i], labels[i]) for rows [B] and labels [B] or [B, K]."""
        if self.padded is not None:
            return self.padded.value(rows, labels)
        if labels.dim() == 2:
            rows = rows.unsqueeze(1).expand_as(labels)
        if self.dense is not None:
            return torch.take(self.dense, rows * self.n_labels + labels)
        if self.keys.numel() == 0:
            return torch.zeros(labels.shape, device=labels.device)
        keys = rows * self.n_labels + labels
        pos = torch.searchsorted(self.keys, keys).clamp(max=self.keys.numel() - 1)
        return torch.where(self.keys[pos] == keys, self.values[pos], 0.0)

    def dense_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.index_select(0, rows)
        return self.g.take(rows.cpu().numpy()).to_dense(self.n_labels, rows.device)
