"""The ``awe`` command line: a thin typer layer over the ``awe`` library."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from awe import datasets as datasets_lib
from awe.data import Columns
from awe.errors import AweError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Affinity Weighted Embedding: Wsabie (WARP) training, nearest-neighbour "
                       "reweighting and evaluation on parquet files.")
out = Console()
err = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]
          = False) -> None:
    _state["debug"] = debug


@contextlib.contextmanager
def user_errors():
    """Print a user error as one line and exit 2; tracebacks only with --debug."""
    try:
        yield
    except AweError as exc:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted; files already written are complete")
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
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Convert or generate a dataset into the data contract (train.parquet, test.parquet)."""
    with user_errors():
        paths = datasets_lib.make_dataset(name, out_dir, source=source, preset=preset, seed=seed,
                                          rows=rows, test_rows=test_rows, classes=classes)
        _wrote(paths)


@app.command()
def train(
    train_path: Annotated[str, typer.Argument(metavar="TRAIN",
                                              help="Parquet file, directory or glob.")],
    model: Annotated[Path, typer.Option(help="Model directory to write.")],
    valid: Annotated[str | None, typer.Option(help="Validation parquet (else --valid-fraction)."
                                              )] = None,
    valid_fraction: Annotated[float, typer.Option(
        help="Hold out this fraction for validation: whole rows (annotation) or a fraction of "
             "each row's labels (recommendation).")] = 0.1,
    task: Annotated[str | None, typer.Option(
        help="annotation | recommendation (default: recorded by `awe data`, else annotation).")]
        = None,
    dim: Annotated[int | None, typer.Option(help="Embedding dimension D.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    negatives: Annotated[int | None, typer.Option(
        help="WARP sampling budget K: negatives drawn per positive at most.")] = None,
    margin: Annotated[float | None, typer.Option(help="WARP margin.")] = None,
    max_norm: Annotated[float | None, typer.Option(help="Project rows of U, V to norm <= C.")]
        = None,
    weight_decay: Annotated[float | None, typer.Option(help="L2 on touched rows.")] = None,
    rank_weight: Annotated[str | None, typer.Option(help="harmonic (paper) | log (LightFM).")]
        = None,
    optimizer: Annotated[str | None, typer.Option(help="adagrad | sgd.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Positive pairs per step.")] = None,
    patience: Annotated[int | None, typer.Option(help="Early stopping patience (epochs).")]
        = None,
    valid_k: Annotated[int | None, typer.Option(help="Pick the best epoch by valid P@k.")]
        = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda (default: cuda if available).")]
        = None,
    features_col: ColumnOpt = "features", feature_ids_col: ColumnOpt = "feature_ids",
    feature_values_col: ColumnOpt = "feature_values", labels_col: ColumnOpt = "labels",
    exclude_col: ColumnOpt = "exclude", id_col: ColumnOpt = "id",
    quiet: Annotated[bool, typer.Option(help="No progress display.")] = False,
) -> None:
    """Stage 1: train a Wsabie embedding with WARP; writes the model directory."""
    from awe.train import TrainConfig, train_wsabie, with_overrides

    with user_errors():
        config = with_overrides(
            TrainConfig(), dim=dim, epochs=epochs, lr=lr, negatives=negatives, margin=margin,
            max_norm=max_norm, weight_decay=weight_decay, rank_weight=rank_weight,
            optimizer=optimizer, batch_size=batch_size, patience=patience, valid_k=valid_k,
            seed=seed, threads=threads, device=device, task=task,
            valid_fraction=0.0 if valid else valid_fraction)
        result, paths = train_wsabie(
            train_path, model, config, valid_path=valid, progress=not quiet,
            columns=_columns(features_col, feature_ids_col, feature_values_col, labels_col,
                             exclude_col, id_col))
        best = result.best_metrics
        summary = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if k.startswith("P@"))
        out.print(f"best epoch {result.best_epoch} ({result.seconds:.1f}s)"
                  + (f": valid {summary}" if summary else ""), highlight=False)
        _wrote(paths)


@app.command("eval")
def eval_(
    test_path: Annotated[str, typer.Argument(metavar="TEST", help="Parquet file, directory or "
                                                                  "glob.")],
    model: Annotated[Path, typer.Option(help="Model directory.")],
    k: Annotated[str, typer.Option(help="Comma-separated cut-offs.")] = "1,3,5,10",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the metrics here.")]
        = None,
    rows: Annotated[str, typer.Option(help="Comma-separated rows of the table: wsabie.")]
        = "wsabie",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
) -> None:
    """Evaluate P@k, R@k, NDCG@k and MAP@k on a test set."""
    from awe import artifacts
    from awe.evaluate import evaluate_model, parse_ks

    with user_errors():
        try:
            ks = parse_ks(k)
        except ValueError as exc:
            raise AweError(f"--k {k!r}: {exc}") from None
        results = evaluate_model(model, test_path, ks, rows=rows.split(","), threads=threads)
        out.print(metrics_table(results, title=str(test_path)))
        if json_path is not None:
            artifacts.write_json(json_path, results)
            _wrote([json_path])


def main() -> None:  # pragma: no cover - console entry for `python -m cli.main`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

