"""Quality on real data with the `awe train` defaults: thresholds that catch a regression.

ML100K-IMPLICIT: the defaults measured 0.2209 test P@10 (scripts/bench_stage1.py); LightFM WARP
gets 0.21. Skips when the shared MovieLens data is absent.
"""

import pytest

from awe.io import datasets
from awe.pipeline import train_wsabie
from awe.predict.evaluation import evaluate_model
from awe.training.config import TrainConfig
from tests.io.test_datasets import ML100K


@pytest.mark.slow
@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason="shared ml-100k data is absent")
def test_movielens_wsabie_defaults_reach_lightfm_level(tmp_path):
    datasets.make_dataset("movielens", tmp_path / "ml", source=ML100K)
    train_wsabie(tmp_path / "ml" / "train.parquet", tmp_path / "model",
                 TrainConfig(valid_fraction=0.1, threads=1))
    metrics = evaluate_model(tmp_path / "model", tmp_path / "ml" / "test.parquet", [10])
    assert metrics["wsabie"]["P@10"] >= 0.21
