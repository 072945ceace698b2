"""The parquet reader (awe.io.reader): known answers, and one clear error per kind of bad input."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from awe.csr import Csr, contains
from awe.errors import AweError, DataError
from awe.io.reader import (
    Columns,
    Examples,
    InputSchema,
    LabelVocab,
    load_examples,
    resolve_files,
    scan,
)

F32 = pa.list_(pa.float32())
F64 = pa.list_(pa.float64())
I64 = pa.list_(pa.int64())
I32 = pa.list_(pa.int32())
STR = pa.list_(pa.string())

DENSE = {"features": F32, "labels": STR}
SPARSE = {"feature_ids": I64, "feature_values": F32, "labels": STR}


def dense_rows(n: int, width: int = 3, start: int = 0) -> list[list[float]]:
    return [[float(start + i * width + j) for j in range(width)] for i in range(n)]


def read_train(path, columns: Columns | None = None, batch_rows: int = 65_536) -> Examples:
    """What training does: scan for schema and vocabulary, then load with labels required."""
    found = scan(path, columns or Columns(), batch_rows=batch_rows)
    return load_examples(path, found.schema, found.vocab, batch_rows=batch_rows)


def csr_rows(csr: Csr) -> list[list[int]]:
    return [csr.indices[csr.indptr[i]:csr.indptr[i + 1]].tolist() for i in range(csr.n_rows)]


def csr_values(csr: Csr) -> list[list[float]]:
    return [csr.values[csr.indptr[i]:csr.indptr[i + 1]].tolist() for i in range(csr.n_rows)]


# ----------------------------------------------------------------------------- known answers


def test_dense_known_answer(tmp_path, write):
    f = write(tmp_path / "d.parquet", {"features": [[1, 2, 3], [4, 5, 6], [7, 8, 9.5]],
                                       "labels": [["b", "a"], ["c"], ["a"]]}, DENSE)
    found = scan(f)
    assert found.schema.kind == "dense" and found.schema.n_features == 3
    assert found.vocab.labels == ["a", "b", "c"] and found.vocab.kind == "string"
    assert found.n_rows == 3 and found.task is None
    assert found.mean_sq_norm == (14 + 77 + 49 + 64 + 9.5**2) / 3  # mean |x|^2
    ex = load_examples(f, found.schema, found.vocab)
    assert len(ex) == 3 and ex.sparse is None and ex.exclude is None and ex.ids is None
    assert ex.dense.dtype == np.float32
    np.testing.assert_array_equal(ex.dense, [[1, 2, 3], [4, 5, 6], [7, 8, 9.5]])
    assert csr_rows(ex.labels) == [[0, 1], [2], [0]]
    np.testing.assert_array_equal(ex.n_unknown, [0, 0, 0])


def test_dense_fixed_size_list(tmp_path, write):
    f = write(tmp_path / "d.parquet", {"features": [[1, 2], [3, 4]], "labels": [["x"], ["y"]]},
              {"features": pa.list_(pa.float32(), 2), "labels": STR})
    ex = read_train(f)
    assert ex.schema.n_features == 2
    np.testing.assert_array_equal(ex.dense, [[1, 2], [3, 4]])


def test_sparse_known_answer(tmp_path, write):
    f = write(tmp_path / "s.parquet", {"feature_ids": [[0, 4], [], [2, 1, 7]],
                                       "feature_values": [[0.5, 2.0], [], [1.0, -3.0, 4.0]],
                                       "labels": [["a"], ["b"], ["a", "b"]]}, SPARSE)
    found = scan(f)
    assert found.schema.kind == "sparse" and found.schema.n_features == 8  # max id + 1
    assert found.mean_sq_norm == (0.25 + 4 + 0 + 1 + 9 + 16) / 3
    ex = load_examples(f, found.schema, found.vocab)
    assert ex.dense is None
    assert ex.sparse.indptr.tolist() == [0, 2, 2, 5]
    assert csr_rows(ex.sparse) == [[0, 4], [], [2, 1, 7]]
    assert csr_values(ex.sparse) == [[0.5, 2.0], [], [1.0, -3.0, 4.0]]
    assert ex.sparse.values.dtype == np.float32
    assert csr_rows(ex.labels) == [[0], [1], [0, 1]]


def test_sparse_values_default_to_one(tmp_path, write):
    f = write(tmp_path / "s.parquet", {"feature_ids": [[3], [0, 1]], "labels": [["a"], ["a"]]},
              {"feature_ids": I32, "labels": STR})
    ex = read_train(f)
    assert scan(f).mean_sq_norm == 1.5  # one and two ids of value 1
    assert ex.schema.n_features == 4
    assert csr_rows(ex.sparse) == [[3], [0, 1]]
    assert csr_values(ex.sparse) == [[1.0], [1.0, 1.0]]
    assert ex.sparse.values.dtype == np.float32


@pytest.mark.parametrize("labels, arrow_type, vocab, expected", [
    ([["b", "a"], ["c"], ["a"]], STR, ["a", "b", "c"], [[0, 1], [2], [0]]),
    ([[20, 3], [100], [3]], I64, [3, 20, 100], [[0, 1], [2], [0]]),  # numeric, not lexical, order
    (["b", "c", "a"], pa.string(), ["a", "b", "c"], [[1], [2], [0]]),
    ([20, 3, 100], pa.int32(), [3, 20, 100], [[1], [0], [2]]),
], ids=["list-string", "list-int", "scalar-string", "scalar-int"])
def test_label_types(tmp_path, write, labels, arrow_type, vocab, expected):
    f = write(tmp_path / "l.parquet", {"features": dense_rows(3), "labels": labels},
              {"features": F32, "labels": arrow_type})
    found = scan(f)
    assert found.vocab.labels == vocab
    assert found.vocab.kind == ("int" if isinstance(vocab[0], int) else "string")
    ex = load_examples(f, found.schema, found.vocab)
    assert csr_rows(ex.labels) == expected


def test_duplicate_labels_count_once(tmp_path, write):
    f = write(tmp_path / "l.parquet", {"features": dense_rows(2),
                                       "labels": [["b", "a", "b", "b"], ["a", "a"]]}, DENSE)
    ex = read_train(f)
    assert csr_rows(ex.labels) == [[0, 1], [0]]
    f2 = write(tmp_path / "l2.parquet", {"features": dense_rows(2),
                                         "labels": [["z", "z", "b"], ["a"]]}, DENSE)
    ex = load_examples(f2, ex.schema, LabelVocab(["a", "b"]), require_labels=False)
    assert csr_rows(ex.labels) == [[1], [0]]
    assert ex.n_unknown.tolist() == [2, 0]  # each unknown listing counts (as a miss)


def _three_files(tmp_path, write):
    root = tmp_path / "data"
    # written out of order: reading must follow the sorted file names, then row order
    write(root / "part-1.parquet", {"features": dense_rows(2, start=100), "labels": [["b"], ["c"]],
                                    "id": [2, 3]}, {**DENSE, "id": pa.int64()})
    write(root / "part-0.parquet", {"features": dense_rows(2), "labels": [["a"], ["b"]],
                                    "id": [0, 1]}, {**DENSE, "id": pa.int64()})
    write(root / "part-2.parquet", {"features": dense_rows(1, start=200), "labels": [["a"]],
                                    "id": [4]}, {**DENSE, "id": pa.int64()})
    (root / "notes.txt").write_text("not parquet")
    (root / ".hidden.parquet").write_bytes(b"junk")
    return root


@pytest.mark.parametrize("how", ["directory", "glob"])
def test_multiple_files_keep_row_order(tmp_path, write, how):
    root = _three_files(tmp_path, write)
    path = root if how == "directory" else str(root / "part-*.parquet")
    assert [p.name for p in resolve_files(path)] == [
        "part-0.parquet", "part-1.parquet", "part-2.parquet"]
    for batch_rows in (1, 65_536):
        ex = read_train(path, batch_rows=batch_rows)
        assert ex.ids.to_pylist() == [0, 1, 2, 3, 4]
        np.testing.assert_array_equal(
            ex.dense, dense_rows(2) + dense_rows(2, start=100) + dense_rows(1, start=200))
        assert csr_rows(ex.labels) == [[0], [1], [1], [2], [0]]


def test_directory_is_searched_recursively(tmp_path, write):
    write(tmp_path / "d" / "b" / "x.parquet", {"features": dense_rows(1, start=9),
                                              "labels": [["q"]]}, DENSE)
    write(tmp_path / "d" / "a.parquet", {"features": dense_rows(1), "labels": [["p"]]}, DENSE)
    ex = read_train(tmp_path / "d")
    np.testing.assert_array_equal(ex.dense, dense_rows(1) + dense_rows(1, start=9))


def test_custom_column_names(tmp_path, write):
    cols = Columns(feature_ids="fid", feature_values="fval", labels="tags", exclude="seen",
                   id="key")
    f = write(tmp_path / "c.parquet", {
        "fid": [[1], [0, 2]], "fval": [[2.0], [3.0, 4.0]], "tags": [["t1"], ["t2", "t1"]],
        "seen": [["t2"], []], "key": ["u", "v"],
        # decoys under the default names must be ignored
        "labels": [["nope"], ["nope"]], "feature_ids": [[99], [99]],
    }, {"fid": I64, "fval": F32, "tags": STR, "seen": STR, "labels": STR, "feature_ids": I64})
    found = scan(f, cols)
    assert found.schema.columns == cols and found.schema.kind == "sparse"
    assert found.schema.n_features == 3 and found.vocab.labels == ["t1", "t2"]
    ex = load_examples(f, found.schema, found.vocab)
    assert csr_rows(ex.sparse) == [[1], [0, 2]] and csr_values(ex.sparse) == [[2.0], [3.0, 4.0]]
    assert csr_rows(ex.labels) == [[0], [0, 1]]
    assert csr_rows(ex.exclude) == [[1], []]
    assert ex.ids.to_pylist() == ["u", "v"]
    assert InputSchema.from_dict(found.schema.to_dict()) == found.schema


def test_exclude_column(tmp_path, write):
    f = write(tmp_path / "e.parquet", {
        "features": dense_rows(3), "labels": [["a"], ["b"], ["c"]],
        "exclude": [["c", "a", "c"], None, ["zzz", "b"]],
    }, {**DENSE, "exclude": STR})
    ex = read_train(f)
    assert ex.exclude is not None
    # sorted, de-duplicated, unknown exclusions dropped, null is none
    assert csr_rows(ex.exclude) == [[0, 2], [], [1]]
    assert ex.n_unknown.tolist() == [0, 0, 0]  # exclusions never count as truth


def test_unknown_labels_at_evaluation(tmp_path, write):
    f = write(tmp_path / "t.parquet", {
        "features": dense_rows(4), "labels": [["a", "new"], ["new", "newer"], [], None],
    }, DENSE)
    schema = InputSchema("dense", 3)
    ex = load_examples(f, schema, LabelVocab(["a", "b"]), require_labels=False)
    assert csr_rows(ex.labels) == [[0], [], [], []]
    assert ex.n_unknown.tolist() == [1, 2, 0, 0]
    # int vocabulary, int labels outside it
    f2 = write(tmp_path / "t2.parquet", {"features": dense_rows(2), "labels": [5, 7]},
               {"features": F32, "labels": pa.int64()})
    ex = load_examples(f2, schema, LabelVocab([1, 5]), require_labels=False)
    assert csr_rows(ex.labels) == [[1], []] and ex.n_unknown.tolist() == [0, 1]


@pytest.mark.parametrize("arrow_type, labels, vocab", [
    (pa.string(), ["b", None, "zz", "a"], ["a", "b"]),
    (pa.int64(), [2, None, 99, 1], [1, 2]),
])
def test_scalar_labels_with_nulls(tmp_path, write, arrow_type, labels, vocab):
    # a null scalar is a row without labels (regression: it used to crash with an IndexError)
    f = write(tmp_path / "n.parquet", {"features": dense_rows(4), "labels": labels},
              {"features": F32, "labels": arrow_type})
    ex = load_examples(f, InputSchema("dense", 3), LabelVocab(vocab), require_labels=False,
                       batch_rows=3)
    assert csr_rows(ex.labels) == [[1], [], [], [0]]
    assert ex.n_unknown.tolist() == [0, 0, 1, 0]


def test_labels_optional_when_scoring(tmp_path, write):
    f = write(tmp_path / "t.parquet", {"features": dense_rows(2)}, DENSE)
    ex = load_examples(f, InputSchema("dense", 3), LabelVocab(["a"]), require_labels=False)
    assert len(ex) == 2 and ex.labels.nnz == 0 and ex.n_unknown.tolist() == [0, 0]


def test_id_column_and_take(tmp_path, write):
    f = write(tmp_path / "i.parquet", {
        "features": dense_rows(4), "labels": [["a"], ["b"], ["a", "b"], ["c"]],
        "exclude": [["b"], [], ["c"], ["a"]], "id": ["r0", "r1", "r2", "r3"],
    }, {**DENSE, "exclude": STR})
    ex = read_train(f)
    assert ex.ids.to_pylist() == ["r0", "r1", "r2", "r3"]
    sub = ex.take(np.array([3, 0, 3]))
    assert len(sub) == 3
    assert sub.ids.to_pylist() == ["r3", "r0", "r3"]
    np.testing.assert_array_equal(sub.dense, ex.dense[[3, 0, 3]])
    assert csr_rows(sub.labels) == [[2], [0], [2]]
    assert csr_rows(sub.exclude) == [[0], [1], [0]]
    assert sub.n_unknown.tolist() == [0, 0, 0]
    assert sub.schema == ex.schema and sub.task == ex.task


def test_take_sparse(tmp_path, write):
    f = write(tmp_path / "s.parquet", {"feature_ids": [[0, 4], [], [2, 1, 7]],
                                       "feature_values": [[0.5, 2.0], [], [1.0, -3.0, 4.0]],
                                       "labels": [["a"], ["b"], ["a", "b"]]}, SPARSE)
    sub = read_train(f).take(np.array([2, 1]))
    assert csr_rows(sub.sparse) == [[2, 1, 7], []]
    assert csr_values(sub.sparse) == [[1.0, -3.0, 4.0], []]
    assert sub.dense is None and sub.ids is None and sub.exclude is None


def test_task_metadata(tmp_path):
    from awe.io.reader import TASK_METADATA_KEY
    from awe.io.writer import write_table
    table = pa.table({"features": pa.array(dense_rows(1), F32), "labels": pa.array([["a"]], STR)})
    write_table(tmp_path / "r.parquet", table, {TASK_METADATA_KEY: b"recommendation"})
    assert scan(tmp_path / "r.parquet").task == "recommendation"
    assert read_train(tmp_path / "r.parquet").task == "recommendation"


# ----------------------------------------------------------------------------- Csr


def _random_csr(rng, n_rows=12, n_cols=9, with_values=True) -> tuple[Csr, list[list[int]]]:
    rows = [sorted(rng.choice(n_cols, size=rng.integers(0, 5), replace=False).tolist())
            for _ in range(n_rows)]
    lengths = np.array([len(r) for r in rows])
    flat = np.array([i for r in rows for i in r], dtype=np.int64)
    values = rng.normal(size=len(flat)).astype(np.float32) if with_values else None
    return Csr.from_lengths(lengths, flat, values), rows


def test_csr_against_python_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):
        csr, rows = _random_csr(rng)
        vals = csr_values(csr)
        assert csr.n_rows == len(rows) and csr.nnz == sum(map(len, rows))
        assert csr.lengths.tolist() == [len(r) for r in rows]
        assert csr.row_of_entry().tolist() == [i for i, r in enumerate(rows) for _ in r]

        pick = rng.integers(0, len(rows), size=rng.integers(0, 15))
        expected_pos = [p for i in pick for p in range(csr.indptr[i], csr.indptr[i + 1])]
        assert csr.entry_positions(pick).tolist() == expected_pos
        taken = csr.take(pick)
        assert csr_rows(taken) == [rows[i] for i in pick]
        assert csr_values(taken) == [vals[i] for i in pick]

        keep = rng.random(csr.nnz) < 0.5
        kept = csr.select_entries(keep)
        it = iter(keep.tolist())
        expected = [[x for x in r if next(it)] for r in rows]
        assert csr_rows(kept) == expected and kept.n_rows == csr.n_rows
        it = iter(keep.tolist())
        assert csr_values(kept) == [[v for v in r if next(it)] for r in vals]

        keys = csr.keys(9)
        assert keys.tolist() == [i * 9 + x for i, r in enumerate(rows) for x in r]
        assert np.all(np.diff(keys) > 0)  # sorted ids within rows -> strictly sorted keys
        queries = rng.integers(-3, 12 * 9 + 3, size=(4, 7))
        key_set = set(keys.tolist())
        np.testing.assert_array_equal(
            contains(keys, queries), [[q in key_set for q in row] for row in queries.tolist()])


def test_csr_edge_cases():
    empty = Csr.empty(3)
    assert empty.n_rows == 3 and empty.nnz == 0 and csr_rows(empty) == [[], [], []]
    assert empty.take(np.array([2, 2])).n_rows == 2
    assert empty.entry_positions(np.array([0, 1])).tolist() == []
    assert contains(np.zeros(0, dtype=np.int64), np.array([[1, 2]])).tolist() == [[False, False]]
    assert Csr.concat([]).n_rows == 0
    a = Csr.from_lengths(np.array([1, 0]), np.array([4]), np.array([1.5], np.float32))
    b = Csr.from_lengths(np.array([2]), np.array([0, 3]), np.array([2.0, 3.0], np.float32))
    both = Csr.concat([a, b])
    assert csr_rows(both) == [[4], [], [0, 3]] and csr_values(both) == [[1.5], [], [2.0, 3.0]]
    unsorted = Csr.from_lengths(np.array([3, 2]), np.array([5, 1, 3, 2, 0]),
                                np.array([5, 1, 3, 2, 0], np.float32))
    s = unsorted.sorted_within_rows()
    assert csr_rows(s) == [[1, 3, 5], [0, 2]] and csr_values(s) == [[1, 3, 5], [0, 2]]


# ----------------------------------------------------------------------------- errors
#
# Each case builds its files under tmp_path and returns (call, file, row, column): the call must
# raise DataError naming ``file`` (and ``row`` within that file, ``column`` when not None).
# file=None marks the cases with no file to name (AweError naming the path given instead).


def _err_missing_feature_column(tmp, write):
    f = write(tmp / "a.parquet", {"labels": [["a"]], "other": [[1.0]]}, {"labels": STR})
    return lambda: scan(f), f, None, "features"


def _err_missing_feature_column_second_file(tmp, write):
    write(tmp / "d" / "a.parquet", {"features": dense_rows(2), "labels": [["a"], ["b"]]}, DENSE)
    f = write(tmp / "d" / "b.parquet", {"labels": [["a"]], "other": [[1.0]]}, {"labels": STR})
    return lambda: read_train(tmp / "d"), f, None, "features"


def _err_missing_labels_column(tmp, write):
    f = write(tmp / "a.parquet", {"features": dense_rows(2)}, DENSE)
    return lambda: scan(f), f, None, "labels"


def _err_missing_labels_column_at_load(tmp, write):
    f = write(tmp / "a.parquet", {"features": dense_rows(2)}, DENSE)
    return (lambda: load_examples(f, InputSchema("dense", 3), LabelVocab(["a"]))), f, None, "labels"


def _err_features_as_strings(tmp, write):
    f = write(tmp / "a.parquet", {"features": [["1", "2"], ["3", "4"]], "labels": [["a"], ["b"]]},
              {"features": STR, "labels": STR})
    return lambda: read_train(f), f, None, "features"


def _err_features_scalar(tmp, write):
    f = write(tmp / "a.parquet", {"features": [1.0, 2.0], "labels": [["a"], ["b"]]},
              {"features": pa.float32(), "labels": STR})
    return lambda: read_train(f), f, None, "features"


def _err_feature_ids_as_floats(tmp, write):
    f = write(tmp / "a.parquet", {"feature_ids": [[1.0], [2.0]], "labels": [["a"], ["b"]]},
              {"feature_ids": F32, "labels": STR})
    return lambda: read_train(f), f, None, "feature_ids"


def _err_labels_as_floats(tmp, write):
    f = write(tmp / "a.parquet", {"features": dense_rows(2), "labels": [[1.5], [2.5]]},
              {"features": F32, "labels": F64})
    return lambda: read_train(f), f, None, "labels"


def _err_labels_as_floats_at_eval(tmp, write):
    f = write(tmp / "a.parquet", {"features": dense_rows(2), "labels": [1.5, 2.5]},
              {"features": F32, "labels": pa.float64()})
    return (lambda: load_examples(f, InputSchema("dense", 3), LabelVocab([1, 2]),
                                  require_labels=False)), f, None, "labels"


def _ragged(n, short_row, width=3):
    rows = dense_rows(n, width)
    rows[short_row] = rows[short_row][:-1]
    return rows


def _err_ragged_dense(tmp, write):
    f = write(tmp / "a.parquet", {"features": _ragged(6, 3), "labels": [["a"]] * 6}, DENSE)
    return lambda: read_train(f, batch_rows=2), f, 3, "features"


def _err_ragged_dense_second_file(tmp, write):
    write(tmp / "d" / "a.parquet", {"features": dense_rows(5), "labels": [["a"]] * 5}, DENSE)
    f = write(tmp / "d" / "b.parquet", {"features": _ragged(6, 3), "labels": [["a"]] * 6}, DENSE)
    return lambda: read_train(tmp / "d", batch_rows=2), f, 3, "features"


def _err_width_differs_from_model(tmp, write):
    f = write(tmp / "a.parquet", {"features": dense_rows(3, width=4), "labels": [["a"]] * 3},
              DENSE)
    return (lambda: load_examples(f, InputSchema("dense", 3), LabelVocab(["a"]),
                                  require_labels=False)), f, 0, "features"


def _with_value(value, row, col=1, n=5):
    rows = dense_rows(n)
    rows[row][col] = value
    return rows


def _err_nan_feature(tmp, write):
    f = write(tmp / "a.parquet", {"features": _with_value(math.nan, 2), "labels": [["a"]] * 5},
              DENSE)
    return lambda: read_train(f), f, 2, "features"


def _err_nan_feature_second_file(tmp, write):
    write(tmp / "d" / "a.parquet", {"features": dense_rows(4), "labels": [["a"]] * 4}, DENSE)
    f = write(tmp / "d" / "b.parquet", {"features": _with_value(math.nan, 3),
                                        "labels": [["a"]] * 5}, DENSE)
    return lambda: read_train(tmp / "d", batch_rows=2), f, 3, "features"


def _err_inf_feature(tmp, write):
    f = write(tmp / "a.parquet", {"features": _with_value(-math.inf, 4, col=0),
                                  "labels": [["a"]] * 5}, DENSE)
    return lambda: read_train(f), f, 4, "features"


def _err_float64_overflows_float32(tmp, write):
    f = write(tmp / "a.parquet", {"features": _with_value(1e300, 1), "labels": [["a"]] * 5},
              {"features": F64, "labels": STR})

    def call():
        with np.errstate(over="ignore"):  # numpy warns on the cast to float32; awe then rejects
            return read_train(f)
    return call, f, 1, "features"


def _err_null_in_feature_list(tmp, write):
    f = write(tmp / "a.parquet", {"features": _with_value(None, 3), "labels": [["a"]] * 5}, DENSE)
    return lambda: read_train(f), f, 3, "features"


def _err_null_feature_row(tmp, write):
    rows = dense_rows(5)
    rows[2] = None
    f = write(tmp / "a.parquet", {"features": rows, "labels": [["a"]] * 5}, DENSE)
    return lambda: read_train(f), f, 2, "features"


def _err_null_in_sparse_ids(tmp, write):
    f = write(tmp / "a.parquet", {"feature_ids": [[0], [1, 2], [3, None]],
                                  "labels": [["a"]] * 3}, {"feature_ids": I64, "labels": STR})
    return lambda: read_train(f), f, 2, "feature_ids"


def _err_negative_feature_id(tmp, write):
    f = write(tmp / "a.parquet", {"feature_ids": [[0, 1], [2], [3, -1], [0]],
                                  "labels": [["a"]] * 4}, {"feature_ids": I64, "labels": STR})
    return lambda: read_train(f), f, 2, "feature_ids"


def _err_negative_feature_id_at_load(tmp, write):
    f = write(tmp / "a.parquet", {"feature_ids": [[0, 1], [2], [3], [0, -5]],
                                  "labels": [["a"]] * 4}, {"feature_ids": I64, "labels": STR})
    return (lambda: load_examples(f, InputSchema("sparse", 10), LabelVocab(["a"]),
                                  batch_rows=3)), f, 3, "feature_ids"


def _err_feature_id_out_of_range(tmp, write):
    f = write(tmp / "a.parquet", {"feature_ids": [[0, 1], [2, 9], [3]], "labels": [["a"]] * 3},
              {"feature_ids": I64, "labels": STR})
    return (lambda: load_examples(f, InputSchema("sparse", 9), LabelVocab(["a"]),
                                  require_labels=False)), f, 1, "feature_ids"


def _err_feature_id_out_of_range_second_file(tmp, write):
    write(tmp / "d" / "a.parquet", {"feature_ids": [[0], [1], [2]], "labels": [["a"]] * 3},
          {"feature_ids": I64, "labels": STR})
    f = write(tmp / "d" / "b.parquet", {"feature_ids": [[0], [1], [2], [3, 4], [4, 5]],
                                        "labels": [["a"]] * 5},
              {"feature_ids": I64, "labels": STR})
    return (lambda: load_examples(tmp / "d", InputSchema("sparse", 5), LabelVocab(["a"]),
                                  batch_rows=2)), f, 4, "feature_ids"


def _err_ids_values_length_mismatch(tmp, write):
    f = write(tmp / "a.parquet", {"feature_ids": [[0], [1, 2], [3, 4]],
                                  "feature_values": [[1.0], [1.0, 2.0], [1.0]],
                                  "labels": [["a"]] * 3}, SPARSE)
    return lambda: read_train(f), f, 2, "feature_values"


def _err_nan_in_feature_values(tmp, write):
    f = write(tmp / "a.parquet", {"feature_ids": [[0], [1, 2], [3, 4]],
                                  "feature_values": [[1.0], [1.0, math.nan], [1.0, 2.0]],
                                  "labels": [["a"]] * 3}, SPARSE)
    return lambda: read_train(f), f, 1, "feature_values"


def _err_inf_in_feature_values(tmp, write):
    f = write(tmp / "a.parquet", {"feature_ids": [[0], [1, 2], [3, 4]],
                                  "feature_values": [[1.0], [1.0, 2.0], [math.inf, 2.0]],
                                  "labels": [["a"]] * 3}, SPARSE)
    return lambda: read_train(f), f, 2, "feature_values"


def _err_empty_file(tmp, write):
    f = write(tmp / "a.parquet", {"features": [], "labels": []}, DENSE)
    return lambda: scan(f), f, None, None


def _err_empty_file_at_load(tmp, write):
    f = write(tmp / "a.parquet", {"features": [], "labels": []}, DENSE)
    return (lambda: load_examples(f, InputSchema("dense", 3), LabelVocab(["a"]),
                                  require_labels=False)), f, None, None


def _err_no_labels_at_all(tmp, write):
    f = write(tmp / "a.parquet", {"features": dense_rows(2), "labels": [[], None]}, DENSE)
    return lambda: scan(f), f, None, "labels"


def _err_dir_without_parquet(tmp, write):
    (tmp / "d").mkdir()
    (tmp / "d" / "readme.txt").write_text("x")
    return lambda: scan(tmp / "d"), None, None, None


def _err_glob_matches_nothing(tmp, write):
    write(tmp / "a.parquet", {"features": dense_rows(1), "labels": [["a"]]}, DENSE)
    return lambda: scan(str(tmp / "*.pq")), None, None, None


def _err_nonexistent_path(tmp, write):
    return lambda: scan(tmp / "missing.parquet"), None, None, None


def _err_corrupt_parquet(tmp, write):
    f = tmp / "a.parquet"
    f.write_bytes(np.random.default_rng(0).bytes(2000))
    return lambda: scan(f), f, None, None


def _err_corrupt_parquet_second_file(tmp, write):
    write(tmp / "d" / "a.parquet", {"features": dense_rows(2), "labels": [["a"], ["b"]]}, DENSE)
    f = tmp / "d" / "b.parquet"
    f.write_bytes(np.random.default_rng(1).bytes(2000))
    return (lambda: load_examples(tmp / "d", InputSchema("dense", 3), LabelVocab(["a", "b"]))), \
        f, None, None


def _err_truncated_parquet(tmp, write):
    good = write(tmp / "good.parquet", {"features": dense_rows(50), "labels": [["a"]] * 50}, DENSE)
    f = tmp / "a.parquet"
    data = good.read_bytes()
    f.write_bytes(data[:8] + b"\0" * (len(data) - 16) + data[-8:])  # footer length now wrong
    return lambda: scan(f), f, None, None


def _err_row_without_labels(tmp, write):
    f = write(tmp / "a.parquet", {"features": dense_rows(5),
                                  "labels": [["a"], ["b"], ["a"], [], ["b"]]}, DENSE)
    return lambda: read_train(f, batch_rows=2), f, 3, "labels"


def _err_row_with_null_label_second_file(tmp, write):
    write(tmp / "d" / "a.parquet", {"features": dense_rows(4), "labels": ["a", "b", "a", "b"]},
          {"features": F32, "labels": pa.string()})
    f = write(tmp / "d" / "b.parquet", {"features": dense_rows(3), "labels": ["a", "b", None]},
              {"features": F32, "labels": pa.string()})
    return lambda: read_train(tmp / "d"), f, 2, "labels"


def _err_labels_mix_ints_and_strings(tmp, write):
    write(tmp / "d" / "a.parquet", {"features": dense_rows(2), "labels": [[1], [2]]},
          {"features": F32, "labels": I64})
    f = write(tmp / "d" / "b.parquet", {"features": dense_rows(2), "labels": [["x"], ["y"]]},
              DENSE)
    return lambda: read_train(tmp / "d"), f, 0, "labels"


def _err_model_sparse_file_dense(tmp, write):
    f = write(tmp / "a.parquet", {"features": dense_rows(2), "labels": [["a"], ["b"]]}, DENSE)
    return (lambda: load_examples(f, InputSchema("sparse", 3), LabelVocab(["a", "b"]))), \
        f, None, None


def _err_model_dense_file_sparse(tmp, write):
    f = write(tmp / "a.parquet", {"feature_ids": [[0], [1]], "labels": [["a"], ["b"]]},
              {"feature_ids": I64, "labels": STR})
    return (lambda: load_examples(f, InputSchema("dense", 3), LabelVocab(["a", "b"]))), \
        f, None, None


def _err_string_labels_for_int_vocab(tmp, write):
    write(tmp / "d" / "a.parquet", {"features": dense_rows(2), "labels": [[1], [2]]},
          {"features": F32, "labels": I64})
    f = write(tmp / "d" / "b.parquet", {"features": dense_rows(2), "labels": [["1"], ["2"]]},
              DENSE)
    return (lambda: load_examples(tmp / "d", InputSchema("dense", 3), LabelVocab([1, 2]),
                                  require_labels=False)), f, 0, "labels"


ERROR_CASES = {name[len("_err_"):]: fn for name, fn in globals().items()
               if name.startswith("_err_")}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_gives_one_clear_error(tmp_path, write, case):
    call, file, row, column = ERROR_CASES[case](tmp_path, write)
    with pytest.raises(AweError) as info:
        call()
    exc, message = info.value, str(info.value)
    assert "\n" not in message
    if file is None:  # nothing to name but the path the user gave
        assert str(tmp_path) in message
        return
    assert isinstance(exc, DataError), f"{type(exc).__name__}: {message}"
    assert exc.file == str(file), message
    assert message.startswith(str(file)), message
    if row is not None:
        assert exc.row == row, message
        assert f"row {row}" in message
    if column is not None:
        assert f"'{column}'" in message, message


def test_errors_name_the_row_within_the_file_not_the_dataset(tmp_path, write):
    """The same bad row, found through a directory of two files and through the file alone."""
    call, file, row, _ = _err_nan_feature_second_file(tmp_path, write)
    with pytest.raises(DataError) as via_dir:
        call()
    with pytest.raises(DataError) as alone:
        read_train(file)
    assert via_dir.value.row == alone.value.row == row == 3
    assert via_dir.value.file == alone.value.file == str(file)
