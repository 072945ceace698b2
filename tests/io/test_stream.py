"""Streaming training (--shuffle-buffer) and sharded synthetic data (`awe data synthetic
--shards`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from awe.affinity.g import AffinityConfig
from awe.affinity.stage import build_g
from awe.errors import AweError
from awe.io.datasets import SHARD_ROW_GROUP, synthetic_shards
from awe.io.reader import Columns, scan
from awe.io.stream import ShuffleStream
from awe.pipeline import retrain_awe, train_wsabie
from awe.predict.evaluation import evaluate_model
from awe.training.config import TrainConfig
from cli.main import app
from tests.training.test_checkpoint import Crash, crash_after, outcome

runner = CliRunner()


def numbered(tmp_path, n_files=3, rows=500, group=100, width=4):
    """Files whose feature 0 is the row's global number: the stream's order is visible."""
    paths, first = [], 0
    for f in range(n_files):
        x = np.zeros((rows, width), np.float32)
        x[:, 0] = np.arange(first, first + rows)
        table = pa.table({"features": list(x),
                          "labels": [[f"l{i % 5}"] for i in range(first, first + rows)]})
        paths.append(tmp_path / "d" / f"part-{f}.parquet")
        paths[-1].parent.mkdir(exist_ok=True)
        pq.write_table(table, paths[-1], row_group_size=group)
        first += rows
    return tmp_path / "d"


def stream_of(path, buffer_rows, seed=0, batch_size=64):
    found = scan(path, Columns())
    return ShuffleStream.open(path, found.schema, found.vocab, buffer_rows, seed, "annotation",
                              batch_size)


def epoch_rows(stream, epoch):
    return [b.dense[:, 0].astype(np.int64) for b in stream.blocks(epoch)]


def test_every_row_once_per_epoch_in_a_seeded_order(tmp_path):
    path = numbered(tmp_path)
    stream = stream_of(path, buffer_rows=300)
    assert len(stream.shards) == 15 and len(stream) == 1500
    first = epoch_rows(stream, 1)
    assert all(len(b) <= stream.block_rows for b in first)
    order = np.concatenate(first)
    assert sorted(order.tolist()) == list(range(1500))
    assert np.array_equal(order, np.concatenate(epoch_rows(stream, 1)))  # a function of the seed
    assert not np.array_equal(order, np.concatenate(epoch_rows(stream, 2)))  # and of the epoch
    assert not np.array_equal(order, np.concatenate(epoch_rows(stream_of(path, 300, seed=1), 1)))
    # shards are visited out of file order and rows mix across them
    assert len({int(r) // 100 for r in order[:150]}) > 2
    assert abs(np.corrcoef(np.arange(1500), order)[0, 1]) < 0.2


def test_the_stream_holds_at_most_a_buffer_and_a_block(tmp_path):
    """With a buffer of B rows, the k-th row out was read among the first k + B + block rows:
    no more rows are ever held. Checked for every row against the epoch's shard order."""
    path = numbered(tmp_path)
    stream = stream_of(path, buffer_rows=300)
    rng = np.random.default_rng([0, 1])
    shard_order = rng.permutation(len(stream.shards))
    read_position = np.empty(1500, np.int64)  # when each row was read
    pos = 0
    for s in shard_order:
        shard = stream.shards[s]
        read_position[shard.first:shard.first + shard.n_rows] = pos + np.arange(shard.n_rows)
        pos += shard.n_rows
    emitted = np.concatenate(epoch_rows(stream, 1))
    ahead = read_position[emitted] - np.arange(1500)  # read this many rows before it went out
    assert ahead.max() < 300 + stream.block_rows
    assert ahead.max() > 300 - stream.block_rows  # the buffer is used (rows do wait in it)


def test_holdout_rows_leave_the_stream(tmp_path):
    path = numbered(tmp_path)
    stream, valid = stream_of(path, 200).split(0.1, "annotation", seed=3)
    held = valid.dense[:, 0].astype(np.int64)
    assert len(held) == 150 and np.array_equal(held, stream.exclude)
    rows = np.concatenate(epoch_rows(stream, 1))
    assert len(rows) == 1350 and not set(rows.tolist()) & set(held.tolist())
    assert len(stream) == 1350
    with pytest.raises(AweError, match="annotation only"):
        stream_of(path, 200).split(0.1, "recommendation", seed=3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    synthetic_shards(root, "imagenet", seed=0, rows=12_000, test_rows=3_000, classes=150,
                     shards=4)
    return root


def test_synthetic_shards_layout_and_content(shards, tmp_path):
    train = sorted((shards / "train").glob("*.parquet"))
    assert [p.name for p in train] == [f"part-{i:05d}.parquet" for i in range(4)]
    files = [pq.ParquetFile(p) for p in train]
    assert [f.metadata.num_rows for f in files] == [3000] * 4
    assert all(f.metadata.row_group(0).num_rows == min(3000, SHARD_ROW_GROUP) for f in files)
    assert files[0].schema_arrow.metadata[b"awe.task"] == b"annotation"
    table = pq.read_table(shards / "train")
    x = np.stack(table["features"].to_numpy(zero_copy_only=False))
    assert x.shape == (12_000, 474)
    # standardised with the population moments: close to the sample's
    assert np.abs(x.mean(0)).max() < 0.1 and np.abs(x.std(0) - 1).max() < 0.1
    assert table["id"].to_pylist() == list(range(12_000))
    assert len(set(table["labels"].combine_chunks().flatten().to_pylist())) == 150
    test = pq.read_table(shards / "test")
    assert test.num_rows == 3000 and test["id"][0].as_py() == 12_000
    # deterministic, and rerunning replaces the directories whole
    again = synthetic_shards(tmp_path, "imagenet", seed=0, rows=12_000, test_rows=3_000,
                             classes=150, shards=4)
    assert [p.read_bytes() for p in again[:4]] == [p.read_bytes() for p in train]
    synthetic_shards(tmp_path, "imagenet", seed=0, rows=100, test_rows=0, classes=4, shards=2)
    assert len(list((tmp_path / "train").iterdir())) == 2 and not list(tmp_path.glob(".*"))


def test_streaming_quality_matches_in_memory(shards, tmp_path):
    results = {}
    for name, buffer in (("memory", None), ("stream", 2000)):
        config = TrainConfig(epochs=6, dim=32, seed=0, threads=1, valid_fraction=0.1,
                             shuffle_buffer=buffer)
        train_wsabie(shards / "train", tmp_path / name, config)
        results[name] = evaluate_model(tmp_path / name, shards / "test", [1, 5],
                                       rows=["wsabie"])["wsabie"]
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert saved["stage1"]["train"]["shuffle_buffer"] == buffer
    assert results["memory"]["P@1"] > 0.3  # far above chance (1/150)
    assert results["stream"]["P@1"] > results["memory"]["P@1"] - 0.03, results
    assert results["stream"]["P@5"] > results["memory"]["P@5"] - 0.03, results
    metrics = json.loads((tmp_path / "stream" / "metrics.json").read_text())["wsabie"]
    assert metrics["valid_rows"] == 1200 and metrics["train_rows"] == 10_800


def test_streaming_stage3(shards, tmp_path):
    model = tmp_path / "m"
    train_wsabie(shards / "train", model, TrainConfig(epochs=3, dim=16, threads=1,
                                                      shuffle_buffer=1500))
    build_g(shards / "train", model, AffinityConfig(neighbors=10, threads=1))
    retrain_awe(shards / "train", model, TrainConfig(epochs=2, dim=16, lr=0.01, threads=1,
                                                     shuffle_buffer=1500))
    rows = evaluate_model(model, shards / "test", [1], rows=["knn-wsabie", "wsabie", "awe"])
    assert rows["awe"]["P@1"] > rows["wsabie"]["P@1"], rows


def test_streamed_g_equals_loaded_g(tmp_path, monkeypatch):
    """build-g reads the rows a batch at a time (embeddings memory-mapped beyond the budget: here
    always) and gets the bits G gets from the rows loaded; files of odd sizes, chunks of 64."""
    import torch

    from awe.affinity import g as affinity_lib
    from awe.affinity import stage as stage_lib
    from awe.io.reader import load_examples

    path = numbered(tmp_path, n_files=3, rows=150, group=70)
    found = scan(path, Columns())
    u = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    config = AffinityConfig(neighbors=5, batch_rows=64, threads=1)
    loaded = affinity_lib.build_affinity(load_examples(path, found.schema, found.vocab),
                                         len(found.vocab), config, u)
    monkeypatch.setattr(stage_lib, "EMBED_MEMORY_BUDGET", 0)
    streamed = stage_lib.build_affinity_streamed(path, found.schema, found.vocab, config, u,
                                                    None, tmp_path / "scratch")
    for a, b in ((loaded[1], streamed[1]), (loaded[0].train_labels, streamed[0].train_labels)):
        assert all(np.array_equal(x, y) for x, y in zip(
            (a.indptr, a.indices, a.values), (b.indptr, b.indices, b.values), strict=True)
            if x is not None)
    assert np.array_equal(loaded[0].train_sq_norms, streamed[0].train_sq_norms)
    assert loaded[2]["lambda"] == streamed[2]["lambda"]
    assert not list((tmp_path / "scratch").iterdir())  # the memory-mapped file is gone


def test_streaming_two_rounds(shards, tmp_path):
    model = tmp_path / "m"
    train_wsabie(shards / "train", model, TrainConfig(epochs=2, dim=8, threads=1,
                                                      shuffle_buffer=1500))
    build_g(shards / "train", model, AffinityConfig(neighbors=5, threads=1))
    retrain_awe(shards / "train", model, TrainConfig(epochs=1, dim=8, lr=0.01, threads=1,
                                                     shuffle_buffer=1500), rounds=2)
    config = json.loads((model / "config.json").read_text())
    assert config["stage3"]["round"] == 2 and config["stage2"]["source"] == "awe round 1"


def test_streaming_resume_mid_epoch_is_bit_identical(tmp_path, monkeypatch):
    path = numbered(tmp_path, n_files=2, rows=400, group=100)
    config = TrainConfig(epochs=2, dim=8, batch_size=32, valid_fraction=0.2, seed=4, threads=1,
                         shuffle_buffer=150)
    train_wsabie(path, tmp_path / "plain", config, checkpoints=False)
    expected = outcome(tmp_path / "plain", "wsabie.safetensors", "history.csv", "wsabie")
    for k in (3, 11):  # inside epoch 1 of the select phase; inside the refit
        crash_after(monkeypatch, k)
        with pytest.raises(Crash):
            train_wsabie(path, tmp_path / f"k{k}", config, checkpoint_every=4)
        monkeypatch.undo()
        train_wsabie(path, tmp_path / f"k{k}", config, checkpoint_every=4, resume=True)
        assert outcome(tmp_path / f"k{k}", "wsabie.safetensors", "history.csv",
                       "wsabie") == expected


def test_streaming_reports_bad_rows_with_file_and_row(tmp_path):
    path = numbered(tmp_path, n_files=2, rows=300, group=100)
    table = pq.read_table(path / "part-1.parquet")
    x = np.stack(table["features"].to_numpy(zero_copy_only=False))
    x[250, 2] = math.nan
    pq.write_table(table.set_column(0, "features", pa.array(list(x))), path / "part-1.parquet",
                   row_group_size=100)
    result = runner.invoke(app, ["train", str(path), "--model", str(tmp_path / "m"),
                                 "--shuffle-buffer", "100", "--epochs", "1", "--quiet"])
    assert result.exit_code == 2
    assert "part-1.parquet, row 250, column 'features': NaN" in result.output


def test_cli_sharded_data_then_streaming_train(tmp_path):
    out = tmp_path / "data"
    result = runner.invoke(app, ["data", "synthetic", "--preset", "imagenet", "--rows", "3000",
                                 "--test-rows", "500", "--classes", "10", "--shards", "3",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "train/part-00002.parquet" in result.output.replace("\n", "")
    result = runner.invoke(app, ["train", str(out / "train"), "--model", str(tmp_path / "m"),
                                 "--shuffle-buffer", "500", "--epochs", "2", "--dim", "8",
                                 "--quiet", "--threads", "1"])
    assert result.exit_code == 0, result.output
    for bad in (["--shuffle-buffer", "0"],):
        result = runner.invoke(app, ["train", str(out / "train"), "--model",
                                     str(tmp_path / "x"), *bad])
        assert result.exit_code == 2 and "--shuffle-buffer must be >= 1" in result.output
    result = runner.invoke(app, ["data", "movielens", "--out", str(tmp_path / "ml"),
                                 "--shards", "2"])
    assert result.exit_code == 2 and "No such option: --shards" in result.output
