"""Ranking metrics (P@k, R@k, NDCG@k, MAP) over any scoring function, in batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from awe.csr import Csr, contains
from awe.io.reader import Examples
from awe.ranking.topk import ranked_batches

METRICS = ("P", "R", "NDCG", "MAP")


def parse_ks(text: str | Sequence[int]) -> list[int]:
    ks = [int(k) for k in text.split(",")] if isinstance(text, str) else [int(k) for k in text]
    if not ks or min(ks) < 1:
        raise ValueError("k must be positive integers, e.g. 1,3,10")
    return sorted(set(ks))


class RankingMetrics:
    """Accumulates P@k, R@k, NDCG@k and MAP@k over batches of ranked rows."""

    def __init__(self, ks: Sequence[int]):
        self.ks = parse_ks(ks)
        self.sums = {f"{m}@{k}": 0.0 for k in self.ks for m in METRICS}
        self.n_rows = 0

    def update(self, top_ids: np.ndarray, truth: Csr, n_unknown: np.ndarray) -> None:
        """``top_ids`` [B, >= max k] ranked ids (-1 = empty slot); ``truth`` true label ids."""
        top_ids = np.asarray(top_ids)
        n_true = truth.lengths + np.asarray(n_unknown)
        counted = n_true > 0
        if not counted.any():
            return
        kmax = max(self.ks)
        top = top_ids[:, :kmax]
        n_labels = int(max(top.max(initial=0), truth.indices.max(initial=0))) + 1
        rows = np.arange(len(top), dtype=np.int64)[:, None]
        keys = truth.keys(n_labels)
        hits = contains(keys, rows * n_labels + top) & (top >= 0)
        hits, n_true = hits[counted].astype(np.float64), n_true[counted].astype(np.float64)
        cum_hits = np.cumsum(hits, axis=1)
        positions = np.arange(1, kmax + 1, dtype=np.float64)
        discount = 1.0 / np.log2(positions + 1.0)
        precision_at = cum_hits / positions
        ideal = np.concatenate([[0.0], np.cumsum(discount)])  # ideal DCG of the first j hits
        for k in self.ks:
            kk = min(k, top.shape[1])
            h = cum_hits[:, kk - 1] if kk else np.zeros(len(hits))
            self.sums[f"P@{k}"] += float((h / k).sum())
            self.sums[f"R@{k}"] += float((h / n_true).sum())
            dcg = (hits[:, :kk] * discount[:kk]).sum(axis=1)
            ideal_n = np.minimum(n_true, k).astype(np.int64)
            idcg = ideal[ideal_n]  # min(n_true, k) <= kmax: the list always has kmax slots
            self.sums[f"NDCG@{k}"] += float((dcg / idcg).sum())
            ap = (precision_at[:, :kk] * hits[:, :kk]).sum(axis=1) / np.minimum(n_true, k)
            self.sums[f"MAP@{k}"] += float(ap.sum())
        self.n_rows += int(counted.sum())

    def result(self) -> dict[str, float]:
        n = max(self.n_rows, 1)
        return {name: total / n for name, total in self.sums.items()}


ScoreFn = Callable[[Examples, np.ndarray], torch.Tensor]


@torch.no_grad()
def evaluate(score_rows: ScoreFn, examples: Examples, ks: Sequence[int],
             batch_rows: int = 2048) -> dict[str, float]:
    """Rank every label for every row with ``score_rows(examples, rows)`` (-> [B, L] scores or
    :class:`CandidateScores`) and score it."""
    metrics = RankingMetrics(ks)
    for rows, ids, _ in ranked_batches(score_rows, examples, max(metrics.ks), batch_rows):
        metrics.update(ids.cpu().numpy(), examples.labels.take(rows), examples.n_unknown[rows])
    return metrics.result()
