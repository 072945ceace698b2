"""`awe reproduce` through the CLI: every report file, the four rows, valid plots, the ways of
naming a dataset, and one-line errors for a missing one."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from awe.reproduce import ALGORITHMS, REPORT_FILES
from cli.main import app
from tests.affinity.test_affinity import write_clusters

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_report(out, table_ks=(1, 3)):
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    summary = json.loads((out / "table.json").read_text())
    assert list(summary["rows"]) == list(ALGORITHMS)
    for metrics in summary["rows"].values():
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in metrics.values())
        assert {f"P@{k}" for k in range(1, 11)} <= set(metrics)
    assert summary["table_ks"] == list(table_ks)
    assert set(summary["seconds"]) >= {"data", "train", "build-g", "retrain"}
    with open(out / "table.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["row"] for r in rows] == list(ALGORITHMS)
    assert float(rows[3]["P@1"]) == pytest.approx(summary["rows"]["awe"]["P@1"], abs=1e-6)
    markdown = (out / "table.md").read_text()
    assert all(name in markdown for name in ALGORITHMS.values())
    assert all(f"Prec@{k}" in markdown for k in table_ks)
    config = json.loads((out / "config.json").read_text())
    assert config["stage1"]["train"]["dim"] >= 1 and config["stage3"]["train"]["lr"] > 0
    assert config["stage2"]["config"]["neighbors"] >= 1
    import matplotlib.image

    for name in ("precision_at_k.png", "training_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert np.ptp(image) > 0  # not a blank canvas
    return summary


def test_reproduce_synthetic_writes_the_whole_report(tmp_path):
    out = tmp_path / "report"
    result = invoke("reproduce", "--rows", 600, "--test-rows", 200, "--classes", 12,
                    "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    summary = assert_report(out)
    assert "Affinity Weighted Embedding" in result.output and "Prec@3" in result.output
    for name in REPORT_FILES:
        assert str(out / name) in result.output.replace("\n", "")
    assert (out / "model" / "awe.safetensors").is_file()
    # the recipe's stage-2 options, the paper's, are the ones the model was built with
    config = json.loads((out / "config.json").read_text())
    assert config["stage2"]["config"]["aggregate"] == "sum"
    assert config["stage2"]["config"]["space"] == "wsabie"
    assert config["stage2"]["config"]["neighbors"] == 20
    assert summary["dataset"] == "magnatagatune"
    assert summary["title"] == "Synthetic Magnatagatune (600 train / 200 test, 12 tags)"
    # the paper's Table 1 beside the measured rows, in every form of the report
    paper = summary["paper"]
    assert "Table 1" in paper["source"]
    assert paper["rows"]["wsabie"] == {"P@1": 0.487, "P@3": 0.375}
    assert paper["rows"]["awe"] == {"P@1": 0.527, "P@3": 0.392}
    assert "not redistributable" in summary["note"]
    with open(out / "table.csv", newline="") as fh:
        rows = {r["row"]: r for r in csv.DictReader(fh)}
    assert float(rows["knn-input"]["paper_P@1"]) == pytest.approx(0.394)
    assert float(rows["knn-wsabie"]["paper_P@3"]) == pytest.approx(0.319)
    markdown = (out / "table.md").read_text()
    assert "| paper Prec@1 | paper Prec@3 |" in markdown
    assert "| 48.7% | 37.5% |" in markdown and "not redistributable" in markdown
    assert "Machine:" in markdown and "| total |" in markdown
    printed = result.stdout
    assert "paper Prec@1" in printed and "52.7%" in printed and "39.2%" in printed
    # the commands: the one that made the report, then its steps
    commands = summary["commands"]
    assert commands[0].startswith("awe reproduce --dataset magnatagatune --rows 600")
    assert any(c.startswith("awe data synthetic --preset magnatagatune") for c in commands)
    assert any("awe build-g" in c and "--neighbors 20 --space wsabie --aggregate sum" in c
               for c in commands)
    assert all(c in markdown for c in commands)


def test_reproduce_imagenet_uses_max_in_wsabie_space(tmp_path):
    out = tmp_path / "report"
    result = invoke("reproduce", "--dataset", "imagenet", "--rows", 600, "--test-rows", 200,
                    "--classes", 12, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    summary = assert_report(out)
    config = json.loads((out / "config.json").read_text())["stage2"]["config"]
    assert (config["aggregate"], config["space"], config["neighbors"]) == ("max", "wsabie", 20)
    assert "Table 2" in summary["paper"]["source"]
    assert summary["paper"]["rows"]["knn-wsabie"]["P@1"] == pytest.approx(0.137)
    assert summary["paper"]["rows"]["knn-input"]["P@1"] is None
    assert "| 16.4% | - |" in (out / "table.md").read_text()
    assert "awe data synthetic --preset imagenet --rows 600" in "\n".join(summary["commands"])


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    (root / "train").mkdir()
    write_clusters(root / "train" / "part-0.parquet", 500, 0)
    write_clusters(root / "test.parquet", 150, 1)
    return root


def test_reproduce_a_directory_of_train_and_test(tmp_path, split_dir):
    out = tmp_path / "report"
    result = invoke("reproduce", "--dataset", split_dir, "--out", out)  # with progress display
    assert result.exit_code == 0, result.output
    assert "stage 1: Wsabie" in result.output and "done evaluate awe" in result.output
    summary = assert_report(out)
    assert summary["dataset"] == str(split_dir)
    assert "paper" not in summary and "paper" not in (out / "table.md").read_text()
    assert summary["commands"][0].startswith(f"awe reproduce --dataset {split_dir}")


def test_reproduce_train_and_test_paths(tmp_path, split_dir):
    out = tmp_path / "report"
    result = invoke("reproduce", "--train", split_dir / "train", "--test",
                    split_dir / "test.parquet", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert_report(out)


@pytest.mark.parametrize("args, expected", [
    (["--dataset", "fashion-mnist", "--source", "/nonexistent/fmnist"], "/nonexistent/fmnist"),
    (["--dataset", "/nonexistent/data"], "not a known dataset"),
    (["--train", "/nonexistent/train.parquet", "--test", "/nonexistent/test.parquet"],
     "/nonexistent/train.parquet"),
    (["--train", "x.parquet"], "both --train and --test"),
])
def test_a_missing_dataset_is_one_clear_error(tmp_path, args, expected):
    result = invoke("reproduce", *args, "--out", tmp_path / "r", "--quiet")
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_directory_without_test_names_what_is_missing(tmp_path, split_dir):
    partial = tmp_path / "partial"
    shutil.copytree(split_dir / "train", partial / "train")
    result = invoke("reproduce", "--dataset", partial, "--out", tmp_path / "r", "--quiet")
    assert result.exit_code == 2 and "no test" in result.output, result.output


def test_round_spans_mark_each_stage3_round():
    from awe.reproduce import round_spans

    rows = [{"round": "1"}] * 3 + [{"round": "2"}] * 2
    assert round_spans(rows) == [(1, 1, 3), (2, 4, 5)]
    assert round_spans([{"loss": "1"}] * 2) == [(1, 1, 2)]     # stage 1: no round column
    assert round_spans([]) == []
