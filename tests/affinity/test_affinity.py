"""Stage 2 and 3: G against a brute-force numpy reference, leave-one-out, the stage-3 gradient,
the shared training loop, and the artifacts of build-g / retrain."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from awe import artifacts
from awe.affinity.g import AffinityConfig, build_affinity
from awe.affinity.kernels import KERNELS, aggregate_labels, kernel_weights
from awe.affinity.stage import build_g
from awe.csr import Csr
from awe.errors import AweError
from awe.io.reader import Columns, load_examples, scan
from awe.models.affinity_wsabie import AffinityWsabie, awe_ranking_scores
from awe.models.wsabie import ModelShape
from awe.pipeline import retrain_awe, train_wsabie
from awe.training.config import TrainConfig
from awe.training.warp import warp_loss

# ----------------------------------------------------------------------------- reference


def reference_g(vectors, queries, train_labels, n_labels, n, kernel, lam, aggregate,
                leave_one_out, normalize="max"):
    """G by loops over queries, neighbours and labels: the definition in DESIGN.md §2, each row
    then divided by its largest weight unless ``normalize`` is "none"."""
    g = np.zeros((len(queries), n_labels))
    for q, e in enumerate(queries):
        d2 = ((vectors - e) ** 2).sum(1)
        if leave_one_out:
            d2[q] = np.inf
        order = np.argsort(d2, kind="stable")[:n]
        for i in order:
            if not np.isfinite(d2[i]):
                continue
            dot = float(e @ vectors[i])
            k = {"gaussian": np.exp(-lam * d2[i]),
                 "embedded-gaussian": np.exp(dot),
                 "cosine": np.exp(dot / (np.linalg.norm(e) * np.linalg.norm(vectors[i]))),
                 "dot": max(0.0, dot),
                 "uniform": 1.0}[kernel]
            for y in train_labels[i]:
                g[q, y] = g[q, y] + k if aggregate == "sum" else max(g[q, y], k)
        if normalize == "max" and g[q].max() > 0:
            g[q] = g[q] / g[q].max()
    return g


def dense(g: Csr, n_labels: int) -> np.ndarray:
    out = np.zeros((g.n_rows, n_labels))
    out[g.row_of_entry(), g.indices] = g.values
    return out


def small_examples(tmp_path, n_rows=60, n_features=5, n_labels=7, seed=0, sparse=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_rows, n_features)).astype(np.float32) * 0.5
    labels = [sorted(set(rng.integers(0, n_labels, size=rng.integers(1, 4)).tolist()))
              for _ in range(n_rows)]
    if sparse:
        ids = [sorted(rng.choice(n_features, size=2, replace=False).tolist())
               for _ in range(n_rows)]
        table = pa.table({"feature_ids": ids, "feature_values": [[1.0, 0.5]] * n_rows,
                          "labels": labels})
    else:
        table = pa.table({"features": list(x), "labels": labels})
    path = tmp_path / f"train-{seed}-{int(sparse)}.parquet"
    pq.write_table(table, path)
    found = scan(path, Columns())
    return load_examples(path, found.schema, found.vocab), labels


# ----------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_weights_match_definition(kernel):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(4, 3))
    nb = rng.normal(size=(4, 5, 3))
    d2 = ((nb - q[:, None]) ** 2).sum(-1)
    d2[0, -1] = np.inf  # a padded slot
    got = kernel_weights(kernel, d2, (q ** 2).sum(1), (nb ** 2).sum(-1), lam=0.7)
    dot = np.einsum("bd,bnd->bn", q, nb)
    cos = dot / (np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(nb, axis=-1))
    want = {"gaussian": np.exp(-0.7 * d2), "embedded-gaussian": np.exp(dot),
            "cosine": np.exp(cos), "dot": np.maximum(dot, 0), "uniform": np.ones_like(d2)}[kernel]
    want[0, -1] = 0.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregate", ["sum", "max"])
def test_aggregate_labels_by_hand(aggregate):
    labels = Csr.from_lengths(np.array([2, 1, 0]), np.array([0, 2, 2]))
    w = np.array([[0.5, 0.25, 1.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    ids = np.array([[0, 1, 2], [1, -1, -1]])
    g = dense(aggregate_labels(w, ids, labels, 3, aggregate), 3)
    want_row0 = [0.5, 0, 0.5 + 0.25] if aggregate == "sum" else [0.5, 0, 0.5]
    np.testing.assert_allclose(g, [want_row0, [0, 0, 1.0]])


@pytest.mark.parametrize("normalize", ["max", "none"])
@pytest.mark.parametrize("aggregate", ["sum", "max"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("space", ["wsabie", "input"])
def test_training_g_equals_brute_force(tmp_path, kernel, aggregate, space, normalize):
    examples, labels = small_examples(tmp_path)
    n_labels = 7
    u = torch.from_numpy(np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)) * 0.5
    config = AffinityConfig(neighbors=6, kernel=kernel, aggregate=aggregate, space=space,
                            index="flat", lam=None if kernel == "gaussian" else 1.3,
                            normalize=normalize)
    affinity, g, stats = build_affinity(examples, n_labels, config, u)
    vectors = examples.dense.astype(np.float64)
    if space == "wsabie":
        vectors = vectors @ u.numpy().astype(np.float64)
    lam = affinity.config.lam
    want = reference_g(vectors, vectors, labels, n_labels, 6, kernel, lam,
                       aggregate, leave_one_out=True, normalize=normalize)
    np.testing.assert_allclose(dense(g, n_labels), want, rtol=1e-4, atol=1e-5)
    # the data-driven lambda is 1 / the median squared neighbour distance
    if kernel == "gaussian":
        d2 = ((vectors[:, None] - vectors[None]) ** 2).sum(-1)
        np.fill_diagonal(d2, np.inf)
        nearest = np.sort(d2, axis=1)[:, :6]
        assert lam == pytest.approx(1 / np.median(nearest), rel=1e-4)
    assert stats["recall@n"] == 1.0
    # prediction for new rows uses the same path (no leave-one-out)
    queries, _ = small_examples(tmp_path, n_rows=9, seed=5)
    got = dense(affinity.examples_affinity(queries), n_labels)
    qv = queries.dense.astype(np.float64)
    if space == "wsabie":
        qv = qv @ u.numpy().astype(np.float64)
    want = reference_g(vectors, qv, [np.array(r) for r in labels], n_labels, 6, kernel, lam,
                       aggregate, leave_one_out=False, normalize=normalize)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_sparse_input_space_is_the_dense_copys(tmp_path, metric):
    """G_orig over sparse rows, searched without a dense copy, is G over the dense rows (scaled to
    unit length for cosine)."""
    rng = np.random.default_rng(4)
    ids = [sorted(rng.choice(40, size=3, replace=False).tolist()) for _ in range(50)]
    values = [rng.uniform(0.5, 1.5, size=3).astype(np.float32).tolist() for _ in range(50)]
    labels = [[int(rng.integers(0, 4))] for _ in range(50)]
    path = tmp_path / "sparse.parquet"
    pq.write_table(pa.table({"feature_ids": ids, "feature_values": values, "labels": labels}),
                   path)
    found = scan(path, Columns())
    examples = load_examples(path, found.schema, found.vocab)
    config = AffinityConfig(neighbors=4, space="input", index="flat",
                            metric="auto" if metric == "cosine" else metric)
    affinity, g, _ = build_affinity(examples, 4, config, None)
    assert affinity.config.metric == metric and affinity.index.kind == "sparse"
    x = np.zeros((50, found.schema.n_features))
    for r in range(50):
        x[r, ids[r]] = values[r]
    if metric == "cosine":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    want = reference_g(x, x, labels, 4, 4, "gaussian", affinity.config.lam, "sum", True)
    np.testing.assert_allclose(dense(g, 4), want, rtol=1e-4, atol=1e-5)


def test_soft_label_kernel_extends_the_exact_match(tmp_path):
    examples, labels = small_examples(tmp_path)
    u = torch.eye(5, 4)
    v = torch.from_numpy(np.random.default_rng(3).normal(size=(7, 4)).astype(np.float32))
    exact, g_exact, _ = build_affinity(examples, 7, AffinityConfig(
        neighbors=5, kernel="uniform", aggregate="max", index="flat"), u, v)
    soft, g_soft, _ = build_affinity(examples, 7, AffinityConfig(
        neighbors=5, kernel="uniform", aggregate="max", label_kernel="embedding",
        label_lambda=2.0, label_top=7, index="flat"), u, v)
    ge, gs = dense(g_exact, 7), dense(g_soft, 7)
    # labels a neighbour carries match with weight 1 in both; others get exp(-l |dV|^2) < 1
    assert np.all(gs[ge == 1] == pytest.approx(1.0))
    assert np.all(gs[ge == 0] < 1) and np.all(gs >= ge - 1e-6)
    vd = ((v[:, None] - v[None]) ** 2).sum(-1).numpy()
    q = 0
    d2 = ((examples.dense @ u.numpy())[:, None] - (examples.dense @ u.numpy())[None]) ** 2
    d2 = d2.sum(-1)
    np.fill_diagonal(d2, np.inf)
    nb = np.argsort(d2[q], kind="stable")[:5]
    want = np.zeros(7)
    for i in nb:
        for y in range(7):
            want[y] = max(want[y], max(np.exp(-2.0 * vd[y, yi]) for yi in labels[i]))
    np.testing.assert_allclose(gs[q], want, rtol=1e-4)


def test_a_training_row_is_never_its_own_neighbour_but_duplicates_count(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3)).astype(np.float32)
    x[1] = x[0]  # an exact duplicate of row 0 with another label
    labels = [[0]] * 30
    labels[1] = [1]
    path = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"features": list(x), "labels": labels}), path)
    found = scan(path, Columns())
    examples = load_examples(path, found.schema, found.vocab)
    affinity, g, _ = build_affinity(examples, 2, AffinityConfig(neighbors=1, kernel="uniform",
                                                                space="input", index="flat"),
                                    None)
    rows = np.arange(30)
    _, ids = affinity.index.search(examples.dense, 3, rows)
    assert not np.any(ids == rows[:, None])
    assert dense(g, 2)[0].tolist() == [0.0, 1.0]  # row 0's neighbour is its duplicate, row 1
    assert dense(g, 2)[1].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall_is_measured(tmp_path, kind):
    examples, _ = small_examples(tmp_path, n_rows=400)
    _, _, stats = build_affinity(examples, 7, AffinityConfig(neighbors=5, index=kind,
                                                             space="input"), None)
    assert stats["index"] == kind
    assert 0.5 <= stats["recall@n"] <= 1.0


def test_bad_options_are_user_errors():
    for bad in [dict(kernel="rbf"), dict(aggregate="mean"), dict(neighbors=0),
                dict(lam=-1.0), dict(space="x"), dict(label_kernel="soft"), dict(bias=-1.0)]:
        with pytest.raises(AweError):
            AffinityConfig(**bad)


# ----------------------------------------------------------------------------- stage 3


def test_stage3_gradient_matches_finite_differences():
    torch.manual_seed(0)
    shape = ModelShape(n_features=4, n_labels=5, dim=3, sparse_input=False)
    model = AffinityWsabie(shape, bias=0.3, init_scale=1.0, label_bias=0.5).double()
    g = Csr.from_lengths(np.array([2, 3]), np.array([0, 2, 1, 3, 4]),
                         np.array([0.5, 1.5, 0.2, 0.7, 1.1], dtype=np.float32))
    from awe.io.reader import Examples, InputSchema

    x = torch.randn(2, 4, dtype=torch.float64)
    ex = Examples(InputSchema("dense", 4), x.numpy().astype(np.float32), None,
                  Csr.from_lengths(np.array([1, 1]), np.array([0, 1])), np.zeros(2, np.int64),
                  affinity=g)
    model.bind(ex)
    model._table.dense = model._table.dense.double()
    rows = torch.tensor([0, 1])
    pos, neg = torch.tensor([0, 1]), torch.tensor([2, 4])
    phi = torch.tensor([1.0, 1.5], dtype=torch.float64)

    def loss():
        e = model.U(x)
        return warp_loss(model.pair_scores(e, pos, rows), model.pair_scores(e, neg, rows), phi,
                         margin=5.0)  # a wide margin keeps both pairs inside the hinge

    loss().backward()
    for param in (model.U.weight, model.V.weight, model.label_bias):
        grad = param.grad.clone()
        numeric = torch.zeros_like(param)
        with torch.no_grad():
            for i in range(param.numel()):
                flat = param.view(-1)
                old = float(flat[i])
                flat[i] = old + 1e-6
                up = float(loss())
                flat[i] = old - 1e-6
                down = float(loss())
                flat[i] = old
                numeric.view(-1)[i] = (up - down) / 2e-6
        torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-7)
    # and the score is (G + b) * (x U' . V'_y + beta_y)
    with torch.no_grad():
        e = model.U(x)
        want = (torch.tensor([0.5, 0.0]) + 0.3).double() * (
            (e * model.V.weight[[0, 0]]).sum(1) + 0.5)
        torch.testing.assert_close(model.pair_scores(e, torch.tensor([0, 0]), rows), want)


def test_ranking_puts_labels_of_no_neighbour_last():
    weight = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    base = torch.tensor([[5.0, -1.0, -3.0, 4.0]])
    scores = awe_ranking_scores(weight, base)
    assert torch.argsort(scores, descending=True).tolist() == [[1, 2, 0, 3]]


# ----------------------------------------------------------------------------- end to end


def write_clusters(path, n_rows, seed, n_labels=6):
    """Each label owns two separated clusters: a linear model underfits, neighbours help."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(size=(n_labels * 2, 6)) * 4
    cluster = rng.integers(0, n_labels * 2, size=n_rows)
    x = (centres[cluster] + rng.normal(size=(n_rows, 6))).astype(np.float32)
    pq.write_table(pa.table({"features": list(x), "labels": [[f"t{c % n_labels}"]
                                                             for c in cluster]}), path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("awe")
    train = write_clusters(root / "train.parquet", 900, 0)
    test = write_clusters(root / "test.parquet", 300, 1)
    train_wsabie(train, root / "m", TrainConfig(epochs=5, dim=8, seed=0, valid_fraction=0.0))
    return root, train, test


def test_build_g_and_retrain_write_every_option(trained, tmp_path):
    import shutil

    root, train, _ = trained
    model = tmp_path / "m"
    shutil.copytree(root / "m", model)
    config = AffinityConfig(neighbors=7, kernel="cosine", aggregate="max", bias=0.1,
                            normalize="none", index="flat", seed=3)
    stats, written = build_g(train, model, config)
    saved = json.loads((model / "config.json").read_text())
    assert saved["stage2"]["config"]["normalize"] == "none"
    for name, value in config.resolved("annotation").to_dict().items():
        assert name in saved["stage2"]["config"]
        if value is not None:
            assert saved["stage2"]["config"][name] == value
    assert saved["stage2"]["config"]["lam"] is not None  # resolved, even if unused by cosine
    assert json.loads((model / "metrics.json").read_text())["g"]["recall@n"] == 1.0
    result, _ = retrain_awe(train, model, TrainConfig(epochs=2, lr=0.02, seed=1), init="random",
                            label_bias=1.0)
    saved = json.loads((model / "config.json").read_text())
    assert saved["stage3"]["init"] == "random"
    assert saved["stage3"]["train"]["lr"] == 0.02 and saved["stage3"]["train"]["epochs"] == 2
    assert saved["stage3"]["bias"] == 0.1 and saved["stage3"]["label_bias"] is True
    assert (model / artifacts.AWE_WEIGHTS).exists()
    # a new G makes the stage-3 model stale: it is dropped, not silently mixed
    build_g(train, model, config)
    assert "stage3" not in json.loads((model / "config.json").read_text())
    assert not (model / artifacts.AWE_WEIGHTS).exists()


def test_retrain_uses_the_one_training_loop(trained, tmp_path, monkeypatch):
    import shutil

    import awe.pipeline as pipeline_module

    root, train, _ = trained
    model = tmp_path / "m"
    shutil.copytree(root / "m", model)
    build_g(train, model, AffinityConfig(neighbors=5))
    seen = []
    real_fit = pipeline_module.fit

    def spy(m, *args, **kwargs):
        seen.append(type(m).__name__)
        return real_fit(m, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "fit", spy)
    retrain_awe(train, model, TrainConfig(epochs=1, valid_fraction=0.0), rounds=2)
    assert seen == ["AffinityWsabie", "AffinityWsabie"]
    saved = json.loads((model / "config.json").read_text())
    assert saved["stage2"]["source"] == "awe round 1" and saved["stage3"]["round"] == 2


def test_retrain_needs_g_and_the_same_training_rows(trained, tmp_path):
    import shutil

    root, train, test = trained
    model = tmp_path / "m"
    shutil.copytree(root / "m", model)
    with pytest.raises(AweError, match="build-g"):
        retrain_awe(train, model, TrainConfig(epochs=1))
    build_g(train, model, AffinityConfig(neighbors=5))
    with pytest.raises(AweError, match="not the training"):
        retrain_awe(test, model, TrainConfig(epochs=1))


def test_knn_rows_keep_their_spaces_when_g_is_built_in_input_space(trained, tmp_path):
    """knn-input is always an input-space vote and knn-wsabie a Wsabie-space one, whichever
    space the stage-2 G (used by the awe row) was built in."""
    import shutil

    from awe.predict.predictor import Predictor

    root, train, test = trained
    scores = {}
    for space in ("wsabie", "input"):
        model = tmp_path / space
        shutil.copytree(root / "m", model)
        build_g(train, model, AffinityConfig(neighbors=5, space=space, index="flat"))
        predictor = Predictor(model)
        examples = load_examples(test, predictor.schema, predictor.vocab)
        rows = np.arange(len(examples))
        scores[space] = {kind: predictor.scores(examples, rows, kind).numpy()
                         for kind in ("knn-input", "knn-wsabie")}
    for kind in ("knn-input", "knn-wsabie"):
        np.testing.assert_allclose(scores["input"][kind], scores["wsabie"][kind], rtol=1e-5,
                                   atol=1e-6)
    assert not np.allclose(scores["input"]["knn-input"], scores["input"]["knn-wsabie"])


def test_knn_rows_search_exactly_whatever_the_stage2_index(trained, tmp_path):
    """The baselines are exact kNN: with the stage-2 G on an IVF index, the other space's
    baseline searches exactly (not `auto`, which picks IVF beyond 100k rows), over the training
    vectors themselves (no FAISS copy: it is never saved), and its vote equals that of an exact
    stage-2 G there."""
    import shutil

    from awe.predict.predictor import Predictor

    root, train, test = trained
    votes = {}
    for space, index in (("wsabie", "ivf"), ("input", "ivf"), ("input", "flat")):
        model = tmp_path / f"{space}-{index}"
        shutil.copytree(root / "m", model)
        build_g(train, model, AffinityConfig(neighbors=5, space=space, index=index,
                                             nprobe=1 if index == "ivf" else None))
        predictor = Predictor(model)
        assert predictor.affinity.index.kind == index
        assert predictor.affinity.index.index is not None          # the saved FAISS index
        other = (predictor.input_affinity() if space == "wsabie"
                 else predictor.wsabie_affinity())
        assert other.index.kind == "flat" and other.index.index is None
        examples = load_examples(test, predictor.schema, predictor.vocab)
        votes[space, index] = predictor.scores(examples, np.arange(len(examples)),
                                               "knn-input").numpy()
    np.testing.assert_allclose(votes["wsabie", "ivf"], votes["input", "flat"], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("task, neighbors, normalize, stage3_max_norm", [
    ("annotation", 20, "max", None), ("recommendation", 100, "max", 3.0)])
def test_auto_defaults_follow_the_task(tmp_path, task, neighbors, normalize, stage3_max_norm):
    rng = np.random.default_rng(0)
    n_rows = 150
    table = pa.table({"feature_ids": [[i] for i in range(n_rows)],
                      "labels": [sorted(rng.choice(30, size=6, replace=False).tolist())
                                 for _ in range(n_rows)]})
    train = tmp_path / "train.parquet"
    pq.write_table(table, train)
    model = tmp_path / "m"
    train_wsabie(train, model, TrainConfig(epochs=1, dim=4, task=task))
    stats, _ = build_g(train, model, AffinityConfig(index="flat"))
    saved = json.loads((model / "config.json").read_text())
    assert saved["stage2"]["config"]["neighbors"] == neighbors == stats["neighbors"]
    assert saved["stage2"]["config"]["normalize"] == normalize
    retrain_awe(train, model, TrainConfig(epochs=1, lr=0.01))
    saved = json.loads((model / "config.json").read_text())
    assert saved["stage3"]["train"]["max_norm"] == stage3_max_norm
    # an explicit value is kept
    build_g(train, model, AffinityConfig(neighbors=7, normalize="none", index="flat"))
    saved = json.loads((model / "config.json").read_text())["stage2"]["config"]
    assert (saved["neighbors"], saved["normalize"]) == (7, "none")


# ----------------------------------------------------------------------------- rounds and rows


def test_a_further_round_estimates_lambda_for_its_own_embedding(trained, tmp_path):
    """Round 2's G is built from U': its lambda is set from U' neighbour distances, not carried
    over from round 1's G (estimated for U); a lambda the user gave stays as given."""
    import shutil

    from awe.affinity.g import Affinity, AffinitySection

    root, train, _ = trained
    for given in (None, 0.7):
        model = tmp_path / f"m-{given}"
        shutil.copytree(root / "m", model)
        build_g(train, model, AffinityConfig(neighbors=5, index="flat", lam=given))
        first = json.loads((model / "config.json").read_text())["stage2"]["config"]["lam"]
        retrain_awe(train, model, TrainConfig(epochs=2, seed=0), rounds=2)
        section = json.loads((model / "config.json").read_text())["stage2"]
        assert section["source"] == "awe round 1"
        affinity = Affinity.load(model, AffinitySection.from_dict(section))
        if given is not None:
            assert section["config"]["lam"] == first == given
            continue
        examples = load_examples(train, *_schema_vocab(train))
        expected, _, _ = build_affinity(examples, affinity.n_labels,
                                        AffinityConfig(neighbors=5, index="flat"),
                                        affinity.embed_u)
        assert section["config"]["lam"] == pytest.approx(expected.config.lam, rel=1e-6)
        assert section["config"]["lam"] != pytest.approx(first, rel=1e-3)


def _schema_vocab(path):
    found = scan(path, Columns())
    return found.schema, found.vocab


def test_knn_wsabie_row_stays_stage_one_after_a_kept_further_round(trained, tmp_path):
    """After round 2 the stage-2 G (the awe row's) is built from U'; the knn-wsabie row is still
    kNN in stage-1 (Wsabie) space: the same scores as a G built from stage 1."""
    import shutil

    from awe.predict.predictor import Predictor

    root, train, test = trained
    reference = tmp_path / "ref"
    shutil.copytree(root / "m", reference)
    build_g(train, reference, AffinityConfig(neighbors=5, index="flat"))
    model = tmp_path / "m"
    shutil.copytree(reference, model)
    retrain_awe(train, model, TrainConfig(epochs=2, seed=0), rounds=2)
    predictor = Predictor(model)
    assert predictor.card.stage2.source == "awe round 1"
    examples = load_examples(test, predictor.schema, predictor.vocab)
    rows = np.arange(len(examples))
    got = predictor.scores(examples, rows, "knn-wsabie").numpy()
    want = Predictor(reference).scores(examples, rows, "knn-wsabie").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_recall_is_calibrated_at_the_neighbour_count_g_uses(tmp_path):
    """The search breadth of an approximate index is calibrated for recall@n at G's own n
    (100 for recommendation), not at the paper's 20."""
    examples, _ = small_examples(tmp_path, n_rows=3000)
    for neighbors in (30, 100):
        affinity, _, _ = build_affinity(
            examples, 7, AffinityConfig(neighbors=neighbors, index="ivf", space="input"), None)
        assert affinity.index.params["calibration"]["n"] == neighbors
