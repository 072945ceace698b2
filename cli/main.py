"""The ``awe`` command line: a thin typer layer over the ``awe`` library."""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from awe.dask_cluster import ClusterOptions
from awe.errors import AweError
from awe.io import datasets as datasets_lib
from awe.io.reader import Columns
from awe.neighbors.index import DEFAULT_TARGET_RECALL
from awe.training.config import AUTO_MAX_ROUNDS, LABEL_BIAS_DEFAULT

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Affinity Weighted Embedding: Wsabie (WARP) training, nearest-neighbour "
                       "reweighting and evaluation on parquet files.")
out = Console()
err = Console(stderr=True)
_state = {"debug": False}


# the commands that train on several processes under torchrun; the others write or print the
# same thing from every process, so they refuse
MULTI_PROCESS_COMMANDS = ("train", "retrain")


@app.callback()
def _main(ctx: typer.Context,
          debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]
          = False) -> None:
    from awe.training.distributed import launched_size

    _state["debug"] = debug
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
        from rich.markup import escape
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted; files already written are complete (train / retrain: run "
                  "again with --resume to continue from the last checkpoint)", highlight=False)
        raise typer.Exit(130) from None


def metrics_table(results: dict[str, dict[str, float]], title: str) -> Table:
    """Metrics down, the table's rows (wsabie, awe, ...) across: fits any terminal width."""
    table = Table(title=title)
    table.add_column("metric")
    for row_name in results:
        table.add_column(row_name, justify="right")
    for metric in next(iter(results.values())):
        table.add_row(metric, *(f"{results[r][metric]:.4f}" for r in results))
    return table


def _wrote(paths) -> None:
    for p in paths:
        out.print(f"wrote {p}", highlight=False)


ColumnOpt = Annotated[str, typer.Option(help="Column name (see the data contract).")]


def _columns(features: str, feature_ids: str, feature_values: str, labels: str, exclude: str,
             id_col: str) -> Columns:
    return Columns(features, feature_ids, feature_values, labels, exclude, id_col)


@app.command()
def data(
    name: Annotated[str, typer.Argument(help="synthetic | fashion-mnist | movielens")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for train.parquet and "
                                                        "test.parquet.")],
    source: Annotated[Path | None, typer.Option(help="Raw files (fashion-mnist IDX folder, "
                                                     "movielens ml-100k folder).")] = None,
    preset: Annotated[str, typer.Option(help="synthetic: magnatagatune | imagenet")]
        = "magnatagatune",
    rows: Annotated[int | None, typer.Option(help="synthetic: training rows")] = None,
    test_rows: Annotated[int | None, typer.Option(help="synthetic: test rows")] = None,
    classes: Annotated[int | None, typer.Option(help="synthetic: number of labels")] = None,
    shards: Annotated[int | None, typer.Option(
        help="synthetic: write train/ and test/ directories of this many parquet shards, "
             "generated a row group at a time (for data larger than memory).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Convert or generate a dataset into the data contract (train.parquet, test.parquet)."""
    with user_errors():
        paths = datasets_lib.make_dataset(name, out_dir, source=source, preset=preset, seed=seed,
                                          rows=rows, test_rows=test_rows, classes=classes,
                                          shards=shards)
        _wrote(paths if len(paths) <= 8 else [*paths[:3], f"... {len(paths) - 6} more ...",
                                              *paths[-3:]])


# Options shared by the two training stages (train, retrain): name -> annotated type.
_TRAIN_OPTIONS = {
    "valid": Annotated[str | None, typer.Option(help="Validation parquet (else "
                                                     "--valid-fraction).")],
    "valid_fraction": Annotated[float, typer.Option(
        help="Hold out this fraction for validation: whole rows (annotation) or a fraction of "
             "each row's labels (recommendation).")],
    "epochs": Annotated[int | None, typer.Option(help="Maximum epochs.")],
    "lr": Annotated[float | None, typer.Option(help="Learning rate.")],
    "negatives": Annotated[int | None, typer.Option(
        help="WARP sampling budget K: negatives drawn per positive at most.")],
    "margin": Annotated[float | None, typer.Option(help="WARP margin.")],
    "max_norm": Annotated[float | None, typer.Option(help="Project rows of U, V to norm <= C.")],
    "weight_decay": Annotated[float | None, typer.Option(help="L2 on touched rows.")],
    "rank_weight": Annotated[str | None, typer.Option(help="harmonic (paper) | log (LightFM).")],
    "optimizer": Annotated[str | None, typer.Option(help="adagrad | sgd.")],
    "batch_size": Annotated[int | None, typer.Option(help="Positive pairs per step.")],
    "patience": Annotated[int | None, typer.Option(help="Early stopping patience (epochs).")],
    "valid_k": Annotated[int | None, typer.Option(help="Pick the best epoch by valid P@k.")],
    "refit": Annotated[bool | None, typer.Option(
        "--refit/--no-refit",
        help="After picking the epoch on --valid-fraction, train a new model on every row for "
             "that many epochs (default); --no-refit keeps the best epoch's weights, trained on "
             "the other rows (about half the passes).")],
    "seed": Annotated[int | None, typer.Option(help="Random seed.")],
    "threads": Annotated[int | None, typer.Option(help="CPU threads for torch.")],
    "device": Annotated[str | None, typer.Option(help="cpu | cuda (default: cuda if "
                                                      "available).")],
    "shuffle_buffer": Annotated[int | None, typer.Option(
        help="Stream TRAIN instead of loading it: shards in a seeded random order, rows "
             "shuffled in a buffer of this many rows (memory: buffer + model).")],
    "quiet": Annotated[bool, typer.Option(help="No progress display.")],
    "resume": Annotated[bool, typer.Option(
        help="Continue the interrupted run from MODEL/checkpoint/ (same options and data; --lr, "
             "--epochs, --patience may change).")],
    "checkpoint_every": Annotated[int, typer.Option(
        help="Also checkpoint every N batches (0: at the end of every epoch only).")],
    "checkpoint": Annotated[bool, typer.Option(
        "--checkpoint/--no-checkpoint",
        help="Write MODEL/checkpoint/ during training (removed when the model is written).")],
}
_TRAIN_DEFAULTS = {"valid_fraction": 0.1, "quiet": False, "resume": False, "checkpoint_every": 0,
                   "checkpoint": True}
# the shared options that steer the run rather than set a hyper-parameter of TrainConfig
_RUN_OPTIONS = ("valid", "quiet", "resume", "checkpoint_every", "checkpoint")


def _run_options(options: dict) -> dict:
    """Keyword arguments of train_wsabie / retrain_awe from the shared run options."""
    if options["resume"] and not options["checkpoint"]:
        raise AweError("--resume needs checkpoints: drop --no-checkpoint")
    return {"valid_path": options["valid"], "progress": not options["quiet"],
            "checkpoints": options["checkpoint"], "checkpoint_every": options["checkpoint_every"],
            "resume": options["resume"],
            "report": lambda line: out.print(line, highlight=False, soft_wrap=True)}


def training_options(command):
    """Add the shared training options to a command; it receives them as ``train_options``."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "train_options"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                default=_TRAIN_DEFAULTS.get(name))
              for name, annotation in _TRAIN_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(**kwargs):
        options = {name: kwargs.pop(name) for name in _TRAIN_OPTIONS}
        return command(**kwargs, train_options=options)

    wrapper.__signature__ = signature.replace(parameters=own + shared)
    return wrapper


def _train_config(options: dict, base=None, **more):
    from awe.training.config import TrainConfig, with_overrides

    settings = {k: v for k, v in options.items() if k not in _RUN_OPTIONS}
    if options["valid"]:
        settings["valid_fraction"] = 0.0
    return with_overrides(base or TrainConfig(), **settings, **more)


def _fit_summary(result) -> None:
    from awe.training.distributed import is_main_process

    if not is_main_process():  # under torchrun, rank 0 speaks for all
        return
    best = result.best_metrics
    summary = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if k.startswith("P@"))
    out.print(f"best epoch {result.best_epoch} ({result.seconds:.1f}s)"
              + (f": valid {summary}" if summary else ""), highlight=False)


@app.command()
@training_options
def train(
    train_path: Annotated[str, typer.Argument(metavar="TRAIN",
                                              help="Parquet file, directory or glob.")],
    model: Annotated[Path, typer.Option(help="Model directory to write.")],
    task: Annotated[str | None, typer.Option(
        help="annotation | recommendation (default: recorded by `awe data`, else annotation).")]
        = None,
    dim: Annotated[int | None, typer.Option(help="Embedding dimension D.")] = None,
    label_bias: Annotated[str, typer.Option(
        help="auto | on | off: learn a per-label offset, f = (x U).V_y + beta_y (LightFM's item "
             "bias); off is the paper's Wsabie; auto: on for annotation, off for "
             "recommendation.")] = "auto",
    features_col: ColumnOpt = "features", feature_ids_col: ColumnOpt = "feature_ids",
    feature_values_col: ColumnOpt = "feature_values", labels_col: ColumnOpt = "labels",
    exclude_col: ColumnOpt = "exclude", id_col: ColumnOpt = "id",
    train_options: dict | None = None,
) -> None:
    """Stage 1: train a Wsabie embedding with WARP; writes the model directory."""
    from awe.pipeline import train_wsabie

    with user_errors():
        config = _train_config(train_options, dim=dim, task=task)
        result, paths = train_wsabie(
            train_path, model, config,
            label_bias={"on": True, "off": False}.get(label_bias, label_bias),
            columns=_columns(features_col, feature_ids_col, feature_values_col, labels_col,
                             exclude_col, id_col), **_run_options(train_options))
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
def build_g(
    train_path: Annotated[str, typer.Argument(metavar="TRAIN", help="The training parquet of "
                                                                    "stage 1.")],
    model: Annotated[Path, typer.Option(help="Model directory (from `awe train`).")],
    neighbors: Annotated[str, typer.Option(
        help="Neighbours per row (n); auto: 20 (annotation), 100 (recommendation).")] = "auto",
    kernel: Annotated[str, typer.Option(
        help="gaussian | embedded-gaussian | cosine | dot | uniform.")] = "gaussian",
    lam: Annotated[float | None, typer.Option(
        "--lambda", help="Gaussian scale (default: 1 / median squared neighbour distance).")]
        = None,
    aggregate: Annotated[str, typer.Option(help="sum | max over neighbours.")] = "sum",
    bias: Annotated[float, typer.Option(help="b in f = (G + b) (xU').V'_y: weight of labels "
                                             "no neighbour carries.")] = 0.0,
    space: Annotated[str, typer.Option(help="wsabie (x U) | input (x itself, G_orig).")]
        = "wsabie",
    label_kernel: Annotated[str, typer.Option(
        help="exact | embedding: exp(-lambda_y |V y - V y_i|^2) instead of the label match.")]
        = "exact",
    label_lambda: Annotated[float | None, typer.Option(help="lambda_y of --label-kernel "
                                                            "embedding.")] = None,
    label_top: Annotated[int, typer.Option(help="Labels kept per row with --label-kernel "
                                                "embedding.")] = 64,
    normalize: Annotated[str, typer.Option(
        help="max | none: max divides each row of G by its largest weight, so stage 3 sees "
             "every row on one scale.")] = "max",
    index: Annotated[str, typer.Option(
        help="auto | flat | bf16 | ivf | hnsw. bf16 scores every row from bfloat16 copies "
             "(fast on CPUs with AMX or AVX512-BF16) and re-ranks the best in float32.")]
        = "auto",
    nprobe: Annotated[int | None, typer.Option(help="IVF lists searched.")] = None,
    ef_search: Annotated[int | None, typer.Option(help="HNSW search breadth.")] = None,
    rerank: Annotated[int | None, typer.Option(
        help="bf16 index: candidates beyond --neighbors re-ranked in float32.")] = None,
    target_recall: Annotated[float, typer.Option(
        help="Recall@n that the IVF/HNSW/bf16 search breadth is calibrated to reach (on a "
             "sample); lower is faster at scale. --index auto goes from IVF to bf16 (or "
             "exact) search when reaching it needs more than 1/12 of the IVF lists.")]
        = DEFAULT_TARGET_RECALL,
    seed: Annotated[int, typer.Option(help="Random seed (IVF clustering).")] = 0,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for FAISS (per Dask worker with --workers / --scheduler).")] = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Stage 2: find every training row's neighbours with FAISS and build G."""
    from awe.affinity.g import AffinityConfig
    from awe.affinity.stage import build_g as build_g_lib

    with user_errors():
        config = AffinityConfig(neighbors=_auto_int(neighbors, "--neighbors"), kernel=kernel,
                                lam=lam, aggregate=aggregate,
                                bias=bias, space=space, label_kernel=label_kernel,
                                label_lambda=label_lambda, label_top=label_top,
                                normalize=normalize, index=index,
                                nprobe=nprobe, ef_search=ef_search, rerank=rerank,
                                target_recall=target_recall, seed=seed, threads=threads)
        stats, paths = build_g_lib(train_path, model, config,
                                   cluster=ClusterOptions.from_options(scheduler, workers))
        out.print(f"G over {stats['rows']} rows: {stats['index']} index, "
                  f"recall@{stats['neighbors']} "
                  f"{stats['recall@n']:.4f}, lambda {stats['lambda']:.4g}, "
                  f"{stats['labels_per_row']} labels per row "
                  f"({stats['index_seconds'] + stats['search_seconds'] + stats['g_seconds']:.1f}s)",
                  highlight=False)
        _wrote(paths)


@app.command()
@training_options
def retrain(
    train_path: Annotated[str, typer.Argument(metavar="TRAIN", help="The training parquet G "
                                                                    "was built on.")],
    model: Annotated[Path, typer.Option(help="Model directory (after `awe build-g`).")],
    init: Annotated[str, typer.Option(help="wsabie (start from stage 1) | random.")] = "wsabie",
    rounds: Annotated[str, typer.Option(
        help="N: build-g -> retrain N times, each G from the newest model (the paper's step "
             "4). auto: go on while a round raises the best validation P@k, at most "
             f"{AUTO_MAX_ROUNDS} rounds, and keep the best round's G and model (1 round "
             "without validation, or for recommendation with --valid-fraction).")] = "auto",
    label_bias: Annotated[float | None, typer.Option(
        help="Start of the learned per-label offset beta in f = (G + b)((x U').V'_y + beta_y)."
    )] = LABEL_BIAS_DEFAULT,
    no_label_bias: Annotated[bool, typer.Option(
        "--no-label-bias", help="No beta: the paper's f = (G + b)(x U').V'_y.")] = False,
    train_options: dict | None = None,
) -> None:
    """Stage 3: retrain the G-weighted model with WARP (lr default 0.01); writes
    awe.safetensors."""
    from awe.pipeline import retrain_awe
    from awe.training.config import STAGE3_DEFAULTS

    with user_errors():
        config = _train_config(train_options, STAGE3_DEFAULTS)
        result, paths = retrain_awe(train_path, model, config, init=init, rounds=rounds,
                                    label_bias=None if no_label_bias else label_bias,
                                    **_run_options(train_options))
        _fit_summary(result)
        _wrote(paths)


@app.command("eval")
def eval_(
    test_path: Annotated[str, typer.Argument(metavar="TEST", help="Parquet file, directory or "
                                                                  "glob.")],
    model: Annotated[Path, typer.Option(help="Model directory.")],
    k: Annotated[str, typer.Option(help="Comma-separated cut-offs.")] = "1,3,5,10",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the metrics here.")]
        = None,
    rows: Annotated[str | None, typer.Option(
        help="Comma-separated rows of the table: knn-input, knn-wsabie, wsabie, awe (default: "
             "all the model has).")] = None,
    train: Annotated[str | None, typer.Option(
        "--train", help="Training parquet for the knn-input row (default: the one given to "
                        "build-g).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
) -> None:
    """Evaluate P@k, R@k, NDCG@k and MAP@k on a test set."""
    from awe import artifacts
    from awe.predict.evaluation import evaluate_model
    from awe.ranking.metrics import parse_ks

    with user_errors():
        try:
            ks = parse_ks(k)
        except ValueError as exc:
            raise AweError(f"--k {k!r}: {exc}") from None
        results = evaluate_model(model, test_path, ks, rows=rows.split(",") if rows else None,
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
    top_k: Annotated[int, typer.Option(help="Labels per row.")] = 10,
    model_stage: Annotated[str | None, typer.Option(
        help="wsabie | awe (default: the newest the model has).")] = None,
    id_col: Annotated[list[str] | None, typer.Option(
        help="Column carried through to the output (repeatable; default: 'id' when "
             "present).")] = None,
    exclude_col: Annotated[str | None, typer.Option(
        help="List column of labels never ranked for its row, e.g. seen items (default: "
             "'exclude' when present).")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows scored at a time.")] = 4096,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for torch and FAISS (per worker with --workers / --scheduler).")]
        = None,
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
    from awe.predict.batch import ScoreOptions, score_files

    with user_errors():
        options = ScoreOptions(k=top_k, stage=model_stage,
                               id_cols=tuple(id_col) if id_col else None,
                               exclude_col=exclude_col, batch_rows=batch_size,
                               skip_invalid=skip_invalid, overwrite=overwrite, threads=threads)
        summary = score_files(input_path, model, out_path, options,
                              cluster=ClusterOptions.from_options(scheduler, workers),
                              report=lambda line: out.print(line, highlight=False,
                                                            soft_wrap=True))
        if summary.skipped:
            out.print(f"skipped {len(summary.skipped)} output(s) already complete for this "
                      f"model (--overwrite to score again)", highlight=False)
        if summary.written:
            extra = f", {summary.rejected} rejected" if summary.rejected else ""
            out.print(f"scored {summary.rows} rows into {len(summary.written)} file(s){extra}",
                      highlight=False)


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
    quiet: Annotated[bool, typer.Option(help="No progress display.")] = False,
) -> None:
    """The paper's table end to end: data -> train -> build-g -> retrain -> eval, with the
    defaults tuned per dataset; writes a report (Markdown, CSV, JSON, configs, plots)."""
    from awe.reproduce import reproduce as run_reproduce

    with user_errors():
        if out_dir is None:
            name = "custom" if train is not None else Path(dataset).name or "custom"
            out_dir = Path("awe-reproduce") / name
        report = run_reproduce(dataset, out_dir, source=source, train=train, test=test,
                               rows=rows, test_rows=test_rows, classes=classes, seed=seed,
                               threads=threads,
                               progress=not quiet)
        table = Table(title=report.title)
        table.add_column("Algorithm")
        for k in report.table_ks:
            table.add_column(f"Prec@{k}", justify="right")
        for name, values in report.table_rows():
            table.add_row(name, *(f"{v * 100:.2f}%" for v in values))
        out.print(table)
        out.print("  ".join(f"{name} {sec:.1f}s" for name, sec in report.seconds.items())
                  + f"  | total {sum(report.seconds.values()):.1f}s", highlight=False)
        _wrote(report.files)


def main() -> None:  # pragma: no cover - console entry for `python -m cli.main`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

