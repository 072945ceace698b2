"""The validation rows: carved once from the training rows when stage 1 starts, never trained on.

Stage 1 picks its epoch on them, stage 2 indexes the other rows only (so a validation row's G is
built by querying the index, as for a new row), and stage 3 picks its epochs and rounds on them
(docs/validation.md). The carve is a function of the training rows, the fraction and the seed;
:class:`Holdout` records it in config.json with a digest, and every later stage carves again and
checks the digest.

Annotation holds out whole rows. Recommendation (x is an identity, so a held-out row would be a
user the model never saw) holds out ``fraction`` of each row's labels, never all of them; the
validation rows exclude the labels that stay in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from awe.artifacts import tensor_digest
from awe.csr import Csr
from awe.errors import AweError
from awe.io.reader import Examples
from awe.options import DictFields


@dataclass(frozen=True)
class Holdout(DictFields):
    """What was held out: enough to carve the same part again and to check it is the same."""

    task: str
    fraction: float
    seed: int
    rows: int  # training rows the part was carved from
    held: int  # rows (annotation) or label entries (recommendation) held out
    digest: str  # of the held row numbers or label entry numbers
    # stage 1 was then refit on every row (``--refit``): the held-out rows are no longer unseen,
    # and later stages have no validation rows of their own
    refit: bool = False

    @property
    def unseen(self) -> bool:
        return not self.refit

    @classmethod
    def from_dict(cls, d: dict | None) -> Holdout | None:
        return super().from_dict(d) if d else None

    @classmethod
    def carve(cls, labels: Csr | int, fraction: float, task: str, seed: int,
              most: int | None = None) -> tuple[Holdout, np.ndarray]:
        """The held-out part of rows with these ``labels``: (the record, the sorted held row
        numbers for annotation or label entry numbers for recommendation). ``most``: at most
        this many rows (a streamed training set keeps them in memory)."""
        held = held_part(labels, fraction, task, seed, most)
        return cls(task, float(fraction), int(seed), _n_rows(labels), int(len(held)),
                   _digest(held)), held

    def again(self, labels: Csr | int, path=None) -> np.ndarray:
        """The same part of the same rows, carved again (a later stage); an error if these are
        not the rows it was carved from."""
        most = self.held if self.task == "annotation" else None
        held = held_part(labels, self.fraction, self.task, self.seed, most)
        n = _n_rows(labels)
        if n != self.rows or len(held) != self.held or _digest(held) != self.digest:
            where = f"{path}: " if path is not None else ""
            raise AweError(f"{where}not the training rows stage 1 carved its validation rows from "
                           f"({n} rows vs {self.rows}); pass the TRAIN given to `awe train`")
        return held


def _n_rows(labels: Csr | int) -> int:
    return int(labels if isinstance(labels, (int, np.integer)) else labels.n_rows)


def _digest(held: np.ndarray) -> str:
    return tensor_digest(np.ascontiguousarray(held, dtype=np.int64))


def held_part(labels: Csr | int, fraction: float, task: str, seed: int,
              most: int | None = None) -> np.ndarray:
    """Sorted held-out row numbers (annotation) or label entry numbers (recommendation).
    ``labels``: the rows' labels, or (annotation, where only their number matters) the number."""
    rng = np.random.default_rng(seed)
    n = labels if isinstance(labels, (int, np.integer)) else labels.n_rows
    if task == "annotation":
        n_valid = int(round(fraction * n))
        if most is not None:
            n_valid = min(n_valid, most)
        if n_valid == 0 or n_valid == n:
            raise AweError(f"--valid-fraction {fraction} leaves no rows to validate or to train on")
        return np.sort(rng.permutation(n)[:n_valid]).astype(np.int64)
    held = rng.random(labels.nnz) < fraction
    # never hold out every label of a row: keep the first label of such rows in training
    held_per_row = np.bincount(labels.row_of_entry()[held], minlength=n)
    all_held = held_per_row == labels.lengths
    held[labels.indptr[:-1][all_held & (labels.lengths > 0)]] = False
    if not held.any():
        raise AweError(f"--valid-fraction {fraction} holds out no labels")
    return np.flatnonzero(held).astype(np.int64)


def kept_rows(n_rows: int, held: np.ndarray, task: str) -> np.ndarray:
    """The training rows that stay (annotation: all but the held ones; recommendation: all)."""
    if task != "annotation":
        return np.arange(n_rows, dtype=np.int64)
    keep = np.ones(n_rows, dtype=bool)
    keep[held] = False
    return np.flatnonzero(keep)


def training_labels(labels: Csr, held: np.ndarray, task: str) -> Csr:
    """The labels the training part keeps: of the kept rows, or without the held entries."""
    if task == "annotation":
        return labels.take(kept_rows(labels.n_rows, held, task))
    keep = np.ones(labels.nnz, dtype=bool)
    keep[held] = False
    return labels.select_entries(keep)


def split_held(examples: Examples, held: np.ndarray, task: str) -> tuple[Examples, Examples]:
    """(training part, validation part) of in-memory rows."""
    if task == "annotation":
        return examples.take(kept_rows(len(examples), held, task)), examples.take(held)
    labels = examples.labels
    keep = np.ones(labels.nnz, dtype=bool)
    keep[held] = False
    train_labels, valid_labels = labels.select_entries(keep), labels.select_entries(~keep)
    train = examples.with_labels(train_labels, None)
    valid = examples.with_labels(valid_labels, train_labels).take(
        np.flatnonzero(valid_labels.lengths > 0))
    return train, valid


def holdout_split(examples: Examples, fraction: float, task: str, seed: int,
                  ) -> tuple[Examples, Examples]:
    """Carve a validation set out of training data (see :func:`held_part`)."""
    return split_held(examples, held_part(examples.labels, fraction, task, seed), task)


def expand_rows(g: Csr, keep: np.ndarray, n_rows: int) -> Csr:
    """``g`` of the rows ``keep`` (sorted) as a Csr of ``n_rows`` rows, the others empty."""
    lengths = np.zeros(n_rows, dtype=np.int64)
    lengths[keep] = g.lengths
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(g.indptr.dtype)
    return Csr(indptr, g.indices, g.values)
