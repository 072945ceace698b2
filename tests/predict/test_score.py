"""`awe score`: batch scoring of parquet files to top-k parquet, through the CLI (contract tests).

Small data: a 3-stage model on clustered rows (6 labels) and inputs of a few hundred rows split
into several row groups, so that every path (row groups, several files, Dask tasks) is taken.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from awe import AWE
from awe.io.reader import load_examples
from awe.predict.predictor import Predictor
from cli.main import app
from tests.affinity.test_affinity import write_clusters

runner = CliRunner()


def invoke(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def rows(path, n, seed, ids=None, row_group=64, **more):
    """Clustered rows without labels (as scored in production), optional ids, in row groups."""
    table = pq.read_table(write_clusters(path, n, seed)).drop(["labels"])
    if ids is not None:
        table = table.append_column("id", pa.array(ids))
    for name, values in more.items():
        table = table.append_column(name, values)
    pq.write_table(table, path, row_group_size=row_group)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    train = write_clusters(root / "train.parquet", 300, 0)
    model = root / "model"
    invoke("train", train, "--model", model, "--epochs", 3, "--dim", 8, "--threads", 1,
           "--quiet", "--no-checkpoint")
    invoke("build-g", train, "--model", model, "--neighbors", 5, "--threads", 1)
    invoke("retrain", train, "--model", model, "--epochs", 2, "--threads", 1, "--quiet",
           "--no-checkpoint")
    return model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A directory of three files (one in a subdirectory) with int ids, and a single file."""
    root = tmp_path_factory.mktemp("inputs")
    folder = root / "in"
    (folder / "sub").mkdir(parents=True)
    rows(folder / "a.parquet", 150, 1, ids=np.arange(150) * 3)
    rows(folder / "b.parquet", 100, 2, ids=np.arange(1000, 1100))
    rows(folder / "sub" / "c.parquet", 70, 3, ids=np.arange(70) + 5000)
    return folder


def read(path) -> pa.Table:
    return pq.read_table(path)


def tmp_files(directory):
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("stage", ["wsabie", "awe"])
def test_single_file_is_the_eval_prediction_path(model, inputs, tmp_path, stage):
    out = tmp_path / "scored.parquet"
    result = invoke("score", inputs / "a.parquet", "--model", model, "--out", out, "--k", 3,
                    "--stage", stage, "--batch-rows", 40)
    assert f"wrote {out}" in result.output
    table = read(out)
    assert table.column_names == ["id", "labels", "scores"]
    assert table.schema.field("scores").type == pa.list_(pa.float32())
    assert table.column("id").to_pylist() == list(np.arange(150) * 3)  # input order
    predictor = Predictor(model)
    examples = load_examples(inputs / "a.parquet", predictor.schema, predictor.vocab,
                             require_labels=False)
    expected = predictor.predict_table(examples, 3, stage)
    assert table.column("labels").to_pylist() == expected.column("labels").to_pylist()
    np.testing.assert_array_equal(np.concatenate(table.column("scores").to_numpy()),
                                  np.concatenate(expected.column("scores").to_numpy()))
    assert all(len(x) == 3 for x in table.column("labels").to_pylist())
    meta = json.loads(pq.read_metadata(out).metadata[b"awe.score"])
    assert meta["stage"] == stage and meta["rows"] == 150 and meta["options"]["k"] == 3


def test_default_stage_is_the_newest(model, inputs, tmp_path):
    invoke("score", inputs / "b.parquet", "--model", model, "--out", tmp_path / "a.parquet")
    invoke("score", inputs / "b.parquet", "--model", model, "--out", tmp_path / "b.parquet",
           "--stage", "awe")
    assert read(tmp_path / "a.parquet").equals(read(tmp_path / "b.parquet"))
    assert len(read(tmp_path / "a.parquet").column("labels")[0]) == 6  # top-10 of 6 labels


@pytest.mark.parametrize("ids", [np.arange(90, dtype=np.int64) * 7,
                                 np.array([f"user-{i}" for i in range(90)], dtype=object)],
                         ids=["int", "string"])
def test_ids_pass_through(model, tmp_path, ids):
    source = rows(tmp_path / "in.parquet", 90, 4, ids=ids, row_group=25,
                  shop=pa.array([f"s{i % 4}" for i in range(90)]))
    out = tmp_path / "out.parquet"
    invoke("score", source, "--model", model, "--out", out, "--id-col", "id", "--id-col",
           "shop")
    table = read(out)
    assert table.column_names == ["id", "shop", "labels", "scores"]
    assert table.column("id").to_pylist() == list(ids)
    assert table.schema.field("id").type == (pa.int64() if ids.dtype != object else pa.string())
    assert table.column("shop").to_pylist() == [f"s{i % 4}" for i in range(90)]
    # without --id-col: `id` when present, nothing else
    invoke("score", source, "--model", model, "--out", tmp_path / "default.parquet")
    assert read(tmp_path / "default.parquet").column_names == ["id", "labels", "scores"]
    result = invoke("score", source, "--model", model, "--out", tmp_path / "x.parquet",
                    "--id-col", "user", code=2)
    assert "in.parquet" in result.output and "'user'" in result.output
    assert not (tmp_path / "x.parquet").exists()


def test_exclusion(model, inputs, tmp_path):
    plain = tmp_path / "plain.parquet"
    invoke("score", inputs / "b.parquet", "--model", model, "--out", plain, "--k", 3)
    top = read(plain).column("labels").to_pylist()
    # exclude each row's best label (and an unknown one): the rest moves up, in the same order
    seen = pa.array([[labels[0], "never-seen"] for labels in top])
    source = rows(tmp_path / "in.parquet", 100, 2, ids=np.arange(1000, 1100), seen=seen)
    out = tmp_path / "excluded.parquet"
    invoke("score", source, "--model", model, "--out", out, "--k", 2, "--exclude-col",
           "seen")
    got = read(out).column("labels").to_pylist()
    assert got == [labels[1:3] for labels in top]
    # the contract's `exclude` column is used without the option
    source2 = rows(tmp_path / "in2.parquet", 100, 2, ids=np.arange(1000, 1100), exclude=seen)
    invoke("score", source2, "--model", model, "--out", tmp_path / "e2.parquet", "--k", 2)
    assert read(tmp_path / "e2.parquet").column("labels").to_pylist() == got
    result = invoke("score", source, "--model", model, "--out", tmp_path / "x.parquet",
                    "--exclude-col", "nope", code=2)
    assert "'nope'" in result.output


def test_directory_gives_one_output_per_file(model, inputs, tmp_path):
    out = tmp_path / "out"
    result = invoke("score", inputs, "--model", model, "--out", out, "--k", 4)
    outputs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert outputs == ["a.parquet", "b.parquet", "sub/c.parquet"]
    assert "scored 320 rows into 3 file(s)" in result.output
    for name, n in (("a.parquet", 150), ("b.parquet", 100), ("sub/c.parquet", 70)):
        single = tmp_path / f"single-{n}.parquet"
        invoke("score", inputs / name, "--model", model, "--out", single, "--k", 4)
        assert read(out / name).equals(read(single))
        assert read(out / name).num_rows == n
        # one output row group per input row group
        assert (pq.read_metadata(out / name).num_row_groups
                == pq.read_metadata(inputs / name).num_row_groups)
    # a glob: paths relative to its fixed part
    glob_out = tmp_path / "glob"
    invoke("score", f"{inputs}/**/*.parquet", "--model", model, "--out", glob_out, "--k", 4)
    assert read(glob_out / "sub" / "c.parquet").equals(read(out / "sub" / "c.parquet"))


def test_out_inside_the_input_directory(model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rows(folder / "a.parquet", 40, 1)
    invoke("score", folder, "--model", model, "--out", folder / "scored")
    result = invoke("score", folder, "--model", model, "--out", folder / "scored")
    assert "skipped 1 output(s)" in result.output  # scored/a.parquet is no input
    assert sorted(p.name for p in (folder / "scored").iterdir()) == ["a.parquet"]


def test_run_again_skips_current_outputs(model, inputs, tmp_path):
    out = tmp_path / "out"
    invoke("score", inputs, "--model", model, "--out", out, "--k", 2)
    inodes = {p.name: p.stat().st_ino for p in out.rglob("*.parquet")}
    result = invoke("score", inputs, "--model", model, "--out", out, "--k", 2)
    assert "skipped 3 output(s)" in result.output and "wrote" not in result.output
    assert {p.name: p.stat().st_ino for p in out.rglob("*.parquet")} == inodes
    # other options, or --overwrite: written again
    result = invoke("score", inputs, "--model", model, "--out", out, "--k", 3)
    assert result.output.count("wrote") == 3
    assert len(read(out / "a.parquet").column("labels")[0]) == 3
    result = invoke("score", inputs, "--model", model, "--out", out, "--k", 3,
                    "--overwrite")
    assert result.output.count("wrote") == 3
    # a damaged output is not complete: written again
    (out / "b.parquet").write_bytes((out / "b.parquet").read_bytes()[:100])
    result = invoke("score", inputs, "--model", model, "--out", out, "--k", 3)
    assert result.output.count("wrote") == 1 and read(out / "b.parquet").num_rows == 100


def test_another_model_scores_again(model, inputs, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    out = tmp_path / "out.parquet"
    invoke("score", inputs / "b.parquet", "--model", copy, "--out", out)
    assert "skipped" in invoke("score", inputs / "b.parquet", "--model", model, "--out",
                               out).output  # a copy is the same model
    train = tmp_path / "train.parquet"
    write_clusters(train, 300, 5)
    invoke("build-g", train, "--model", copy, "--neighbors", 3, "--threads", 1)
    invoke("retrain", train, "--model", copy, "--epochs", 1, "--threads", 1, "--quiet",
           "--no-checkpoint")
    assert "wrote" in invoke("score", inputs / "b.parquet", "--model", copy, "--out",
                             out).output
    # the Wsabie stage did not change: its output stays current
    invoke("score", inputs / "b.parquet", "--model", copy, "--out", tmp_path / "w.parquet",
           "--stage", "wsabie")
    invoke("build-g", train, "--model", copy, "--neighbors", 4, "--threads", 1)
    assert "skipped" in invoke("score", inputs / "b.parquet", "--model", copy, "--out",
                               tmp_path / "w.parquet", "--stage", "wsabie").output


def bad_rows_input(folder):
    """Two files; the second has a NaN at row 7 and a short row at row 30."""
    folder.mkdir(parents=True)
    rows(folder / "a.parquet", 50, 1, ids=np.arange(50))
    table = pq.read_table(write_clusters(folder / "b.parquet", 60, 2)).drop(["labels"])
    x = np.stack(table.column("features").to_numpy(zero_copy_only=False)).astype(np.float32)
    x[7, 2] = np.nan
    features = [list(r) for r in x]
    features[30] = features[30][:4]
    table = pa.table({"features": pa.array(features, pa.list_(pa.float32())),
                      "id": pa.array(np.arange(60) + 100)})
    pq.write_table(table, folder / "b.parquet", row_group_size=16)
    return folder


def test_invalid_rows_fail_the_file_with_file_and_row(model, tmp_path):
    folder = bad_rows_input(tmp_path / "in")
    out = tmp_path / "out"
    result = invoke("score", folder, "--model", model, "--out", out, code=2)
    assert "b.parquet, row 7, column 'features': NaN" in result.output
    assert "--skip-invalid" in result.output and "Traceback" not in result.output
    assert (out / "a.parquet").exists() and not (out / "b.parquet").exists()
    assert tmp_files(out) == []


def test_skip_invalid_writes_rejects(model, tmp_path):
    folder = bad_rows_input(tmp_path / "in")
    out = tmp_path / "out"
    result = invoke("score", folder, "--model", model, "--out", out, "--skip-invalid")
    assert "2 rejected rows" in result.output
    scored = read(out / "b.parquet")
    assert scored.column("id").to_pylist() == [100 + i for i in range(60) if i not in (7, 30)]
    rejects = read(out / "b.rejects.parquet").to_pylist()
    assert [(r["row"], r["column"], r["id"]) for r in rejects] == [
        (7, "features", 107), (30, "features", 130)]
    assert rejects[0]["file"] == str(folder / "b.parquet")
    assert "NaN" in rejects[0]["reason"] and "features" in rejects[1]["reason"]
    assert not (out / "a.rejects.parquet").exists()
    # complete with its rejects: skipped; the rejects file removed: scored again
    assert "skipped 2" in invoke("score", folder, "--model", model, "--out", out,
                                 "--skip-invalid").output
    (out / "b.rejects.parquet").unlink()
    result = invoke("score", folder, "--model", model, "--out", out, "--skip-invalid")
    assert result.output.count("wrote") == 1 and (out / "b.rejects.parquet").exists()


@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    rng = np.random.default_rng(0)
    n, width = 240, 40
    label = rng.integers(0, 4, n)
    ids = [sorted(set((label[i] * 10 + rng.integers(0, 10, 3)).tolist())) for i in range(n)]
    train = root / "train.parquet"
    pq.write_table(pa.table({"feature_ids": ids, "labels": [[f"c{c}"] for c in label]}), train)
    model = root / "model"
    invoke("train", train, "--model", model, "--epochs", 3, "--dim", 8, "--threads", 1,
           "--quiet", "--no-checkpoint")
    assert json.loads((model / "config.json").read_text())["schema"]["n_features"] == width
    return model, ids


def test_sparse_inputs_and_out_of_range_ids(sparse_model, tmp_path):
    model, ids = sparse_model
    source = tmp_path / "in.parquet"
    bad = [list(r) for r in ids[:20]]
    bad[5] = [3, 99]  # the model knows ids 0..39
    pq.write_table(pa.table({"feature_ids": bad, "feature_values": [[1.0] * len(r) for r in bad],
                             "id": [f"u{i}" for i in range(20)]}), source)
    result = invoke("score", source, "--model", model, "--out", tmp_path / "o.parquet", code=2)
    assert "row 5, column 'feature_ids'" in result.output
    invoke("score", source, "--model", model, "--out", tmp_path / "o.parquet", "--skip-invalid",
           "--k", 2)
    table = read(tmp_path / "o.parquet")
    assert table.num_rows == 19 and "u5" not in table.column("id").to_pylist()
    assert read(tmp_path / "o.rejects.parquet").column("row").to_pylist() == [5]


def test_python_api_matches_the_cli(model, inputs, tmp_path):
    loaded = AWE.load(model)
    frame = loaded.predict(inputs / "a.parquet", k=3)
    invoke("score", inputs / "a.parquet", "--model", model, "--out", tmp_path / "o.parquet",
           "--k", 3)
    cli = read(tmp_path / "o.parquet").to_pandas()
    assert list(frame.columns) == ["id", "labels", "scores"]
    assert frame["id"].tolist() == cli["id"].tolist()
    assert [list(x) for x in frame["labels"]] == [list(x) for x in cli["labels"]]
    in_memory = loaded.predict(pq.read_table(inputs / "a.parquet").to_pandas(), k=3,
                             batch_rows=33)
    assert [list(x) for x in in_memory["labels"]] == [list(x) for x in cli["labels"]]
    summary = loaded.score_files(inputs, tmp_path / "api", k=3)
    assert len(summary.written) == 3
    assert read(tmp_path / "api" / "a.parquet").equals(read(tmp_path / "o.parquet"))


def test_without_dask_the_options_say_how_to_install(model, inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    for command in (("score", inputs / "a.parquet", "--out", tmp_path / "o.parquet"),):
        result = invoke(*command, "--model", model, "--workers", 2, code=2)
        assert "pip install 'awe[dask]'" in result.output
        assert len(result.output.strip().splitlines()) == 1
    result = invoke("build-g", inputs / "a.parquet", "--model", model, "--scheduler",
                    "tcp://127.0.0.1:1", code=2)
    assert "pip install 'awe[dask]'" in result.output


# ----------------------------------------------------------------------------- Dask

@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    import logging

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=logging.ERROR,
                                  memory_limit=0) as local, distributed.Client(local) as client:
        client.wait_for_workers(2)
        yield local.scheduler_address, client


def test_dask_equals_local(model, inputs, tmp_path, cluster):
    address, client = cluster
    local, remote = tmp_path / "local", tmp_path / "dask"
    options = ("--model", model, "--k", 4, "--batch-rows", 50)
    # and another thread count: a batch's result does not depend on it
    invoke("score", inputs, "--out", local, *options, "--threads", 2)
    invoke("score", inputs, "--out", remote, "--scheduler", address, *options, "--threads", 1)
    for name in ("a.parquet", "b.parquet", "sub/c.parquet"):
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    # 6 row groups: both workers took tasks, and each loaded the model once
    from awe import dask_cluster

    loads = client.run(dask_cluster.loads)
    assert sorted(w.get("score", 0) for w in loads.values()) == [1, 1]
    # skipped when current, whichever way it was written
    assert "skipped 3" in invoke("score", inputs, "--out", remote, *options, "--threads",
                                 1).output


def test_dask_local_workers_and_awe_stage_with_rejects(model, tmp_path):
    folder = bad_rows_input(tmp_path / "in")
    options = ("--model", model, "--skip-invalid", "--k", 3)
    invoke("score", folder, "--out", tmp_path / "local", *options)
    invoke("score", folder, "--out", tmp_path / "dask", "--workers", 2, *options)
    for name in ("a.parquet", "b.parquet", "b.rejects.parquet"):
        assert ((tmp_path / "local" / name).read_bytes()
                == (tmp_path / "dask" / name).read_bytes()), name
    result = invoke("score", bad_rows_input(tmp_path / "in2"), "--model", model, "--out",
                    tmp_path / "fail", "--workers", 2, code=2)
    assert "b.parquet, row 7, column 'features'" in result.output
    assert not (tmp_path / "fail" / "b.parquet").exists() and tmp_files(tmp_path / "fail") == []


@pytest.mark.parametrize("index", ["auto", "bf16"])
def test_dask_build_g_equals_local(index, model, tmp_path, cluster, monkeypatch):
    import shutil

    from awe import dask_cluster
    from awe.neighbors import sharded

    # 5 shards of query rows (the workers, other processes, keep the real bf16 blocks)
    monkeypatch.setattr(sharded, "SEARCH_SHARD_ROWS", 64)
    address, client = cluster
    # bf16: more rows than its first block (8192), so that the workers' searches screen too
    train = write_clusters(tmp_path / "train.parquet", 300 if index == "auto" else 9000, 0)
    local, remote = tmp_path / "local", tmp_path / "dask"
    shutil.copytree(model, local)
    shutil.copytree(model, remote)
    options = ("--neighbors", 6, "--kernel", "cosine", "--threads", 1, "--index", index)
    before = client.run(dask_cluster.loads)
    invoke("build-g", train, "--model", local, *options)
    invoke("build-g", train, "--model", remote, "--scheduler", address, *options)
    for name in ("index.faiss", "affinity.safetensors", "config.json"):
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    assert not list(remote.glob(".build-g-*"))  # the scratch directory is removed
    loads = client.run(dask_cluster.loads)
    added = [loads[w].get("index", 0) - before.get(w, {}).get("index", 0) for w in loads]
    assert added == [1, 1]  # once per worker


@pytest.mark.parametrize("threads", [1, 2])
def test_row_groups_score_across_groups_in_order_and_fail_in_order(model, tmp_path, threads):
    """The batches of the next row groups are scored before the last ones finish; the row
    groups come out as one at a time would give them, and an error comes in its place."""
    from awe.errors import DataError
    from awe.predict.batch import RowGroupScorer, ScoreOptions, load_predictor

    a = rows(tmp_path / "a.parquet", 200, 1, ids=np.arange(200), row_group=50)
    no_ids = rows(tmp_path / "b.parquet", 60, 2, row_group=50)
    predictor, stage = load_predictor(model, None)
    scorer = RowGroupScorer(predictor, stage, ScoreOptions(threads=threads, batch_rows=16,
                                                           id_cols=("id",)))
    tasks = [(str(a), number, 50 * number) for number in range(4)]
    one_at_a_time = [scorer.row_group(*task)[0] for task in tasks]
    assert [len(t) for t in one_at_a_time] == [50] * 4
    together = [table for table, _ in scorer.row_groups(tasks)]
    assert all(t.equals(u) for t, u in zip(one_at_a_time, together, strict=True))
    stream = scorer.row_groups([tasks[0], tasks[1], (str(no_ids), 0, 0), tasks[2]])
    assert next(stream)[0].equals(one_at_a_time[0])
    assert next(stream)[0].equals(one_at_a_time[1])
    with pytest.raises(DataError, match="b.parquet.*'id'"):
        next(stream)


def test_top_k_matches_a_plain_sort():
    """The one-topk fast path with its exact fallback (ties across the cut, -inf, NaN) equals
    ranking each row by (score descending, label id ascending)."""
    import torch

    from awe.ranking.topk import top_k

    rng = np.random.default_rng(0)
    for trial in range(200):
        n_rows, n_labels, k = rng.integers(1, 20), rng.integers(1, 25), int(rng.integers(1, 30))
        scores = (rng.normal(size=(n_rows, n_labels)) if trial % 3 == 0
                  else rng.integers(0, 3, size=(n_rows, n_labels)).astype(float))
        scores[rng.random(scores.shape) < 0.15] = -np.inf
        scores[rng.random(scores.shape) < 0.1] = np.nan
        ids, vals = top_k(torch.tensor(scores, dtype=torch.float32), k)
        for row, (got_ids, got_vals) in enumerate(zip(ids.tolist(), vals.tolist(), strict=True)):
            clean = np.where(np.isnan(scores[row]), -np.inf, scores[row]).astype(np.float32)
            ranked = sorted(range(n_labels), key=lambda y, c=clean: (-c[y], y))[:k]
            want = [y if clean[y] > -np.inf else -1 for y in ranked]
            want += [-1] * (k - len(want))
            assert got_ids == want, (trial, row)
            assert got_vals[:len(ranked)] == [float(clean[y]) for y in ranked]


def test_ahead_keeps_order_hands_over_errors_and_stops_when_closed():
    import threading

    from awe.predict.batch import _ahead

    assert list(_ahead(iter(range(20)))) == list(range(20))

    def failing():
        yield from (1, 2)
        raise ValueError("row group 3 is damaged")

    got = []
    with pytest.raises(ValueError, match="damaged"):
        for item in _ahead(failing()):
            got.append(item)
    assert got == [1, 2]  # the items before the error arrive, in order

    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    stream = _ahead(endless())
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()  # the producer stops: at most a queue's worth past what was taken
    assert not any(t.name == "awe-score-ahead" and t.is_alive() for t in threading.enumerate())
    assert len(produced) <= 4
