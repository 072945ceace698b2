"""Stage 1 -> 2 -> 3 and rounds: the drivers of `awe train`, `awe build-g` and `awe retrain`."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from awe import artifacts
from awe.affinity.g import (
    AFFINITY_FILE,
    INDEX_FILE,
    Affinity,
    AffinityConfig,
    build_affinity,
    labels_digest,
)
from awe.affinity.stage import build_affinity_streamed, build_g, validation_holdout, write_stage2
from awe.artifacts import tensor_digest
from awe.card import read_card, write_card
from awe.errors import AweError, invalid
from awe.io.holdout import Holdout, expand_rows, holdout_split, kept_rows, split_held
from awe.io.reader import Columns, Examples, concat_examples, load_examples, scan
from awe.io.stream import STREAM_VALID_MAX, ShuffleStream
from awe.models.affinity_wsabie import AffinityWsabie
from awe.models.saved import load_wsabie, save_awe, save_wsabie
from awe.models.wsabie import ModelShape, Wsabie
from awe.training import distributed as dist_lib
from awe.training.checkpoint import Checkpoint
from awe.training.config import (
    INITS,
    LABEL_BIAS_CANDIDATES,
    LABEL_BIAS_DEFAULT,
    SEARCH_BUDGET,
    STAGE3_DEFAULTS,
    STAGE3_RECOMMENDATION_MAX_NORM,
    TrainConfig,
    parse_rounds,
    resolve_device,
)
from awe.training.distributed import World
from awe.training.loop import FitResult, fit


def fit_selected(new_model: Callable[[], Wsabie], train: Examples, config: TrainConfig,
                 valid: Examples | None = None, progress: bool = False,
                 checkpoint: Checkpoint | None = None, refit_rows: Examples | None = None,
                 say: Callable[[str], None] | None = None,
                 ) -> tuple[Wsabie, FitResult, Examples, Examples | None]:
    """Train a fresh model, picking the epoch on ``valid``.

    ``refit_rows``: once the epoch is picked, a new model learns from these rows for that many
    epochs (``--refit``). Without ``valid`` and with ``config.valid_fraction``, the rows are
    carved from ``train`` here (and ``--refit`` refits on all of ``train``): only for a stage 3
    whose stage 1 left no unseen rows (docs/validation.md). Returns the model, the result, and
    the rows it trained and validated on. ``checkpoint``: its position names the phase (select,
    refit); a resumed run skips the phases the interrupted one had finished. ``say`` names each
    phase in the log.
    """
    say = say or (lambda _: None)
    if valid is None and config.valid_fraction > 0:
        all_rows = train
        if isinstance(train, ShuffleStream):
            train, valid = train.split(config.valid_fraction, config.task, config.seed)
        else:
            train, valid = holdout_split(train, config.valid_fraction, config.task, config.seed)
        refit_rows = all_rows if config.refit else None
    torch.manual_seed(config.seed)
    refit = refit_rows is not None and valid is not None
    ck = checkpoint
    round_no = ck.position.get("round", 1) if ck is not None else 1
    if refit and ck is not None and ck.saved_at_or_after(round_no, "refit"):
        result = FitResult(**ck.saved_outer["select"])  # the interrupted run had picked the epoch
    else:
        if ck is not None:
            ck.position = {**ck.position, "phase": "select"}
            ck.outer.pop("select", None)
        model = new_model()
        say(f"select: up to {config.epochs} epochs on {len(train)} rows, the best chosen on "
            f"{len(valid)} validation rows" if valid is not None
            else f"train: {config.epochs} epochs on {len(train)} rows (no validation rows)")
        result = fit(model, train, config, valid, progress=progress, checkpoint=ck)
    if refit:
        if ck is not None:
            ck.position = {**ck.position, "phase": "refit"}
            ck.outer["select"] = asdict(result)
        model = new_model()
        say(f"refit: {result.best_epoch} epochs (the best) on {len(refit_rows)} rows")
        refit = fit(model, refit_rows, replace(config, epochs=result.best_epoch), None,
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
    (docs/method.md). ``checkpoints``: write MODEL/checkpoint/wsabie.safetensors at the end of
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
        raise invalid("label_bias", f"must be auto, on or off, got {label_bias!r}")
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

        run = {"stage": "wsabie", "config": config.to_dict(), "label_bias": label_bias,
               "schema": found.schema.to_dict(),
               "vocab": tensor_digest(np.frombuffer(json.dumps(found.vocab.labels).encode(),
                                                    dtype=np.uint8)),
               "data": data_identity(train), "valid": data_identity(valid)}
        ck = open_checkpoint(model_dir, "wsabie", run, checkpoint_every, resume, report, world)
    holdout, refit_rows = None, None
    if valid is None and config.valid_fraction > 0:
        # the validation rows of every stage, carved once (docs/validation.md)
        if isinstance(train, ShuffleStream):
            if config.task != "annotation":
                raise AweError("--shuffle-buffer with --valid-fraction holds out whole rows, which "
                               "suits annotation only; for recommendation pass --valid FILE, or "
                               "train in memory (no --shuffle-buffer)")
            holdout, held = Holdout.carve(train.n_total, config.valid_fraction, config.task,
                                          config.seed, STREAM_VALID_MAX)
            all_rows, (train, valid) = train, train.split_held(held)
        else:
            holdout, held = Holdout.carve(train.labels, config.valid_fraction, config.task,
                                          config.seed)
            all_rows, (train, valid) = train, split_held(train, held, config.task)
        if config.refit:  # the held-out rows are then seen by stage 1: none left for stage 3
            holdout, refit_rows = replace(holdout, refit=True), all_rows
    model, result, train, valid = fit_selected(
        lambda: Wsabie(shape, config.init_scale, torch.Generator().manual_seed(config.seed),
                       0.0 if label_bias else None),
        train, config, valid, progress, ck, refit_rows,
        say=report if world.is_main and progress else None)
    if not world.is_main:  # the model is rank 0's to write (the weights are the same)
        return result, []
    written = save_wsabie(model_dir, model, found.schema, found.vocab, config,
                          holdout=holdout.to_dict() if holdout is not None else None)
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
_KEPT_ROUND = ".kept-round"  # the last kept round's files while a further round is tried
_ROUND_FILES = (INDEX_FILE, AFFINITY_FILE, artifacts.AWE_WEIGHTS, artifacts.CONFIG,
                artifacts.METRICS)


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
    write_card(model_dir, read_card(model_dir).stage1_only())
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
                label_bias: float | str | None = LABEL_BIAS_DEFAULT,
                budget: float = SEARCH_BUDGET,
                valid_path=None, progress: bool = False, checkpoints: bool = True,
                checkpoint_every: int = 0, resume: bool = False,
                report: Callable[[str], None] | None = None) -> tuple[FitResult, list]:
    """Stage 3 (``awe retrain``): f = (G + b) * (x U') . V'_y with the same loop as stage 1.

    U', V' start from stage 1 (``init="wsabie"``) or at random. ``rounds`` > 1 repeats
    build-g -> retrain, each time building G from the newest U' (the paper's step 4);
    ``"auto"`` goes on while a round raises the best validation P@k (at most
    ``AUTO_MAX_ROUNDS`` rounds) and keeps the best round's G and model.
    ``label_bias``: beta_y's start, None (the paper's model), or ``"auto"``: round 1 trained
    from each of :data:`LABEL_BIAS_CANDIDATES`, the best on validation kept. ``budget``: the
    seconds those choices may add (:data:`SEARCH_BUDGET`); the search's record goes to
    metrics.json ``awe.search``. A run killed during round 1's search starts the search again.
    Checkpoints as in :func:`train_wsabie` (MODEL/checkpoint/awe.safetensors); a round's start is
    checkpointed too, so a run killed while a later round rebuilds G resumes there.

    Under torchrun every process trains its share; rank 0 alone writes files and rebuilds G
    for a further round, which the others then read.
    """
    with dist_lib.session(resolve_device(config.device)) as world:
        return _retrain_awe(train_path, model_dir, config, world, init=init, rounds=rounds,
                            label_bias=label_bias, budget=budget, valid_path=valid_path,
                            progress=progress,
                            checkpoints=checkpoints, checkpoint_every=checkpoint_every,
                            resume=resume, report=report)


def _retrain_awe(train_path, model_dir, config: TrainConfig, world: World, *, init: str,
                 rounds: int | str, label_bias: float | str | None, budget: float,
                 valid_path, progress: bool,
                 checkpoints: bool, checkpoint_every: int, resume: bool,
                 report: Callable[[str], None] | None) -> tuple[FitResult, list]:

    if init not in INITS:
        raise invalid("init", f"must be one of {', '.join(INITS)}")
    max_rounds, auto_rounds = parse_rounds(rounds)
    bias_starts = label_bias_starts(label_bias)
    if not (isinstance(budget, (int, float)) and budget >= 0 and math.isfinite(budget)):
        raise invalid("budget", f"must be a number of seconds >= 0, got {budget!r}")
    model_dir = Path(model_dir)
    saved = load_wsabie(model_dir)
    if saved.card.stage2 is None:
        raise AweError(f"{model_dir}: no affinity weights G; run `awe build-g` first")
    task = saved.card.stage1.train.task
    if config.max_norm == "auto" and task == "recommendation":
        config = replace(config, max_norm=STAGE3_RECOMMENDATION_MAX_NORM)
    config = config.resolved(task, resolve_device(config.device))
    if config.threads:
        torch.set_num_threads(config.threads)
    affinity, g_train = Affinity.load(model_dir, saved.card.stage2, with_train_g=True)
    g_fingerprint = saved.card.stage2.fingerprint
    metrics_path = model_dir / artifacts.METRICS
    g_stats = artifacts.read_json(metrics_path).get("g", {}) if metrics_path.exists() else {}
    chosen_n = g_stats.get("neighbors_search")
    train = _training_rows(train_path, saved.schema, saved.vocab, config)
    streaming = isinstance(train, ShuffleStream)
    all_rows, keep, valid = train, None, None
    holdout = validation_holdout(saved.card, built=True)
    train_labels = train.labels() if streaming else train.labels
    if holdout is not None:
        # stage 1's validation rows: no stage trained on them and G's index leaves them out, so
        # their G is found as a new row's (docs/validation.md)
        if streaming and holdout.task != "annotation":
            raise AweError("--shuffle-buffer: stage 1 held out labels of each row "
                           "(recommendation), which a stream cannot leave out; retrain in memory "
                           "(no --shuffle-buffer)")
        held = holdout.again(train.n_total if streaming else train_labels, train_path)
        if streaming:
            train, valid = train.split_held(held)
            keep = kept_rows(all_rows.n_total, held, holdout.task)
            train_labels = train_labels.take(keep)
        else:
            train, valid = split_held(train, held, holdout.task)
            train_labels = train.labels
    _check_same_rows(len(train), train_labels, affinity, train_path, model_dir)
    validation = "holdout" if holdout is not None else None
    if valid_path is not None:
        valid, validation = load_examples(valid_path, saved.schema, saved.vocab,
                                          require_labels=False), "file"
    elif holdout is None and config.valid_fraction > 0:
        # stage 1 trained on every row (--valid FILE, no --valid-fraction, or --refit): stage 3
        # carves rows of its own from rows stage 1 saw, which U and G have seen
        validation = "rows stage 1 trained on"
        if report is not None and world.is_main:
            report("stage 1 left no unseen validation rows: stage 3 validates on rows stage 1 "
                   "trained on, and its valid P@k is optimistic (docs/validation.md)")
    if auto_rounds and (validation is None or (validation == "rows stage 1 trained on"
                                               and config.task == "recommendation")):
        # nothing to choose the rounds on; or held-out labels of rows whose U' (trained on every
        # label, x an identity) then makes G: the next round's G carries the held-out labels
        # (ML100K: valid P@10 0.123 -> 0.199 over 4 rounds while test P@10 fell 0.228 -> 0.209)
        max_rounds = 1
    # --refit after every choice: the validation rows join the training rows, with the G they
    # were validated with (in memory only)
    refit_held = config.refit and validation == "holdout" and not streaming
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
               "label_bias": label_bias, "stage1": saved.card.stage1.fingerprint,
               "data": data_identity(train), "valid": data_identity(valid)}
        ck = open_checkpoint(model_dir, "awe", run, checkpoint_every, resume, report, world)
        if ck.resuming:
            first_round = ck.saved_position["round"]
            history = ck.saved_outer["history"]
            start = ck.saved_outer_tensors()
            if "label_bias" in ck.saved_outer:  # chosen before the kill
                bias_starts = (ck.saved_outer["label_bias"],)
    resuming = ck is not None and ck.resuming
    if world.is_main and not resuming:
        _drop_kept_rounds(model_dir)  # left by a killed run that is not resumed
    selection = f"P@{config.selection_k}"
    # the kept round: its number, valid P@k (None: not validated) and stage metrics
    best: dict = ck.saved_outer.get("best") if resuming else None
    best = best or {"round": 0, "score": None, "metrics": {}}
    kept_result = None
    search = Search(budget)
    if valid is None:  # nothing to choose on: the first start
        bias_starts = bias_starts[:1]
    for round_no in range(first_round, max_rounds + 1):
        # decided on rank 0's clock: every rank must try the same candidates
        if round_no > 1 and auto_rounds and not world.broadcast_object(
                search.fits(extra=_g_seconds(g_stats))):
            search.skipped("rounds", round_no)
            if report is not None and world.is_main:
                report(f"round {round_no}: not tried, --budget {budget:g}s would be exceeded "
                       f"(a fit took {search.unit:.0f}s, G {_g_seconds(g_stats):.0f}s); kept "
                       f"round {best['round']}")
            break
        round_started = time.perf_counter()
        mid_round = ck is not None and ck.saved_at_or_after(round_no, "select")
        if ck is not None:
            ck.position = {"round": round_no, "phase": "start"}
            ck.outer = {"history": history, "best": best}
            if len(bias_starts) == 1:  # chosen (or given): a resumed run keeps it
                ck.outer["label_bias"] = bias_starts[0]
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
                        train_path, saved.schema, saved.vocab, affinity.rebuild_config(),
                        start["U"].clone(), start["V"].clone(), model_dir, holdout=holdout)
                else:
                    affinity, g_train, stats = build_affinity(
                        train, len(saved.vocab), affinity.rebuild_config(), start["U"].clone(),
                        start["V"].clone())
                if holdout is not None:  # built over the training part only
                    stats["holdout"] = holdout.digest
                if chosen_n is not None:  # the count stays the one chosen on stage 1's G
                    stats["neighbors_search"] = chosen_n
                g_stats = stats
                written += write_stage2(model_dir, affinity, g_train, stats,
                                        saved.card.stage2.train_path or str(train_path),
                                        f"awe round {round_no - 1}")
            world.barrier()  # the others read the G rank 0 built: one G for every rank
            if not world.is_main:
                affinity, g_train = Affinity.load(model_dir, read_card(model_dir).stage2,
                                                  with_train_g=True)
            g_fingerprint = affinity.fingerprint()
        if mid_round and ck.saved_outer.get("g_fingerprint") != g_fingerprint:
            raise AweError(f"{model_dir}: G changed since the checkpoint was written (build-g "
                           f"ran again?); run `awe retrain` without --resume")
        if ck is not None:
            ck.outer["g_fingerprint"] = g_fingerprint
        train_g = train.with_affinity(g_train if keep is None
                                      else expand_rows(g_train, keep, all_rows.n_total))
        valid_g = None if valid is None else valid.with_affinity(
            affinity.examples_affinity(valid))
        refit_rows = None
        if refit_held and holdout.task == "annotation":
            refit_rows = concat_examples([train_g, valid_g])
        elif refit_held:  # every user, with every label
            refit_rows = all_rows.with_affinity(g_train)

        def new_model(start=start, start_bias=None):
            model = AffinityWsabie(shape, bias, config.init_scale,
                                   torch.Generator().manual_seed(config.seed), start_bias)
            if init == "wsabie":
                model.load_tensors(start)
            return model

        if max_rounds > 1 and world.is_main and progress and report is not None:
            report(f"round {round_no}" + (": G from stage 1" if round_no == 1
                                          else f": G from round {round_no - 1}'s U'"))
        say = report if world.is_main and progress else None
        fits = []  # (start of beta, what fit_selected returned, valid P@k)
        for start_bias in bias_starts:
            if fits and not world.broadcast_object(search.fits()):
                search.skipped("label_bias_start", start_bias)
                continue
            if len(bias_starts) > 1 and say is not None:
                say(f"--label-bias-start auto: {_fmt_start(start_bias)}")
            t_fit = time.perf_counter()
            got = fit_selected(partial(new_model, start_bias=start_bias), train_g, config,
                               valid_g, progress, ck if len(bias_starts) == 1 else None,
                               refit_rows, say=say)
            search.spent(time.perf_counter() - t_fit, first=not fits)
            fits.append((start_bias, got, got[1].best_metrics.get(selection)))
        if len(bias_starts) > 1:
            start_chosen = world.broadcast_object(_best_start(fits)[0])  # rank 0 validates
            chosen = next(fit_ for fit_ in fits if fit_[0] == start_chosen)
            search.record("label_bias_start", selection, fits, chosen[0])
            if report is not None and world.is_main:
                report(f"--label-bias-start auto: {_fmt_start(chosen[0])}, by valid {selection} ("
                       + ", ".join(f"{_fmt_start(b)}: {_fmt(p)}" for b, _, p in fits) + ")")
            fits = [chosen]
            bias_starts = (chosen[0],)  # the later rounds keep it
            if ck is not None:
                ck.outer["label_bias"] = chosen[0]
                ck.save(None)  # a kill in round 1 from here on resumes without a new search
        label_bias, (model, result, fitted, validated), _ = fits[0]
        if round_no > 1:
            search.spent(time.perf_counter() - round_started)
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
            written += save_awe(model_dir, model, config, init=init, rounds=str(rounds),
                                round_no=round_no, label_bias_init=label_bias)
        best = {"round": round_no, "score": score,
                "metrics": {**_stage_metrics(result, fitted, validated, ck),
                            "validation": validation}}
        kept_result = result
        start = {k: v.clone() for k, v in model.state_tensors().items()}
    if not world.is_main:
        return result, []
    _drop_kept_rounds(model_dir)
    history_path = model_dir / artifacts.AWE_HISTORY
    artifacts.write_csv(history_path, history)
    all_metrics = artifacts.read_json(metrics_path) if metrics_path.exists() else {}
    all_metrics["awe"] = {**best["metrics"], "rounds": str(rounds), "round": best["round"],
                          "rounds_run": max(row["round"] for row in history)}
    if search.log:
        all_metrics["awe"]["search"] = search.summary()
    artifacts.write_json(metrics_path, all_metrics)
    if ck is not None:
        ck.remove()
    return result, sorted(set(written + [history_path, metrics_path]))


def label_bias_starts(label_bias: float | str | None) -> tuple[float | None, ...]:
    """The starts of beta' to try: ``"auto"`` gives :data:`LABEL_BIAS_CANDIDATES`."""
    if isinstance(label_bias, str) and label_bias.strip().lower() == "auto":
        return LABEL_BIAS_CANDIDATES
    if label_bias is None:
        return (None,)
    if isinstance(label_bias, bool) or not isinstance(label_bias, (int, float)) or not (
            math.isfinite(label_bias)):
        raise invalid("label_bias_start", f"must be a number, none or auto, got {label_bias!r}")
    return (float(label_bias),)


def _fmt_start(start: float | None) -> str:
    return "none" if start is None else f"{start:g}"


def _best_start(fits: list[tuple]) -> tuple:
    """The fit with the best validation P@k; the first wins a tie (and a missing score)."""
    best = fits[0]
    for fit_ in fits[1:]:
        if fit_[2] is not None and (best[2] is None or fit_[2] > best[2]):
            best = fit_
    return best


@dataclass
class Search:
    """Stage 3's ``auto`` choices within ``--budget``: what they cost and what they found.

    ``unit`` is the time of one stage-3 fit (the last measured); a further candidate is tried
    only if ``used + unit`` stays within the budget. The first candidate of a choice is the
    run's own work and is not counted."""

    budget: float
    unit: float | None = None
    used: float = 0.0
    log: dict = field(default_factory=dict)

    def fits(self, extra: float = 0.0) -> bool:
        """Whether one more fit (and ``extra`` seconds, a G rebuilt for a round) stays within
        the budget."""
        return self.unit is None or self.used + self.unit + extra <= self.budget

    def spent(self, seconds: float, first: bool = False) -> None:
        if first:
            self.unit = seconds
        else:
            self.used += seconds

    def skipped(self, what: str, value) -> None:
        self.log.setdefault(what, {}).setdefault("not_tried", []).append(value)

    def record(self, what: str, selection: str, fits: list[tuple], chosen) -> None:
        entry = self.log.setdefault(what, {})
        entry.update({"chosen": chosen,
                      f"valid_{selection}": {_fmt_start(b): p for b, _, p in fits}})

    def summary(self) -> dict:
        return {"budget": self.budget, "added_seconds": round(self.used, 2), **self.log}


def _g_seconds(stats: dict) -> float:
    """What building G took (its index, search and weights), from its metrics."""
    return sum(float(stats.get(k, 0.0)) for k in ("index_seconds", "search_seconds", "g_seconds"))


def _check_same_rows(n_rows: int, labels, affinity, train_path, model_dir) -> None:

    if n_rows != affinity.index.n_rows or labels_digest(labels) != labels_digest(
            affinity.train_labels):
        raise AweError(f"{train_path}: not the training data G was built on in {model_dir} "
                       f"({n_rows} rows vs {affinity.index.n_rows}); pass the same TRAIN to "
                       f"`awe build-g` and `awe retrain`")


# the stage-1 options stage 3 inherits when the three stages run as one (`awe fit`, AWE.fit):
# how to sample, validate and run, not what to learn (stage 3 has its own lr and epochs)
STAGE3_INHERITS = ("seed", "threads", "device", "negatives", "margin", "rank_weight", "optimizer",
                   "valid_fraction", "patience", "valid_k", "task", "batch_size", "refit")


def stage3_config(stage1: TrainConfig, **overrides) -> TrainConfig:
    """Stage 3's configuration in a three-stage run: its own defaults, the options it inherits
    from stage 1 (:data:`STAGE3_INHERITS`), then ``overrides``."""
    inherited = {name: getattr(stage1, name) for name in STAGE3_INHERITS}
    return replace(STAGE3_DEFAULTS, **{**inherited, **overrides})


def fit_pipeline(train_path, model_dir, stage1: TrainConfig = TrainConfig(),
                 affinity: AffinityConfig = AffinityConfig(), stage3: TrainConfig | None = None,
                 *, label_bias: bool | str = "auto",
                 label_bias_start: float | str | None = LABEL_BIAS_DEFAULT,
                 budget: float = SEARCH_BUDGET, init: str = "wsabie",
                 rounds: int | str = "auto", valid_path=None, columns: Columns | None = None,
                 progress: bool = False, report: Callable[[str], None] | None = None,
                 cluster=None) -> dict:
    """Stage 1 -> 2 -> 3 (``awe fit``, :meth:`awe.AWE.fit`): the one place they are chained.

    ``stage3`` defaults to :func:`stage3_config` of ``stage1``. Returns each stage's result
    and time: ``{"wsabie": FitResult, "g": stats, "awe": FitResult, "paths": [...],
    "seconds": {"train": ..., "build-g": ..., "retrain": ...}}``."""
    say = report or (lambda _: None)
    stage3 = stage3 if stage3 is not None else stage3_config(stage1)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    say("stage 1: Wsabie (WARP)")
    wsabie, paths = train_wsabie(train_path, model_dir, stage1, valid_path=valid_path,
                                 columns=columns, progress=progress, label_bias=label_bias,
                                 report=report)
    seconds["train"], t0 = round(time.perf_counter() - t0, 2), time.perf_counter()
    say("stage 2: neighbours and G")
    stats, g_paths = build_g(train_path, model_dir, affinity, cluster=cluster)
    seconds["build-g"], t0 = round(time.perf_counter() - t0, 2), time.perf_counter()
    say("stage 3: AWE")
    awe_result, awe_paths = retrain_awe(train_path, model_dir, stage3, init=init, rounds=rounds,
                                        label_bias=label_bias_start, budget=budget,
                                        valid_path=valid_path,
                                        progress=progress, report=report)
    seconds["retrain"] = round(time.perf_counter() - t0, 2)
    written = list(dict.fromkeys([*paths, *g_paths, *awe_paths]))
    return {"wsabie": wsabie, "g": stats, "awe": awe_result, "paths": written,
            "seconds": seconds}
