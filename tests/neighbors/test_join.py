"""The leave-one-out self-join (awe.join): brute force's neighbours, and the same bits from the
whole join as from any shard of queries searched alone (what the Dask shards and calibration
rely on), in every block layout, precision and thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from awe.neighbors import join
from awe.neighbors.index import IndexConfig, NeighbourIndex

from .test_neighbours import assert_neighbours_up_to_rounding, brute_force, clustered

# (row block, column block, group): several row blocks and column chunks, a partial last
# chunk and row block (every value compared), groups screened both ways
LAYOUTS = [(1024, 8192, 32), (64, 256, 8), (48, 160, 16), (32, 96, 32)]


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _layout(monkeypatch, layout):
    for name, value in zip(("_ROW_BLOCK", "_COLUMN_BLOCK", "_GROUP"), layout, strict=True):
        monkeypatch.setattr(join, name, value)


@pytest.fixture(scope="module")
def far() -> np.ndarray:
    return clustered(1500, dim=24, seed=8) + 40.0   # far from the origin: centring matters


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("precision, rerank", [("float32", 0), ("bfloat16", 32)])
def test_self_join_finds_the_brute_force_neighbours(far, layout, precision, rerank,
                                                    monkeypatch):
    _layout(monkeypatch, layout)
    rows = join.JoinRows(far, precision)
    dist, ids = join.self_join(rows, 12, rerank)
    ref_d, ref_i = brute_force(far, far, 12, np.arange(len(far)))
    assert dist.shape == ids.shape == (1500, 12)
    assert dist.dtype == np.float32 and ids.dtype == np.int64
    assert not (ids == np.arange(1500)[:, None]).any()          # never its own neighbour
    assert_neighbours_up_to_rounding(ids, far, far, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-3)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_bf16_without_spare_candidates_misses_few(far):
    _, ids = join.self_join(join.JoinRows(far, "bfloat16"), 12, 0)
    _, ref = brute_force(far, far, 12, np.arange(len(far)))
    assert np.mean([len(set(a) & set(b)) / 12 for a, b in zip(ids, ref, strict=True)]) > 0.95


@pytest.mark.parametrize("layout", LAYOUTS[1:])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("precision, rerank", [("float32", 0), ("bfloat16", 4)])
def test_a_shard_of_queries_gets_the_bits_of_the_whole_join(far, layout, threads, precision,
                                                            rerank, monkeypatch):
    """join_search of any subset of rows (contiguous shards of odd sizes, a scattered sample,
    one row) gives exactly self_join's rows: every pair is computed with its smaller id on the
    A side, and the GEMM's entries do not depend on the blocks they are computed in."""
    _layout(monkeypatch, layout)
    torch.set_num_threads(threads)
    x = far[:700]
    rows = join.JoinRows(x, precision)
    whole_d, whole_i = join.self_join(rows, 9, rerank)
    rng = np.random.default_rng(1)
    shards = [np.arange(s, min(s + size, 700)) for size in (1, 13, 250)
              for s in range(0, 700, size)][::7]
    shards += [np.sort(rng.choice(700, 77, replace=False)), np.array([699]), np.array([0])]
    for ids in shards:
        d, i = join.join_search(rows, x[ids], ids, 9, rerank)
        np.testing.assert_array_equal(i, whole_i[ids])
        np.testing.assert_array_equal(d, whole_d[ids])


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_rows_made_block_by_block_are_the_stored_bits(far, precision, monkeypatch):
    stored = join.JoinRows(far, precision)
    assert stored.b is not None
    monkeypatch.setattr(join, "_STORED_BYTES", 0)
    made = join.JoinRows(far, precision)
    assert made.b is None
    np.testing.assert_array_equal(made.block(100, 613).float().numpy(),
                                  stored.block(100, 613).float().numpy())
    for a, b in zip(join.self_join(made, 7, 2), join.self_join(stored, 7, 2), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_ties_duplicates_and_padding(precision):
    same = np.zeros((40, 3), dtype=np.float32)          # all at one point: ties by smaller id
    dist, ids = join.self_join(join.JoinRows(same, precision), 5)
    assert (dist == 0).all()
    expect = np.array([[j for j in range(40) if j != i][:5] for i in range(40)])
    np.testing.assert_array_equal(ids, expect)
    x = clustered(6, dim=4, seed=2)
    x[3] = x[1]                                          # a duplicate is a neighbour at 0
    rows = join.JoinRows(x, precision)
    dist, ids = join.self_join(rows, 8)                  # k beyond the 5 other rows: padded
    assert (ids[:, 5:] == -1).all() and np.isinf(dist[:, 5:]).all()
    assert all(sorted(r[:5]) == [j for j in range(6) if j != i] for i, r in enumerate(ids))
    assert ids[1, 0] == 3 and ids[3, 0] == 1 and dist[1, 0] == 0.0
    d, i = join.join_search(rows, x, np.arange(6), 8)
    np.testing.assert_array_equal(i, ids)
    np.testing.assert_array_equal(d, dist)
    d, i = join.join_search(rows, x[:0], np.arange(0), 3)
    assert d.shape == i.shape == (0, 3)


def test_a_query_without_an_id_excludes_nothing(far):
    rows = join.JoinRows(far[:300], "float32")
    ids = np.array([5, -1, 7, -1])
    _, got = join.join_search(rows, far[[5, 5, 7, 8]], ids, 4)
    assert got[1, 0] == 5 and got[3, 0] == 8                # its own row, at distance ~0
    assert 5 not in got[0] and 7 not in got[2]


@pytest.mark.parametrize("kind", ["flat", "bf16"])
def test_index_leave_one_out_is_its_search_with_every_id_excluded(far, kind, monkeypatch):
    _layout(monkeypatch, LAYOUTS[1])
    index = NeighbourIndex.build(far, IndexConfig(kind=kind, rerank=4))
    whole = index.leave_one_out(far, 10)
    rows = np.arange(1500, dtype=np.int64)
    for batch in (1500, 97):
        parts = index.search(far, 10, exclude_ids=rows, batch_rows=batch)
        np.testing.assert_array_equal(whole[1], parts[1])
        np.testing.assert_array_equal(whole[0], parts[0])
    view = NeighbourIndex.exact_over(far) if kind == "flat" else None
    if view is not None:       # the baselines' index over the vectors themselves: the same
        np.testing.assert_array_equal(view.leave_one_out(far, 10)[1], whole[1])
    with pytest.raises(ValueError, match="indexed rows"):
        index.leave_one_out(far[:10], 10)


def test_leave_one_out_of_an_approximate_index_is_its_search(far):
    index = NeighbourIndex.build(far, IndexConfig(kind="ivf", nlist=8, nprobe=2))
    rows = np.arange(1500, dtype=np.int64)
    for a, b in zip(index.leave_one_out(far, 6), index.search(far, 6, exclude_ids=rows),
                    strict=True):
        np.testing.assert_array_equal(a, b)
