"""The conventions users rely on: help, names, streams, file modes, errors, and the Python API's
scikit-learn / implicit shape."""

import inspect
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cli.main
from awe import AWE
from awe.errors import AweError
from tests.affinity.test_affinity import write_clusters
from tests.cli.test_awe_cli import invoke

FAST = ("--epochs", "2", "--dim", "8", "--quiet")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("conventions")
    return (write_clusters(root / "train.parquet", 300, 0),
            write_clusters(root / "test.parquet", 100, 1))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, data):
    train, _ = data
    model_dir = tmp_path_factory.mktemp("fit") / "m"
    result = invoke("fit", train, "--model", model_dir, *FAST, "--neighbors", 5,
                    "--stage3-epochs", 2)
    assert result.exit_code == 0, result.output
    return model_dir, result


# ---------------------------------------------------------------------------------- the CLI
def test_python_m_awe_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "awe", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("fit", "train", "build-g", "retrain", "eval", "score", "data", "reproduce"):
        assert command in done.stdout


def test_help_shows_every_default_and_choice_in_plain_text():
    result = invoke("train", "--help")
    assert result.exit_code == 0
    text = result.output
    assert "╭" not in text  # plain when not on a terminal
    for expected in ("--dim", "[default: 64]", "--epochs", "[default: 60]", "[default: 0.05]",
                     "<harmonic|log>", "<adagrad|sgd>", "<auto|on|off>", "[default: auto]"):
        assert expected in text, expected
    assert max(len(line) for line in text.splitlines()) > 80  # full width, not 80 columns
    g = invoke("build-g", "--help").output
    assert "<gaussian|embedded-gaussian|cosine|dot|uniform>" in g and "--lambda" in g


def test_the_flags_and_the_api_share_their_defaults():
    """One default per hyper-parameter: the CLI's flag, the API's keyword, the config field."""
    from awe.training.config import TrainConfig

    params = inspect.signature(AWE).parameters
    for name in ("dim", "epochs", "lr", "negatives", "margin", "valid_fraction", "neighbors",
                 "kernel", "aggregate", "normalize"):
        assert name in params
    assert params["dim"].default == TrainConfig().dim
    assert params["valid_fraction"].default == TrainConfig().valid_fraction
    assert f"[default: {TrainConfig().valid_fraction}]" in invoke("train", "--help").output


def test_fit_runs_the_three_stages_and_logs_on_stderr(fitted, data):
    model_dir, result = fitted
    config = json.loads((model_dir / "config.json").read_text())
    assert {"stage1", "stage2", "stage3"} <= set(config)
    assert config["stage3"]["train"]["lr"] == 0.01  # stage 3's own default
    assert "wrote" in result.stderr and result.stdout == ""
    _, test = data
    evaluated = invoke("eval", test, "--model", model_dir, "--k", "1", "--methods", "awe")
    assert evaluated.exit_code == 0 and "P@1" in evaluated.stdout


def test_files_follow_the_umask(fitted, tmp_path, data):
    train, _ = data
    old = os.umask(0o022)
    try:
        result = invoke("train", train, "--model", tmp_path / "m", *FAST)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()
             if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_debug_anywhere_and_from_the_environment(tmp_path, monkeypatch):
    missing = ["train", str(tmp_path / "none.parquet"), "--model", str(tmp_path / "m")]
    with pytest.raises(SystemExit) as plain:
        cli.main.main(missing)
    assert plain.value.code == 2
    with pytest.raises(AweError):  # the traceback, not one line
        cli.main.main([*missing, "--debug"])
    monkeypatch.setenv("AWE_DEBUG", "1")
    with pytest.raises(AweError):
        cli.main.main(missing)


def test_a_wrong_labels_column_names_the_labels_column(data, tmp_path):
    train, _ = data
    result = invoke("train", train, "--model", tmp_path / "m", "--labels-col", "tags", "--quiet")
    assert result.exit_code == 2
    assert "'labels'" in result.output and "features" in result.output
    assert "Traceback" not in result.output


def test_a_csv_says_how_to_convert_it(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    result = invoke("train", tmp_path / "x.csv", "--model", tmp_path / "m", "--quiet")
    assert result.exit_code == 2
    assert "not a parquet file" in result.output and "to_parquet" in result.output


def test_retrain_label_bias_start_accepts_none_and_rejects_words(fitted, data, tmp_path):
    train, _ = data
    result = invoke("retrain", train, "--model", tmp_path / "nowhere", "--label-bias-start",
                    "maybe", "--quiet")
    assert result.exit_code == 2 and "--label-bias-start 'maybe'" in result.output


# ------------------------------------------------------------------------------ the Python API
def test_api_parameters_repr_and_get_set_params():
    model = AWE(dim=16, neighbors=10)
    assert repr(model) == "AWE(dim=16, neighbors=10)"
    assert model.get_params()["dim"] == 16 and model.get_params()["lr"] == 0.05
    assert model.set_params(lr=0.1) is model and model.lr == 0.1
    with pytest.raises(AweError, match="did you mean neighbors"):
        AWE(neighbours=10)
    with pytest.raises(AweError, match="dim"):
        AWE(dim=0)
    assert "dim (default 64): Embedding dimension" in AWE.__doc__


def _matrix_data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(size=(4, 6)) * 4
    cluster = rng.integers(0, 4, size=n)
    x = (centres[cluster] + rng.normal(size=(n, 6))).astype(np.float32)
    return x, [[f"t{c}"] for c in cluster]


@pytest.fixture(scope="module")
def api_model():
    x, y = _matrix_data()
    return AWE(dim=8, epochs=3, neighbors=5, retrain={"epochs": 2}, seed=0).fit(x, y)


def test_api_numpy_inputs_predict_embed_and_similar_labels(api_model):
    x, y = _matrix_data(60, seed=1)
    top = api_model.predict(x, k=2)
    assert list(top.columns) == ["labels", "scores"] and len(top) == 60
    hits = np.mean([row[0] == truth[0] for row, truth in zip(top.labels, y, strict=True)])
    assert hits > 0.5
    assert api_model.embed(x).shape == (60, 8)
    metrics = api_model.evaluate(x, y, ks=[1], methods=["awe"])
    assert metrics["awe"]["P@1"] == pytest.approx(hits)
    similar = api_model.similar_labels("t0", N=2)
    assert len(similar) == 2 and "t0" not in similar["label"].tolist()
    with pytest.raises(AweError, match="not in the model's vocabulary"):
        api_model.similar_labels("nope")
    with pytest.raises(TypeError, match="expected a parquet path"):
        api_model.predict([[1.0] * 6])


def test_api_recommend_filters_what_the_row_already_has(api_model):
    x, y = _matrix_data(40, seed=2)
    table = pa.table({"features": list(x), "labels": y})
    kept = api_model.recommend(table, N=2, filter_already_liked=False)
    filtered = api_model.recommend(table, N=2)
    assert any(row[0] == truth[0] for row, truth in zip(kept.labels, y, strict=True))
    assert all(truth[0] not in list(row) for row, truth in zip(filtered.labels, y, strict=True))


class _Csr:
    """The shape of a scipy.sparse matrix that the API reads (tocsr, indptr, indices, data)."""

    def __init__(self, dense):
        self.shape = dense.shape
        self.indptr = np.r_[0, np.cumsum((dense != 0).sum(1))]
        rows, self.indices = np.nonzero(dense)
        self.data = dense[rows, self.indices]

    def tocsr(self):
        return self

    def sort_indices(self):
        pass


def test_api_sparse_matrix_input(tmp_path):
    x, y = _matrix_data(150)
    x = np.abs(x)  # non-negative sparse-like features
    model = AWE(dim=8, epochs=2, neighbors=5, retrain={"epochs": 1}, seed=0)
    model.fit(_Csr(x), y, model_dir=tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["schema"]["kind"] == "sparse"
    assert len(model.predict(_Csr(x[:10]), k=1)) == 10


def test_api_path_and_frame_inputs_agree(api_model, tmp_path):
    x, _ = _matrix_data(20, seed=3)
    frame = pd.DataFrame({"features": list(x), "id": range(20)})
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "r.parquet")
    from_path = api_model.predict(tmp_path / "r.parquet", k=2)
    from_frame = api_model.predict(frame, k=2)
    assert from_path["id"].tolist() == list(range(20))
    assert [list(a) for a in from_path.labels] == [list(a) for a in from_frame.labels]


def test_data_svmlight_converts_a_file_that_trains(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["60 12 3"]
    for i in range(60):
        label = i % 3
        ids = sorted({label * 4 + int(j) for j in rng.integers(0, 4, 3)})
        lines.append(f"{label} " + " ".join(f"{j}:{rng.uniform(0.5, 1):.3f}" for j in ids))
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    result = invoke("data", "svmlight", tmp_path / "train.txt", "--out", tmp_path / "data")
    assert result.exit_code == 0, result.output
    assert "60 rows, 12 features, 3 labels" in result.output
    converted = tmp_path / "data" / "train"
    assert sorted(p.name for p in converted.iterdir()) == ["part-00000.parquet"]
    table = pq.read_table(converted)
    assert table.column_names == ["id", "feature_ids", "feature_values", "labels"]
    trained = invoke("train", converted, "--model", tmp_path / "m", *FAST)
    assert trained.exit_code == 0, trained.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["schema"]["kind"] == "sparse" and config["schema"]["n_features"] == 12


def test_score_no_screen_is_recorded_with_the_scores(fitted, data, tmp_path):
    model_dir, _ = fitted
    _, test = data
    result = invoke("score", test, "--model", model_dir, "--out", tmp_path / "s.parquet",
                    "--k", 2, "--no-screen")
    assert result.exit_code == 0, result.output
    meta = json.loads(pq.read_metadata(tmp_path / "s.parquet").metadata[b"awe.score"])
    assert meta["options"]["screen"] is False
