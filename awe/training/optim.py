"""Adagrad and SGD on the rows of an embedding table, from per-row gradients.

The WARP step computes its gradients analytically (``awe.warp.warp_gradients``): a gradient for
each (row, vector) pair it touched, rows possibly repeated. :class:`RowOptimizer` sums the
gradients of repeated rows and applies torch's update on exactly those rows:

- Adagrad: ``acc += g * g``; ``w -= lr * g / (sqrt(acc) + eps)`` (torch.optim.Adagrad with
  lr_decay 0, initial accumulator 0, eps 1e-10);
- SGD: ``w -= lr * g``;

and optionally projects the updated rows onto the ball of radius ``max_norm`` (the paper's
regulariser). Rows without a gradient do not move, as with torch's optimizers.

Small tables keep a dense gradient buffer and update the whole table in a few fused passes (fewer
operations per step); large ones update only the touched rows (memory and work follow the rows a
step touches).
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adagrad", "sgd")
EPS = 1e-10  # torch.optim.Adagrad's default


class RowOptimizer:
    """Adagrad or SGD state for one table (rows x D), updated from row gradients."""

    def __init__(self, weight: torch.Tensor, kind: str, lr: float, dense: bool):
        if kind not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer '{kind}'")
        self.weight, self.kind, self.lr, self.dense = weight, kind, lr, dense
        self.sum = torch.zeros_like(weight) if kind == "adagrad" else None
        self.grad = torch.zeros_like(weight) if dense else None
        self.touched = (torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
                        if dense else None)
        # torch.optim.Adagrad(fused=True)'s one-pass kernel (CPU); the step count only matters
        # with lr_decay, which we do not use
        self._fused = getattr(torch, "_fused_adagrad_", None) if weight.is_cpu else None
        self._step = torch.zeros((), device=weight.device)

    def state(self) -> dict[str, torch.Tensor]:
        """The optimizer's state (checkpoints): Adagrad's accumulator and step count."""
        state = {"step": self._step}
        if self.sum is not None:
            state["sum"] = self.sum
        return state

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state` in place (the tensors keep their identity)."""
        self._step.copy_(state["step"])
        if self.sum is not None:
            if state["sum"].shape != self.sum.shape:
                raise ValueError(f"optimizer state of shape {tuple(state['sum'].shape)}, "
                                 f"expected {tuple(self.sum.shape)}")
            self.sum.copy_(state["sum"])

    @torch.no_grad()
    def step_rows(self, rows: torch.Tensor, grads: torch.Tensor,
                  max_norm: float | None = None) -> None:
        """Apply the gradients ``grads`` [N, D] of rows ``rows`` [N] (repeats are summed)."""
        if rows.numel() == 0:
            return
        w = self.weight
        if self.dense:
            g = self.grad.zero_().index_add_(0, rows, grads)
            self._update(w, g, self.sum)
            if max_norm is not None:  # the touched rows only, in one pass over the table
                self._project(self.touched.zero_().index_fill_(0, rows, True), max_norm)
            return
        uniq, inverse = torch.unique(rows, return_inverse=True)
        g = grads.new_zeros(uniq.numel(), w.shape[1]).index_add_(0, inverse, grads)
        part = w.index_select(0, uniq)
        if self.sum is not None:
            acc = self.sum.index_select(0, uniq).addcmul_(g, g)
            self.sum.index_copy_(0, uniq, acc)
            part.addcdiv_(g, acc.sqrt_().add_(EPS), value=-self.lr)
        else:
            part.add_(g, alpha=-self.lr)
        if max_norm is not None:
            project_to_ball_(part, max_norm)
        w.index_copy_(0, uniq, part)

    @torch.no_grad()
    def step_dense(self, grad: torch.Tensor) -> None:
        """Apply a gradient for the whole table."""
        self._update(self.weight, grad, self.sum)

    @torch.no_grad()
    def step_table(self, grad: torch.Tensor, touched: torch.Tensor,
                   max_norm: float | None = None) -> None:
        """Apply a whole-table gradient ``grad`` (zero on rows without one: e.g. the row
        gradients of several processes, summed) and project the rows where ``touched`` (bool
        [rows]) is set. The same update as :meth:`step_rows` of those row gradients, on either
        table size (a large table pays a pass over all of it)."""
        self._update(self.weight, grad, self.sum)
        if max_norm is not None:
            self._project(touched, max_norm)

    def _project(self, touched: torch.Tensor, max_norm: float) -> None:
        project_to_ball_(self.weight, max_norm, where=touched)

    def _update(self, w: torch.Tensor, g: torch.Tensor, acc: torch.Tensor | None) -> None:
        if acc is None:
            w.add_(g, alpha=-self.lr)
        elif self._fused is not None and w.is_contiguous() and g.is_contiguous():
            self._fused([w], [g], [acc], [self._step], lr=self.lr, lr_decay=0.0,
                        weight_decay=0.0, eps=EPS, maximize=False)
        else:
            acc.addcmul_(g, g)
            w.addcdiv_(g, acc.sqrt().add_(EPS), value=-self.lr)


def renorm_rows(weight: torch.Tensor, rows: torch.Tensor | None, max_norm: float) -> None:
    """Project ``rows`` of ``weight`` onto the ball of radius ``max_norm``, in place."""
    if rows is None or rows.numel() == 0:
        return
    # duplicate rows get identical values, so index_copy_ stays deterministic without unique()
    weight.index_copy_(0, rows, project_to_ball_(weight.index_select(0, rows), max_norm))


def project_to_ball_(weight: torch.Tensor, max_norm: float, dim: int = 1,
                     where: torch.Tensor | None = None) -> torch.Tensor:
    """Scale every row (``dim=1``; ``dim=0``: every column) of ``weight`` to norm <= ``max_norm``,
    in place: the paper's max-norm regulariser. ``where`` (bool, one per row): only those rows."""
    scale = max_norm / weight.norm(dim=dim, keepdim=True).clamp_(min=max_norm)
    if where is not None:
        scale.masked_fill_(~where.view(scale.shape), 1.0)
    return weight.mul_(scale)
