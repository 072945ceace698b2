"""The public datasets `awe data` converts into the data contract: Fashion-MNIST from its IDX
files and MovieLens 100K from GroupLens' ratings (downloaded when no folder is given).

Each builder returns ``(train, test)`` pyarrow Tables; :mod:`awe.io.datasets` writes them.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from awe.artifacts import atomic_path
from awe.errors import AweError, DataError
from awe.io.writer import dense_column, list_array, string_labels

# --------------------------------------------------------------------------------------------
# Fashion-MNIST

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801


def _find_idx(source: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (source / name).is_file():
            return source / name
    raise AweError(
        f"fashion-mnist: missing {source / stem}[.gz]; `apt-get install -y dataset-fashion-mnist` "
        f"provides the files in {FASHION_MNIST_DEFAULT}, or pass --source DIR with the four IDX "
        f"files")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read IDX file ({exc})", file=str(path)) from exc
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataError("truncated IDX header", file=str(path))
    found = int(np.frombuffer(raw, dtype=">u4", count=1)[0])
    if found != magic:
        raise DataError(f"bad IDX magic number 0x{found:08x}, expected 0x{magic:08x}",
                        file=str(path))
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise DataError(f"IDX header says {shape} ({size} bytes) but the file holds "
                        f"{len(raw) - header} bytes", file=str(path))
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist(source: str | os.PathLike = FASHION_MNIST_DEFAULT) -> tuple[pa.Table, pa.Table]:
    """Fashion-MNIST from its four IDX files (gzipped or not): the standard 60k/10k split.

    ``features`` are the 784 pixels / 255 as float32; ``labels`` hold the one class name. Ids are
    0..59999 for train and 60000..69999 for test.
    """
    source = Path(source)
    if not source.is_dir():
        raise AweError(
            f"fashion-mnist: source directory {source} does not exist; `apt-get install -y "
            f"dataset-fashion-mnist` provides {FASHION_MNIST_DEFAULT}, or pass --source DIR")
    names = np.array(FASHION_MNIST_CLASSES)
    tables = []
    first_id = 0
    for split in ("train", "t10k"):
        img_path = _find_idx(source, f"{split}-images-idx3-ubyte")
        lab_path = _find_idx(source, f"{split}-labels-idx1-ubyte")
        images = _read_idx(img_path, _IDX_IMAGES)
        labels = _read_idx(lab_path, _IDX_LABELS)
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels in {lab_path}",
                            file=str(img_path))
        if labels.size and labels.max() >= len(names):
            row = int(np.argmax(labels >= len(names)))
            raise DataError(f"label {labels[row]} is not a class id 0-9", file=str(lab_path),
                            row=row)
        n = len(images)
        x = images.reshape(n, -1).astype(np.float32) / np.float32(255.0)
        tables.append(pa.table({
            "id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
            "features": dense_column(x),
            "labels": string_labels(names, labels.astype(np.int64), np.ones(n, dtype=np.int64)),
        }))
        first_id += n
    return tables[0], tables[1]


# --------------------------------------------------------------------------------------------
# MovieLens 100k

MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
MOVIELENS_MIN_POSITIVES = 5
MOVIELENS_TEST_FRACTION = 0.2
MOVIELENS_POSITIVE_RATING = 4


def _movielens_file(source: Path) -> Path:
    for candidate in (source, source / "u.data", source / "ml-100k" / "u.data"):
        if candidate.is_file():
            return candidate
    raise AweError(f"movielens: no u.data at {source} (expected the GroupLens ml-100k directory; "
                   f"download and unzip {MOVIELENS_URL}, or use download_movielens)")


def _read_ratings(path: Path) -> np.ndarray:
    """u.data as an int64 array of (user, item, rating, timestamp)."""
    try:
        frame = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False,
                            engine="c")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read ratings ({exc})", file=str(path)) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError("empty ratings file", file=str(path)) from exc
    if frame.shape[1] != 4:
        raise DataError(f"expected 4 tab-separated columns (user, item, rating, timestamp), "
                        f"found {frame.shape[1]}", file=str(path))
    columns = ("user", "item", "rating", "timestamp")
    out = np.empty((len(frame), 4), dtype=np.int64)
    for j, name in enumerate(columns):
        values = pd.to_numeric(frame[j], errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(f"not an integer: {frame[j].iloc[row]!r}", file=str(path), row=row + 1,
                            column=name)
        out[:, j] = values.to_numpy(dtype=np.int64)
    if (out[:, :2] < 0).any():
        row = int(np.argmax((out[:, :2] < 0).any(axis=1)))
        raise DataError("negative user or item id", file=str(path), row=row + 1)
    return out


def movielens_split(ratings: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, test) over ``ratings`` rows: the per-user 80/20 split of positives.

    Positives are ratings >= 4. Users in ascending id order with >= 5 positives draw
    ``rng.permutation(n)`` from one shared ``default_rng(seed)``; the first ``max(1, round(0.2 n))``
    entries index (item-sorted) positives that go to test. Users with fewer positives keep them all
    in train. Non-positive ratings are in neither split.
    """
    positive = ratings[:, 2] >= MOVIELENS_POSITIVE_RATING
    rows = np.flatnonzero(positive)
    rows = rows[np.lexsort((ratings[rows, 1], ratings[rows, 0]))]  # by user, then item
    users = ratings[rows, 0]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(rows)]
    train = np.zeros(len(ratings), dtype=bool)
    test = np.zeros(len(ratings), dtype=bool)
    train[rows] = True
    rng = np.random.default_rng(seed)
    for start, end in zip(starts, ends, strict=True):  # one iteration per user, ascending id
        n = int(end - start)
        if n < MOVIELENS_MIN_POSITIVES:
            continue
        perm = rng.permutation(n)
        chosen = rows[start + perm[:max(1, round(MOVIELENS_TEST_FRACTION * n))]]
        test[chosen] = True
        train[chosen] = False
    return train, test


def _group(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique users, their item counts, items sorted by user then item)."""
    order = np.lexsort((items, users))
    uniq, counts = np.unique(users[order], return_counts=True)
    return uniq, counts, items[order]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for each (s, n), without a Python loop."""
    begin = np.r_[0, np.cumsum(lengths)[:-1]]
    return np.repeat(starts - begin, lengths) + np.arange(int(lengths.sum()))


def movielens(source: str | os.PathLike) -> tuple[pa.Table, pa.Table]:
    """MovieLens 100k as implicit feedback (ratings >= 4), split per user 80/20 (seed 0).

    One row per user: ``id`` and ``feature_ids = [user id]`` (raw ids, so the feature space has
    max user id + 1 entries, id 0 unused), ``labels`` the positive item ids, ``exclude`` the user's
    training positives (test rows; empty in train rows). Train has every user with a train positive,
    test every user with a test positive.
    """
    path = _movielens_file(Path(source))
    ratings = _read_ratings(path)
    if len(ratings) == 0:
        raise DataError("no ratings", file=str(path))
    train_mask, test_mask = movielens_split(ratings)
    tr_users, tr_counts, tr_items = _group(ratings[train_mask, 0], ratings[train_mask, 1])
    te_users, te_counts, te_items = _group(ratings[test_mask, 0], ratings[test_mask, 1])

    def ids(users: np.ndarray) -> pa.ListArray:
        return list_array(users.astype(np.int64), np.ones(len(users), dtype=np.int64),
                           pa.int64())

    train = pa.table({
        "id": pa.array(tr_users, type=pa.int64()),
        "feature_ids": ids(tr_users),
        "labels": list_array(tr_items, tr_counts, pa.int64()),
        "exclude": list_array(np.empty(0, dtype=np.int64), np.zeros(len(tr_users), np.int64),
                               pa.int64()),
    })
    # Every test user has train positives (n >= 5 and at most round(0.2 n) < n go to test).
    pos = np.searchsorted(tr_users, te_users)
    ex_counts = tr_counts[pos]
    gather = _ranges(np.r_[0, np.cumsum(tr_counts)][pos], ex_counts)
    test = pa.table({
        "id": pa.array(te_users, type=pa.int64()),
        "feature_ids": ids(te_users),
        "labels": list_array(te_items, te_counts, pa.int64()),
        "exclude": list_array(tr_items[gather], ex_counts, pa.int64()),
    })
    return train, test


def download_movielens(dest: str | os.PathLike, url: str = MOVIELENS_URL) -> Path:
    """Fetch the GroupLens ml-100k zip into ``dest`` and unpack it; returns ``dest/ml-100k``.

    An existing ``dest/ml-100k/u.data`` is reused without a download.
    """
    dest = Path(dest)
    target = dest / "ml-100k"
    if (target / "u.data").is_file():
        return target
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AweError(f"movielens: cannot download {url} ({reason}); download and unzip it by "
                       f"hand and pass --source DIR") from exc
    try:
        archive = zipfile.ZipFile(io.BytesIO(payload))
    except zipfile.BadZipFile as exc:
        raise AweError(f"movielens: {url} did not return a zip archive") from exc
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        for member in members:
            parts = Path(member.filename).parts
            if member.filename.startswith("/") or ".." in parts:
                raise AweError(f"movielens: unsafe path {member.filename!r} in {url}")
        if not any(Path(m.filename).parts[-2:] == ("ml-100k", "u.data") for m in members):
            raise AweError(f"movielens: {url} has no ml-100k/u.data")
        for member in members:
            out = dest / member.filename
            with archive.open(member) as src, atomic_path(out) as tmp, open(tmp, "wb") as fh:
                shutil.copyfileobj(src, fh)
    return target
