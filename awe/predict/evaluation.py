"""`awe eval`: the four rows (kNN, kNN in Wsabie space, Wsabie, AWE) on a test file."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from awe.io.reader import load_examples
from awe.predict.predictor import Predictor
from awe.ranking.metrics import evaluate
from awe.ranking.topk import SCORES_PER_BATCH


def evaluate_model(model_dir, test_path, ks: Sequence[int], rows: Sequence[str] | None = None,
                   threads: int | None = None, batch_rows: int = 2048, train_path=None,
                   screen: bool | None = None) -> dict[str, dict[str, float]]:
    """Metrics of each row of the paper's table on ``test_path``: {row: {metric: value}}.

    ``rows`` default to every row the model directory supports (see ``awe.score.ROWS``).
    """

    if threads:
        torch.set_num_threads(threads)
    predictor = Predictor(model_dir, train_path=train_path, screen=screen)
    rows = list(rows) if rows else predictor.available()
    predictor.check_rows(rows)
    test = load_examples(test_path, predictor.schema, predictor.vocab, require_labels=False)
    # capped at SCORES_PER_BATCH: up to 4096 labels the 2048-row batches (and metrics) stay
    batch_rows = max(1, min(batch_rows, SCORES_PER_BATCH // predictor.n_labels))
    results = {}
    for row in rows:
        results[row] = evaluate(
            lambda ex, b, row=row: predictor.ranking_scores(ex, b, row, max(ks)),
            test, ks, batch_rows)
    return results
