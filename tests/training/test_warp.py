"""Known-answer tests of WARP: rank weights, the rank estimate, the batched sampler against a
plain sequential reference on the same draws, and the table sampler against the procedure's exact
law."""

import numpy as np
import pytest
import torch

from awe.csr import Csr, PaddedRows
from awe.training.warp import (
    PositiveSet,
    estimate_rank,
    first_violator,
    rank_weight_table,
    sample_violators,
    sample_violators_from_table,
    warp_loss,
)


def test_harmonic_weights_by_hand():
    table = rank_weight_table(4, "harmonic")
    assert table.tolist() == pytest.approx([0.0, 1.0, 1.5, 1.5 + 1 / 3, 1.5 + 1 / 3 + 0.25])


def test_log_weights_by_hand():
    table = rank_weight_table(3, "log")
    assert table.tolist() == pytest.approx([0.0, 0.0, np.log(2), np.log(3)])


def test_unknown_weight_kind():
    with pytest.raises(ValueError):
        rank_weight_table(3, "cubic")


def test_rank_estimate_by_hand():
    # L - |labels| = 99 negatives: found on draw 1 -> 99, on draw 10 -> 9, on draw 100 -> 0
    r = estimate_rank(torch.tensor([99, 99, 99, 7]), torch.tensor([1, 10, 100, 2]))
    assert r.tolist() == [99, 9, 0, 3]


def test_warp_loss_by_hand():
    loss = warp_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.8, 0.0]), torch.tensor([2.0, 1.0]),
                     margin=1.0)
    assert float(loss) == pytest.approx(2.0 * 0.8 + 1.0 * 0.5)


def sequential_warp(pos_score, neg_scores_row, labels_row, own_labels, margin):
    """The textbook loop: draw, skip own labels, stop at the first violator."""
    n = 0
    for label, score in zip(labels_row, neg_scores_row, strict=True):
        if label in own_labels:
            continue
        n += 1
        if score > pos_score - margin:
            return True, label, n
    return False, -1, n


def _random_case(seed, n_pairs=200, n_labels=30, budget=40):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_pairs, n_labels)).astype(np.float32)
    own = [set(rng.choice(n_labels, size=rng.integers(1, 6), replace=False).tolist())
           for _ in range(n_pairs)]
    positives = np.array([min(s) for s in own])
    draws = rng.integers(0, n_labels, size=(n_pairs, budget))
    return scores, own, positives, draws


@pytest.mark.parametrize("seed", range(5))
def test_first_violator_equals_sequential_reference(seed):
    scores, own, positives, draws = _random_case(seed)
    margin = 0.5
    pos = scores[np.arange(len(scores)), positives]
    neg = np.take_along_axis(scores, draws, 1)
    accepted = np.array([[d not in own[i] for d in draws[i]] for i in range(len(draws))])
    found, column, n = first_violator(torch.from_numpy(pos), torch.from_numpy(neg),
                                      torch.from_numpy(accepted), margin)
    for i in range(len(draws)):
        ref_found, ref_label, ref_n = sequential_warp(pos[i], neg[i], draws[i], own[i], margin)
        assert bool(found[i]) == ref_found
        if ref_found:
            assert draws[i, int(column[i])] == ref_label
            assert int(n[i]) == ref_n


@pytest.mark.parametrize("first_block,growth", [(1, 2), (3, 2), (8, 2), (64, 2), (1, 3), (8, 4)])
def test_blockwise_sampler_equals_sequential_reference(first_block, growth):
    scores, own, positives, draws = _random_case(7)
    margin = 0.3
    n_pairs, n_labels = scores.shape
    budget = draws.shape[1]
    offset = torch.zeros(n_pairs, dtype=torch.int64)
    draws_t = torch.from_numpy(draws)

    def draw(active, count):  # serve the fixed draw stream, in order, per pair
        cols = offset[active].unsqueeze(1) + torch.arange(count)
        offset[active] += count
        return draws_t[active.unsqueeze(1), cols]

    lengths = np.array([len(s) for s in own])
    labels = Csr.from_lengths(lengths, np.concatenate([sorted(s) for s in own]))
    positive_set = PositiveSet(labels, n_labels)
    scores_t = torch.from_numpy(scores)
    pairs = torch.arange(n_pairs)
    found, negatives, n_draws = sample_violators(
        scores_t[pairs, torch.from_numpy(positives)], draw,
        lambda a, y: scores_t[a.unsqueeze(1), y],
        lambda a, y: positive_set.contains(pairs[a], y), budget, margin, first_block, growth)
    for i in range(n_pairs):
        ref_found, ref_label, ref_n = sequential_warp(scores[i, positives[i]], scores[i, draws[i]],
                                                      draws[i], own[i], margin)
        assert bool(found[i]) == ref_found
        if ref_found:
            assert int(negatives[i]) == ref_label
            assert int(n_draws[i]) == ref_n
        else:
            assert int(negatives[i]) == -1
            assert int(n_draws[i]) == 0


def test_positive_set_bitmap_padded_and_sorted_agree(monkeypatch):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 5, size=50)
    ids = np.concatenate([np.sort(rng.choice(40, size=n, replace=False)) for n in lengths])
    labels = Csr.from_lengths(lengths, ids)
    rows = torch.from_numpy(rng.integers(0, 50, size=300))
    queries = torch.from_numpy(rng.integers(0, 40, size=(300, 7)))
    dense = PositiveSet(labels, 40).contains(rows, queries)
    monkeypatch.setattr(PositiveSet, "DENSE_LIMIT", 0)
    monkeypatch.setattr(PaddedRows, "MAX_PADDING", 100.0)
    padded_set = PositiveSet(labels, 40)
    assert padded_set.bitmap is None and padded_set.padded is not None
    assert torch.equal(dense, padded_set.contains(rows, queries))
    monkeypatch.setattr(PaddedRows, "MAX_WIDTH", 0)
    sparse_set = PositiveSet(labels, 40)
    assert sparse_set.bitmap is None and sparse_set.padded is None
    assert torch.equal(dense, sparse_set.contains(rows, queries))
    truth = {(r, int(y)) for r in range(50) for y in ids[labels.indptr[r]:labels.indptr[r + 1]]}
    expected = [[(int(r), int(y)) in truth for y in q] for r, q in zip(rows, queries, strict=True)]
    assert dense.tolist() == expected


def test_padded_rows_fit_rows_of_about_one_width():
    one_each = Csr.from_lengths(np.ones(10, dtype=np.int64), np.arange(10))
    assert PaddedRows.fits(one_each, 10)
    skewed = Csr.from_lengths(np.array([1] * 9 + [30]), np.r_[np.zeros(9, np.int64),
                                                               np.arange(30)])
    assert not PaddedRows.fits(skewed, 40)  # 10 x 30 cells for 39 entries
    assert not PaddedRows.fits(Csr.empty(5), 10)


@pytest.mark.parametrize("layout", ["dense", "padded", "keys"])
def test_affinity_table_layouts_match_brute_force(monkeypatch, layout):
    from awe.models.affinity_wsabie import AffinityTable

    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 6, size=30)
    ids = np.concatenate([np.sort(rng.choice(25, size=n, replace=False)) for n in lengths])
    g = Csr.from_lengths(lengths, ids, rng.uniform(0.1, 3.0, len(ids)).astype(np.float32))
    if layout != "dense":
        monkeypatch.setattr(AffinityTable, "DENSE_LIMIT", 0)
        monkeypatch.setattr(PaddedRows, "MAX_PADDING", 100.0)
    if layout == "keys":
        monkeypatch.setattr(PaddedRows, "MAX_WIDTH", 0)
    table = AffinityTable(g, 25)
    assert {"dense": table.dense, "padded": table.padded, "keys": table.keys}[layout] is not None
    weight = {(r, int(y)): float(v) for r in range(30)
              for y, v in zip(ids[g.indptr[r]:g.indptr[r + 1]],
                              g.values[g.indptr[r]:g.indptr[r + 1]], strict=True)}
    rows = torch.from_numpy(rng.integers(0, 30, size=200))
    queries = torch.from_numpy(rng.integers(0, 25, size=(200, 6)))
    got = table.lookup(rows, queries)  # [B, K] labels of rows [B]
    want = [[weight.get((int(r), int(y)), 0.0) for y in q] for r, q in zip(rows, queries,
                                                                         strict=True)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=0)
    torch.testing.assert_close(table.lookup(rows, queries[:, 0]), torch.tensor(want)[:, 0],
                               rtol=0, atol=0)


def sequential_law(scores, own, positive, margin, budget):
    """The exact law of the sequential procedure's outcome for one pair, by dynamic programming
    over its raw draws: {(violator, accepted draws N): probability}, and P(no violator)."""
    n_labels = len(scores)
    threshold = scores[positive] - margin
    violators = [y for y in range(n_labels) if y not in own and scores[y] > threshold]
    quiet = n_labels - len(own) - len(violators)     # accepted draws that do not violate
    law = {}
    alive = {0: 1.0}  # accepted draws so far -> probability of no violator yet
    for _ in range(budget):
        step = {}
        for n, p in alive.items():
            for y in violators:
                law[(y, n + 1)] = law.get((y, n + 1), 0.0) + p / n_labels
            step[n] = step.get(n, 0.0) + p * len(own) / n_labels
            step[n + 1] = step.get(n + 1, 0.0) + p * quiet / n_labels
        alive = step
    return law, sum(alive.values())


# (scores, own labels, positive, margin, budget): truncation, no violator, every negative a
# violator, one negative, a budget of one draw
TABLE_CASES = [
    ([0.5, 2.0, 0.1, 0.9, 3.0, -1.0, 0.95], {1, 2}, 1, 1.2, 5),
    ([0.5, 2.0, 0.1, 0.9, 3.0, -1.0, 0.95], {1, 2}, 1, 1.2, 40),
    ([0.0, 5.0, 0.1, 0.2], {1}, 1, 1.0, 10),
    ([1.0, 0.9, 1.2, 0.8, 1.1], {0}, 0, 1.0, 6),
    ([0.0, 0.0, 0.0, 0.3], {0, 1, 2}, 0, 0.5, 8),
    ([0.3, 0.2, 0.9, 0.0, 0.4, 0.1], {5}, 5, 0.25, 1),
]


@pytest.mark.parametrize("case", range(len(TABLE_CASES)))
def test_table_sampler_draws_from_the_sequential_law(case):
    """The outcome's joint law (violator, N), and P(none), within 5 standard errors of the
    exact law of the draw-by-draw procedure, over 200,000 pairs."""
    scores, own, positive, margin, budget = TABLE_CASES[case]
    law, p_none = sequential_law(scores, own, positive, margin, budget)
    reps, n_labels = 200_000, len(scores)
    table = torch.tensor(scores).expand(reps, n_labels).contiguous()
    mask = torch.zeros(n_labels, dtype=torch.bool)
    mask[list(own)] = True
    found, negatives, n_draws = sample_violators_from_table(
        table[:, positive].contiguous(), table, mask.expand(reps, n_labels), budget, margin,
        torch.Generator().manual_seed(case))
    outcomes = {}
    for key in zip(negatives[found].tolist(), n_draws[found].tolist(), strict=True):
        outcomes[key] = outcomes.get(key, 0) + 1
    assert set(outcomes) <= set(law)        # no outcome the procedure cannot give
    for key, p in [*law.items(), (None, p_none)]:
        got = (reps - int(found.sum())) / reps if key is None else outcomes.get(key, 0) / reps
        assert abs(got - p) <= 5 * np.sqrt(p * (1 - p) / reps) + 1e-9, (key, got, p)
    assert (negatives[~found] == -1).all() and (n_draws[~found] == 0).all()


def test_table_sampler_outcomes_are_violators_and_repeatable():
    scores, own, positives, _ = _random_case(11, n_pairs=400, n_labels=30)
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    for i, labels in enumerate(own):
        mask[i, list(labels)] = True
    table = torch.from_numpy(scores)
    pos = table[torch.arange(len(scores)), torch.from_numpy(positives)]
    margin, budget = 0.5, 12
    found, negatives, n_draws = sample_violators_from_table(
        pos, table, mask, budget, margin, torch.Generator().manual_seed(3))
    again = sample_violators_from_table(pos, table, mask, budget, margin,
                                        torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip((found, negatives, n_draws), again, strict=True))
    has_violator = ((table > (pos - margin).unsqueeze(1)) & ~mask).any(1)
    assert not found[~has_violator].any()
    assert 0 < int(found.sum()) < int(has_violator.sum())     # the budget cuts some off
    rows = found.nonzero().squeeze(1)
    picked = negatives[rows]
    assert not mask[rows, picked].any()                        # never one of the row's own
    assert (table[rows, picked] > pos[rows] - margin).all()    # always a violator
    assert ((n_draws[rows] >= 1) & (n_draws[rows] <= budget)).all()
