"""Exact kNN over sparse rows: known answers against numpy brute force (both metrics,
leave-one-out, k beyond the rows, empty rows, ragged blocks), the same bits for any block layout,
query batch or thread count, ties by id, and a vocabulary too wide for the dense search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from awe.csr import Csr
from awe.neighbors.exact import exact_knn
from awe.neighbors.sparse import sparse_knn


def random_rows(n: int, n_terms: int, density: float, seed: int, integer: bool = True,
                empty: float = 0.1) -> tuple[Csr, np.ndarray]:
    """Sparse rows and their dense float32 copy; small integer values make float32 sums exact
    (l2 distances tie exactly where they tie in real numbers); ``empty`` of the rows are empty."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n, n_terms)) < density
    mask[rng.random(n) < empty] = False
    values = (rng.integers(1, 4, (n, n_terms)) if integer
              else rng.uniform(0.1, 2.0, (n, n_terms))).astype(np.float32)
    dense = np.where(mask, values, np.float32(0.0))
    r, c = np.nonzero(dense)
    return Csr.from_lengths(np.bincount(r, minlength=n), c, dense[r, c]), dense


def reference(queries: np.ndarray, base: np.ndarray, metric: str) -> np.ndarray:
    """All distances in float64 [B, N]."""
    q, b = queries.astype(np.float64), base.astype(np.float64)
    if metric == "l2":
        return ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    bn = np.linalg.norm(b, axis=1, keepdims=True)
    return 1.0 - (q / np.where(qn > 0, qn, 1.0)) @ (b / np.where(bn > 0, bn, 1.0)).T


def brute_force(queries, base, k, metric, exclude=None):
    """(distances, ids) of the k nearest, nearest first, ties by id; -1 / inf where exclusion
    leaves no row."""
    d = reference(queries, base, metric)
    k = min(k, d.shape[1])
    if exclude is not None:
        d[np.arange(len(d)), exclude] = np.inf
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(d, ids, axis=1)
    ids[np.isinf(dist)] = -1
    return dist, ids


def assert_knn_up_to_rounding(dist, ids, queries, base, metric, ref_d, atol=1e-6):
    """Every returned id is at its returned distance, and the distances are the brute-force
    ones: ids may differ only among rows whose real distances float32 rounding cannot tell."""
    d = reference(queries, base, metric)
    found = ids >= 0
    at = np.take_along_axis(d, np.where(found, ids, 0), axis=1)
    np.testing.assert_allclose(dist[found], at[found], atol=atol)
    np.testing.assert_allclose(np.where(found, dist, np.inf), ref_d, atol=atol)
    for row in ids:                                 # no id twice
        real = row[row >= 0]
        assert len(np.unique(real)) == len(real)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread unless a test asks for more: these small problems run a few hundred
    small ops, and on a busy machine each parallel one waits for a second thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows():
    return random_rows(120, 40, 0.15, seed=1)


def test_l2_known_answer_with_exact_ties(rows):
    """Integer values: float32 l2 distances are exact, so ids, ties by id included, and
    distances equal brute force exactly."""
    x, dense = rows
    queries, qdense = random_rows(33, 40, 0.15, seed=2)
    for k in (1, 7, 50):
        dist, ids = sparse_knn(queries, x, k, metric="l2", block_rows=17, query_rows=10)
        ref_d, ref_i = brute_force(qdense, dense, k, "l2")
        np.testing.assert_array_equal(ids, ref_i)
        np.testing.assert_array_equal(dist, ref_d.astype(np.float32))
        assert dist.dtype == np.float32 and ids.dtype == np.int64 and dist.shape == (33, k)


def test_cosine_known_answer(rows):
    x, dense = rows
    queries, qdense = random_rows(33, 40, 0.15, seed=3, integer=False)
    for k in (1, 10):
        dist, ids = sparse_knn(queries, x, k, block_rows=23, query_rows=8)
        ref_d, _ = brute_force(qdense, dense, k, "cosine")
        assert_knn_up_to_rounding(dist, ids, qdense, dense, "cosine", ref_d)


def test_cosine_ties_between_identical_rows_come_in_id_order():
    """Duplicated rows score the same bits: they tie exactly and come back by id."""
    base, _ = random_rows(20, 30, 0.3, seed=4, integer=False, empty=0.0)
    doubled = Csr.concat([base, base, base])          # row i == rows i + 20 == i + 40
    dist, ids = sparse_knn(base, doubled, 3, block_rows=7)
    np.testing.assert_array_equal(ids, np.arange(20)[:, None] + [0, 20, 40])
    np.testing.assert_array_equal(dist[:, 0], dist[:, 2])


def test_empty_rows_have_no_nan():
    """An empty row has cosine 0 with every row (distance 1) and l2 distance |x|^2."""
    x, dense = random_rows(40, 20, 0.2, seed=5, empty=0.3)
    assert (x.lengths == 0).sum() >= 5
    dist, ids = sparse_knn(x, x, 40, block_rows=9, query_rows=6)
    assert np.isfinite(dist).all()
    empty = x.lengths == 0
    np.testing.assert_array_equal(dist[empty], 1.0)
    np.testing.assert_array_equal(ids[empty], np.tile(np.arange(40), (empty.sum(), 1)))
    ref_d, _ = brute_force(dense, dense, 40, "cosine")
    assert_knn_up_to_rounding(dist, ids, dense, dense, "cosine", ref_d)
    dist, ids = sparse_knn(x, x, 40, metric="l2", block_rows=9, query_rows=6)
    ref_d, ref_i = brute_force(dense, dense, 40, "l2")
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_array_equal(dist, ref_d.astype(np.float32))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_leave_one_out_never_returns_the_query(rows, metric):
    x, dense = rows
    own = np.arange(x.n_rows)
    dist, ids = sparse_knn(x, x, 8, metric=metric, exclude_self=True, block_rows=13)
    assert not (ids == own[:, None]).any()
    ref_d, ref_i = brute_force(dense, dense, 8, metric, exclude=own)
    if metric == "l2":
        np.testing.assert_array_equal(ids, ref_i)
        np.testing.assert_array_equal(dist, ref_d.astype(np.float32))
    else:
        assert_knn_up_to_rounding(dist, ids, dense, dense, metric, ref_d)


def test_k_beyond_the_rows_is_cut_and_exclusion_pads():
    """k is cut to the base rows, as exact_knn does; with the query's own row excluded, the one
    slot no row can fill holds id -1 at distance +inf."""
    x, dense = random_rows(9, 12, 0.4, seed=6)
    dist, ids = sparse_knn(x, x, 50, metric="l2")
    assert ids.shape == (9, 9)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile(np.arange(9), (9, 1)))
    dist, ids = sparse_knn(x, x, 50, metric="l2", exclude_self=True, block_rows=4)
    assert ids.shape == (9, 9)
    np.testing.assert_array_equal(ids[:, -1], -1)
    assert np.isposinf(dist[:, -1]).all() and np.isfinite(dist[:, :-1]).all()
    ref_d, ref_i = brute_force(dense, dense, 50, "l2", exclude=np.arange(9))
    np.testing.assert_array_equal(ids, ref_i)


def test_exclude_ids_gives_the_leave_one_out_rows(rows):
    """A sample of rows searched with their own ids excluded gets the bits of the whole
    leave-one-out search."""
    x, _ = rows
    full = sparse_knn(x, x, 6, exclude_self=True)
    sample = np.array([3, 50, 51, 119, 0])
    part = sparse_knn(x.take(sample), x, 6, exclude_ids=sample)
    np.testing.assert_array_equal(part[0], full[0][sample])
    np.testing.assert_array_equal(part[1], full[1][sample])
    none = sparse_knn(x.take(sample), x, 6, exclude_ids=np.full(5, -1))
    plain = sparse_knn(x.take(sample), x, 6)
    np.testing.assert_array_equal(none[1], plain[1])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_same_bits_for_every_block_layout_and_thread_count(metric):
    """Block sizes that divide nothing, one row at a time, one block for all, 1 or 2 threads:
    the same distances and ids bit for bit (continuous values: sums that round)."""
    x, _ = random_rows(150, 60, 0.2, seed=7, integer=False)
    want = sparse_knn(x, x, 10, metric=metric, exclude_self=True, threads=1)
    before = torch.get_num_threads()
    # many small blocks on one thread: on two, each small op waits for the other thread
    for block_rows, query_rows, threads in ((1, 150, 1), (7, 11, 1), (33, 13, 2), (64, 64, 2),
                                            (149, 151, 1), (1000, 40, 2)):
        got = sparse_knn(x, x, 10, metric=metric, exclude_self=True, block_rows=block_rows,
                         query_rows=query_rows, threads=threads)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    assert torch.get_num_threads() == before       # the caller's setting is restored
    for i in (0, 77, 149):                           # a query searched alone
        d, ids = sparse_knn(x.take(np.array([i])), x, 10, metric=metric, exclude_ids=[i])
        np.testing.assert_array_equal(d[0], want[0][i])
        np.testing.assert_array_equal(ids[0], want[1][i])


def test_l2_agrees_with_the_dense_exact_knn():
    """A drop-in for exact_knn on sparse rows: same ids, same order, distances to rounding."""
    x, dense = random_rows(200, 50, 0.2, seed=8, integer=False, empty=0.0)
    queries, qdense = random_rows(30, 50, 0.2, seed=9, integer=False, empty=0.0)
    dist, ids = sparse_knn(queries, x, 12, metric="l2", block_rows=64)
    ref_d, ref_i = exact_knn(qdense, dense, 12)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5, atol=1e-5)


def test_unsorted_and_repeated_terms_count_as_in_a_dense_row():
    """Terms in any order, a term listed twice (its values summed), no values (all 1)."""
    rows = Csr(np.array([0, 3, 5, 5, 7]), np.array([4, 1, 4, 2, 0, 3, 3]),
               np.array([1.0, 2.0, 0.5, 1.0, 3.0, 2.0, 1.0], dtype=np.float32))
    dense = np.zeros((4, 6), dtype=np.float32)
    np.add.at(dense, (rows.row_of_entry(), rows.indices), rows.values)
    dist, ids = sparse_knn(rows, rows, 4, metric="l2")
    ref_d, ref_i = brute_force(dense, dense, 4, "l2")
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_array_equal(dist, ref_d.astype(np.float32))
    binary = Csr(rows.indptr, rows.indices)
    ones = np.zeros((4, 6), dtype=np.float32)
    np.add.at(ones, (binary.row_of_entry(), binary.indices), 1.0)
    dist, ids = sparse_knn(binary, binary, 4, metric="l2")
    np.testing.assert_array_equal(ids, brute_force(ones, ones, 4, "l2")[1])


def test_wide_vocabulary_without_a_dense_copy():
    """20k terms (the dense search stops at 4096): answers as brute force; the largest term id
    counts."""
    n_terms = 20_000
    rng = np.random.default_rng(10)
    lengths = rng.integers(0, 40, 400)
    p = 1.0 / np.arange(1, n_terms + 1)
    terms = rng.choice(n_terms, size=lengths.sum(), p=p / p.sum())
    terms[:3] = n_terms - 1
    x = Csr.from_lengths(lengths, terms, rng.uniform(0.1, 1.0, len(terms)).astype(np.float32))
    used, column = np.unique(x.indices, return_inverse=True)
    assert used[-1] == n_terms - 1
    dense = np.zeros((400, len(used)), dtype=np.float32)     # the terms no row has left out
    np.add.at(dense, (x.row_of_entry(), column), x.values)
    dist, ids = sparse_knn(x, x, 20, exclude_self=True, block_rows=128)
    ref_d, _ = brute_force(dense, dense, 20, "cosine", exclude=np.arange(400))
    assert_knn_up_to_rounding(dist, ids, dense, dense, "cosine", ref_d)


def test_no_queries_or_no_k():
    x, _ = random_rows(5, 8, 0.5, seed=11)
    assert sparse_knn(Csr.empty(0), x, 3)[1].shape == (0, 3)
    assert sparse_knn(x, x, 0)[0].shape == (5, 0)
    assert sparse_knn(x, Csr.empty(0), 3)[1].shape == (5, 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"k": -1}, "k must be"),
    ({"k": 2, "metric": "ip"}, "metric must be"),
    ({"k": 2, "block_rows": 0}, "block_rows"),
    ({"k": 2, "threads": 0}, "threads"),
    ({"k": 2, "exclude_ids": [1, 2]}, "exclude_ids has 2 entries"),
    ({"k": 2, "exclude_self": True, "exclude_ids": np.arange(5)}, "not both"),
])
def test_bad_arguments(kwargs, message):
    x, _ = random_rows(5, 8, 0.5, seed=12)
    with pytest.raises(ValueError, match=message):
        sparse_knn(x, x, **kwargs)


def test_bad_rows():
    x, _ = random_rows(5, 8, 0.5, seed=13)
    with pytest.raises(ValueError, match="exclude_self needs"):
        sparse_knn(x.take(np.arange(3)), x, 2, exclude_self=True)
    bad = Csr(x.indptr, x.indices, np.full(x.nnz, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        sparse_knn(bad, x, 2)
    negative = Csr(x.indptr, -1 - x.indices, x.values)
    with pytest.raises(ValueError, match="negative"):
        sparse_knn(x, negative, 2)
