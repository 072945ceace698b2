"""Quality: on the synthetic Magnatagatune preset AWE beats Wsabie and both kNN rows at P@1."""

import pytest

from awe.affinity.g import AffinityConfig
from awe.affinity.stage import build_g
from awe.io import datasets
from awe.pipeline import retrain_awe, train_wsabie
from awe.predict.evaluation import evaluate_model
from awe.training.config import STAGE3_DEFAULTS, TrainConfig


@pytest.mark.slow
def test_awe_beats_every_baseline_on_synthetic_magnatagatune(tmp_path):
    datasets.make_dataset("synthetic", tmp_path / "data", preset="magnatagatune")
    train = tmp_path / "data" / "train.parquet"
    train_wsabie(train, tmp_path / "m", TrainConfig(valid_fraction=0.1))
    build_g(train, tmp_path / "m", AffinityConfig())
    retrain_awe(train, tmp_path / "m", STAGE3_DEFAULTS)
    metrics = evaluate_model(tmp_path / "m", tmp_path / "data" / "test.parquet", [1])
    p1 = {row: m["P@1"] for row, m in metrics.items()}
    print(p1)
    assert p1["awe"] > max(p1["wsabie"], p1["knn-input"], p1["knn-wsabie"]) + 0.01, p1
