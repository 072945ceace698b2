"""Ranking metrics (awe.ranking.metrics): hand-computed answers and a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from awe.csr import Csr
from awe.io.reader import Examples, InputSchema
from awe.ranking.metrics import RankingMetrics, evaluate, parse_ks
from awe.ranking.topk import (
    HEAP_MAX_K,
    THRESHOLD_MIN_LABELS_PER_K,
    _largest,
    _threshold_top,
    mask_excluded,
    ranked_top_k,
    top_k,
)

NEG = float("-inf")


def csr(rows: list[list[int]]) -> Csr:
    return Csr.from_lengths(np.array([len(r) for r in rows], dtype=np.int64),
                            np.array([i for r in rows for i in r], dtype=np.int64))


# ----------------------------------------------------------------------------- top_k


@pytest.mark.parametrize("scores, k, ids, vals", [
    ([[1, 3, 3, 2]], 1, [[1]], [[3]]),
    ([[1, 3, 3, 2]], 2, [[1, 2]], [[3, 3]]),
    ([[1, 3, 3, 2]], 3, [[1, 2, 3]], [[3, 3, 2]]),
    ([[5, 5, 5, 5]], 2, [[0, 1]], [[5, 5]]),  # a tie across the cut: lower ids win
    ([[0, 7, 0, 7, 0]], 3, [[1, 3, 0]], [[7, 7, 0]]),
    ([[2, 1, 2, 1, 2]], 4, [[0, 2, 4, 1]], [[2, 2, 2, 1]]),
    ([[NEG, 0, NEG, -1]], 2, [[1, 3]], [[0, -1]]),  # -inf never chosen over a finite score
    ([[NEG, 0, NEG, -1]], 3, [[1, 3, -1]], [[0, -1, NEG]]),
    ([[NEG, -5, NEG, -(2.0**100)]], 4, [[1, 3, -1, -1]], [[-5, -(2.0**100), NEG, NEG]]),
    ([[NEG, NEG, NEG]], 2, [[-1, -1]], [[NEG, NEG]]),
    ([[1, 2]], 4, [[1, 0, -1, -1]], [[2, 1, NEG, NEG]]),  # k > L pads with -1
    ([[NEG, 2]], 3, [[1, -1, -1]], [[2, NEG, NEG]]),
    ([[0.5]], 1, [[0]], [[0.5]]),
    (  # several rows at once, each ranked on its own
        [[3, 1, 2], [1, 1, 1], [NEG, 9, NEG], [-2, -1, -3]], 2,
        [[0, 2], [0, 1], [1, -1], [1, 0]], [[3, 2], [1, 1], [9, NEG], [-1, -2]],
    ),
])
def test_top_k_hand_cases(scores, k, ids, vals):
    got_ids, got_vals = top_k(torch.tensor(scores, dtype=torch.float32), k)
    assert got_ids.dtype == torch.int64
    assert got_ids.tolist() == ids
    assert got_vals.tolist() == vals


def test_top_k_matches_sorting_by_score_then_id():
    rng = np.random.default_rng(3)
    for _ in range(50):
        n, n_labels, k = rng.integers(1, 6), rng.integers(1, 9), rng.integers(1, 11)
        s = np.round(rng.normal(size=(n, n_labels)), 0).astype(np.float32)
        s[rng.random(s.shape) < 0.2] = NEG
        ids, vals = top_k(torch.from_numpy(s.copy()), int(k))
        for i in range(n):
            order = sorted((j for j in range(n_labels) if s[i, j] != NEG),
                           key=lambda j, i=i: (-s[i, j], j))[:k]
            expected = order + [-1] * (k - len(order))
            assert ids[i].tolist() == expected
            assert vals[i].tolist() == [float(s[i, j]) for j in order] + [NEG] * (k - len(order))


def _reference_top_k(s: np.ndarray, k: int) -> tuple[list, list]:
    """Brute force: by score then id, NaN and -inf never ranked, -1 / -inf padding."""
    ids, vals = [], []
    for row in s:
        order = sorted((j for j in range(len(row)) if not np.isnan(row[j]) and row[j] != NEG),
                       key=lambda j, row=row: (-row[j], j))[:k]
        ids.append(order + [-1] * (k - len(order)))
        vals.append([float(row[j]) for j in order] + [NEG] * (k - len(order)))
    return ids, vals


# thresholds where L >= 16 k (1000, 3001: a tail of columns, groups longer than 8), else heaps
# (k <= 32), else torch.topk; the rows a threshold leaves (ties, NaN, -inf) take the others
@pytest.mark.parametrize("k", [1, 10, HEAP_MAX_K - 1, HEAP_MAX_K + 5])
@pytest.mark.parametrize("n_labels", [7, 60, 1000, 3001])
def test_top_k_every_selection_path_matches_brute_force(k, n_labels):
    rng = np.random.default_rng(k * 1000 + n_labels)
    s = np.round(rng.normal(size=(40, n_labels)) * 3, 0).astype(np.float32)  # many ties
    s[rng.random(s.shape) < 0.1] = NEG
    s[rng.random(s.shape) < 0.05] = np.nan
    s[0] = NEG  # no label to rank
    s[1, :] = NEG
    s[1, 2] = -np.finfo(np.float32).max  # finite: ranked, though it equals a heap's empty slot
    s[2] = np.nan
    s[3] = 1.0  # one tie over the whole row
    ids, vals = top_k(torch.from_numpy(s.copy()), k)
    want_ids, want_vals = _reference_top_k(s, k)
    assert ids.tolist() == want_ids
    assert vals.tolist() == want_vals


@pytest.mark.parametrize("n_labels, k", [(160, 10), (1000, 1), (1001, 10), (3001, 10),
                                           (5000, 40)])
def test_threshold_top_settles_plain_rows_and_leaves_the_rest(n_labels, k):
    """Rows a threshold settles equal the brute force; rows with a NaN, with fewer than k
    scores above -inf or with many ties at the threshold are left (slots -1 / -inf)."""
    assert n_labels >= THRESHOLD_MIN_LABELS_PER_K * k or n_labels == 160
    rng = np.random.default_rng(n_labels + k)
    s = rng.normal(size=(12, n_labels)).astype(np.float32)
    s[1, 5] = np.nan
    s[2, :] = NEG
    s[2, : k - 1] = 1.0  # k - 1 finite scores
    s[3, :] = 2.0  # every score ties
    s[4, [0, 7, 9]] = np.sort(s[4])[-k]  # ties across the cut: the lower ids win
    s[5, ::3] = NEG
    s[6, -1] = 50.0  # the best score in the last (tail) column
    s[7] = -(2.0 ** 100) * (1 + rng.random(n_labels))  # finite, far below zero
    s[7, 3] = 0.0
    ids, vals, left = _threshold_top(torch.from_numpy(s.copy()), k)
    assert left.tolist() == [1, 2, 3]
    want_ids, want_vals = _reference_top_k(s, k)
    for row in range(len(s)):
        if row in (1, 2, 3):
            assert ids[row].tolist() == [-1] * k and vals[row].tolist() == [NEG] * k
        else:
            assert ids[row].tolist() == want_ids[row], row
            assert vals[row].tolist() == want_vals[row], row
    assert ids[6, 0] == n_labels - 1
    # mostly ties (a knn row's dense G: zeros): no row is taken, top_k ranks them all elsewhere
    sparse = np.zeros((4, n_labels), dtype=np.float32)
    sparse[:, 3:3 + k - 1] = 1.0  # k - 1 positive scores: the k-th is a zero, tied with all
    assert _threshold_top(torch.from_numpy(sparse), k) is None
    assert top_k(torch.from_numpy(sparse), k)[0].tolist() == _reference_top_k(sparse, k)[0]


def test_largest_equals_torch_topk_on_distinct_scores():
    s = torch.from_numpy(np.random.default_rng(0).permutation(5000).reshape(5, 1000)
                         .astype(np.float32))
    for k in (1, 11, HEAP_MAX_K):
        got, want = _largest(s, k), torch.topk(s, k, dim=1)
        assert torch.equal(got[0], want.values) and torch.equal(got[1], want.indices)
    sparse = torch.tensor([[NEG, 2.0, NEG, 1.0], [NEG] * 4])
    values, ids = _largest(sparse, 3)  # slots beyond the scores above -inf: id -1, -inf
    assert ids.tolist() == [[1, 3, -1], [-1, -1, -1]]
    assert values.tolist() == [[2.0, 1.0, NEG], [NEG, NEG, NEG]]


def test_mask_excluded():
    scores = torch.zeros(3, 4)
    out = mask_excluded(scores, csr([[1], [], [0, 3]]))
    assert out is scores  # in place
    assert scores.tolist() == [[0, NEG, 0, 0], [0, 0, 0, 0], [NEG, 0, 0, NEG]]
    untouched = torch.ones(2, 2)
    mask_excluded(untouched, None)
    mask_excluded(untouched, Csr.empty(2))
    assert untouched.tolist() == [[1, 1], [1, 1]]


def test_parse_ks():
    assert parse_ks("10,1,3,3") == [1, 3, 10]
    assert parse_ks([5, 2]) == [2, 5]
    for bad in ("0", "1,-2", []):
        with pytest.raises(ValueError):
            parse_ks(bad)


# ----------------------------------------------------------------------------- hand-computed

C = 1 / math.log2(3)  # the discount of rank 2; rank 1 has 1, rank 3 has 1/log2(4) = 1/2

# Four rows ranked over five labels (ids 0..4), ks = 1, 2, 3:
#   A: truth {0, 4},            ranking [4, 1, 0]   hits 1 0 1
#   B: truth {3} + 1 unknown,   ranking [0, 3, -1]  hits 0 1 0   (the -1 is row A's key 4 minus one
#                                                                 row: it must not count as a hit)
#   C: no truth at all,         ranking [0, 1, 2]   left out of every average
#   D: 1 unknown label only,    ranking [4, -1, -1] hits 0 0 0
# Per row:                 A                      B                D
#   P@1, P@2, P@3          1, 1/2, 2/3            0, 1/2, 1/3      0, 0, 0
#   R@1, R@2, R@3          1/2, 1/2, 1            0, 1/2, 1/2      0, 0, 0
#   NDCG@1                 1/1                    0                0
#   NDCG@2                 1/(1+C)                C/(1+C)          0
#   NDCG@3                 (1+1/2)/(1+C)          C/(1+C)          0
#   AP@1                   1/1                    0                0
#   AP@2                   (1*1)/2                (1/2*1)/2        0
#   AP@3                   (1 + 2/3*1)/2          (1/2*1)/2        0
HAND_TOP = [[4, 1, 0], [0, 3, -1], [0, 1, 2], [4, -1, -1]]
HAND_TRUTH = [[0, 4], [3], [], []]
HAND_UNKNOWN = [0, 1, 0, 1]
HAND_EXPECTED = {
    "P@1": (1 + 0 + 0) / 3,
    "P@2": (1 / 2 + 1 / 2 + 0) / 3,
    "P@3": (2 / 3 + 1 / 3 + 0) / 3,
    "R@1": (1 / 2 + 0 + 0) / 3,
    "R@2": (1 / 2 + 1 / 2 + 0) / 3,
    "R@3": (1 + 1 / 2 + 0) / 3,
    "NDCG@1": (1 + 0 + 0) / 3,
    "NDCG@2": (1 / (1 + C) + C / (1 + C) + 0) / 3,
    "NDCG@3": ((1 + 1 / 2) / (1 + C) + C / (1 + C) + 0) / 3,
    "MAP@1": (1 + 0 + 0) / 3,
    "MAP@2": (1 / 2 + 1 / 4 + 0) / 3,
    "MAP@3": (5 / 6 + 1 / 4 + 0) / 3,
}


def test_ranking_metrics_hand_computed():
    m = RankingMetrics([3, 1, 2])
    m.update(np.array(HAND_TOP), csr(HAND_TRUTH), np.array(HAND_UNKNOWN))
    assert m.n_rows == 3  # row C has no true label
    got = m.result()
    assert set(got) == set(HAND_EXPECTED)
    for name, value in HAND_EXPECTED.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name


def test_ranking_metrics_accumulate_over_batches():
    m = RankingMetrics([1, 2, 3])
    for lo, hi in ((0, 1), (1, 3), (3, 4)):
        m.update(np.array(HAND_TOP[lo:hi]), csr(HAND_TRUTH[lo:hi]),
                 np.array(HAND_UNKNOWN[lo:hi]))
    for name, value in m.result().items():
        assert value == pytest.approx(HAND_EXPECTED[name], rel=1e-12, abs=1e-15), name


def test_ranking_metrics_more_truth_than_k():
    # truth {0, 1, 2}, ranking [1, 5, 2, 0]: hits 1 0 1 1
    m = RankingMetrics([1, 2, 4])
    m.update(np.array([[1, 5, 2, 0]]), csr([[0, 1, 2]]), np.array([0]))
    got = m.result()
    idcg2, idcg3 = 1 + C, 1 + C + 1 / 2
    expected = {
        "P@1": 1, "P@2": 1 / 2, "P@4": 3 / 4,
        "R@1": 1 / 3, "R@2": 1 / 3, "R@4": 1,
        "NDCG@1": 1, "NDCG@2": 1 / idcg2, "NDCG@4": (1 + 1 / 2 + 1 / math.log2(5)) / idcg3,
        "MAP@1": 1, "MAP@2": 1 / 2, "MAP@4": (1 + 2 / 3 + 3 / 4) / 3,
    }
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name


def test_ranking_metrics_no_counted_rows():
    m = RankingMetrics([1, 5])
    m.update(np.array([[0, 1, 2, 3, 4]]), csr([[]]), np.array([0]))
    assert m.n_rows == 0
    assert all(v == 0.0 for v in m.result().values())


def test_evaluate_hand_computed_through_scores():
    # the same four rows as HAND_*, as scores whose ranking (with ties and exclusions) is HAND_TOP
    scores = torch.tensor([
        [1.0, 2.0, 0.5, 0.5, 3.0],  # A: 4, 1, 0 (label 2 ties 3 below the cut)
        [5.0, 1.0, 2.0, 4.0, 2.0],  # B: 0, 3, then 2 and 4 are excluded and 1 is excluded too
        [0.0, 0.0, 0.0, 0.0, 0.0],  # C: ties everywhere -> 0, 1, 2
        [NEG, NEG, NEG, NEG, 1.0],  # D: one finite label, then -1 slots
    ])
    examples = Examples(
        InputSchema("dense", 2), np.zeros((4, 2), np.float32), None, csr(HAND_TRUTH),
        np.array(HAND_UNKNOWN), exclude=csr([[], [1, 2, 4], [], []]))

    def score_fn(ex, rows):
        assert ex is examples
        return scores[torch.from_numpy(rows)].clone()

    got = evaluate(score_fn, examples, [1, 2, 3], batch_rows=3)
    for name, value in HAND_EXPECTED.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name


# ----------------------------------------------------------------------------- brute force


def reference_metrics(scores: np.ndarray, truth: list[set[int]], n_unknown: list[int],
                      exclude: list[set[int]], ks: list[int]) -> dict[str, float]:
    """Plain loops: rank by (score desc, id asc) over finite, non-excluded labels; then score."""
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("P", "R", "NDCG", "MAP")}
    counted = 0
    for i in range(len(scores)):
        n_true = len(truth[i]) + n_unknown[i]
        if n_true == 0:
            continue
        counted += 1
        candidates = [j for j in range(scores.shape[1])
                      if j not in exclude[i] and scores[i, j] != float("-inf")]
        ranking = sorted(candidates, key=lambda j, i=i: (-scores[i, j], j))
        for k in ks:
            top = ranking[:k]
            hit = [1 if j in truth[i] else 0 for j in top] + [0] * (k - len(top))
            n_hits = sum(hit)
            sums[f"P@{k}"] += n_hits / k
            sums[f"R@{k}"] += n_hits / n_true
            dcg = sum(hit[r] / math.log2(r + 2) for r in range(k))
            idcg = sum(1 / math.log2(r + 2) for r in range(min(n_true, k)))
            sums[f"NDCG@{k}"] += dcg / idcg
            ap = 0.0
            for j in range(k):
                if hit[j]:
                    ap += sum(hit[: j + 1]) / (j + 1)
            sums[f"MAP@{k}"] += ap / min(n_true, k)
    return {name: total / max(counted, 1) for name, total in sums.items()}


def test_evaluate_matches_brute_force_reference():
    rng = np.random.default_rng(20130117)
    for case in range(50):
        n, n_labels = int(rng.integers(1, 25)), int(rng.integers(1, 12))
        # rounding makes ties common; a few -inf scores exercise the -1 slots
        scores = np.round(rng.normal(size=(n, n_labels)) * 2) / 2
        scores[rng.random(scores.shape) < 0.1] = float("-inf")
        scores = scores.astype(np.float32)
        truth = [set(rng.choice(n_labels, size=rng.integers(0, min(n_labels, 4) + 1),
                                replace=False).tolist()) for _ in range(n)]
        n_unknown = rng.integers(0, 3, size=n) * (rng.random(n) < 0.3)
        exclude = [set(rng.choice(n_labels, size=rng.integers(0, min(n_labels, 3) + 1),
                                  replace=False).tolist()) if rng.random() < 0.5 else set()
                   for _ in range(n)]
        ks = sorted(set(rng.integers(1, n_labels + 4, size=3).tolist()))
        examples = Examples(
            InputSchema("dense", 3), rng.normal(size=(n, 3)).astype(np.float32), None,
            csr([sorted(t) for t in truth]), n_unknown.astype(np.int64),
            exclude=csr([sorted(e) for e in exclude]) if case % 5 else None)
        if examples.exclude is None:
            exclude = [set() for _ in range(n)]

        def score_fn(ex, rows, scores=scores):
            return torch.from_numpy(scores[rows].copy())

        got = evaluate(score_fn, examples, ks, batch_rows=int(rng.integers(1, 8)))
        expected = reference_metrics(scores, truth, n_unknown.tolist(), exclude, ks)
        assert set(got) == set(expected)
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), (case, name)


@pytest.mark.parametrize("k", [1, 3, 5, 12])
def test_candidate_scores_rank_like_the_dense_awe_scores(monkeypatch, k):
    """Stage 3's ranking from G's labels alone (rows with fewer than k left fall back to the
    dense scores) equals the dense ranking: ids, scores, ties, exclusions, empty rows."""
    from awe.models import affinity_wsabie as model_module
    from awe.models.affinity_wsabie import AffinityWsabie
    from awe.models.wsabie import ModelShape, batch_inputs

    monkeypatch.setattr(model_module, "CANDIDATES_MAX_SHARE", 1.0)  # 6 of 12 labels a row

    rng = np.random.default_rng(k)
    n_rows, n_labels, n_features, dim = 30, 12, 5, 3
    model = AffinityWsabie(ModelShape(n_features, n_labels, dim, False), bias=0.0,
                           label_bias=0.0)
    with torch.no_grad():  # small integers: every score exact in float32, so ties are real
        model.U.weight.copy_(torch.from_numpy(rng.integers(-2, 3, (dim, n_features))).float())
        model.V.weight.copy_(torch.from_numpy(rng.integers(-2, 3, (n_labels, dim))).float())
        model.label_bias.copy_(torch.from_numpy(rng.integers(-1, 2, n_labels)).float())
    lengths = rng.integers(0, 7, n_rows)
    lengths[0] = 0
    ids = np.concatenate([np.sort(rng.choice(n_labels, n, replace=False)) for n in lengths])
    weights = rng.integers(0, 4, len(ids)).astype(np.float32) / 2  # some 0: no candidate
    g = Csr.from_lengths(lengths, ids, weights)
    x = rng.integers(-2, 3, (n_rows, n_features)).astype(np.float32)
    examples = Examples(InputSchema("dense", n_features), x, None, Csr.empty(n_rows),
                        np.zeros(n_rows, dtype=np.int64)).with_affinity(g)
    model.bind(examples)
    exclude_lengths = rng.integers(0, 4, n_rows)
    exclude_lengths[1] = lengths[1]
    exclude = Csr.from_lengths(exclude_lengths, np.concatenate(
        [ids[g.indptr[1]:g.indptr[2]] if r == 1 else np.sort(rng.choice(n_labels, n,
                                                                          replace=False))
         for r, n in enumerate(exclude_lengths)]))  # row 1: all its candidates excluded
    rows = torch.arange(n_rows)
    with torch.no_grad():
        e = model.embed(batch_inputs(examples, np.arange(n_rows)))
        dense = model.all_scores(e, rows)
        candidates = model.candidate_scores(e, rows)
    want_ids, want_vals = ranked_top_k(dense.clone(), k, exclude)
    got_ids, got_vals = ranked_top_k(candidates, k, exclude)
    assert got_ids.tolist() == want_ids.tolist()
    assert got_vals.tolist() == want_vals.tolist()
    monkeypatch.setattr(model_module, "CANDIDATES_MAX_SHARE", 0.25)  # 3 of 12: rows too wide
    with torch.no_grad():
        assert model.candidate_scores(e, rows) is None
