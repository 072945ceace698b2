"""Sparse inputs in their own space (G_orig, the knn-input row): exact sparse kNN over the
training rows, of any width, without a dense copy; cosine by default, l2 as an option, and for
dense inputs l2 by default, cosine as an option."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from awe.affinity.g import Affinity, AffinityConfig, build_affinity
from awe.affinity.stage import build_g
from awe.card import read_card
from awe.io.reader import Columns, load_examples, scan
from awe.pipeline import train_wsabie
from awe.predict.predictor import Predictor
from awe.training.config import TrainConfig
from cli.main import app
from tests.affinity.test_affinity import dense, reference_g, write_clusters

runner = CliRunner()
WIDTH = 6000  # wider than a dense search of the input space would take


def write_text(path, n_rows: int, seed: int, n_labels: int = 5):
    """Bag-of-words rows over WIDTH terms: each label owns a block of terms."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, n_labels, size=n_rows)
    block = WIDTH // n_labels
    ids = [np.unique(np.r_[rng.integers(y * block, y * block + 40, size=6),
                           rng.integers(0, WIDTH, size=4)]).tolist() for y in label]
    values = [rng.uniform(0.2, 1.0, size=len(r)).astype(np.float32).tolist() for r in ids]
    ids[0] = ids[0] + [WIDTH - 1]  # the schema's width
    values[0] = values[0] + [0.5]
    pq.write_table(pa.table({"feature_ids": ids, "feature_values": values,
                             "labels": [[f"t{y}"] for y in label]}), path)
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_every_default_command_runs_on_wide_sparse_input(tmp_path):
    train = write_text(tmp_path / "train.parquet", 400, 0)
    test = write_text(tmp_path / "test.parquet", 120, 1)
    model = tmp_path / "m"
    common = ("--epochs", 3, "--quiet", "--threads", 1)
    assert invoke("train", train, "--model", model, *common).exit_code == 0
    assert json.loads((model / "config.json").read_text())["schema"]["n_features"] == WIDTH
    r = invoke("build-g", train, "--model", model, "--threads", 1)
    assert r.exit_code == 0, r.output
    r = invoke("retrain", train, "--model", model, "--rounds", 1, *common)
    assert r.exit_code == 0, r.output
    r = invoke("eval", test, "--model", model, "--k", "1", "--json", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "e.json").read_text())
    assert set(rows) == {"knn-input", "knn-wsabie", "wsabie", "awe"}
    assert rows["knn-input"]["P@1"] > 0.8, rows  # the label's own terms find its rows
    # G_orig: stage 2 in the input space, saved and loaded, used by stage 3 and eval
    input_model = tmp_path / "input"
    assert invoke("train", train, "--model", input_model, *common).exit_code == 0
    r = invoke("build-g", train, "--model", input_model, "--space", "input", "--threads", 1)
    assert r.exit_code == 0, r.output
    section = json.loads((input_model / "config.json").read_text())["stage2"]
    assert section["index"]["kind"] == "sparse" and section["config"]["metric"] == "cosine"
    r = invoke("retrain", train, "--model", input_model, "--rounds", 1, *common)
    assert r.exit_code == 0, r.output
    r = invoke("eval", test, "--model", input_model, "--k", "1", "--json", tmp_path / "i.json")
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "i.json").read_text())
    assert again["knn-input"] == pytest.approx(rows["knn-input"])


def test_the_sparse_search_keeps_no_dense_copy(tmp_path, monkeypatch):
    """No [rows x features] array is made on the way: the dense path is never taken."""
    import awe.affinity.g as g_module

    train = write_text(tmp_path / "train.parquet", 200, 0)
    found = scan(train, Columns())
    examples = load_examples(train, found.schema, found.vocab)
    real = np.zeros

    def guarded(shape, *args, **kwargs):
        if isinstance(shape, tuple) and len(shape) == 2 and shape[1] >= WIDTH:
            raise AssertionError(f"a dense copy {shape}")
        return real(shape, *args, **kwargs)

    monkeypatch.setattr(g_module.np, "zeros", guarded)
    affinity, g, _ = build_affinity(examples, len(found.vocab),
                                    AffinityConfig(neighbors=5, space="input"), None)
    assert g.n_rows == 200 and affinity.index.kind == "sparse"
    affinity.examples_affinity(examples)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_dense_input_space_metric_is_an_option(tmp_path, metric):
    data = write_clusters(tmp_path / "train.parquet", 120, 0)
    found = scan(data, Columns())
    examples = load_examples(data, found.schema, found.vocab)
    config = AffinityConfig(neighbors=5, space="input", index="flat",
                            metric="auto" if metric == "l2" else metric)
    affinity, g, _ = build_affinity(examples, len(found.vocab), config, None)
    assert affinity.config.metric == metric and affinity.index.kind == "flat"
    x = examples.dense.astype(np.float64)
    if metric == "cosine":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = [examples.labels.indices[examples.labels.indptr[i]:examples.labels.indptr[i + 1]]
              for i in range(len(examples))]
    want = reference_g(x, x, labels, len(found.vocab), 5, "gaussian", affinity.config.lam, "sum",
                       True)
    np.testing.assert_allclose(dense(g, len(found.vocab)), want, rtol=1e-4, atol=1e-5)


def test_a_sparse_input_space_g_is_saved_and_loaded(tmp_path):
    train = write_text(tmp_path / "train.parquet", 150, 0)
    test = write_text(tmp_path / "test.parquet", 40, 1)
    model = tmp_path / "m"
    train_wsabie(train, model, TrainConfig(epochs=1, dim=8, valid_fraction=0.0))
    build_g(train, model, AffinityConfig(neighbors=5, space="input", metric="l2"))
    loaded = Affinity.load(model, read_card(model).stage2)
    assert loaded.index.kind == "sparse" and loaded.config.metric == "l2"
    predictor = Predictor(model)
    assert predictor.affinity.index.n_rows == 150
    found = scan(train, Columns())
    built, _, _ = build_affinity(load_examples(train, found.schema, found.vocab), len(found.vocab),
                                 AffinityConfig(neighbors=5, space="input", metric="l2"), None)
    examples = load_examples(test, predictor.schema, predictor.vocab)
    for a, b in ((built.examples_affinity(examples), loaded.examples_affinity(examples)),
                 (built.examples_affinity(examples),
                  predictor.affinity.examples_affinity(examples))):
        np.testing.assert_array_equal(a.indptr, b.indptr)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.values, b.values)
