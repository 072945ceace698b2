#!/usr/bin/env python
"""AWE benchmark: the paper's four rows, with defaults and paper-faithful, next to anchors.

  python scripts/bench_awe.py [--datasets magnatagatune,fashion-mnist,movielens,debtags]
                              [--threads 2] [--seeds 0] [--out runs/bench-awe]
                              [--update-docs] [--update-readme]

Datasets: the synthetic Magnatagatune preset, Fashion-MNIST, MovieLens-100K (implicit, the
per-user 80/20 split of `awe data movielens`) and DEBTAGS (a seeded 80/20 split of the shared
development file, grouped by package-name prefix: the split's test part is the benchmark's test;
the pipeline carves its validation rows from the train part).

Per dataset and seed, :func:`awe.pipeline.fit_pipeline` runs twice:

* defaults: every option at its default (stage 3 inherits stage 1's shared options);
* paper-faithful: no per-label bias in stage 1 (``label_bias=False``), G with
  ``normalize="none"`` (the raw kernel sums), stage 3 without the beta offset
  (``label_bias_start=None``), everything else at its default;

then :func:`awe.predict.evaluation.evaluate_model` scores every row (knn-input, knn-wsabie,
wsabie, awe) on test; a row that fails records its error instead of a number.

Anchors in the same run, on the same train / test files, every choice made on a validation split
carved from train (never on test):

* annotation: one-vs-rest logistic regression (scikit-learn; liblinear, or ``SGDClassifier(loss=
  "log_loss")`` on large dense sets; C in {0.1, 1, 10}), kNN (cosine for sparse input, L2 for dense;
  k in {5, 10, 20, 50}; score = the neighbours' label votes), LightFM WARP (features as user
  features, labels as items; 64 components; epochs up to 30 picked on validation);
* recommendation: EASE (closed form, lambda in {100, 250, 500, 1000}), LightFM WARP.

P@k is awe's: hits in the top k / k over test rows with at least one label (a label unknown to
the training vocabulary counts as a miss), a recommendation row's training positives excluded.
With several --seeds every number gets its mean and sample standard deviation over the seeds.
Writes OUT/awe.json and OUT/awe.md; --update-docs writes the section of docs/benchmarks.md
between its markers, --update-readme the README's results table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# ruff: noqa: E402  (the imports below need the path above)

from awe.affinity.g import AffinityConfig
from awe.io import datasets
from awe.pipeline import fit_pipeline
from awe.predict.evaluation import evaluate_model
from awe.training.config import TrainConfig

SHARED = ROOT.parent / "shared" / "data"
DATASETS = ("magnatagatune", "fashion-mnist", "movielens", "debtags")
TITLES = {"magnatagatune": "synthetic Magnatagatune", "fashion-mnist": "Fashion-MNIST",
          "movielens": "MovieLens-100K implicit", "debtags": "DEBTAGS (80/20 split)"}
ROWS = ("knn-input", "knn-wsabie", "wsabie", "awe")
ROW_TITLES = {"knn-input": "kNN (input)", "knn-wsabie": "kNN (Wsabie space)",
              "wsabie": "Wsabie", "awe": "AWE"}
VARIANTS = ("defaults", "paper")
VARIANT_TITLES = {"defaults": "defaults", "paper": "paper-faithful"}
ANCHOR_TITLES = {"logreg": "logistic regression (one-vs-rest)", "knn": "kNN",
                 "lightfm": "LightFM WARP", "ease": "EASE"}
ANCHOR_SHORT = {**ANCHOR_TITLES, "logreg": "logistic regression"}
DOCS_MARKERS = ("<!-- bench_awe:start -->", "<!-- bench_awe:end -->")
README_MARKERS = ("<!-- bench_awe:readme:start -->", "<!-- bench_awe:readme:end -->")
DOCS_SECTION = "## AWE against its parts and the anchors"
VALID_FRACTION = 0.1
LR_CS = (0.1, 1.0, 10.0)
KNN_KS = (5, 10, 20, 50)
EASE_LAMBDAS = (100.0, 250.0, 500.0, 1000.0)
LIGHTFM_COMPONENTS = 64
LIGHTFM_MAX_EPOCHS = 30
# dense inputs with more entries than this train the logistic regression by SGD (one pass over
# 60k x 784 Fashion-MNIST with liblinear per class takes minutes on two cores)
SGD_ABOVE = 10_000_000
SGD_EPOCHS = 15


def ks_of(name: str) -> list[int]:
    return [1, 3, 10] if name == "movielens" else [1, 3]


def main_k(name: str) -> int:
    return 10 if name == "movielens" else 1


# --------------------------------------------------------------------------------------------
# Data


def debtags_split(source: Path, out_dir: Path, seed: int = 0, test_fraction: float = 0.2) -> None:
    """Write ``out_dir/{train,test}.parquet``: a seeded split of the DEBTAGS development file,
    whole package-name prefixes (the card's proxy for a source package) on one side."""
    table = pq.read_table(source, columns=["package", "feature_ids", "feature_values", "labels"])
    packages = table.column("package").to_pylist()
    prefixes = np.array([p.split("-")[0] for p in packages])
    groups, group_of = np.unique(prefixes, return_inverse=True)
    sizes = np.bincount(group_of)
    order = np.random.default_rng(seed).permutation(len(groups))
    in_test = np.zeros(len(groups), dtype=bool)
    in_test[order[np.cumsum(sizes[order]) <= test_fraction * len(packages)]] = True
    test_rows = in_test[group_of]
    width = int(pc.max(pc.list_flatten(table.column("feature_ids"))).as_py()) + 1
    table = table.rename_columns(["id", "feature_ids", "feature_values", "labels"])
    meta = {b"awe.task": b"annotation", b"awe.n_features": str(width).encode()}
    out_dir.mkdir(parents=True, exist_ok=True)
    for part, mask in (("train", ~test_rows), ("test", test_rows)):
        rows = table.filter(pa.array(mask)).replace_schema_metadata(meta)
        tmp = out_dir / f".{part}.parquet.tmp"
        pq.write_table(rows, tmp)
        os.replace(tmp, out_dir / f"{part}.parquet")


def prepare(name: str, out: Path, ml_source: Path, debtags_source: Path) -> Path:
    """The dataset's directory of train.parquet / test.parquet, written once."""
    d = out / "data" / name
    if not (d / "test.parquet").exists():
        if name == "movielens":
            datasets.make_dataset("movielens", d, source=ml_source)
        elif name == "magnatagatune":
            datasets.make_dataset("synthetic", d, preset="magnatagatune")
        elif name == "debtags":
            debtags_split(debtags_source, d)
        else:
            datasets.make_dataset(name, d)
    return d


class Split:
    """One parquet file as arrays: ``x`` (dense ndarray or scipy CSR), ``labels`` (lists),
    ``exclude`` (lists or None), ``ids``."""

    def __init__(self, path: Path, width: int | None = None):
        import scipy.sparse as sp

        table = pq.read_table(path)
        names = table.column_names
        n = table.num_rows
        if "features" in names:
            col = table.column("features").combine_chunks()
            self.x = np.asarray(pc_flatten(col), dtype=np.float32).reshape(n, -1)
        else:
            col = table.column("feature_ids").combine_chunks()
            offsets = np.array(col.offsets.to_numpy())
            indices = np.asarray(pc_flatten(col), dtype=np.int64)
            if "feature_values" in names:
                values = np.asarray(pc_flatten(table.column("feature_values").combine_chunks()),
                                    dtype=np.float32)
            else:
                values = np.ones(len(indices), dtype=np.float32)
            meta = table.schema.metadata or {}
            stated = int(meta.get(b"awe.n_features", b"0") or 0)
            width = max(width or 0, stated, int(indices.max(initial=-1)) + 1)
            self.x = sp.csr_matrix((values, indices, offsets - offsets[0]), shape=(n, width))
            self.x.sum_duplicates()
        self.labels = [list(v) if isinstance(v, list) else ([] if v is None else [v])
                       for v in table.column("labels").to_pylist()]
        self.exclude = (table.column("exclude").to_pylist() if "exclude" in names else None)
        self.ids = table.column("id").to_pylist() if "id" in names else list(range(n))

    @property
    def dense(self) -> bool:
        return isinstance(self.x, np.ndarray)


def pc_flatten(col: pa.ListArray) -> np.ndarray:
    return np.array(pc.list_flatten(col).to_numpy(zero_copy_only=False))  # a writable copy


class Vocab:
    """Training labels -> ids (sorted for determinism); unknown labels are dropped from the
    id lists but still count in a row's number of true labels."""

    def __init__(self, labels: list[list]):
        self.names = sorted({y for row in labels for y in row}, key=lambda v: (str(type(v)), v))
        self.index = {y: i for i, y in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def ids(self, labels: list[list]) -> list[list[int]]:
        return [[self.index[y] for y in row if y in self.index] for row in labels]

    def matrix(self, labels: list[list]):
        import scipy.sparse as sp

        rows = self.ids(labels)
        indptr = np.r_[0, np.cumsum([len(r) for r in rows])]
        indices = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=indptr[-1])
        m = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr),
                          shape=(len(rows), len(self)))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m


def precision_at(scores: np.ndarray, truth: list[list[int]], n_true: list[int], ks: list[int],
                 exclude: list[list[int]] | None = None) -> dict[str, float]:
    """awe's P@k: hits in the top k / k, averaged over rows with n_true > 0; ``exclude`` ids are
    never ranked."""
    scores = np.array(scores, dtype=np.float64, copy=True)
    if exclude is not None:
        for r, ids in enumerate(exclude):
            if ids:
                scores[r, ids] = -np.inf
    kmax = min(max(ks), scores.shape[1])
    top = np.argpartition(-scores, kmax - 1, axis=1)[:, :kmax] if kmax < scores.shape[1] else (
        np.tile(np.arange(scores.shape[1]), (len(scores), 1)))
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    ranked_ok = np.isfinite(np.take_along_axis(scores, top, axis=1))
    sums = dict.fromkeys(ks, 0.0)
    counted = 0
    for r in range(len(scores)):
        if n_true[r] <= 0:
            continue
        counted += 1
        hit = np.isin(top[r], truth[r]) & ranked_ok[r]
        cum = np.cumsum(hit)
        for k in ks:
            sums[k] += cum[min(k, kmax) - 1] / k
    return {f"P@{k}": sums[k] / max(counted, 1) for k in ks}


# --------------------------------------------------------------------------------------------
# The AWE pipeline


def awe_configs(variant: str, threads: int, seed: int) -> tuple[TrainConfig, AffinityConfig,
                                                                  dict]:
    stage1 = TrainConfig(threads=threads, seed=seed)
    if variant == "defaults":
        return stage1, AffinityConfig(threads=threads, seed=seed), {}
    return (stage1, AffinityConfig(threads=threads, seed=seed, normalize="none"),
            {"label_bias": False, "label_bias_start": None})


def run_awe(name: str, data: Path, out: Path, threads: int, seed: int, variant: str) -> dict:
    """fit_pipeline, then every row on test: {row: {"metrics"} | {"error"}}, "seconds"}."""
    model = out / "models" / f"{name}-{variant}-seed{seed}"
    stage1, affinity, extra = awe_configs(variant, threads, seed)
    t0 = time.perf_counter()
    try:
        fit_pipeline(data / "train.parquet", model, stage1, affinity, None, **extra)
    except Exception as exc:  # noqa: BLE001  (recorded in the report)
        error = f"{type(exc).__name__}: {exc}"
        print(f"  {name} {variant} seed {seed}: fit failed: {error}", flush=True)
        return {"rows": {row: {"error": error} for row in ROWS},
                "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    rows = {}
    for row in ROWS:
        t1 = time.perf_counter()
        try:
            metrics = evaluate_model(model, data / "test.parquet", ks_of(name), rows=[row],
                                     threads=threads)[row]
            rows[row] = {"metrics": metrics, "seconds": time.perf_counter() - t1}
        except Exception as exc:  # noqa: BLE001
            rows[row] = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"  {name} {variant} seed {seed} ({seconds:.1f}s): " + ", ".join(
        f"{row} " + (f"P@{main_k(name)} {r['metrics'][f'P@{main_k(name)}']:.4f}"
                     if "metrics" in r else "error") for row, r in rows.items()), flush=True)
    return {"rows": rows, "seconds": seconds}


# --------------------------------------------------------------------------------------------
# Anchors: annotation


def carve(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): a seeded fraction of whole rows."""
    perm = np.random.default_rng(seed).permutation(n)
    n_valid = max(1, int(round(fraction * n)))
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def logreg_scores(x_train, y_train, x_test, c: float, threads: int, seed: int) -> np.ndarray:
    """Decision values [n_test, L] of scikit-learn's one-vs-rest logistic regression (a label
    with one class in training gets a constant score)."""
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.multiclass import OneVsRestClassifier

    n, d = x_train.shape
    if uses_sgd(x_train):
        base = SGDClassifier(loss="log_loss", alpha=1.0 / (c * n), max_iter=SGD_EPOCHS, tol=None,
                             random_state=seed)
    else:
        base = LogisticRegression(solver="liblinear", C=c, max_iter=200, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # labels one class in a split, liblinear's iterations
        model = OneVsRestClassifier(base, n_jobs=threads).fit(x_train, y_train)
        return np.asarray(model.decision_function(x_test), dtype=np.float64).reshape(
            x_test.shape[0], -1)


def uses_sgd(x) -> bool:
    return isinstance(x, np.ndarray) and x.size > SGD_ABOVE


def standardise(train, *others):
    mean = train.mean(axis=0)
    sd = train.std(axis=0)
    sd[sd == 0] = 1.0
    return [((m - mean) / sd).astype(np.float32) for m in (train, *others)]


def anchor_logreg(tr: Split, te: Split, vocab: Vocab, ks: list[int], threads: int,
                  seed: int) -> dict:
    y = vocab.matrix(tr.labels)
    fit_rows, valid_rows = carve(len(tr.labels), VALID_FRACTION, seed)
    x_tr, x_te = tr.x, te.x
    if tr.dense:
        x_tr, x_te = standardise(x_tr, x_te)
    valid_truth = [vocab.ids([tr.labels[i]])[0] for i in valid_rows]
    chosen, best = None, -1.0
    picks = {}
    for c in LR_CS:
        s = logreg_scores(x_tr[fit_rows], y[fit_rows], x_tr[valid_rows], c,
                          threads, seed)
        p = precision_at(s, valid_truth, [len(t) for t in valid_truth], [1])["P@1"]
        picks[str(c)] = p
        if p > best:
            chosen, best = c, p
    s = logreg_scores(x_tr, y, x_te, chosen, threads, seed)
    solver = (f"SGDClassifier(loss=log_loss, {SGD_EPOCHS} epochs)" if uses_sgd(x_tr)
              else "liblinear")
    return {"scores": s, "chosen": {"C": chosen, "solver": solver, "valid P@1": picks}}


def neighbours(x_train, x_query, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, similarities) of the k nearest training rows: L2 for dense (similarity = -distance^2),
    cosine for sparse."""
    if isinstance(x_train, np.ndarray):
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.IndexFlatL2(x_train.shape[1])
        index.add(np.ascontiguousarray(x_train, dtype=np.float32))
        dist, ids = index.search(np.ascontiguousarray(x_query, dtype=np.float32), k)
        return ids, -dist
    from sklearn.preprocessing import normalize

    a, b = normalize(x_query), normalize(x_train).T.tocsr()
    ids = np.empty((a.shape[0], k), dtype=np.int64)
    sims = np.empty((a.shape[0], k), dtype=np.float32)
    for start in range(0, a.shape[0], 1024):
        block = (a[start:start + 1024] @ b).toarray()
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        ids[start:start + 1024] = np.take_along_axis(top, order, axis=1)
        sims[start:start + 1024] = np.take_along_axis(vals, order, axis=1)
    return ids, sims


def knn_scores(ids: np.ndarray, sims: np.ndarray, y_train, k: int) -> np.ndarray:
    """Each label's votes among the k neighbours (ties broken by the summed similarity)."""
    n, L = ids.shape[0], y_train.shape[1]
    scores = np.zeros((n, L), dtype=np.float64)
    ranks = sims[:, :k].astype(np.float64)
    tie = 1e-6 * (ranks - ranks.min()) / max(np.ptp(ranks), 1e-12)
    yd = y_train.tocsr()
    for j in range(k):
        block = yd[ids[:, j]].tocoo()
        np.add.at(scores, (block.row, block.col), 1.0 + tie[block.row, j])
    return scores


def anchor_knn(tr: Split, te: Split, vocab: Vocab, ks: list[int], threads: int,
               seed: int) -> dict:
    y = vocab.matrix(tr.labels)
    fit_rows, valid_rows = carve(len(tr.labels), VALID_FRACTION, seed)
    ids, sims = neighbours(tr.x[fit_rows], tr.x[valid_rows], max(KNN_KS), threads)
    valid_truth = [vocab.ids([tr.labels[i]])[0] for i in valid_rows]
    picks = {}
    for k in KNN_KS:
        s = knn_scores(ids, sims, y[fit_rows], k)
        picks[str(k)] = precision_at(s, valid_truth, [len(t) for t in valid_truth], [1])["P@1"]
    chosen = max(KNN_KS, key=lambda k: (picks[str(k)], -k))
    ids, sims = neighbours(tr.x, te.x, chosen, threads)
    metric = "L2" if tr.dense else "cosine"
    return {"scores": knn_scores(ids, sims, y, chosen),
            "chosen": {"k": chosen, "metric": metric, "valid P@1": picks}}


def lightfm_fit(interactions, user_features, valid, threads: int, seed: int,
                epochs: int | None = None):
    """LightFM WARP; with ``valid`` = (user_features, truth, exclude, k) the epoch count is picked
    on it (best P@k up to LIGHTFM_MAX_EPOCHS, stopping 5 epochs after the best); returns
    (model, best epoch, {epoch: P@k})."""
    from lightfm import LightFM

    model = LightFM(no_components=LIGHTFM_COMPONENTS, loss="warp", random_state=seed)
    if valid is None:
        model.fit(interactions, user_features=user_features, epochs=epochs,
                  num_threads=threads)
        return model, epochs, {}
    vf, truth, exclude, k = valid
    curve, best, best_epoch = {}, -1.0, 1
    for epoch in range(1, LIGHTFM_MAX_EPOCHS + 1):
        model.fit_partial(interactions, user_features=user_features, epochs=1,
                          num_threads=threads)
        p = precision_at(lightfm_scores(model, vf), truth, [len(t) for t in truth], [k],
                         exclude)[f"P@{k}"]
        curve[epoch] = p
        if p > best:
            best, best_epoch = p, epoch
        elif epoch - best_epoch >= 5:
            break
    return model, best_epoch, curve


def lightfm_scores(model, user_features) -> np.ndarray:
    ub, ue = model.get_user_representations(user_features)
    ib, ie = model.get_item_representations()
    return ue.astype(np.float64) @ ie.T.astype(np.float64) + ub[:, None] + ib[None, :]


def as_csr(x):
    """Features for LightFM: the rows as they are (dense ones as a sparse matrix)."""
    import scipy.sparse as sp

    return sp.csr_matrix(x, dtype=np.float32)


def anchor_lightfm_annotation(tr: Split, te: Split, vocab: Vocab, ks: list[int], threads: int,
                              seed: int) -> dict:
    y = vocab.matrix(tr.labels).tocoo()
    xf = as_csr(tr.x)
    fit_rows, valid_rows = carve(len(tr.labels), VALID_FRACTION, seed)
    yc = vocab.matrix(tr.labels)
    valid_truth = [vocab.ids([tr.labels[i]])[0] for i in valid_rows]
    _, best_epoch, curve = lightfm_fit(yc[fit_rows].tocoo(), xf[fit_rows],
                                       (xf[valid_rows], valid_truth, None, 1), threads, seed)
    model, _, _ = lightfm_fit(y, xf, None, threads, seed, epochs=best_epoch)
    return {"scores": lightfm_scores(model, as_csr(te.x)),
            "chosen": {"epochs": best_epoch, "valid P@1": curve}}


# --------------------------------------------------------------------------------------------
# Anchors: recommendation (rows are users, labels their items)


def holdout_items(y, fraction: float, seed: int):
    """(kept, held out): a seeded ``fraction`` of each row's items (rows with >= 5) held out."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    y = y.tocsr()
    keep = y.copy().tolil()
    held = sp.lil_matrix(y.shape, dtype=np.float32)
    for r in range(y.shape[0]):
        items = y.indices[y.indptr[r]:y.indptr[r + 1]]
        if len(items) < 5:
            continue
        out = rng.permutation(items)[:max(1, int(round(fraction * len(items))))]
        for i in out:
            keep[r, i] = 0
            held[r, i] = 1
    keep = keep.tocsr()
    keep.eliminate_zeros()
    return keep, held.tocsr()


def ease_scores(x, lam: float, users=None) -> np.ndarray:
    """EASE (Steck 2019): B = I - P diagMat(1 / diag P) with P = (X^T X + lam I)^-1, diag B = 0."""
    x = x.tocsr().astype(np.float64)
    g = (x.T @ x).toarray()
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    rows = x if users is None else x[users]
    return np.asarray(rows @ b)


def _held_lists(held) -> tuple[list[list[int]], list[list[int]]]:
    held = held.tocsr()
    truth = [list(held.indices[held.indptr[r]:held.indptr[r + 1]]) for r in range(held.shape[0])]
    return truth, [len(t) for t in truth]


def _csr_lists(x) -> list[list[int]]:
    x = x.tocsr()
    return [list(x.indices[x.indptr[r]:x.indptr[r + 1]]) for r in range(x.shape[0])]


def users_of_test(tr: Split, te: Split) -> np.ndarray:
    """Training row of each test row (rows are matched by ``id``, the user)."""
    where = {u: i for i, u in enumerate(tr.ids)}
    return np.array([where[u] for u in te.ids], dtype=np.int64)


def test_exclude(te: Split, vocab: Vocab, tr_items: list[list[int]], users) -> list[list[int]]:
    """The test rows' training positives: their ``exclude`` column, else the training items."""
    if te.exclude is not None:
        return vocab.ids([e or [] for e in te.exclude])
    return [tr_items[u] for u in users]


def anchor_ease(tr: Split, te: Split, vocab: Vocab, ks: list[int], threads: int,
                seed: int) -> dict:
    y = vocab.matrix(tr.labels)
    keep, held = holdout_items(y, VALID_FRACTION, seed)
    truth, n_true = _held_lists(held)
    exclude = _csr_lists(keep)
    picks = {}
    for lam in EASE_LAMBDAS:
        picks[str(lam)] = precision_at(ease_scores(keep, lam), truth, n_true, [10],
                                       exclude)["P@10"]
    chosen = max(EASE_LAMBDAS, key=lambda lam: picks[str(lam)])
    users = users_of_test(tr, te)
    return {"scores": ease_scores(y, chosen, users),
            "exclude": test_exclude(te, vocab, _csr_lists(y), users),
            "chosen": {"lambda": chosen, "valid P@10": picks}}


def anchor_lightfm_recommendation(tr: Split, te: Split, vocab: Vocab, ks: list[int],
                                  threads: int, seed: int) -> dict:
    import scipy.sparse as sp

    y = vocab.matrix(tr.labels)
    keep, held = holdout_items(y, VALID_FRACTION, seed)
    truth, _ = _held_lists(held)
    identity = sp.identity(y.shape[0], dtype=np.float32, format="csr")
    _, best_epoch, curve = lightfm_fit(keep.tocoo(), identity,
                                       (identity, truth, _csr_lists(keep), 10), threads, seed)
    model, _, _ = lightfm_fit(y.tocoo(), identity, None, threads, seed, epochs=best_epoch)
    users = users_of_test(tr, te)
    return {"scores": lightfm_scores(model, identity[users]),
            "exclude": test_exclude(te, vocab, _csr_lists(y), users),
            "chosen": {"epochs": best_epoch, "valid P@10": curve}}


ANCHORS = {
    "annotation": {"logreg": anchor_logreg, "knn": anchor_knn,
                   "lightfm": anchor_lightfm_annotation},
    "recommendation": {"ease": anchor_ease, "lightfm": anchor_lightfm_recommendation},
}


def task_of(name: str) -> str:
    return "recommendation" if name == "movielens" else "annotation"


def run_anchors(name: str, data: Path, threads: int, seed: int,
                which: list[str] | None = None) -> dict:
    """Every anchor of the dataset's task: {anchor: {"metrics", "seconds", "chosen"} |
    {"error"}}."""
    tr = Split(data / "train.parquet")
    te = Split(data / "test.parquet", width=tr.x.shape[1])
    if not tr.dense and te.x.shape[1] > tr.x.shape[1]:
        tr = Split(data / "train.parquet", width=te.x.shape[1])
    vocab = Vocab(tr.labels)
    truth = vocab.ids(te.labels)
    n_true = [len(row) for row in te.labels]
    results = {}
    for anchor, fn in ANCHORS[task_of(name)].items():
        if which is not None and anchor not in which:
            continue
        t0 = time.perf_counter()
        try:
            got = fn(tr, te, vocab, ks_of(name), threads, seed)
            metrics = precision_at(got["scores"], truth, n_true, ks_of(name), got.get("exclude"))
            results[anchor] = {"metrics": metrics, "seconds": time.perf_counter() - t0,
                               "chosen": got["chosen"]}
            print(f"  {name} anchor {anchor} seed {seed} ({results[anchor]['seconds']:.1f}s): "
                  f"P@{main_k(name)} {metrics[f'P@{main_k(name)}']:.4f}", flush=True)
        except Exception as exc:  # noqa: BLE001  (an anchor that cannot run is reported)
            results[anchor] = {"error": f"{type(exc).__name__}: {exc}",
                               "seconds": time.perf_counter() - t0}
            print(f"  {name} anchor {anchor}: {results[anchor]['error']}", flush=True)
    return results


# --------------------------------------------------------------------------------------------
# Summaries and reports


def seed_metrics(seed_run: dict) -> dict[str, dict]:
    """One seed's {method: metrics} (or {"error"}): "<variant>/<row>" and "anchor/<name>"."""
    out = {}
    for variant in VARIANTS:
        for row, r in seed_run.get(variant, {}).get("rows", {}).items():
            out[f"{variant}/{row}"] = r.get("metrics", {"error": r.get("error")})
    for anchor, r in seed_run.get("anchors", {}).items():
        out[f"anchor/{anchor}"] = r.get("metrics", {"error": r.get("error")})
    return out


def over_seeds(runs: dict[int, dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {metric: {"mean", "sd"}}} over the runs of several seeds ({seed: {"metrics": {row:
    {metric: value}}}}); sd is the sample standard deviation (0 with one seed). A row that failed
    in some seed keeps that seed's error as ``{"error": text}``."""
    rows = dict.fromkeys(r for run in runs.values() for r in run["metrics"])
    summary = {}
    for row in rows:
        got = [run["metrics"].get(row, {"error": "absent"}) for run in runs.values()]
        errors = [m["error"] for m in got if "error" in m]
        if errors:
            summary[row] = {"error": errors[0]}
            continue
        summary[row] = {}
        for metric in got[0]:
            values = [m[metric] for m in got]
            summary[row][metric] = {
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    return summary


def fmt(stat: dict, n_seeds: int) -> str:
    if n_seeds > 1:
        return f"{stat['mean']:.4f} ± {stat['sd']:.4f}"
    return f"{stat['mean']:.4f}"


def seconds_of(result: dict, key: str) -> float | None:
    values = []
    for run in result["seeds"].values():
        if key.startswith("anchor/"):
            r = run.get("anchors", {}).get(key.split("/", 1)[1], {})
        else:
            r = run.get(key, {})
        if "seconds" in r:
            values.append(r["seconds"])
    return statistics.fmean(values) if values else None


def short_error(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split()).replace("`", "'")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def dataset_table(name: str, result: dict) -> list[str]:
    """Markdown: the four rows with defaults and paper-faithful, then the anchors."""
    ks = ks_of(name)
    summary = result["over_seeds"]
    n = len(result["seeds"])
    lines = [f"**{TITLES.get(name, name)}** (seeds {', '.join(map(str, result['seeds']))}"
             + ("; one seed, no spread" if n == 1 else "; mean ± sd") + ")", "",
             "| method | " + " | ".join(f"P@{k}" for k in ks) + " | time |",
             "| --- | " + " | ".join("---:" for _ in ks) + " | ---: |"]
    for variant in VARIANTS:
        t = seconds_of(result, variant)
        for row in ROWS:
            key = f"{variant}/{row}"
            if key not in summary:
                continue
            when = (f"pipeline {t:.1f} s" if t is not None else "") if row == "awe" else ""
            lines.append(_method_line(f"{ROW_TITLES[row]}, {VARIANT_TITLES[variant]}",
                                      summary[key], ks, n, when))
    for key in summary:
        if key.startswith("anchor/"):
            anchor = key.split("/", 1)[1]
            t = seconds_of(result, key)
            lines.append(_method_line(f"anchor: {ANCHOR_TITLES.get(anchor, anchor)}",
                                      summary[key], ks, n, f"{t:.1f} s" if t else ""))
    errors: dict[str, list[str]] = {}
    for key, stats in summary.items():
        if "error" in stats:
            errors.setdefault(short_error(stats["error"]), []).append(key)
    lines.append("")
    for text, keys in errors.items():
        lines.append(f"Error of {', '.join(keys)}: `{text}`")
    return lines + ([""] if errors else [])


def _method_line(title: str, stats: dict, ks: list[int], n: int, when: str) -> str:
    if "error" in stats:
        return f"| {title} | " + " | ".join("error (below)" for _ in ks) + f" | {when} |"
    return f"| {title} | " + " | ".join(fmt(stats[f"P@{k}"], n) for k in ks) + f" | {when} |"


def seeds_table(name: str, result: dict, ks: list[int]) -> list[str]:
    """Markdown: every seed's value of each row and the mean +- sd."""
    seeds = list(result["seeds"])
    lines = [f"**{name}** over seeds {', '.join(map(str, seeds))}", "",
             "| row | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd |",
             "| --- | --- | " + " | ".join("---" for _ in seeds) + " | --- | --- |"]
    for row, metrics in result["over_seeds"].items():
        if "error" in metrics:
            continue
        for k in ks:
            m = f"P@{k}"
            values = " | ".join(f"{result['seeds'][s]['metrics'][row][m]:.4f}" for s in seeds)
            lines.append(f"| {row} | {m} | {values} | {metrics[m]['mean']:.4f} | "
                         f"{metrics[m]['sd']:.4f} |")
    return lines + [""]


def anchor_choices(result: dict) -> list[str]:
    """One line per anchor: what validation chose (first seed)."""
    first = next(iter(result["seeds"].values()))
    parts = []
    for anchor, r in first.get("anchors", {}).items():
        if "chosen" in r:
            chosen = ", ".join(f"{k} {v}" for k, v in r["chosen"].items()
                               if not isinstance(v, dict))
            parts.append(f"{ANCHOR_TITLES.get(anchor, anchor)}: {chosen}")
    return ["Chosen on validation: " + "; ".join(parts) + ".", ""] if parts else []


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def report_markdown(report: dict) -> list[str]:
    m = report["machine"]
    lines = ["Generated by", "", "```bash", report["command"], "```", "",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs: times are "
             f"noisy), torch {m['torch']}, {report['threads']} threads. Wall time "
             f"{report['seconds'] / 60:.1f} min.", "",
             "Rows: the paper's four, from one `fit_pipeline` with every option at its default "
             "and one paper-faithful (no per-label bias in stage 1, G unnormalised, no beta in "
             "stage 3); time is the three stages' wall time. Anchors run in the same script on "
             "the same files, every choice made on a validation split of train; time includes "
             "the selection. Metric: awe's P@k (rows with a label; training positives excluded "
             "for recommendation).", ""]
    for name, result in report["datasets"].items():
        lines += dataset_table(name, result)
        lines += anchor_choices(result)
        if len(result["seeds"]) > 1:
            lines += seeds_table(name, result, ks_of(name))
    return lines


def replace_between(text: str, markers: tuple[str, str], body: str,
                    section: str | None = None) -> str:
    """``text`` with what lies between the markers replaced by ``body``; without the markers, a
    new ``section`` holding them is appended (or an error when no section is given)."""
    start, end = markers
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        pattern = re.escape(start) + r".*?" + re.escape(end)
        return re.sub(pattern, lambda _: block, text, count=1, flags=re.S)
    if section is None:
        raise ValueError(f"markers {start} / {end} not found")
    return text.rstrip() + f"\n\n{section}\n\n{block}\n"


def readme_table(report: dict) -> list[str]:
    """The README's compact table: defaults' four rows and the best anchor per dataset."""
    m = report["machine"]
    seeds = report["seeds"]
    lines = [f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, seed"
             + ("s " if len(seeds) > 1 else " ") + ", ".join(map(str, seeds))
             + (" (mean ± sd)" if len(seeds) > 1 else "") + ":", "",
             "| dataset | metric | kNN | kNN (Wsabie space) | Wsabie | AWE | best anchor |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, result in report["datasets"].items():
        k = f"P@{main_k(name)}"
        summary = result["over_seeds"]
        n = len(result["seeds"])
        cells = []
        for row in ROWS:
            s = summary.get(f"defaults/{row}")
            cells.append("–" if s is None else "error" if "error" in s else fmt(s[k], n))
        anchors = [(key.split("/", 1)[1], s) for key, s in summary.items()
                   if key.startswith("anchor/") and "error" not in s]
        best = max(anchors, key=lambda a: a[1][k]["mean"], default=None)
        cells.append(f"{fmt(best[1][k], n)} ({ANCHOR_SHORT.get(best[0], best[0])})"
                     if best else "")
        lines.append(f"| {TITLES.get(name, name)} | {k} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-awe")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--ml-source", type=Path, default=SHARED / "ml-100k")
    parser.add_argument("--debtags-source", type=Path,
                        default=SHARED / "debtags" / "train.parquet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds; with several, mean and sd over them")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="AWE pipelines to run: defaults, paper")
    parser.add_argument("--anchors", default="all",
                        help="comma-separated anchors (logreg, knn, lightfm, ease), all or none")
    parser.add_argument("--update-docs", action="store_true",
                        help="write the section of docs/benchmarks.md between its markers")
    parser.add_argument("--update-readme", action="store_true",
                        help="write the README's results table between its markers")
    parser.add_argument("--from-json", type=Path,
                        help="write the reports from a previous run's awe.json, running nothing")
    args = parser.parse_args()
    if args.from_json:
        write_reports(json.loads(args.from_json.read_text()), args.from_json.parent,
                      args.update_docs, args.update_readme)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    which = (None if args.anchors == "all" else
             [] if args.anchors == "none" else args.anchors.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = {"command": "python scripts/bench_awe.py " + shlex.join(sys.argv[1:]),
              "machine": machine(), "threads": args.threads, "seeds": seeds, "datasets": {}}
    for name in args.datasets.split(","):
        try:
            data = prepare(name, args.out, args.ml_source, args.debtags_source)
        except Exception as exc:  # noqa: BLE001  (absent raw data: report and go on)
            print(f"{name} skipped: {exc}")
            continue
        print(f"{name}:", flush=True)
        runs = {}
        for seed in seeds:
            run = {v: run_awe(name, data, args.out, args.threads, seed, v) for v in variants}
            run["anchors"] = run_anchors(name, data, args.threads, seed, which)
            run["metrics"] = seed_metrics(run)
            runs[seed] = run
        report["datasets"][name] = {"seeds": runs, "over_seeds": over_seeds(runs)}
        report["seconds"] = time.perf_counter() - started  # kept as each dataset finishes
        (args.out / "awe.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["seconds"] = time.perf_counter() - started
    (args.out / "awe.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_reports(report, args.out, args.update_docs, args.update_readme)


def write_reports(report: dict, out: Path, update_docs: bool, update_readme: bool) -> None:
    """OUT/awe.md, and the marked sections of docs/benchmarks.md and README.md when asked."""
    lines = report_markdown(report)
    (out / "awe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if update_docs:
        path = ROOT / "docs" / "benchmarks.md"
        path.write_text(replace_between(path.read_text(), DOCS_MARKERS, "\n".join(lines),
                                        DOCS_SECTION))
        print(f"wrote {path}")
    if update_readme:
        path = ROOT / "README.md"
        path.write_text(replace_between(path.read_text(), README_MARKERS,
                                        "\n".join(readme_table(report))))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
