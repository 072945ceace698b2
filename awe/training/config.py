"""The training stages' configuration: every hyper-parameter once, with its default."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from awe.errors import AweError, invalid
from awe.io.reader import TASKS
from awe.options import DictFields, option
from awe.training.optim import OPTIMIZERS
from awe.training.warp import RANK_WEIGHTS

NEGATIVES_FROM = ("all", "g")


@dataclass(frozen=True)
class TrainConfig(DictFields):
    """Every hyper-parameter of a training stage; saved in config.json and used to rebuild."""

    dim: int = option(64, "Embedding dimension D.")
    epochs: int = option(60, "Maximum epochs (early stopping on validation P@k may stop "
                             "sooner).")
    lr: float = option(0.05, "Learning rate.")
    negatives: int = option(100, "WARP sampling budget K: negatives drawn per positive at "
                                 "most.")
    margin: float = option(1.0, "WARP margin.")
    negatives_from: str = option(
        "all", "Where WARP draws negatives: all (every label) or g (stage 3 only: the labels "
               "G carries for the row, the rank estimated among them).", NEGATIVES_FROM)
    rank_weight: str = option("harmonic", "WARP rank weight: harmonic (the paper's) or log "
                                          "(LightFM's).", RANK_WEIGHTS)
    optimizer: str = option("adagrad", "Optimiser of the touched rows.", OPTIMIZERS)
    max_norm: float | str | None = option(
        "auto", "Project rows of U and V to norm <= C (the paper's regulariser); auto: 1.5 for "
                "recommendation (identity inputs overfit without it), none for annotation.")
    weight_decay: float = option(0.0, "L2 on the rows a step touches.")
    batch_size: int | str = option(
        "auto", "Positive (row, label) pairs per step; auto: 2048 for recommendation, 1024 for "
                "annotation.")
    init_scale: float = option(0.1, "Scale of |x U| at the start, for x of the rows' RMS "
                                    "norm.")
    task: str | None = option(None, "annotation or recommendation (default: recorded by `awe "
                                    "data`, else annotation).", TASKS)
    valid_fraction: float = option(
        0.1, "Hold out this fraction of the training rows for validation: whole rows "
             "(annotation) or a fraction of each row's labels (recommendation); 0: no "
             "validation, train for --epochs.")
    valid_k: int | None = option(None, "Pick the best epoch by validation P@k at this k "
                                       "(default: 1 for annotation, 10 for recommendation).")
    patience: int = option(10, "Early-stopping patience in epochs.")
    refit: bool = option(
        False, "After every choice is made on the validation rows, train again on every row "
               "with the chosen epochs; stage 1's refit leaves the later stages no unseen rows "
               "to choose on (docs/validation.md).")
    seed: int = option(0, "Random seed.")
    threads: int | None = option(None, "CPU threads for torch (default: all cores).")
    device: str = option("cpu", "cpu, cuda, or auto (cuda when torch sees one).",
                         ("cpu", "cuda", "auto"))
    shuffle_buffer: int | None = option(
        None, "Stream the training files instead of loading them: shards in a seeded random "
              "order, rows shuffled in a buffer of this many rows (memory: buffer + model).")

    def __post_init__(self):
        checks = [
            (self.dim >= 1, "dim", "must be >= 1"),
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number"),
            (self.negatives >= 1, "negatives", "must be >= 1"),
            (self.margin >= 0, "margin", "must be >= 0"),
            (self.negatives_from in NEGATIVES_FROM, "negatives_from",
             f"must be one of {NEGATIVES_FROM}"),
            (self.rank_weight in RANK_WEIGHTS, "rank_weight", f"must be one of {RANK_WEIGHTS}"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}"),
            (self.max_norm in (None, "auto") or float(self.max_norm) > 0, "max_norm",
             "must be positive"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.batch_size == "auto" or int(self.batch_size) >= 1, "batch_size",
             "must be >= 1"),
            (0 <= self.valid_fraction < 1, "valid_fraction", "must be in [0, 1)"),
            (self.patience >= 1, "patience", "must be >= 1"),
            (self.task in (None, *TASKS), "task", "must be annotation or recommendation"),
            (self.shuffle_buffer is None or int(self.shuffle_buffer) >= 1, "shuffle_buffer",
             "must be >= 1 row"),
        ]
        for ok, name, problem in checks:
            if not ok:
                raise invalid(name, f"{problem}, got {getattr(self, name)!r}")

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



def resolve_device(requested: str | None) -> str:
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise AweError("device cuda: torch sees no CUDA device; use cpu", field="device")
    if requested not in ("cpu", "cuda"):
        raise invalid("device", f"must be cpu or cuda, not '{requested}'")
    return requested


def with_overrides(config: TrainConfig, **kwargs) -> TrainConfig:
    return replace(config, **{k: v for k, v in kwargs.items() if v is not None})


INITS = ("wsabie", "random")
# TrainConfig fields that only stage 3 takes (`awe retrain`, AWE(retrain={...}))
STAGE3_ONLY = ("negatives_from",)
# Stage 3 starts from a trained stage 1: a fresh Adagrad at the stage-1 rate undoes it in the first
# epoch (measured: ML100K and Fashion-MNIST peaked at epoch 1 with lr 0.05)
STAGE3_DEFAULTS = TrainConfig(lr=0.01)
# beta_y's starting value: f = G * (s + beta) starts near the kNN ranking refined by s
LABEL_BIAS_START = 3.0
# --label-bias-start auto: stage 3's first round is trained with each start and the one with the
# best validation P@k is kept (the first wins ties); None is the paper's model, without beta.
# Neither wins on every dataset (docs/defaults.md)
LABEL_BIAS_CANDIDATES = (LABEL_BIAS_START, None)
LABEL_BIAS_DEFAULT = "auto"
LABEL_BIAS_START_HELP = (
    "Stage 3: the start of the learned per-label offset beta in f = (G + b)((x U').V'_y + "
    "beta_y); none: no beta, the paper's f = (G + b)(x U').V'_y; auto: round 1 is trained with "
    f"{LABEL_BIAS_START:g} and with none, and the better on validation P@k is kept.")
# --budget: the seconds stage 3's auto choices (another --label-bias-start, a further round) may
# add to one training run; a candidate that would not fit in what is left is not tried
SEARCH_BUDGET = 600.0
SEARCH_BUDGET_HELP = (
    "Seconds that stage 3's auto choices (--label-bias-start auto, --rounds auto) may add to "
    "one training run: a candidate is tried only if it fits in what is left, timed by the last "
    "fit (and G build); 0: the first candidate of each.")
# --max-norm auto in stage 3 for recommendation: rows bounded as in stage 1, longer than its 1.5
# for the G-weighted scores (on validation, 3 and none are level: docs/defaults.md)
STAGE3_RECOMMENDATION_MAX_NORM = 3.0


# --rounds auto: further rounds while the best validation P@k improves, at most this many rounds
# (Fashion-MNIST: round 2 raised validation P@1 by 0.004 in every run, round 3 by +0.002 or
# -0.001, at ~20 s a round against a whole pipeline of under 2 minutes; docs/method.md)
AUTO_MAX_ROUNDS = 2


def parse_rounds(rounds: int | str) -> tuple[int, bool]:
    """(most rounds, chosen on validation?) of ``--rounds N`` or ``--rounds auto``."""
    if isinstance(rounds, str) and rounds.strip().lower() == "auto":
        return AUTO_MAX_ROUNDS, True
    try:
        n = int(rounds)
    except (TypeError, ValueError):
        n = 0
    if isinstance(rounds, bool) or n < 1 or (isinstance(rounds, float) and rounds != n):
        raise invalid("rounds", f"must be 'auto' or an integer >= 1, got {rounds!r}")
    return n, False
