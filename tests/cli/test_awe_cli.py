"""Contract tests of the AWE stages through the CLI and the Python API."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from awe import AWE
from cli.main import app
from tests.affinity.test_affinity import write_clusters

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return (write_clusters(root / "train.parquet", 600, 0),
            write_clusters(root / "test.parquet", 200, 1))


def test_train_build_g_retrain_eval(tmp_path, data):
    train, test = data
    model = tmp_path / "m"
    assert invoke("train", train, "--model", model, "--epochs", 3, "--dim", 8,
                  "--quiet").exit_code == 0
    result = invoke("eval", test, "--model", model, "--k", "1")
    assert result.exit_code == 0 and "wsabie" in result.output and "awe" not in result.output
    result = invoke("eval", test, "--model", model, "--methods", "awe")
    assert result.exit_code == 2 and "build-g" in result.output
    result = invoke("build-g", train, "--model", model, "--neighbors", 7, "--kernel", "cosine",
                    "--aggregate", "max", "--index", "flat")
    assert result.exit_code == 0, result.output
    assert "recall@7 1.0000" in result.output
    config = json.loads((model / "config.json").read_text())["stage2"]["config"]
    assert (config["neighbors"], config["kernel"], config["aggregate"]) == (7, "cosine", "max")
    assert config["target_recall"] == 0.95
    result = invoke("retrain", train, "--model", model, "--epochs", 2, "--quiet",
                    "--label-bias-start", 2.0, "--lr", 0.02)
    assert result.exit_code == 0, result.output
    stage3 = json.loads((model / "config.json").read_text())["stage3"]
    assert stage3["train"]["lr"] == 0.02 and stage3["label_bias_init"] == 2.0
    assert stage3["rounds"] == "auto"           # the default: rounds chosen on validation
    awe_metrics = json.loads((model / "metrics.json").read_text())["awe"]
    assert 1 <= awe_metrics["round"] == stage3["round"] <= awe_metrics["rounds_run"] <= 2
    out = tmp_path / "metrics.json"
    result = invoke("eval", test, "--model", model, "--k", "1,3", "--json", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert list(metrics) == ["knn-input", "knn-wsabie", "wsabie", "awe"]
    assert all(0 <= m["P@1"] <= 1 for m in metrics.values())
    # on two clusters per label, neighbours beat the linear model
    assert metrics["knn-wsabie"]["P@1"] > metrics["wsabie"]["P@1"]
    result = invoke("eval", test, "--model", model, "--methods", "awe,wsabie", "--k", "1")
    assert result.exit_code == 0
    # stage-3 weights record G's fingerprint; one built before --target-recall, --rerank and
    # --metric existed was the hash of the config without those keys, and a default G still
    # hashes the same
    from awe.affinity.g import Affinity
    from awe.card import read_card

    section = read_card(model).stage2
    raw = json.loads((model / "config.json").read_text())["stage2"]
    before = {k: v for k, v in raw["config"].items()
              if k not in ("target_recall", "rerank", "metric")}
    n_rows = Affinity.load(model, section).index.n_rows
    old_style = hashlib.sha256((json.dumps(before, sort_keys=True) + str(n_rows)).encode())
    assert Affinity.load(model, section).fingerprint() == old_style.hexdigest()[:16]


def test_target_recall_calibrates_the_ivf_search(tmp_path, data):
    train, _ = data
    model = tmp_path / "m"
    invoke("train", train, "--model", model, "--epochs", 1, "--dim", 8, "--quiet")
    result = invoke("build-g", train, "--model", model, "--index", "ivf", "--target-recall", 0.6)
    assert result.exit_code == 0, result.output
    stage2 = json.loads((model / "config.json").read_text())["stage2"]
    assert stage2["config"]["target_recall"] == 0.6
    assert stage2["index"]["calibration"]["target_recall"] == 0.6
    assert stage2["index"]["calibration"]["recall_lower_bound"] >= 0.6
    for bad in (0, 1.5):
        result = invoke("build-g", train, "--model", model, "--target-recall", bad)
        assert result.exit_code == 2 and "--target-recall must be in (0, 1]" in result.output


def test_bf16_index_through_the_cli(tmp_path, data):
    """--index bf16 --rerank: recorded, saved as the flat vectors, loaded by eval, and the
    knn-wsabie row close to exact search's on the same stage 1."""
    train, test = data
    model = tmp_path / "m"
    invoke("train", train, "--model", model, "--epochs", 2, "--dim", 8, "--quiet")
    rows = {}
    for kind in ("flat", "bf16"):
        result = invoke("build-g", train, "--model", model, "--index", kind, "--rerank", 4)
        assert result.exit_code == 0, result.output
        stage2 = json.loads((model / "config.json").read_text())["stage2"]
        assert stage2["index"]["kind"] == kind and stage2["config"]["rerank"] == 4
        out = tmp_path / f"{kind}.json"
        result = invoke("eval", test, "--model", model, "--methods", "knn-wsabie", "--k", "1",
                        "--json", out)
        assert result.exit_code == 0, result.output
        rows[kind] = json.loads(out.read_text())["knn-wsabie"]["P@1"]
    assert stage2["index"]["rerank"] == 4 and stage2["index"]["rerank_calibrated"] is False
    assert abs(rows["bf16"] - rows["flat"]) <= 0.02, rows
    result = invoke("build-g", train, "--model", model, "--rerank", -1)
    assert result.exit_code == 2 and "rerank must be an integer >= 0" in result.output


def test_user_errors_exit_2(tmp_path, data):
    train, _ = data
    model = tmp_path / "m"
    invoke("train", train, "--model", model, "--epochs", 1, "--dim", 4, "--quiet")
    result = invoke("retrain", train, "--model", model, "--rounds", "0")
    assert result.exit_code == 2 and "rounds must be 'auto' or an integer >= 1" in result.output
    for args in [("build-g", train, "--model", model, "--kernel", "rbf"),
                 ("build-g", train, "--model", tmp_path / "none"),
                 ("retrain", train, "--model", model, "--quiet"),  # no G yet
                 ("eval", train, "--model", model, "--methods", "nope"),
                 ("retrain", train, "--model", model, "--rounds", "some")]:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output


def test_python_api_fit_evaluate_predict_save_load(tmp_path, data):
    train, test = data
    model = AWE(dim=8, epochs=3, neighbors=10, retrain={"epochs": 2}, seed=0)
    model.fit(train, model_dir=tmp_path / "m")
    metrics = model.evaluate(test, ks=[1])
    assert set(metrics) == {"knn-input", "knn-wsabie", "wsabie", "awe"}
    frame = pd.read_parquet(test).head(5)
    top = model.predict(frame.drop(columns=["labels"]), k=3)
    assert list(top.columns) == ["labels", "scores"] and len(top) == 5
    assert all(len(x) == 3 and np.all(np.diff(s) <= 0) for x, s in zip(top.labels, top.scores,
                                                                        strict=True))
    # the awe predictions agree with the eval path: P@1 from predict == the awe row's P@1
    full = model.predict(test, k=1)
    truth = pd.read_parquet(test)["labels"]
    p1 = np.mean([top1[0] in set(t) for top1, t in zip(full.labels, truth, strict=True)])
    assert p1 == pytest.approx(metrics["awe"]["P@1"])
    model.save(tmp_path / "copy")
    again = AWE.load(tmp_path / "copy").predict(frame.drop(columns=["labels"]), k=3)
    pd.testing.assert_frame_equal(top, again)
    # in-memory training data works too
    AWE(dim=4, epochs=1, neighbors=5, retrain={"epochs": 1}).fit(pd.read_parquet(train))


def test_api_refit_option_reaches_both_stages():
    stage1, _, stage3 = AWE(refit=True)._configs()
    assert stage1.refit is True and stage3.refit is True
    stage1, _, stage3 = AWE(retrain={"refit": True})._configs()
    assert stage1.refit is False and stage3.refit is True


def test_same_seed_same_awe_model(tmp_path, data):
    train, test = data
    runs = []
    for i in range(2):
        m = AWE(dim=8, epochs=2, neighbors=5, retrain={"epochs": 2}, seed=3, threads=1)
        m.fit(train, model_dir=tmp_path / f"m{i}")
        runs.append(m.evaluate(test, ks=[1, 3]))
        runs.append((tmp_path / f"m{i}" / "awe.safetensors").read_bytes())
    assert runs[0] == runs[2] and runs[1] == runs[3]


def test_stage1_label_bias_is_saved_and_used(tmp_path, data):
    from safetensors import safe_open

    from awe.io.reader import load_examples
    from awe.models.saved import load_wsabie
    from awe.predict.predictor import Predictor

    train, test = data
    for flag, expected in (("auto", True), ("on", True), ("off", False)):
        model = tmp_path / flag
        result = invoke("train", train, "--model", model, "--epochs", 2, "--dim", 8,
                        "--label-bias", flag, "--quiet")
        assert result.exit_code == 0, result.output
        config = json.loads((model / "config.json").read_text())
        assert config["stage1"]["label_bias"] is expected
        with safe_open(str(model / "wsabie.safetensors"), "pt") as fh:
            assert ("label_bias" in fh.keys()) is expected
        saved = load_wsabie(model)
        if expected:  # the wsabie row ranks by (x U).V_y + beta_y
            predictor = Predictor(model)
            examples = load_examples(test, predictor.schema, predictor.vocab)
            rows = np.arange(5)
            from awe.models.wsabie import batch_inputs

            e = saved.model.embed(batch_inputs(examples, rows))
            want = e @ saved.model.v_matrix().T + saved.model.label_bias
            got = predictor.scores(examples, rows, "wsabie")
            np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-5)
            assert saved.model.label_bias.abs().sum() > 0


def test_stage1_label_bias_auto_is_off_for_recommendation(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    table = pa.table({"feature_ids": [[i] for i in range(80)],
                      "labels": [sorted(rng.choice(20, 4, replace=False).tolist())
                                 for _ in range(80)]})
    pq.write_table(table, tmp_path / "t.parquet")
    result = invoke("train", tmp_path / "t.parquet", "--model", tmp_path / "m", "--task",
                    "recommendation", "--epochs", 1, "--dim", 4, "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["stage1"]["label_bias"] is False
    result = invoke("train", tmp_path / "t.parquet", "--model", tmp_path / "m2",
                    "--label-bias", "maybe", "--quiet")
    assert result.exit_code == 2 and "--label-bias" in result.output and "maybe" in result.output
