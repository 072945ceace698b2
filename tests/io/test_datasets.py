"""Tests for awe.datasets: generators and converters into the data contract."""

from __future__ import annotations

import gzip
import io
import os
import struct
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from awe.errors import AweError, DataError
from awe.io import datasets
from awe.io.datasets import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    download_movielens,
    fashion_mnist,
    make_dataset,
    movielens,
    read_task,
    synthetic,
    write_split,
)


def _shared_data() -> Path:
    """$AWE_SHARED_DATA, else ../shared/data beside the checkout, else the workplace's copy."""
    candidates = [os.environ.get("AWE_SHARED_DATA"),
                  Path(__file__).resolve().parents[3] / "shared" / "data", "/work/shared/data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "ml-100k").is_dir():
            return Path(candidate)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


SHARED_DATA = _shared_data()
ML100K = SHARED_DATA / "ml-100k"
ML100K_IMPLICIT = SHARED_DATA / "ml-100k-implicit"
REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------
# helpers


def dense(table: pa.Table) -> np.ndarray:
    col = table.column("features").combine_chunks()
    return col.flatten().to_numpy().reshape(len(col), -1)


def label_matrix(table: pa.Table, vocab: dict | None = None) -> tuple[np.ndarray, dict]:
    col = table.column("labels").combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    lengths = col.value_lengths().to_numpy()
    if vocab is None:
        vocab = {name: i for i, name in enumerate(np.unique(flat))}
    rows = np.repeat(np.arange(len(col)), lengths)
    cols = np.array([vocab.get(name, -1) for name in flat], dtype=np.int64)
    y = np.zeros((len(col), len(vocab)), dtype=np.float32)
    known = cols >= 0
    y[rows[known], cols[known]] = 1.0
    return y, vocab


def precision_at_1(scores: np.ndarray, y: np.ndarray) -> float:
    return float(y[np.arange(len(y)), scores.argmax(axis=1)].mean())


def pairs(table: pa.Table, column: str = "labels") -> set[tuple[int, int]]:
    col = table.column(column).combine_chunks()
    users = np.repeat(table.column("id").to_numpy(), col.value_lengths().to_numpy())
    return set(zip(users.tolist(), col.flatten().to_numpy().tolist(), strict=True))


# ---------------------------------------------------------------------------------------------
# write_split / read_task


def test_write_split_metadata_and_no_leftovers(tmp_path):
    train, test = synthetic(rows=50, test_rows=20, classes=5)
    out = tmp_path / "out"
    paths = write_split(out, train, test, "annotation")
    assert paths == [out / "train.parquet", out / "test.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet"]
    for path, table in zip(paths, (train, test), strict=True):
        assert read_task(path) == "annotation"
        assert pq.read_schema(path).metadata[b"awe.task"] == b"annotation"
        assert pq.read_table(path).equals(table)
    write_split(out, train, test, "recommendation")  # overwrite in place
    assert read_task(out / "test.parquet") == "recommendation"
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet"]


def test_write_split_rejects_unknown_task(tmp_path):
    train, test = synthetic(rows=10, test_rows=5, classes=3)
    with pytest.raises(AweError, match="annotation"):
        write_split(tmp_path, train, test, "ranking")
    assert list(tmp_path.iterdir()) == []


def test_read_task_absent_and_missing(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": [1, 2]}), plain)
    assert read_task(plain) is None
    with pytest.raises(DataError, match="nope.parquet"):
        read_task(tmp_path / "nope.parquet")


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_deterministic():
    a_train, a_test = synthetic(rows=400, test_rows=100, classes=20, seed=3)
    b_train, b_test = synthetic(rows=400, test_rows=100, classes=20, seed=3)
    assert a_train.equals(b_train) and a_test.equals(b_test)
    c_train, c_test = synthetic(rows=400, test_rows=100, classes=20, seed=4)
    assert not a_train.equals(c_train)
    assert not np.allclose(dense(a_test), dense(c_test))


@pytest.mark.parametrize("preset,width,label_prefix,max_tags", [
    ("magnatagatune", 104, "tag", 4),
    ("imagenet", 474, "class", 1),
])
def test_synthetic_schema_and_sizes(preset, width, label_prefix, max_tags):
    train, test = synthetic(preset, rows=400, test_rows=120, classes=20)
    assert train.num_rows == 400 and test.num_rows == 120
    for table in (train, test):
        assert table.column_names == ["id", "features", "labels"]
        assert table.schema.field("id").type == pa.int64()
        assert table.schema.field("features").type == pa.list_(pa.float32())
        assert table.schema.field("labels").type == pa.list_(pa.string())
        lengths = table.column("features").combine_chunks().value_lengths().to_numpy()
        assert (lengths == width).all()
        x = dense(table)
        assert np.isfinite(x).all()
        n_tags = table.column("labels").combine_chunks().value_lengths().to_numpy()
        assert n_tags.min() >= 1 and n_tags.max() <= max_tags
        names = set(table.column("labels").combine_chunks().flatten().to_pylist())
        assert all(n.startswith(label_prefix) for n in names)
        assert len(names) <= 20
    ids = np.r_[train.column("id").to_numpy(), test.column("id").to_numpy()]
    assert len(np.unique(ids)) == len(ids)
    x = dense(train)
    assert np.allclose(x.mean(axis=0), 0, atol=1e-4)
    assert np.allclose(x.std(axis=0), 1, atol=1e-3)
    if max_tags == 1:
        assert (train.column("labels").combine_chunks().value_lengths().to_numpy() == 1).all()


def test_synthetic_magnatagatune_tag_statistics():
    train, _ = synthetic(rows=4000, test_rows=10, classes=60)
    n_tags = train.column("labels").combine_chunks().value_lengths().to_numpy()
    assert set(np.unique(n_tags)) == {1, 2, 3, 4}
    assert 1.4 <= n_tags.mean() <= 2.0
    # Zipf-like co-occurrence: the most frequent tag is far more common than the median tag.
    y, _ = label_matrix(train)
    freq = np.sort(y.sum(axis=0))[::-1]
    assert freq[0] > 3 * np.median(freq)


def test_synthetic_default_sizes():
    # Only the sizes are checked: the default preset is 16,000 x 104.
    train, test = synthetic()
    assert (train.num_rows, test.num_rows) == (16_000, 5_000)
    assert dense(test).shape == (5_000, 104)
    assert len(set(train.column("labels").combine_chunks().flatten().to_pylist())) == 160


def test_synthetic_overrides_and_validation():
    train, test = synthetic("imagenet", rows=30, test_rows=0, classes=4, features=8)
    assert dense(train).shape == (30, 8) and test.num_rows == 0
    with pytest.raises(AweError, match="preset"):
        synthetic("cifar")
    with pytest.raises(AweError, match="rows"):
        synthetic(rows=0)
    with pytest.raises(AweError, match="classes"):
        synthetic(classes=1)


def test_synthetic_linear_part_carries_most_of_the_signal():
    """The generator's point: a linear model captures most of the label signal (it is as good
    as a 20-NN vote and far better than 1-NN), and neighbours still see what it misses.
    Measured on validation rows carved from the train split."""
    train, _ = synthetic(rows=4000, test_rows=0, classes=30, seed=0)
    x, y = dense(train).astype(np.float64), label_matrix(train)[0]
    x_tr, x_va, y_tr, y_va = x[:3000], x[3000:], y[:3000], y[3000:]
    prior = 1e-3 * y_tr.mean(axis=0)  # breaks ties between a neighbour's tags by frequency

    d = (x_va**2).sum(1)[:, None] - 2 * x_va @ x_tr.T + (x_tr**2).sum(1)[None, :]
    nn = np.argsort(d, axis=1)[:, :20]
    p_1nn = precision_at_1(y_tr[nn[:, 0]] + prior, y_va)
    p_20nn = precision_at_1(y_tr[nn].sum(axis=1) + prior, y_va)

    a_tr = np.c_[x_tr, np.ones(len(x_tr))]
    w = np.linalg.lstsq(a_tr, y_tr, rcond=None)[0]
    p_linear = precision_at_1(np.c_[x_va, np.ones(len(x_va))] @ w, y_va)
    p_popular = precision_at_1(np.broadcast_to(y_tr.mean(axis=0), y_va.shape), y_va)

    # Measured at seed 0: 1-NN 0.43, 20-NN 0.60, linear 0.59, most popular tag 0.13.
    assert p_linear >= p_popular + 0.3
    assert p_linear >= p_1nn + 0.1
    assert abs(p_linear - p_20nn) <= 0.05


def test_synthetic_co_occurring_tags_belong_to_the_label():
    """Every cluster of a label has the label's co-occurring tags; an example has each with
    probability co_rate (then loses any tag with probability drop)."""
    world = datasets._world("magnatagatune", np.random.default_rng(0), None, None)
    owner, co = world.cluster_tags[:, 0], world.cluster_tags[:, 1:]
    for label in range(world.n_labels):
        rows = co[owner == label]
        assert len(rows) >= 3 and (rows == rows[0]).all()
    assert (co >= 0).any() and (co != owner[:, None]).all()
    x, flat, lengths = world.draw(np.random.default_rng(1), 20_000)
    assert x.shape == (20_000, world.n_features) and lengths.sum() == len(flat)
    p = world.p
    expected = (1 - p.drop) * (1 + p.co_rate * (co >= 0).sum(axis=1).mean())
    # (plus the owner's tag where drop took every tag)
    assert expected - 0.03 < lengths.mean() < expected + p.drop
    mean, std = world.moments()  # the sharded writer's population moments
    assert np.abs(x.mean(axis=0) - mean).max() < 0.1 * std.min()
    assert np.abs(x.std(axis=0) / std - 1).max() < 0.02


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_fashion(directory: Path, *, gz: bool, n_train: int = 6, n_test: int = 4,
                       seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for stem, array, magic in ((f"{split}-images-idx3-ubyte", images, 0x803),
                                   (f"{split}-labels-idx1-ubyte", labels, 0x801)):
            raw = idx_bytes(array, magic)
            if gz:
                (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
            else:
                (directory / stem).write_bytes(raw)
        data[split] = (images, labels)
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_fake_idx(tmp_path, gz):
    data = write_fake_fashion(tmp_path, gz=gz)
    train, test = fashion_mnist(tmp_path)
    for table, (images, labels), first_id in ((train, data["train"], 0),
                                              (test, data["t10k"], 6)):
        assert table.column_names == ["id", "features", "labels"]
        assert table.schema.field("features").type == pa.list_(pa.float32())
        assert table.schema.field("labels").type == pa.list_(pa.string())
        np.testing.assert_array_equal(table.column("id").to_numpy(),
                                      np.arange(first_id, first_id + len(labels)))
        x = dense(table)
        assert x.shape == (len(labels), 784)
        np.testing.assert_allclose(x, images.reshape(len(labels), -1) / 255.0, rtol=1e-6)
        assert table.column("labels").to_pylist() == [[FASHION_MNIST_CLASSES[i]] for i in labels]


def test_fashion_mnist_bad_magic(tmp_path):
    write_fake_fashion(tmp_path, gz=False)
    bad = tmp_path / "train-labels-idx1-ubyte"
    raw = bytearray(bad.read_bytes())
    raw[3] = 0x03  # an image magic number in a label file
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*magic"):
        fashion_mnist(tmp_path)


def test_fashion_mnist_truncated(tmp_path):
    write_fake_fashion(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        fashion_mnist(tmp_path)


def test_fashion_mnist_missing_files(tmp_path):
    write_fake_fashion(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(AweError, match="t10k-labels-idx1-ubyte") as err:
        fashion_mnist(tmp_path)
    assert "apt-get install -y dataset-fashion-mnist" in str(err.value)
    assert "--source" in str(err.value)
    with pytest.raises(AweError, match="dataset-fashion-mnist"):
        fashion_mnist(tmp_path / "absent")


@pytest.mark.skipif(not (REAL_FASHION / "train-labels-idx1-ubyte.gz").exists()
                    and not (REAL_FASHION / "train-labels-idx1-ubyte").exists(),
                    reason="Fashion-MNIST is not installed")
def test_fashion_mnist_real():
    train, test = fashion_mnist(REAL_FASHION)
    assert (train.num_rows, test.num_rows) == (60_000, 10_000)
    x = train.column("features").combine_chunks().flatten().to_numpy()
    assert x.shape == (60_000 * 784,) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    labels = test.column("labels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    names, counts = np.unique(labels, return_counts=True)
    assert set(names) == set(FASHION_MNIST_CLASSES) and (counts == 1000).all()


# ---------------------------------------------------------------------------------------------
# MovieLens


needs_ml100k = pytest.mark.skipif(
    not ((ML100K / "u.data").exists() and (ML100K_IMPLICIT / "train.tsv").exists()),
    reason="shared ml-100k data is not available")


@needs_ml100k
def test_movielens_matches_reference_split():
    train, test = movielens(ML100K)
    for table, name in ((train, "train"), (test, "test")):
        assert table.column_names == ["id", "feature_ids", "labels", "exclude"]
        for column in ("feature_ids", "labels", "exclude"):
            assert table.schema.field(column).type == pa.list_(pa.int64())
        assert table.schema.field("id").type == pa.int64()
        reference = pd.read_csv(ML100K_IMPLICIT / f"{name}.tsv", sep="\t")
        expected = set(zip(reference.user_id.tolist(), reference.item_id.tolist(), strict=True))
        assert pairs(table) == expected
        ids = table.column("id").to_numpy()
        assert (np.diff(ids) > 0).all()
        assert table.column("feature_ids").to_pylist() == [[int(u)] for u in ids]
        assert (table.column("labels").combine_chunks().value_lengths().to_numpy() >= 1).all()
    assert (train.column("exclude").combine_chunks().value_lengths().to_numpy() == 0).all()
    # exclude of a test row is exactly the user's training positives.
    train_positives = dict(zip(train.column("id").to_pylist(),
                               train.column("labels").to_pylist(), strict=True))
    for user, exclude in zip(test.column("id").to_pylist(), test.column("exclude").to_pylist(),
                             strict=True):
        assert exclude == train_positives[user]


def write_u_data(path: Path, ratings: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in ratings.tolist()))


def small_ratings(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for user, n in ((1, 12), (2, 3), (3, 7), (5, 20)):
        items = rng.choice(np.arange(1, 60), size=n, replace=False)
        ratings = rng.integers(1, 6, size=n)
        rows += [(user, i, r, 880000000 + j) for j, (i, r) in enumerate(zip(items, ratings,
                                                                           strict=True))]
    return np.array(rows, dtype=np.int64)


def test_movielens_split_rule_on_small_data(tmp_path):
    ratings = small_ratings()
    write_u_data(tmp_path / "u.data", ratings)
    train, test = movielens(tmp_path)
    positives = ratings[ratings[:, 2] >= 4]
    # Re-derive the rule independently.
    rng = np.random.default_rng(0)
    want_train, want_test = set(), set()
    for user in np.unique(positives[:, 0]):
        items = np.sort(positives[positives[:, 0] == user, 1])
        if len(items) < 5:
            want_train |= {(int(user), int(i)) for i in items}
            continue
        perm = rng.permutation(len(items))
        k = max(1, round(0.2 * len(items)))
        want_test |= {(int(user), int(i)) for i in items[perm[:k]]}
        want_train |= {(int(user), int(i)) for i in items[perm[k:]]}
    assert pairs(train) == want_train and pairs(test) == want_test
    # The source may also be the u.data file itself or a parent of ml-100k/.
    assert movielens(tmp_path / "u.data")[1].equals(test)


def test_movielens_errors(tmp_path):
    with pytest.raises(AweError, match=str(tmp_path / "missing")):
        movielens(tmp_path / "missing")
    (tmp_path / "u.data").write_text("1\t2\t5\t880000000\n1\tx\t4\t880000001\n")
    with pytest.raises(DataError, match=r"u\.data, row 2, column 'item'"):
        movielens(tmp_path)
    (tmp_path / "u.data").write_text("1,2,5,880000000\n")
    with pytest.raises(DataError, match="4 tab-separated columns"):
        movielens(tmp_path)
    (tmp_path / "u.data").write_text("")
    with pytest.raises(DataError, match="u.data"):
        movielens(tmp_path)


def make_zip(ratings: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ml-100k/", "")
        archive.writestr("ml-100k/u.data",
                         "".join("\t".join(map(str, r)) + "\n" for r in ratings.tolist()))
        archive.writestr("ml-100k/README", "fake\n")
    return buffer.getvalue()


def test_download_movielens_mocked(tmp_path, monkeypatch):
    ratings = small_ratings()
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(make_zip(ratings))

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    target = download_movielens(tmp_path / "dl")
    assert calls == [datasets.MOVIELENS_URL]
    assert target == tmp_path / "dl" / "ml-100k"
    assert sorted(p.name for p in target.iterdir()) == ["README", "u.data"]
    train, _ = movielens(target)
    assert train.num_rows == len(np.unique(ratings[ratings[:, 2] >= 4, 0]))
    # A second call reuses the files without downloading.
    assert download_movielens(tmp_path / "dl") == target and len(calls) == 1


def test_download_movielens_failures(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(AweError, match="no route to host"):
        download_movielens(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"<html>"))
    with pytest.raises(AweError, match="zip"):
        download_movielens(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Registry


def test_make_dataset_synthetic(tmp_path):
    paths = make_dataset("synthetic", tmp_path, preset="imagenet", rows=40, test_rows=10,
                         classes=5, seed=1)
    assert [p.name for p in paths] == ["train.parquet", "test.parquet"]
    assert all(read_task(p) == "annotation" for p in paths)
    assert pq.read_table(paths[0]).num_rows == 40
    expected, _ = synthetic("imagenet", seed=1, rows=40, test_rows=10, classes=5)
    assert pq.read_table(paths[0]).equals(expected)


def test_make_dataset_fashion_and_movielens(tmp_path):
    write_fake_fashion(tmp_path / "fm", gz=True)
    paths = make_dataset("fashion-mnist", tmp_path / "fm-out", source=tmp_path / "fm")
    assert read_task(paths[1]) == "annotation"
    write_u_data(tmp_path / "ml" / "u.data", small_ratings())
    paths = make_dataset("movielens", tmp_path / "ml-out", source=tmp_path / "ml")
    assert all(read_task(p) == "recommendation" for p in paths)
    assert pq.read_schema(paths[1]).names == ["id", "feature_ids", "labels", "exclude"]


def test_make_dataset_errors(tmp_path):
    assert DATASETS == {"synthetic", "fashion-mnist", "movielens"}
    with pytest.raises(AweError, match="fashion-mnist, movielens, synthetic"):
        make_dataset("mnist", tmp_path)
    with pytest.raises(AweError, match="source"):
        make_dataset("movielens", tmp_path)
    assert list(tmp_path.iterdir()) == []
