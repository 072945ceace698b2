"""One training loop for both stages: WARP over positive pairs, batched, with validation.

Stage 1 (Wsabie) and stage 3 (AWE) differ only in the model's scores (AWE multiplies by the affinity
weights G), so :func:`fit` takes any :class:`Wsabie`; a subclass supplies the per-pair multiplier
through ``pair_weight``. The WARP gradients are computed in closed form (``warp_gradients``) and
applied to the touched rows by :class:`awe.optim.RowOptimizer`: no autograd in the loop.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from . import artifacts
from . import distributed as dist_lib
from .affinity import AFFINITY_FILE, INDEX_FILE
from .checkpoint import Checkpoint, FitState
from .data import TASKS, Columns, Examples, load_examples, scan
from .distributed import World, rank_share
from .errors import AweError, TrainingDiverged
from .evaluate import SCORES_PER_BATCH, evaluate
from .model import Inputs, ModelShape, Wsabie, batch_inputs, save_wsabie
from .optim import OPTIMIZERS, RowOptimizer
from .stream import ShuffleStream
from .warp import (
    RANK_WEIGHTS,
    PositiveSet,
    estimate_rank,
    rank_weight_table,
    sample_violators,
    sample_violators_from_table,
    uniform_draws,
    warp_gradients,
)


@dataclass(frozen=True)
class TrainConfig:
    """Every hyper-parameter of a training stage; saved in config.json and used to rebuild."""

    dim: int = 64
    epochs: int = 60
    lr: float = 0.05
    negatives: int = 100  # K: draws per positive pair (the WARP sampling budget)
    margin: float = 1.0
    rank_weight: str = "harmonic"
    optimizer: str = "adagrad"
    # project rows of U and V to norm <= C (the paper's regulariser); "auto": 1.5 for
    # recommendation (identity inputs overfit without it), none for annotation
    max_norm: float | str | None = "auto"
    weight_decay: float = 0.0  # L2 on the rows a step touches
    # positive pairs per step; "auto": 2048 for recommendation (many pairs per row, speed),
    # 1024 for annotation (fewer pairs per epoch: more steps measured better on Fashion-MNIST)
    batch_size: int | str = "auto"
    init_scale: float = 0.1  # |x U| at the start, for x of the rows' RMS norm (model.Wsabie)
    task: str | None = None  # None: from the data's metadata (awe data), else annotation
    valid_fraction: float = 0.0
    valid_k: int | None = None  # P@k picking the best epoch: 1 (annotation), 10 (recommendation)
    patience: int = 10
    refit: bool = True  # after picking the epoch on a held-out fraction, retrain on all rows
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    # stream the training files through a shuffle buffer of this many rows (None: load them)
    shuffle_buffer: int | None = None

    def __post_init__(self):
        checks = [
            (self.dim >= 1, "--dim must be >= 1"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "--lr must be a positive number"),
            (self.negatives >= 1, "--negatives must be >= 1"),
            (self.margin >= 0, "--margin must be >= 0"),
            (self.rank_weight in RANK_WEIGHTS, f"--rank-weight must be one of {RANK_WEIGHTS}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}"),
            (self.max_norm in (None, "auto") or float(self.max_norm) > 0,
             "--max-norm must be positive"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.batch_size == "auto" or int(self.batch_size) >= 1,
             "--batch-size must be >= 1"),
            (0 <= self.valid_fraction < 1, "--valid-fraction must be in [0, 1)"),
            (self.patience >= 1, "--patience must be >= 1"),
            (self.task in (None, *TASKS),
             "--task must be annotation or recommendation"),
            (self.shuffle_buffer is None or int(self.shuffle_buffer) >= 1,
             "--shuffle-buffer must be >= 1 row"),
        ]
        for ok, message in checks:
            if not ok:
                raise AweError(message)

    def resolved(self, task: str | None, device: str) -> TrainConfig:
        """Fill the data-dependent defaults: task, device and the max-norm."""
        task = self.task or task or "annotation"
        max_norm = self.max_norm
        if max_norm == "auto":
            max_norm = 1.5 if task == "recommendation" else None
        batch_size = self.batch_size
        if batch_size == "auto":
            batch_size = 2048 if task == "recommendation" else 1024
        return replace(self, task=task, device=device, batch_size=int(batch_size),
                       max_norm=None if max_norm is None else float(max_norm))

    @property
    def selection_k(self) -> int:
        return self.valid_k or (10 if self.task == "recommendation" else 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    best_metrics: dict[str, float]
    seconds: float


HISTORY_KS = (1, 3, 5, 10)


def resolve_device(requested: str | None) -> str:
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise AweError("--device cuda: torch sees no CUDA device; use --device cpu")
    if requested not in ("cpu", "cuda"):
        raise AweError(f"--device must be cpu or cuda, not '{requested}'")
    return requested


def fit(model: Wsabie, train: Examples | ShuffleStream, config: TrainConfig,
        valid: Examples | None = None, progress: bool = False,
        checkpoint: Checkpoint | None = None, world: World | None = None) -> FitResult:
    """Train ``model`` in place with batched WARP; keep the best epoch on ``valid`` (if given).

    ``train``: rows in memory, or a :class:`~awe.stream.ShuffleStream` read an epoch at a time.
    With ``checkpoint``, the state is written every ``checkpoint.every`` batches and at the end of
    every epoch, and a checkpoint saved at the current position is continued from: the result is
    bit-identical to an uninterrupted run.

    ``world`` (default: the initialised process group, if any): with several processes, each
    trains on its share of every epoch (its ``batch_size / size`` pairs of each step's batch, or,
    streaming, its shards), the gradients are summed over the processes before every update, so
    the parameters stay identical on all of them, and rank 0 validates, broadcasting the result.
    Every rank must call ``fit`` with the same model, data and config.
    """
    world = world or dist_lib.current()
    streaming = isinstance(train, ShuffleStream)
    config = config.resolved(train.task, resolve_device(config.device))
    device = torch.device(config.device)
    model.to(device)
    keep_freed_memory()
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    # the epoch's order comes from ``generator``, the same on every rank; the negatives from a
    # generator of the rank's own (one process: the same generator, as it always was)
    draw_generator = generator if not world.distributed else torch.Generator(
        device="cpu").manual_seed(_rank_seed(config.seed, world.rank))
    n_labels = model.shape.n_labels
    rank_weights = rank_weight_table(n_labels, config.rank_weight).to(device)
    draw = uniform_draws(n_labels, draw_generator, device)
    # pairs per step on this rank: together the ranks take one batch of --batch-size pairs a step
    batch_size = math.ceil(config.batch_size / world.size)
    if streaming:  # the positives and their counts are set per block
        if world.distributed:
            train = train.for_rank(world.rank, world.size)
        step = _WarpStep(model, config, None, draw, rank_weights, None, world,
                         draw_generator)
        n_batches = max(1, math.ceil(len(train) / world.size / batch_size))  # progress bar
        n_pairs = 0
    else:
        model.bind(train)
        pair_rows = torch.from_numpy(train.labels.row_of_entry())
        pair_labels = torch.from_numpy(train.labels.indices)
        pair_rows, pair_labels = _learnable(model, pair_rows, pair_labels, device)
        n_pairs = len(pair_rows)
        if n_pairs == 0:
            raise AweError("the training data has no labels")
        step = _WarpStep(model, config, PositiveSet(train.labels, n_labels, device), draw,
                         rank_weights, torch.from_numpy(n_labels - train.labels.lengths).to(device),
                         world, draw_generator)
        share = rank_share(n_pairs, world)
        n_batches = math.ceil(len(range(n_pairs)[share]) / batch_size)
    world.check_agree("the training rows, pairs, model shape or options",
                      [len(train), n_pairs, *astuple(model.shape),
                       config.batch_size, config.seed, config.epochs])

    run = _FitProgress(model, step, generator, checkpoint, config, draw_generator, world)
    started = time.perf_counter()
    bar = _Progress(progress and world.is_main, config.epochs, n_batches,
                    first_epoch=run.epochs_done + 1)
    with bar, _small_problem_threads(batch_size * model.shape.dim, device):
        for epoch in range(run.epochs_done + 1, config.epochs + 1):
            if run.stopped:
                break
            t0 = time.perf_counter()
            skip = run.batch
            if not skip:
                run.loss_sum, run.violators, run.pairs = 0.0, 0, 0
            if streaming:
                batches = _stream_batches(train, epoch, model, step, batch_size, device, skip)
                if world.distributed:  # the ranks' streams differ in length
                    batches = _until_all_done(batches, world)
            else:
                if skip:  # resumed inside this epoch: its order from the generator at its start
                    current = generator.get_state()
                    generator.set_state(run.epoch_rng)
                    order = torch.randperm(n_pairs, generator=generator)
                    generator.set_state(current)
                else:
                    run.epoch_rng = generator.get_state()
                    order = torch.randperm(n_pairs, generator=generator)
                if world.distributed:
                    order = order[share]
                batches = _batches(train, pair_rows[order], pair_labels[order], batch_size,
                                   device, skip=skip)
            model.train()
            for batch_no, batch in enumerate(batches, start=skip):
                done = step(*(batch or (None, None, None)))
                bar.advance()
                run.pairs += step.pairs
                if done is not None:
                    loss, n_violators = done
                    if not math.isfinite(loss):
                        raise TrainingDiverged(_divergence_advice(epoch, batch_no, config,
                                                                  checkpoint))
                    run.loss_sum += loss
                    run.violators += n_violators
                # (in memory, an epoch's last batch is followed by the epoch's checkpoint)
                if run.every and (batch_no + 1) % run.every == 0 and (
                        streaming or batch_no + 1 < n_batches):
                    run.batch = batch_no + 1
                    run.save(epoch, batch_no + 1, started)
            run.batch = 0
            if run.pairs == 0:
                raise AweError("the training data has no labels")
            if not model.weights_finite():
                raise TrainingDiverged(_divergence_advice(epoch, None, config, checkpoint))
            row = {"epoch": epoch, "loss": run.loss_sum / run.pairs,
                   "violating": run.violators / run.pairs, "seconds": time.perf_counter() - t0}
            if valid is not None and len(valid):
                metrics = None
                if world.is_main:  # the parameters are the same on every rank
                    model.bind(valid)
                    metrics = evaluate(lambda ex, r: scores_for_rows(model, ex, r, device), valid,
                                       sorted({*HISTORY_KS, config.selection_k}),
                                       batch_rows=_valid_batch_rows(n_labels, streaming))
                    if not streaming:
                        model.bind(train)
                metrics = world.broadcast_object(metrics)
                row.update({f"valid_{k}": v for k, v in metrics.items() if k.startswith("P@")})
                score = metrics[f"P@{config.selection_k}"]
                if score > run.best_score:
                    run.best_score, run.best_epoch, run.best_metrics = score, epoch, metrics
                    run.best_state = copy.deepcopy(model.state_dict())
                    run.without_gain = 0
                else:
                    run.without_gain += 1
            else:
                run.best_epoch = epoch
            run.history.append(row)
            run.stopped = valid is not None and run.without_gain >= config.patience
            run.epochs_done = epoch
            run.save(epoch, 0, started)
            bar.epoch_done(row, config.selection_k)
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    if world.distributed:  # summed gradients keep them identical; a difference is a bug
        world.check_agree("the trained parameters", _parameter_digest(model))
    history = copy.deepcopy(run.history)
    for row in history:
        row["best"] = row["epoch"] == run.best_epoch
    return FitResult(history, run.best_epoch, run.best_metrics,
                     run.seconds + time.perf_counter() - started)


def _valid_batch_rows(n_labels: int, streaming: bool) -> int:
    """Validation rows a batch: when streaming (memory bounded) the batch shrinks with the labels
    (SCORES_PER_BATCH); in memory it stays 2048, as another batching could change the metrics'
    float sums and the in-memory results stay as they were."""
    if not streaming:
        return 2048
    return int(min(2048, max(64, SCORES_PER_BATCH // max(n_labels, 1))))


def _learnable(model: Wsabie, pair_rows: torch.Tensor, pair_labels: torch.Tensor,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive pairs a step can learn from (bound rows): stage 3 drops those of weight 0,
    whose score is 0 whatever the model."""
    weight = model.pair_weight(pair_labels.to(device), pair_rows.to(device))
    if weight is None:
        return pair_rows, pair_labels
    learnable = (weight != 0).cpu()
    return pair_rows[learnable], pair_labels[learnable]


def _stream_batches(stream: ShuffleStream, epoch: int, model: Wsabie, step: _WarpStep,
                    batch_size: int, device: torch.device, skip: int = 0):
    """The batches of a streamed epoch: per block of the shuffle buffer, bind its rows (stage 3's
    G), point the step at its positives, and cut its pairs, in their seeded order, into batches.
    ``skip``: batches already trained (a resumed epoch); the blocks before are read again but not
    trained on (the stream is a function of the seed and the epoch)."""
    n_labels = model.shape.n_labels
    done = 0
    for block_no, block in enumerate(stream.blocks(epoch)):
        model.bind(block)
        pair_rows, pair_labels = _learnable(model, torch.from_numpy(block.labels.row_of_entry()),
                                            torch.from_numpy(block.labels.indices), device)
        n = len(pair_rows)
        n_batches = math.ceil(n / batch_size)
        if done + n_batches <= skip:
            done += n_batches
            continue
        step.positive_set = PositiveSet(block.labels, n_labels, device)
        step.n_negatives_of_row = torch.from_numpy(n_labels - block.labels.lengths).to(device)
        order = torch.from_numpy(stream.pair_order(epoch, block_no, n))
        yield from _batches(block, pair_rows[order], pair_labels[order], batch_size, device,
                            skip=max(0, skip - done))
        done += n_batches


def _rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank's negative draws: its own stream, a function of (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])


def _until_all_done(batches, world: World):
    """This rank's batches, then None (a step without pairs) until every rank has run out: the
    ranks take the same number of steps, so their all-reduces pair up (a streamed rank's shards
    hold another number of pairs than the others'). One flag all-reduce a step."""
    batches = iter(batches)
    flag = torch.zeros(1, dtype=torch.float32)
    while True:
        batch = next(batches, None)
        flag.fill_(batch is not None)
        if not world.all_reduce_(flag).item():
            return
        yield batch


def _parameter_digest(model: Wsabie) -> list[float]:
    """The bytes of every parameter, hashed (the first 48 bits of SHA-256: exact in a float64)."""
    from .checkpoint import tensor_digest

    return [float(int(tensor_digest(p.detach().cpu().numpy())[:12], 16))
            for p in model.parameters()]


class _FitProgress:
    """fit's position and bookkeeping: restored from a checkpoint, saved into one."""

    def __init__(self, model: Wsabie, step: _WarpStep, generator: torch.Generator,
                 checkpoint: Checkpoint | None, config: TrainConfig,
                 draw_generator: torch.Generator | None = None,
                 world: World = dist_lib.SINGLE):
        self.model, self.step, self.generator = model, step, generator
        self.draw_generator = draw_generator or generator
        self.world = world
        self.checkpoint, self.config = checkpoint, config
        self.every = checkpoint.every if checkpoint is not None else 0
        self.epochs_done, self.batch, self.loss_sum, self.violators, self.pairs = 0, 0, 0.0, 0, 0
        self.history: list[dict] = []
        self.best_score, self.best_epoch, self.best_metrics = -1.0, 0, {}
        self.best_state: dict | None = None
        self.without_gain, self.stopped, self.seconds = 0, False, 0.0
        self.epoch_rng = generator.get_state()
        state = checkpoint.restore() if checkpoint is not None else None
        if state is not None:
            self._restore(state)

    def _restore(self, state: FitState) -> None:
        t = state.tensors
        try:
            self.model.load_state_dict(_section(t, "model/"))
            self.step.load_state(_section(t, "opt/"))
            self.generator.set_state(t["rng/current"])
            if self.world.distributed:  # every rank's own draws: see save()
                self.draw_generator.set_state(t[f"rng/draws{self.world.rank}"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise AweError(f"{self.checkpoint.path}: does not fit this model ({exc}); train "
                           f"without --resume") from exc
        self.epoch_rng = t["rng/epoch"]
        self.best_state = _section(t, "best/") or None
        self.epochs_done, self.batch = state.epochs_done, state.batch
        self.loss_sum, self.violators, self.pairs = state.loss_sum, state.violators, state.pairs
        self.history, self.best_score = state.history, state.best_score
        self.best_epoch, self.best_metrics = state.best_epoch, state.best_metrics
        self.without_gain, self.stopped, self.seconds = (state.without_gain, state.stopped,
                                                         state.seconds)

    def save(self, epoch: int, batch: int, started: float) -> None:
        """Checkpoint after ``batch`` batches of ``epoch`` (0: at its end), if checkpointing."""
        if self.checkpoint is None:
            return
        if not self.model.weights_finite():  # never overwrite the last good checkpoint
            raise TrainingDiverged(_divergence_advice(epoch, batch or None, self.config,
                                                      self.checkpoint))
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"opt/{k}": v for k, v in self.step.state().items()})
        tensors["rng/current"] = self.generator.get_state()
        if self.world.distributed:  # every rank draws its own negatives; rank 0 writes them all
            states = self.world.all_gather(self.draw_generator.get_state())
            tensors.update({f"rng/draws{r}": state for r, state in enumerate(states)})
        tensors["rng/epoch"] = self.epoch_rng
        if self.best_state is not None:
            tensors.update({f"best/{k}": v for k, v in self.best_state.items()})
        self.checkpoint.save(FitState(
            epochs_done=epoch if batch == 0 else epoch - 1, batch=batch, loss_sum=self.loss_sum,
            violators=self.violators, pairs=self.pairs, history=self.history,
            best_score=self.best_score, best_epoch=self.best_epoch, best_metrics=self.best_metrics,
            without_gain=self.without_gain, stopped=self.stopped,
            seconds=self.seconds + time.perf_counter() - started, tensors=tensors))


def _section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def scores_for_rows(model: Wsabie, examples: Examples, rows: np.ndarray,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Scores of every label for ``rows`` of ``examples``, [B, L], or for stage 3 the
    :class:`~awe.evaluate.CandidateScores` that rank them (G's labels first: 20 of 21k labels
    scored instead of all)."""
    model.eval()
    with torch.no_grad():
        e = model.embed(batch_inputs(examples, rows, device))
        rows = torch.from_numpy(np.asarray(rows)).to(device)
        candidates = model.candidate_scores(e, rows)
        return model.all_scores(e, rows) if candidates is None else candidates


# WARP's draws per positive come in blocks of 8, then x growth (see docs/decisions.md)
WARP_FIRST_BLOCK, WARP_GROWTH = 8, 2
# Score each batch row against every label up front when labels <= this x the draw budget.
FULL_TABLE_LABELS_PER_DRAW = 1
# With the table, draw WARP's outcome from its exact law (warp.sample_violators_from_table)
# instead of drawing labels one block at a time: the same distribution, ~5x less sampling time
EXACT_TABLE_SAMPLING = True


class _WarpStep:
    """One WARP step on a batch of positive pairs: sample violators, closed-form gradients,
    Adagrad/SGD on the touched rows, projection onto the max-norm ball."""

    def __init__(self, model: Wsabie, config: TrainConfig, positive_set: PositiveSet, draw,
                 rank_weights: torch.Tensor, n_negatives_of_row: torch.Tensor,
                 world: World = dist_lib.SINGLE, generator: torch.Generator | None = None):
        self.model, self.config, self.world = model, config, world
        self.generator = generator  # the draws' (the table sampler's random numbers)
        self.positive_set, self.draw = positive_set, draw
        self.rank_weights, self.n_negatives_of_row = rank_weights, n_negatives_of_row
        self.n_labels = model.shape.n_labels
        dense = not getattr(model.V, "sparse", False)
        self.v_opt = RowOptimizer(model.V.weight.data, config.optimizer, config.lr, dense)
        dense = not getattr(model.U, "sparse", False)
        self.u_opt = RowOptimizer(model.U.weight.data, config.optimizer, config.lr, dense)
        offset = getattr(model, "label_bias", None)  # stage 3's beta_y: a table of width 1
        self.offset_opt = None if offset is None else RowOptimizer(
            offset.data.view(-1, 1), config.optimizer, config.lr, True)
        self.reduced = _ReducedGradients(model) if world.distributed else None
        self.pairs = 0  # of the last step

    def state(self) -> dict[str, torch.Tensor]:
        """The optimizers' state, for checkpoints."""
        opts = {"u": self.u_opt, "v": self.v_opt, "offset": self.offset_opt}
        return {f"{name}.{k}": v for name, opt in opts.items() if opt is not None
                for k, v in opt.state().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        opts = {"u": self.u_opt, "v": self.v_opt, "offset": self.offset_opt}
        for name, opt in opts.items():
            if opt is not None:
                opt.load_state({k[len(name) + 1:]: v for k, v in state.items()
                                if k.startswith(f"{name}.")})

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor | None, positives: torch.Tensor | None,
                 inputs: Inputs | None) -> tuple[float, int] | None:
        """Returns (loss, number of pairs with a violator), or None when no pair has one; sets
        :attr:`pairs`, the step's pairs. With several processes, all three count every rank's
        part of the step, and ``rows`` None is a step of this rank without pairs (it still
        takes the others' update)."""
        grads = None if rows is None else self._gradients(rows, positives, inputs)
        if self.reduced is not None:
            return self._apply_reduced(0 if rows is None else rows.numel(), grads)
        self.pairs = rows.numel()
        if grads is None:
            return None
        loss, labels, grad_v, grad_offsets, u_rows, grad_u = grads
        config, model = self.config, self.model
        loss, n_sel = float(loss), labels.numel() // 2
        if not math.isfinite(loss):
            return loss, n_sel
        self.v_opt.step_rows(labels, grad_v, config.max_norm)
        if self.offset_opt is not None:
            self.offset_opt.step_rows(labels, grad_offsets.reshape(-1, 1))
        if u_rows is not None:
            self.u_opt.step_rows(u_rows, grad_u, config.max_norm)
        else:
            self.u_opt.step_dense(grad_u)
            if config.max_norm is not None:
                model.project_dense_u(config.max_norm)
        return loss, n_sel

    def _apply_reduced(self, n_pairs: int, grads) -> tuple[float, int] | None:
        """Sum every rank's gradients (one all-reduce), then take the same update on all."""
        config, model, buf = self.config, self.model, self.reduced
        buf.flat.zero_()
        if grads is not None:
            loss, labels, grad_v, grad_offsets, u_rows, grad_u = grads
            buf.v.index_add_(0, labels, grad_v)
            buf.v_touched.index_fill_(0, labels, 1.0)
            if buf.offset is not None:
                buf.offset.index_add_(0, labels, grad_offsets.reshape(-1))
            if u_rows is None:
                buf.u.copy_(grad_u)
            else:
                buf.u.index_add_(0, u_rows, grad_u)
                buf.u_touched.index_fill_(0, u_rows, 1.0)
            buf.stats[0], buf.stats[1] = loss, labels.numel() // 2
        buf.stats[2] = n_pairs
        self.world.all_reduce_(buf.flat)
        loss, n_sel, n_pairs = buf.stats.tolist()
        n_sel, self.pairs = int(n_sel), int(n_pairs)
        if n_sel == 0:
            return None
        if not math.isfinite(loss):  # any rank's: every rank stops at the same step
            return loss, n_sel
        self.v_opt.step_table(buf.v, buf.v_touched > 0, config.max_norm)
        if self.offset_opt is not None:
            self.offset_opt.step_table(buf.offset.view(-1, 1), buf.v_touched > 0)
        if buf.u_touched is not None:
            self.u_opt.step_table(buf.u, buf.u_touched > 0, config.max_norm)
        else:
            self.u_opt.step_dense(buf.u)
            if config.max_norm is not None:
                model.project_dense_u(config.max_norm)
        return loss, n_sel

    def _gradients(self, rows: torch.Tensor, positives: torch.Tensor, inputs: Inputs):
        """The batch's WARP loss and row gradients: (loss, labels [2S] (the S positives, then
        their violators), dL/dV of those rows, dL/d beta of them, rows of U (None: dense U),
        dL/dU), or None when no pair has a violator."""
        model, config = self.model, self.config
        n = rows.numel()
        e = model.embed(inputs)
        sampled = None
        if self.n_labels <= config.negatives * FULL_TABLE_LABELS_PER_DRAW:
            # few labels: every pair's score against every label is one GEMM, cheaper than
            # gathering V rows for up to `negatives` draws (Fashion-MNIST: 10 labels, 100 draws)
            table = model.pair_score_table(e, rows)

            def score(active, labels):
                return (table if active.numel() == n
                        else table.index_select(0, active)).gather(1, labels)
            positive_scores = table.gather(1, positives.unsqueeze(1)).squeeze(1)
            if EXACT_TABLE_SAMPLING:
                own = self.positive_set.contains(
                    rows, torch.arange(self.n_labels, device=rows.device).expand(n, -1))
                sampled = sample_violators_from_table(positive_scores, table, own,
                                                      config.negatives, config.margin,
                                                      self.generator)
        else:
            def score(active, labels):  # active: a sorted subset of 0..n-1, all of it when full
                if active.numel() == n:
                    return model.pair_scores(e, labels, rows)
                return model.pair_scores(e.index_select(0, active), labels,
                                         rows.index_select(0, active))
            positive_scores = model.pair_scores(e, positives, rows)

        def is_positive(active, labels):
            return self.positive_set.contains(rows if active.numel() == n
                                              else rows.index_select(0, active), labels)

        if sampled is None:
            sampled = sample_violators(positive_scores, self.draw, score, is_positive,
                                       config.negatives, config.margin, WARP_FIRST_BLOCK,
                                       WARP_GROWTH)
        found, negatives, n_draws = sampled
        sel = found.nonzero().squeeze(1)
        n_sel = sel.numel()
        if n_sel == 0:
            return None
        rows_sel = rows.index_select(0, sel)
        # the positive's label, the violator's
        labels = torch.cat((positives.index_select(0, sel), negatives.index_select(0, sel)))
        v_matrix = model.v_matrix()
        v = v_matrix.index_select(0, labels).view(2, n_sel, -1)
        multipliers = model.pair_weight(labels.view(2, n_sel).T, rows_sel)
        if multipliers is not None:
            multipliers = multipliers.T
        ranks = estimate_rank(self.n_negatives_of_row.index_select(0, rows_sel),
                              n_draws.index_select(0, sel))
        phi = self.rank_weights.index_select(0, ranks.clamp_(max=self.n_labels))
        offsets = model.pair_offset(labels)
        loss, grad_e_sel, grad_v, grad_offsets = warp_gradients(
            e.index_select(0, sel), v, phi, config.margin, multipliers,
            None if offsets is None else offsets.view(2, n_sel))
        grad_v = grad_v.view(2 * n_sel, -1)
        grad_e = e.new_zeros(e.shape).index_add_(0, sel, grad_e_sel)
        u_rows, grad_u = model.u_gradient(inputs, grad_e)
        if config.weight_decay:  # lazy L2 on the rows this step touches (LightFM's way)
            wd = config.weight_decay
            v = v.view(2 * n_sel, -1)
            u = model.U.weight if u_rows is None else model.U.weight.index_select(0, u_rows)
            loss = loss + 0.5 * wd * (v.pow(2).sum() + u.pow(2).sum())
            grad_v = grad_v.add(v, alpha=wd)
            grad_u = grad_u.add(u, alpha=wd)
        return loss, labels, grad_v, grad_offsets, u_rows, grad_u


class _ReducedGradients:
    """One flat buffer holding a step's whole-table gradients, for one all-reduce a step.

    Its views: the gradient of U (as ``U.weight`` stores it) and of V, of beta (if the model has
    one), which rows of U (sparse inputs) and of V some rank touched (the max-norm projection's
    rows), and the step's loss, violators and pairs. Dense, so its size is the model's, whatever
    a step touches (docs/decisions.md has the cost).
    """

    def __init__(self, model: Wsabie):
        u, v = model.U.weight, model.V.weight
        sparse_u = model.shape.sparse_input
        beta = getattr(model, "label_bias", None)
        sizes = [u.numel(), v.numel(), 0 if beta is None else v.shape[0],
                 u.shape[0] if sparse_u else 0, v.shape[0], 3]
        self.flat = torch.zeros(sum(sizes), dtype=v.dtype, device=v.device)
        parts = list(torch.split(self.flat, sizes))
        self.u, self.v = parts[0].view(u.shape), parts[1].view(v.shape)
        self.offset = parts[2] if beta is not None else None
        self.u_touched = parts[3] if sparse_u else None
        self.v_touched, self.stats = parts[4], parts[5]


# Below this many elements in a step's [batch, dim] tensors, fit runs on one intra-op thread
# (see docs/decisions.md)
STEP_PARALLEL_MIN = 1 << 20


@contextlib.contextmanager
def _small_problem_threads(batch_elements: int, device: torch.device):
    """One intra-op thread for all of fit when its steps are small, the caller's otherwise.

    Every torch op on a multi-thread CPU is a fork/join of the thread pool; a small step runs a
    few dozen ops of a few hundred KiB, which gain little from a second thread and stall whenever
    a core is busy elsewhere (ML100K at 2 threads on a loaded 2-core machine: 0.4-10 s an epoch
    instead of 40 ms). Switched once per fit: the first parallel op after a switch costs ~50 ms.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or batch_elements >= STEP_PARALLEL_MIN:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """Keep freed memory in the process instead of handing it back to the OS (glibc only).

    A training step allocates and frees a few MiB of tensors; with glibc's defaults the top of
    the heap is trimmed and large blocks are mmapped, so every step page-faults its temporaries
    in again (ML100K, 1 thread: 58-100 ms an epoch, 37 ms without the faults). Raising the mmap
    and trim thresholds keeps them mapped; the cost is that the process keeps up to 256 MiB of
    freed memory. Once per process.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 64 << 20)
    mallopt(m_trim_threshold, 256 << 20)


def _batches(train: Examples, rows: torch.Tensor, labels: torch.Tensor, batch_size: int,
             device: torch.device, chunk_batches: int = 32, skip: int = 0):
    """(rows, positive labels, inputs) of every batch of an epoch's pairs, on ``device``.

    Inputs are gathered a chunk of batches at a time (few numpy <-> torch round trips per step,
    memory bounded by the chunk). ``skip``: start after that many batches (a resumed epoch); the
    chunks stay where they were, so the batches are the very same tensors.
    """
    n = rows.numel()
    chunk = batch_size * chunk_batches
    dense = None if train.dense is None else torch.from_numpy(train.dense)
    for c0 in range(skip // chunk_batches * chunk, n, chunk):
        first = max(0, skip * batch_size - c0)  # pairs of this chunk trained before the resume
        c_rows = rows[c0:c0 + chunk]
        d_rows, d_labels = c_rows.to(device), labels[c0:c0 + chunk].to(device)
        m = c_rows.numel()
        if dense is not None:
            for s in range(first, m, batch_size):
                x = Inputs(dense=dense.index_select(0, c_rows[s:s + batch_size]).to(device))
                yield d_rows[s:s + batch_size], d_labels[s:s + batch_size], x
            continue
        part = train.sparse.take(c_rows.numpy())
        lengths = part.lengths
        unit = part.values is None or bool((part.values == 1).all())
        single = unit and bool((lengths == 1).all())
        ids = torch.from_numpy(part.indices).to(device)
        values = None if unit else torch.from_numpy(part.values).to(device)
        bags = None if single else torch.from_numpy(part.row_of_entry()).to(device)
        indptr = torch.from_numpy(part.indptr).to(device)
        for s in range(first, m, batch_size):
            t = min(s + batch_size, m)
            lo, hi = int(part.indptr[s]), int(part.indptr[t])
            x = Inputs(ids=ids[lo:hi], offsets=indptr[s:t] - lo,
                       weights=None if values is None else values[lo:hi],
                       bags=None if bags is None else bags[lo:hi] - s, single=single)
            yield d_rows[s:t], d_labels[s:t], x


def _divergence_advice(epoch: int, batch: int | None, config: TrainConfig,
                      checkpoint: Checkpoint | None = None) -> str:
    where = f"epoch {epoch}" + (f", batch {batch}" if batch is not None else "")
    kept = ""
    if checkpoint is not None and checkpoint.exists():
        kept = (f"; the last good checkpoint is kept in {checkpoint.path}: continue from it with "
                f"--resume and a lower --lr")
    return (f"training diverged at {where}: the loss or a weight became NaN/inf. Lower --lr "
            f"(now {config.lr}), normalise the features (e.g. scale rows to unit norm), or set "
            f"--max-norm{kept}")


def holdout_split(examples: Examples, fraction: float, task: str, seed: int,
                  ) -> tuple[Examples, Examples]:
    """Carve a validation set out of training data.

    Annotation: hold out whole rows. Recommendation (x is an identity, so a held-out row would be
    a user the model never saw): hold out ``fraction`` of each row's labels, never all of them; the
    held-out rows exclude the labels that stay in training.
    """
    rng = np.random.default_rng(seed)
    if task == "annotation":
        order = rng.permutation(len(examples))
        n_valid = int(round(fraction * len(examples)))
        if n_valid == 0 or n_valid == len(examples):
            raise AweError(f"--valid-fraction {fraction} leaves no rows to validate or to train on")
        return examples.take(np.sort(order[n_valid:])), examples.take(np.sort(order[:n_valid]))
    labels = examples.labels
    held = rng.random(labels.nnz) < fraction
    # never hold out every label of a row: keep the first label of such rows in training
    held_per_row = np.bincount(labels.row_of_entry()[held], minlength=labels.n_rows)
    all_held = held_per_row == labels.lengths
    held[labels.indptr[:-1][all_held & (labels.lengths > 0)]] = False
    train_labels, valid_labels = labels.select_entries(~held), labels.select_entries(held)
    keep_valid = np.flatnonzero(valid_labels.lengths > 0)
    if len(keep_valid) == 0:
        raise AweError(f"--valid-fraction {fraction} holds out no labels")
    train = examples.with_labels(train_labels, None)
    valid = examples.with_labels(valid_labels, train_labels).take(keep_valid)
    return train, valid


class _Progress:
    """A rich progress bar over the batches of every epoch (silent when disabled)."""

    def __init__(self, enabled: bool, epochs: int, batches: int, first_epoch: int = 1):
        self.enabled, self.epochs, self.batches = enabled, epochs, batches
        self.first_epoch = first_epoch
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total}"),
                                      TimeElapsedColumn(), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(f"epoch {self.first_epoch}",
                                                 total=self.batches)
        return self

    def advance(self):
        if self._progress is not None:
            self._progress.advance(self._task)

    def epoch_done(self, row: dict, k: int):
        if self._progress is not None:
            text = f"epoch {row['epoch']} loss {row['loss']:.4f}"
            if f"valid_P@{k}" in row:
                text += f" valid P@{k} {row[f'valid_P@{k}']:.4f}"
            self._progress.console.print(text)
            self._progress.reset(self._task, description=f"epoch {row['epoch'] + 1}")

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)


def with_overrides(config: TrainConfig, **kwargs) -> TrainConfig:
    return replace(config, **{k: v for k, v in kwargs.items() if v is not None})



def fit_selected(new_model: Callable[[], Wsabie], train: Examples, config: TrainConfig,
                 valid: Examples | None = None, progress: bool = False,
                 checkpoint: Checkpoint | None = None,
                 ) -> tuple[Wsabie, FitResult, Examples, Examples | None]:
    """Train a fresh model, picking the epoch on ``valid`` or on a held-out fraction.

    With ``config.valid_fraction`` (and no ``valid``) the held-out part picks the epoch, then a
    new model learns from every row for that many epochs (``refit``). Returns the model, the
    result, and the rows it trained and validated on. ``checkpoint``: its position names the
    phase (select, refit); a resumed run skips the phases the interrupted one had finished.
    """
    all_rows = train
    if valid is None and config.valid_fraction > 0:
        if isinstance(train, ShuffleStream):
            train, valid = train.split(config.valid_fraction, config.task, config.seed)
        else:
            train, valid = holdout_split(train, config.valid_fraction, config.task, config.seed)
    torch.manual_seed(config.seed)
    refit = config.refit and all_rows is not train
    ck = checkpoint
    round_no = ck.position.get("round", 1) if ck is not None else 1
    if refit and ck is not None and ck.saved_at_or_after(round_no, "refit"):
        result = FitResult(**ck.saved_outer["select"])  # the interrupted run had picked the epoch
    else:
        if ck is not None:
            ck.position = {**ck.position, "phase": "select"}
            ck.outer.pop("select", None)
        model = new_model()
        result = fit(model, train, config, valid, progress=progress, checkpoint=ck)
    if refit:
        if ck is not None:
            ck.position = {**ck.position, "phase": "refit"}
            ck.outer["select"] = asdict(result)
        model = new_model()
        refit = fit(model, all_rows, replace(config, epochs=result.best_epoch), None,
                    progress=progress, checkpoint=ck)
        for row in refit.history:
            row["phase"] = "refit"
        result = FitResult(result.history + refit.history, result.best_epoch,
                           result.best_metrics, result.seconds + refit.seconds)
    return model, result, train, valid


def _stage_metrics(result: FitResult, train: Examples, valid: Examples | None,
                   checkpoint: Checkpoint | None = None) -> dict:
    metrics = {"best_epoch": result.best_epoch, "seconds": round(result.seconds, 3),
               "train_rows": len(train), "valid_rows": len(valid) if valid else 0,
               "valid": result.best_metrics}
    if checkpoint is not None and checkpoint.resumed_from:
        metrics["resumed"] = {"from": checkpoint.resumed_from, "changes": checkpoint.changes}
    return metrics


def data_identity(examples: Examples | ShuffleStream | None) -> dict | None:
    """What tells one training set from another, cheaply: the row count, a digest of every label
    and of the features of up to 4096 evenly spaced rows (a checkpoint's data check)."""
    if examples is None:
        return None
    if isinstance(examples, ShuffleStream):
        return examples.identity()
    from .checkpoint import tensor_digest

    n = len(examples)
    sample = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, 4096)).astype(np.int64))
    if examples.dense is not None:
        features = tensor_digest(examples.dense[sample])
    else:
        part = examples.sparse.take(sample)
        features = tensor_digest(part.indptr, part.indices, part.values)
    return {"rows": n, "labels": tensor_digest(examples.labels.indptr, examples.labels.indices),
            "features": features}


def open_checkpoint(model_dir, stage: str, run: dict, every: int, resume: bool,
                    report: Callable[[str], None] | None,
                    world: World = dist_lib.SINGLE) -> Checkpoint:
    """The stage's checkpoint; says whether a run resumes, starts afresh, or replaces one.
    With several processes every rank reads it and rank 0 writes it (and speaks)."""
    if world.distributed:  # a resumed run must have as many ranks: each has its own draws
        run = {**run, "processes": world.size}
    ck = Checkpoint(model_dir, stage, run, every=every, resume=resume, writer=world.is_main)
    say = (report if world.is_main else None) or (lambda _: None)
    if ck.resuming:
        say(f"resuming from {ck.path} ({ck.resumed_from})"
            + "".join(f"; --{k} {old} -> {new}" for k, (old, new) in ck.changes.items()))
    elif resume:
        say(f"--resume: no checkpoint in {Path(model_dir)}; training from the start")
    elif ck.exists():
        say(f"{ck.path}: the checkpoint of an interrupted run is replaced (pass --resume to "
            f"continue it instead)")
    return ck


def train_wsabie(train_path, model_dir, config: TrainConfig = TrainConfig(), *,
                 valid_path=None, columns: Columns | None = None, progress: bool = False,
                 label_bias: bool | str = "auto", checkpoints: bool = True,
                 checkpoint_every: int = 0, resume: bool = False,
                 report: Callable[[str], None] | None = None) -> tuple[FitResult, list]:
    """Stage 1 end to end: read, split off validation, train, write the model directory.

    ``label_bias``: f = (x U) . V_y + beta_y with a learned per-label offset (LightFM's item
    bias; False gives the paper's Wsabie); "auto": on for annotation, off for recommendation
    (docs/decisions.md). ``checkpoints``: write MODEL/checkpoint/wsabie.safetensors at the end of
    every epoch (and every ``checkpoint_every`` batches); removed once the model is written.
    ``resume``: continue from it. ``report`` receives one-line notes (resuming, replacing a
    checkpoint).

    Under torchrun (:func:`awe.distributed.session`) every process trains its share and only
    rank 0 writes files; the others return no paths.
    """
    found = scan(train_path, columns or Columns())
    config = config.resolved(found.task, resolve_device(config.device))
    with dist_lib.session(config.device) as world:
        return _train_wsabie(train_path, model_dir, config, found, world, valid_path=valid_path,
                             progress=progress, label_bias=label_bias, checkpoints=checkpoints,
                             checkpoint_every=checkpoint_every, resume=resume, report=report)


def _train_wsabie(train_path, model_dir, config: TrainConfig, found, world: World, *,
                  valid_path, progress: bool, label_bias: bool | str, checkpoints: bool,
                  checkpoint_every: int, resume: bool,
                  report: Callable[[str], None] | None) -> tuple[FitResult, list]:
    if label_bias not in (True, False, "auto"):
        raise AweError(f"--label-bias must be auto, on or off, got {label_bias!r}")
    if label_bias == "auto":
        label_bias = config.task == "annotation"
    if config.threads:
        torch.set_num_threads(config.threads)
    train = _training_rows(train_path, found.schema, found.vocab, config)
    valid = None
    if valid_path is not None:
        valid = load_examples(valid_path, found.schema, found.vocab, require_labels=False)
    shape = ModelShape(found.schema.n_features, len(found.vocab), config.dim,
                       found.schema.kind == "sparse", math.sqrt(found.mean_sq_norm))
    ck = None
    if checkpoints:
        from .checkpoint import tensor_digest

        run = {"stage": "wsabie", "config": config.to_dict(), "label_bias": label_bias,
               "schema": found.schema.to_dict(),
               "vocab": tensor_digest(np.frombuffer(json.dumps(found.vocab.labels).encode(),
                                                    dtype=np.uint8)),
               "data": data_identity(train), "valid": data_identity(valid)}
        ck = open_checkpoint(model_dir, "wsabie", run, checkpoint_every, resume, report, world)
    model, result, train, valid = fit_selected(
        lambda: Wsabie(shape, config.init_scale, torch.Generator().manual_seed(config.seed),
                       0.0 if label_bias else None),
        train, config, valid, progress, ck)
    if not world.is_main:  # the model is rank 0's to write (the weights are the same)
        return result, []
    written = save_wsabie(model_dir, model, found.schema, found.vocab, config.to_dict())
    history_path = Path(model_dir) / artifacts.HISTORY
    artifacts.write_csv(history_path, result.history)
    metrics_path = Path(model_dir) / artifacts.METRICS
    artifacts.write_json(metrics_path, {"wsabie": _stage_metrics(result, train, valid, ck)})
    if ck is not None:
        ck.remove()
    return result, [*written, history_path, metrics_path]


def _training_rows(train_path, schema, vocab, config: TrainConfig) -> Examples | ShuffleStream:
    """The training rows: loaded, or streamed through a shuffle buffer (``--shuffle-buffer``)."""
    if config.shuffle_buffer:
        return ShuffleStream.open(train_path, schema, vocab, config.shuffle_buffer, config.seed,
                                  config.task, config.batch_size)
    return load_examples(train_path, schema, vocab, task=config.task)


INITS = ("wsabie", "random")
# Stage 3 starts from a trained stage 1: a fresh Adagrad at the stage-1 rate undoes it in the first
# epoch (measured: ML100K and Fashion-MNIST peaked at epoch 1 with lr 0.05)
STAGE3_DEFAULTS = TrainConfig(lr=0.01)
# beta_y's starting value: f = G * (s + beta) starts near the kNN ranking refined by s
LABEL_BIAS_DEFAULT = 3.0
# --max-norm auto in stage 3 for recommendation: the G-weighted scores need longer rows than
# stage 1's 1.5 (ML100K P@10 0.2278 at 3.0 vs 0.2255 at 1.5; docs/decisions.md)
STAGE3_RECOMMENDATION_MAX_NORM = 3.0


# --rounds auto: further rounds while the best validation P@k improves, at most this many rounds
# (Fashion-MNIST: round 2 raised validation P@1 by 0.004 in every run, round 3 by +0.002 or
# -0.001, at ~20 s a round against the 2-minute pipeline; docs/decisions.md)
AUTO_MAX_ROUNDS = 2
_KEPT_ROUND = ".kept-round"  # the last kept round's files while a further round is tried
_ROUND_FILES = (INDEX_FILE, AFFINITY_FILE, artifacts.AWE_WEIGHTS, artifacts.CONFIG,
                artifacts.METRICS)


def parse_rounds(rounds: int | str) -> tuple[int, bool]:
    """(most rounds, chosen on validation?) of ``--rounds N`` or ``--rounds auto``."""
    if isinstance(rounds, str) and rounds.strip().lower() == "auto":
        return AUTO_MAX_ROUNDS, True
    try:
        n = int(rounds)
    except (TypeError, ValueError):
        n = 0
    if isinstance(rounds, bool) or n < 1 or (isinstance(rounds, float) and rounds != n):
        raise AweError(f"--rounds must be 'auto' or an integer >= 1, got {rounds!r}")
    return n, False


def _keep_round_files(model_dir: Path, round_no: int) -> None:
    """Keep round ``round_no``'s files (hard links: the next round replaces files by renaming,
    so the kept names still see the old contents) unless a run killed later kept them already."""
    kept = model_dir / f"{_KEPT_ROUND}-{round_no}"
    if kept.is_dir():
        return
    _drop_kept_rounds(model_dir)  # another round's, or a half-made copy
    tmp = model_dir / f"{_KEPT_ROUND}.tmp"
    tmp.mkdir()
    for name in _ROUND_FILES:
        if (model_dir / name).exists():
            try:
                os.link(model_dir / name, tmp / name)
            except OSError:  # a file system without hard links
                shutil.copy2(model_dir / name, tmp / name)
    tmp.rename(kept)


def _restore_round_files(model_dir: Path, round_no: int) -> None:
    """Put round ``round_no``'s kept files back; config.json last (it names what is complete)."""
    kept = model_dir / f"{_KEPT_ROUND}-{round_no}"
    config = model_dir / artifacts.CONFIG
    # without stage2/stage3 sections while the files are swapped: a kill in between leaves a
    # stage-1 model, never a config.json naming a G or weights it does not match
    section = artifacts.read_json(config)
    artifacts.write_json(config, {k: v for k, v in section.items()
                                  if k not in ("stage2", "stage3")})
    for name in _ROUND_FILES:
        if name != artifacts.CONFIG and (kept / name).exists():
            os.replace(kept / name, model_dir / name)
    os.replace(kept / artifacts.CONFIG, config)
    shutil.rmtree(kept)


def _fmt(score: float | None) -> str:
    return "none" if score is None else f"{score:.4f}"


def _drop_kept_rounds(model_dir: Path) -> None:
    for old in model_dir.glob(f"{_KEPT_ROUND}*"):
        shutil.rmtree(old)


def retrain_awe(train_path, model_dir, config: TrainConfig = STAGE3_DEFAULTS, *,
                init: str = "wsabie", rounds: int | str = "auto",
                label_bias: float | None = LABEL_BIAS_DEFAULT,
                valid_path=None, progress: bool = False, checkpoints: bool = True,
                checkpoint_every: int = 0, resume: bool = False,
                report: Callable[[str], None] | None = None) -> tuple[FitResult, list]:
    """Stage 3 (``awe retrain``): f = (G + b) * (x U') . V'_y with the same loop as stage 1.

    U', V' start from stage 1 (``init="wsabie"``) or at random. ``rounds`` > 1 repeats
    build-g -> retrain, each time building G from the newest U' (the paper's step 4);
    ``"auto"`` goes on while a round raises the best validation P@k (at most
    ``AUTO_MAX_ROUNDS`` rounds) and keeps the best round's G and model.
    Checkpoints as in :func:`train_wsabie` (MODEL/checkpoint/awe.safetensors); a round's start is
    checkpointed too, so a run killed while a later round rebuilds G resumes there.

    Under torchrun every process trains its share; rank 0 alone writes files and rebuilds G
    for a further round, which the others then read.
    """
    with dist_lib.session(resolve_device(config.device)) as world:
        return _retrain_awe(train_path, model_dir, config, world, init=init, rounds=rounds,
                            label_bias=label_bias, valid_path=valid_path, progress=progress,
                            checkpoints=checkpoints, checkpoint_every=checkpoint_every,
                            resume=resume, report=report)


def _retrain_awe(train_path, model_dir, config: TrainConfig, world: World, *, init: str,
                 rounds: int | str, label_bias: float | None, valid_path, progress: bool,
                 checkpoints: bool, checkpoint_every: int, resume: bool,
                 report: Callable[[str], None] | None) -> tuple[FitResult, list]:
    from .affinity import Affinity, build_affinity, build_affinity_streamed, write_stage2
    from .model import AffinityWsabie, load_wsabie, save_awe

    if init not in INITS:
        raise AweError(f"--init must be one of {', '.join(INITS)}")
    max_rounds, auto_rounds = parse_rounds(rounds)
    model_dir = Path(model_dir)
    saved = load_wsabie(model_dir)
    if "stage2" not in saved.config:
        raise AweError(f"{model_dir}: no affinity weights G; run `awe build-g` first")
    task = saved.config["stage1"]["train"].get("task")
    if config.max_norm == "auto" and task == "recommendation":
        config = replace(config, max_norm=STAGE3_RECOMMENDATION_MAX_NORM)
    config = config.resolved(task, resolve_device(config.device))
    if config.threads:
        torch.set_num_threads(config.threads)
    affinity, g_train = Affinity.load(model_dir, saved.config["stage2"], with_train_g=True)
    g_fingerprint = saved.config["stage2"].get("fingerprint")
    train = _training_rows(train_path, saved.schema, saved.vocab, config)
    streaming = isinstance(train, ShuffleStream)
    _check_same_rows(len(train), train.labels() if streaming else train.labels, affinity,
                     train_path, model_dir)
    valid = None
    if valid_path is not None:
        valid = load_examples(valid_path, saved.schema, saved.vocab, require_labels=False)
    if auto_rounds and ((valid is None and not config.valid_fraction > 0)
                        or (valid is None and config.task == "recommendation")):
        # nothing to choose the rounds on; or held-out labels of rows whose U' (refit on every
        # label, x an identity) then makes G: the next round's G carries the held-out labels
        # (ML100K: valid P@10 0.123 -> 0.199 over 4 rounds while test P@10 fell 0.228 -> 0.209)
        max_rounds = 1
    shape = saved.model.shape
    bias = affinity.config.bias
    # stage 1's beta (if any) is an additive offset, not stage 3's factor: not carried over
    start = {k: v.clone() for k, v in saved.model.state_tensors().items() if k != "label_bias"}
    history: list[dict] = []
    written: list[Path] = []
    ck = None
    first_round = 1
    if checkpoints:
        run = {"stage": "awe", "config": config.to_dict(), "init": init, "rounds": str(rounds),
               "label_bias": label_bias, "stage1": saved.config["stage1"].get("fingerprint"),
               "data": data_identity(train), "valid": data_identity(valid)}
        ck = open_checkpoint(model_dir, "awe", run, checkpoint_every, resume, report, world)
        if ck.resuming:
            first_round = ck.saved_position["round"]
            history = ck.saved_outer["history"]
            start = ck.saved_outer_tensors()
    resuming = ck is not None and ck.resuming
    if world.is_main and not resuming:
        _drop_kept_rounds(model_dir)  # left by a killed run that is not resumed
    selection = f"P@{config.selection_k}"
    # the kept round: its number, valid P@k (None: not validated) and stage metrics
    best: dict = ck.saved_outer.get("best") if resuming else None
    best = best or {"round": 0, "score": None, "metrics": {}}
    kept_result = None
    for round_no in range(first_round, max_rounds + 1):
        mid_round = ck is not None and ck.saved_at_or_after(round_no, "select")
        if ck is not None:
            ck.position = {"round": round_no, "phase": "start"}
            ck.outer = {"history": history, "best": best}
            ck.outer_tensors = start
        if round_no > 1 and not mid_round:  # G from the newest embedding U'
            if ck is not None:
                if ck.saved_position == ck.position:  # resumed at this round's start
                    ck.discard_saved()
                ck.save(None)  # a kill while G is rebuilt resumes here and rebuilds it
            if world.is_main and auto_rounds:
                _keep_round_files(model_dir, round_no - 1)
            if world.is_main:
                if streaming:  # the rows are read again, only their embeddings kept
                    affinity, g_train, stats = build_affinity_streamed(
                        train_path, saved.schema, saved.vocab, affinity.config,
                        start["U"].clone(), start["V"].clone(), model_dir)
                else:
                    affinity, g_train, stats = build_affinity(
                        train, len(saved.vocab), affinity.config, start["U"].clone(),
                        start["V"].clone())
                written += write_stage2(model_dir, affinity, g_train, stats,
                                        saved.config["stage2"].get("train_path",
                                                                   str(train_path)),
                                        f"awe round {round_no - 1}")
            world.barrier()  # the others read the G rank 0 built: one G for every rank
            if not world.is_main:
                section = artifacts.read_json(model_dir / artifacts.CONFIG)["stage2"]
                affinity, g_train = Affinity.load(model_dir, section, with_train_g=True)
            g_fingerprint = affinity.fingerprint()
        if mid_round and ck.saved_outer.get("g_fingerprint") != g_fingerprint:
            raise AweError(f"{model_dir}: G changed since the checkpoint was written (build-g "
                           f"ran again?); run `awe retrain` without --resume")
        if ck is not None:
            ck.outer["g_fingerprint"] = g_fingerprint
        train_g = train.with_affinity(g_train)
        valid_g = None if valid is None else valid.with_affinity(
            affinity.examples_affinity(valid))

        def new_model(start=start):
            model = AffinityWsabie(shape, bias, config.init_scale,
                                   torch.Generator().manual_seed(config.seed), label_bias)
            if init == "wsabie":
                model.load_tensors(start)
            return model

        model, result, fitted, validated = fit_selected(new_model, train_g, config, valid_g,
                                                        progress, ck)
        for row in result.history:
            row["round"] = round_no
        history += result.history
        score = result.best_metrics.get(selection) if validated else None
        if (auto_rounds and round_no > 1 and best["score"] is not None
                and not (score is not None and score > best["score"])):
            # no better than the round before: keep that round's G and model, stop
            if world.is_main:
                _restore_round_files(model_dir, best["round"])
                if report is not None:
                    report(f"round {round_no}: valid {selection} {_fmt(score)} is not above "
                           f"round {best['round']}'s {_fmt(best['score'])}; kept round "
                           f"{best['round']}")
            result = kept_result or result
            break
        if world.is_main:
            written += save_awe(model_dir, model, config.to_dict(),
                                {"init": init, "rounds": str(rounds), "round": round_no,
                                 "label_bias_init": label_bias})
        best = {"round": round_no, "score": score,
                "metrics": _stage_metrics(result, fitted, validated, ck)}
        kept_result = result
        start = {k: v.clone() for k, v in model.state_tensors().items()}
    if not world.is_main:
        return result, []
    _drop_kept_rounds(model_dir)
    history_path = model_dir / artifacts.AWE_HISTORY
    artifacts.write_csv(history_path, history)
    metrics_path = model_dir / artifacts.METRICS
    all_metrics = artifacts.read_json(metrics_path) if metrics_path.exists() else {}
    all_metrics["awe"] = {**best["metrics"], "rounds": str(rounds), "round": best["round"],
                          "rounds_run": max(row["round"] for row in history)}
    artifacts.write_json(metrics_path, all_metrics)
    if ck is not None:
        ck.remove()
    return result, sorted(set(written + [history_path, metrics_path]))


def _check_same_rows(n_rows: int, labels, affinity, train_path, model_dir) -> None:
    from .affinity import labels_digest

    if n_rows != affinity.index.n_rows or labels_digest(labels) != labels_digest(
            affinity.train_labels):
        raise AweError(f"{train_path}: not the training data G was built on in {model_dir} "
                       f"({n_rows} rows vs {affinity.index.n_rows}); pass the same TRAIN to "
                       f"`awe build-g` and `awe retrain`")
