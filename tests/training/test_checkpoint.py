"""Checkpoints and --resume: an interrupted run, resumed, ends bit for bit where an uninterrupted
one does; a diverging run keeps its last good checkpoint; a checkpoint of another run is refused.

Interruptions here are in-process: ``Checkpoint.save`` is wrapped to raise right after its k-th
write, for every k of a run, which is what a kill at that instant leaves on disk (the kill -9 tests
with real processes are in tests/cli/test_kill.py).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from awe.affinity.g import AffinityConfig
from awe.affinity.stage import build_g
from awe.errors import AweError, TrainingDiverged
from awe.pipeline import retrain_awe, train_wsabie
from awe.training.checkpoint import CHECKPOINT_DIR, Checkpoint
from awe.training.config import LABEL_BIAS_START, TrainConfig
from awe.training.loop import _WarpStep
from tests.affinity.test_affinity import write_clusters


class Crash(Exception):
    """Stands for a kill right after a checkpoint reached the disk."""


def crash_after(monkeypatch, k: int) -> None:
    real = Checkpoint.save
    calls = {"n": 0}

    def save(self, state):
        real(self, state)
        calls["n"] += 1
        if calls["n"] == k:
            raise Crash(k)

    monkeypatch.setattr(Checkpoint, "save", save)


def count_saves(monkeypatch) -> dict:
    real = Checkpoint.save
    calls = {"n": 0}

    def save(self, state):
        real(self, state)
        calls["n"] += 1

    monkeypatch.setattr(Checkpoint, "save", save)
    return calls


def outcome(model_dir: Path, weights: str, history: str, stage: str) -> tuple:
    """What must not differ between an interrupted-and-resumed run and an uninterrupted one: the
    weights' bytes, the history but for its timings, the stage's metrics but for its timing."""
    with open(model_dir / history) as fh:
        rows = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]
    metrics = json.loads((model_dir / "metrics.json").read_text())[stage]
    metrics = {k: v for k, v in metrics.items() if k not in ("seconds", "resumed")}
    return (model_dir / weights).read_bytes(), rows, metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return write_clusters(root / "train.parquet", 240, 0)


# three epochs picked on a held-out fifth (select phase), then the refit on every row for the best
# epoch's count; 48 pairs a batch: 4 batches an epoch in select, 5 in refit; a checkpoint every 2
# batches (none after an epoch's last batch: the epoch's end follows)
STAGE1 = TrainConfig(epochs=3, dim=8, batch_size=48, valid_fraction=0.2, refit=True, seed=1,
                     threads=1)


def test_stage1_resume_from_every_checkpoint_is_bit_identical(tmp_path, data, monkeypatch):
    plain = tmp_path / "plain"
    train_wsabie(data, plain, STAGE1, checkpoints=False)
    expected = outcome(plain, "wsabie.safetensors", "history.csv", "wsabie")

    calls = count_saves(monkeypatch)
    with_ck = tmp_path / "with"
    train_wsabie(data, with_ck, STAGE1, checkpoint_every=2)
    assert outcome(with_ck, "wsabie.safetensors", "history.csv", "wsabie") == expected
    assert not (with_ck / CHECKPOINT_DIR).exists()  # removed once the model is written
    n_saves = calls["n"]
    best = json.loads((with_ck / "metrics.json").read_text())["wsabie"]["best_epoch"]
    assert n_saves == 3 * (1 + 1) + best * (1 + 2)  # per epoch: its end, batch 2 (and 4)
    monkeypatch.undo()

    for k in range(1, n_saves + 1):
        model = tmp_path / f"k{k}"
        crash_after(monkeypatch, k)
        with pytest.raises(Crash):
            train_wsabie(data, model, STAGE1, checkpoint_every=2)
        monkeypatch.undo()
        assert not (model / "config.json").exists()  # no model yet, only the checkpoint
        notes = []
        train_wsabie(data, model, STAGE1, checkpoint_every=2, resume=True, report=notes.append)
        assert notes and notes[0].startswith("resuming from"), notes
        assert outcome(model, "wsabie.safetensors", "history.csv", "wsabie") == expected, k
        resumed = json.loads((model / "metrics.json").read_text())["wsabie"]["resumed"]
        assert resumed["changes"] == {}


def test_stage1_sparse_resume_inside_a_chunk(tmp_path, monkeypatch):
    """Sparse input, batches of 4: an epoch spans several chunks of 32 batches, and resuming at
    batch 40 or 50 starts inside the second chunk (batches 32-63)."""
    from tests.conftest import write_parquet

    rng = np.random.default_rng(0)
    n = 400
    ids = [sorted(rng.choice(50, size=rng.integers(1, 4), replace=False).tolist())
           for _ in range(n)]
    data = write_parquet(tmp_path / "sparse.parquet",
                         {"feature_ids": ids, "labels": [[f"l{i[0] % 7}"] for i in ids]})
    config = TrainConfig(epochs=2, dim=6, batch_size=4, valid_fraction=0, seed=0, threads=1)
    train_wsabie(data, tmp_path / "plain", config, checkpoints=False)
    expected = outcome(tmp_path / "plain", "wsabie.safetensors", "history.csv", "wsabie")
    for k in (4, 15):  # 10 checkpoints an epoch: batch 40 of epoch 1; batch 50 of epoch 2
        crash_after(monkeypatch, k)
        with pytest.raises(Crash):
            train_wsabie(data, tmp_path / f"k{k}", config, checkpoint_every=10)
        monkeypatch.undo()
        train_wsabie(data, tmp_path / f"k{k}", config, checkpoint_every=10, resume=True)
        assert outcome(tmp_path / f"k{k}", "wsabie.safetensors", "history.csv",
                       "wsabie") == expected


# one start of beta' (no search in round 1): these tests follow the rounds and checkpoints; the
# search of --label-bias-start auto has its own (tests/pipeline/test_search.py)
START = LABEL_BIAS_START
STAGE3 = TrainConfig(epochs=2, dim=8, lr=0.01, batch_size=64, valid_fraction=0.2, seed=2,
                     threads=1)


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("stage2")
    train_wsabie(data, root / "m", TrainConfig(epochs=2, dim=8, seed=0, threads=1),
                 checkpoints=False)
    build_g(data, root / "m", AffinityConfig(neighbors=5, index="flat", threads=1))
    return root / "m"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_stage3_two_rounds_resume_from_every_checkpoint(tmp_path, data, stage2, monkeypatch):
    """Round 2 rebuilds G from round 1's U': a kill there resumes at the round's start."""
    plain = _copy(stage2, tmp_path / "plain")
    retrain_awe(data, plain, STAGE3, label_bias=START, rounds=2, checkpoints=False)
    expected = outcome(plain, "awe.safetensors", "awe_history.csv", "awe")
    expected_g = (plain / "affinity.safetensors").read_bytes()

    calls = count_saves(monkeypatch)
    retrain_awe(data, _copy(stage2, tmp_path / "with"), STAGE3, label_bias=START, rounds=2)
    n_saves = calls["n"]
    # one per epoch (select and refit phases of both rounds: one history row each), and round 2's
    # start
    assert n_saves == len(expected[1]) + 1
    monkeypatch.undo()
    for k in range(1, n_saves + 1):
        model = _copy(stage2, tmp_path / f"k{k}")
        crash_after(monkeypatch, k)
        with pytest.raises(Crash):
            retrain_awe(data, model, STAGE3, label_bias=START, rounds=2)
        monkeypatch.undo()
        retrain_awe(data, model, STAGE3, label_bias=START, rounds=2, resume=True)
        assert outcome(model, "awe.safetensors", "awe_history.csv", "awe") == expected, k
        assert (model / "affinity.safetensors").read_bytes() == expected_g
        assert not (model / CHECKPOINT_DIR).exists()


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    real_step = _WarpStep.__call__
    calls = {"n": 0}

    def nan_in_epoch_3(self, rows, positives, inputs):  # 5 batches an epoch without holdout
        calls["n"] += 1
        done = real_step(self, rows, positives, inputs)
        if calls["n"] == 12:
            self.model.V.weight.data[0, 0] = math.nan
            return math.nan, 1
        return done

    monkeypatch.setattr(_WarpStep, "__call__", nan_in_epoch_3)
    config = TrainConfig(epochs=4, dim=8, batch_size=48, valid_fraction=0, seed=1, threads=1)
    model = tmp_path / "m"
    with pytest.raises(TrainingDiverged) as err:
        train_wsabie(data, model, config)
    message = str(err.value)
    assert "epoch 3, batch 1" in message and "--lr" in message and "--resume" in message
    path = model / CHECKPOINT_DIR / "wsabie.safetensors"
    assert str(path) in message and not (model / "config.json").exists()
    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()["awe_checkpoint"])
        assert meta["fit"]["epochs_done"] == 2 and meta["fit"]["batch"] == 0
        assert all(bool(torch.isfinite(fh.get_tensor(k)).all()) for k in fh.keys())
    monkeypatch.undo()
    notes = []
    train_wsabie(data, model, TrainConfig(**{**config.to_dict(), "lr": 0.02}), resume=True,
                 report=notes.append)
    assert "--lr 0.05 -> 0.02" in notes[0]
    metrics = json.loads((model / "metrics.json").read_text())["wsabie"]
    assert metrics["resumed"]["changes"] == {"lr": [0.05, 0.02]}
    assert metrics["best_epoch"] == 4 and not path.exists()


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, data, monkeypatch):
    model = tmp_path / "m"
    crash_after(monkeypatch, 2)
    with pytest.raises(Crash):
        train_wsabie(data, model, STAGE1)
    monkeypatch.undo()
    with pytest.raises(AweError, match=r"another run \(different --dim\)"):
        train_wsabie(data, model, TrainConfig(**{**STAGE1.to_dict(), "dim": 4}), resume=True)
    other = write_clusters(tmp_path / "other.parquet", 240, 5)
    with pytest.raises(AweError, match=r"another run \(different data\)"):
        train_wsabie(other, model, STAGE1, resume=True)
    # without --resume the checkpoint is replaced, and the run says so
    notes = []
    train_wsabie(data, model, STAGE1, report=notes.append)
    assert "replaced" in notes[0] and "--resume" in notes[0]


def test_resume_without_a_checkpoint_trains_from_the_start(tmp_path, data):
    notes = []
    train_wsabie(data, tmp_path / "m", STAGE1, resume=True, report=notes.append)
    assert notes == [f"--resume: no checkpoint in {tmp_path / 'm'}; training from the start"]
    assert (tmp_path / "m" / "config.json").exists()


def test_damaged_checkpoint_is_one_clear_error(tmp_path, data, monkeypatch):
    model = tmp_path / "m"
    crash_after(monkeypatch, 1)
    with pytest.raises(Crash):
        train_wsabie(data, model, STAGE1)
    monkeypatch.undo()
    path = model / CHECKPOINT_DIR / "wsabie.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AweError, match="damaged weights file"):
        train_wsabie(data, model, STAGE1, resume=True)


def script_valid_scores(monkeypatch, scores: dict[int, float]) -> None:
    """Make round r's best validation P@1 scores[r] (the rounds' choice reads it)."""
    import awe.pipeline as pipeline_module

    real = pipeline_module.fit_selected
    calls = {"n": 0}

    def fit_selected(new_model, train, config, valid=None, progress=False, checkpoint=None,
                     refit_rows=None, say=None):
        calls["n"] += 1
        model, result, fitted, validated = real(new_model, train, config, valid, progress,
                                                checkpoint, refit_rows, say)
        round_no = checkpoint.position["round"] if checkpoint is not None else calls["n"]
        result.best_metrics[f"P@{config.selection_k}"] = scores[round_no]
        return model, result, fitted, validated

    monkeypatch.setattr(pipeline_module, "fit_selected", fit_selected)


def round_files(model_dir: Path) -> dict:
    """The kept round's G, index and stage-3 weights (tensors: the file's metadata holds the
    stage-3 fingerprint, which covers the --rounds option)."""
    config = json.loads((model_dir / "config.json").read_text())
    with safe_open(model_dir / "awe.safetensors", "pt") as fh:
        weights = {k: fh.get_tensor(k).numpy().tobytes() for k in fh.keys()}  # noqa: SIM118
    return {"awe": weights,
            "g": (model_dir / "affinity.safetensors").read_bytes(),
            "index": (model_dir / "index.faiss").read_bytes(),
            "stage2": config["stage2"]["fingerprint"], "round": config["stage3"]["round"]}


@pytest.mark.parametrize("scores,kept", [({1: 0.5, 2: 0.4}, 1), ({1: 0.5, 2: 0.5}, 1),
                                         ({1: 0.1, 2: 0.2}, 2)])
def test_auto_rounds_keep_the_best_validated_round(tmp_path, data, stage2, monkeypatch, scores,
                                                   kept):
    """--rounds auto stops at the first round that does not raise the validation P@1 (ties
    included) and leaves exactly the files of a run of that many rounds; at most 2 rounds
    (a third would find no score)."""
    reference = _copy(stage2, tmp_path / "reference")
    retrain_awe(data, reference, STAGE3, label_bias=START, rounds=kept, checkpoints=False)
    script_valid_scores(monkeypatch, scores)
    model = _copy(stage2, tmp_path / "auto")
    retrain_awe(data, model, STAGE3, label_bias=START, rounds="auto", checkpoints=False)
    assert round_files(model) == {**round_files(reference), "round": kept}
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["awe"]["round"] == kept and metrics["awe"]["rounds_run"] == len(scores)
    reference_g = json.loads((reference / "metrics.json").read_text())["g"]
    untimed = {k for k in reference_g if not k.endswith("seconds")}
    assert {k: metrics["g"][k] for k in untimed} == {k: reference_g[k] for k in untimed}
    history = list(csv.DictReader(open(model / "awe_history.csv")))
    assert {row["round"] for row in history} == {str(r) for r in scores}
    assert not list(model.glob(".kept-round*"))


def test_auto_rounds_is_one_round_for_recommendation_on_labels_stage_1_saw(tmp_path,
                                                                          monkeypatch):
    """Held-out labels that stage 1 was refit on are in the U' that the next round's G is built
    from: no rounds are chosen on them. Labels stage 1 held out and never saw choose rounds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)   # 120 users, 5-9 items each of 30
    items = [[f"i{j}" for j in rng.choice(30, rng.integers(5, 10), replace=False)]
             for _ in range(120)]
    data = tmp_path / "train.parquet"
    pq.write_table(pa.table({"feature_ids": [[u] for u in range(120)],
                             "feature_values": [[1.0]] * 120, "labels": items}), data)
    for refit, rounds in ((True, 1), (False, 2)):
        model = tmp_path / f"m-{refit}"
        train_wsabie(data, model, TrainConfig(epochs=2, dim=8, seed=0, threads=1,
                                              task="recommendation", valid_fraction=0.2,
                                              refit=refit), checkpoints=False)
        build_g(data, model, AffinityConfig(neighbors=5, index="flat", threads=1))
        script_valid_scores(monkeypatch, {1: 0.1, 2: 0.2})
        retrain_awe(data, model, STAGE3, label_bias=START, rounds="auto", checkpoints=False)
        metrics = json.loads((model / "metrics.json").read_text())["awe"]
        assert metrics["round"] == metrics["rounds_run"] == rounds
        assert metrics["validation"] == ("rows stage 1 trained on" if refit else "holdout")
        monkeypatch.undo()
    retrain_awe(data, tmp_path / "m-True", STAGE3, label_bias=START, rounds=2,
                checkpoints=False)  # asked for
    assert json.loads((tmp_path / "m-True" / "metrics.json").read_text())["awe"]["rounds_run"] == 2


def test_auto_rounds_resume_from_every_checkpoint(tmp_path, data, stage2, monkeypatch):
    """A kill anywhere in an auto run (round 2 worse than round 1) resumes to its outcome."""
    script_valid_scores(monkeypatch, {1: 0.5, 2: 0.4})
    plain = _copy(stage2, tmp_path / "plain")
    retrain_awe(data, plain, STAGE3, label_bias=START, rounds="auto", checkpoints=False)
    expected = outcome(plain, "awe.safetensors", "awe_history.csv", "awe"), round_files(plain)
    calls = count_saves(monkeypatch)
    retrain_awe(data, _copy(stage2, tmp_path / "with"), STAGE3, label_bias=START, rounds="auto")
    n_saves = calls["n"]
    monkeypatch.undo()
    for k in range(1, n_saves + 1):
        script_valid_scores(monkeypatch, {1: 0.5, 2: 0.4})
        model = _copy(stage2, tmp_path / f"k{k}")
        crash_after(monkeypatch, k)
        with pytest.raises(Crash):
            retrain_awe(data, model, STAGE3, label_bias=START, rounds="auto")
        monkeypatch.undo()
        script_valid_scores(monkeypatch, {1: 0.5, 2: 0.4})
        retrain_awe(data, model, STAGE3, label_bias=START, rounds="auto", resume=True)
        monkeypatch.undo()
        got = outcome(model, "awe.safetensors", "awe_history.csv", "awe"), round_files(model)
        assert got == expected, k
        assert not (model / CHECKPOINT_DIR).exists() and not list(model.glob(".kept-round*"))


@pytest.mark.parametrize("rounds", [0, -1, "x", 1.5, True, "2.0"])
def test_bad_rounds(tmp_path, data, stage2, rounds):
    with pytest.raises(AweError, match="rounds must be 'auto' or an integer >= 1"):
        retrain_awe(data, _copy(stage2, tmp_path / "m"), STAGE3, label_bias=START, rounds=rounds)
