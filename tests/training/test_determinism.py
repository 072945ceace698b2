"""Determinism: the same seed and thread count give bit-identical weights, G and metrics.

Two full runs of the pipeline (train -> build-g -> retrain -> eval), each in its own process, at
2 threads, must write the same bytes (timings aside). Which paths are not deterministic, and why,
is in docs/method.md ("Determinism").
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from awe.pipeline import train_wsabie
from awe.training.config import TrainConfig
from awe.training.loop import STEP_PARALLEL_MIN
from tests.affinity.test_affinity import write_clusters

ROOT = Path(__file__).resolve().parents[2]

PIPELINE = """
import sys
from cli.main import app
train, test, model = sys.argv[1:4]
common = ["--threads", "2"]
fit = ["--epochs", "3", "--quiet", *common]
for args in (["train", train, "--model", model, "--dim", "8", *fit],
             ["build-g", train, "--model", model, "--neighbors", "7", *common],
             ["retrain", train, "--model", model, *fit],
             ["eval", test, "--model", model, "--k", "1,3", "--json", model + "/eval.json",
              *common]):
    app(args, standalone_mode=False)
"""


def _timeless(path: Path):
    """A file's content without its timings (history's seconds column, metrics' seconds)."""
    if path.suffix == ".csv":
        with open(path) as fh:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]
    if path.name == "metrics.json":
        def drop(obj):
            if isinstance(obj, dict):
                return {k: drop(v) for k, v in obj.items() if not k.endswith("seconds")}
            return obj
        return drop(json.loads(path.read_text()))
    return path.read_bytes()


def test_two_processes_same_seed_same_bytes(tmp_path):
    train = write_clusters(tmp_path / "train.parquet", 600, 0)
    test = write_clusters(tmp_path / "test.parquet", 200, 1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    runs = []
    for name in ("a", "b"):
        model = tmp_path / name
        done = subprocess.run([sys.executable, "-c", PIPELINE, str(train), str(test), str(model)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        runs.append({p.name: _timeless(p) for p in sorted(model.iterdir()) if p.is_file()})
    a, b = runs
    assert {"wsabie.safetensors", "index.faiss", "affinity.safetensors", "awe.safetensors",
            "eval.json", "metrics.json"} <= set(a)
    for name in a:
        assert a[name] == b[name], name
    assert set(a) == set(b)


def test_multithreaded_steps_are_repeatable(tmp_path):
    """Steps big enough to run on 2 intra-op threads (batch x dim >= STEP_PARALLEL_MIN) give the
    same weights twice (another thread count gives other bits: docs/method.md)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 64)).astype(np.float32)
    labels = [[f"c{i}"] for i in rng.integers(0, 50, size=1024)]
    data = tmp_path / "d.parquet"
    pq.write_table(pa.table({"features": list(x), "labels": labels}), data)
    config = TrainConfig(epochs=2, dim=1024, batch_size=1024, valid_fraction=0, threads=2)
    assert config.batch_size * config.dim >= STEP_PARALLEL_MIN
    before = torch.get_num_threads()
    try:
        for name in ("a", "b"):
            train_wsabie(data, tmp_path / name, config, checkpoints=False)
    finally:
        torch.set_num_threads(before)
    assert ((tmp_path / "a" / "wsabie.safetensors").read_bytes()
            == (tmp_path / "b" / "wsabie.safetensors").read_bytes())
