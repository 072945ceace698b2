"""The bfloat16 screen (awe.ranking.screen): its top k is the float32 top k, exactly.

The reference scores every label with the same float32 dot products the screen gives its
candidates (one sampled product over the full pattern), so ids and values must match bit for
bit, ties broken by the lower id; rows the screen leaves must come out of the dense path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from awe.csr import Csr
from awe.ranking import screen
from awe.ranking.topk import ranked_top_k, top_k


def reference_scores(e: torch.Tensor, table: screen.ScreenTable) -> torch.Tensor:
    """Every label's float32 score as the screen computes a candidate's."""
    n, n_labels = e.shape[0], table.n_labels
    counts = np.full(n, n_labels)
    cols = np.tile(np.arange(n_labels), n)
    return screen._float32_scores(e.float(), table, counts, cols).view(n, n_labels)


def screened_top(e, table, k, exclude=None):
    found = screen.screened_scores(e, table, k, exclude,
                                   lambda short: reference_scores(e[short], table))
    assert found is not None
    return found, ranked_top_k(found, k, exclude)


def expected_top(e, table, k, exclude=None):
    return ranked_top_k(reference_scores(e, table), k, exclude)


def model(n_labels=1000, dim=64, bias=True, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(32, dim, generator=g)
    v = (centres[torch.randint(0, 32, (n_labels,), generator=g)]
         + 0.5 * torch.randn(n_labels, dim, generator=g)) * scale
    beta = 0.1 * torch.randn(n_labels, generator=g) if bias else None
    e = (centres[torch.randint(0, 32, (512,), generator=g)]
         + torch.randn(512, dim, generator=g)) * scale
    return e, v, beta


@pytest.mark.parametrize("n_labels,dim,bias,k", [
    (1000, 64, True, 10), (1000, 128, False, 10), (997, 30, True, 5), (4099, 128, True, 20),
    (160, 16, True, 10), (21000, 32, True, 10)])
def test_screened_top_k_is_the_float32_top_k(n_labels, dim, bias, k):
    e, v, beta = model(n_labels, dim, bias)
    table = screen.ScreenTable(v, beta)
    found, (ids, vals) = screened_top(e, table, k)
    ref_ids, ref_vals = expected_top(e, table, k)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(vals, ref_vals)
    # the screen did the work: most rows settled from a few candidates
    settled = (found.ids >= 0).any(1)
    assert settled.float().mean() > 0.9
    assert (found.ids >= 0).sum(1)[settled].float().mean() < n_labels / 8


@pytest.mark.parametrize("amx", [True, False])
def test_the_product_width_follows_the_cpu_and_the_top_k_does_not(amx, monkeypatch):
    """32-column multiples for AMX's tiles, pairs elsewhere (AVX512-BF16); the zero columns
    change no score, so the screened top k is the float32 one either way."""
    monkeypatch.setattr(screen, "has_amx", lambda: amx)
    e, v, beta = model(1000, 129)
    table = screen.ScreenTable(v, beta)
    assert table.width == (160 if amx else 130)
    assert table.low_t.shape == (table.width, 1000)
    ids, vals = screened_top(e, table, 10)[1]
    ref_ids, ref_vals = expected_top(e, table, 10)
    assert torch.equal(ids, ref_ids) and torch.equal(vals, ref_vals)


@pytest.mark.parametrize("n_rows", [1, 77, 511])
def test_row_counts_off_the_product_padding(n_rows):
    e, v, beta = model(1000, 64)
    table = screen.ScreenTable(v, beta)
    ids, vals = screened_top(e[:n_rows], table, 10)[1]
    ref_ids, ref_vals = expected_top(e[:n_rows], table, 10)
    assert torch.equal(ids, ref_ids) and torch.equal(vals, ref_vals)


def test_planted_ties_go_to_the_lower_id():
    e, v, beta = model(1000, 64)
    # labels 900.. repeat the rows of labels 0..: equal float32 scores at every pair
    v[900:] = v[:100]
    beta[900:] = beta[:100]
    # and a row's best labels appear twice, so the tie crosses the cut of its top k
    table = screen.ScreenTable(v, beta)
    ids, vals = screened_top(e, table, 10)[1]
    ref_ids, ref_vals = expected_top(e, table, 10)
    assert torch.equal(ids, ref_ids) and torch.equal(vals, ref_vals)
    tied = (vals[:, 1:] == vals[:, :-1])
    assert tied.any(), "the planted ties reach some top 10"
    pairs = ids[:, 1:][tied] - ids[:, :-1][tied]
    assert (pairs > 0).all()


def test_cancellation_that_scrambles_the_bfloat16_order_still_ranks_exactly():
    """100 labels score s_y in [10, 11] as x_y - x_y + s_y with x_y ~ 60: bfloat16 copies of
    their coordinates err by ~0.2, far more than the gaps between them, so their bfloat16
    order is scrambled. The bound (e . (v - v^), known rounding) must keep every label that
    can be in the top k; the other 900 labels score about -10."""
    g = torch.Generator().manual_seed(5)
    n_labels, k = 1000, 10
    v = torch.zeros(n_labels, 4)
    x = 50 + 20 * torch.rand(100, generator=g)
    v[:100, 0], v[:100, 1] = x, -x + 10 + torch.rand(100, generator=g)
    v[100:, 0] = -10 + 0.1 * torch.randn(n_labels - 100, generator=g)
    v[:, 2:] = 0.01 * torch.randn(n_labels, 2, generator=g)
    e = torch.ones(256, 4)
    e[:, 2:] = torch.randn(256, 2, generator=g)
    table = screen.ScreenTable(v, None)
    found, (ids, vals) = screened_top(e, table, k)
    ref_ids, ref_vals = expected_top(e, table, k)
    assert torch.equal(ids, ref_ids) and torch.equal(vals, ref_vals)
    assert (found.ids >= 0).any(1).float().mean() > 0.9, "rows settled by the screen"
    # the bfloat16 scores alone would not do: their top k misses some of the true top k
    low = table.rows(e)
    rough = top_k((low @ table.low_t).float(), k)[0]
    assert not torch.equal(rough.sort(1).values, ref_ids.sort(1).values)


def test_exclusions_are_never_candidates():
    e, v, beta = model(1000, 64)
    table = screen.ScreenTable(v, beta)
    best, _ = expected_top(e, table, 5)
    # every row drops its three best labels and a few others
    rng = np.random.default_rng(0)
    lists = [sorted(set(best[i, :3].tolist()) | set(rng.choice(1000, 4).tolist()))
             for i in range(len(e))]
    exclude = Csr.from_lengths(np.array([len(r) for r in lists]),
                               np.concatenate([np.array(r, dtype=np.int64) for r in lists]))
    found, (ids, vals) = screened_top(e, table, 10, exclude)
    ref_ids, ref_vals = expected_top(e, table, 10, exclude)
    assert torch.equal(ids, ref_ids) and torch.equal(vals, ref_vals)
    for i, row in enumerate(lists):
        assert not set(found.ids[i].tolist()) & set(row)


def test_rows_it_cannot_settle_take_the_dense_path():
    e, v, beta = model(1000, 64)
    e[0] = 0.0                         # every score beta: the cut is the k-th bias
    e[1] = -e[2] * 50                  # a row whose best scores are negative
    e[3, 5] = float("nan")             # no bound: left
    e[4, 0] = float("inf")
    beta_low = beta - 100.0            # every score of a second model negative
    table = screen.ScreenTable(v, beta)
    found, (ids, vals) = screened_top(e, table, 10)
    ref_ids, ref_vals = expected_top(e, table, 10)
    assert torch.equal(ids[5:], ref_ids[5:]) and torch.equal(vals[5:], ref_vals[5:])
    assert not (found.ids[3:5] >= 0).any()  # left, and ranked dense
    assert torch.equal(ids[:3], ref_ids[:3])
    low = screen.ScreenTable(v, beta_low)
    found, (ids, vals) = screened_top(e[5:], low, 10)
    assert not (found.ids >= 0).any()  # no positive cut anywhere: every row dense
    ref_ids, ref_vals = expected_top(e[5:], low, 10)
    assert torch.equal(ids, ref_ids) and torch.equal(vals, ref_vals)


def test_the_error_bound_holds_for_every_label():
    """|a(y) - r(y)| <= b0 + u1 |a(y)|: the inequality the screen's cut rests on."""
    for seed, scale in [(0, 0.3), (1, 30.0), (2, 1e-3)]:
        e, v, beta = model(1000, 128, seed=seed, scale=scale)
        table = screen.ScreenTable(v, beta)
        low = table.rows(e)
        approx = (low @ table.low_t).double()
        exact = reference_scores(e, table).double()
        b0, u1, finite = screen._row_bounds(e, low, table)
        assert finite.all()
        slack = torch.from_numpy(b0)[:, None] + u1 * approx.abs() - (approx - exact).abs()
        assert float(slack.min()) >= 0
        # and it is not vacuous: within ~8x of the largest error seen
        worst = float((approx - exact).abs().max())
        assert float(torch.from_numpy(b0).max()) < 8 * worst + 1e-12


def test_bits_at_most_round_down():
    values = np.array([1.0, 3.14159, 1e-3, 5e-39, 123456.7, np.inf])
    bits = screen._bf16_bits_at_most(values)
    back = (bits.astype(np.int32) << 16).view(np.float32).astype(np.float64)
    assert (back[:-1] <= values[:-1]).all()
    # the next bfloat16 up is above the value: the largest one below it
    up = ((bits[:-1].astype(np.int32) + 1) << 16).view(np.float32).astype(np.float64)
    assert (up > values[:-1]).all()
    assert bits[-1] == np.iinfo(np.int16).max


def test_not_applicable_gives_none():
    e, v, beta = model(100, 16)
    table = screen.ScreenTable(v, beta)
    assert screen.screened_scores(e, table, 10, None, lambda s: None) is None  # L < 16 k
    v[3, 2] = float("inf")
    assert not screen.ScreenTable(v, beta).usable


def labelled_rows(folder, n_labels=400, seed=0):
    """train and test parquet files: 12 features around a centre per label, every label in
    train, 3 random labels a row to exclude."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_labels, 12)) * 2

    def write(path, n):
        y = rng.integers(0, n_labels, n)
        y[:n_labels] = np.arange(n_labels)
        x = (centres[y] + rng.normal(size=(n, 12))).astype(np.float32)
        pq.write_table(pa.table({
            "features": list(x), "labels": [[f"l{c}"] for c in y],
            "exclude": [[f"l{c}" for c in rng.integers(0, n_labels, 3)] for _ in y]}), path)
        return path

    return write(folder / "train.parquet", 3000), write(folder / "test.parquet", 700)


def compare_with_and_without_screen(monkeypatch, model_dir, test, kind, k, spied):
    """Predictions (with the test rows' exclusions) and metrics of ``kind`` with the screen on
    and off: the same labels and metrics, scores within 1e-5 (the screen's float32 scores are
    dot products, the dense path's a GEMM), no excluded label. Returns the calls seen by the
    spy on ``screen.<spied>`` (the number of rows a call)."""
    import pyarrow as pa

    from awe.io.reader import load_examples
    from awe.predict.evaluation import evaluate_model
    from awe.predict.predictor import Predictor

    predictor = Predictor(model_dir, screen=True)
    dense_predictor = Predictor(model_dir, screen=False)
    assert predictor.screen and not dense_predictor.screen
    examples = load_examples(test, predictor.schema, predictor.vocab, require_labels=False)
    assert examples.exclude is not None and examples.exclude.nnz
    calls = []
    original = getattr(screen, spied)
    monkeypatch.setattr(screen, spied,
                        lambda *a, **kw: calls.append(len(a[0])) or original(*a, **kw))
    with_screen = predictor.predict_table(examples, k=k, kind=kind)
    metrics_on = evaluate_model(model_dir, test, [1, k], rows=[kind], screen=True)
    seen = len(calls)
    dense = dense_predictor.predict_table(examples, k=k, kind=kind)
    metrics_off = evaluate_model(model_dir, test, [1, k], rows=[kind], screen=False)
    assert len(calls) == seen  # the screen off: never called
    assert with_screen.column("labels").equals(dense.column("labels"))
    on = np.concatenate(with_screen.column("scores").to_numpy(zero_copy_only=False))
    off = np.concatenate(dense.column("scores").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(on, off, rtol=1e-5, atol=1e-5)
    assert metrics_on == metrics_off
    excluded = examples.exclude
    for i, labels in enumerate(with_screen.column("labels").to_pylist()):
        ids = set(predictor.vocab.lookup(pa.array(labels)).tolist())
        assert not ids & set(excluded.indices[excluded.indptr[i]:excluded.indptr[i + 1]])
    return calls, len(examples)


def test_predictor_with_and_without_the_screen_agree(tmp_path, monkeypatch):
    """Through awe: the Wsabie row's predictions (with exclusions) and metrics, with the screen
    and without."""
    from awe.pipeline import train_wsabie
    from awe.training.config import TrainConfig

    train, test = labelled_rows(tmp_path)
    train_wsabie(train, tmp_path / "m", TrainConfig(dim=16, epochs=2, threads=1, seed=0,
                                                    valid_fraction=0.0), checkpoints=False)
    calls, _ = compare_with_and_without_screen(monkeypatch, tmp_path / "m", test, "wsabie", 5,
                                               "screened_scores")
    assert calls


def test_top_k_of_ranked_candidates_is_their_first_slots():
    from awe.ranking.topk import CandidateScores

    values = torch.tensor([[3.0, 2.0, 2.0, -np.inf], [5.0, -np.inf, -np.inf, -np.inf]])
    ids = torch.tensor([[7, 1, 4, -1], [2, -1, -1, -1]])
    dense = torch.full((2, 10), -1.0)
    dense[1, 2], dense[1, 9] = 5.0, 4.0
    got_ids, got_vals = ranked_top_k(CandidateScores(ids, values, lambda s: dense[s],
                                                     ranked=True), 2)
    assert got_ids.tolist() == [[7, 1], [2, 9]]
    assert got_vals.tolist() == [[3.0, 2.0], [5.0, 4.0]]
    assert torch.equal(*(t for t in (top_k(dense[1:], 2)[0][0], torch.tensor([2, 9]))))


@pytest.mark.parametrize("n_labels", [1000, 1 << 26])  # keys of 64 bits, or the padded sort
def test_best_first_sorts_by_score_then_id(n_labels):
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 30, 200)
    counts[:3] = [0, 1, 29]
    cols = np.concatenate([np.sort(rng.choice(1000, c, replace=False)) for c in counts])
    # few distinct values: many ties; both zeros; negatives
    values = rng.choice(np.array([-2.5, -0.0, 0.0, 1.0, 1.5, 3.25], dtype=np.float32),
                        len(cols))
    ids, vals = screen._best_first(counts, cols, values, 7, n_labels)
    start = 0
    for row, count in enumerate(counts):
        pairs = sorted(zip(-values[start:start + count], cols[start:start + count],
                           strict=True))[:7]
        start += count
        want_ids = [int(c) for _, c in pairs] + [-1] * (7 - len(pairs))
        want_vals = [float(-v) for v, _ in pairs] + [float("-inf")] * (7 - len(pairs))
        assert ids[row].tolist() == want_ids
        assert vals[row].tolist() == want_vals


def test_a_product_that_breaks_the_bound_turns_the_screen_off(monkeypatch):
    """A bfloat16 product accumulated in bfloat16 (not float32, as the bound assumes) fails
    the probes at construction: the model is then ranked dense."""
    _, v, beta = model(1000, 128)
    assert screen.ScreenTable(v, beta).usable

    real_matmul = torch.Tensor.__matmul__

    def coarse(a, b):
        out = real_matmul(a, b)
        if out.dtype == torch.bfloat16:  # every score off by 3% of its size
            out = (out.float() * 1.03).to(torch.bfloat16)
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", coarse)
    assert not screen.ScreenTable(v, beta).usable


def test_a_rows_result_does_not_depend_on_its_batch():
    """`awe score` locally and on Dask batch rows differently: a row's top k and scores must be
    the same whatever rows it is scored with (candidates' dot products are per entry)."""
    e, v, beta = model(1000, 64)
    e[7] = 0.0  # a row the screen leaves, in both splits
    table = screen.ScreenTable(v, beta)
    whole = screened_top(e, table, 10)[1]
    parts = [screened_top(e[start:start + 100], table, 10)[1] for start in range(0, len(e), 100)]
    assert torch.equal(whole[0], torch.cat([p[0] for p in parts]))
    assert torch.equal(whole[1], torch.cat([p[1] for p in parts]))


@pytest.mark.parametrize("with_exclude", [False, True])
def test_after_candidates_is_the_awe_ranking(with_exclude):
    """Rows with fewer than k G candidates: candidates by value, then the other labels by
    their plain score shown below the lowest candidate (awe_scores_around), exclusions
    removed; against that dense table built from the same float32 scores."""
    from awe.models.affinity_wsabie import awe_scores_around

    e, v, beta = model(1000, 64)
    table = screen.ScreenTable(v, beta)
    rng = np.random.default_rng(1)
    base = reference_scores(e, table)
    width = 6
    ids = torch.full((len(e), width), -1)
    for i in range(len(e)):
        chosen = np.sort(rng.choice(1000, rng.integers(0, width + 1), replace=False))
        ids[i, :len(chosen)] = torch.from_numpy(chosen)
    weights = torch.from_numpy(rng.uniform(0.2, 1.0, ids.shape).astype(np.float32))
    values = torch.where(ids >= 0, weights * base.gather(1, ids.clamp(min=0)), 0.0)
    values[5, :2] = values[5, 0]  # a tie between candidates
    exclude = None
    if with_exclude:
        lists = [sorted(set(ids[i, :1].clamp(min=0).tolist())
                        | set(rng.choice(1000, 3).tolist())) for i in range(len(e))]
        exclude = Csr.from_lengths(np.array([len(r) for r in lists]),
                                   np.concatenate([np.array(r, dtype=np.int64) for r in lists]))

    def dense(at):
        return awe_scores_around(base[at].clone(), ids[at], values[at])

    got = screen.screened_after_candidates(e, table, ids, values, exclude, 10, dense)
    assert got is not None
    want_table = dense(torch.arange(len(e)))
    want = ranked_top_k(want_table, 10, exclude)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_awe_rows_short_of_candidates_with_and_without_the_screen(tmp_path, monkeypatch):
    """Through awe: stage 3's rows whose G holds fewer than k labels (20 neighbours of one
    label each: most rows) ranked with the screen for the rest and densely agree."""
    from awe.affinity.g import AffinityConfig
    from awe.affinity.stage import build_g
    from awe.pipeline import retrain_awe, train_wsabie
    from awe.training.config import STAGE3_DEFAULTS, TrainConfig, with_overrides

    train, test = labelled_rows(tmp_path)
    common = {"epochs": 1, "threads": 1, "seed": 0, "valid_fraction": 0.0}
    train_wsabie(train, tmp_path / "m", TrainConfig(dim=16, **common), checkpoints=False)
    build_g(train, tmp_path / "m", AffinityConfig(neighbors=20, index="flat", threads=1))
    retrain_awe(train, tmp_path / "m", with_overrides(STAGE3_DEFAULTS, **common),
                checkpoints=False)
    calls, n_rows = compare_with_and_without_screen(monkeypatch, tmp_path / "m", test, "awe",
                                                    10, "screened_after_candidates")
    assert sum(calls) > n_rows // 2, "most rows are short of 10 G labels"


def test_score_files_records_the_screen_and_scores_alike(tmp_path):
    """The screen is a scoring option: recorded (as decided) in the output's metadata, and the
    outputs with and without it hold the same labels and scores (to float32 rounding)."""
    import json

    import pyarrow.parquet as pq

    from awe.cpu import native_bf16
    from awe.pipeline import train_wsabie
    from awe.predict.batch import METADATA_KEY, ScoreOptions, score_files
    from awe.training.config import TrainConfig

    train, test = labelled_rows(tmp_path)
    train_wsabie(train, tmp_path / "m", TrainConfig(dim=16, epochs=1, threads=1, seed=0,
                                                    valid_fraction=0.0), checkpoints=False)
    tables, recorded = {}, {}
    for flag in (True, False, None):
        out = tmp_path / f"scores-{flag}.parquet"
        score_files(test, tmp_path / "m", out, ScoreOptions(k=5, screen=flag, threads=1))
        meta = json.loads(pq.read_metadata(out).metadata[METADATA_KEY])
        recorded[flag], tables[flag] = meta["options"]["screen"], pq.read_table(out)
    assert recorded == {True: True, False: False, None: native_bf16()}
    assert tables[True].column("labels").equals(tables[False].column("labels"))
    on, off = (np.concatenate(tables[f].column("scores").to_numpy(zero_copy_only=False))
               for f in (True, False))
    np.testing.assert_allclose(on, off, rtol=1e-5, atol=1e-5)
