"""Training checkpoints: continue an interrupted ``awe train`` / ``awe retrain`` where it stopped.

One file per stage in ``MODEL/checkpoint/`` (``wsabie.safetensors`` for stage 1,
``awe.safetensors`` for stage 3). Its tensors are the model's weights, the optimizer's
accumulators, the random generator's states, the best epoch's weights and the driver's own tensors
(stage 3: the weights a round starts from); its safetensors metadata holds JSON: the position
(round, phase, epoch, batch), the history so far, the best epoch so far and the run's identity
(options and data). Written to a temporary name and renamed (``artifacts.write_tensors``), so a
kill at any instant leaves the previous checkpoint or the new one. Never pickle.

Resuming with the same options and data gives the same model, bit for bit, as the uninterrupted run
(the position and every random state are restored; tests compare weights). Only the options in
:data:`RESUMABLE` may change on resume (e.g. a lower --lr after a divergence); the change is
recorded. On success the driver removes the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from awe import artifacts
from awe.errors import AweError, invalid

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_VERSION = 1
# options that may differ between the interrupted run and its resumption; anything else would make
# the resumed run a different run
RESUMABLE = ("lr", "epochs", "patience")
PHASES = ("start", "select", "refit")  # in the order a stage runs them


@dataclass
class FitState:
    """Where :func:`awe.train.fit` stood: everything it needs to carry on exactly."""

    epochs_done: int  # completed epochs of this phase
    batch: int  # batches of epoch epochs_done + 1 already trained (0: at an epoch boundary)
    loss_sum: float  # the running sums of the epoch in progress
    violators: int
    pairs: int
    history: list[dict]
    best_score: float
    best_epoch: int
    best_metrics: dict
    without_gain: int
    stopped: bool  # early stopping has fired: no further epoch
    seconds: float  # training time spent before the interruption
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # model/, opt/, rng/, best/

    def meta(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "tensors"}


class Checkpoint:
    """The checkpoint of one training stage in a model directory.

    The drivers (``train_wsabie``, ``fit_selected``, ``retrain_awe``) set :attr:`position` and
    :attr:`outer` (their own JSON state) and :attr:`outer_tensors` before each phase;
    :func:`awe.train.fit` calls :meth:`save` with its :class:`FitState` every ``every`` batches and
    at the end of every epoch, and :meth:`restore` once at its start.
    """

    def __init__(self, model_dir: str | Path, stage: str, run: dict, *, every: int = 0,
                 resume: bool = False, writer: bool = True):
        if every < 0:
            raise invalid("checkpoint_every", f"must be >= 0 (0: at the end of every epoch only), "
                          f"got {every!r}")
        self.path = Path(model_dir) / CHECKPOINT_DIR / f"{stage}.safetensors"
        self.stage, self.run, self.every = stage, _jsonable(run), every
        self.position: dict = {}
        self.outer: dict = {}
        self.outer_tensors: dict[str, torch.Tensor] = {}
        self.saved: dict | None = None  # the checkpoint being resumed: meta
        self.saved_tensors: dict[str, torch.Tensor] = {}
        self.changes: dict = {}  # resumable options that differ from the interrupted run
        self.resumed_from = ""  # where the resumed run had stopped, in words
        self.writes = 0
        # multi-process training: every rank reads the checkpoint, only rank 0 writes it (the
        # ranks hold the same weights; their own random states are gathered into rank 0's file)
        self.writer = writer
        if resume:
            self._load()

    # -- resuming
    @property
    def resuming(self) -> bool:
        return self.saved is not None

    @property
    def saved_position(self) -> dict:
        return self.saved["position"] if self.saved else {}

    @property
    def saved_outer(self) -> dict:
        return self.saved["outer"] if self.saved else {}

    def saved_outer_tensors(self) -> dict[str, torch.Tensor]:
        return {k[len("outer/"):]: v for k, v in self.saved_tensors.items()
                if k.startswith("outer/")}

    def saved_at_or_after(self, round_no: int, phase: str) -> bool:
        """Whether the checkpoint being resumed lies at or after (round, phase): the driver skips
        work that the interrupted run had finished."""
        if not self.saved:
            return False
        saved = (self.saved_position.get("round", 1), PHASES.index(self.saved_position["phase"]))
        return saved >= (round_no, PHASES.index(phase))

    def restore(self) -> FitState | None:
        """The fit state to continue from, if the checkpoint lies at the current position (once)."""
        if not self.saved or self.saved["fit"] is None or self.saved_position != self.position:
            return None
        meta = dict(self.saved["fit"])
        tensors = {k: v for k, v in self.saved_tensors.items() if not k.startswith("outer/")}
        self.discard_saved()  # from here on the run goes forward
        return FitState(**meta, tensors=tensors)

    def describe_saved(self) -> str:
        p, fit = self.saved_position, (self.saved or {}).get("fit") or {}
        where = f"phase {p.get('phase')}"
        if "round" in p:
            where = f"round {p['round']}, {where}"
        if fit:
            where += f", after epoch {fit['epochs_done']}"
            if fit["batch"]:
                where += f" and {fit['batch']} batches"
        return where

    # -- writing
    def save(self, state: FitState | None) -> None:
        """Write the checkpoint at :attr:`position` (atomically; nothing on a non-writer)."""
        if not self.writer:
            return
        meta = {"version": CHECKPOINT_VERSION, "stage": self.stage, "run": self.run,
                "position": self.position, "outer": self.outer, "changes": self.changes,
                "fit": None if state is None else state.meta()}
        tensors = {} if state is None else dict(state.tensors)
        tensors.update({f"outer/{k}": v for k, v in self.outer_tensors.items()})
        # safetensors refuses tensors that share memory; a checkpoint is a snapshot anyway
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
        artifacts.write_tensors(self.path, tensors,
                                {"awe_checkpoint": json.dumps(_jsonable(meta))})
        self.writes += 1

    def remove(self) -> None:
        """Drop the checkpoint after the stage's files are written (the run is complete)."""
        if not self.writer:
            return
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()  # only when empty: another stage's checkpoint stays
        except OSError:
            pass

    def exists(self) -> bool:
        return self.path.is_file()

    # -- reading
    def _load(self) -> None:
        if not self.path.is_file():
            return
        from safetensors import safe_open

        tensors = artifacts.read_tensors(self.path)
        try:
            with safe_open(str(self.path), "pt") as fh:
                meta = json.loads((fh.metadata() or {})["awe_checkpoint"])
            if int(meta["version"]) > CHECKPOINT_VERSION:
                raise AweError(f"{self.path}: written by a newer awe; upgrade awe or train "
                               f"without --resume")
            run, position = meta["run"], meta["position"]
            if meta["stage"] != self.stage or position.get("phase") not in PHASES:
                raise ValueError("wrong stage or phase")
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise AweError(f"{self.path}: damaged checkpoint ({exc}); train without --resume "
                           f"(it is replaced)") from exc
        differ = sorted(k for k in set(run) | set(self.run)
                        if k != "config" and run.get(k) != self.run.get(k))
        old, new = run.get("config", {}), self.run.get("config", {})
        differ += sorted(f"--{k.replace('_', '-')}" for k in set(old) | set(new)
                         if k not in RESUMABLE and old.get(k) != new.get(k))
        if differ:
            raise AweError(f"{self.path}: the checkpoint is of another run (different "
                           f"{', '.join(differ)}); resume with the interrupted run's options and "
                           f"data, or train without --resume")
        self.changes = dict(meta.get("changes") or {})
        for k in RESUMABLE:
            if k in old and old.get(k) != new.get(k):
                self.changes[k] = [old.get(k), new.get(k)]
        self.saved, self.saved_tensors = meta, tensors
        self.resumed_from = self.describe_saved()

    def discard_saved(self) -> None:
        """The driver has taken what it needs from the checkpoint being resumed."""
        self.saved, self.saved_tensors = None, {}


def _jsonable(obj):
    """JSON round trip: what the checkpoint stores is exactly what a resumed run compares."""
    return json.loads(json.dumps(obj))
