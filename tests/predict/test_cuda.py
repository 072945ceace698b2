"""The CUDA path (`--device cuda`): the same training code as on the CPU, checked where a GPU is.

Skipped on machines where torch sees no CUDA device (the development machine and CI); on a GPU
machine, stage 1 and stage 3 train on cuda and reach the CPU model's quality on the same data.
"""

from __future__ import annotations

import pytest
import torch

from awe.affinity.g import AffinityConfig
from awe.affinity.stage import build_g
from awe.errors import AweError
from awe.pipeline import retrain_awe, train_wsabie
from awe.predict.evaluation import evaluate_model
from awe.training.config import STAGE3_DEFAULTS, TrainConfig, resolve_device
from tests.affinity.test_affinity import write_clusters

HAS_CUDA = torch.cuda.is_available()


def test_device_cuda_without_a_gpu_is_one_clear_error():
    if HAS_CUDA:
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(AweError, match="device cuda: torch sees no CUDA device"):
        resolve_device("cuda")
    assert resolve_device(None) == "cpu"


@pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA device")
def test_cuda_trains_like_cpu(tmp_path):
    train = write_clusters(tmp_path / "train.parquet", 900, 0)
    test = write_clusters(tmp_path / "test.parquet", 300, 1)
    results = {}
    for device in ("cpu", "cuda"):
        model = tmp_path / device
        train_wsabie(train, model, TrainConfig(epochs=8, dim=8, seed=0, device=device))
        build_g(train, model, AffinityConfig(neighbors=10))
        retrain_awe(train, model, TrainConfig(**{**STAGE3_DEFAULTS.to_dict(), "epochs": 8,
                                                 "dim": 8, "device": device}))
        results[device] = evaluate_model(model, test, [1], rows=["wsabie", "awe"])
    for row in ("wsabie", "awe"):
        # atomics make cuda runs differ from cpu in the last bits, not in quality
        assert abs(results["cuda"][row]["P@1"] - results["cpu"][row]["P@1"]) < 0.05, results
        assert results["cuda"][row]["P@1"] > 0.5, results
