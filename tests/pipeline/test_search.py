"""The ``auto`` choices made on the validation rows: ``--neighbors auto`` (stage 2, by G's own
P@k) and ``--label-bias-start auto`` within ``--budget`` (stage 3)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import awe.pipeline as pipeline_module
from awe.affinity.g import Affinity, AffinityConfig
from awe.affinity.search import ValidationRows, g_precision, neighbour_candidates, pick
from awe.affinity.stage import build_g
from awe.card import read_card
from awe.csr import Csr
from awe.errors import AweError
from awe.io.holdout import Holdout, split_held
from awe.io.reader import Columns, load_examples, scan
from awe.pipeline import Search, label_bias_starts, retrain_awe, train_wsabie
from awe.training.checkpoint import Checkpoint
from awe.training.config import LABEL_BIAS_CANDIDATES, LABEL_BIAS_START, TrainConfig
from cli.main import app
from tests.affinity.test_affinity import write_clusters
from tests.pipeline.test_validation import write_users

STAGE3 = TrainConfig(epochs=2, lr=0.01, batch_size=64, seed=2, threads=1)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    data = write_clusters(root / "train.parquet", 600, 0)
    train_wsabie(data, root / "m", TrainConfig(epochs=3, dim=8, seed=0, threads=1,
                                               valid_fraction=0.25), checkpoints=False)
    return root, data


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- G's own P@k


def _brute_precision(g: Csr, truth: Csr, n_labels: int, k: int) -> float:
    """P@k of ranking labels by G (ties: the smaller id first)."""
    total, rows = 0.0, 0
    for i in range(g.n_rows):
        true = set(truth.indices[truth.indptr[i]:truth.indptr[i + 1]].tolist())
        if not true:
            continue
        scores = np.zeros(n_labels)
        scores[g.indices[g.indptr[i]:g.indptr[i + 1]]] = g.values[g.indptr[i]:g.indptr[i + 1]]
        order = sorted(range(n_labels), key=lambda y: (-scores[y], y))
        total += len(set(order[:k]) & true) / k
        rows += 1
    return total / rows


def _random_csr(rng, n_rows, n_labels, per_row, values=True):
    indptr, indices, vals = [0], [], []
    for _ in range(n_rows):
        ids = np.sort(rng.choice(n_labels, rng.integers(0, per_row + 1), replace=False))
        indices += ids.tolist()
        vals += np.round(rng.random(len(ids)), 1).tolist()  # ties on purpose
        indptr.append(len(indices))
    return Csr(np.array(indptr, dtype=np.int64), np.array(indices, dtype=np.int64),
               np.array(vals, dtype=np.float32) if values else None)


@pytest.mark.parametrize("k,seed", [(1, 0), (3, 1), (3, 2)])
def test_g_precision_matches_a_brute_force_ranking(k, seed):
    rng = np.random.default_rng(seed)
    g = _random_csr(rng, 50, 12, 6)
    truth = _random_csr(rng, 50, 12, 3, values=False)
    rows = ValidationRows(np.zeros((50, 2), np.float32), truth, "annotation", k)
    assert g_precision(g, rows, 12) == pytest.approx(_brute_precision(g, truth, 12, k))


def test_candidates_put_the_task_default_first_and_it_wins_ties():
    assert neighbour_candidates("annotation") == (20, 10, 40)
    assert neighbour_candidates("recommendation") == (100,)
    assert pick({20: 0.5, 10: 0.5, 40: 0.4}) == 20
    assert pick({20: 0.5, 10: 0.4, 40: 0.6}) == 40


# ----------------------------------------------------------------------------- --neighbors auto


def _valid_precision(model, data, k=1) -> float:
    """G's P@k on stage 1's validation rows, each queried as a new row, as prediction does."""
    card = read_card(model)
    holdout = Holdout.from_dict(card.stage1.holdout)
    found = scan(data, Columns())
    rows = load_examples(data, found.schema, found.vocab)
    _, valid = split_held(rows, holdout.again(rows.labels), holdout.task)
    affinity = Affinity.load(model, card.stage2)
    g = affinity.examples_affinity(valid)
    truth = ValidationRows(None, valid.labels, "annotation", k)
    return g_precision(g, truth, len(found.vocab))


def test_neighbors_auto_builds_the_g_of_the_best_count_on_validation(stage1, tmp_path):
    root, data = stage1
    auto = _copy(root / "m", tmp_path / "auto")
    stats, _ = build_g(data, auto, AffinityConfig(index="flat", threads=1))
    search = stats["neighbors_search"]
    assert search["valid_rows"] == 150
    scores = {}
    for n in (20, 10, 40):  # each count built on its own: the numbers the search recorded
        model = _copy(root / "m", tmp_path / f"n{n}")
        build_g(data, model, AffinityConfig(neighbors=n, index="flat", threads=1))
        scores[n] = _valid_precision(model, data)
        assert search["valid_P@1"][str(n)] == pytest.approx(scores[n], abs=1e-6)
    chosen = pick(scores)
    assert search["chosen"] == chosen
    assert read_card(auto).stage2.config.neighbors == chosen
    # the G written is the one a build with that count writes, lambda included
    with safe_open(auto / "affinity.safetensors", "pt") as a, \
            safe_open(tmp_path / f"n{chosen}" / "affinity.safetensors", "pt") as b:
        for name in ("g_indptr", "g_label_ids", "g_weights"):
            torch.testing.assert_close(a.get_tensor(name), b.get_tensor(name))
    assert read_card(auto).stage2.config.lam == pytest.approx(
        read_card(tmp_path / f"n{chosen}").stage2.config.lam)


def test_neighbors_auto_without_validation_rows_is_the_task_default(tmp_path):
    data = write_clusters(tmp_path / "train.parquet", 200, 0)
    model = tmp_path / "m"
    train_wsabie(data, model, TrainConfig(epochs=1, dim=8, valid_fraction=0.0, threads=1),
                 checkpoints=False)
    stats, _ = build_g(data, model, AffinityConfig(index="flat", threads=1))
    assert "neighbors_search" not in stats
    assert read_card(model).stage2.config.neighbors == 20


def test_neighbors_auto_for_recommendation_is_100(tmp_path):
    data = write_users(tmp_path / "train.parquet", 150)
    model = tmp_path / "m"
    train_wsabie(data, model, TrainConfig(epochs=1, dim=8, valid_fraction=0.2, seed=0,
                                          task="recommendation", threads=1), checkpoints=False)
    stats, _ = build_g(data, model, AffinityConfig(index="flat", threads=1))
    assert "neighbors_search" not in stats
    assert read_card(model).stage2.config.neighbors == 100


def test_neighbors_auto_caps_the_candidates_at_the_other_rows(tmp_path):
    """10 / 20 / 40 neighbours among 25 indexed rows: 40 becomes the 24 other rows."""
    data = write_clusters(tmp_path / "train.parquet", 30, 0)
    model = tmp_path / "m"
    train_wsabie(data, model, TrainConfig(epochs=1, dim=8, valid_fraction=1 / 6, threads=1),
                 checkpoints=False)
    stats, _ = build_g(data, model, AffinityConfig(index="flat", threads=1))
    assert set(stats["neighbors_search"]["valid_P@1"]) == {"10", "20", "24"}


# ----------------------------------------------------------------------- --label-bias-start auto


@pytest.fixture(scope="module")
def stage2(stage1):
    root, data = stage1
    model = root / "g"
    if not model.exists():
        _copy(root / "m", model)
        build_g(data, model, AffinityConfig(neighbors=10, index="flat", threads=1))
    return model, data


def script_scores(monkeypatch, scores: list[float]) -> list:
    """The n-th fit's best validation P@1 is scores[n] (the search reads it); returns the starts
    of beta' each fit's model began from."""
    real = pipeline_module.fit_selected
    starts = []

    def fit_selected(new_model, *args, **kwargs):
        model, result, fitted, validated = real(new_model, *args, **kwargs)
        beta = model.label_bias
        starts.append(None if beta is None else "beta")
        result.best_metrics["P@1"] = scores[len(starts) - 1]
        return model, result, fitted, validated

    monkeypatch.setattr(pipeline_module, "fit_selected", fit_selected)
    return starts


def _weights(model) -> dict:
    with safe_open(model / "awe.safetensors", "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118


@pytest.mark.parametrize("scores,chosen", [([0.5, 0.6], None), ([0.6, 0.5], LABEL_BIAS_START),
                                           ([0.5, 0.5], LABEL_BIAS_START)])
def test_label_bias_start_auto_keeps_the_better_start(stage2, tmp_path, monkeypatch, scores,
                                                      chosen):
    """Round 1 is trained from 3 and from none; the better validation P@1 is kept (a tie keeps
    3), with the weights of a run given that start."""
    g_model, data = stage2
    reference = _copy(g_model, tmp_path / "reference")
    retrain_awe(data, reference, STAGE3, rounds=1, label_bias=chosen, checkpoints=False)
    starts = script_scores(monkeypatch, scores)
    model = _copy(g_model, tmp_path / "auto")
    retrain_awe(data, model, STAGE3, rounds=1, label_bias="auto")
    assert starts == ["beta", None]
    card = read_card(model)
    assert card.stage3.label_bias_init == chosen
    search = json.loads((model / "metrics.json").read_text())["awe"]["search"]
    assert search["label_bias_start"] == {"chosen": chosen,
                                          "valid_P@1": {"3": scores[0], "none": scores[1]}}
    mine, theirs = _weights(model), _weights(reference)
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=0)


def test_budget_zero_tries_the_first_candidate_only(stage2, tmp_path, monkeypatch):
    g_model, data = stage2
    starts = script_scores(monkeypatch, [0.5, 0.9, 0.9])
    model = _copy(g_model, tmp_path / "m")
    notes = []
    retrain_awe(data, model, STAGE3, rounds="auto", label_bias="auto", budget=0,
                report=notes.append)
    assert starts == ["beta"]  # neither the other start nor round 2
    metrics = json.loads((model / "metrics.json").read_text())["awe"]
    assert metrics["rounds_run"] == 1
    assert metrics["search"]["label_bias_start"]["not_tried"] == [None]
    assert metrics["search"]["rounds"]["not_tried"] == [2]
    assert read_card(model).stage3.label_bias_init == LABEL_BIAS_START
    assert any("--budget" in line for line in notes)


def test_a_kill_after_the_search_resumes_with_the_chosen_start(stage2, tmp_path, monkeypatch):
    g_model, data = stage2
    plain = _copy(g_model, tmp_path / "plain")
    script_scores(monkeypatch, [0.5, 0.6])
    retrain_awe(data, plain, STAGE3, rounds=1, label_bias="auto", checkpoints=False)
    monkeypatch.undo()

    class Crash(Exception):
        pass

    real_save = Checkpoint.save

    def save_then_crash(self, state):
        real_save(self, state)
        raise Crash

    model = _copy(g_model, tmp_path / "m")
    script_scores(monkeypatch, [0.5, 0.6])
    monkeypatch.setattr(Checkpoint, "save", save_then_crash)
    with pytest.raises(Crash):  # the first save is the one right after the search
        retrain_awe(data, model, STAGE3, rounds=1, label_bias="auto")
    monkeypatch.undo()
    starts = script_scores(monkeypatch, [0.1])
    retrain_awe(data, model, STAGE3, rounds=1, label_bias="auto", resume=True)
    assert starts == [None]  # no second search: the chosen start, trained again
    assert read_card(model).stage3.label_bias_init is None
    mine, theirs = _weights(model), _weights(plain)
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=0)


def test_search_fits_a_candidate_by_the_last_fit_and_the_g_it_needs():
    search = Search(10.0)
    assert search.fits()  # nothing timed yet: the first candidate is the run's own
    search.spent(4.0, first=True)
    assert search.fits() and search.used == 0.0
    search.spent(7.0)
    assert search.used == 7.0 and not search.fits()
    assert Search(10.0, unit=4.0, used=5.0).fits(extra=1.0) is True
    assert Search(10.0, unit=4.0, used=5.0).fits(extra=2.0) is False


def test_label_bias_starts():
    assert label_bias_starts("auto") == LABEL_BIAS_CANDIDATES
    assert label_bias_starts(None) == (None,)
    assert label_bias_starts(2) == (2.0,)
    for bad in ("x", True, float("nan")):
        with pytest.raises(AweError, match="label_bias_start"):
            label_bias_starts(bad)


def test_cli_rejects_a_bad_budget_or_start(stage2, tmp_path):
    g_model, data = stage2
    model = _copy(g_model, tmp_path / "m")
    runner = CliRunner()
    got = runner.invoke(app, ["retrain", str(data), "--model", str(model), "--budget", "-1"])
    assert got.exit_code == 2 and "--budget must be a number of seconds >= 0" in got.output
    got = runner.invoke(app, ["retrain", str(data), "--model", str(model),
                              "--label-bias-start", "high"])
    assert got.exit_code == 2 and "expected a number, none or auto" in got.output


def test_a_kept_round_2_keeps_the_neighbour_count_and_its_record(stage1, tmp_path, monkeypatch):
    """Round 2's G is rebuilt from U' with the count chosen on stage 1's G, and metrics.json
    still says how it was chosen."""
    root, data = stage1
    model = _copy(root / "m", tmp_path / "m")
    stats, _ = build_g(data, model, AffinityConfig(index="flat", threads=1))
    script_scores(monkeypatch, [0.5, 0.4, 0.9])  # round 1 from 3, from none; round 2
    retrain_awe(data, model, STAGE3, rounds="auto")
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["awe"]["round"] == 2
    assert metrics["g"]["neighbors_search"] == stats["neighbors_search"]
    assert read_card(model).stage2.config.neighbors == stats["neighbors_search"]["chosen"]
    assert read_card(model).stage2.source == "awe round 1"
