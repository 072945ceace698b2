"""One training loop for both stages: WARP over positive pairs, batched, with validation.

Stage 1 (Wsabie) and stage 3 (AWE) differ only in the model's scores (AWE multiplies by the affinity
weights G), so :func:`fit` takes any :class:`Wsabie`; a subclass supplies the per-pair multiplier
through ``pair_weight``. The WARP gradients are computed in closed form (``warp_gradients``) and
applied to the touched rows by :class:`awe.optim.RowOptimizer`: no autograd in the loop.

Over 600 lines on purpose: the epoch loop, its checkpointed position (``_FitProgress``) and the
WARP step (``_WarpStep``) share the model, the optimizers and the draw stream and change together;
split, each part would reach into the others' state.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import astuple, dataclass

import numpy as np
import torch

from awe.artifacts import tensor_digest
from awe.errors import AweError, TrainingDiverged
from awe.io.reader import Examples
from awe.io.stream import ShuffleStream
from awe.models.wsabie import Inputs, Wsabie, batch_inputs
from awe.ranking.metrics import evaluate
from awe.ranking.topk import SCORES_PER_BATCH
from awe.training import distributed as dist_lib
from awe.training.checkpoint import Checkpoint, FitState
from awe.training.config import TrainConfig, resolve_device
from awe.training.distributed import World, rank_share
from awe.training.memory import keep_freed_memory
from awe.training.optim import RowOptimizer
from awe.training.progress import Progress
from awe.training.warp import (
    PositiveSet,
    estimate_rank,
    rank_weight_table,
    sample_violators,
    sample_violators_from_table,
    uniform_draws,
    warp_gradients,
)


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    best_metrics: dict[str, float]
    seconds: float


HISTORY_KS = (1, 3, 5, 10)


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
    bar = Progress(progress and world.is_main, config.epochs, n_batches,
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


# WARP's draws per positive come in blocks of 8, then x growth (see docs/method.md)
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

    def _candidate_draws(self, rows: torch.Tensor, positives: torch.Tensor):
        """``negatives_from="g"``: a draw function giving uniform draws among the labels G
        carries for each pair's row (stage 3), and each pair's count of such labels that are not
        the row's own, the rank estimate's L - |labels(x)|. A row whose G carries none of them
        draws its positive, which is rejected: no violator, no step."""
        candidate = getattr(self.model, "negative_candidates", None)
        if candidate is None:
            raise AweError("negatives_from 'g' draws WARP negatives among G's labels: stage 3 "
                           "(awe retrain) only", field="negatives_from")
        ids, counts = candidate(rows)
        own = self.positive_set.contains(rows, ids.clamp(min=0)).logical_and_(ids >= 0)
        n_negatives = counts - own.sum(1)
        width = ids.shape[1]

        def draw(active: torch.Tensor, count: int) -> torch.Tensor:
            u = torch.rand(active.numel(), count, generator=self.generator).to(ids.device)
            at = (u * counts.index_select(0, active).unsqueeze(1)).long().clamp_(max=width - 1)
            labels = ids.index_select(0, active).gather(1, at)
            return torch.where(labels >= 0, labels,
                               positives.index_select(0, active).unsqueeze(1))
        return draw, n_negatives

    def _gradients(self, rows: torch.Tensor, positives: torch.Tensor, inputs: Inputs):
        """The batch's WARP loss and row gradients: (loss, labels [2S] (the S positives, then
        their violators), dL/dV of those rows, dL/d beta of them, rows of U (None: dense U),
        dL/dU), or None when no pair has a violator."""
        model, config = self.model, self.config
        n = rows.numel()
        e = model.embed(inputs)
        sampled = None
        draw, n_negatives = self.draw, self.n_negatives_of_row.index_select(0, rows)
        if config.negatives_from == "g":
            draw, n_negatives = self._candidate_draws(rows, positives)
        if (config.negatives_from == "all"
                and self.n_labels <= config.negatives * FULL_TABLE_LABELS_PER_DRAW):
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
            sampled = sample_violators(positive_scores, draw, score, is_positive,
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
        ranks = estimate_rank(n_negatives.index_select(0, sel), n_draws.index_select(0, sel))
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
    a step touches (docs/method.md has the cost).
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
# (see docs/method.md)
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
