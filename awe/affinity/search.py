"""``--neighbors auto``: the neighbour count n chosen on the validation rows, by G's own P@k.

For annotation, stage 3 re-orders the labels G carries for a row (docs/method.md, 4.5), and the
n whose G ranks the validation rows best was the n whose AWE did on the annotation sets of
docs/defaults.md. The search costs one neighbour search at the largest candidate instead of the
default's, and one search of the validation rows: the smaller candidates are the first columns
of the same sorted lists.

Recommendation keeps its default: there G's own P@10 does not predict stage 3's (MovieLens-100K:
G best at 50 neighbours, AWE at 200, docs/defaults.md), since stage 3 gains from the items more
neighbours bring in even where they dilute G's own top 10.

The validation rows are stage 1's (:mod:`awe.io.holdout`), queried against the index of the
other rows exactly as new rows are, so the choice is made on rows no stage trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from awe.csr import Csr
from awe.ranking.metrics import RankingMetrics
from awe.ranking.topk import ranked_top_k

# --neighbors auto without validation rows: the paper's 20 for annotation; 100 for
# recommendation, where x is a user id and 20 neighbours carry too few of a user's items
DEFAULT_NEIGHBOURS = {"annotation": 20, "recommendation": 100}
# the candidates around the task's default: half, the default, twice (annotation only)
CANDIDATE_FACTORS = (0.5, 1.0, 2.0)
SEARCHED_TASKS = ("annotation",)
# G's rows are scored in blocks of this many rows (a dense [rows, L] table each)
SCORE_ROWS = 1024


def default_neighbours(task: str | None) -> int:
    return DEFAULT_NEIGHBOURS.get(task or "annotation", DEFAULT_NEIGHBOURS["annotation"])


def neighbour_candidates(task: str | None) -> tuple[int, ...]:
    """The counts ``--neighbors auto`` compares, the task's default first (it wins ties)."""
    n = default_neighbours(task)
    if (task or "annotation") not in SEARCHED_TASKS:
        return (n,)
    others = sorted({max(1, int(round(n * f))) for f in CANDIDATE_FACTORS} - {n})
    return (n, *others)


@dataclass(frozen=True)
class ValidationRows:
    """The rows a stage-2 choice is made on (annotation): their vectors, searched as new rows,
    and their labels."""

    vectors: np.ndarray | Csr
    truth: Csr
    task: str
    k: int

    def __len__(self) -> int:
        return self.truth.n_rows

    @classmethod
    def held_out(cls, vectors: np.ndarray | Csr, labels: Csr, held: np.ndarray, k: int,
                 ) -> ValidationRows:
        """Stage 1's validation rows among the training rows (``held``, from
        :meth:`~awe.io.holdout.Holdout.again` of an annotation holdout)."""
        picked = vectors.take(held) if isinstance(vectors, Csr) else vectors[held]
        return cls(picked, labels.take(held), "annotation", k)


def g_precision(g: Csr, rows: ValidationRows, n_labels: int) -> float:
    """P@k of the ranking by G alone (the knn-wsabie row) on ``rows``."""
    metrics = RankingMetrics([rows.k])
    zeros = np.zeros(SCORE_ROWS, dtype=np.int64)
    for start in range(0, g.n_rows, SCORE_ROWS):
        block = np.arange(start, min(start + SCORE_ROWS, g.n_rows))
        ids, _ = ranked_top_k(g.take(block).to_dense(n_labels), rows.k)
        metrics.update(ids.numpy(), rows.truth.take(block), zeros[:len(block)])
    return metrics.result()[f"P@{rows.k}"]


def pick(scores: dict[int, float]) -> int:
    """The best candidate; a tie goes to the earlier one (the default is first)."""
    best = max(scores.values())
    return next(n for n, score in scores.items() if score == best)

