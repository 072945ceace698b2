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
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from awe.artifacts import atomic_path
from awe.csr import Csr
from awe.errors import AweError, DataError

TASKS = ("annotation", "recommendation")
TASK_METADATA_KEY = b"awe.task"
# the width sparse feature ids index, when the source states it (an svmlight header): test rows
# may use ids no training row has
N_FEATURES_METADATA_KEY = b"awe.n_features"
DEFAULT_BATCH_ROWS = 65_536
# Sparse feature ids index rows of U (n_features x D): an id beyond this is a hash or a raw key,
# not an index, and would ask for an impossible U.
MAX_FEATURE_ID = 2**31 - 2


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
                       f"({_short(exc)}; write them as {kind}s)") from exc


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
        reason = _short(exc, file)
        what = ("not a parquet file" if "magic bytes" in reason
                else f"not a readable parquet file: {reason}")
        raise DataError(what, file=str(file),
                        hint="awe reads parquet: rewrite it, convert it (e.g. "
                             "pandas.read_csv(path).to_parquet('data.parquet'), list columns as "
                             "lists; `awe data svmlight FILE` for LIBSVM / XMC text), or remove "
                             "it from the input") from exc


def _short(exc: Exception, file: Path | None = None) -> str:
    """The gist of a library error on one line; without the file name, which the error names."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    text = text.splitlines()[0]
    if file is not None and str(file) in text:  # "...from '<file>'...: <reason>"
        text = text.rsplit(": ", 1)[-1].replace(str(file), "the file")
    return text[:200]


def file_schema(file: Path) -> pa.Schema:
    return _open_fragment(file).physical_schema


def stated_width(files: list[Path]) -> int:
    """The feature width the files' metadata states (0: none stated)."""
    meta = file_schema(files[0]).metadata or {}
    value = meta.get(N_FEATURES_METADATA_KEY)
    return int(value) if value else 0


def read_task(files: list[Path]) -> str | None:
    """The task recorded by ``awe data`` in the parquet metadata, if any."""
    meta = file_schema(files[0]).metadata or {}
    value = meta.get(TASK_METADATA_KEY)
    return value.decode() if value else None


def iter_batches(files: list[Path], columns: list[str], batch_rows: int = DEFAULT_BATCH_ROWS,
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
        raise DataError(f"cannot read the file's metadata ({_short(exc)})", file=str(file),
                        hint="the file is damaged or truncated; rewrite it") from exc


def iter_row_group(file: Path, number: int, offset: int, columns: list[str],
                   batch_rows: int = DEFAULT_BATCH_ROWS,
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
        raise DataError(f"cannot read the file's metadata ({_short(exc)})", file=str(file),
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
                        f"{_short(exc)}", file=str(file), row=offset,
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


def scan(path, columns: Columns = Columns(), batch_rows: int = DEFAULT_BATCH_ROWS) -> ScanResult:
    """One streaming pass: input kind and width, the label vocabulary, the row count, the task,
    the mean squared row norm."""
    files = resolve_files(path)
    kind = _input_kind(files[0], columns)
    width = 0
    sq_norms = 0.0
    widths: dict[int, list] = {}  # dense: width -> [rows, file, first row]
    label_kind = None
    uniques: set = set()
    n_rows = 0
    for file, offset, batch in iter_batches(files, _wanted(columns, kind), batch_rows):
        n_rows += batch.num_rows
        if kind == "dense":
            sq_norms += _sum_of_squares(_count_widths(widths, batch, columns, file, offset))
        else:
            ids = _sparse_ids(batch, columns, file, offset)
            if len(ids.indices):
                width = max(width, int(ids.indices.max()) + 1)
            if batch.schema.get_field_index(columns.feature_values) >= 0:
                sq_norms += _sum_of_squares(_list_parts(
                    batch.column(batch.schema.get_field_index(columns.feature_values)),
                    columns.feature_values, file, offset, "float")[1])
            else:
                sq_norms += len(ids.indices)
        labels = _label_column(batch, columns.labels, file, offset, required=True)
        flat = labels.flatten() if _is_list(labels.type) else labels
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


def _input_kind(file: Path, columns: Columns) -> str:
    names = file_schema(file).names
    if columns.features in names:
        return "dense"
    if columns.feature_ids in names:
        return "sparse"
    raise DataError(f"no feature column: expected '{columns.features}' (dense) or "
                    f"'{columns.feature_ids}' (sparse)", file=str(file),
                    hint=f"{present_columns(names, columns.features)}; rename the column, or "
                         f"name it with --features-col / --feature-ids-col")


def _wanted(columns: Columns, kind: str) -> list[str]:
    feats = [columns.features] if kind == "dense" else [columns.feature_ids,
                                                        columns.feature_values]
    return [*feats, columns.labels, columns.exclude, columns.id]


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def present_columns(names: list[str], wanted: str, usual: str | None = None) -> str:
    """Every column of the file, and the likely one: the contract's usual name for the column
    (``usual``) when the file has it, else the name closest to ``wanted``."""
    close = [usual] if usual in names else difflib.get_close_matches(wanted, names, n=1,
                                                                      cutoff=0.5)
    return (f"columns present: {', '.join(names) or 'none'}"
            + (f"; did you mean '{close[0]}'?" if close else ""))


def _usual(option: str) -> str | None:
    """The contract's default name of the column an option (``--labels-col``) names."""
    return getattr(Columns(), option.removeprefix("--").removesuffix("-col").replace("-", "_"),
                   None)


def _column(batch: pa.RecordBatch, name: str, file: Path, offset: int, option: str) -> pa.Array:
    idx = batch.schema.get_field_index(name)
    if idx < 0:  # the batch holds the wanted columns only: list the file's
        raise DataError("missing column", file=str(file), column=name,
                        hint=f"{present_columns(file_schema(file).names, name, _usual(option))}"
                             f"; rename the column, or name it with {option}")
    return batch.column(idx)


def _first_true(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _list_parts(arr: pa.Array, name: str, file: Path, offset: int,
                numeric: str) -> tuple[np.ndarray, np.ndarray]:
    """(lengths per row, flat values as numpy) of a list column; nulls are errors."""
    want = "list<float32>" if numeric == "float" else "list<int64>"
    if not _is_list(arr.type):
        raise DataError(f"expected a list of {numeric}s, found {arr.type}", file=str(file),
                        column=name, hint=f"write the column as {want}")
    if arr.null_count:
        bad = _first_true(arr.is_null().to_numpy(zero_copy_only=False))
        raise DataError("null value", file=str(file), row=offset + bad, column=name,
                        hint="fill in or drop the row")
    if pa.types.is_fixed_size_list(arr.type):
        lengths = np.full(len(arr), arr.type.list_size, dtype=np.int64)
        flat = arr.flatten()
    else:
        lengths = np.asarray(pc.list_value_length(arr).to_numpy(zero_copy_only=False),
                             dtype=np.int64)
        flat = arr.flatten()
    vtype = flat.type
    ok = pa.types.is_integer(vtype) if numeric == "int" else (
        pa.types.is_floating(vtype) or pa.types.is_integer(vtype))
    if not ok:
        raise DataError(f"expected {numeric} values, found {vtype}", file=str(file),
                        column=name, hint=f"write the column as {want}")
    if flat.null_count:
        flat_null = flat.is_null().to_numpy(zero_copy_only=False)
        row = np.searchsorted(np.cumsum(lengths), _first_true(flat_null), side="right")
        raise DataError("null inside the list", file=str(file), row=offset + int(row),
                        column=name, hint="fill in or drop the row")
    return lengths, flat.to_numpy(zero_copy_only=False)


def _count_widths(widths: dict[int, list], batch, columns, file, offset) -> np.ndarray:
    """Tally the dense width of every row: width -> [rows, file, first row]; returns the
    batch's feature values, flat."""
    lengths, features = _list_parts(_column(batch, columns.features, file, offset,
                                            "--features-col"),
                                    columns.features, file, offset, "float")
    values, first, counts = np.unique(lengths, return_index=True, return_counts=True)
    for width, row, count in zip(values.tolist(), first.tolist(), counts.tolist(), strict=True):
        if width in widths:
            widths[width][0] += count
        else:
            widths[width] = [count, file, offset + row]
    return features


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


def _sparse_ids(batch, columns, file, offset) -> Csr:
    lengths, ids = _list_parts(_column(batch, columns.feature_ids, file, offset,
                                       "--feature-ids-col"), columns.feature_ids, file, offset,
                               "int")
    if len(ids) and ids.max() > MAX_FEATURE_ID:  # before the cast: uint64 would wrap
        bad = _first_true(ids > MAX_FEATURE_ID)
        row = np.searchsorted(np.cumsum(lengths), bad, side="right")
        raise DataError(f"feature id {ids[bad]} is too large (at most {MAX_FEATURE_ID})",
                        file=str(file), row=offset + int(row), column=columns.feature_ids,
                        hint="feature ids index the model's rows: remap them to 0..n-1")
    ids = ids.astype(np.int64, copy=False)
    if len(ids) and ids.min() < 0:
        row = np.searchsorted(np.cumsum(lengths), _first_true(ids < 0), side="right")
        raise DataError("negative feature id", file=str(file), row=offset + int(row),
                        column=columns.feature_ids, hint="feature ids are 0..n-1")
    return Csr.from_lengths(lengths, ids)


def _label_column(batch, name, file, offset, required: bool) -> pa.Array | None:
    if batch.schema.get_field_index(name) < 0:
        if required:
            _column(batch, name, file, offset, "--labels-col")  # raises: missing column
        return None
    arr = batch.column(batch.schema.get_field_index(name))
    t = arr.type
    inner = t.value_type if _is_list(t) else t
    if pa.types.is_dictionary(inner):  # e.g. a pandas categorical
        inner = inner.value_type
        arr = arr.cast(pa.list_(inner) if _is_list(t) else inner)
    if pa.types.is_integer(inner) and inner != pa.int64():
        try:  # one integer type for the vocabulary; uint64 beyond int64 is refused
            arr = arr.cast(pa.list_(pa.int64()) if _is_list(t) else pa.int64())
        except pa.ArrowInvalid as exc:
            raise DataError(f"label does not fit a signed 64-bit integer ({_short(exc)})",
                            file=str(file), column=name,
                            hint="use smaller integer labels, or strings") from exc
    if not (pa.types.is_integer(inner) or pa.types.is_string(inner)
            or pa.types.is_large_string(inner) or pa.types.is_null(inner)):
        raise DataError(f"labels must be strings or integers, found {t}", file=str(file),
                        column=name, hint="convert the labels to strings or integers")
    return arr


# ----------------------------------------------------------------------------- loading


def load_examples(path, schema: InputSchema, vocab: LabelVocab, *, require_labels: bool = True,
                  batch_rows: int = DEFAULT_BATCH_ROWS, task: str | None = None) -> Examples:
    """Stream ``path`` into validated :class:`Examples` for a model with ``schema`` and ``vocab``.

    Unknown labels are counted per row (they are misses at evaluation); in training
    (``require_labels``) every row must carry at least one label.
    """
    files = resolve_files(path)
    cols = schema.columns
    kind_here = _input_kind(files[0], cols)
    if kind_here != schema.kind:
        raise DataError(f"the model was trained on {schema.kind} features but this file has "
                        f"{kind_here} ones", file=str(files[0]),
                        hint="use a model trained on the same kind of features")
    dense_parts, sparse_parts, label_parts, unknown_parts, exclude_parts, id_parts = (
        [], [], [], [], [], [])
    has_exclude = has_ids = False
    for file, offset, batch in iter_batches(files, _wanted(cols, schema.kind), batch_rows):
        n = batch.num_rows
        if schema.kind == "dense":
            dense_parts.append(_dense_block(batch, schema, file, offset))
        else:
            sparse_parts.append(_sparse_block(batch, schema, file, offset))
        labels, unknown = _label_block(batch, cols.labels, vocab, file, offset,
                                       required=require_labels)
        label_parts.append(labels)
        unknown_parts.append(unknown)
        if require_labels:
            empty = (labels.lengths + unknown) == 0
            if empty.any():
                raise DataError("row has no labels", file=str(file),
                                row=offset + _first_true(empty), column=cols.labels,
                                hint="every training row needs >= 1 label")
        if batch.schema.get_field_index(cols.exclude) >= 0:
            has_exclude = True
            exclude_parts.append(_label_block(batch, cols.exclude, vocab, file, offset,
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
        dense, sparse = _dense_block(batch, schema, file, offset), None
    else:
        dense, sparse = None, _sparse_block(batch, schema, file, offset)
    labels, unknown = _label_block(batch, schema.columns.labels, vocab, file, offset,
                                   required=True)
    empty = (labels.lengths + unknown) == 0
    if empty.any():
        raise DataError("row has no labels", file=str(file), row=offset + _first_true(empty),
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


def _dense_block(batch, schema: InputSchema, file, offset) -> np.ndarray:
    name = schema.columns.features
    lengths, flat = _list_parts(_column(batch, name, file, offset, "--features-col"), name,
                                file, offset, "float")
    wrong = lengths != schema.n_features
    if wrong.any():
        row = _first_true(wrong)
        raise DataError(f"has {lengths[row]} features, expected {schema.n_features}",
                        file=str(file), row=offset + row, column=name,
                        hint="every row needs the same width as the training data")
    with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf: rejected below
        x = flat.astype(np.float32, copy=False).reshape(len(lengths), schema.n_features)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise DataError("NaN or infinite feature value", file=str(file),
                        row=offset + _first_true(~finite), column=name,
                        hint="replace the value or drop the row")
    return x


def _sparse_block(batch, schema: InputSchema, file, offset) -> Csr:
    cols = schema.columns
    ids = _sparse_ids(batch, cols, file, offset)
    too_big = ids.indices >= schema.n_features
    if too_big.any():
        row = int(ids.row_of_entry()[_first_true(too_big)])
        raise DataError(f"feature id {int(ids.indices[too_big][0])} is out of range "
                        f"(the model knows ids 0..{schema.n_features - 1})", file=str(file),
                        row=offset + row, column=cols.feature_ids,
                        hint="drop ids the training data never had, or retrain with them")
    if batch.schema.get_field_index(cols.feature_values) >= 0:
        lengths, values = _list_parts(batch.column(batch.schema.get_field_index(
            cols.feature_values)), cols.feature_values, file, offset, "float")
        mismatch = lengths != ids.lengths
        if mismatch.any():
            row = _first_true(mismatch)
            raise DataError(f"{lengths[row]} values for {ids.lengths[row]} feature ids",
                            file=str(file), row=offset + row, column=cols.feature_values,
                            hint="give one value per id, or no values column (values default "
                                 "to 1)")
        with np.errstate(over="ignore"):  # beyond float32 becomes inf: rejected below
            values = values.astype(np.float32, copy=False)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(ids.row_of_entry()[_first_true(bad)])
            raise DataError("NaN or infinite feature value", file=str(file), row=offset + row,
                            column=cols.feature_values, hint="replace the value or drop the row")
    else:
        values = np.ones(len(ids.indices), dtype=np.float32)
    return Csr(ids.indptr, ids.indices, values)


def _label_block(batch, name, vocab: LabelVocab, file, offset, required: bool,
                 ) -> tuple[Csr, np.ndarray]:
    arr = _label_column(batch, name, file, offset, required=required)
    n = batch.num_rows
    if arr is None:
        return Csr.empty(n), np.zeros(n, dtype=np.int64)
    if _is_list(arr.type):
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


def list_array(values: np.ndarray | pa.Array, lengths: np.ndarray,
               value_type: pa.DataType) -> pa.ListArray:
    """A list array whose row i holds the next ``lengths[i]`` entries of ``values``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    if not isinstance(values, pa.Array):
        values = pa.array(values, type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)


def write_table(path: Path, table: pa.Table, metadata: dict[bytes, bytes] | None = None) -> None:
    """Write a parquet file atomically (used for small outputs and tests)."""

    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)
