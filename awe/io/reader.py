"""The data contract: parquet files in, validated compact arrays out.

Input is one or many parquet files (a file, a directory or a glob), read as a stream of record
batches through ``pyarrow.dataset``; memory is bounded by the batch while scanning. A row has dense
``features`` (fixed-length list<float>) or sparse ``feature_ids`` (+ optional ``feature_values``),
``labels`` (a list or a scalar, strings or ints), an optional ``exclude`` list (labels never to rank
for that row) and an optional ``id``. Column names are options (:class:`Columns`).

Every problem is reported as one :class:`~awe.errors.DataError` naming the file, row and column
and saying how to fix it. Files are read row group by row group, so a damaged page is reported
with the exact rows of its row group; page checksums are verified where the writer stored them.

Labels given as integers to a model whose vocabulary holds strings are compared by their decimal
text (``7`` matches ``"7"``; a vocabulary read from CSV often holds numbers as strings), and those
that match nothing are unknown labels, i.e. misses. The reverse, string labels for an integer
vocabulary, is an error: the text could mean anything.

Over 600 lines on purpose: the contract's types (imported from here across awe), the parquet
access and the two readers (:func:`scan`, :func:`load_examples`, and the record-batch blocks they
share with streaming and scoring) use the same row-group helpers; every per-column check lives in
:mod:`awe.io.validate`.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from awe.csr import Csr
from awe.errors import AweError, DataError
from awe.io.validate import (
    ListColumn,
    Problem,
    dense_problems,
    first_true,
    id_problems,
    is_list,
    label_column,
    present_columns,
    raise_first,
    require_column,
    short,
    value_problems,
)

TASKS = ("annotation", "recommendation")
TASK_METADATA_KEY = b"awe.task"
# the width sparse feature ids index, when the source states it (an svmlight header): test rows
# may use ids no training row has
N_FEATURES_METADATA_KEY = b"awe.n_features"
# rows of a record batch read from parquet at a time
READ_BATCH_ROWS = 65_536


@dataclass(frozen=True)
class Columns:
    """Names of the contract's columns in the user's files."""

    features: str = "features"
    feature_ids: str = "feature_ids"
    feature_values: str = "feature_values"
    labels: str = "labels"
    exclude: str = "exclude"
    id: str = "id"


@dataclass(frozen=True)
class InputSchema:
    """What the model was trained on; stored in config.json and checked on every later read."""

    kind: str  # "dense" or "sparse"
    n_features: int
    columns: Columns = field(default_factory=Columns)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "n_features": self.n_features, "columns": asdict(self.columns)}

    @classmethod
    def from_dict(cls, d: dict) -> InputSchema:
        return cls(d["kind"], int(d["n_features"]), Columns(**d.get("columns", {})))


class LabelVocab:
    """The label vocabulary, fixed at training time: sorted unique labels, strings or ints."""

    def __init__(self, labels: list):
        self.labels = list(labels)
        kinds = {type(label) for label in self.labels}
        if not (kinds <= {str} or kinds <= {int}):  # bool is no int here
            names = ", ".join(sorted(k.__name__ for k in kinds))
            raise AweError(f"the label vocabulary holds {names}: labels are all strings or all "
                           f"integers")
        self._array = pa.array(self.labels, type=pa.int64() if kinds == {int} else pa.string())
        if len(set(self.labels)) != len(self.labels):
            seen: set = set()
            dup = next(label for label in self.labels if label in seen or seen.add(label))
            raise AweError(f"the label vocabulary lists {dup!r} twice")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def array(self) -> pa.Array:
        """The labels as an arrow array (int64 or string), indexed by label id."""
        return self._array

    @property
    def kind(self) -> str:
        return "int" if pa.types.is_integer(self._array.type) else "string"

    def lookup(self, values: pa.Array) -> np.ndarray:
        """Label ids of ``values``; -1 for labels outside the vocabulary.

        Integers against a string vocabulary are compared by their decimal text; strings against
        an integer vocabulary are an :class:`AweError`.
        """
        if len(values) == 0:
            return np.zeros(0, dtype=np.int64)
        values = _coerce_labels(values, self.kind)
        ids = pc.index_in(values, value_set=self._array)
        return ids.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def names(self, ids: np.ndarray) -> list:
        return [self.labels[i] for i in np.asarray(ids).ravel()]


def _coerce_labels(values: pa.Array, kind: str) -> pa.Array:
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if kind == "int" and not pa.types.is_integer(values.type):
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            raise AweError("labels are strings but the model's labels are integers (write them "
                           "as integers, as in the training data)")
    try:
        return values.cast(pa.int64() if kind == "int" else pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise AweError(f"labels of type {values.type} do not fit the model's {kind} labels "
                       f"({short(exc)}; write them as {kind}s)") from exc


@dataclass
class Examples:
    """Validated rows in compact form: dense matrix or CSR features, CSR labels and exclusions."""

    schema: InputSchema
    dense: np.ndarray | None  # [n, n_features] float32
    sparse: Csr | None  # feature ids with float32 values
    labels: Csr  # label ids (sorted within row, known labels only)
    n_unknown: np.ndarray  # per row: labels outside the vocabulary (count as misses)
    exclude: Csr | None = None
    ids: pa.Array | None = None
    task: str | None = None
    # stage 3: the affinity weights G of every row (label ids with weights), set by awe.affinity
    affinity: Csr | None = None

    def __len__(self) -> int:
        return self.labels.n_rows

    def take(self, rows: np.ndarray) -> Examples:
        rows = np.asarray(rows, dtype=np.int64)
        return Examples(
            self.schema,
            None if self.dense is None else self.dense[rows],
            None if self.sparse is None else self.sparse.take(rows),
            self.labels.take(rows),
            self.n_unknown[rows],
            None if self.exclude is None else self.exclude.take(rows),
            None if self.ids is None else self.ids.take(pa.array(rows)),
            self.task,
            None if self.affinity is None else self.affinity.take(rows),
        )

    def with_labels(self, labels: Csr, exclude: Csr | None) -> Examples:
        return Examples(self.schema, self.dense, self.sparse, labels,
                        np.zeros(labels.n_rows, dtype=np.int64), exclude, self.ids, self.task,
                        self.affinity)

    def with_affinity(self, affinity: Csr) -> Examples:
        return dataclasses.replace(self, affinity=affinity)


# ----------------------------------------------------------------------------- files


def resolve_files(path: str | os.PathLike) -> list[Path]:
    """A parquet file, a directory (searched recursively) or a glob -> sorted list of files."""
    text = str(path)
    p = Path(text)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(text, recursive=True) if Path(f).is_file())
        if not files:
            raise AweError(f"{text}: the pattern matches no files (check the path; quote the "
                           f"pattern so that the shell passes it on unexpanded)")
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if f.is_file()
                       and not f.name.startswith("."))
        if not files:
            raise AweError(f"{p}: the directory holds no .parquet files (point to the files, "
                           f"or use a glob such as '{p}/*.pq')")
    elif p.is_file():
        files = [p]
    else:
        raise DataError("no such file or directory", file=str(p), hint="check the path")
    return files


# Verify page checksums where the writer stored them (pyarrow's write_page_checksum): a damaged
# page is then an error instead of silently different numbers.
_PARQUET = pads.ParquetFileFormat(
    default_fragment_scan_options=pads.ParquetFragmentScanOptions(
        page_checksum_verification=True))


def _open_fragment(file: Path) -> pads.Fragment:
    try:
        dataset = pads.dataset(str(file), format=_PARQUET)
        return next(iter(dataset.get_fragments()))
    except (pa.ArrowInvalid, pa.ArrowException, OSError, StopIteration) as exc:
        reason = short(exc, file)
        what = ("not a parquet file" if "magic bytes" in reason
                else f"not a readable parquet file: {reason}")
        raise DataError(what, file=str(file),
                        hint="awe reads parquet: rewrite it, convert it (e.g. "
                             "pandas.read_csv(path).to_parquet('data.parquet'), list columns as "
                             "lists; `awe data svmlight FILE` for LIBSVM / XMC text), or remove "
                             "it from the input") from exc


def file_schema(file: Path) -> pa.Schema:
    return _open_fragment(file).physical_schema


def stated_width(files: list[Path]) -> int:
    """The feature width the files' metadata states (0: none stated)."""
    meta = file_schema(files[0]).metadata or {}
    value = meta.get(N_FEATURES_METADATA_KEY)
    return int(value) if value else 0


def read_task(path: str | os.PathLike | list[Path]) -> str | None:
    """The ``awe.task`` that ``awe data`` recorded in the parquet metadata (of the first file of
    a path, directory, glob or list of files), or None when absent."""
    files = path if isinstance(path, list) else resolve_files(path)
    meta = file_schema(files[0]).metadata or {}
    value = meta.get(TASK_METADATA_KEY)
    return value.decode() if value else None


def iter_batches(files: list[Path], columns: list[str], batch_rows: int = READ_BATCH_ROWS,
                 ) -> Iterator[tuple[Path, int, pa.RecordBatch]]:
    """Yield (file, first row of the batch within the file, batch) for every record batch.

    Files are read one row group at a time, so that a damaged page is reported with the exact
    rows of its row group (read-ahead would otherwise blame a later or earlier batch).
    """
    for file in files:
        offset = 0
        for number, n_rows in enumerate(row_group_sizes(file)):
            yield from iter_row_group(file, number, offset, columns, batch_rows)
            offset += n_rows


def row_group_sizes(file: Path) -> list[int]:
    """The number of rows of every row group of a parquet file (from its metadata)."""
    fragment = _open_fragment(file)
    try:
        return [g.row_groups[0].num_rows for g in fragment.split_by_row_group()]
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read the file's metadata ({short(exc)})", file=str(file),
                        hint="the file is damaged or truncated; rewrite it") from exc


def iter_row_group(file: Path, number: int, offset: int, columns: list[str],
                   batch_rows: int = READ_BATCH_ROWS,
                   ) -> Iterator[tuple[Path, int, pa.RecordBatch]]:
    """The record batches of row group ``number`` of ``file``, whose first row is row ``offset``
    of the file: (file, first row of the batch within the file, batch)."""
    fragment = _open_fragment(file)
    present = set(fragment.physical_schema.names)
    wanted = [c for c in columns if c in present]
    try:
        group = fragment.split_by_row_group()[number]
        n_rows = group.row_groups[0].num_rows
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read the file's metadata ({short(exc)})", file=str(file),
                        hint="the file is damaged or truncated; rewrite it") from exc
    read = 0
    try:
        for batch in group.to_batches(columns=wanted, batch_size=batch_rows):
            if batch.num_rows == 0:
                continue
            yield file, offset + read, batch
            read += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        last = offset + max(n_rows, read + 1) - 1
        raise DataError(f"cannot read rows {offset}..{last} (row group {number}): "
                        f"{short(exc)}", file=str(file), row=offset,
                        hint="the file is damaged or truncated; rewrite it, or remove "
                             "it from the input") from exc
    if read != n_rows:
        raise DataError(f"row group {number} holds {read} rows, its metadata says "
                        f"{n_rows}", file=str(file), row=offset,
                        hint="the file is damaged; rewrite it")


# ----------------------------------------------------------------------------- scanning


@dataclass
class ScanResult:
    schema: InputSchema
    vocab: LabelVocab
    n_rows: int
    task: str | None
    # mean over rows of |x|^2 (finite values; sparse rows without values count 1 an id): the
    # initial scale of U is set by its square root (model.Wsabie)
    mean_sq_norm: float = 1.0


def scan(path, columns: Columns = Columns(), batch_rows: int = READ_BATCH_ROWS) -> ScanResult:
    """One streaming pass: input kind and width, the label vocabulary, the row count, the task,
    the mean squared row norm."""
    files = resolve_files(path)
    kind = input_kind(files[0], columns)
    width = 0
    sq_norms = 0.0
    widths: dict[int, list] = {}  # dense: width -> [rows, file, first row]
    label_kind = None
    uniques: set = set()
    n_rows = 0
    for file, offset, batch in iter_batches(files, wanted_columns(columns, kind), batch_rows):
        n_rows += batch.num_rows
        if kind == "dense":
            sq_norms += _sum_of_squares(_count_widths(widths, batch, columns, file, offset))
        else:
            ids = _sparse_ids(batch, columns, file, offset, None)
            if len(ids.indices):
                width = max(width, int(ids.indices.max()) + 1)
            if batch.schema.get_field_index(columns.feature_values) >= 0:
                values = ListColumn(batch.column(columns.feature_values),
                                    columns.feature_values, file, "float")
                raise_first(values.null_problems(), file, offset)
                sq_norms += _sum_of_squares(values.values)
            else:
                sq_norms += len(ids.indices)
        labels = label_column(batch, columns.labels, file, required=True)
        flat = labels.flatten() if is_list(labels.type) else labels
        flat = flat.drop_null()
        this_kind = "int" if pa.types.is_integer(flat.type) else "string"
        if label_kind is not None and len(flat) and this_kind != label_kind:
            raise DataError(f"labels are {this_kind}s here but {label_kind}s in earlier rows",
                            file=str(file), row=offset, column=columns.labels,
                            hint="use one type for every label")
        if len(flat):
            label_kind = this_kind
            uniques.update(pc.unique(flat).to_pylist())
    if n_rows == 0:
        raise DataError("no rows", file=str(files[0]) if len(files) == 1 else str(path),
                        hint="the input is empty; point to files that hold examples")
    if kind == "dense":
        width = _common_width(widths, n_rows, columns)
    else:
        width = max(width, stated_width(files))
    if width == 0:
        raise DataError("no feature ids in any row", file=str(path), column=columns.feature_ids,
                        hint="every example needs features; check the column")
    if not uniques:
        raise DataError("no labels in any row", file=str(path), column=columns.labels,
                        hint="name the label column with --labels-col")
    return ScanResult(InputSchema(kind, width, columns), LabelVocab(sorted(uniques)), n_rows,
                      read_task(files), sq_norms / n_rows)


def input_kind(file: Path, columns: Columns) -> str:
    names = file_schema(file).names
    if columns.features in names:
        return "dense"
    if columns.feature_ids in names:
        return "sparse"
    raise DataError(f"no feature column: expected '{columns.features}' (dense) or "
                    f"'{columns.feature_ids}' (sparse)", file=str(file),
                    hint=f"{present_columns(names, columns.features)}; rename the column, or "
                         f"name it with --features-col / --feature-ids-col")


def check_input_kind(files: list[Path], schema: InputSchema) -> None:
    """The files hold the kind of features (dense or sparse) the model was trained on."""
    kind = input_kind(files[0], schema.columns)
    if kind != schema.kind:
        raise DataError(f"the model was trained on {schema.kind} features but this file has "
                        f"{kind} ones", file=str(files[0]),
                        hint="use a model trained on the same kind of features")


def wanted_columns(columns: Columns, kind: str) -> list[str]:
    feats = [columns.features] if kind == "dense" else [columns.feature_ids,
                                                        columns.feature_values]
    return [*feats, columns.labels, columns.exclude, columns.id]


def _count_widths(widths: dict[int, list], batch, columns, file, offset) -> np.ndarray:
    """Tally the dense width of every row: width -> [rows, file, first row]; returns the
    batch's feature values, flat."""
    features = ListColumn(require_column(batch, columns.features, file, "--features-col",
                                          "features"),
                          columns.features, file, "float")
    raise_first(features.null_problems(), file, offset)
    values, first, counts = np.unique(features.lengths, return_index=True, return_counts=True)
    for width, row, count in zip(values.tolist(), first.tolist(), counts.tolist(), strict=True):
        if width in widths:
            widths[width][0] += count
        else:
            widths[width] = [count, file, offset + row]
    return features.values


def _sum_of_squares(values: np.ndarray) -> float:
    """Sum of v^2 over the finite values, in float64 (non-finite ones are reported at load)."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if not finite.all():
        v = v[finite]
    return float(np.dot(v, v))


def _common_width(widths: dict[int, list], n_rows: int, columns: Columns) -> int:
    """The dense width of every row; a row of another width is an error naming the first one.

    When widths differ, the most common one is taken as right (ties: the first seen) and the
    first row of any other width is reported: the odd row may well be row 0.
    """
    seen = list(widths.items())  # in order of first appearance
    width, (count, _, _) = max(seen, key=lambda item: item[1][0])  # max keeps the first of ties
    odd = [(w, info) for w, info in seen if w != width]
    if odd:
        bad, (_, file, row) = odd[0]
        raise DataError(f"has {bad} features but {count} of {n_rows} rows have {width}",
                        file=str(file), row=row, column=columns.features,
                        hint="every row needs the same number of features; fix or drop the row")
    if width == 0:
        _, file, row = widths[0]
        raise DataError("empty feature list", file=str(file), row=row, column=columns.features,
                        hint="every row needs the same number (> 0) of features")
    return width


# ----------------------------------------------------------------------------- loading


def load_examples(path, schema: InputSchema, vocab: LabelVocab, *, require_labels: bool = True,
                  batch_rows: int = READ_BATCH_ROWS, task: str | None = None) -> Examples:
    """Stream ``path`` into validated :class:`Examples` for a model with ``schema`` and ``vocab``.

    Unknown labels are counted per row (they are misses at evaluation); in training
    (``require_labels``) every row must carry at least one label.
    """
    files = resolve_files(path)
    cols = schema.columns
    check_input_kind(files, schema)
    dense_parts, sparse_parts, label_parts, unknown_parts, exclude_parts, id_parts = (
        [], [], [], [], [], [])
    has_exclude = has_ids = False
    for file, offset, batch in iter_batches(files, wanted_columns(cols, schema.kind), batch_rows):
        n = batch.num_rows
        if schema.kind == "dense":
            dense_parts.append(dense_block(batch, schema, file, offset))
        else:
            sparse_parts.append(sparse_block(batch, schema, file, offset))
        labels, unknown = label_block(batch, cols.labels, vocab, file, offset,
                                       required=require_labels)
        label_parts.append(labels)
        unknown_parts.append(unknown)
        if require_labels:
            empty = (labels.lengths + unknown) == 0
            if empty.any():
                raise DataError("row has no labels", file=str(file),
                                row=offset + first_true(empty), column=cols.labels,
                                hint="every training row needs >= 1 label")
        if batch.schema.get_field_index(cols.exclude) >= 0:
            has_exclude = True
            exclude_parts.append(label_block(batch, cols.exclude, vocab, file, offset,
                                              required=False)[0])
        else:
            exclude_parts.append(Csr.empty(n))
        if batch.schema.get_field_index(cols.id) >= 0:
            has_ids = True
            id_parts.append(batch.column(batch.schema.get_field_index(cols.id)))
    if not label_parts:
        raise DataError("no rows", file=str(path),
                        hint="the input is empty; point to files that hold examples")
    labels = Csr.concat(label_parts)
    ids = None
    if has_ids and len(id_parts) == len(label_parts):
        try:
            ids = pa.concat_arrays([a.cast(id_parts[0].type) for a in id_parts])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            ids = None
    return Examples(
        schema,
        np.concatenate(dense_parts) if dense_parts else None,
        Csr.concat(sparse_parts) if sparse_parts else None,
        labels,
        np.concatenate(unknown_parts),
        Csr.concat(exclude_parts) if has_exclude else None,
        ids,
        task if task is not None else read_task(files),
    )


def training_block(batch: pa.RecordBatch, schema: InputSchema, vocab: LabelVocab, file: Path,
                   offset: int, task: str | None) -> Examples:
    """One record batch as validated training :class:`Examples` (inputs and labels; every row
    needs a label), with the same checks and messages as :func:`load_examples`."""
    if schema.kind == "dense":
        dense, sparse = dense_block(batch, schema, file, offset), None
    else:
        dense, sparse = None, sparse_block(batch, schema, file, offset)
    labels, unknown = label_block(batch, schema.columns.labels, vocab, file, offset,
                                   required=True)
    empty = (labels.lengths + unknown) == 0
    if empty.any():
        raise DataError("row has no labels", file=str(file), row=offset + first_true(empty),
                        column=schema.columns.labels, hint="every training row needs >= 1 label")
    return Examples(schema, dense, sparse, labels, unknown, task=task)


def concat_examples(parts: list[Examples]) -> Examples:
    """Rows of several :class:`Examples` of one schema, in order (inputs, labels, G)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    return Examples(
        first.schema,
        None if first.dense is None else np.concatenate([p.dense for p in parts]),
        None if first.sparse is None else Csr.concat([p.sparse for p in parts]),
        Csr.concat([p.labels for p in parts]),
        np.concatenate([p.n_unknown for p in parts]),
        task=first.task,
        affinity=None if first.affinity is None else Csr.concat([p.affinity for p in parts]))


def dense_block(batch: pa.RecordBatch, schema: InputSchema, file: Path, offset: int,
                ) -> np.ndarray:
    """The dense features of a record batch, validated: [rows, n_features] float32."""
    name = schema.columns.features
    col = ListColumn(require_column(batch, name, file, "--features-col", "features"), name,
                     file, "float")
    values = col.float32()
    raise_first(dense_problems(col, schema.n_features, values), file, offset)
    return values.reshape(len(col.lengths), schema.n_features)


def _sparse_ids(batch: pa.RecordBatch, columns: Columns, file: Path, offset: int,
                n_features: int | None) -> Csr:
    col = ListColumn(require_column(batch, columns.feature_ids, file, "--feature-ids-col",
                                    "feature_ids"),
                     columns.feature_ids, file, "int")
    raise_first(id_problems(col, n_features), file, offset)
    return Csr.from_lengths(col.lengths, col.values.astype(np.int64, copy=False))


def sparse_block(batch: pa.RecordBatch, schema: InputSchema, file: Path, offset: int) -> Csr:
    """The sparse features of a record batch, validated: ids with float32 values (1 where the
    file has no values column)."""
    cols = schema.columns
    ids = _sparse_ids(batch, cols, file, offset, schema.n_features)
    if batch.schema.get_field_index(cols.feature_values) >= 0:
        col = ListColumn(batch.column(cols.feature_values), cols.feature_values, file, "float")
        values = col.float32()
        raise_first(value_problems(col, ids.lengths, values), file, offset)
    else:
        values = np.ones(len(ids.indices), dtype=np.float32)
    return Csr(ids.indptr, ids.indices, values)


def invalid_rows(batch: pa.RecordBatch, schema: InputSchema,
                 ) -> tuple[np.ndarray, list[str], list[str]]:
    """Rows whose features cannot be read: (row positions, column, reason), each row with the
    first problem :func:`dense_block` or :func:`sparse_block` would report for it.

    A problem of a whole column (missing, not a list of numbers) is no row's: it stays an error.
    """
    cols = schema.columns
    problems: list[Problem] = []
    try:
        if schema.kind == "dense":
            col = ListColumn(require_column(batch, cols.features, Path(), ""), cols.features,
                             Path(), "float")
            problems += dense_problems(col, schema.n_features, col.float32())
        else:
            ids = ListColumn(require_column(batch, cols.feature_ids, Path(), ""),
                             cols.feature_ids, Path(), "int")
            problems += id_problems(ids, schema.n_features)
            if batch.schema.get_field_index(cols.feature_values) >= 0:
                col = ListColumn(batch.column(cols.feature_values), cols.feature_values,
                                 Path(), "float")
                problems += value_problems(col, ids.lengths, col.float32())
    except DataError:
        pass  # a column-wide problem: reading the batch reports it
    marked = np.zeros(batch.num_rows, dtype=bool)
    rows, column, reason = [], [], []
    for problem in problems:
        new = problem.rows[~marked[problem.rows]]
        marked[new] = True
        rows.append(new)
        column += [problem.column] * len(new)
        reason += [problem.reason] * len(new)
    if not rows:
        return np.zeros(0, dtype=np.int64), [], []
    order = np.argsort(np.concatenate(rows), kind="stable")
    bad = np.concatenate(rows)[order]
    return bad, [column[i] for i in order], [reason[i] for i in order]


def label_block(batch: pa.RecordBatch, name: str, vocab: LabelVocab, file: Path, offset: int,
                required: bool) -> tuple[Csr, np.ndarray]:
    """Label ids of a label (or exclude) column, sorted and unique within rows, and the count of
    each row's labels outside the vocabulary; empty rows when the column is absent."""
    arr = label_column(batch, name, file, required=required)
    n = batch.num_rows
    if arr is None:
        return Csr.empty(n), np.zeros(n, dtype=np.int64)
    if is_list(arr.type):
        lengths = np.asarray(pc.list_value_length(arr).fill_null(0).to_numpy(
            zero_copy_only=False), dtype=np.int64)
        flat = arr.flatten()
    else:  # a scalar is one label; null is none (one entry per row, nulls dropped below)
        lengths = np.ones(n, dtype=np.int64)
        flat = arr
    valid = ~flat.is_null().to_numpy(zero_copy_only=False)
    row_of = np.repeat(np.arange(n, dtype=np.int64), lengths)
    flat_valid = flat.filter(pa.array(valid)) if not valid.all() else flat
    row_of = row_of[valid] if not valid.all() else row_of
    try:
        ids = vocab.lookup(flat_valid)
    except AweError as exc:
        raise DataError(str(exc), file=str(file), row=offset, column=name) from exc
    known = ids >= 0
    unknown = np.bincount(row_of[~known], minlength=n).astype(np.int64)
    row_known, ids_known = row_of[known], ids[known]
    # sorted and de-duplicated within rows: a label listed twice is one label
    key = np.unique(row_known * len(vocab) + ids_known) if len(vocab) else np.zeros(0, np.int64)
    rows_u, ids_u = np.divmod(key, max(len(vocab), 1))
    labels = Csr.from_lengths(np.bincount(rows_u, minlength=n), ids_u)
    return labels, unknown
