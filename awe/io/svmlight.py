"""LIBSVM / Extreme Classification Repository multi-label files into the data contract.

The format, one example a line::

    N D L                      optional header: rows, features, labels (first line only)
    3,17 4:0.5 19:1.25         comma-separated label ids, then feature id:value pairs
     4:1 7:0.5                 no labels: the line starts with a space ...
    4:1 7:0.5                  ... or directly with a feature
    +1 2:1 # a comment         everything after '#' is ignored

Whitespace-only lines are skipped. The file is read a row group of lines at a time and written as
parquet shards (bounded memory); see :func:`convert_svmlight` for the output. The parsing is
vectorised: a line is split once into its labels and its features in Python, and every number of
a block is parsed by arrow's CSV reader in one call; a block that does not parse is checked line
by line to name the first bad line.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import itertools
import json
import lzma
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from awe.artifacts import replaced_directory
from awe.errors import AweError, DataError
from awe.io.datasets import SHARD_ROW_GROUP
from awe.io.reader import (
    N_FEATURES_METADATA_KEY,
    TASK_METADATA_KEY,
    TASKS,
)
from awe.io.validate import MAX_FEATURE_ID
from awe.io.writer import list_array

__all__ = ["N_FEATURES_KEY", "SOURCE_KEY", "SvmlightSummary", "convert_svmlight"]

# parquet schema metadata written next to the task (awe.task)
N_FEATURES_KEY = N_FEATURES_METADATA_KEY  # from the header: the width the feature ids index
SOURCE_KEY = b"awe.source"  # JSON: format, file name, header, zero_based
LINES_PER_BLOCK = SHARD_ROW_GROUP  # one block of lines is one row group
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_FEATURES_HINT = "write features as id:value pairs separated by spaces, e.g. 4:0.5 17:1"
_LABELS_HINT = "labels are comma-separated integers before the first space, e.g. 3,17 4:0.5"

SCHEMA = pa.schema([
    pa.field("id", pa.int64()),
    pa.field("feature_ids", pa.list_(pa.int64())),
    pa.field("feature_values", pa.list_(pa.float32())),
    pa.field("labels", pa.list_(pa.int64())),
])


@dataclass
class SvmlightSummary:
    """What :func:`convert_svmlight` wrote."""

    rows: int
    n_features: int  # the width the feature ids index: from the header, else max id + 1
    n_labels: int  # distinct labels seen
    files: list[Path]
    out_dir: Path  # the directory holding ``files``
    zero_based: bool  # feature ids start at 0 (given, or detected: some id is 0)
    header: tuple[int, int, int] | None = None  # (rows, features, labels) from the first line
    rows_without_labels: int = 0
    nnz: int = 0  # feature entries written
    metadata: dict[str, str] = field(default_factory=dict)


def convert_svmlight(path: str | os.PathLike, out_dir: str | os.PathLike, *,
                     shard_rows: int | None = None, zero_based: bool | None = None,
                     task: str = "annotation") -> SvmlightSummary:
    """Convert a LIBSVM / Extreme Classification Repository multi-label file to parquet.

    Each line is `labels features`: comma-separated integer label ids, then id:value feature
    pairs separated by spaces, e.g. `3,17 4:0.5 19:1`. A line may have no labels (it starts
    with a space or with a feature). An optional `N D L` header (rows, features, labels) on
    the first line is checked against the data. Text after `#` is ignored, and so are blank
    lines. Files ending in .gz, .bz2 or .xz are decompressed.

    The rows go to OUT/NAME/part-00000.parquet, ... where NAME is the file's name without its
    extensions (train.txt -> OUT/train/), with columns id (the row's number in the file, from
    0), feature_ids, feature_values and labels (integers, as written). The directory is
    written under a temporary name and renamed when complete, replacing an earlier
    conversion.

    Feature ids are kept as given. With a header, ids must be below D (zero-based) or at most
    D (one-based), and the feature count, recorded in the files' metadata, is D or D + 1
    (one-based ids leave row 0 unused); without one it is the largest id + 1. zero_based: ids
    start at 0 (True) or at 1 (False); default: zero-based when some id is 0.

    shard_rows: rows per parquet file (default: one file). task: annotation (default) or
    recommendation, recorded in the files for training.
    """
    if task not in TASKS:
        raise AweError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if shard_rows is not None and (int(shard_rows) != shard_rows or shard_rows < 1):
        raise AweError(f"shard_rows must be a positive integer, got {shard_rows!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", file=str(path), hint="check the path")
    target = Path(out_dir) / _split_name(path)
    _check_replaceable(target)
    header = _read_header(path)
    if header is not None and zero_based is None:
        zero_based = _has_feature_id_zero(path)
    n_features = None
    if header is not None:
        n_features = header[1] if zero_based else header[1] + 1
    metadata = {TASK_METADATA_KEY: task.encode(),
                SOURCE_KEY: json.dumps({"format": "svmlight", "file": path.name,
                                        "header": list(header) if header else None,
                                        "zero_based": zero_based}).encode()}
    if n_features is not None:
        metadata[N_FEATURES_KEY] = str(n_features).encode()
    schema = SCHEMA.with_metadata(metadata)
    block_lines = min(LINES_PER_BLOCK, shard_rows or LINES_PER_BLOCK)
    state = _State(path, header, zero_based)
    with replaced_directory(target) as stage:
        shards = _ShardWriter(stage, schema, shard_rows)
        try:
            with _open(path) as fh:
                for table in _tables(fh, state, block_lines):
                    shards.write(table)
        finally:
            shards.close()
        state.finish()
        if not shards.names:
            raise DataError("no examples", file=str(path),
                            hint="the file holds no lines of labels and features")
        names = shards.names
    detected = zero_based if zero_based is not None else state.saw_zero
    return SvmlightSummary(
        rows=state.rows,
        n_features=n_features if n_features is not None else state.max_id + 1,
        n_labels=len(state.labels),
        files=[target / name for name in names],
        out_dir=target,
        zero_based=bool(detected),
        header=header,
        rows_without_labels=state.rows_without_labels,
        nnz=state.nnz,
        metadata={k.decode(): v.decode() for k, v in metadata.items()},
    )


# ----------------------------------------------------------------------------- files


def _split_name(path: Path) -> str:
    """train.txt -> train, test.txt.gz -> test, data -> data."""
    name = path.name
    if path.suffix.lower() in _COMPRESSED:
        name = name[: -len(path.suffix)]
    stem = Path(name).stem if Path(name).suffix else name
    return stem or name


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Errors of reading (a damaged compressed file, a failing disk) as one DataError."""
    try:
        yield
    except (OSError, EOFError, lzma.LZMAError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DataError(f"cannot read the file ({reason})", file=str(path),
                        hint="the file is damaged or truncated; download or unpack it "
                             "again") from exc


def _open(path: Path) -> BinaryIO:
    opener = _COMPRESSED.get(path.suffix.lower())
    try:
        return opener(path, "rb") if opener else open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read the file ({exc.strerror or exc})", file=str(path),
                        hint="check the path and its permissions") from exc


def _check_replaceable(target: Path) -> None:
    """An earlier conversion may be replaced; a directory holding anything else may not."""
    if target.exists() and not target.is_dir():
        raise AweError(f"cannot write {target}: it is a file, not a directory (choose another "
                       f"--out)")
    if target.is_dir():
        other = [p.name for p in target.iterdir()
                 if not re.fullmatch(r"part-\d+\.parquet", p.name)]
        if other:
            raise AweError(f"{target} holds other files than parquet shards ({other[0]}); "
                           f"choose another --out, or remove the directory")


class _ShardWriter:
    """Tables in, parquet shards of at most ``shard_rows`` rows out (one row group a table)."""

    def __init__(self, directory: Path, schema: pa.Schema, shard_rows: int | None):
        self.directory, self.schema, self.shard_rows = directory, schema, shard_rows
        self.names: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0  # in the open shard

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None or (self.shard_rows and self._rows >= self.shard_rows):
                self._next()
            room = table.num_rows if not self.shard_rows else self.shard_rows - self._rows
            part, table = table.slice(0, room), table.slice(room)
            self._writer.write_table(part, row_group_size=max(part.num_rows, 1))
            self._rows += part.num_rows

    def _next(self) -> None:
        self.close()
        name = f"part-{len(self.names):05d}.parquet"
        # dictionary pages for the labels only: on feature ids they tripled the write time
        # for 10% smaller files
        self._writer = pq.ParquetWriter(self.directory / name, self.schema,
                                        use_dictionary=["labels"], write_page_checksum=True)
        self.names.append(name)
        self._rows = 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ----------------------------------------------------------------------------- header


_HEADER = re.compile(rb"\s*(\d+)\s+(\d+)\s+(\d+)\s*")


def _content(line: bytes) -> bytes:
    """The line without its comment and surrounding whitespace."""
    return line.split(b"#", 1)[0].strip()


def _read_header(path: Path) -> tuple[int, int, int] | None:
    """``(rows, features, labels)`` when the first line with content is an ``N D L`` header."""
    with _open(path) as fh, _reading(path):
        for line in fh:
            text = _content(line)
            if text:
                match = _HEADER.fullmatch(text)
                return tuple(int(v) for v in match.groups()) if match else None
    return None


# id 0 after a space, a tab or a newline; separate patterns with a literal prefix each, which
# the regex engine finds by a fast search (one pattern with alternatives was 20 times slower)
_ID_ZERO = [re.compile(rb" 0+:"), re.compile(rb"\t0+:"), re.compile(rb"\n0+:")]


def _has_feature_id_zero(path: Path, block_bytes: int = 1 << 24) -> bool:
    """Whether some feature id is 0: one pass over the bytes, no parsing."""
    tail = b"\n"  # the file's start is a line's start
    with _open(path) as fh, _reading(path):
        while block := fh.read(block_bytes):
            window = tail + block
            if any(pattern.search(window) for pattern in _ID_ZERO):
                return True
            tail = window[-64:]
            cut = min((i for i in map(tail.find, (b" ", b"\t", b"\n")) if i >= 0), default=-1)
            tail = tail[cut:] if cut >= 0 else b"x"  # from a token's start, never mid-token
    return False


# ----------------------------------------------------------------------------- parsing


class _State:
    """What the reader has seen so far, and the checks that need the whole file."""

    def __init__(self, path: Path, header: tuple[int, int, int] | None,
                 zero_based: bool | None):
        self.path, self.header, self.zero_based = path, header, zero_based
        self.rows = 0
        self.nnz = 0
        self.rows_without_labels = 0
        self.max_id = -1
        self.saw_zero = False
        self.labels = np.zeros(0, dtype=np.int64)  # sorted distinct labels
        self.header_line: int | None = None  # the line the header was read from

    def finish(self) -> None:
        if self.header is not None and self.rows != self.header[0] and self.rows:
            raise DataError(f"the header says {self.header[0]} rows but the file holds "
                            f"{self.rows}", file=str(self.path),
                            hint="the file is truncated, or the header is wrong: fix or delete "
                                 "the first line")


def _error(path: Path, line: int, message: str, hint: str) -> DataError:
    """One error naming the file and the line (counted from 1, the header included)."""
    error = DataError(message, file=f"{path}, line {line}", hint=hint)
    error.file = str(path)
    error.line = line
    return error


def _tables(fh: BinaryIO, state: _State, block_lines: int) -> Iterator[pa.Table]:
    first_line = 1  # the number of the block's first line in the file
    while True:
        with _reading(state.path):
            raw = list(itertools.islice(fh, block_lines))
        if not raw:
            return
        table = _parse_block(raw, first_line, state)
        first_line += len(raw)
        if table is not None:
            yield table


def _parse_block(raw: list[bytes], first_line: int, state: _State) -> pa.Table | None:
    blob = b"".join(raw)
    if b"\t" in blob or b"\r" in blob:
        blob = blob.replace(b"\t", b" ").replace(b"\r", b" ")
    lines = blob.split(b"\n")
    if len(lines) > len(raw):  # the last line ended with a newline
        lines.pop()
    if b"#" in blob:
        lines = [line.split(b"#", 1)[0] for line in lines]
    label_texts: list[bytes] = []
    feature_texts: list[bytes] = []
    line_index: list[int] = []
    for i, line in enumerate(lines):
        if not line or line.isspace():
            continue
        if state.header is not None and state.header_line is None:
            state.header_line = first_line + i  # the header is the first line with content
            continue
        if line[0] == 32:  # a space: no labels
            labels, features = b"", line
        else:
            labels, _, features = line.partition(b" ")
            if b":" in labels:  # a feature: no labels
                labels, features = b"", line
        label_texts.append(labels)
        feature_texts.append(features)
        line_index.append(i)
    if not line_index:
        return None
    line_no = np.asarray(line_index, dtype=np.int64) + first_line
    n_ids = np.fromiter(map(bytes.count, feature_texts, itertools.repeat(b":")),
                        dtype=np.int64, count=len(feature_texts))
    n_labels = np.fromiter((t.count(b",") + 1 if t else 0 for t in label_texts),
                           dtype=np.int64, count=len(label_texts))
    try:
        ids, values = _parse_features(feature_texts, int(n_ids.sum()))
        labels = _parse_labels(label_texts, int(n_labels.sum()))
    except (pa.ArrowInvalid, ValueError) as exc:
        _explain(state.path, label_texts, feature_texts, line_no)
        raise DataError(f"cannot parse lines {line_no[0]}..{line_no[-1]} ({exc})",
                        file=str(state.path), hint=_FEATURES_HINT) from exc
    _check_features(state, ids, values, n_ids, line_no)
    n = len(line_no)
    table = pa.table({
        "id": pa.array(np.arange(state.rows, state.rows + n, dtype=np.int64)),
        "feature_ids": list_array(ids, n_ids, pa.int64()),
        "feature_values": list_array(values, n_ids, pa.float32()),
        "labels": list_array(labels, n_labels, pa.int64()),
    })
    state.rows += n
    state.nnz += len(ids)
    state.rows_without_labels += int((n_labels == 0).sum())
    if len(labels):
        state.labels = np.union1d(state.labels, labels)
    return table


_CSV_PARSE = pacsv.ParseOptions(quote_char=False, ignore_empty_lines=True)


def _read_numbers(text: bytes, types: dict[str, pa.DataType]) -> pa.Table:
    return pacsv.read_csv(
        io.BytesIO(text), pacsv.ReadOptions(column_names=list(types)), _CSV_PARSE,
        pacsv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False))


def _parse_features(texts: list[bytes], expected: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ``id:value`` of the block: one CSV row per pair, parsed by arrow in one call."""
    if expected == 0:
        if any(t.strip() for t in texts):
            raise ValueError("a feature without ':'")
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    text = b" ".join(texts).replace(b" ", b"\n").replace(b":", b",")
    table = _read_numbers(text, {"id": pa.int64(), "value": pa.float64()})
    if table.num_rows != expected:
        raise ValueError(f"{table.num_rows} features for {expected} ':'")
    ids = table.column("id").to_numpy()
    with np.errstate(over="ignore"):  # beyond float32 becomes inf: rejected by the checks
        values = table.column("value").to_numpy().astype(np.float32)
    return ids, values


def _parse_labels(texts: list[bytes], expected: int) -> np.ndarray:
    if expected == 0:
        return np.zeros(0, dtype=np.int64)
    # one label a CSV row; a leading '+' (LIBSVM's "+1") is dropped, which arrow does not accept
    text = b"\n" + b"\n".join(texts).replace(b",", b"\n")
    text = text.replace(b"\n+", b"\n")
    table = _read_numbers(text, {"label": pa.int64()})
    if table.num_rows != expected:
        raise ValueError(f"{table.num_rows} labels for {expected}")
    return table.column("label").to_numpy()


def _check_features(state: _State, ids: np.ndarray, values: np.ndarray, n_ids: np.ndarray,
                    line_no: np.ndarray) -> None:
    """Ids within range for the header and the ids' base, values finite."""
    if not len(ids):
        return
    ends = np.cumsum(n_ids)

    def fail(bad: np.ndarray, message: str, hint: str) -> None:
        entry = int(np.flatnonzero(bad)[0])
        line = int(line_no[np.searchsorted(ends, entry, side="right")])
        raise _error(state.path, line, message.format(id=int(ids[entry])), hint)

    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        fail(ids < 0, "negative feature id {id}", "feature ids are integers >= 0")
    if high > MAX_FEATURE_ID:
        fail(ids > MAX_FEATURE_ID, "feature id {id} is too large (at most "
             f"{MAX_FEATURE_ID})", "feature ids index the model's rows: remap them to 0..n-1")
    if low == 0:
        state.saw_zero = True
        if state.zero_based is False:
            fail(ids == 0, "feature id 0 in a file read as one-based",
                 "one-based ids start at 1; convert it as zero-based if they start at 0")
    if state.header is not None:
        width = state.header[1]
        limit = width - 1 if state.zero_based else width
        if high > limit:
            base = "zero" if state.zero_based else "one"
            hint = "fix the header's second number, the feature count"
            if state.zero_based:
                hint += ", or convert the file as one-based if its ids start at 1"
            fail(ids > limit, "feature id {id} is beyond the header's " f"{width} features "
                 f"({base}-based ids go up to {limit})", hint)
    state.max_id = max(state.max_id, high)
    finite = np.isfinite(values)
    if not finite.all():
        fail(~finite, "feature {id} has a value that is NaN, infinite or beyond float32",
             "replace the value or drop the feature")


_INT = re.compile(rb"[+-]?\d+")
_UINT = re.compile(rb"\d+")
_FLOAT = re.compile(rb"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf|infinity)",
                    re.IGNORECASE)


def _explain(path: Path, label_texts: list[bytes], feature_texts: list[bytes],
             line_no: np.ndarray) -> None:
    """Raise the first bad line's error; return if the lines look well formed."""
    for labels, features, line in zip(label_texts, feature_texts, line_no.tolist(),
                                      strict=True):
        if labels:
            for token in labels.split(b","):
                if not _INT.fullmatch(token):
                    what = "an empty label" if not token else f"label {_show(token)}"
                    raise _error(path, line, f"{what} is not an integer", _LABELS_HINT)
        for token in features.split():
            fid, colon, value = token.partition(b":")
            if not colon:
                raise _error(path, line, f"{_show(token)} is not a feature id:value",
                             _FEATURES_HINT)
            if not _UINT.fullmatch(fid):
                raise _error(path, line, f"feature id {_show(fid)} in {_show(token)} is not an "
                             f"integer >= 0", _FEATURES_HINT)
            if not _FLOAT.fullmatch(value):
                raise _error(path, line, f"feature value {_show(value)} in {_show(token)} is "
                             f"not a number", _FEATURES_HINT)


def _show(token: bytes) -> str:
    text = token.decode("utf-8", errors="replace")
    return repr(text if len(text) <= 40 else text[:37] + "...")
