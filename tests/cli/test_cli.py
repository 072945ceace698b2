"""Contract tests through the command line: data -> train -> eval, errors, determinism."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def write_blobs(path, n_rows, n_labels=6, n_features=8, seed=0):
    """Linearly separable-ish dense data: label = nearest of n_labels centres."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(n_labels, n_features)) * 3
    y = rng.integers(0, n_labels, size=n_rows)
    x = (centres[y] + rng.normal(size=(n_rows, n_features))).astype(np.float32)
    table = pa.table({"id": np.arange(n_rows), "features": list(x),
                      "labels": [[f"c{v}"] for v in y]})
    pq.write_table(table, path)
    return path


@pytest.fixture()
def blobs(tmp_path):
    return (write_blobs(tmp_path / "train.parquet", 600),
            write_blobs(tmp_path / "test.parquet", 200, seed=1))


def test_round_trip_train_eval(tmp_path, blobs):
    train, test = blobs
    model = tmp_path / "model"
    r = invoke("train", train, "--model", model, "--epochs", 5, "--quiet", "--threads", 1)
    assert r.exit_code == 0, r.output
    for name in ("config.json", "labels.json", "wsabie.safetensors", "history.csv",
                 "metrics.json"):
        assert (model / name).is_file(), name
    assert not list(model.glob(".*tmp"))
    config = json.loads((model / "config.json").read_text())
    assert config["stage1"]["train"]["epochs"] == 5
    assert config["stage1"]["train"]["task"] == "annotation"
    assert config["schema"]["kind"] == "dense" and config["schema"]["n_features"] == 8
    history = (model / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,loss") and "valid_P@1" in history[0]
    out = tmp_path / "eval.json"
    r = invoke("eval", test, "--model", model, "--k", "1,3", "--json", out)
    assert r.exit_code == 0, r.output
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"wsabie"}
    assert set(metrics["wsabie"]) == {f"{m}@{k}" for m in ("P", "R", "NDCG", "MAP")
                                      for k in (1, 3)}
    # 6 well separated classes: a working WARP model is far above chance (1/6)
    assert metrics["wsabie"]["P@1"] > 0.9


def test_same_seed_same_metrics(tmp_path, blobs):
    train, test = blobs
    results = []
    for run in range(2):
        model = tmp_path / f"m{run}"
        r = invoke("train", train, "--model", model, "--epochs", 3, "--quiet", "--seed", 7,
                   "--threads", 1)
        assert r.exit_code == 0, r.output
        out = tmp_path / f"e{run}.json"
        assert invoke("eval", test, "--model", model, "--json", out).exit_code == 0
        results.append(((model / "wsabie.safetensors").read_bytes(), out.read_text()))
    assert results[0] == results[1]


def test_user_error_exits_2_without_traceback(tmp_path):
    r = invoke("train", tmp_path / "nope.parquet", "--model", tmp_path / "m")
    assert r.exit_code == 2
    assert "no such file" in r.output
    assert "Traceback" not in r.output


def test_bad_option_value_is_a_user_error(tmp_path, blobs):
    train, _ = blobs
    r = invoke("train", train, "--model", tmp_path / "m", "--lr", "-1")
    assert r.exit_code == 2 and "lr must be a positive number" in r.output


def test_eval_on_missing_model(tmp_path, blobs):
    _, test = blobs
    r = invoke("eval", test, "--model", tmp_path / "missing")
    assert r.exit_code == 2 and "model directory" in r.output


def test_eval_counts_unknown_labels_as_misses(tmp_path, blobs):
    train, _ = blobs
    model = tmp_path / "m"
    assert invoke("train", train, "--model", model, "--epochs", 1, "--quiet").exit_code == 0
    table = pa.table({"features": [np.zeros(8, np.float32)] * 2,
                      "labels": [["never-seen"], ["never-seen"]]})
    pq.write_table(table, tmp_path / "odd.parquet")
    out = tmp_path / "e.json"
    r = invoke("eval", tmp_path / "odd.parquet", "--model", model, "--json", out)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["wsabie"]["P@1"] == 0.0


def test_help_lists_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    for command in ("data", "train", "eval"):
        assert command in r.output


def test_ctrl_c_exits_130_and_points_at_resume(tmp_path, monkeypatch):
    import cli.main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.main, "train_wsabie", interrupted)
    train = write_blobs(tmp_path / "t.parquet", 50)
    result = invoke("train", train, "--model", tmp_path / "m", "--quiet")
    assert result.exit_code == 130
    assert "--resume" in result.output and "Traceback" not in result.output


def _weights(path):
    from safetensors.numpy import load_file

    return load_file(path)


def test_no_refit_keeps_the_best_epochs_weights(tmp_path, blobs):
    train, _ = blobs
    common = ("--valid-fraction", 0.2, "--quiet", "--threads", 1, "--seed", 3)
    r = invoke("train", train, "--model", tmp_path / "long", "--epochs", 6, "--no-refit", *common)
    assert r.exit_code == 0, r.output
    best = json.loads((tmp_path / "long" / "metrics.json").read_text())["wsabie"]["best_epoch"]
    assert best < 6  # else the best and the last epoch's weights are the same
    config = json.loads((tmp_path / "long" / "config.json").read_text())["stage1"]["train"]
    assert config["refit"] is False
    history = (tmp_path / "long" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 6 and "refit" not in "".join(history)
    # the same run stopped at the best epoch ends with the same weights: the best are kept
    r = invoke("train", train, "--model", tmp_path / "short", "--epochs", best, "--no-refit",
               *common)
    assert r.exit_code == 0, r.output
    long, short = (_weights(tmp_path / m / "wsabie.safetensors") for m in ("long", "short"))
    assert set(long) == set(short)
    for name in long:
        np.testing.assert_array_equal(long[name], short[name])
    # --refit refits on every row for the picked epoch count
    r = invoke("train", train, "--model", tmp_path / "refit", "--epochs", 6, "--refit", *common)
    assert r.exit_code == 0, r.output
    history = (tmp_path / "refit" / "history.csv").read_text().splitlines()
    assert sum(line.endswith(",refit") for line in history) == best
    refit = _weights(tmp_path / "refit" / "wsabie.safetensors")
    assert any(not np.array_equal(refit[name], long[name]) for name in long)


def test_no_refit_reaches_stage_3(tmp_path, blobs):
    train, _ = blobs
    model = tmp_path / "m"
    common = ("--epochs", 3, "--quiet", "--threads", 1, "--no-refit")
    assert invoke("train", train, "--model", model, *common).exit_code == 0
    assert invoke("build-g", train, "--model", model, "--threads", 1).exit_code == 0
    r = invoke("retrain", train, "--model", model, "--rounds", 1, *common)
    assert r.exit_code == 0, r.output
    config = json.loads((model / "config.json").read_text())
    assert config["stage3"]["train"]["refit"] is False
    from awe import artifacts

    history = (model / artifacts.AWE_HISTORY).read_text().splitlines()
    assert len(history) == 1 + 3 and "refit" not in "".join(history)
