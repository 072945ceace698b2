"""The checks of the data contract's columns, each defined once.

A problem of a whole column (missing, not a list, values of the wrong type) is a
:class:`~awe.errors.DataError` at once. A problem of rows (a null, a wrong width, an id out of
range, NaN) is a :class:`Problem`; the checks yield them in a fixed order. Reading
(:mod:`awe.io.reader`) raises the first one, naming its first row; scoring with ``skip_invalid``
sets every bad row aside with the first problem it has (:func:`awe.io.reader.invalid_rows`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from awe.errors import DataError

# Sparse feature ids index rows of U (n_features x D): an id beyond this is a hash or a raw key,
# not an index, and would ask for an impossible U.
MAX_FEATURE_ID = 2**31 - 2


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def short(exc: Exception, file: Path | None = None) -> str:
    """The gist of a library error on one line; without the file name, which the error names."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    text = text.splitlines()[0]
    if file is not None and str(file) in text:  # "...from '<file>'...: <reason>"
        text = text.rsplit(": ", 1)[-1].replace(str(file), "the file")
    return text[:200]


def first_true(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def present_columns(names: list[str], wanted: str, usual: str | None = None) -> str:
    """Every column of the file, and the likely one: the contract's usual name for the column
    (``usual``) when the file has it, else the name closest to ``wanted``."""
    close = [usual] if usual in names else difflib.get_close_matches(wanted, names, n=1,
                                                                      cutoff=0.5)
    return (f"columns present: {', '.join(names) or 'none'}"
            + (f"; did you mean '{close[0]}'?" if close else ""))


def require_column(batch: pa.RecordBatch, name: str, file: Path, option: str,
                   usual: str | None = None) -> pa.Array:
    """The column ``name`` of ``batch``; a missing one is an error naming ``option`` and every
    column of the file (the batch holds only the columns read), with ``usual`` (the contract's
    name for it) as the likely one."""
    idx = batch.schema.get_field_index(name)
    if idx < 0:
        names = pq.read_schema(file).names if file.is_file() else batch.schema.names
        raise DataError("missing column", file=str(file), column=name,
                        hint=f"{present_columns(names, name, usual)}; rename the column, or "
                             f"name it with {option}")
    return batch.column(idx)


@dataclass(frozen=True)
class Problem:
    """Rows of a batch (positions, ascending) with one problem in one column."""

    column: str
    rows: np.ndarray
    reason: str  # one line for any of the rows (a rejects file's reason)
    hint: str
    first: str | None = None  # the error's text for the first row, where it says more

    def error(self, file: Path, offset: int) -> DataError:
        return DataError(self.first or self.reason, file=str(file),
                         row=offset + int(self.rows[0]), column=self.column, hint=self.hint)


def raise_first(problems: Iterable[Problem], file: Path, offset: int) -> None:
    """Raise the first problem that has rows (later checks are not run)."""
    for problem in problems:
        if len(problem.rows):
            raise problem.error(file, offset)


class ListColumn:
    """A list column of numbers: per-row lengths (0 for a null row) and the flat values."""

    def __init__(self, arr: pa.Array, name: str, file: Path, numeric: str):
        want = "list<float32>" if numeric == "float" else "list<int64>"
        if not is_list(arr.type):
            raise DataError(f"expected a list of {numeric}s, found {arr.type}", file=str(file),
                            column=name, hint=f"write the column as {want}")
        flat = pc.list_flatten(arr)
        vtype = flat.type
        ok = pa.types.is_integer(vtype) if numeric == "int" else (
            pa.types.is_floating(vtype) or pa.types.is_integer(vtype))
        if not ok:
            raise DataError(f"expected {numeric} values, found {vtype}", file=str(file),
                            column=name, hint=f"write the column as {want}")
        self.arr, self.name = arr, name
        self.lengths = np.asarray(pc.list_value_length(arr).fill_null(0).to_numpy(
            zero_copy_only=False), dtype=np.int64)
        self._flat = flat
        self.values = (flat.fill_null(0) if flat.null_count else flat).to_numpy(
            zero_copy_only=False)

    def rows_of(self, positions: np.ndarray) -> np.ndarray:
        """The rows of flat ``positions`` (ascending positions give ascending rows)."""
        return np.searchsorted(np.cumsum(self.lengths), positions, side="right")

    def float32(self) -> np.ndarray:
        with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf: a problem
            return self.values.astype(np.float32, copy=False)

    def null_problems(self) -> Iterator[Problem]:
        if self.arr.null_count:
            yield Problem(self.name, np.flatnonzero(self.arr.is_null().to_numpy(
                zero_copy_only=False)), "null value", "fill in or drop the row")
        if self._flat.null_count:
            positions = np.flatnonzero(self._flat.is_null().to_numpy(zero_copy_only=False))
            yield Problem(self.name, np.unique(self.rows_of(positions)), "null inside the list",
                          "fill in or drop the row")

    def non_finite(self, values32: np.ndarray) -> Iterator[Problem]:
        bad = ~np.isfinite(values32)
        if bad.any():
            yield Problem(self.name, np.unique(self.rows_of(np.flatnonzero(bad))),
                          "NaN or infinite feature value", "replace the value or drop the row")


def dense_problems(col: ListColumn, n_features: int, values32: np.ndarray,
                   ) -> Iterator[Problem]:
    """Dense features: nulls, a width other than ``n_features``, NaN or infinity."""
    yield from col.null_problems()
    wrong = np.flatnonzero(col.lengths != n_features)
    if len(wrong):
        yield Problem(col.name, wrong, f"wrong number of features (expected {n_features})",
                      "every row needs the same width as the training data",
                      f"has {col.lengths[wrong[0]]} features, expected {n_features}")
    yield from col.non_finite(values32)


def id_problems(col: ListColumn, n_features: int | None) -> Iterator[Problem]:
    """Sparse feature ids: nulls, ids too large to index U, negative, beyond ``n_features``
    (when the model's width is known)."""
    yield from col.null_problems()
    ids = col.values
    if not len(ids):
        return
    if ids.max() > MAX_FEATURE_ID:  # before any cast: uint64 would wrap
        positions = np.flatnonzero(ids > MAX_FEATURE_ID)
        yield Problem(col.name, np.unique(col.rows_of(positions)),
                      f"feature id too large (at most {MAX_FEATURE_ID})",
                      "feature ids index the model's rows: remap them to 0..n-1",
                      f"feature id {ids[positions[0]]} is too large (at most {MAX_FEATURE_ID})")
    if ids.min() < 0:
        yield Problem(col.name, np.unique(col.rows_of(np.flatnonzero(ids < 0))),
                      "negative feature id", "feature ids are 0..n-1")
    if n_features is not None:
        positions = np.flatnonzero(ids >= n_features)
        if len(positions):
            known = f"the model knows ids 0..{n_features - 1}"
            yield Problem(col.name, np.unique(col.rows_of(positions)),
                          f"feature id out of range ({known})",
                          "drop ids the training data never had, or retrain with them",
                          f"feature id {int(ids[positions[0]])} is out of range ({known})")


def value_problems(col: ListColumn, id_lengths: np.ndarray, values32: np.ndarray,
                   ) -> Iterator[Problem]:
    """Sparse feature values: nulls, not one value per id, NaN or infinity."""
    yield from col.null_problems()
    mismatch = np.flatnonzero(col.lengths != id_lengths)
    if len(mismatch):
        row = mismatch[0]
        yield Problem(col.name, mismatch, "not one value per feature id",
                      "give one value per id, or no values column (values default to 1)",
                      f"{col.lengths[row]} values for {id_lengths[row]} feature ids")
    yield from col.non_finite(values32)


def label_column(batch: pa.RecordBatch, name: str, file: Path, required: bool,
                 ) -> pa.Array | None:
    """The label (or exclude) column as int64 or string labels, a list or a scalar per row;
    None when absent and not ``required``."""
    if batch.schema.get_field_index(name) < 0:
        if required:
            require_column(batch, name, file, "--labels-col", "labels")  # raises: missing column
        return None
    arr = batch.column(batch.schema.get_field_index(name))
    t = arr.type
    inner = t.value_type if is_list(t) else t
    if pa.types.is_dictionary(inner):  # e.g. a pandas categorical
        inner = inner.value_type
        arr = arr.cast(pa.list_(inner) if is_list(t) else inner)
    if pa.types.is_integer(inner) and inner != pa.int64():
        try:  # one integer type for the vocabulary; uint64 beyond int64 is refused
            arr = arr.cast(pa.list_(pa.int64()) if is_list(t) else pa.int64())
        except pa.ArrowInvalid as exc:
            raise DataError(f"label does not fit a signed 64-bit integer ({short(exc)})",
                            file=str(file), column=name,
                            hint="use smaller integer labels, or strings") from exc
    if not (pa.types.is_integer(inner) or pa.types.is_string(inner)
            or pa.types.is_large_string(inner) or pa.types.is_null(inner)):
        raise DataError(f"labels must be strings or integers, found {t}", file=str(file),
                        column=name, hint="convert the labels to strings or integers")
    return arr
