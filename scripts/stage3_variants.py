"""Stage-3 variants on stage 1's validation rows, against G alone (the knn-wsabie row).

    PYTHONPATH=. python scripts/stage3_variants.py MODEL TRAIN VARIANT...

MODEL: a model directory after `awe train TRAIN --valid-fraction F` and `awe build-g TRAIN`.
Prints the knn-wsabie row on the held-out rows, diagnostics of G, the best mix of G with the
stage-1 score, then per VARIANT the stage-3 validation P@1 / P@3 and its paired difference from
G alone (standard errors over rows), the share of WARP violators with G = 0, and how its top 1
differs from G's. A VARIANT is a kind with options, e.g. ``mult`` (the default model),
``mult,neg=g`` (negatives_from g), ``mult,b=0.1`` (bias b), ``add,alpha=0.2``
(f = G + alpha s), ``mult,cf=2`` (stage 3 trained on a G cross-fitted over 2 folds of stage 1),
``seed=N``. Stage 3 runs at most 30 epochs with patience 5 (docs/method.md, section 4.5).
"""
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from awe.affinity.g import Affinity
from awe.affinity.stage import validation_holdout
from awe.io.holdout import split_held
from awe.io.reader import load_examples
from awe.models.affinity_wsabie import AffinityWsabie
from awe.models.saved import load_wsabie
from awe.ranking.metrics import evaluate
from awe.training import loop
from awe.training.config import LABEL_BIAS_START, STAGE3_DEFAULTS

torch.set_num_threads(1)
model_dir, train_path = Path(sys.argv[1]), sys.argv[2]
variants = sys.argv[3:]
saved = load_wsabie(model_dir)
affinity, g_train = Affinity.load(model_dir, saved.card.stage2, with_train_g=True)
train_all = load_examples(train_path, saved.schema, saved.vocab)
held = validation_holdout(saved.card, built=True).again(train_all.labels)
train, valid = split_held(train_all, held, "annotation")
train = train.with_affinity(g_train)
valid = valid.with_affinity(affinity.examples_affinity(valid))
L = saved.model.shape.n_labels
start = {k: v.clone() for k, v in saved.model.state_tensors().items() if k != "label_bias"}


def truth(ex):
    t = torch.zeros(len(ex), L, dtype=torch.bool)
    lab = ex.labels
    t[torch.from_numpy(lab.row_of_entry()), torch.from_numpy(lab.indices).long()] = True
    return t


T_valid = truth(valid)


def per_row(scores):
    """hits at 1 and 3 per row (ties by lower label id, as awe's ranking)."""
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :3]
    hit = T_valid.gather(1, order).float()
    return hit[:, 0], hit.mean(1), order[:, 0]


def summary(name, s, ref=None):
    p1, p3, top = per_row(s)
    out = {"variant": name, "P@1": round(p1.mean().item(), 4), "P@3": round(p3.mean().item(), 4),
           "se1": round(p1.std().item() / len(p1) ** 0.5, 4)}
    if ref is not None:
        d1, d3 = p1 - ref[0], p3 - ref[1]
        n = len(d1) ** 0.5
        out.update({"dP@1": round(d1.mean().item(), 4), "se_d1": round(d1.std().item() / n, 4),
                    "dP@3": round(d3.mean().item(), 4), "se_d3": round(d3.std().item() / n, 4)})
    return out, (p1, p3, top)


G_valid = valid.affinity.to_dense(L)
knn, ref = summary("knn-wsabie", G_valid)
lib = evaluate(lambda ex, r: ex.affinity.take(r).to_dense(L), valid, [1, 3])
knn["library"] = {k: round(v, 4) for k, v in lib.items()}
print(json.dumps(knn), flush=True)

# diagnosis of G itself
Gt = train.affinity.to_dense(L)
T_train = truth(train)
diag = {
    "G labels per train row": round((Gt > 0).sum(1).float().mean().item(), 2),
    "G labels per valid row": round((G_valid > 0).sum(1).float().mean().item(), 2),
    "train positives with G=0": round(((Gt == 0) & T_train).sum().item() / T_train.sum().item(), 4),
    "valid positives with G=0": round(((G_valid == 0) & T_valid).sum().item()
                                      / T_valid.sum().item(), 4),
    "valid rows with no positive in G": round(((G_valid > 0) & T_valid).any(1).logical_not()
                                             .float().mean().item(), 4),
    "valid rows with < 3 G labels": round(((G_valid > 0).sum(1) < 3).float().mean().item(), 4),
    "G P@1 on train rows (leave-one-out)": round(T_train.gather(
        1, torch.sort(-Gt, dim=1, stable=True).indices[:, :1]).float().mean().item(), 4),
}
with torch.no_grad():
    s1 = saved.model.all_scores(saved.model.embed(
        loop.batch_inputs(valid, np.arange(len(valid)), "cpu")))
s1 = s1 / s1.std()
for t in (0.1, 0.3, 1.0):  # G's labels first, re-ordered by G * exp(t s), the others by s
    diag[f"G * exp({t} s1/sd) P@1"] = round(per_row(
        torch.where(G_valid > 0, G_valid * torch.exp(t * s1), s1 - 1e9))[0].mean().item(), 4)
print(json.dumps(diag), flush=True)


class Probe(AffinityWsabie):
    """Counts, at training, the violators whose weight G + b is 0 (free violators)."""
    free = chosen = 0

    def pair_weight(self, labels, rows):
        w = super().pair_weight(labels, rows)
        if self.training and labels.dim() == 2 and labels.shape[1] == 2:
            Probe.free += int((w[:, 1] == 0).sum())
            Probe.chosen += int(labels.shape[0])
        return w


class Additive(AffinityWsabie):
    """f = G + alpha * (x U' . V'_y + beta_y)."""
    alpha = 0.2

    def pair_weight(self, labels, rows):
        g = self._table.lookup(rows, labels)
        if labels.dim() == 2 and labels.shape[1] == 2:
            self._last_g = g.T  # the multipliers call before warp_gradients
        return torch.full_like(g, self.alpha)

    def pair_scores(self, e, labels, rows=None):
        s = AffinityWsabie.pair_scores(self, e, labels, rows)  # alpha * (s + beta)
        return s + self._table.lookup(rows, labels)

    def all_scores(self, e, rows=None):
        return self._table.dense_rows(rows) + self.alpha * self.all_scores_plain(e)

    def candidate_scores(self, e, rows, g=None):
        return None


_warp = loop.warp_gradients


def warp_gradients(e, v, phi, margin, multipliers=None, offsets=None):
    m = CURRENT
    if isinstance(m, Additive):
        offsets = offsets + m._last_g / m.alpha
    return _warp(e, v, phi, margin, multipliers, offsets)


loop.warp_gradients = warp_gradients
CURRENT = None
EPOCHS, PATIENCE = 30, 5

_crossfit = {}


def crossfit_g(k_folds):
    """Each training row's G from a stage-1 U trained on the other folds (its own label unseen by
    its embedding, as a new row's), searched over every training row (leave-one-out)."""
    if k_folds in _crossfit:
        return _crossfit[k_folds]
    from awe.affinity.g import build_affinity
    from awe.csr import Csr
    from awe.models.wsabie import Wsabie
    from awe.training.config import TrainConfig
    epochs = json.loads((model_dir / "metrics.json").read_text())["wsabie"]["best_epoch"]
    fold = np.random.default_rng(123).integers(0, k_folds, len(train))
    parts = [None] * len(train)
    for k in range(k_folds):
        m = Wsabie(saved.model.shape, 0.1, torch.Generator().manual_seed(k), 0.0)
        loop.fit(m, train.take(np.flatnonzero(fold != k)),
                 TrainConfig(threads=1, seed=k, epochs=epochs, valid_fraction=0), None)
        _, g_k, _ = build_affinity(train, L, affinity.rebuild_config(),
                                   m.u_matrix().detach().cpu().clone(),
                                   m.V.weight.detach().cpu().clone())
        for r in np.flatnonzero(fold == k):
            lo, hi = g_k.indptr[r], g_k.indptr[r + 1]
            parts[r] = (g_k.indices[lo:hi], g_k.values[lo:hi])
    lengths = np.array([len(p[0]) for p in parts])
    indptr = np.r_[0, np.cumsum(lengths)].astype(g_train.indptr.dtype)
    g = Csr(indptr, np.concatenate([p[0] for p in parts]).astype(g_train.indices.dtype),
            np.concatenate([p[1] for p in parts]).astype(g_train.values.dtype))
    _crossfit[k_folds] = g
    dense = g.to_dense(L)
    top = torch.sort(-dense, dim=1, stable=True).indices[:, 0]
    print(json.dumps({"crossfit folds": k_folds, "train G P@1":
                      round(T_train.gather(1, top[:, None]).float().mean().item(), 4),
                      "train positives with G=0":
                      round(((dense == 0) & T_train).sum().item() / T_train.sum().item(), 4)}),
          flush=True)
    return g


for variant in variants:
    kw = dict(v.split("=") for v in variant.split(",")[1:])
    kind = variant.split(",")[0]
    bias = float(kw.get("b", 0.0))
    cls = {"mult": Probe, "add": Additive}[kind]
    if kind == "add":
        Additive.alpha = float(kw.get("alpha", 0.2))
    config = replace(STAGE3_DEFAULTS, threads=1, seed=int(kw.get("seed", 0)), epochs=EPOCHS,
                     patience=PATIENCE, negatives_from=kw.get("neg", "all"),
                     lr=float(kw.get("lr", STAGE3_DEFAULTS.lr)))
    lb = None if kw.get("beta") == "off" else float(kw.get("beta", LABEL_BIAS_START))
    model = cls(saved.model.shape, bias, config.init_scale,
                torch.Generator().manual_seed(config.seed), lb)
    model.load_tensors(start)
    CURRENT = model
    rows = train if "cf" not in kw else train.with_affinity(crossfit_g(int(kw["cf"])))
    Probe.free = Probe.chosen = 0
    t0 = time.time()
    result = loop.fit(model, rows, config, valid)
    model.eval()
    model.bind(valid)
    with torch.no_grad():
        e = model.embed(loop.batch_inputs(valid, np.arange(len(valid)), "cpu"))
        s = model.all_scores(e, torch.arange(len(valid)))
    out, (p1, p3, top) = summary(variant, s, ref)
    out["best_epoch"] = result.best_epoch
    out["fit_valid_P@1"] = round(result.best_metrics.get("P@1", float("nan")), 4)
    out["seconds"] = round(time.time() - t0, 1)
    if kind == "mult":
        out["free violators"] = round(Probe.free / max(Probe.chosen, 1), 4)
    k1, k3, ktop = ref
    differ = top != ktop
    out["top1 differs from G"] = round(differ.float().mean().item(), 4)
    out["top1 in G labels"] = round((G_valid.gather(1, top[:, None]) > 0).float().mean().item(), 4)
    out["differs: awe right, G wrong"] = int((differ & (p1 > 0) & (k1 == 0)).sum())
    out["differs: G right, awe wrong"] = int((differ & (p1 == 0) & (k1 > 0)).sum())
    out["differs: both wrong"] = int((differ & (p1 == 0) & (k1 == 0)).sum())
    print(json.dumps(out), flush=True)
