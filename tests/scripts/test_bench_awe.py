"""The AWE benchmark's pieces on tiny data: P@k as awe computes it, the anchors, the summary over
seeds and the Markdown it writes (the pipeline itself is tested through the library)."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "bench_awe.py"
_spec = importlib.util.spec_from_file_location("bench_awe", _PATH)
bench_awe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_awe)


def _run(awe_p1: float, wsabie_p1: float) -> dict:
    return {"metrics": {"wsabie": {"P@1": wsabie_p1, "P@3": 0.3},
                        "awe": {"P@1": awe_p1, "P@3": 0.31}}}


def test_over_seeds_gives_mean_and_sample_sd_of_every_row_and_metric():
    runs = {0: _run(0.8745, 0.848), 1: _run(0.8779, 0.8415), 2: _run(0.8723, 0.8404)}
    summary = bench_awe.over_seeds(runs)
    assert set(summary) == {"wsabie", "awe"} and set(summary["awe"]) == {"P@1", "P@3"}
    assert summary["awe"]["P@1"]["mean"] == pytest.approx((0.8745 + 0.8779 + 0.8723) / 3)
    assert summary["awe"]["P@1"]["sd"] == pytest.approx(
        statistics.stdev([0.8745, 0.8779, 0.8723]))
    assert summary["wsabie"]["P@3"] == {"mean": pytest.approx(0.3), "sd": 0.0}


def test_one_seed_has_zero_sd_and_the_table_lists_every_seed():
    assert bench_awe.over_seeds({4: _run(0.5, 0.4)})["awe"]["P@1"] == {"mean": 0.5, "sd": 0.0}
    runs = {0: _run(0.87, 0.84), 7: _run(0.88, 0.85)}
    lines = bench_awe.seeds_table("fm", {"seeds": runs, "over_seeds": bench_awe.over_seeds(runs)},
                                  [1])
    assert "| seed 0 | seed 7 | mean | sd |" in lines[2]
    assert "| awe | P@1 | 0.8700 | 0.8800 | 0.8750 | 0.0071 |" in lines


def test_a_row_that_failed_in_a_seed_keeps_its_error():
    runs = {0: _run(0.5, 0.4), 1: {"metrics": {"wsabie": {"P@1": 0.4, "P@3": 0.3},
                                               "awe": {"error": "AweError: too wide"}}}}
    summary = bench_awe.over_seeds(runs)
    assert summary["awe"] == {"error": "AweError: too wide"}
    assert summary["wsabie"]["P@1"]["mean"] == pytest.approx(0.4)


def test_precision_at_k_is_awes_definition():
    scores = np.array([[0.9, 0.8, 0.1, 0.0],
                       [0.1, 0.2, 0.3, 0.4],
                       [0.5, 0.4, 0.3, 0.2]])
    truth = [[1], [3, 2], []]
    # row 2 has one label unknown to the vocabulary: it counts, and is always a miss
    got = bench_awe.precision_at(scores, truth, [1, 2, 1], [1, 3])
    assert got["P@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert got["P@3"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    # an excluded (training) item is never ranked; a row without labels does not count
    got = bench_awe.precision_at(scores, [[1], [2], []], [1, 1, 0], [1], [[0], [3], []])
    assert got["P@1"] == pytest.approx((1 + 1) / 2)


def _tiny(tmp_path: Path, sparse: bool, seed: int = 0) -> Path:
    """Four separable clusters, one tag each plus a shared tag on half the rows."""
    rng = np.random.default_rng(seed)
    d = tmp_path / ("sparse" if sparse else "dense")
    d.mkdir()
    for part, n in (("train", 240), ("test", 80)):
        cluster = rng.integers(0, 4, n)
        labels = [[f"c{c}"] + (["even"] if c % 2 == 0 else []) for c in cluster]
        if sparse:
            ids = [[int(c) * 5 + j for j in rng.choice(5, 3, replace=False)] for c in cluster]
            cols = {"feature_ids": pa.array(ids, pa.list_(pa.int32())),
                    "feature_values": pa.array([[1.0] * 3] * n, pa.list_(pa.float32()))}
        else:
            x = rng.normal(size=(n, 6)).astype(np.float32) * 0.3
            x[np.arange(n), cluster] += 2.0
            cols = {"features": pa.array(list(x), pa.list_(pa.float32(), 6))}
        pq.write_table(pa.table({"id": pa.array(np.arange(n)), **cols,
                                 "labels": pa.array(labels, pa.list_(pa.string()))}),
                       d / f"{part}.parquet")
    return d


@pytest.mark.parametrize("sparse", [False, True])
def test_annotation_anchors_learn_separable_clusters(tmp_path, sparse):
    pytest.importorskip("sklearn")
    pytest.importorskip("scipy")
    which = ["logreg", "knn"]
    try:
        import lightfm  # noqa: F401
        which.append("lightfm")
    except ImportError:
        pass
    results = bench_awe.run_anchors("tiny", _tiny(tmp_path, sparse), 1, 0, which)
    assert set(results) == set(which)
    for anchor in ("logreg", "knn"):
        assert results[anchor]["metrics"]["P@1"] > 0.9, (anchor, results[anchor])
        assert results[anchor]["seconds"] >= 0
    assert results["knn"]["chosen"]["k"] in bench_awe.KNN_KS
    assert results["logreg"]["chosen"]["C"] in bench_awe.LR_CS
    if "lightfm" in results:
        assert "metrics" in results["lightfm"], results["lightfm"]


def test_ease_ranks_co_occurring_items_and_excludes_training_ones():
    pytest.importorskip("scipy")
    import scipy.sparse as sp

    # items 0 and 1 always together, 2 and 3 together: a user with 0 gets 1 first
    rows = [[0, 1], [0, 1], [2, 3], [2, 3], [0, 1], [2, 3], [0]]
    indptr = np.r_[0, np.cumsum([len(r) for r in rows])]
    x = sp.csr_matrix((np.ones(indptr[-1]), np.concatenate(rows), indptr), shape=(7, 4))
    scores = bench_awe.ease_scores(x, 1.0, np.array([6]))
    got = bench_awe.precision_at(scores, [[1]], [1], [1], [[0]])
    assert got["P@1"] == 1.0


def _report() -> dict:
    seed_run = {"defaults": {"rows": {"knn-input": {"error": "AweError: more than 4096"},
                                      "awe": {"metrics": {"P@1": 0.6, "P@3": 0.4}}},
                             "seconds": 12.0},
                "anchors": {"knn": {"metrics": {"P@1": 0.55, "P@3": 0.41}, "seconds": 2.0,
                                    "chosen": {"k": 10}},
                            "logreg": {"metrics": {"P@1": 0.58, "P@3": 0.42}, "seconds": 3.0,
                                       "chosen": {"C": 1.0}}}}
    seed_run["metrics"] = bench_awe.seed_metrics(seed_run)
    runs = {0: seed_run}
    return {"command": "python scripts/bench_awe.py --seeds 0", "threads": 2, "seeds": [0],
            "seconds": 60.0,
            "machine": {"cpu": "Test CPU", "cores": 2, "torch": "2.x", "python": "3.12"},
            "datasets": {"debtags": {"seeds": runs, "over_seeds": bench_awe.over_seeds(runs)}}}


def test_markdown_lists_rows_errors_and_anchors():
    text = "\n".join(bench_awe.report_markdown(_report()))
    assert "python scripts/bench_awe.py --seeds 0" in text and "Test CPU, 2 cores" in text
    assert "| AWE, defaults | 0.6000 | 0.4000 | pipeline 12.0 s |" in text
    assert "| kNN (input), defaults | error (below) | error (below) |  |" in text
    assert "Error of defaults/knn-input: `AweError: more than 4096`" in text
    assert "| anchor: kNN | 0.5500 | 0.4100 | 2.0 s |" in text
    readme = "\n".join(bench_awe.readme_table(_report()))
    assert ("| DEBTAGS (80/20 split) | P@1 | error | – | – | 0.6000 | "
            "0.5800 (logistic regression) |") in readme


def test_replace_between_markers_adds_the_section_once(tmp_path):
    start, end = bench_awe.DOCS_MARKERS
    text = bench_awe.replace_between("# Benchmarks\n\nintro\n", bench_awe.DOCS_MARKERS, "v1",
                                     bench_awe.DOCS_SECTION)
    assert text.count(bench_awe.DOCS_SECTION) == 1 and f"{start}\nv1\n{end}" in text
    again = bench_awe.replace_between(text, bench_awe.DOCS_MARKERS, "v2",
                                      bench_awe.DOCS_SECTION)
    assert again.count(bench_awe.DOCS_SECTION) == 1 and "v1" not in again and "v2" in again
    with pytest.raises(ValueError):
        bench_awe.replace_between("no markers", bench_awe.README_MARKERS, "x")


def test_debtags_split_keeps_package_prefixes_on_one_side(tmp_path):
    names = [f"pkg{i % 30}-part{i}" for i in range(120)]
    pq.write_table(pa.table({
        "package": names, "text": ["t"] * 120,
        "feature_ids": pa.array([[i % 7] for i in range(120)], pa.list_(pa.int32())),
        "feature_values": pa.array([[1.0]] * 120, pa.list_(pa.float32())),
        "labels": pa.array([["a"]] * 120, pa.list_(pa.string()))}), tmp_path / "src.parquet")
    bench_awe.debtags_split(tmp_path / "src.parquet", tmp_path / "out", seed=3)
    train = pq.read_table(tmp_path / "out" / "train.parquet")
    test = pq.read_table(tmp_path / "out" / "test.parquet")
    assert train.num_rows + test.num_rows == 120 and 0 < test.num_rows <= 24
    prefix = {n.split("-")[0] for n in test.column("id").to_pylist()}
    assert not prefix & {n.split("-")[0] for n in train.column("id").to_pylist()}
    assert test.schema.metadata[b"awe.n_features"] == b"7"
