"""Datasets in the data contract: the synthetic generator, and the registry of `awe data`
(the synthetic presets, and Fashion-MNIST and MovieLens 100k from :mod:`awe.io.public`).

Every builder returns ``(train, test)`` pyarrow Tables; :func:`write_split` writes them as
``train.parquet`` / ``test.parquet`` with the task ("annotation" or "recommendation") in the parquet
schema metadata under ``b"awe.task"``.

Columns (see ``data/README.md`` for the dataset cards):

* ``id`` int64, unique across the two splits of a dataset;
* ``features`` list<float32> of a fixed length per dataset (dense data), or ``feature_ids``
  list<int64> (sparse data, values implicitly 1);
* ``labels`` list<string> (annotation) or list<int64> (recommendation item ids);
* ``exclude`` list<int64> (recommendation only): the user's training positives, to leave out of
  the user's ranking. Both splits carry it so that they share one schema; train rows hold [].

Row groups are 65,536 rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from awe.artifacts import atomic_path, replaced_directory
from awe.errors import AweError
from awe.io.public import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT,
    MOVIELENS_URL,
    download_movielens,
    fashion_mnist,
    movielens,
)
from awe.io.reader import (
    TASK_METADATA_KEY,
    TASKS,
    read_task,
)
from awe.io.writer import dense_column, string_labels

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "MOVIELENS_URL",
    "TASKS",
    "TASK_KEY",
    "download_movielens",
    "fashion_mnist",
    "make_dataset",
    "movielens",
    "read_task",
    "synthetic",
    "synthetic_shards",
    "write_split",
]

TASK_KEY = TASK_METADATA_KEY  # one key, defined with the reader in awe.data
ROW_GROUP_SIZE = 65536


# --------------------------------------------------------------------------------------------
# Writing


def write_split(out_dir: str | os.PathLike, train: pa.Table, test: pa.Table,
                task: str) -> list[Path]:
    """Write ``out_dir/{train,test}.parquet`` atomically, tagged ``task``; return the paths."""
    if task not in TASKS:
        raise AweError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    out_dir = Path(out_dir)
    written = []
    for name, table in (("train", train), ("test", test)):
        path = out_dir / f"{name}.parquet"
        meta = dict(table.schema.metadata or {})
        meta[TASK_KEY] = task.encode()
        table = table.replace_schema_metadata(meta)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# Synthetic data


@dataclass(frozen=True)
class _Preset:
    rows: int
    test_rows: int
    classes: int
    features: int
    signal_dim: int  # dimension of the subspace the examples live in before the noise
    clusters: tuple[int, int]  # clusters per label, inclusive range
    label_scale: float  # std of a label's mean: the linear part of the label signal
    centre_scale: float  # std of a cluster's centre around its label's mean: the local part
    spread: float  # std of an example around its cluster's centre
    noise: float  # std of the isotropic noise added in feature space
    multi_label: bool  # 0-3 co-occurring tags per label besides its own, or one label
    co_rate: float  # probability that an example has each of its label's co-occurring tags
    tag_weight: float  # an example moves this far towards the mean of each co-occurring tag
    drop: float  # probability that a tag an example has is missing from its labels
    label_format: str


_PRESETS = {
    "magnatagatune": _Preset(rows=16_000, test_rows=5_000, classes=160, features=104,
                             signal_dim=64, clusters=(3, 6), label_scale=0.9, centre_scale=1.2,
                             spread=0.8, noise=3.0, multi_label=True, co_rate=0.5,
                             tag_weight=0.8, drop=0.1, label_format="tag{:03d}"),
    "imagenet": _Preset(rows=50_000, test_rows=10_000, classes=1_000, features=474,
                        signal_dim=64, clusters=(3, 6), label_scale=0.6, centre_scale=1.2,
                        spread=1.0, noise=3.5, multi_label=False, co_rate=0.0, tag_weight=0.0,
                        drop=0.0, label_format="class{:05d}"),
}


def _positive(name: str, value: int | None, default: int, minimum: int = 1) -> int:
    if value is None:
        return default
    if int(value) != value or value < minimum:
        raise AweError(f"synthetic: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass
class _World:
    """A synthetic dataset's structure: label means, clusters and their tags, the embedding."""

    p: _Preset
    n_labels: int
    n_features: int
    d_signal: int
    label_means: np.ndarray  # [labels, d_signal]
    centres: np.ndarray  # [clusters, d_signal]
    embed: np.ndarray  # [d_signal, features]
    cluster_tags: np.ndarray  # [clusters, max tags]: the owner, then co-occurring tags; -1 = none
    names: np.ndarray

    def draw(self, rng: np.random.Generator, n: int, dtype=np.float64,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n examples: features (not yet standardised), their tags flat, tags per example."""
        p, n_clusters = self.p, len(self.centres)
        cluster = rng.integers(0, n_clusters, size=n)
        tags = self.cluster_tags[cluster]
        has = tags >= 0
        if tags.shape[1] > 1:  # each co-occurring tag, independently per example
            has[:, 1:] &= rng.random((n, tags.shape[1] - 1)) < p.co_rate
        z = self.centres[cluster] + rng.standard_normal((n, self.d_signal), dtype=dtype) * p.spread
        if p.tag_weight and tags.shape[1] > 1:
            co = np.where(has[:, 1:, None], self.label_means[tags[:, 1:]], 0.0)
            z += (p.tag_weight * co.sum(axis=1)).astype(dtype)
        x = z @ self.embed + rng.standard_normal((n, self.n_features), dtype=dtype) * p.noise
        keep = has
        if p.drop > 0:
            keep &= rng.random(tags.shape) >= p.drop
            keep[:, 0] |= ~keep.any(axis=1)  # never drop every tag: keep the owner's
        return x, tags[keep], keep.sum(axis=1)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """The population mean and std of every feature (clusters drawn uniformly): what a
        sample's moments converge to, known without drawing the sample."""
        # through d x d covariances: the clusters x features projection of all centres would
        # be 350 MB at 21k classes
        p, d = self.p, self.d_signal
        co = self.cluster_tags[:, 1:]
        centres = self.centres
        extra = np.zeros((d, d))
        if p.tag_weight and co.shape[1]:
            present = co >= 0
            pulled = np.where(present[:, :, None], self.label_means[co], 0.0).sum(axis=1)
            centres = centres + p.tag_weight * p.co_rate * pulled
            counts = np.bincount(co[present], minlength=self.n_labels)
            # each co-occurring tag is there with probability co_rate: its pull's variance
            extra = (p.tag_weight ** 2 * p.co_rate * (1 - p.co_rate) / len(co)
                     * (self.label_means.T * counts) @ self.label_means)
        mean = centres.mean(axis=0) @ self.embed
        cov = np.cov(centres, rowvar=False, bias=True).reshape(d, d)
        cov = cov + extra + p.spread ** 2 * np.eye(d)
        var = np.einsum("ij,ik,kj->j", self.embed, cov, self.embed) + p.noise ** 2
        return mean, np.sqrt(var)

    def table(self, x: np.ndarray, tags: np.ndarray, lengths: np.ndarray, first_id: int,
              mean: np.ndarray, std: np.ndarray) -> pa.Table:
        return pa.table({
            "id": pa.array(np.arange(first_id, first_id + len(x), dtype=np.int64)),
            "features": dense_column((x - mean) / std),
            "labels": string_labels(self.names, tags, lengths),
        })


def _world(preset: str, rng: np.random.Generator, classes: int | None, features: int | None,
           ) -> _World:
    if preset not in _PRESETS:
        raise AweError(f"unknown synthetic preset {preset!r}; choose one of {', '.join(_PRESETS)}")
    p = _PRESETS[preset]
    n_labels = _positive("classes", classes, p.classes, minimum=2)
    n_features = _positive("features", features, p.features)
    d_signal = min(p.signal_dim, n_features)
    per_label = rng.integers(p.clusters[0], p.clusters[1] + 1, size=n_labels)
    owner = np.repeat(np.arange(n_labels), per_label)
    n_clusters = len(owner)
    label_means = rng.standard_normal((n_labels, d_signal)) * p.label_scale
    centres = label_means[owner] + rng.standard_normal((n_clusters, d_signal)) * p.centre_scale
    embed = rng.standard_normal((d_signal, n_features)) / np.sqrt(d_signal)
    max_tags = 4 if p.multi_label else 1
    cluster_tags = np.full((n_clusters, max_tags), -1, dtype=np.int64)
    cluster_tags[:, 0] = owner
    if p.multi_label:
        # 0-3 co-occurring tags per label, on every cluster of the label: drawn without
        # replacement proportional to a Zipf (s = 1) popularity (Gumbel top-k), never the label
        k = min(max_tags - 1, n_labels - 1)
        popularity = (1.0 / np.arange(1, n_labels + 1))[rng.permutation(n_labels)]
        keys = np.log(popularity)[None, :] + rng.gumbel(size=(n_labels, n_labels))
        keys[np.arange(n_labels), np.arange(n_labels)] = -np.inf
        extra = np.argsort(-keys, axis=1)[:, :k]
        n_extra = rng.integers(0, k + 1, size=n_labels)
        co = np.where(np.arange(k)[None, :] < n_extra[:, None], extra, -1)
        cluster_tags[:, 1:1 + k] = co[owner]
    names = np.array([p.label_format.format(i) for i in range(n_labels)])
    return _World(p, n_labels, n_features, d_signal, label_means, centres, embed, cluster_tags,
                  names)


def synthetic(preset: str = "magnatagatune", seed: int = 0, rows: int | None = None,
              test_rows: int | None = None, classes: int | None = None,
              features: int | None = None) -> tuple[pa.Table, pa.Table]:
    """A synthetic annotation dataset whose label signal a linear embedding captures well but
    not fully: a linear part per label plus a local, non-linear part.

    Linear part: every label has a mean in a low-dimensional signal subspace, and (with
    ``preset="magnatagatune"``) 0-3 co-occurring tags drawn from a Zipf-like popularity; an
    example has each of its label's co-occurring tags with probability ``co_rate`` and then lies
    ``tag_weight`` of the way towards each such tag's mean, so which tags it has shows linearly
    in its features. Local part: every label owns 3-6 clusters whose centres scatter around the
    label's mean; an example is drawn around its cluster's centre. The subspace is embedded into
    feature space by a random linear map, and isotropic noise is added in every feature, so
    neighbours in input space are noisier than in a learnt embedding. Each tag an example has is
    missing from its labels with probability ``drop`` (never all of them). With
    ``preset="imagenet"`` each example has exactly one label. Features are standardised with the
    train split's mean and std. Deterministic in ``seed``. See ``data/README.md`` for the
    parameters and the measured rows of the paper's table.
    """
    if preset not in _PRESETS:
        raise AweError(f"unknown synthetic preset {preset!r}; choose one of {', '.join(_PRESETS)}")
    p = _PRESETS[preset]
    n_train = _positive("rows", rows, p.rows)
    n_test = _positive("test_rows", test_rows, p.test_rows, minimum=0)
    rng = np.random.default_rng(seed)
    world = _world(preset, rng, classes, features)
    x_train, tags_train, len_train = world.draw(rng, n_train)
    x_test, tags_test, len_test = world.draw(rng, n_test)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    return (world.table(x_train, tags_train, len_train, 0, mean, std),
            world.table(x_test, tags_test, len_test, n_train, mean, std))


SHARD_ROW_GROUP = 16_384  # rows per row group of a sharded dataset: the streaming shuffle's unit


def synthetic_shards(out_dir: str | os.PathLike, preset: str = "imagenet", seed: int = 0,
                     rows: int | None = None, test_rows: int | None = None,
                     classes: int | None = None, shards: int = 1,
                     features: int | None = None) -> list[Path]:
    """:func:`synthetic`'s dataset as sharded parquet, generated without holding it in memory:
    ``out_dir/train/part-NNNNN.parquet`` (``shards`` files) and ``out_dir/test/...`` (as many
    files as the test rows need at the train shards' size), row groups of
    :data:`SHARD_ROW_GROUP` rows.

    The same structure (clusters, labels, embedding) as :func:`synthetic` for a seed; the rows
    are drawn a row group at a time from their own seeded generators, and features are
    standardised with the population moments (computed from the structure, so no first pass), so
    the rows differ from the unsharded dataset's. Memory is one row group. Each split is written
    into a staging directory and renamed into place.
    """
    if preset not in _PRESETS:
        raise AweError(f"unknown synthetic preset {preset!r}; choose one of {', '.join(_PRESETS)}")
    p = _PRESETS[preset]
    n_train = _positive("rows", rows, p.rows)
    n_test = _positive("test_rows", test_rows, p.test_rows, minimum=0)
    shards = _positive("shards", shards, 1)
    if shards > n_train:
        raise AweError(f"synthetic: --shards {shards} is more than the {n_train} rows")
    world = _world(preset, np.random.default_rng(seed), classes, features)
    mean, std = world.moments()
    per_shard = -(-n_train // shards)
    out_dir = Path(out_dir)
    written = _write_split_shards(out_dir / "train", world, seed, 0, n_train, per_shard, 0, mean,
                                  std)
    if n_test:
        written += _write_split_shards(out_dir / "test", world, seed, 1, n_test, per_shard,
                                       n_train, mean, std)
    return written


def _write_split_shards(target: Path, world: _World, seed: int, split: int, n_rows: int,
                        per_shard: int, first_id: int, mean: np.ndarray, std: np.ndarray,
                        ) -> list[Path]:
    names = []
    with replaced_directory(target) as stage:
        for shard, start in enumerate(range(0, n_rows, per_shard)):
            name = f"part-{shard:05d}.parquet"
            writer = None
            try:
                for group, g0 in enumerate(range(start, min(start + per_shard, n_rows),
                                                 SHARD_ROW_GROUP)):
                    n = min(SHARD_ROW_GROUP, start + per_shard - g0, n_rows - g0)
                    rng = np.random.default_rng([seed, split, shard, group])
                    x, tags, lengths = world.draw(rng, n, dtype=np.float32)
                    table = world.table(x, tags, lengths, first_id + g0, mean, std)
                    table = table.replace_schema_metadata({TASK_KEY: b"annotation"})
                    if writer is None:
                        writer = pq.ParquetWriter(stage / name, table.schema)
                    writer.write_table(table, row_group_size=SHARD_ROW_GROUP)
            finally:
                if writer is not None:
                    writer.close()
            names.append(name)
    return [target / name for name in names]


# --------------------------------------------------------------------------------------------
# Registry

DATASETS = {"synthetic", "fashion-mnist", "movielens"}
_TASK_OF = {"synthetic": "annotation", "fashion-mnist": "annotation",
            "movielens": "recommendation"}


def make_dataset(name: str, out_dir: str | os.PathLike, *, source: str | os.PathLike | None = None,
                 preset: str = "magnatagatune", seed: int = 0, rows: int | None = None,
                 test_rows: int | None = None, classes: int | None = None,
                 shards: int | None = None) -> list[Path]:
    """Build dataset ``name`` and write its train/test parquet files into ``out_dir``
    (``shards``, synthetic only: ``train/`` and ``test/`` directories of parquet shards,
    generated a row group at a time)."""
    if name not in DATASETS:
        raise AweError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    if shards is not None:
        if name != "synthetic":
            raise AweError("--shards applies to `awe data synthetic` only")
        return synthetic_shards(out_dir, preset, seed=seed, rows=rows, test_rows=test_rows,
                                classes=classes, shards=shards)
    if name == "synthetic":
        train, test = synthetic(preset, seed=seed, rows=rows, test_rows=test_rows,
                                classes=classes)
    elif name == "fashion-mnist":
        train, test = fashion_mnist(source if source is not None else FASHION_MNIST_DEFAULT)
    else:
        if source is None:
            raise AweError("movielens needs --source DIR (the GroupLens ml-100k directory)")
        train, test = movielens(source)
    return write_split(out_dir, train, test, _TASK_OF[name])
