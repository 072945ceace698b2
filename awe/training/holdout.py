"""The validation rows a stage selects its epoch on, carved from the training rows."""

from __future__ import annotations

import numpy as np

from awe.errors import AweError
from awe.io.reader import Examples


def holdout_split(examples: Examples, fraction: float, task: str, seed: int,
                  ) -> tuple[Examples, Examples]:
    """Carve a validation set out of training data.

    Annotation: hold out whole rows. Recommendation (x is an identity, so a held-out row would be
    a user the model never saw): hold out ``fraction`` of each row's labels, never all of them; the
    held-out rows exclude the labels that stay in training.
    """
    rng = np.random.default_rng(seed)
    if task == "annotation":
        order = rng.permutation(len(examples))
        n_valid = int(round(fraction * len(examples)))
        if n_valid == 0 or n_valid == len(examples):
            raise AweError(f"--valid-fraction {fraction} leaves no rows to validate or to train on")
        return examples.take(np.sort(order[n_valid:])), examples.take(np.sort(order[:n_valid]))
    labels = examples.labels
    held = rng.random(labels.nnz) < fraction
    # never hold out every label of a row: keep the first label of such rows in training
    held_per_row = np.bincount(labels.row_of_entry()[held], minlength=labels.n_rows)
    all_held = held_per_row == labels.lengths
    held[labels.indptr[:-1][all_held & (labels.lengths > 0)]] = False
    train_labels, valid_labels = labels.select_entries(~held), labels.select_entries(held)
    keep_valid = np.flatnonzero(valid_labels.lengths > 0)
    if len(keep_valid) == 0:
        raise AweError(f"--valid-fraction {fraction} holds out no labels")
    train = examples.with_labels(train_labels, None)
    valid = examples.with_labels(valid_labels, train_labels).take(keep_valid)
    return train, valid
