"""The neighbour index for G: known answers against numpy brute force, leave-one-out, padding,
recall of the approximate kinds, save/load, damaged files, bad options, determinism."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import torch

from awe import cpu
from awe.cpu import set_threads
from awe.errors import AweError
from awe.neighbors import exact as exact_module
from awe.neighbors import index as neighbours
from awe.neighbors import merge
from awe.neighbors.exact import bf16_knn, exact_knn
from awe.neighbors.index import INDEX_KINDS, IndexConfig, NeighbourIndex, default_nlist

KINDS = ("flat", "bf16", "ivf", "hnsw")


def clustered(n: int, dim: int = 16, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Gaussian clusters with varied spreads; continuous values, so no distance ties."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, (clusters, dim))
    spread = rng.uniform(0.3, 1.5, clusters)
    a = rng.integers(0, clusters, n)
    return (centres[a] + spread[a, None] * rng.normal(size=(n, dim))).astype(np.float32)


def brute_force(queries: np.ndarray, data: np.ndarray, n: int, exclude: np.ndarray | None = None):
    """Exact squared distances (float64) and ids of the n nearest, the excluded id removed."""
    d = ((queries[:, None, :].astype(np.float64) - data[None, :, :]) ** 2).sum(-1)
    if exclude is not None:
        d[np.arange(len(queries)), exclude] = np.inf
    ids = np.argsort(d, axis=1, kind="stable")[:, :n]
    return np.take_along_axis(d, ids, axis=1), ids


def assert_neighbours_up_to_rounding(ids, queries, data, exact, rtol=1e-5):
    """``ids`` are the brute-force neighbours ``exact``, but for the order (or the choice at
    the cut) of rows whose float64 distances differ by float32 rounding."""
    def dist(i):
        return ((queries[:, None, :].astype(np.float64) - data[i]) ** 2).sum(-1)

    np.testing.assert_allclose(dist(ids), dist(exact), rtol=rtol)
    assert np.mean(ids == exact) > 0.99


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(3000)


@pytest.fixture(autouse=True)
def _restore_threads():
    before = faiss.omp_get_max_threads(), torch.get_num_threads()
    yield
    faiss.omp_set_num_threads(before[0])
    torch.set_num_threads(before[1])


# --------------------------------------------------------------------------------- flat, exact
def test_flat_matches_brute_force(data):
    queries = clustered(50, seed=1)
    index = NeighbourIndex.build(data, IndexConfig(kind="flat"))
    dist, ids = index.search(queries, 20)
    ref_d, ref_i = brute_force(queries, data, 20)
    assert dist.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (50, 20)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-3)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_flat_leave_one_out_matches_brute_force(data):
    rows = np.arange(0, 3000, 37, dtype=np.int64)
    index = NeighbourIndex.build(data, IndexConfig(kind="flat"))
    dist, ids = index.search(data[rows], 10, exclude_ids=rows)
    ref_d, ref_i = brute_force(data[rows], data, 10, exclude=rows)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-3)
    assert not (ids == rows[:, None]).any()


def test_no_exclusion_marker_is_plain_search(data):
    index = NeighbourIndex.build(data, IndexConfig(kind="flat"))
    q = data[:40]
    plain = index.search(q, 7)
    marked = index.search(q, 7, exclude_ids=np.full(40, -1))
    np.testing.assert_array_equal(plain[1], marked[1])
    np.testing.assert_array_equal(plain[0], marked[0])
    assert (plain[1][:, 0] == np.arange(40)).all()        # without exclusion a row finds itself


def test_batches_give_the_same_answer(data):
    index = NeighbourIndex.build(data, IndexConfig(kind="flat"))
    rows = np.arange(100, dtype=np.int64)
    a = index.search(data[rows], 5, exclude_ids=rows, batch_rows=7)
    b = index.search(data[rows], 5, exclude_ids=rows)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("block", [7, 16384])
def test_squared_norms_in_blocks_are_the_bits_of_one_pass(data, block, monkeypatch):
    monkeypatch.setattr(exact_module, "_NORM_BLOCK", block)
    x = np.vstack([data, 10.0 * clustered(97, seed=4)])
    whole = torch.from_numpy(x)
    np.testing.assert_array_equal(exact_module.squared_norms(x), (whole * whole).sum(dim=1).numpy())


def test_exact_over_searches_the_vectors_themselves_like_flat(data, tmp_path):
    rows = np.arange(0, 3000, 29, dtype=np.int64)
    flat = NeighbourIndex.build(data, IndexConfig(kind="flat"))
    view = NeighbourIndex.exact_over(data)
    assert view.index is None and view.kind == "flat" and (view.n_rows, view.dim) == (3000, 16)
    assert np.shares_memory(view._flat_view()[0], data)      # no copy of the rows
    for exclude in (rows, None):
        got, want = view.search(data[rows], 12, exclude), flat.search(data[rows], 12, exclude)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    assert view.measure_recall(data, 20) == 1.0
    with pytest.raises(ValueError, match="no FAISS index"):
        view.save(tmp_path / "index.faiss")
    bad = data.copy()
    bad[5, 1] = np.inf
    with pytest.raises(AweError, match="NaN or infinite"):
        NeighbourIndex.exact_over(bad)


@pytest.mark.parametrize("augmented", [True, False])
@pytest.mark.parametrize("blocks", [(1024, 16384, 64), (7, 98, 4), (64, 130, 8), (5, 40, 16)])
def test_exact_knn_matches_brute_force_in_every_block_layout(data, blocks, augmented,
                                                             monkeypatch):
    """Small blocks reach every path of the blocked search: several query and base blocks, the
    grouped top-k with and without a partial last group, and the plain top-k of narrow blocks
    (the last, or all when k * group * 4 exceeds the block); with the [2x | -|x|^2] copy of the
    base, and with addmm where that copy would be too large."""
    if not augmented:
        monkeypatch.setattr(exact_module, "_AUGMENTED_CACHE", 0)
    monkeypatch.setattr(exact_module, "_QUERY_BLOCK", blocks[0])
    monkeypatch.setattr(exact_module, "_BASE_BLOCK", blocks[1])
    monkeypatch.setattr(exact_module, "_GROUP", blocks[2])
    queries = clustered(45, seed=4)
    for k in (1, 5, 20):
        dist, ids = exact_knn(queries, data, k)
        ref_d, ref_i = brute_force(queries, data, k)
        np.testing.assert_array_equal(ids, ref_i)
        np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("augmented", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_exact_knn_rows_do_not_depend_on_how_many_were_searched(data, augmented, threads,
                                                                monkeypatch):
    """A query's distances are the same bits whether it is searched alone, among a few rows or
    among many: few-row GEMM kernels sum in another order on some CPUs (MKL on AMD EPYC:
    1-3 rows on one thread, 1-11 on two), so the products are padded to _QUERY_PAD rows."""
    if not augmented:
        monkeypatch.setattr(exact_module, "_AUGMENTED_CACHE", 0)
    queries = clustered(48, seed=6)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        all_d, all_i = exact_knn(queries, data, 8)
        for size in (1, 2, 3, 5, 7, 11):
            parts = [exact_knn(queries[a:a + size], data, 8) for a in range(0, 48, size)]
            np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), all_i)
            np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), all_d)
    finally:
        torch.set_num_threads(before)


def test_flat_search_is_the_same_from_concurrent_threads(data):
    """awe score searches one index from several threads: the first searches set up the flat
    view together, and every thread gets the sequential answer, bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    queries = [clustered(64, seed=s) for s in range(8)]
    expected = [NeighbourIndex.build(data, IndexConfig(kind="flat")).search(q, 6)
                for q in queries]
    for _ in range(3):
        index = NeighbourIndex.build(data, IndexConfig(kind="flat"))
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda q, index=index: index.search(q, 6), queries))
        for (d, i), (ed, ei) in zip(got, expected, strict=True):
            assert np.array_equal(d, ed) and np.array_equal(i, ei)
    q = queries[0]
    with_norms = exact_knn(q, data, 6, exact_module.squared_norms(data))
    assert all(np.array_equal(a, b) for a, b in zip(exact_knn(q, data, 6), with_norms,
                                                    strict=True))


def test_exact_knn_ties_and_edges():
    """Integer points: distances exact in float32 and full of ties. Ties come back in id order,
    with the distances of brute force; k beyond the rows is cut; no query gives empty output."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 3, (700, 3)).astype(np.float32)
    queries = rng.integers(0, 3, (30, 3)).astype(np.float32)
    dist, ids = exact_knn(queries, base, 40)
    ref_d, _ = brute_force(queries, base, 40)
    np.testing.assert_array_equal(dist, ref_d.astype(np.float32))
    true = ((queries[:, None, :] - base[ids]) ** 2).sum(-1)
    np.testing.assert_array_equal(dist, true)                  # every id is at its distance
    same = np.diff(dist, axis=1) == 0
    assert (np.diff(ids, axis=1)[same] > 0).all()               # ties in id order
    assert all(len(set(row)) == 40 for row in ids)
    d, i = exact_knn(queries, base[:3], 10)
    assert d.shape == i.shape == (30, 3) and set(i[0]) == {0, 1, 2}
    d, i = exact_knn(queries[:0], base, 4)
    assert d.shape == (0, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_leave_one_out_keeps_duplicates(kind):
    x = clustered(2000, seed=3)
    x[17] = x[5]
    x[900] = x[5]
    index = NeighbourIndex.build(x, IndexConfig(kind=kind))
    rows = np.array([5, 17, 900, 6], dtype=np.int64)
    dist, ids = index.search(x[rows], 4, exclude_ids=rows)
    assert not (ids == rows[:, None]).any()
    assert set(ids[0, :2]) == {17, 900} and set(ids[1, :2]) == {5, 900}
    assert set(ids[2, :2]) == {5, 17}
    np.testing.assert_allclose(dist[:3, :2], 0.0, atol=1e-3)
    assert (ids >= 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_padding_when_too_few_rows(kind):
    x = clustered(6, seed=4)
    index = NeighbourIndex.build(x, IndexConfig(kind=kind))
    dist, ids = index.search(x[:2], 10)
    assert ids.shape == (2, 10)
    assert (ids[:, 6:] == -1).all() and np.isinf(dist[:, 6:]).all()
    assert sorted(ids[0, :6]) == list(range(6))
    rows = np.array([0, 1])
    dist, ids = index.search(x[rows], 6, exclude_ids=rows)
    assert (ids[:, 5] == -1).all() and np.isinf(dist[:, 5]).all()
    assert np.isfinite(dist[:, :5]).all()
    assert sorted(ids[0, :5]) == [1, 2, 3, 4, 5] and sorted(ids[1, :5]) == [0, 2, 3, 4, 5]
    dist, ids = index.search(x[rows], 5, exclude_ids=rows)    # N - 1 == n: exactly enough
    assert (ids >= 0).all() and not (ids == rows[:, None]).any()


# ---------------------------------------------------------------------- approximate kinds
@pytest.mark.parametrize("kind", ["ivf", "hnsw", "bf16"])
def test_recall_with_defaults(kind):
    x = clustered(8000, dim=32, clusters=60, seed=5)
    index = NeighbourIndex.build(x, IndexConfig(kind=kind))
    assert index.kind == kind and index.n_rows == 8000 and index.dim == 32
    name = {"ivf": "nprobe", "hnsw": "ef_search", "bf16": "rerank"}[kind]
    # bf16's leave-one-out screen (awe.join) can reach the target with no spare candidates
    assert index.params[f"{name}_calibrated"] and index.params[name] >= (kind != "bf16")
    assert index.params["calibration"]["recall_lower_bound"] >= 0.95
    assert index.params["calibration"]["reached"] is True
    recall = index.measure_recall(x, 20, sample=500, seed=11)
    assert recall >= 0.9
    rows = np.arange(0, 8000, 13, dtype=np.int64)
    _, ids = index.search(x[rows], 20, exclude_ids=rows)
    assert not (ids == rows[:, None]).any()


def test_measure_recall_counts_against_brute_force(data):
    index = NeighbourIndex.build(data, IndexConfig(kind="ivf", nlist=30, nprobe=1))
    rows = np.sort(np.random.default_rng(2).choice(3000, 200, replace=False))
    _, approx = index.search(data[rows], 10, exclude_ids=rows)
    _, exact = brute_force(data[rows], data, 10, exclude=rows)
    expected = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert index.measure_recall(data, 10, sample=200, seed=2) == pytest.approx(expected)
    assert expected < 1.0                      # one list of 30: approximate indeed
    full = NeighbourIndex.build(data, IndexConfig(kind="ivf", nlist=30, nprobe=30))
    assert full.measure_recall(data, 10, sample=200) == pytest.approx(1.0)


def test_flat_recall_is_one(data):
    assert NeighbourIndex.build(data, IndexConfig(kind="flat")).measure_recall(data, 20) == 1.0


def test_auto_kind_follows_size(data):
    assert NeighbourIndex.build(data, IndexConfig()).kind == "flat"
    index = NeighbourIndex.build(data, IndexConfig(flat_max_rows=1000))
    assert index.kind == "ivf" and index.params["nlist"] == default_nlist(3000)
    assert default_nlist(1) == 1 and default_nlist(1_000_000) == 4000


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(neighbours, "native_bf16", lambda: False)


def test_auto_falls_back_to_exact_search_when_ivf_would_probe_most_lists(no_native_bf16):
    # isotropic 32-d rows have no clusters: recall 0.95 makes IVF probe a large share of its lists
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4000, 32)).astype(np.float32)
    index = NeighbourIndex.build(x, IndexConfig(flat_max_rows=1000))
    assert index.kind == "flat" and isinstance(index.index, faiss.IndexFlatL2)
    fallback = index.params["auto_fallback_from_ivf"]
    limit = fallback["nlist"] * neighbours._IVF_MAX_PROBED
    assert fallback["nprobe"] > limit, fallback
    # the calibration stopped at the first nprobe past the limit: it decides the fallback
    assert fallback["nprobe"] == min(v for v in neighbours._NPROBE_LADDER if v > limit)
    assert "nlist" not in index.params and index.measure_recall(x, 10) == 1.0
    d, ids = index.search(x[:50], 10, exclude_ids=np.arange(50))
    np.testing.assert_array_equal(ids, brute_force(x[:50], x, 10, np.arange(50))[1])
    # asked for by name, IVF stays IVF whatever its nprobe
    assert NeighbourIndex.build(x, IndexConfig(kind="ivf")).kind == "ivf"


def test_auto_goes_from_ivf_to_bf16_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(neighbours, "native_bf16", lambda: True)
    x = np.random.default_rng(3).normal(size=(4000, 32)).astype(np.float32)
    index = NeighbourIndex.build(x, IndexConfig(flat_max_rows=1000))
    assert index.kind == "bf16" and isinstance(index.index, faiss.IndexFlatL2)
    assert "auto_fallback_from_ivf" in index.params and index.params["rerank_calibrated"]
    assert index.params["calibration"]["reached"]
    rows = np.arange(0, 4000, 9)
    _, ids = index.search(x[rows], 10, exclude_ids=rows)
    _, exact = brute_force(x[rows], x, 10, rows)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)]) >= 0.95
    given = NeighbourIndex.build(x, IndexConfig(flat_max_rows=1000, rerank=3))
    assert given.kind == "bf16" and given.rerank == 3 and not given.params["rerank_calibrated"]
    # bf16 candidates that miss the target: exact search after all, and the record says why
    from awe.neighbors import join

    search = join.join_search

    def wrong_in_bf16(rows, queries, ids, k, rerank):
        if rows.precision == "bfloat16":
            return exact_knn(queries, rows.x.numpy()[::-1].copy(), k)
        return search(rows, queries, ids, k, rerank)

    monkeypatch.setattr(neighbours, "join_search", wrong_in_bf16)
    index = NeighbourIndex.build(x, IndexConfig(flat_max_rows=1000))
    assert index.kind == "flat" and not index.params["auto_fallback_from_bf16"]["calibration"][
        "reached"]
    assert index.params["auto_fallback_from_bf16"]["rerank"] == neighbours._RERANK_LADDER[-1]
    _, ids = index.search(x[rows], 10, exclude_ids=rows)
    assert_neighbours_up_to_rounding(ids, x[rows], x, exact)


def test_native_bf16_reads_the_cpu_flags():
    assert isinstance(cpu.native_bf16(), bool)
    assert isinstance(cpu.has_amx(), bool)
    flags = cpu.cpuinfo_flags
    assert flags("processor : 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n") == {
        "fpu", "avx2", "amx_bf16", "amx_tile"}
    assert flags("flags : sse avx512f avx512_bf16\n") == {"sse", "avx512f", "avx512_bf16"}
    assert flags("") == set()


def test_auto_keeps_ivf_on_clustered_rows(data):
    index = NeighbourIndex.build(data, IndexConfig(flat_max_rows=1000))
    assert index.kind == "ivf" and "auto_fallback_from_ivf" not in index.params
    assert index.params["nprobe"] <= index.params["nlist"] / 6


def test_lower_target_recall_probes_fewer_lists(data):
    breadth = {}
    for target in (0.5, 0.99):
        index = NeighbourIndex.build(data, IndexConfig(kind="ivf", nlist=60, target_recall=target))
        calibration = index.params["calibration"]
        assert calibration["target_recall"] == target and calibration["reached"] is True
        assert calibration["recall_lower_bound"] >= target
        breadth[target] = index.params["nprobe"]
    assert breadth[0.5] < breadth[0.99]


def test_given_search_breadth_is_used(data):
    ivf = NeighbourIndex.build(data, IndexConfig(kind="ivf", nlist=40, nprobe=5))
    assert ivf.params["nprobe"] == 5 and ivf.params["nprobe_calibrated"] is False
    hnsw = NeighbourIndex.build(data, IndexConfig(kind="hnsw", ef_search=77))
    assert hnsw.params["ef_search"] == 77 and hnsw.index.hnsw.efSearch == 77
    bf16 = NeighbourIndex.build(data, IndexConfig(kind="bf16", rerank=3))
    assert bf16.params["rerank"] == 3 and bf16.rerank == 3


# ------------------------------------------------------------------------------------ bf16
@pytest.mark.parametrize("blocks", [(1024, 8192, 32), (7, 256, 8), (64, 100, 4), (5, 96, 32)])
def test_bf16_knn_finds_the_brute_force_neighbours(blocks, monkeypatch):
    """Small blocks put a few thousand rows through every path: the exact first block, the
    screened blocks, a last block of partial groups, a partial block of queries. With enough
    candidates re-ranked, the neighbours are brute force's, in its order, at its distances."""
    names = ("_BF16_QUERY_BLOCK", "_BF16_BASE_BLOCK", "_BF16_GROUP")
    for name, value in zip(names, blocks, strict=True):
        monkeypatch.setattr(exact_module, name, value)
    x = clustered(3000, dim=24, seed=8) + 40.0   # far from the origin: centring matters
    q = clustered(300, dim=24, seed=9) + 40.0
    dist, ids = bf16_knn(q, x, 15, rerank=32)
    ref_d, ref_i = brute_force(q, x, 15)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-3)
    assert ids.shape == (300, 15) and dist.dtype == np.float32 and ids.dtype == np.int64
    # without spare candidates, bf16 rounding costs few neighbours
    _, ids = bf16_knn(q, x, 15, rerank=0)
    assert np.mean([len(set(a) & set(b)) / 15 for a, b in zip(ids, ref_i, strict=True)]) > 0.97


def test_bf16_knn_edges():
    x = clustered(50, dim=6, seed=1)
    dist, ids = bf16_knn(x[:4], x, 80, rerank=5)        # k beyond the rows is cut
    assert ids.shape == (4, 50) and all(sorted(row) == list(range(50)) for row in ids)
    assert (np.diff(dist, axis=1) >= 0).all() and (ids[:, 0] == np.arange(4)).all()
    d, i = bf16_knn(x[:0], x, 3, rerank=2)
    assert d.shape == i.shape == (0, 3)
    same = np.zeros((40, 3), dtype=np.float32)          # all at one point: ties by id
    dist, ids = bf16_knn(same[:2], same, 5, rerank=0)
    assert (dist == 0).all() and (ids == np.arange(5)).all()


def test_merge_top_keeps_each_rows_largest_ties_by_smaller_id():
    rng = np.random.default_rng(0)
    top_v = torch.tensor(rng.integers(-2, 3, size=(6, 4)), dtype=torch.float32)  # many ties
    top_v[4] = -math.inf                                   # an empty row: padding ids -1
    top_i = torch.arange(24).view(6, 4) * 7 % 24
    top_i[4] = -1
    rows = torch.tensor([0, 0, 0, 2, 4, 5, 5])
    values = torch.tensor([9.0, -9.0, 1.0, 1.0, -0.0, -9.0, 2.0])
    ids = torch.tensor([100, 101, 3, 2, 105, 104, 0])
    expect = []
    for r in range(6):
        pairs = list(zip(top_v[r].tolist(), top_i[r].tolist(), strict=True))
        pairs += [(v, i) for rr, v, i in zip(rows.tolist(), values.tolist(), ids.tolist(),
                                             strict=True) if rr == r]
        expect.append(sorted(pairs, key=lambda p: (-p[0], p[1]))[:4])
    merge.merge_top(top_v, top_i, rows, values, ids)
    for r in range(6):
        got = sorted(zip(top_v[r].tolist(), top_i[r].tolist(), strict=True),
                     key=lambda p: (-p[0], p[1]))
        assert got == expect[r], r


@pytest.mark.parametrize("blocks", [(1024, 8192), (128, 256)])
def test_bf16_search_is_the_same_in_any_batches_and_threads(blocks, data, monkeypatch):
    """A query's neighbours do not depend on the queries searched with it: bf16 scores tie
    often, and ties at the candidates' cut go to the smaller ids (blocks of 128 x 256 screen
    the later blocks too)."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(exact_module, "_BF16_QUERY_BLOCK", blocks[0])
    monkeypatch.setattr(exact_module, "_BF16_BASE_BLOCK", blocks[1])
    index = NeighbourIndex.build(data, IndexConfig(kind="bf16", rerank=0))
    assert index.params["rerank"] == 0 and index.params["rerank_calibrated"] is False
    rows = np.arange(3000, dtype=np.int64)
    whole = index.search(data, 20, exclude_ids=rows)
    for batch in (700, 64, 5):
        parts = index.search(data, 20, exclude_ids=rows, batch_rows=batch)
        np.testing.assert_array_equal(whole[1], parts[1])
        np.testing.assert_array_equal(whole[0], parts[0])
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: index.search(data[s:s + 750], 20,
                                                   exclude_ids=rows[s:s + 750]),
                            range(0, 3000, 750)))
    np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), whole[1])


# ----------------------------------------------------------------------------- determinism
def test_ivf_build_is_deterministic(data):
    config = IndexConfig(kind="ivf", seed=7)
    a = NeighbourIndex.build(data, config)
    b = NeighbourIndex.build(data, config)
    assert a.params["nprobe"] == b.params["nprobe"]
    ra, rb = a.search(data[:300], 20), b.search(data[:300], 20)
    np.testing.assert_array_equal(ra[1], rb[1])
    np.testing.assert_array_equal(ra[0], rb[0])
    centroids = [i.index.quantizer.reconstruct_n(0, i.index.nlist) for i in (a, b)]
    np.testing.assert_array_equal(*centroids)


def test_hnsw_build_is_deterministic_single_threaded(data):
    set_threads(1)
    a = NeighbourIndex.build(data, IndexConfig(kind="hnsw"))
    b = NeighbourIndex.build(data, IndexConfig(kind="hnsw"))
    np.testing.assert_array_equal(a.search(data[:300], 20)[1], b.search(data[:300], 20)[1])


# ------------------------------------------------------------------------------- save/load
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, data, tmp_path):
    index = NeighbourIndex.build(data, IndexConfig(kind=kind))
    path = tmp_path / "g" / "neighbours.faiss"
    index.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["neighbours.faiss"]   # no temp left
    loaded = NeighbourIndex.load(path, index.params)
    assert (loaded.kind, loaded.n_rows, loaded.dim) == (kind, 3000, 16)
    assert loaded.params == index.params
    rows = np.arange(0, 3000, 7, dtype=np.int64)
    before = index.search(data[rows], 20, exclude_ids=rows)
    after = loaded.search(data[rows], 20, exclude_ids=rows)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "garbage"])
def test_load_damaged_file(damage, data, tmp_path):
    index = NeighbourIndex.build(data, IndexConfig(kind="ivf"))
    path = tmp_path / "neighbours.faiss"
    index.save(path)
    raw = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AweError) as err:
        NeighbourIndex.load(path, index.params)
    text = str(err.value)
    assert str(path) in text and "awe build-g" in text and "\n" not in text
    assert "index_read.cpp" not in text


def test_load_rejects_index_that_does_not_match_params(data, tmp_path):
    index = NeighbourIndex.build(data, IndexConfig(kind="flat"))
    path = tmp_path / "neighbours.faiss"
    index.save(path)
    with pytest.raises(AweError, match="awe build-g"):
        NeighbourIndex.load(path, dict(index.params, kind="ivf"))
    with pytest.raises(AweError, match="n_rows"):
        NeighbourIndex.load(path, dict(index.params, n_rows=10))


# ------------------------------------------------------------------------- bad input/options
@pytest.mark.parametrize("kwargs, option", [
    ({"kind": "kdtree"}, "kind"),
    ({"nlist": 0}, "nlist"),
    ({"nprobe": 0}, "nprobe"),
    ({"nlist": 8, "nprobe": 9}, "nprobe"),
    ({"nprobe": 2.5}, "nprobe"),
    ({"ef_search": 0}, "ef_search"),
    ({"rerank": -1}, "rerank"),
    ({"ef_construction": 0}, "ef_construction"),
    ({"hnsw_m": 1}, "hnsw_m"),
    ({"flat_max_rows": -1}, "flat_max_rows"),
    ({"recall_sample": 0}, "recall_sample"),
    ({"target_recall": 1.5}, "target_recall"),
    ({"seed": -1}, "seed"),
])
def test_bad_config(kwargs, option):
    with pytest.raises(AweError, match=f"^{option} must") as info:
        IndexConfig(**kwargs)
    assert info.value.field == option


def test_config_dict_round_trip():
    config = IndexConfig(kind="hnsw", ef_search=50, seed=3)
    assert IndexConfig.from_dict(config.to_dict()) == config
    assert set(INDEX_KINDS) == {"auto", "flat", "bf16", "ivf", "hnsw"}
    with pytest.raises(AweError, match="bogus"):
        IndexConfig.from_dict({"bogus": 1})


def test_bad_vectors_and_queries(data):
    bad = data.copy()
    bad[3, 2] = np.nan
    with pytest.raises(AweError, match="NaN"):
        NeighbourIndex.build(bad)
    with pytest.raises(AweError, match="2-d"):
        NeighbourIndex.build(data[0])
    with pytest.raises(AweError):
        NeighbourIndex.build(np.zeros((0, 4), dtype=np.float32))
    index = NeighbourIndex.build(data, IndexConfig(kind="flat"))
    with pytest.raises(AweError, match="dimension"):
        index.search(np.zeros((2, 5), dtype=np.float32), 3)
    with pytest.raises(ValueError):
        index.search(data[:2], 0)
    with pytest.raises(AweError, match="threads must"):
        set_threads(0)


def test_build_reports_progress_and_can_be_aborted(data):
    seen = []
    NeighbourIndex.build(data, IndexConfig(kind="hnsw"), progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1] == (3000, 3000)

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        NeighbourIndex.build(data, IndexConfig(kind="ivf"), progress=stop)
