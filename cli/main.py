"""The ``awe`` command line: a thin typer layer over the ``awe`` library."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from awe import artifacts
from awe.affinity.g import AffinityConfig
from awe.affinity.stage import build_g as build_g_lib
from awe.dask_cluster import ClusterOptions
from awe.errors import AweError
from awe.io import datasets as datasets_lib
from awe.io.reader import Columns
from awe.io.svmlight import convert_svmlight
from awe.options import flag_name
from awe.pipeline import fit_pipeline, retrain_awe, stage3_config, train_wsabie
from awe.predict.batch import SCORE_BATCH_ROWS, ScoreOptions, score_files
from awe.predict.evaluation import evaluate_model
from awe.ranking.metrics import parse_ks
from awe.reproduce import reproduce as run_reproduce
from awe.training.config import (
    AUTO_MAX_ROUNDS,
    INITS,
    LABEL_BIAS_DEFAULT,
    LABEL_BIAS_START_HELP,
    SEARCH_BUDGET,
    SEARCH_BUDGET_HELP,
    STAGE3_DEFAULTS,
    STAGE3_ONLY,
    TrainConfig,
)
from awe.training.distributed import is_main_process, launched_size
from cli.options import config_flags

_TERMINAL = sys.stdout.isatty()
# on a terminal: rich help; elsewhere (pipes, logs, docs) click's plain help at full width
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="rich" if _TERMINAL else None,
                  context_settings={"show_default": True, "max_content_width": 100,
                                    **({} if _TERMINAL else {"terminal_width": 100})},
                  help="Affinity Weighted Embedding: Wsabie (WARP) training, nearest-neighbour "
                       "reweighting and evaluation on parquet files.")
# off a terminal (a pipe, a log file) rich would wrap at 80 columns
out = Console() if _TERMINAL else Console(width=200)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)
_state = {"debug": False}


# the commands that train on several processes under torchrun; the others write or print the
# same thing from every process, so they refuse
MULTI_PROCESS_COMMANDS = ("train", "retrain")


@app.callback()
def _main(ctx: typer.Context,
          debug: Annotated[bool, typer.Option(
              "--debug", help="Show tracebacks of errors (also AWE_DEBUG=1; the flag may come "
                              "anywhere on the line).")] = False) -> None:
    _state["debug"] = debug or os.environ.get("AWE_DEBUG", "") not in ("", "0")
    with user_errors():
        if ctx.invoked_subcommand not in MULTI_PROCESS_COMMANDS and launched_size() > 1:
            raise AweError(f"`awe {ctx.invoked_subcommand}` runs in one process; under torchrun "
                           f"only {' and '.join(MULTI_PROCESS_COMMANDS)} do (WORLD_SIZE is "
                           f"{launched_size()})")


@contextlib.contextmanager
def user_errors():
    """Print a user error as one line and exit 2; tracebacks only with --debug."""
    try:
        yield
    except AweError as exc:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {escape(_in_flags(exc))}", highlight=False,
                  soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted; files already written are complete (train / retrain: run "
                  "again with --resume to continue from the last checkpoint)", highlight=False)
        raise typer.Exit(130) from None


# library fields whose flag is not --field-name
_FLAG_OF_FIELD = {f.name: flag_name(f) for f in [*dataclasses.fields(TrainConfig),
                                                  *dataclasses.fields(AffinityConfig)]}
_FLAG_OF_FIELD["kind"] = "--index"  # IndexConfig.kind


def _in_flags(exc: AweError) -> str:
    """The error's text with the library field it names spelled as this command line's flag."""
    text = str(exc)
    if exc.field and text.startswith(exc.field):
        flag = _FLAG_OF_FIELD.get(exc.field, "--" + exc.field.replace("_", "-"))
        return flag + text[len(exc.field):]
    return text


def metrics_table(results: dict[str, dict[str, float]], title: str) -> Table:
    """Metrics down, the table's rows (wsabie, awe, ...) across: fits any terminal width."""
    table = Table(title=title)
    table.add_column("metric")
    for row_name in results:
        table.add_column(row_name, justify="right")
    for metric in next(iter(results.values())):
        table.add_row(metric, *(f"{results[r][metric]:.4f}" for r in results))
    return table


def _say(line: str) -> None:
    """A log line: on stderr, so that stdout holds only results (tables, JSON)."""
    err.print(line, highlight=False, soft_wrap=True)


def _wrote(paths) -> None:
    for p in paths:
        _say(f"wrote {p}")


ColumnOpt = Annotated[str, typer.Option(help="Column name (see the data contract).")]


data_app = typer.Typer(no_args_is_help=True,
                       help="Convert or generate a dataset into the data contract (parquet).")
app.add_typer(data_app, name="data")
OutDirOpt = Annotated[Path, typer.Option("--out", help="Directory for train.parquet and "
                                                       "test.parquet.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed.")]


def _made(paths) -> None:
    _wrote(paths if len(paths) <= 8 else [*paths[:3], f"... {len(paths) - 6} more ...",
                                          *paths[-3:]])


@data_app.command("synthetic")
def data_synthetic(
    out_dir: OutDirOpt,
    preset: Annotated[Literal["magnatagatune", "imagenet"], typer.Option(
        help="The shape of the paper's datasets to imitate.")] = "magnatagatune",
    rows: Annotated[int | None, typer.Option(help="Training rows (default: the preset's).")]
        = None,
    test_rows: Annotated[int | None, typer.Option(help="Test rows (default: the preset's).")]
        = None,
    classes: Annotated[int | None, typer.Option(help="Labels (default: the preset's).")] = None,
    shards: Annotated[int | None, typer.Option(
        help="Write train/ and test/ directories of this many parquet shards, generated a row "
             "group at a time (for data larger than memory).")] = None,
    seed: SeedOpt = 0,
) -> None:
    """Generate a synthetic dataset shaped like one of the paper's (embedded, no download)."""
    with user_errors():
        _made(datasets_lib.make_dataset("synthetic", out_dir, preset=preset, seed=seed,
                                        rows=rows, test_rows=test_rows, classes=classes,
                                        shards=shards))


@data_app.command("fashion-mnist")
def data_fashion_mnist(
    out_dir: OutDirOpt,
    source: Annotated[Path, typer.Option(help="The folder of the IDX files.")]
        = Path(datasets_lib.FASHION_MNIST_DEFAULT),
) -> None:
    """Fashion-MNIST (annotation: 10 classes of 28 x 28 images) from its IDX files."""
    with user_errors():
        _made(datasets_lib.make_dataset("fashion-mnist", out_dir, source=source))


@data_app.command("movielens")
def data_movielens(
    out_dir: OutDirOpt,
    source: Annotated[Path, typer.Option(help="The GroupLens ml-100k folder (u.data).")],
    seed: SeedOpt = 0,
) -> None:
    """MovieLens 100K as implicit feedback (recommendation: users -> movies rated >= 4)."""
    with user_errors():
        _made(datasets_lib.make_dataset("movielens", out_dir, source=source, seed=seed))


@data_app.command("svmlight")
def data_svmlight(
    file: Annotated[Path, typer.Argument(
        metavar="FILE", help="A LIBSVM / Extreme Classification Repository multi-label file "
                             "(.gz, .bz2, .xz too).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory: FILE's rows go to "
                                                        "OUT/NAME/part-*.parquet.")],
    shard_rows: Annotated[int | None, typer.Option(help="Rows per parquet file (default: one "
                                                        "file).")] = None,
    zero_based: Annotated[bool | None, typer.Option(
        "--zero-based/--one-based", show_default=False,
        help="Feature ids start at 0 or at 1 (default: zero-based when some id is 0).")] = None,
    task: Annotated[Literal["annotation", "recommendation"], typer.Option(
        help="Recorded in the files for training.")] = "annotation",
) -> None:
    """Convert `l1,l2 f:v f:v` lines (with or without the `N D L` header) into the contract:
    feature_ids, feature_values, labels (integers) and id (the line's row number)."""
    with user_errors():
        summary = convert_svmlight(file, out_dir, shard_rows=shard_rows, zero_based=zero_based,
                                   task=task)
        _say(f"{summary.rows} rows, {summary.n_features} features, {summary.n_labels} labels"
             + (f"; {summary.rows_without_labels} rows without labels (training needs a label "
                f"on every row: drop them, or use those files for scoring)"
                if summary.rows_without_labels else ""))
        _made(summary.files)


# Options of the training commands that steer the run rather than set a hyper-parameter.
_RUN_OPTIONS = {
    "valid": Annotated[str | None, typer.Option(
        help="Validation parquet (instead of holding out --valid-fraction of TRAIN).")],
    "quiet": Annotated[bool, typer.Option("--quiet", help="No progress display.")],
    "resume": Annotated[bool, typer.Option(
        "--resume", help="Continue the interrupted run from MODEL/checkpoint/ (same options "
                         "and data; --lr, --epochs, --patience may change).")],
    "checkpoint_every": Annotated[int, typer.Option(
        help="Also checkpoint every N batches (0: at the end of every epoch only).")],
    "checkpoint": Annotated[bool, typer.Option(
        "--checkpoint/--no-checkpoint",
        help="Write MODEL/checkpoint/ during training (removed when the model is written).")],
}
_RUN_DEFAULTS = {"valid": None, "quiet": False, "resume": False, "checkpoint_every": 0,
                 "checkpoint": True}


def _run_options(options: dict) -> dict:
    """Keyword arguments of train_wsabie / retrain_awe from the run options."""
    if options["resume"] and not options["checkpoint"]:
        raise AweError("--resume needs checkpoints: drop --no-checkpoint")
    return {"valid_path": options["valid"], "progress": not options["quiet"],
            "checkpoints": options["checkpoint"], "checkpoint_every": options["checkpoint_every"],
            "resume": options["resume"], "report": _say}


def run_options(command):
    """Add the run options to a command; it receives them as ``run``."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "run"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                default=_RUN_DEFAULTS[name])
              for name, annotation in _RUN_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(**kwargs):
        options = {name: kwargs.pop(name) for name in _RUN_OPTIONS}
        return command(**kwargs, run=options)

    wrapper.__signature__ = signature.replace(parameters=own + shared)
    return wrapper


def _train_config(make, run: dict, **more):
    """The stage's config from its flags; a --valid file replaces the held-out fraction."""
    if run["valid"]:
        more["valid_fraction"] = 0.0
    return make(**more)


def _fit_summary(result) -> None:
    if not is_main_process():  # under torchrun, rank 0 speaks for all
        return
    best = result.best_metrics
    summary = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if k.startswith("P@"))
    _say(f"best epoch {result.best_epoch} ({result.seconds:.1f}s)"
         + (f": valid {summary}" if summary else ""))


LabelBiasOpt = Annotated[Literal["auto", "on", "off"], typer.Option(
    help="Stage 1: learn a per-label offset, f = (x U).V_y + beta_y (LightFM's item bias); off "
         "is the paper's Wsabie; auto: on for annotation, off for recommendation.")]


def _columns_option(command):
    """Add the column-name flags of the data contract; the command receives ``columns``."""
    names = {"features_col": "features", "feature_ids_col": "feature_ids",
             "feature_values_col": "feature_values", "labels_col": "labels",
             "exclude_col": "exclude", "id_col": "id"}
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "columns"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ColumnOpt,
                               default=default) for name, default in names.items()]

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = [kwargs.pop(name) for name in names]
        return command(**kwargs, columns=Columns(*values))

    wrapper.__signature__ = signature.replace(parameters=own + added)
    return wrapper


def _bias_flag(label_bias: str) -> bool | str:
    return {"on": True, "off": False}.get(label_bias, label_bias)


@app.command()
@run_options
@_columns_option
@config_flags(TrainConfig, exclude=STAGE3_ONLY)
def train(
    train_path: Annotated[str, typer.Argument(metavar="TRAIN",
                                              help="Parquet file, directory or glob.")],
    model: Annotated[Path, typer.Option(help="Model directory to write.")],
    label_bias: LabelBiasOpt = "auto",
    config=None, columns: Columns | None = None, run: dict | None = None,
) -> None:
    """Stage 1: train a Wsabie embedding with WARP; writes the model directory."""
    with user_errors():
        result, paths = train_wsabie(train_path, model, _train_config(config, run),
                                     label_bias=_bias_flag(label_bias), columns=columns,
                                     **_run_options(run))
        _fit_summary(result)
        _wrote(paths)


def _auto_int(value: str, option: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise AweError(f"{option} must be an integer or auto, got {value!r}") from None


SchedulerOpt = Annotated[str | None, typer.Option(
    help="Run on this running Dask scheduler (e.g. tcp://host:8786); workers must see the same "
         "files. Needs `pip install 'awe\\[dask]'`.")]
WorkersOpt = Annotated[int | None, typer.Option(
    help="Run on a local Dask cluster of this many worker processes (needs "
         "`pip install 'awe\\[dask]'`).")]


@app.command("build-g")
@config_flags(AffinityConfig)
def build_g(
    train_path: Annotated[str, typer.Argument(metavar="TRAIN", help="The training parquet of "
                                                                    "stage 1.")],
    model: Annotated[Path, typer.Option(help="Model directory (from `awe train`).")],
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    config=None,
) -> None:
    """Stage 2: find every training row's neighbours and build the affinity weights G."""
    with user_errors():
        stats, paths = build_g_lib(train_path, model, config(),
                                   cluster=ClusterOptions.from_options(scheduler, workers))
        _g_summary(stats)
        _wrote(paths)


def _g_summary(stats: dict) -> None:
    search = stats.get("neighbors_search")
    if search is not None:
        key = next(k for k in search if k.startswith("valid_P@"))
        _say(f"--neighbors auto: {search['chosen']}, by G's {key[6:]} on "
             f"{search['valid_rows']} validation rows (" + ", ".join(
                 f"{n}: {p:.4f}" for n, p in search[key].items()) + ")")
    _say(f"G over {stats['rows']} rows: {stats['index']} index, recall@{stats['neighbors']} "
         f"{stats['recall@n']:.4f}, lambda {stats['lambda']:.4g}, {stats['labels_per_row']} "
         f"labels per row "
         f"({stats['index_seconds'] + stats['search_seconds'] + stats['g_seconds']:.1f}s)")


InitOpt = Annotated[Literal[INITS], typer.Option(
    help="Stage 3 starts from stage 1's U, V (wsabie) or at random.")]
RoundsOpt = Annotated[str, typer.Option(
    help="N: build-g -> retrain N times, each G from the newest model (the paper's step 4). "
         f"auto: go on while a round raises the best validation P@k, at most {AUTO_MAX_ROUNDS} "
         "rounds, and keep the best round's G and model.")]
LabelBiasStartOpt = Annotated[str, typer.Option(help=LABEL_BIAS_START_HELP)]
BudgetOpt = Annotated[float, typer.Option(help=SEARCH_BUDGET_HELP, metavar="SECONDS")]


def _bias_start(text: str) -> float | str | None:
    if text.strip().lower() in ("none", "auto"):
        return None if text.strip().lower() == "none" else "auto"
    try:
        return float(text)
    except ValueError:
        raise AweError(f"--label-bias-start {text!r}: expected a number, none or auto") from None


@app.command()
@run_options
@config_flags(TrainConfig, defaults=STAGE3_DEFAULTS, exclude=("dim", "task", "init_scale"))
def retrain(
    train_path: Annotated[str, typer.Argument(metavar="TRAIN", help="The training parquet G "
                                                                    "was built on.")],
    model: Annotated[Path, typer.Option(help="Model directory (after `awe build-g`).")],
    init: InitOpt = "wsabie",
    rounds: RoundsOpt = "auto",
    label_bias_start: LabelBiasStartOpt = str(LABEL_BIAS_DEFAULT),
    budget: BudgetOpt = SEARCH_BUDGET,
    config=None, run: dict | None = None,
) -> None:
    """Stage 3: retrain the G-weighted model with WARP; writes awe.safetensors."""
    with user_errors():
        result, paths = retrain_awe(train_path, model, _train_config(config, run), init=init,
                                    rounds=rounds, label_bias=_bias_start(label_bias_start),
                                    budget=budget,
                                    **_run_options(run))
        _fit_summary(result)
        _wrote(paths)


@app.command()
@_columns_option
@config_flags(AffinityConfig, exclude=("seed", "threads"), name="affinity", prefix="g_")
@config_flags(TrainConfig, exclude=STAGE3_ONLY)
def fit(
    train_path: Annotated[str, typer.Argument(metavar="TRAIN",
                                              help="Parquet file, directory or glob.")],
    model: Annotated[Path, typer.Option(help="Model directory to write.")],
    valid: Annotated[str | None, typer.Option(
        help="Validation parquet (instead of holding out --valid-fraction of TRAIN).")] = None,
    label_bias: LabelBiasOpt = "auto",
    init: InitOpt = "wsabie",
    rounds: RoundsOpt = "auto",
    label_bias_start: LabelBiasStartOpt = str(LABEL_BIAS_DEFAULT),
    budget: BudgetOpt = SEARCH_BUDGET,
    stage3_lr: Annotated[float, typer.Option(help="Stage 3's learning rate.")]
        = STAGE3_DEFAULTS.lr,
    stage3_epochs: Annotated[int, typer.Option(help="Stage 3's maximum epochs.")]
        = STAGE3_DEFAULTS.epochs,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress display.")] = False,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    config=None, affinity=None, columns: Columns | None = None,
) -> None:
    """All three stages: train (Wsabie), build-g (G) and retrain (AWE) into one model directory.

    The training flags set stage 1; stage 3 takes its own --stage3-lr and --stage3-epochs and
    inherits the others (seed, threads, negatives, validation, ...). The flags of G are those of
    `awe build-g`."""
    with user_errors():
        stage1 = _train_config(config, {"valid": valid})
        g_config = affinity(seed=stage1.seed, threads=stage1.threads)
        stage3 = stage3_config(stage1, lr=stage3_lr, epochs=stage3_epochs)
        result = fit_pipeline(train_path, model, stage1, g_config, stage3,
                              label_bias=_bias_flag(label_bias),
                              label_bias_start=_bias_start(label_bias_start), budget=budget,
                              init=init,
                              rounds=rounds, valid_path=valid, columns=columns,
                              progress=not quiet, report=_say,
                              cluster=ClusterOptions.from_options(scheduler, workers))
        _fit_summary(result["wsabie"])
        _g_summary(result["g"])
        _fit_summary(result["awe"])
        _wrote(result["paths"])


@app.command("eval")
def eval_(
    test_path: Annotated[str, typer.Argument(metavar="TEST", help="Parquet file, directory or "
                                                                  "glob.")],
    model: Annotated[Path, typer.Option(help="Model directory.")],
    k: Annotated[str, typer.Option(help="Comma-separated cut-offs.")] = "1,3,5,10",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the metrics here.")]
        = None,
    methods: Annotated[str | None, typer.Option(
        help="Comma-separated methods (the table's rows): knn-input, knn-wsabie, wsabie, awe "
             "(default: all the model has).")] = None,
    train: Annotated[str | None, typer.Option(
        "--train", help="Training parquet for the knn-input row (default: the one given to "
                        "build-g).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
) -> None:
    """Evaluate P@k, R@k, NDCG@k and MAP@k on a test set."""
    with user_errors():
        try:
            ks = parse_ks(k)
        except ValueError as exc:
            raise AweError(f"--k {k!r}: {exc}") from None
        results = evaluate_model(model, test_path, ks,
                                 rows=methods.split(",") if methods else None,
                                 threads=threads, train_path=train)
        out.print(metrics_table(results, title=str(test_path)))
        if json_path is not None:
            artifacts.write_json(json_path, results)
            _wrote([json_path])


@app.command()
def score(
    input_path: Annotated[str, typer.Argument(
        metavar="INPUT", help="Parquet file, directory or glob of rows to score.")],
    model: Annotated[Path, typer.Option(help="Model directory.")],
    out_path: Annotated[Path, typer.Option(
        "--out", help="Output parquet file for a single input file; otherwise a directory that "
                      "gets one output per input file, at its path relative to INPUT.")],
    k: Annotated[int, typer.Option(help="Labels per row.")] = 10,
    stage: Annotated[Literal["wsabie", "awe"] | None, typer.Option(
        help="The model stage that scores (default: the newest the model has).")] = None,
    id_col: Annotated[list[str] | None, typer.Option(
        help="Column carried through to the output (repeatable; default: 'id' when "
             "present).")] = None,
    exclude_col: Annotated[str | None, typer.Option(
        help="List column of labels never ranked for its row, e.g. seen items (default: "
             "'exclude' when present).")] = None,
    batch_rows: Annotated[int, typer.Option(help="Rows scored at a time.")] = SCORE_BATCH_ROWS,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for torch and FAISS (per worker with --workers / --scheduler).")]
        = None,
    screen: Annotated[bool | None, typer.Option(
        "--screen/--no-screen", show_default=False,
        help="Rank with the exact bfloat16 screen (the float32 top k, faster) or compute every "
             "label's score in float32 (default: the screen where the CPU multiplies bfloat16 "
             "natively).")] = None,
    skip_invalid: Annotated[bool, typer.Option(
        help="Rows with invalid features (NaN, wrong width, ids out of range, nulls) go to "
             "OUTPUT_STEM.rejects.parquet (file, row, column, reason, ids) next to their output, "
             "and the rest is scored. Without it the first such row fails the file with its "
             "file and row, and no partial output is left.")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Score every input again, even those whose output is complete and current "
             "(same model, options and input).")] = False,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Batch-score parquet rows to top-k labels (parquet: ids, labels, scores), streaming.

    Outputs are written to a temporary name and renamed; run again to finish an interrupted
    run: outputs already complete for the same model and options are skipped."""
    with user_errors():
        options = ScoreOptions(k=k, stage=stage,
                               id_cols=tuple(id_col) if id_col else None,
                               exclude_col=exclude_col, batch_rows=batch_rows,
                               skip_invalid=skip_invalid, overwrite=overwrite, threads=threads,
                               screen=screen)
        summary = score_files(input_path, model, out_path, options,
                              cluster=ClusterOptions.from_options(scheduler, workers),
                              report=_say)
        if summary.skipped:
            _say(f"skipped {len(summary.skipped)} output(s) already complete for this model "
                 f"(--overwrite to score again)")
        if summary.written:
            extra = f", {summary.rejected} rejected" if summary.rejected else ""
            _say(f"scored {summary.rows} rows into {len(summary.written)} file(s){extra}")


@app.command()
def reproduce(
    dataset: Annotated[str, typer.Option(
        help="magnatagatune | imagenet (synthetic presets) | fashion-mnist | movielens | a "
             "directory with train and test parquet (files or folders).")] = "magnatagatune",
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Report directory (default: awe-reproduce/DATASET).")] = None,
    train: Annotated[str | None, typer.Option(
        "--train", help="Training parquet (with --test, instead of --dataset).")] = None,
    test: Annotated[str | None, typer.Option("--test", help="Test parquet.")] = None,
    source: Annotated[Path | None, typer.Option(
        help="Raw files: the fashion-mnist IDX folder or the movielens ml-100k folder (movielens "
             "downloads from GroupLens without it).")] = None,
    rows: Annotated[int | None, typer.Option(help="Synthetic presets: training rows.")] = None,
    test_rows: Annotated[int | None, typer.Option(help="Synthetic presets: test rows.")] = None,
    classes: Annotated[int | None, typer.Option(help="Synthetic presets: labels.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the data and every stage.")] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    paper: Annotated[bool, typer.Option(
        "--paper", help="Also train the paper's own model (no label biases, G's raw sums) and "
                        "report its rows beside the defaults'.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress display.")] = False,
) -> None:
    """The paper's table end to end: data -> train -> build-g -> retrain -> eval, with the
    paper's stage 2 and the tool's defaults; writes a report (Markdown, CSV, JSON, configs,
    plots) with the paper's numbers beside the measured ones."""
    with user_errors():
        if out_dir is None:
            name = "custom" if train is not None else Path(dataset).name or "custom"
            out_dir = Path("awe-reproduce") / name
        report = run_reproduce(dataset, out_dir, source=source, train=train, test=test,
                               rows=rows, test_rows=test_rows, classes=classes, seed=seed,
                               threads=threads, progress=not quiet, paper=paper)
        table = Table(title=report.title)
        for number, column in enumerate(report.table_head()):
            table.add_column(column, justify="right" if number else "left")
        for name, cells in report.table_rows():
            table.add_row(name, *cells)
        out.print(table)
        _say("  ".join(f"{name} {sec:.1f}s" for name, sec in report.seconds.items())
             + f"  | total {sum(report.seconds.values()):.1f}s")
        _wrote(report.files)


def main(argv: list[str] | None = None) -> None:
    """The console entry (`awe`, `python -m awe`): --debug may come anywhere on the line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args[1:]:
        args = ["--debug", *(a for a in args if a != "--debug")]
    app(args=args, prog_name="awe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

