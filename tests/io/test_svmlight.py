"""Tests for awe.svmlight: LIBSVM / XMC multi-label text files into the data contract."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from awe.errors import AweError, DataError
from awe.io import svmlight
from awe.io.reader import load_examples, read_task, resolve_files, scan
from awe.io.svmlight import N_FEATURES_KEY, SOURCE_KEY, convert_svmlight
from awe.pipeline import train_wsabie
from awe.training.config import TrainConfig


def random_rows(n: int, n_features: int = 30, n_labels: int = 5, seed: int = 0,
                first_id: int = 0, empty_every: int = 0) -> list[tuple[list[int], list, list]]:
    """Rows of (labels, feature ids, values); ids from ``first_id``; every ``empty_every``-th
    row has no labels."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = int(rng.integers(1, 6))
        ids = sorted(rng.choice(n_features, k, replace=False) + first_id)
        values = np.round(rng.normal(size=k), 4).astype(np.float32).tolist()
        labels = sorted(rng.choice(n_labels, int(rng.integers(1, 3)), replace=False).tolist())
        if empty_every and i % empty_every == 0:
            labels = []
        rows.append((labels, [int(v) for v in ids], values))
    return rows


def write_svm(path, rows, header: tuple | None = None, style: str = "space") -> None:
    """``rows`` as LIBSVM text; a row without labels starts with a space (``style="space"``) or
    directly with its first feature (``"bare"``)."""
    lines = [] if header is None else [" ".join(map(str, header))]
    for labels, ids, values in rows:
        feats = " ".join(f"{i}:{v!r}" for i, v in zip(ids, values, strict=True))
        if labels:
            lines.append(",".join(map(str, labels)) + " " + feats)
        else:
            lines.append((" " + feats) if style == "space" else feats)
    path.write_text("\n".join(lines) + "\n")


def read_back(out_dir):
    """The converted rows as load_examples reads them: (labels, ids, values) per row."""
    found = scan(out_dir)
    examples = load_examples(out_dir, found.schema, found.vocab, require_labels=False)
    sp, lab = examples.sparse, examples.labels
    rows = []
    for r in range(len(examples)):
        ids = sp.indices[sp.indptr[r]:sp.indptr[r + 1]].tolist()
        values = sp.values[sp.indptr[r]:sp.indptr[r + 1]].tolist()
        labels = found.vocab.names(lab.indices[lab.indptr[r]:lab.indptr[r + 1]])
        rows.append((sorted(labels), ids, values))
    return rows, found, examples


def same(rows, back) -> None:
    assert len(back) == len(rows)
    for (labels, ids, values), (labels2, ids2, values2) in zip(rows, back, strict=True):
        assert labels2 == sorted(labels)
        assert ids2 == ids
        np.testing.assert_array_equal(np.float32(values2), np.float32(values))


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("with_header", [True, False])
def test_round_trip_zero_based(tmp_path, with_header):
    rows = random_rows(40, n_features=30, empty_every=7)
    rows[0] = ([1, 3], [0, 4], [1.0, -2.5])  # id 0 present: zero-based
    write_svm(tmp_path / "train.txt", rows, (40, 50, 5) if with_header else None)
    summary = convert_svmlight(tmp_path / "train.txt", tmp_path / "out")
    assert summary.out_dir == tmp_path / "out" / "train"
    assert summary.files == [tmp_path / "out" / "train" / "part-00000.parquet"]
    assert summary.rows == 40 and summary.zero_based
    assert summary.rows_without_labels == sum(1 for r in rows if not r[0])
    assert summary.nnz == sum(len(r[1]) for r in rows)
    assert summary.n_labels == len({label for r in rows for label in r[0]})
    max_id = max(i for r in rows for i in r[1])
    assert summary.n_features == (50 if with_header else max_id + 1)
    back, found, examples = read_back(summary.out_dir)
    same(rows, back)
    assert found.schema.kind == "sparse" and found.schema.n_features == summary.n_features
    assert examples.ids.to_pylist() == list(range(40))
    assert read_task(summary.files) == "annotation"
    meta = pq.read_schema(summary.files[0]).metadata
    assert (N_FEATURES_KEY in meta) == with_header
    source = json.loads(meta[SOURCE_KEY])
    assert source["format"] == "svmlight" and source["file"] == "train.txt"
    schema = pq.read_schema(summary.files[0])
    assert str(schema.field("feature_ids").type) == "list<element: int64>"
    assert str(schema.field("feature_values").type) == "list<element: float>"
    assert str(schema.field("labels").type) == "list<element: int64>"


@pytest.mark.parametrize("style", ["space", "bare"])
def test_one_based_ids_kept_as_given(tmp_path, style):
    rows = random_rows(25, n_features=20, first_id=1, empty_every=4)
    write_svm(tmp_path / "data.txt", rows, (25, 20, 5), style=style)
    rows_with_id_20 = [r for r in rows if 20 in r[1]]
    summary = convert_svmlight(tmp_path / "data.txt", tmp_path / "out")
    assert not summary.zero_based
    assert summary.n_features == 21  # ids 1..20 index rows 1..20 of U; row 0 is unused
    assert summary.header == (25, 20, 5)
    assert pq.read_schema(summary.files[0]).metadata[N_FEATURES_KEY] == b"21"
    back, _, _ = read_back(summary.out_dir)
    same(rows, back)
    assert rows_with_id_20  # the largest one-based id, valid under the header
    # without a header: max id + 1, ids unchanged
    write_svm(tmp_path / "plain.txt", rows)
    summary = convert_svmlight(tmp_path / "plain.txt", tmp_path / "out")
    assert summary.n_features == 21 and not summary.zero_based
    same(rows, read_back(summary.out_dir)[0])


def test_comments_blank_lines_tabs_crlf_signs(tmp_path):
    text = ("# converted by hand\n"
            "3 9 4   # rows features labels\n"
            "\n"
            "+1,2\t0:1.5 8:2 # a trailing comment\r\n"
            " 3:0.25\n"
            "   \n"
            "5:1e-3 6:-2\n")
    (tmp_path / "t.svm").write_text(text)
    summary = convert_svmlight(tmp_path / "t.svm", tmp_path / "out")
    assert summary.header == (3, 9, 4) and summary.rows == 3 and summary.zero_based
    assert summary.rows_without_labels == 2 and summary.n_features == 9
    table = pq.read_table(summary.files[0])
    assert table.column("labels").to_pylist() == [[1, 2], [], []]
    assert table.column("feature_ids").to_pylist() == [[0, 8], [3], [5, 6]]
    np.testing.assert_array_equal(np.concatenate(table.column("feature_values").to_pylist()),
                                  np.float32([1.5, 2, 0.25, 1e-3, -2]))


def test_shards_gzip_and_task(tmp_path, monkeypatch):
    monkeypatch.setattr(svmlight, "LINES_PER_BLOCK", 4)  # several blocks, several row groups
    rows = random_rows(23, seed=3)
    write_svm(tmp_path / "plain.txt", rows, (23, 30, 5))
    with gzip.open(tmp_path / "test.txt.gz", "wb") as fh:
        fh.write((tmp_path / "plain.txt").read_bytes())
    summary = convert_svmlight(tmp_path / "test.txt.gz", tmp_path / "out", shard_rows=10,
                               task="recommendation")
    names = [f.name for f in summary.files]
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(f).num_rows for f in summary.files] == [10, 10, 3]
    assert all(pq.read_metadata(f).num_row_groups >= 2 for f in summary.files[:2])
    assert read_task(resolve_files(summary.out_dir)) == "recommendation"
    back, _, examples = read_back(summary.out_dir)
    same(rows, back)
    assert examples.ids.to_pylist() == list(range(23))
    # a new conversion replaces the shards; nothing else is left beside them
    convert_svmlight(tmp_path / "plain.txt", tmp_path / "out", shard_rows=100)
    convert_svmlight(tmp_path / "test.txt.gz", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plain", "test"]
    assert [p.name for p in (tmp_path / "out" / "test").iterdir()] == ["part-00000.parquet"]


def test_feature_id_zero_scan_across_blocks(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"2 11 3\n1 10:1 3:2\n2 1:1\n")
    for block in (1, 2, 3, 5, 8, 64):  # "10:" split at every place: never a false id 0
        assert not svmlight._has_feature_id_zero(path, block)
    path.write_bytes(b"2 11 3\n1 10:1 3:2\n2 0:1\n")
    for block in (1, 2, 3, 5, 8, 64):
        assert svmlight._has_feature_id_zero(path, block)


def test_explicit_base_overrides_detection(tmp_path):
    write_svm(tmp_path / "a.txt", [([0], [1, 2], [1.0, 1.0]), ([1], [3], [1.0])], (2, 4, 2))
    assert convert_svmlight(tmp_path / "a.txt", tmp_path / "o", zero_based=True).n_features == 4
    assert convert_svmlight(tmp_path / "a.txt", tmp_path / "o").n_features == 5  # detected 1-based


# ---------------------------------------------------------------------------------------------
# errors: one line naming the file and the line, nothing written


@pytest.mark.parametrize("line, expected", [
    ("1,2 3:1 4", "'4' is not a feature id:value"),
    ("1,x 3:1", "label 'x' is not an integer"),
    ("1,,2 3:1", "an empty label is not an integer"),
    ("1.5 3:1", "label '1.5' is not an integer"),
    ("1 a:1", "feature id 'a' in 'a:1' is not an integer >= 0"),
    ("1 -3:1", "negative feature id -3"),
    ("1 3:abc", "feature value 'abc' in '3:abc' is not a number"),
    ("1 3:", "feature value '' in '3:' is not a number"),
    ("1 3:1:2", "feature value '1:2' in '3:1:2' is not a number"),
    ("1 3:nan", "feature 3 has a value that is NaN, infinite or beyond float32"),
    ("1 3:1e60", "feature 3 has a value that is NaN, infinite or beyond float32"),
    ("1 3:1 99999999999:1", "feature id 99999999999 is too large"),
])
def test_malformed_line_names_file_and_line(tmp_path, monkeypatch, line, expected):
    monkeypatch.setattr(svmlight, "LINES_PER_BLOCK", 3)  # the bad line is in the second block
    good = ["0 1:1", "# comment", "1 2:0.5", "", "0,1 0:1"]
    path = tmp_path / "bad.txt"
    path.write_text("\n".join([*good, line, "1 1:1"]) + "\n")
    with pytest.raises(DataError) as info:
        convert_svmlight(path, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"{path}, line 6: ") and expected in message, message
    assert "\n" not in message and "(" in message  # one line, with a fix
    assert info.value.file == str(path) and info.value.line == 6
    assert not (tmp_path / "out" / "bad").exists()
    assert not [p for p in (tmp_path / "out").iterdir()]  # no staging left behind


@pytest.mark.parametrize("text, zero_based, expected", [
    ("2 4 2\n0 1:1\n1 4:1\n", True, "line 3: feature id 4 is beyond the header's 4 features"),
    ("2 4 2\n0 1:1\n1 5:1\n", None, "line 3: feature id 5 is beyond the header's 4 features"),
    ("2 4 2\n0 1:1\n1 0:1\n", False, "line 3: feature id 0 in a file read as one-based"),
    ("3 4 2\n0 1:1\n1 2:1\n", None, "the header says 3 rows but the file holds 2"),
    ("# nothing\n\n", None, "no examples"),
])
def test_errors_against_the_header(tmp_path, text, zero_based, expected):
    path = tmp_path / "h.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=expected):
        convert_svmlight(path, tmp_path / "out", zero_based=zero_based)
    assert not (tmp_path / "out" / "h").exists()


def test_failed_conversion_keeps_the_earlier_one(tmp_path):
    path = tmp_path / "train.txt"
    write_svm(path, random_rows(5))
    first = convert_svmlight(path, tmp_path / "out")
    before = first.files[0].read_bytes()
    path.write_text(path.read_text() + "1 oops\n")
    with pytest.raises(DataError, match="line 6"):
        convert_svmlight(path, tmp_path / "out")
    assert first.files[0].read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train"]


def test_option_and_path_errors(tmp_path):
    write_svm(tmp_path / "train.txt", random_rows(3))
    with pytest.raises(DataError, match="no such file"):
        convert_svmlight(tmp_path / "missing.txt", tmp_path / "out")
    with pytest.raises(AweError, match="unknown task"):
        convert_svmlight(tmp_path / "train.txt", tmp_path / "out", task="ranking")
    with pytest.raises(AweError, match="shard_rows"):
        convert_svmlight(tmp_path / "train.txt", tmp_path / "out", shard_rows=0)
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "train" / "notes.md").write_text("mine")
    with pytest.raises(AweError, match="holds other files"):
        convert_svmlight(tmp_path / "train.txt", tmp_path / "out")
    assert (tmp_path / "out" / "train" / "notes.md").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# training on the result


def test_train_on_converted_file(tmp_path):
    """Labels follow the features: a tiny stage-1 model trains on the converted directory."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(120):
        label = int(rng.integers(0, 4))
        ids = sorted({label * 5 + int(j) for j in rng.integers(0, 5, size=3)} | {20})
        rows.append(([label], ids, [1.0] * len(ids)))
    write_svm(tmp_path / "train.txt", rows, (120, 21, 4))
    summary = convert_svmlight(tmp_path / "train.txt", tmp_path / "data")
    model = tmp_path / "model"
    config = TrainConfig(dim=8, epochs=3, threads=1, batch_size=64, negatives=10)
    result, written = train_wsabie(summary.out_dir, model, config, checkpoints=False)
    assert (model / "wsabie.safetensors").is_file() and (model / "config.json").is_file()
    saved = json.loads((model / "config.json").read_text())
    assert saved["schema"]["kind"] == "sparse" and saved["schema"]["n_features"] == 21
    assert json.loads((model / "labels.json").read_text()) == [0, 1, 2, 3]
    assert len(result.history) >= 1 and written


def test_damaged_gzip_is_one_error(tmp_path):
    data = gzip.compress(b"0 1:1\n" * 1000)
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.txt\.gz: cannot read the file .*damaged"):
        convert_svmlight(tmp_path / "cut.txt.gz", tmp_path / "out")
    assert not (tmp_path / "out" / "cut").exists()
