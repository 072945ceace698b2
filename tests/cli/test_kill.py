"""kill -9 during `awe train`, `awe retrain`, `awe build-g` and `awe score` (real processes,
SIGKILL).

The model directory must stay loadable at its previous good state, and running again (with
--resume for training) must end with the same model and metrics as a run that was never killed.

Each killed run is a subprocess whose pace is fixed by a small driver: every WARP step (or, for
build-g, every rename into the model directory) first sleeps, so the kill lands mid-run whatever
the machine's load, and the run cannot finish before the kill (the sleeps alone outlast the
wait). The uninterrupted references and the resumed runs run in-process (the same code; a
cross-process check of determinism too).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from awe.models.saved import load_wsabie
from cli.main import app
from tests.affinity.test_affinity import write_clusters
from tests.training.test_checkpoint import outcome

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

# The driver: argv = [pause seconds, what to slow ("step", "rename" or "row-group"), awe
# arguments...]
DRIVER = """
import os, sys, time
pause, what = float(sys.argv[1]), sys.argv[2]
if what == "step":
    import awe.training.loop as train
    real = train._WarpStep.__call__
    def step(self, *args):
        time.sleep(pause)
        return real(self, *args)
    train._WarpStep.__call__ = step
elif what == "row-group":
    import awe.predict.batch as scoring
    real_groups = scoring.RowGroupScorer.row_groups
    def row_groups(self, tasks):
        for group in real_groups(self, tasks):
            time.sleep(pause)
            yield group
    scoring.RowGroupScorer.row_groups = row_groups
else:
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        if "staging" in str(src):
            time.sleep(pause)
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
from cli.main import app
sys.argv = ["awe", *sys.argv[3:]]
app()
"""


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def start(pause: float, what: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(pause), what,
                             *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, ready, after: float = 0.0, timeout: float = 60) -> None:
    """SIGKILL ``proc`` ``after`` seconds once ``ready()`` holds; it must still be running."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill: {proc.stdout.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run never got there")
        time.sleep(0.005)
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, proc.stdout.read().decode()


def snapshot(directory: Path) -> dict[str, bytes]:
    """The model's files (not the checkpoint): what a killed run must not have touched."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def eval_json(model: Path, test: Path, rows: str, out: Path) -> dict:
    invoke("eval", test, "--model", model, "--methods", rows, "--k", "1,3", "--json", out)
    return json.loads(out.read_text())


TRAIN = ("--epochs", 4, "--dim", 8, "--batch-size", 48, "--valid-fraction", 0.2, "--seed", 1,
         "--threads", 1, "--quiet", "--checkpoint-every", 1)
# one start of beta' (no search in round 1): every step of the run is checkpointed
RETRAIN = ("--epochs", 3, "--lr", 0.01, "--batch-size", 48, "--valid-fraction", 0.2, "--seed", 2,
           "--threads", 1, "--quiet", "--checkpoint-every", 1, "--label-bias-start", 3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    train = write_clusters(root / "train.parquet", 240, 0)
    test = write_clusters(root / "test.parquet", 120, 1)
    # a model trained before (another seed): the killed train writes over it
    invoke("train", train, "--model", root / "previous", *TRAIN[:-2], "--seed", 9)
    stage2 = root / "stage2"
    shutil.copytree(root / "previous", stage2)
    invoke("build-g", train, "--model", stage2, "--neighbors", 5, "--index", "flat",
           "--threads", 1)
    return train, test, root


def test_kill_train_then_resume(tmp_path, data):
    train, test, root = data
    reference = tmp_path / "reference"
    invoke("train", train, "--model", reference, *TRAIN)

    model = tmp_path / "model"
    shutil.copytree(root / "previous", model)
    before = snapshot(model)
    checkpoint = model / "checkpoint" / "wsabie.safetensors"
    # 4 select epochs of 4 steps, then the refit's 5 steps an epoch: >= 0.84 s of sleeps alone
    proc = start(0.04, "step", "train", train, "--model", model, *TRAIN)
    kill_when(proc, checkpoint.exists, after=0.3)
    assert snapshot(model) == before  # the previous model, untouched, plus a checkpoint
    assert checkpoint.exists()
    load_wsabie(model)
    assert eval_json(model, test, "wsabie", tmp_path / "e.json") == eval_json(
        root / "previous", test, "wsabie", tmp_path / "p.json")

    result = invoke("train", train, "--model", model, *TRAIN, "--resume")
    assert "resuming from" in result.output
    assert outcome(model, "wsabie.safetensors", "history.csv", "wsabie") == outcome(
        reference, "wsabie.safetensors", "history.csv", "wsabie")
    assert eval_json(model, test, "wsabie", tmp_path / "a.json") == eval_json(
        reference, test, "wsabie", tmp_path / "b.json")
    assert not checkpoint.exists()


def test_kill_retrain_then_resume(tmp_path, data):
    train, test, root = data
    reference = tmp_path / "reference"
    shutil.copytree(root / "stage2", reference)
    invoke("retrain", train, "--model", reference, *RETRAIN)

    model = tmp_path / "model"
    shutil.copytree(root / "stage2", model)
    before = snapshot(model)
    checkpoint = model / "checkpoint" / "awe.safetensors"
    # 3 select epochs of up to 4 steps, then the refit's: >= 0.6 s of sleeps alone
    proc = start(0.04, "step", "retrain", train, "--model", model, *RETRAIN)
    kill_when(proc, checkpoint.exists, after=0.3)
    assert snapshot(model) == before and checkpoint.exists()
    # stages 1 and 2 load and evaluate as before the kill
    rows = "wsabie,knn-wsabie"
    assert eval_json(model, test, rows, tmp_path / "e.json") == eval_json(
        root / "stage2", test, rows, tmp_path / "p.json")

    invoke("retrain", train, "--model", model, *RETRAIN, "--resume")
    assert outcome(model, "awe.safetensors", "awe_history.csv", "awe") == outcome(
        reference, "awe.safetensors", "awe_history.csv", "awe")
    rows = "wsabie,knn-wsabie,awe"
    assert eval_json(model, test, rows, tmp_path / "a.json") == eval_json(
        reference, test, rows, tmp_path / "b.json")


@pytest.mark.parametrize("renamed", [0, 1])
def test_kill_build_g_then_run_again(tmp_path, data, renamed):
    """Killed while the new G's files are written (``renamed`` 0: the old G stays whole) or once
    the new index is renamed into the model directory (1: the directory is a stage-1 model
    without G, never a mix of two builds). Every rename out of the staging directory sleeps 0.4 s
    first: the kill lands in one of those sleeps."""
    train, test, root = data
    options = ("--neighbors", 7, "--kernel", "cosine", "--index", "flat", "--threads", 1)
    reference = tmp_path / "reference"
    shutil.copytree(root / "stage2", reference)
    invoke("build-g", train, "--model", reference, *options)

    model = tmp_path / "model"
    shutil.copytree(root / "stage2", model)
    before = snapshot(model)
    index = model / "index.faiss"
    old_index = index.stat().st_ino
    proc = start(0.4, "rename", "build-g", train, "--model", model, *options)
    if renamed == 0:  # the new index is being written into the staging directory
        kill_when(proc, lambda: any(any(p.iterdir()) for p in model.glob(".staging-*")),
                  after=0.1)
        assert snapshot(model) == before
        rows = "wsabie,knn-wsabie"
    else:  # the new index is in place (the label store maybe too), config.json's G not yet
        kill_when(proc, lambda: index.exists() and index.stat().st_ino != old_index, after=0.1)
        config = json.loads((model / "config.json").read_text())
        assert "stage2" not in config and config["stage1"] == json.loads(
            (root / "stage2" / "config.json").read_text())["stage1"]
        rows = "wsabie"
        result = runner.invoke(app, ["eval", str(test), "--model", str(model), "--methods",
                                     "knn-wsabie"])
        assert result.exit_code == 2 and "build-g" in result.output
    assert eval_json(model, test, rows, tmp_path / "e.json") == eval_json(
        root / "stage2", test, rows, tmp_path / "p.json")

    invoke("build-g", train, "--model", model, *options)
    for name in ("index.faiss", "affinity.safetensors", "config.json"):
        assert (model / name).read_bytes() == (reference / name).read_bytes(), name
    rows = "wsabie,knn-wsabie"
    assert eval_json(model, test, rows, tmp_path / "a.json") == eval_json(
        reference, test, rows, tmp_path / "b.json")


def test_kill_score_then_run_again(tmp_path, data):
    """Killed mid-way through a directory of 4 files of 3 row groups each (every row group
    sleeps 0.15 s first): the outputs already renamed are complete, no other output exists, and
    the same command run again writes the rest, skips those, and leaves no temporary file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    train, test, root = data
    model = root / "stage2"
    inputs = tmp_path / "in"
    inputs.mkdir()
    table = pq.read_table(test).drop(["labels"])
    table = table.append_column("id", pa.array(range(len(table)), pa.int64()))
    for part in range(4):
        pq.write_table(table.slice(part * 30, 30), inputs / f"part-{part}.parquet",
                       row_group_size=10)
    options = ("--model", model, "--k", 3, "--threads", 1)
    reference = tmp_path / "reference"
    invoke("score", inputs, "--out", reference, *options)

    out = tmp_path / "out"
    proc = start(0.15, "row-group", "score", inputs, "--out", out, *options)
    kill_when(proc, lambda: (out / "part-0.parquet").exists(), after=0.2)
    done = sorted(p.name for p in out.glob("*.parquet"))
    assert done and len(done) < 4  # killed mid-way, while writing the next output
    assert any(p.name.endswith(".tmp") for p in out.iterdir())
    for name in done:  # whatever is there under its final name is complete
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    first = {name: (out / name).stat().st_ino for name in done}

    result = invoke("score", inputs, "--out", out, *options)
    assert f"skipped {len(done)} output(s)" in result.output
    assert sorted(p.name for p in out.iterdir()) == [f"part-{i}.parquet" for i in range(4)]
    for i in range(4):  # complete, no duplicates, the same bytes as never killed
        name = f"part-{i}.parquet"
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    assert {name: (out / name).stat().st_ino for name in done} == first  # not rewritten
