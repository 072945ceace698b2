"""The Wsabie embedding model f(x, y) = (x U) . V_y, and its persistence.

Dense inputs multiply a dense U (n_features x D); sparse inputs (ids with values) sum rows of U in
an ``EmbeddingBag``; labels are rows of V (an ``Embedding``). Large tables get sparse gradients, so
a step touches only the rows it uses. Stage 3 (AWE) reuses this module and multiplies its scores
by the affinity weights G.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import artifacts
from .csr import Csr
from .data import Examples, InputSchema, LabelVocab
from .errors import AweError
from .evaluate import CandidateScores
from .optim import renorm_rows
from .warp import PaddedRows, pad_rows


@dataclass(frozen=True)
class ModelShape:
    n_features: int
    n_labels: int
    dim: int
    sparse_input: bool
    # the root mean squared norm of the training rows (data.scan): U starts at init_scale /
    # (sqrt(dim) * input_norm), so that x U starts at norm ~init_scale whatever the features'
    # scale (pixels in [0, 1]: |x| ~ 12.7 on Fashion-MNIST). Saved models without it: 1.
    input_norm: float = 1.0


@dataclass
class Inputs:
    """A batch of x on a device: dense [B, F], or EmbeddingBag's (ids, offsets, weights).

    Sparse batches may also carry ``bags`` (the row of every id, for the gradient of U) and
    ``single`` (every row is exactly one id of weight 1, so x U is a row lookup).
    """

    dense: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    bags: torch.Tensor | None = None
    single: bool = False

    @property
    def n_rows(self) -> int:
        return len(self.dense) if self.dense is not None else len(self.offsets)


def batch_inputs(examples: Examples, rows: np.ndarray, device: torch.device | str = "cpu",
                 ) -> Inputs:
    """Gather the inputs of ``rows`` (indices into ``examples``) as tensors."""
    if examples.dense is not None:
        return Inputs(dense=torch.from_numpy(examples.dense[rows]).to(device))
    part = examples.sparse.take(rows)
    return Inputs(ids=torch.from_numpy(part.indices).to(device),
                  offsets=torch.from_numpy(part.indptr[:-1]).to(device),
                  weights=torch.from_numpy(part.values).to(device),
                  bags=torch.from_numpy(part.row_of_entry()).to(device))


class Wsabie(nn.Module):
    """f(x, y) = (x U) . V_y.

    Training (``awe.train.fit``) computes the WARP gradients in closed form from ``embed``,
    ``v_matrix`` and ``pair_weight``; a subclass whose scores are w(row, y) * (x U) . V_y (AWE's
    stage 3) overrides ``pair_weight`` (and ``all_scores`` for ranking) and trains unchanged.
    """

    # Tables above this many weights get sparse gradients; below it a dense optimizer step is
    # cheaper, and Adagrad/SGD leave rows with a zero gradient unchanged either way.
    SPARSE_GRAD_MIN_WEIGHTS = 1 << 20

    def __init__(self, shape: ModelShape, init_scale: float = 0.1,
                 generator: torch.Generator | None = None, label_bias: float | None = None):
        super().__init__()
        self.shape = shape
        u = torch.randn(shape.n_features, shape.dim, generator=generator)
        v = torch.randn(shape.n_labels, shape.dim, generator=generator)
        # scale so that a row embedding of a typical x (norm input_norm) has norm ~ init_scale
        u *= init_scale / (np.sqrt(shape.dim) * (shape.input_norm or 1.0))
        v *= init_scale / np.sqrt(shape.dim)
        if shape.sparse_input:
            self.U = nn.EmbeddingBag(shape.n_features, shape.dim, mode="sum",
                                     sparse=self._sparse_grad(shape.n_features))
            self.U.weight.data.copy_(u)
        else:
            self.U = nn.Linear(shape.n_features, shape.dim, bias=False)
            self.U.weight.data.copy_(u.T)
        self.V = nn.Embedding(shape.n_labels, shape.dim,
                              sparse=self._sparse_grad(shape.n_labels))
        self.V.weight.data.copy_(v)
        # beta_y, a learned per-label offset (LightFM's item bias): dense inputs without a
        # constant feature cannot express one through x U
        self.label_bias = None
        if label_bias is not None:
            self.label_bias = nn.Parameter(torch.full((shape.n_labels,), float(label_bias)))

    def _sparse_grad(self, n_rows: int) -> bool:
        return n_rows * self.shape.dim >= self.SPARSE_GRAD_MIN_WEIGHTS

    # U as n_features x D whatever the layer stores
    def u_matrix(self) -> torch.Tensor:
        return self.U.weight if self.shape.sparse_input else self.U.weight.T

    def v_matrix(self) -> torch.Tensor:
        return self.V.weight

    def embed(self, x: Inputs) -> torch.Tensor:
        """e = x U, [B, D]."""
        if self.shape.sparse_input:
            if x.single and not torch.is_grad_enabled():
                return self.U.weight.index_select(0, x.ids)
            return self.U(x.ids, x.offsets, per_sample_weights=x.weights)
        return self.U(x.dense)

    def bind(self, examples: Examples) -> None:
        """Make ``rows`` arguments refer to rows of ``examples`` (stage 3 looks up their G)."""

    def u_gradient(self, x: Inputs, grad_e: torch.Tensor,
                   ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """dL/dU from dL/de [B, D] (e = x U).

        Sparse input: (ids, gradient of each id's row of U [nnz, D]), ids possibly repeated.
        Dense input: (None, the gradient of the stored ``U.weight`` [D, F]).
        """
        if not self.shape.sparse_input:
            return None, grad_e.T @ x.dense
        if x.single:
            return x.ids, grad_e
        g = grad_e.index_select(0, x.bags)
        if x.weights is not None:
            g = g * x.weights.unsqueeze(1)
        return x.ids, g

    def pair_weight(self, labels: torch.Tensor, rows: torch.Tensor | None,
                    ) -> torch.Tensor | None:
        """Per-pair multiplier w(row, y) of the score, shaped like ``labels``; None means 1.

        ``labels`` is [B] or [B, K] and ``rows`` [B] (indices of the training rows). Stage 3
        (AWE) returns its affinity weights here; plain Wsabie has none.
        """
        return None

    def pair_scores(self, e: torch.Tensor, labels: torch.Tensor,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        """f of each row of ``e`` against ``labels`` ([B] or [B, K]), times ``pair_weight``."""
        if torch.is_grad_enabled():
            v = self.V(labels)
            scores = (e * v).sum(-1) if labels.dim() == 1 else (v * e.unsqueeze(1)).sum(-1)
        elif labels.dim() == 2:
            scores = gathered_dots(e, self.V.weight, labels)
        else:  # index_select is several times faster than the embedding op on CPU
            scores = (e * self.V.weight.index_select(0, labels)).sum(-1)
        offset = self.pair_offset(labels)
        if offset is not None:
            scores = scores + offset
        weight = self.pair_weight(labels, rows)
        return scores if weight is None else scores * weight

    def pair_offset(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The learned per-label offset beta_y added to e . V_y; None: no offset."""
        if self.label_bias is None:
            return None
        return self.label_bias.index_select(0, labels.reshape(-1)).view(labels.shape)

    def all_scores(self, e: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """f against every label: [B, L]."""
        if self.label_bias is None:
            return e @ self.V.weight.T
        # one pass: adding beta to the [B, L] product afterwards cost more than the product
        # (L = 1000, 4096 rows: 4.5-5.5 vs 2.0-2.6 µs a row, 1 thread)
        return torch.addmm(self.label_bias, e, self.V.weight.T)

    def candidate_scores(self, e: torch.Tensor, rows: torch.Tensor,
                         g: Csr | None = None) -> CandidateScores | None:
        """A ranking from a few labels a row instead of :meth:`all_scores`; None: there is
        none here, every label must be scored (stage 3 has one)."""
        return None

    def pair_score_table(self, e: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``pair_scores`` of each row of ``e`` against every label, [B, L]: the scores training
        compares (:meth:`all_scores` may reorder labels for ranking), from one GEMM."""
        scores = Wsabie.all_scores(self, e)
        if rows is None:
            return scores
        labels = torch.arange(self.shape.n_labels, device=e.device).expand(e.shape[0], -1)
        weight = self.pair_weight(labels, rows)
        return scores if weight is None else scores * weight

    @torch.no_grad()
    def project_rows(self, max_norm: float, u_rows: torch.Tensor | None,
                     v_rows: torch.Tensor) -> None:
        """Project the touched rows of U and V onto the ball of radius ``max_norm`` (the paper)."""
        renorm_rows(self.V.weight, v_rows, max_norm)
        if self.shape.sparse_input:
            renorm_rows(self.U.weight, u_rows, max_norm)
        else:
            self.project_dense_u(max_norm)

    @torch.no_grad()
    def project_dense_u(self, max_norm: float) -> None:
        """Dense U is touched everywhere; its rows are the columns of Linear.weight."""
        w = self.U.weight
        w.mul_(max_norm / w.norm(dim=0).clamp(min=max_norm))

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"U": self.u_matrix().detach().contiguous().cpu(),
                   "V": self.v_matrix().detach().contiguous().cpu()}
        if self.label_bias is not None:
            tensors["label_bias"] = self.label_bias.detach().contiguous().cpu()
        return tensors

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        u, v = tensors["U"], tensors["V"]
        for name, t in tensors.items():
            # copy_ would cast silently: a tampered or foreign file is refused, not converted
            if t.dtype != torch.float32:
                raise ValueError(f"tensor {name} has dtype {t.dtype}, expected torch.float32")
        if tuple(u.shape) != (self.shape.n_features, self.shape.dim) or tuple(v.shape) != (
                self.shape.n_labels, self.shape.dim):
            raise ValueError(f"weights have shapes U{tuple(u.shape)} V{tuple(v.shape)}, expected "
                             f"U({self.shape.n_features}, {self.shape.dim}) "
                             f"V({self.shape.n_labels}, {self.shape.dim})")
        if self.shape.sparse_input:
            self.U.weight.copy_(u)
        else:
            self.U.weight.copy_(u.T)
        self.V.weight.copy_(v)
        if self.label_bias is not None and "label_bias" in tensors:
            if tuple(tensors["label_bias"].shape) != (self.shape.n_labels,):
                raise ValueError(f"label_bias has shape {tuple(tensors['label_bias'].shape)}, "
                                 f"expected ({self.shape.n_labels},)")
            self.label_bias.copy_(tensors["label_bias"])


# rank stage 3 from G's labels alone while a row holds at most this share of the labels
# (ImageNet-like: 20 of 21k); wider rows take the GEMM over all labels (ML100K's G rows hold up
# to 957 of 1396 labels: `awe eval`'s awe row took 0.63 s from the candidates, 0.55 s dense)
CANDIDATES_MAX_SHARE = 1 / 8


class AffinityWsabie(Wsabie):
    """Stage 3 (AWE): f(x, y) = (G(x, y) + b) * ((x U') . V'_y + beta_y), G fixed from stage 2.

    ``beta`` (``label_bias``, optional) is a learned per-label offset of the embedding score;
    None keeps the paper's model. ``rows`` arguments index the examples last passed to
    :meth:`bind`, whose ``affinity`` holds G.
    """

    def __init__(self, shape: ModelShape, bias: float = 0.0, init_scale: float = 0.1,
                 generator: torch.Generator | None = None, label_bias: float | None = None):
        super().__init__(shape, init_scale, generator, label_bias)
        self.bias = float(bias)
        self._table: AffinityTable | None = None

    def bind(self, examples: Examples) -> None:
        if examples.affinity is None or examples.affinity.n_rows != len(examples):
            raise AweError("stage 3 needs the affinity weights G of every row: run "
                           "`awe build-g` before `awe retrain`")
        self._table = AffinityTable(examples.affinity, self.shape.n_labels,
                                    self.V.weight.device)

    def pair_weight(self, labels: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return self._table.lookup(rows, labels) + self.bias

    def all_scores(self, e: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return awe_ranking_scores(self._table.dense_rows(rows) + self.bias,
                                  self.all_scores_plain(e))

    def candidate_scores(self, e: torch.Tensor, rows: torch.Tensor,
                         g: Csr | None = None) -> CandidateScores | None:
        """The ranking of :meth:`all_scores` from G's labels alone, when they outrank every
        other label (b = 0: the others score 0 * s and follow): (G x s) at G's entries,
        ``g`` (those rows' G) or the bound rows' G. None when b != 0 (every label weighs)."""
        if self.bias != 0:
            return None
        if g is None:
            g = self._table.g.take(rows.cpu().numpy())
        if int(g.lengths.max(initial=0)) > CANDIDATES_MAX_SHARE * self.shape.n_labels:
            return None  # wide rows: one GEMM over all labels costs less than gathered dots
        ids, weights = pad_rows(g, torch.int64, e.device)
        # ascending ids within a row: top_k's ties (by position) are then ties by label id
        order = torch.argsort(ids.masked_fill(ids < 0, self.shape.n_labels), dim=1)
        ids, weights = ids.gather(1, order), weights.gather(1, order)
        base = gathered_dots(e, self.V.weight, ids.clamp(min=0))
        offset = self.pair_offset(ids.clamp(min=0))
        if offset is not None:
            base = base + offset
        # a weight of 0 makes no candidate (awe_ranking_scores): dropped like the padding
        ids = ids.masked_fill(weights == 0, -1)
        values = weights * base

        @torch.no_grad()
        def dense(at: torch.Tensor) -> torch.Tensor:
            return awe_scores_around(self.all_scores_plain(e.index_select(0, at)),
                                     ids.index_select(0, at), values.index_select(0, at))
        return CandidateScores(ids, values, dense)

    def all_scores_plain(self, e: torch.Tensor) -> torch.Tensor:
        """(x U') . V'_y + beta_y for every label, before the G weighting: [B, L]."""
        return super().all_scores(e)


def awe_scores_around(base: torch.Tensor, ids: torch.Tensor, values: torch.Tensor,
                      ) -> torch.Tensor:
    """:func:`awe_ranking_scores` of rows given as their base scores [B, L] (overwritten) and
    their candidates (``ids`` [B, W], -1 padding; ``values`` = weight x base there): the
    non-candidates shifted below the lowest candidate, the candidates' values put in. Three
    passes over [B, L] where the weight matrix took eight."""
    valid = ids >= 0
    lowest = torch.where(valid, values, torch.inf).amin(1, keepdim=True)
    lowest = torch.where(torch.isfinite(lowest), lowest, 0.0)
    out = base.sub_(base.amax(1, keepdim=True)).add_(lowest).sub_(1)
    at = valid.nonzero()
    out[at[:, 0], ids[at[:, 0], at[:, 1]]] = values[at[:, 0], at[:, 1]].to(out.dtype)
    return out


def awe_ranking_scores(weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Scores that rank labels by f = weight * base, the labels with weight 0 last.

    With b = 0 a label no neighbour carries has f = 0 whatever the model, so it is no candidate:
    it would otherwise outrank every candidate with a negative base score. Those labels follow
    the candidates in the order of their base (stage-3 embedding) score.
    """
    f = weight * base
    candidate = weight != 0
    if bool(candidate.all()):
        return f
    lowest = torch.where(candidate, f, torch.inf).amin(1, keepdim=True)
    lowest = torch.where(torch.isfinite(lowest), lowest, 0.0)
    return torch.where(candidate, f, base - base.amax(1, keepdim=True) + lowest - 1)


class AffinityTable:
    """G of a set of rows, looked up per (row, label) pair in one vectorised call.

    A dense rows x labels matrix while it is small, else :class:`~awe.warp.PaddedRows` while
    rows hold about the same number of labels (max aggregation: at most n), else sorted keys
    row * L + label with their weights, searched with ``searchsorted``; absent pairs weigh 0.
    """

    DENSE_LIMIT = 1 << 25  # floats of dense G we are glad to hold (128 MiB)

    def __init__(self, g: Csr, n_labels: int, device: torch.device | str = "cpu"):
        self.n_labels = n_labels
        self.g = g
        self.dense = self.padded = self.keys = self.values = None
        if g.n_rows * n_labels <= self.DENSE_LIMIT:
            rows = torch.from_numpy(g.row_of_entry())
            ids = torch.from_numpy(g.indices)
            self.dense = torch.zeros(g.n_rows, n_labels)
            self.dense[rows, ids] = torch.from_numpy(g.values.astype(np.float32))
            self.dense = self.dense.to(device)
        elif PaddedRows.fits(g, n_labels):
            self.padded = PaddedRows(g, device)
        else:
            self.keys = torch.from_numpy(g.keys(n_labels)).to(device)
            self.values = torch.from_numpy(g.values.astype(np.float32)).to(device)
        self.device = device

    def lookup(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """G at (rows[i], labels[i]) for rows [B] and labels [B] or [B, K]."""
        if self.padded is not None:
            return self.padded.value(rows, labels)
        if labels.dim() == 2:
            rows = rows.unsqueeze(1).expand_as(labels)
        if self.dense is not None:
            return torch.take(self.dense, rows * self.n_labels + labels)
        if self.keys.numel() == 0:
            return torch.zeros(labels.shape, device=labels.device)
        keys = rows * self.n_labels + labels
        pos = torch.searchsorted(self.keys, keys).clamp(max=self.keys.numel() - 1)
        return torch.where(self.keys[pos] == keys, self.values[pos], 0.0)

    def dense_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.index_select(0, rows)
        part = self.g.take(rows.cpu().numpy())
        out = torch.zeros(len(rows), self.n_labels)
        out[torch.from_numpy(part.row_of_entry()), torch.from_numpy(part.indices)] = (
            torch.from_numpy(part.values.astype(np.float32)))
        return out.to(rows.device)


def gathered_dots(e: torch.Tensor, table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """out[b, k] = e[b] . table[labels[b, k]] for e [B, D], labels [B, K] (no autograd).

    On CPU this is one sampled matrix product (SDDMM) over a CSR pattern with row b holding
    labels[b, :] in draw order: torch's kernel computes one dot product per stored entry and
    neither needs sorted nor unique columns (tests check it against the gather), so the [B, K, D]
    gather is never materialised (3x faster). torch refuses more entries per row than columns
    (K > labels), and CUDA's kernel wants a valid CSR: there, gather, multiply, sum.
    """
    n, k = labels.shape
    if e.device.type != "cpu" or labels.numel() == 0 or k > table.shape[0]:
        v = table.index_select(0, labels.reshape(-1)).view(n, k, -1)
        return v.mul_(e.unsqueeze(1)).sum(-1)
    crow = torch.arange(0, n * k + 1, k, device=e.device)
    return sampled_dots(e, table, crow, labels.reshape(-1)).view(n, k)


def sampled_dots(e: torch.Tensor, table: torch.Tensor, crow: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
    """e[row] . table[col] for the entries of a CSR pattern (row pointers ``crow``, column ids
    ``cols``), in entry order: torch's sampled product, one dot an entry (CPU)."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, cols, e.new_zeros(len(cols)),
                                          size=(e.shape[0], table.shape[0]),
                                          check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, e, table.T, beta=0.0).values()


# ----------------------------------------------------------------------------- persistence


@dataclass
class SavedModel:
    """A trained stage-1 model with everything needed to read data for it."""

    model: Wsabie
    schema: InputSchema
    vocab: LabelVocab
    config: dict


def save_wsabie(model_dir: str | Path, model: Wsabie, schema: InputSchema, vocab: LabelVocab,
                train_config: dict, extra: dict | None = None) -> list[Path]:
    """Write labels.json, wsabie.safetensors and config.json (last: it marks the model complete)."""
    model_dir = Path(model_dir)
    config = {
        "format_version": artifacts.FORMAT_VERSION,
        "schema": schema.to_dict(),
        "n_labels": len(vocab),
        "label_kind": vocab.kind,
        "stage1": {"model": asdict(model.shape), "label_bias": model.label_bias is not None,
                   "train": train_config},
        "versions": artifacts.library_versions(),
        **(extra or {}),
    }
    fingerprint = config_fingerprint(config["stage1"])
    config["stage1"]["fingerprint"] = fingerprint
    with artifacts.staged(model_dir) as stage:
        artifacts.write_json(stage / artifacts.LABELS, vocab.labels)
        artifacts.write_tensors(stage / artifacts.WSABIE_WEIGHTS, model.state_tensors(),
                                {"fingerprint": fingerprint})
        artifacts.write_json(stage / artifacts.CONFIG, config)
    return [model_dir / artifacts.LABELS, model_dir / artifacts.WSABIE_WEIGHTS,
            model_dir / artifacts.CONFIG]


def config_fingerprint(stage_config: dict) -> str:
    text = json.dumps(stage_config, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_wsabie(model_dir: str | Path) -> SavedModel:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise AweError(f"{model_dir}: no such model directory; train one with `awe train`")
    config = artifacts.read_json(model_dir / artifacts.CONFIG)
    if not isinstance(config, dict):
        raise AweError(f"{model_dir / artifacts.CONFIG}: incomplete or damaged (not a JSON "
                       f"object); retrain")
    try:
        version = int(config.get("format_version", 0))
        if version > artifacts.FORMAT_VERSION:
            raise AweError(f"{model_dir}: written by a newer awe (format {version}); upgrade awe")
        schema = InputSchema.from_dict(config["schema"])
        shape = ModelShape(**config["stage1"]["model"])
        labels = artifacts.read_json(model_dir / artifacts.LABELS)
        if not isinstance(labels, list) or len(labels) != shape.n_labels:
            raise AweError(f"{model_dir / artifacts.LABELS}: expected {shape.n_labels} labels")
        try:
            vocab = LabelVocab(labels)
        except AweError as exc:
            raise AweError(f"{model_dir / artifacts.LABELS}: {exc}; train the model again") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise AweError(f"{model_dir / artifacts.CONFIG}: incomplete or damaged ({exc})") from exc
    model = Wsabie(shape, label_bias=0.0 if config["stage1"].get("label_bias") else None)
    try:
        tensors = artifacts.read_tensors(model_dir / artifacts.WSABIE_WEIGHTS)
        if model.label_bias is not None and "label_bias" not in tensors:
            raise KeyError("label_bias")
        model.load_tensors(tensors)
    except (KeyError, ValueError) as exc:
        raise AweError(f"{model_dir / artifacts.WSABIE_WEIGHTS}: damaged or from another model "
                       f"({exc}); train the model again") from exc
    model.eval()
    return SavedModel(model, schema, vocab, config)


def save_awe(model_dir: str | Path, model: AffinityWsabie, train_config: dict, extra: dict,
             ) -> list[Path]:
    """Write awe.safetensors, then the stage3 section of config.json (which marks it complete)."""
    model_dir = Path(model_dir)
    config = artifacts.read_json(model_dir / artifacts.CONFIG)
    section = {"model": asdict(model.shape), "bias": model.bias,
               "label_bias": model.label_bias is not None, "train": train_config,
               "stage2_fingerprint": config["stage2"]["fingerprint"], **extra}
    section["fingerprint"] = config_fingerprint(section)
    if config.pop("stage3", None) is not None:
        # the old stage 3 leaves config.json before its weights are replaced: a kill in between
        # leaves a model without stage 3, never a config.json naming weights it does not match
        artifacts.write_json(model_dir / artifacts.CONFIG, config)
    artifacts.write_tensors(model_dir / artifacts.AWE_WEIGHTS, model.state_tensors(),
                            {"fingerprint": section["fingerprint"]})
    config["stage3"] = section
    artifacts.write_json(model_dir / artifacts.CONFIG, config)
    return [model_dir / artifacts.AWE_WEIGHTS, model_dir / artifacts.CONFIG]


def load_awe(model_dir: str | Path, config: dict) -> AffinityWsabie:
    """The stage-3 model of a directory (G is bound later, per set of rows)."""
    model_dir = Path(model_dir)
    section = config.get("stage3")
    if section is None:
        raise AweError(f"{model_dir}: no stage-3 (AWE) model; run `awe build-g` and "
                       f"`awe retrain` first")
    if section.get("stage2_fingerprint") != config.get("stage2", {}).get("fingerprint"):
        raise AweError(f"{model_dir}: the AWE model was trained on another G; run `awe retrain`")
    try:
        model = AffinityWsabie(ModelShape(**section["model"]), float(section["bias"]),
                               label_bias=0.0 if section.get("label_bias") else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise AweError(f"{model_dir / artifacts.CONFIG}: the stage3 section is damaged ({exc}); "
                       f"run `awe retrain` again") from exc
    path = model_dir / artifacts.AWE_WEIGHTS
    from safetensors import safe_open

    tensors = artifacts.read_tensors(path)
    with safe_open(str(path), "pt") as fh:
        fingerprint = (fh.metadata() or {}).get("fingerprint")
    if fingerprint != section.get("fingerprint"):
        raise AweError(f"{path}: does not match config.json (an interrupted run?); run "
                       f"`awe retrain` again")
    try:
        model.load_tensors(tensors)
    except (KeyError, ValueError) as exc:
        raise AweError(f"{path}: damaged or from another model ({exc}); run `awe retrain` "
                       f"again") from exc
    model.eval()
    return model
