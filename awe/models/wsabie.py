"""The Wsabie embedding model f(x, y) = (x U) . V_y, and its persistence.

Dense inputs multiply a dense U (n_features x D); sparse inputs (ids with values) sum rows of U in
an ``EmbeddingBag``; labels are rows of V (an ``Embedding``). Large tables get sparse gradients, so
a step touches only the rows it uses. Stage 3 (AWE) reuses this module and multiplies its scores
by the affinity weights G.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from awe.csr import Csr
from awe.io.reader import Examples
from awe.ranking.dots import gathered_dots
from awe.ranking.topk import CandidateScores
from awe.training.optim import project_to_ball_, renorm_rows


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
        project_to_ball_(self.U.weight, max_norm, dim=0)

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
