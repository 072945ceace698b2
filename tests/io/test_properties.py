"""Property tests (hypothesis): the parquet reader and the ranking metrics on arbitrary input.

(a) Reader: random tables (column types, list lengths, NaN/inf, nulls, negative or huge ids,
    empty lists, dictionary-encoded labels, several row groups) written to parquet. ``scan`` and
    ``load_examples`` either succeed with a result that matches a plain-Python reading of the
    same table, or raise :class:`awe.errors.AweError` with a one-line message; never anything else.
(b) Metrics: random score matrices (ties, NaN, +-inf), exclusions and label sets through
    ``mask_excluded`` + ``top_k`` + ``RankingMetrics``: every metric lies in [0, 1] and equals a
    brute-force numpy reference. NaN scores rank last (as -inf: never chosen, never a hit).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from awe.csr import Csr
from awe.errors import AweError
from awe.io.reader import Examples, InputSchema, LabelVocab, load_examples, scan
from awe.io.validate import MAX_FEATURE_ID
from awe.ranking.metrics import METRICS, RankingMetrics
from awe.ranking.topk import mask_excluded, top_k

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ============================================================================ (a) the reader

FINITE = st.one_of(st.sampled_from([0.0, 1.0, -2.5]),
                   st.floats(width=32, allow_nan=False, allow_infinity=False))
ODD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 1e300])  # 1e300: inf in float32
LABEL_STRINGS = st.sampled_from(["a", "b", "c", "", "1", "zz"])
LABEL_INTS = st.integers(-2, 4)
NONE = st.none()

FEATURE_KINDS = ("list<f32>", "list<f64>", "list<i32>", "fixed<f32>", "large<f32>")
BAD_FEATURE_KINDS = ("f64", "list<str>", "none")
ID_KINDS = ("list<i64>", "list<i32>", "list<u64>")
BAD_ID_KINDS = ("list<f32>",)
LABEL_KINDS = ("list<str>", "list<i64>", "str", "i64", "dict<str>", "list<dict<str>>",
               "list<u64>", "large_list<str>")
BAD_LABEL_KINDS = ("none", "list<f64>")


class Rows:
    """Draws column values with a per-table defect rate: 0 for a clean table."""

    def __init__(self, draw, n: int, defects: float):
        self.draw, self.n, self.defects = draw, n, defects

    def odd(self) -> bool:
        return self.defects > 0 and self.draw(st.floats(0, 1)) < self.defects

    def value(self, good, bad=NONE):
        return self.draw(bad) if self.odd() else self.draw(good)

    def lists(self, good, bad=NONE, *, fixed: int | None = None, max_len=4,
              min_len=0) -> list:
        rows = []
        for _ in range(self.n):
            if self.odd():
                rows.append(None)
                continue
            length = fixed if fixed is not None else self.draw(st.integers(min_len, max_len))
            rows.append([self.value(good, bad) for _ in range(length)])
        return rows


def _pick(draw, rows: Rows, good: tuple, bad: tuple) -> str:
    return draw(st.sampled_from(bad)) if rows.odd() else draw(st.sampled_from(good))


@st.composite
def tables(draw) -> pa.Table:
    """A table under the contract's column names: clean, or with defects of every kind (nulls,
    NaN/inf, negative or huge ids, ragged or empty lists, wrong types, missing columns)."""
    n = draw(st.integers(0, 8))
    rows = Rows(draw, n, draw(st.sampled_from([0.0, 0.0, 0.03, 0.15])))
    floats = st.one_of(ODD_FLOATS, st.none())
    columns: dict[str, pa.Array] = {}
    if draw(st.booleans()):  # dense
        kind = _pick(draw, rows, FEATURE_KINDS, BAD_FEATURE_KINDS)
        width = draw(st.integers(1, 4)) if not rows.odd() else draw(st.integers(0, 1))
        fixed = width if kind == "fixed<f32>" or not rows.odd() else None
        if kind == "f64":
            columns["features"] = pa.array([rows.value(FINITE, floats) for _ in range(n)],
                                           pa.float64())
        elif kind == "list<str>":
            columns["features"] = pa.array(rows.lists(st.just("1.0"), fixed=fixed),
                                           pa.list_(pa.string()))
        elif kind != "none":
            good = st.integers(-5, 5) if kind == "list<i32>" else FINITE
            bad = st.none() if kind == "list<i32>" else floats
            arrow_type = {"list<f32>": pa.list_(pa.float32()), "list<f64>": pa.list_(pa.float64()),
                          "list<i32>": pa.list_(pa.int32()),
                          "fixed<f32>": pa.list_(pa.float32(), max(width, 1)),
                          "large<f32>": pa.large_list(pa.float32())}[kind]
            values = rows.lists(good, bad, fixed=max(width, 1) if kind == "fixed<f32>" else fixed)
            columns["features"] = pa.array(values, arrow_type)
    else:  # sparse
        kind = _pick(draw, rows, ID_KINDS, BAD_ID_KINDS)
        good = st.integers(0, 9)
        bad = {"list<i64>": st.sampled_from([-1, -7, MAX_FEATURE_ID + 1, 2**40, None]),
               "list<i32>": st.sampled_from([-1, None]),
               "list<u64>": st.sampled_from([2**63 + 5, None]),
               "list<f32>": st.none()}[kind]
        if kind == "list<f32>":
            good = st.floats(0, 5, width=32)
        arrow_type = {"list<i64>": pa.int64(), "list<i32>": pa.int32(),
                      "list<u64>": pa.uint64(), "list<f32>": pa.float32()}[kind]
        ids = rows.lists(good, bad)
        columns["feature_ids"] = pa.array(ids, pa.list_(arrow_type))
        if draw(st.booleans()):
            ragged = rows.odd()
            values = [None if r is None else
                      [rows.value(FINITE, floats)
                       for _ in range(draw(st.integers(0, 3)) if ragged else len(r))]
                      for r in ids]
            columns["feature_values"] = pa.array(values, pa.list_(pa.float32()))
    kind = _pick(draw, rows, LABEL_KINDS, BAD_LABEL_KINDS)
    if kind in ("str", "dict<str>"):
        array = pa.array([rows.value(LABEL_STRINGS) for _ in range(n)], pa.string())
        columns["labels"] = array.dictionary_encode() if kind == "dict<str>" else array
    elif kind == "i64":
        columns["labels"] = pa.array([rows.value(LABEL_INTS) for _ in range(n)], pa.int64())
    elif kind != "none":
        good = {"list<str>": LABEL_STRINGS, "list<i64>": LABEL_INTS, "list<f64>": st.floats(0, 3),
                "list<dict<str>>": LABEL_STRINGS, "list<u64>": st.integers(0, 4),
                "large_list<str>": LABEL_STRINGS}[kind]
        bad = st.sampled_from([2**63 + 1, None]) if kind == "list<u64>" else st.none()
        values = rows.lists(good, bad, max_len=3, min_len=0 if rows.defects else 1)
        value_type = {"list<str>": pa.string(), "list<i64>": pa.int64(),
                      "list<f64>": pa.float64(), "list<dict<str>>": pa.string(),
                      "list<u64>": pa.uint64(), "large_list<str>": pa.string()}[kind]
        if kind == "list<dict<str>>":
            flat = pa.array([v for r in values if r for v in r], pa.string()).dictionary_encode()
            offsets = np.cumsum([0] + [len(r) if r else 0 for r in values]).astype(np.int32)
            mask = pa.array([r is None for r in values], pa.bool_())
            columns["labels"] = pa.ListArray.from_arrays(pa.array(offsets), flat, mask=mask)
        elif kind == "large_list<str>":
            columns["labels"] = pa.array(values, pa.large_list(value_type))
        else:
            columns["labels"] = pa.array(values, pa.list_(value_type))
    if draw(st.booleans()):
        columns["id"] = pa.array(range(n), pa.int64())
    if not columns:
        columns["other"] = pa.array(range(n), pa.int64())
    return pa.table(columns)


def _column(table: pa.Table, name: str) -> list | None:
    return table.column(name).to_pylist() if name in table.column_names else None


def _expected_labels(table: pa.Table, vocab: LabelVocab) -> tuple[list[list[int]], list[int]]:
    """Plain Python: each row's known label ids (sorted, unique) and its count of unknown ones."""
    raw = _column(table, "labels")
    if raw is None:
        return [[] for _ in range(table.num_rows)], [0] * table.num_rows
    index = {label: i for i, label in enumerate(vocab.labels)}
    known, unknown = [], []
    for row in raw:
        items = [] if row is None else (row if isinstance(row, list) else [row])
        items = [str(v) if vocab.kind == "string" else v for v in items if v is not None]
        known.append(sorted({index[v] for v in items if v in index}))
        unknown.append(sum(v not in index for v in items))
    return known, unknown


def _rows(csr: Csr) -> list[list[int]]:
    return [csr.indices[csr.indptr[i]:csr.indptr[i + 1]].tolist() for i in range(csr.n_rows)]


def check_examples(ex: Examples, table: pa.Table, schema: InputSchema, vocab: LabelVocab,
                   require_labels: bool) -> None:
    """A successful read matches the table, row for row."""
    n = table.num_rows
    assert len(ex) == n and ex.labels.n_rows == n and len(ex.n_unknown) == n
    if schema.kind == "dense":
        assert ex.sparse is None and ex.dense.dtype == np.float32
        assert ex.dense.shape == (n, schema.n_features)
        assert np.isfinite(ex.dense).all()
        expected = np.array(_column(table, "features"), dtype=np.float64)
        np.testing.assert_array_equal(ex.dense, expected.reshape(n, schema.n_features)
                                      .astype(np.float32))
    else:
        sp = ex.sparse
        assert ex.dense is None and sp.n_rows == n and sp.values.dtype == np.float32
        assert np.all(np.diff(sp.indptr) >= 0) and sp.indptr[0] == 0 and sp.nnz == len(sp.indices)
        assert ((sp.indices >= 0) & (sp.indices < schema.n_features)).all()
        assert np.isfinite(sp.values).all()
        assert _rows(sp) == _column(table, "feature_ids")
        values = _column(table, "feature_values")
        if values is None:
            assert (sp.values == 1).all()
        else:
            np.testing.assert_array_equal(
                sp.values, np.array([v for r in values for v in r], dtype=np.float32))
    known, unknown = _expected_labels(table, vocab)
    assert _rows(ex.labels) == known
    assert ex.n_unknown.tolist() == unknown
    if require_labels:
        assert ((ex.labels.lengths + ex.n_unknown) > 0).all()
    if "id" in table.column_names:
        assert ex.ids.to_pylist() == _column(table, "id")


def check_error(exc: AweError) -> None:
    message = str(exc)
    assert message and "\n" not in message, message


@SETTINGS
@given(table=tables(), row_group=st.integers(1, 5), batch_rows=st.integers(1, 6),
       n_features=st.one_of(st.none(), st.integers(1, 6)), int_vocab=st.booleans())
def test_reader_succeeds_consistently_or_raises_awe_error(table, row_group, batch_rows,
                                                         n_features, int_vocab):
    """``n_features`` None: evaluate with the width that training found (when it did)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.parquet"
        pq.write_table(table, path, row_group_size=row_group)
        # training: the data decides the schema and the vocabulary
        found = None
        try:
            found = scan(path, batch_rows=batch_rows)
        except AweError as exc:
            check_error(exc)
        else:
            assert found.n_rows == table.num_rows > 0
            assert found.schema.n_features >= 1 and len(found.vocab) >= 1
            try:
                ex = load_examples(path, found.schema, found.vocab, batch_rows=batch_rows)
            except AweError as exc:
                check_error(exc)
            else:
                check_examples(ex, table, found.schema, found.vocab, require_labels=True)
        # evaluation: a given model's schema and vocabulary, labels optional
        kind = "dense" if "features" in table.column_names else "sparse"
        if n_features is None:
            n_features = found.schema.n_features if found is not None else 4
        schema = InputSchema(kind, n_features)
        vocab = LabelVocab([1, 2, 3] if int_vocab else ["a", "b", "1"])
        try:
            ex = load_examples(path, schema, vocab, require_labels=False, batch_rows=batch_rows)
        except AweError as exc:
            check_error(exc)
        else:
            check_examples(ex, table, schema, vocab, require_labels=False)


# ============================================================================ (b) the metrics

SCORES = st.one_of(st.sampled_from([0.0, 1.0, 1.0, -1.0, 2.5, math.nan, math.inf, -math.inf]),
                   st.integers(-3, 3).map(float))


def reference_metrics(scores: np.ndarray, truth: list[list[int]], n_unknown: list[int],
                      exclude: list[list[int]], ks: list[int]) -> dict[str, float]:
    """Brute force: rank the labels with a real score (not NaN, not -inf, not excluded) by
    (score desc, id asc); P@k = hits/k, R@k = hits/n_true, NDCG@k with binary gains, AP@k =
    sum of precisions at hits / min(n_true, k); averaged over rows with a true label."""
    sums = {f"{m}@{k}": 0.0 for k in ks for m in METRICS}
    counted = 0
    for i, row in enumerate(scores):
        n_true = len(truth[i]) + n_unknown[i]
        if n_true == 0:
            continue
        counted += 1
        ids = np.arange(len(row))
        ok = ~np.isnan(row) & (row != -np.inf) & ~np.isin(ids, exclude[i])
        ranked = ids[ok][np.lexsort((ids[ok], -row[ok]))]
        for k in ks:
            hit = np.zeros(k)
            top = ranked[:k]
            hit[:len(top)] = np.isin(top, truth[i])
            positions = np.arange(1, k + 1)
            sums[f"P@{k}"] += hit.sum() / k
            sums[f"R@{k}"] += hit.sum() / n_true
            discount = 1 / np.log2(positions + 1)
            sums[f"NDCG@{k}"] += (hit * discount).sum() / discount[:min(n_true, k)].sum()
            sums[f"MAP@{k}"] += (np.cumsum(hit) / positions * hit).sum() / min(n_true, k)
    return {name: total / max(counted, 1) for name, total in sums.items()}


def _csr(rows: list[list[int]]) -> Csr:
    return Csr.from_lengths(np.array([len(r) for r in rows], dtype=np.int64),
                            np.array([i for r in rows for i in r], dtype=np.int64))


@st.composite
def ranking_cases(draw):
    n = draw(st.integers(1, 7))
    n_labels = draw(st.integers(1, 7))
    scores = np.array([[draw(SCORES) for _ in range(n_labels)] for _ in range(n)])
    label_sets = st.sets(st.integers(0, n_labels - 1), max_size=n_labels)
    truth = [sorted(draw(label_sets)) for _ in range(n)]
    exclude = [sorted(draw(label_sets)) if draw(st.booleans()) else [] for _ in range(n)]
    n_unknown = [draw(st.integers(0, 2)) if draw(st.floats(0, 1)) < 0.3 else 0 for _ in range(n)]
    ks = sorted(draw(st.sets(st.integers(1, n_labels + 3), min_size=1, max_size=3)))
    batch = draw(st.integers(1, n))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return scores, truth, exclude, n_unknown, ks, batch, dtype


@SETTINGS
@given(case=ranking_cases())
def test_metrics_match_brute_force_and_stay_in_range(case):
    scores, truth, exclude, n_unknown, ks, batch, dtype = case
    metrics = RankingMetrics(ks)
    for start in range(0, len(scores), batch):
        rows = slice(start, start + batch)
        s = torch.tensor(scores[rows], dtype=dtype)
        mask_excluded(s, _csr(exclude[rows]))
        ids, vals = top_k(s, max(ks))
        assert ids.shape == (len(s), max(ks)) and vals.shape == ids.shape
        real = ids >= 0
        # a ranked slot holds a real score, in descending order; empty slots come last
        assert not torch.isnan(vals).any()
        assert (vals[~real] == -math.inf).all() and (vals[real] > -math.inf).all()
        assert (real[:, :-1] >= real[:, 1:]).all() and (vals[:, :-1] >= vals[:, 1:]).all()
        metrics.update(ids.numpy(), _csr(truth[rows]), np.array(n_unknown[rows]))
    got = metrics.result()
    expected = reference_metrics(scores, truth, n_unknown, exclude, ks)
    assert set(got) == set(expected)
    for name, value in got.items():
        assert 0.0 <= value <= 1.0 + 1e-12, (name, value)
        assert value == pytest.approx(expected[name], rel=1e-9, abs=1e-12), name


@SETTINGS
@given(case=ranking_cases())
def test_top_k_ignores_nan_like_minus_inf(case):
    """NaN scores rank last: exactly as if they were -inf."""
    scores, *_ , ks, _, dtype = case
    k = max(ks)
    ids, vals = top_k(torch.tensor(scores, dtype=dtype), k)
    as_neg_inf = np.where(np.isnan(scores), -np.inf, scores)
    ref_ids, ref_vals = top_k(torch.tensor(as_neg_inf, dtype=dtype), k)
    assert torch.equal(ids, ref_ids) and torch.equal(vals, ref_vals)
