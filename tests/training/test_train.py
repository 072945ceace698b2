"""The training step's closed-form WARP gradients and row updates against autograd + torch.optim."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from awe.csr import Csr
from awe.errors import AweError
from awe.io.reader import Examples, InputSchema
from awe.models.wsabie import ModelShape, Wsabie
from awe.pipeline import train_wsabie
from awe.ranking.dots import gathered_dots
from awe.training import loop as train_module
from awe.training.config import TrainConfig
from awe.training.loop import fit
from awe.training.optim import RowOptimizer
from awe.training.warp import estimate_rank, rank_weight_table, warp_gradients, warp_loss
from tests.affinity.test_affinity import write_clusters


class Weighted(Wsabie):
    """f(x, y) = w(row, y) * (x U) . V_y with a fixed table w: stage 3's shape of model."""

    def __init__(self, shape: ModelShape, table: torch.Tensor, **kwargs):
        super().__init__(shape, **kwargs)
        self.table = table

    def pair_weight(self, labels, rows):
        if rows is None:
            return None
        r = rows if labels.dim() == 1 else rows.unsqueeze(1).expand_as(labels)
        return self.table[r, labels]


def test_warp_gradients_equal_autograd_with_multipliers():
    g = torch.Generator().manual_seed(0)
    n, d = 7, 5
    e = torch.randn(n, d, generator=g, requires_grad=True)
    v = torch.randn(2, n, d, generator=g, requires_grad=True)
    phi = torch.rand(n, generator=g) * 3
    w = torch.rand(2, n, generator=g) + 0.5
    margin = 0.7
    scores = (v * e).sum(-1) * w
    reference = warp_loss(scores[0], scores[1], phi, margin)
    reference.backward()
    assert (margin - scores[0] + scores[1]).min() < 0 < (margin - scores[0] + scores[1]).max()
    loss, grad_e, grad_v, _ = warp_gradients(e.detach(), v.detach(), phi, margin, w)
    torch.testing.assert_close(loss, reference.detach())
    torch.testing.assert_close(grad_e, e.grad)
    torch.testing.assert_close(grad_v, v.grad)
    # without multipliers: the plain Wsabie score
    e.grad = v.grad = None
    warp_loss((v[0] * e).sum(-1), (v[1] * e).sum(-1), phi, margin).backward()
    _, grad_e, grad_v, _ = warp_gradients(e.detach(), v.detach(), phi, margin)
    torch.testing.assert_close(grad_e, e.grad)
    torch.testing.assert_close(grad_v, v.grad)


def test_warp_gradients_equal_autograd_with_label_offsets():
    """Stage 3 with beta: f = w * (e . V_y + beta_y); d/d beta is the coefficient of each pair."""
    g = torch.Generator().manual_seed(1)
    n, d = 9, 4
    e = torch.randn(n, d, generator=g, requires_grad=True)
    v = torch.randn(2, n, d, generator=g, requires_grad=True)
    beta = torch.randn(2, n, generator=g, requires_grad=True)
    phi = torch.rand(n, generator=g) * 3
    w = torch.rand(2, n, generator=g) + 0.5
    scores = ((v * e).sum(-1) + beta) * w
    reference = warp_loss(scores[0], scores[1], phi, 0.5)
    reference.backward()
    loss, grad_e, grad_v, grad_beta = warp_gradients(e.detach(), v.detach(), phi, 0.5, w,
                                                     beta.detach())
    torch.testing.assert_close(loss, reference.detach())
    torch.testing.assert_close(grad_e, e.grad)
    torch.testing.assert_close(grad_v, v.grad)
    torch.testing.assert_close(grad_beta, beta.grad)


def _examples(sparse: bool, seed: int = 0, n_rows: int = 12, n_features: int = 9,
              n_labels: int = 15) -> Examples:
    rng = np.random.default_rng(seed)
    label_lengths = rng.integers(1, 4, n_rows)
    labels = Csr.from_lengths(label_lengths, np.concatenate(
        [np.sort(rng.choice(n_labels, k, replace=False)) for k in label_lengths]))
    if sparse:  # several ids per row, non-unit values, repeated ids across rows
        lengths = rng.integers(1, 4, n_rows)
        ids = np.concatenate([np.sort(rng.choice(n_features, k, replace=False))
                              for k in lengths])
        values = rng.uniform(0.5, 1.5, len(ids)).astype(np.float32)
        features = Csr.from_lengths(lengths, ids, values)
        return Examples(InputSchema("sparse", n_features), None, features, labels,
                        np.zeros(n_rows, dtype=np.int64), task="annotation")
    dense = rng.normal(size=(n_rows, n_features)).astype(np.float32)
    return Examples(InputSchema("dense", n_features), dense, None, labels,
                    np.zeros(n_rows, dtype=np.int64), task="annotation")


def _reference_step(model, config, rows, positives, inputs, sampled, n_negatives_of_row):
    """The step as autograd + torch.optim would take it (the loop before closed-form gradients)."""
    found, negatives, n_draws = sampled
    params = list(model.parameters())
    opt = (torch.optim.Adagrad(params, lr=config.lr) if config.optimizer == "adagrad"
           else torch.optim.SGD(params, lr=config.lr))
    e = model.embed(inputs)
    sel = found.nonzero().squeeze(1)
    n_labels = model.shape.n_labels
    ranks = estimate_rank(n_negatives_of_row[rows[sel]], n_draws[sel])
    phi = rank_weight_table(n_labels, config.rank_weight)[ranks.clamp(max=n_labels)]
    loss = warp_loss(model.pair_scores(e[sel], positives[sel], rows[sel]),
                     model.pair_scores(e[sel], negatives[sel], rows[sel]), phi, config.margin)
    touched = torch.cat([positives[sel], negatives[sel]])
    if config.weight_decay:
        u = model.U.weight[inputs.ids] if model.shape.sparse_input else model.U.weight
        loss = loss + config.weight_decay * 0.5 * (model.V(touched).pow(2).sum()
                                                   + u.pow(2).sum())
    loss.backward()
    opt.step()
    if config.max_norm is not None:
        model.project_rows(config.max_norm, inputs.ids, touched)


def _assert_autograd_step(model, seen, examples, config, bind: bool = False) -> None:
    """``model`` after the captured step equals the captured model before it stepped by
    autograd + torch.optim on the captured sample (``bind``: a stage-3 model's G)."""
    reference = seen["before"]
    if bind:
        reference.bind(examples)
    n_negatives = torch.from_numpy(model.shape.n_labels - examples.labels.lengths)
    _reference_step(reference, config.resolved("annotation", "cpu"), seen["rows"],
                    seen["positives"], seen["inputs"], seen["sampled"], n_negatives)
    for name, got in model.state_tensors().items():
        torch.testing.assert_close(got, reference.state_tensors()[name], rtol=1e-5, atol=1e-6)


def capture_step(monkeypatch) -> dict:
    """Record the sampler's result and the model and batch before the (last) WARP step."""
    seen = {}
    original_call = train_module._WarpStep.__call__

    def capture(name):
        original_sampler = getattr(train_module, name)

        def sampler(*args, **kwargs):
            seen["sampled"], seen["sampler"] = original_sampler(*args, **kwargs), name
            return seen["sampled"]
        monkeypatch.setattr(train_module, name, sampler)
    capture("sample_violators")
    capture("sample_violators_from_table")

    def call(self, rows, positives, inputs):
        seen.update(before=copy.deepcopy(self.model), rows=rows, positives=positives,
                    inputs=inputs)
        return original_call(self, rows, positives, inputs)

    monkeypatch.setattr(train_module._WarpStep, "__call__", call)
    return seen


@pytest.mark.parametrize("sparse,optimizer,weight_decay,max_norm,sparse_grads", [
    (True, "adagrad", 0.0, None, False),
    (True, "adagrad", 0.01, 0.8, False),
    (True, "sgd", 0.01, 0.8, False),
    (False, "adagrad", 0.01, 0.8, False),
    (False, "sgd", 0.0, None, False),
    (True, "adagrad", 0.0, 0.8, True),
    (True, "sgd", 0.0, None, True),
])
def test_step_equals_autograd_with_pair_weights(monkeypatch, sparse, optimizer, weight_decay,
                                                max_norm, sparse_grads):
    if sparse_grads:  # every table takes the touched-rows path (torch: sparse gradients)
        monkeypatch.setattr(Wsabie, "SPARSE_GRAD_MIN_WEIGHTS", 1)
    examples = _examples(sparse)
    shape = ModelShape(examples.schema.n_features, 15, 4, sparse)
    table = torch.rand(len(examples), 15, generator=torch.Generator().manual_seed(1)) + 0.5
    model = Weighted(shape, table, init_scale=3.0, generator=torch.Generator().manual_seed(0))
    config = TrainConfig(epochs=1, batch_size=10_000, negatives=4, lr=0.1, optimizer=optimizer,
                         weight_decay=weight_decay, max_norm=max_norm)
    seen = capture_step(monkeypatch)
    fit(model, examples, config)

    found = seen["sampled"][0]
    assert 0 < int(found.sum()) < len(found)  # some pairs step, some find no violator
    _assert_autograd_step(model, seen, examples, config)


@pytest.mark.parametrize("kind", ["adagrad", "sgd"])
def test_row_optimizer_paths_agree(kind):
    g = torch.Generator().manual_seed(0)
    start = torch.randn(20, 3, generator=g)
    dense, rows_only = start.clone(), start.clone()
    a = RowOptimizer(dense, kind, 0.3, dense=True)
    b = RowOptimizer(rows_only, kind, 0.3, dense=False)
    touched = torch.zeros(20, dtype=torch.bool)
    for _ in range(3):
        rows = torch.randint(0, 15, (12,), generator=g)  # repeats are summed
        grads = torch.randn(12, 3, generator=g)
        a.step_rows(rows, grads, max_norm=1.0)
        b.step_rows(rows, grads, max_norm=1.0)
        touched[rows] = True
    torch.testing.assert_close(dense, rows_only)
    assert torch.equal(dense[~touched], start[~touched])  # rows without a gradient stay put
    assert not torch.equal(dense[touched], start[touched])


@pytest.mark.parametrize("n,k", [(1, 1), (5, 1), (7, 9), (300, 11), (300, 16)])
def test_gathered_dots_equal_gather(n, k):
    g = torch.Generator().manual_seed(n * k)
    table = torch.randn(11, 6, generator=g)
    e = torch.randn(n, 6, generator=g)
    labels = torch.randint(0, 11, (n, k), generator=g)  # repeats, any order
    labels[0, 0] = labels[0, -1] = 10
    expected = (table[labels] * e.unsqueeze(1)).sum(-1)
    torch.testing.assert_close(gathered_dots(e, table, labels), expected)


@pytest.mark.parametrize("optimizer,max_norm", [("adagrad", None), ("sgd", 0.8)])
def test_stage3_step_equals_autograd_with_label_bias(monkeypatch, optimizer, max_norm):
    """The real stage-3 model (G from a Csr, b, beta): the closed-form step moves U, V and beta
    exactly as autograd + torch.optim would."""
    from awe.models.affinity_wsabie import AffinityWsabie

    examples = _examples(False)
    rng = np.random.default_rng(3)
    lengths = rng.integers(3, 8, len(examples))
    g = Csr.from_lengths(lengths, np.concatenate(
        [np.sort(rng.choice(15, k, replace=False)) for k in lengths]),
        rng.uniform(0.2, 2.0, lengths.sum()).astype(np.float32))
    examples = examples.with_affinity(g)
    shape = ModelShape(examples.schema.n_features, 15, 4, False)
    model = AffinityWsabie(shape, bias=0.2, init_scale=3.0,
                           generator=torch.Generator().manual_seed(0), label_bias=0.5)
    config = TrainConfig(epochs=1, batch_size=10_000, negatives=4, lr=0.1, optimizer=optimizer,
                         max_norm=max_norm)
    seen = capture_step(monkeypatch)
    fit(model, examples, config)
    assert int(seen["sampled"][0].sum()) > 0
    _assert_autograd_step(model, seen, examples, config, bind=True)
    assert not torch.equal(model.label_bias, torch.full((15,), 0.5))  # beta did move


@pytest.mark.parametrize("sparse,optimizer,weight_decay", [
    (True, "adagrad", 0.01), (False, "sgd", 0.0), (False, "adagrad", 0.0)])
def test_stage1_step_equals_autograd_with_label_bias(monkeypatch, sparse, optimizer,
                                                     weight_decay):
    """Stage 1 with beta_y (f = (x U).V_y + beta_y): U, V and beta move as autograd says."""
    examples = _examples(sparse)
    shape = ModelShape(examples.schema.n_features, 15, 4, sparse)
    model = Wsabie(shape, init_scale=3.0, generator=torch.Generator().manual_seed(0),
                   label_bias=0.0)
    config = TrainConfig(epochs=1, batch_size=10_000, negatives=4, lr=0.1, optimizer=optimizer,
                         weight_decay=weight_decay)
    seen = capture_step(monkeypatch)
    fit(model, examples, config)
    assert int(seen["sampled"][0].sum()) > 0
    _assert_autograd_step(model, seen, examples, config)
    assert set(model.state_tensors()) == {"U", "V", "label_bias"}
    assert not torch.equal(model.label_bias, torch.zeros(15))


@pytest.mark.parametrize("kind", ["wsabie", "awe"])
def test_table_sampler_step_equals_autograd(monkeypatch, kind):
    """15 labels <= 20 draws: the step samples from the table's law, and what it does with the
    sample is autograd's step (stage 1 with beta; stage 3 with G, b and beta)."""
    from awe.models.affinity_wsabie import AffinityWsabie

    examples = _examples(False)
    shape = ModelShape(examples.schema.n_features, 15, 4, False)
    gen = torch.Generator().manual_seed(0)
    if kind == "awe":
        examples = examples.with_affinity(_random_g(len(examples), 15, seed=4))
        model = AffinityWsabie(shape, bias=0.2, init_scale=3.0, generator=gen, label_bias=0.5)
    else:
        model = Wsabie(shape, init_scale=3.0, generator=gen, label_bias=0.0)
    config = TrainConfig(epochs=1, batch_size=10_000, negatives=20, lr=0.1, margin=0.3)
    seen = capture_step(monkeypatch)
    fit(model, examples, config)
    assert seen["sampler"] == "sample_violators_from_table"
    found, _, n_draws = seen["sampled"]
    assert 0 < int(found.sum()) < len(found) and int(n_draws.max()) > 1
    _assert_autograd_step(model, seen, examples, config, bind=kind == "awe")


def _random_g(n_rows: int, n_labels: int, seed: int) -> Csr:
    """A G of 3-7 labels a row (sorted), weights in [0.2, 2)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 8, n_rows)
    return Csr.from_lengths(lengths, np.concatenate(
        [np.sort(rng.choice(n_labels, k, replace=False)) for k in lengths]),
        rng.uniform(0.2, 2.0, lengths.sum()).astype(np.float32))


@pytest.mark.parametrize("kind", ["wsabie", "weighted", "awe"])
def test_full_score_table_samples_like_the_gathered_scores(monkeypatch, kind):
    """With few labels the sampler reads each pair's scores from one [B, L] table: the same
    violators, draw counts and trained model as scoring the drawn labels one by one."""
    from awe.models.affinity_wsabie import AffinityWsabie

    examples = _examples(False, n_rows=40)
    shape = ModelShape(examples.schema.n_features, 15, 4, False)
    g = _random_g(len(examples), 15, seed=3)
    table = torch.rand(len(examples), 15, generator=torch.Generator().manual_seed(1)) + 0.5
    if kind == "awe":
        examples = examples.with_affinity(g)
    original = train_module.sample_violators

    def trained(labels_per_draw):
        monkeypatch.setattr(train_module, "FULL_TABLE_LABELS_PER_DRAW", labels_per_draw)
        # labels drawn one block at a time from the table (not its law): the same draw stream
        monkeypatch.setattr(train_module, "EXACT_TABLE_SAMPLING", False)
        gen = torch.Generator().manual_seed(0)
        model = {"wsabie": lambda: Wsabie(shape, init_scale=3.0, generator=gen, label_bias=0.5),
                 "weighted": lambda: Weighted(shape, table, init_scale=3.0, generator=gen),
                 "awe": lambda: AffinityWsabie(shape, bias=0.2, init_scale=3.0, generator=gen,
                                               label_bias=0.5)}[kind]()
        draws = []

        def sampler(*args, **kwargs):
            draws.append(original(*args, **kwargs))
            return draws[-1]
        monkeypatch.setattr(train_module, "sample_violators", sampler)
        # a small margin on large scores: whether a draw violates depends on the scores
        fit(model, examples, TrainConfig(epochs=3, batch_size=16, negatives=20, lr=0.1,
                                         margin=0.05))
        return model, draws

    table_model, table_draws = trained(1)      # 15 labels <= 20 draws: the table
    gathered_model, gathered_draws = trained(0)
    assert len(table_draws) == len(gathered_draws) > 3
    n_draws = torch.cat([d[2] for d in table_draws])
    assert (n_draws > 1).any() and (n_draws == 0).any()   # scores decided, not the first draw
    for a, b in zip(table_draws, gathered_draws, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)
    for name, got in table_model.state_tensors().items():
        torch.testing.assert_close(got, gathered_model.state_tensors()[name])


def test_lookup_layouts_train_the_same_model():
    """Positives and G found through a bitmap / dense G, padded rows or sorted keys: the same
    draws, weights and trained stage-3 model (the layouts differ in speed only)."""
    from awe.csr import PaddedRows
    from awe.models.affinity_wsabie import AffinityTable, AffinityWsabie
    from awe.training.warp import PositiveSet

    examples = _examples(False, n_rows=40)
    shape = ModelShape(examples.schema.n_features, 15, 4, False)
    examples = examples.with_affinity(_random_g(len(examples), 15, seed=5))

    def trained(layout):
        with pytest.MonkeyPatch.context() as patch:
            if layout != "dense":
                patch.setattr(PositiveSet, "DENSE_LIMIT", 0)
                patch.setattr(AffinityTable, "DENSE_LIMIT", 0)
                patch.setattr(PaddedRows, "MAX_PADDING", 100.0)
            if layout == "keys":
                patch.setattr(PaddedRows, "MAX_WIDTH", 0)
            patch.setattr(train_module, "FULL_TABLE_LABELS_PER_DRAW", 0)  # draws looked up
            model = AffinityWsabie(shape, bias=0.2, init_scale=3.0,
                                   generator=torch.Generator().manual_seed(0), label_bias=0.5)
            fit(model, examples, TrainConfig(epochs=3, batch_size=16, negatives=20, lr=0.1,
                                             margin=0.05))
        table = model._table
        assert {"dense": table.dense, "padded": table.padded, "keys": table.keys}[layout] \
            is not None
        return model.state_tensors()

    reference = trained("dense")
    for layout in ("padded", "keys"):
        for name, got in trained(layout).items():
            assert torch.equal(got, reference[name]), (layout, name)


@pytest.mark.parametrize("sparse", [False, True])
def test_initial_embedding_scale_follows_the_rows_norm(sparse):
    """U starts at init_scale / (sqrt(D) x the rows' RMS norm): x U starts at norm ~init_scale
    for features of any scale, and ModelShape's default (1) is the unit-norm case."""
    dim, init_scale = 64, 0.1
    for input_norm in (1.0, 12.7):
        shape = ModelShape(400, 10, dim, sparse, input_norm)
        model = Wsabie(shape, init_scale, torch.Generator().manual_seed(0))
        u = model.U.weight.detach()
        u = u if sparse else u.T  # [features, D]
        assert float(u.std()) == pytest.approx(init_scale / (np.sqrt(dim) * input_norm),
                                               rel=0.05)
        x = torch.randn(2000, 400, generator=torch.Generator().manual_seed(1))
        x *= input_norm / x.norm(dim=1, keepdim=True)  # rows of norm input_norm
        assert float((x @ u).norm(dim=1).mean()) == pytest.approx(init_scale, rel=0.05)
    assert ModelShape(400, 10, dim, sparse).input_norm == 1.0


def test_training_records_the_rows_norm(tmp_path):
    from awe.io.reader import scan

    train = write_clusters(tmp_path / "train.parquet", 200, 0)
    model = tmp_path / "model"
    train_wsabie(train, model, TrainConfig(epochs=1, dim=4, threads=1), checkpoints=False)
    saved = json.loads((model / "config.json").read_text())["stage1"]["model"]
    assert saved["input_norm"] == pytest.approx(np.sqrt(scan(train).mean_sq_norm), rel=1e-12)
    assert abs(saved["input_norm"] - 1) > 0.1  # the clusters are not unit-norm rows


@pytest.mark.parametrize("make, field", [
    (lambda: TrainConfig(dim=0), "dim"),
    (lambda: TrainConfig(valid_fraction=1.0), "valid_fraction"),
])
def test_option_errors_name_the_field_not_a_flag(make, field):
    """Library validation speaks of its own fields; ``AweError.field`` lets a front end
    (the CLI) name its flag instead."""
    from awe import AWE
    from awe.affinity.g import AffinityConfig
    from awe.predict.batch import ScoreOptions

    for build, name in [(make, field), (lambda: AWE(dim=0), "dim"),
                        (lambda: AffinityConfig(label_top=0), "label_top"),
                        (lambda: ScoreOptions(k=0), "k")]:
        with pytest.raises(AweError) as info:
            build()
        assert info.value.field == name and str(info.value).startswith(f"{name} must")
        assert "--" not in str(info.value)


@pytest.mark.parametrize("negatives_from", ["all", "g"])
def test_stage3_negatives_from_g_draws_among_g_labels(monkeypatch, negatives_from):
    """``negatives_from="g"``: stage 3's WARP negatives are labels G carries for the row (never
    a label of weight 0, whose score is 0 whatever the model), and the rank is estimated among
    them: L - |labels(x)| becomes the row's G labels that are not its own. ``all`` (the
    default) draws labels of weight 0 too."""
    from awe.models.affinity_wsabie import AffinityWsabie

    examples = _examples(False, n_rows=40)
    g = _random_g(len(examples), 15, seed=4)
    examples = examples.with_affinity(g)
    shape = ModelShape(examples.schema.n_features, 15, 4, False)
    model = AffinityWsabie(shape, bias=0.0, init_scale=3.0,
                           generator=torch.Generator().manual_seed(0), label_bias=3.0)
    config = TrainConfig(epochs=1, batch_size=10_000, negatives=8, lr=0.1,
                         negatives_from=negatives_from)
    seen = capture_step(monkeypatch)
    ranks = []
    original_rank = train_module.estimate_rank

    def rank(n_negatives, n_draws):
        ranks.append(n_negatives.clone())
        return original_rank(n_negatives, n_draws)
    monkeypatch.setattr(train_module, "estimate_rank", rank)
    fit(model, examples, config)
    found, negatives, _ = seen["sampled"]
    assert int(found.sum()) > 0
    rows = seen["rows"][found]
    negatives = negatives[found]
    weight = g.to_dense(15)[rows, negatives]
    truth = examples.labels.to_dense(15)
    assert not truth[rows, negatives].bool().any()  # never one of the row's own labels
    if negatives_from == "all":
        assert bool((weight == 0).any())
        assert torch.equal(ranks[-1], torch.from_numpy(15 - examples.labels.lengths)[rows])
        return
    assert bool((weight > 0).all())
    own_in_g = ((g.to_dense(15) > 0) & truth.bool()).sum(1)
    expected = torch.from_numpy(g.lengths)[rows] - own_in_g[rows]
    assert torch.equal(ranks[-1], expected)


def test_negatives_from_g_is_stage_3_only():
    examples = _examples(False)
    model = Wsabie(ModelShape(examples.schema.n_features, 15, 4, False))
    with pytest.raises(AweError, match="negatives_from"):
        fit(model, examples, TrainConfig(epochs=1, negatives_from="g"))
