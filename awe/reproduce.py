"""``awe reproduce``: the paper's tables end to end (data -> train -> build-g -> retrain -> eval)
with per-dataset defaults, and a report directory a person can read.

The report (``OUT/``): ``table.md``, ``table.csv``, ``table.json`` (the four rows of the paper's
Tables 1 and 2, every metric, the paper's numbers beside them for the synthetic stand-ins, the
time of every stage, the machine and the commands), ``config.json`` (the resolved config of
every stage), ``precision_at_k.png`` (P@k, k = 1..10, per row), ``training_curves.png`` (loss
and validation P@k per epoch of stages 1 and 3); the data in ``OUT/data`` and the model in
``OUT/model``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from awe import artifacts
from awe.affinity.g import AffinityConfig
from awe.card import read_card
from awe.errors import AweError
from awe.io import datasets
from awe.io.reader import resolve_files
from awe.pipeline import fit_pipeline
from awe.predict.evaluation import evaluate_model
from awe.training.config import LABEL_BIAS_DEFAULT, STAGE3_DEFAULTS, TrainConfig

ALGORITHMS = {
    "knn-input": "k-Nearest Neighbor",
    "knn-wsabie": "k-Nearest Neighbor (Wsabie space)",
    "wsabie": "Wsabie",
    "awe": "Affinity Weighted Embedding",
}
# the paper's model beside the defaults (``paper=True``): no label bias in stages 1 and 3, G's
# raw sums, so the table shows what the additions buy
PAPER_ROWS = {
    "wsabie-paper": "Wsabie, the paper's (no label bias)",
    "awe-paper": "Affinity Weighted Embedding, the paper's (no label bias, G not normalised)",
}
ROW_NAMES = {**ALGORITHMS, **PAPER_ROWS}
PLOT_KS = tuple(range(1, 11))
REPORT_FILES = ("table.md", "table.csv", "table.json", "config.json", "precision_at_k.png",
                "training_curves.png")


@dataclass(frozen=True)
class Recipe:
    """How ``awe reproduce`` runs one dataset: where its data comes from and each stage's
    settings. Stage 2 is the paper's (G from the n = 20 nearest neighbours in Wsabie space,
    ``sum`` or ``max`` over them); everything else is the default of `awe train`, `awe build-g`
    and `awe retrain` (10% of the training rows held out to pick the epoch)."""

    name: str
    title: str
    table_ks: tuple[int, ...]
    stage1: TrainConfig = TrainConfig()
    stage2: AffinityConfig = AffinityConfig()
    stage3: TrainConfig = STAGE3_DEFAULTS
    label_bias: float | str | None = LABEL_BIAS_DEFAULT
    # the paper's numbers for this table: {row: {"P@k": percent or None (not reported)}}
    paper: dict[str, dict[str, float | None]] | None = None
    paper_source: str = ""
    note: str = ""


def _paper(rows: dict[str, tuple[float | None, ...]], ks=(1, 3)) -> dict:
    return {row: {f"P@{k}": v for k, v in zip(ks, values, strict=True)}
            for row, values in rows.items()}


STAND_IN_NOTE = ("The synthetic presets are stand-ins: the paper's features (Magnatagatune audio "
                 "features, ImageNet image features) are not redistributable. The generator is "
                 "built so that a linear embedding captures most but not all of the label "
                 "signal (see data/README.md); compare the order and the gaps of the rows with "
                 "the paper's, not the absolute numbers.")
RECIPES = {
    "magnatagatune": Recipe(
        "magnatagatune",
        "Synthetic Magnatagatune ({train:,} train / {test:,} test, {labels:,} tags)", (1, 3),
        stage2=AffinityConfig(neighbors=20, space="wsabie", aggregate="sum"),
        paper=_paper({"knn-input": (39.4, 28.6), "knn-wsabie": (45.2, 31.9),
                      "wsabie": (48.7, 37.5), "awe": (52.7, 39.2)}),
        paper_source="Table 1 (Magnatagatune)", note=STAND_IN_NOTE),
    "imagenet": Recipe(
        "imagenet",
        "Synthetic ImageNet ({train:,} train / {test:,} test, {labels:,} classes)", (1, 3),
        stage2=AffinityConfig(neighbors=20, space="wsabie", aggregate="max"),
        paper=_paper({"knn-input": (None, None), "knn-wsabie": (13.7, None),
                      "wsabie": (9.2, None), "awe": (16.4, None)}),
        paper_source="Table 2 (ImageNet, 10M images, 21k classes; P@1)", note=STAND_IN_NOTE),
    "fashion-mnist": Recipe("fashion-mnist", "Fashion-MNIST (60,000 train / 10,000 test)", (1, 3)),
    "movielens": Recipe("movielens", "MovieLens 100K implicit (ratings >= 4)", (10,)),
    "path": Recipe("path", "", (1, 3)),
}
IMAGENET_DEFAULT_ROWS = 50_000


@dataclass
class Report:
    dataset: str
    title: str
    table_ks: tuple[int, ...]
    metrics: dict[str, dict[str, float]]
    seconds: dict[str, float]
    files: list[Path]
    out: Path
    paper: dict[str, dict[str, float | None]] | None = None
    paper_source: str = ""
    note: str = ""
    commands: list[str] = field(default_factory=list)
    # validation P@k (the first table k) of the trained rows, on rows no stage trained on
    # (docs/validation.md): what the model chose its epochs and rounds on
    valid: dict[str, float] = field(default_factory=dict)

    def paper_cells(self, row: str) -> list[str]:
        """The paper's P@k of ``row`` for the table's ks, as text ("-" where not reported)."""
        values = (self.paper or {}).get(row, {})
        return [f"{v:.1f}%" if v is not None else "-"
                for v in (values.get(f"P@{k}") for k in self.table_ks)]

    def table_rows(self) -> list[tuple[str, list[str]]]:
        """The printed table: (name, cells) per row, the cells being the measured P@k for the
        table's ks, then the paper's (where it has the table), then the validation P@k (where
        the row has one)."""
        rows = []
        for row in self.metrics:
            cells = [f"{self.metrics[row][f'P@{k}'] * 100:.2f}%" for k in self.table_ks]
            if self.paper:
                cells += self.paper_cells(row)
            if self.valid:
                cells.append(f"{self.valid[row] * 100:.2f}%" if row in self.valid else "")
            rows.append((ROW_NAMES[row], cells))
        return rows

    def table_head(self) -> list[str]:
        head = ["Algorithm", *(f"Prec@{k}" for k in self.table_ks)]
        if self.paper:
            head += [f"paper Prec@{k}" for k in self.table_ks]
        if self.valid:
            head.append(f"Valid Prec@{self.table_ks[0]}")
        return head


# ------------------------------------------------------------------------------------- data


def _split_path(base: Path, name: str) -> Path | None:
    for candidate in (base / f"{name}.parquet", base / name):
        if candidate.exists():
            return candidate
    return None


def resolve_data(dataset: str, out: Path, *, source=None, train=None, test=None, seed: int = 0,
                 rows: int | None = None, test_rows: int | None = None,
                 classes: int | None = None) -> tuple[Recipe, Path, Path]:
    """The recipe and the (train, test) paths of ``dataset``; builds named datasets into
    ``out/data`` (reused when already there)."""
    if train is not None or test is not None:
        if train is None or test is None:
            raise AweError("pass both --train and --test (or --dataset DIR with train and test)")
        for p in (train, test):
            if not Path(p).exists() and not any(ch in str(p) for ch in "*?["):
                raise AweError(f"{p}: no such file or directory")
        return RECIPES["path"], Path(train), Path(test)
    if dataset in RECIPES and dataset != "path":
        recipe = RECIPES[dataset]
        data_dir = out / "data"
        if not (data_dir / "test.parquet").exists() or not (data_dir / "train.parquet").exists():
            _make(dataset, data_dir, source, seed, rows, test_rows, classes)
        return recipe, data_dir / "train.parquet", data_dir / "test.parquet"
    base = Path(dataset)
    if not base.is_dir():
        raise AweError(f"--dataset {dataset}: not a known dataset ({', '.join(_NAMED)}) nor a "
                       f"directory with train and test parquet")
    found = {name: _split_path(base, name) for name in ("train", "test")}
    missing = [name for name, p in found.items() if p is None]
    if missing:
        raise AweError(f"--dataset {dataset}: no {' or '.join(missing)} in it (expected "
                       f"train.parquet / test.parquet files or train/ / test/ folders); or pass "
                       f"--train and --test")
    return RECIPES["path"], found["train"], found["test"]


_NAMED = [name for name in RECIPES if name != "path"]


def _make(dataset: str, data_dir: Path, source, seed: int, rows, test_rows, classes) -> None:
    if dataset in ("magnatagatune", "imagenet"):
        if dataset == "imagenet" and rows is None:
            rows = IMAGENET_DEFAULT_ROWS
        datasets.make_dataset("synthetic", data_dir, preset=dataset, seed=seed, rows=rows,
                              test_rows=test_rows, classes=classes)
    elif dataset == "fashion-mnist":
        datasets.make_dataset("fashion-mnist", data_dir, source=source)
    else:  # movielens: a local copy, else GroupLens' download
        if source is None:
            source = datasets.download_movielens(data_dir / "raw")
        datasets.make_dataset("movielens", data_dir, source=source)


# -------------------------------------------------------------------------------- pipeline


class _Steps:
    """Times every pipeline step and, when enabled, shows it: a spinner with the elapsed time,
    or (``spinner=False``) a header above the step's own progress bars, since rich draws one
    live display at a time."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.seconds: dict[str, float] = {}
        self.console = None
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True)

    def say(self, line: str) -> None:
        if self.enabled:
            self.console.print(f"[bold]{line}[/]", highlight=False)

    @contextlib.contextmanager
    def step(self, name: str, description: str, spinner: bool = True):
        progress = None
        if self.enabled and spinner:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                TimeElapsedColumn(), transient=True, console=self.console)
            progress.start()
            progress.add_task(description, total=None)
        elif self.enabled:
            self.console.print(f"[bold]{description}[/]", highlight=False)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if progress is not None:
                progress.stop()
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        if self.enabled:
            self.console.print(f"[green]done[/] {description} ({self.seconds[name]:.1f} s)",
                               highlight=False)


def reproduce(dataset: str = "magnatagatune", out="awe-reproduce", *, source=None, train=None,
              test=None, rows: int | None = None, test_rows: int | None = None,
              classes: int | None = None, seed: int = 0,
              threads: int | None = None, progress: bool = False,
              recipe: Recipe | None = None, paper: bool = False) -> Report:
    """Run the whole pipeline on ``dataset`` and write the report into ``out``.

    ``paper``: also train the paper's model (no label bias in stages 1 and 3, G not normalised;
    ``OUT/model-paper``) with the same options otherwise, and report its wsabie and awe rows and
    validation P@k beside the defaults'."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AweError(f"--out {out}: exists and is not a directory")
    steps = _Steps(progress)
    with steps.step("data", "data"):
        chosen, train_path, test_path = resolve_data(dataset, out, source=source, train=train,
                                                     test=test, seed=seed, rows=rows,
                                                     test_rows=test_rows, classes=classes)
    recipe = recipe or chosen
    title = recipe.title or f"{train_path} / {test_path}"
    overrides = {"seed": seed, **({"threads": threads} if threads else {})}
    stage1 = replace(recipe.stage1, **overrides)
    stage2 = replace(recipe.stage2, **overrides)
    stage3 = replace(recipe.stage3, **overrides)
    if threads:
        torch.set_num_threads(threads)
    model = out / "model"
    fitted = fit_pipeline(train_path, model, stage1, stage2, stage3,
                          label_bias_start=recipe.label_bias, progress=progress,
                          report=steps.say)
    steps.seconds.update(fitted["seconds"])
    g_stats = fitted["g"]
    metrics: dict[str, dict[str, float]] = {}
    for row in ALGORITHMS:
        with steps.step(f"eval {row}", f"evaluate {row}"):
            metrics.update(evaluate_model(model, test_path, PLOT_KS, rows=[row],
                                          train_path=train_path))
    valid = _valid_precision(model, "", recipe.table_ks[0])
    if paper:
        paper_model = out / "model-paper"
        steps.say("the paper's model: stages 1-3 without label biases, G's raw sums")
        fitted = fit_pipeline(train_path, paper_model, stage1, replace(stage2, normalize="none"),
                              stage3, label_bias=False, label_bias_start=None,
                              progress=progress, report=steps.say)
        steps.seconds.update({f"{name} (paper)": sec for name, sec in fitted["seconds"].items()})
        for row in ("wsabie", "awe"):
            with steps.step(f"eval {row}-paper", f"evaluate {row}-paper"):
                metrics[f"{row}-paper"] = evaluate_model(paper_model, test_path, PLOT_KS,
                                                         rows=[row])[row]
        valid.update(_valid_precision(paper_model, "-paper", recipe.table_ks[0]))
    if "{" in title:  # the synthetic presets' sizes, which --rows, --classes... change
        title = title.format(**_sizes(train_path, test_path, model))
    report = Report(recipe.name if recipe.name != "path" else str(dataset), title,
                    recipe.table_ks, metrics, steps.seconds, [], out, paper=recipe.paper,
                    paper_source=recipe.paper_source, note=recipe.note,
                    commands=commands(dataset, out, train_path, test_path, stage2,
                                      source=source, train=train, test=test, rows=rows,
                                      test_rows=test_rows, classes=classes, seed=seed,
                                      threads=threads), valid=valid)
    report.files = write_report(report, model, recipe, g_stats,
                                {"train": str(train_path), "test": str(test_path)})
    return report


def _valid_precision(model: Path, suffix: str, k: int) -> dict[str, float]:
    """{row: validation P@k} of a model directory's wsabie and awe stages (metrics.json)."""
    path = model / artifacts.METRICS
    stages = artifacts.read_json(path) if path.exists() else {}
    found = {}
    for row in ("wsabie", "awe"):
        value = (stages.get(row) or {}).get("valid", {}).get(f"P@{k}")
        if value is not None:
            found[row + suffix] = value
    return found


# ---------------------------------------------------------------------------------- report


def _sizes(train_path: Path, test_path: Path, model: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    def rows(path):
        return sum(pq.ParquetFile(f).metadata.num_rows for f in resolve_files(path))

    labels = artifacts.read_json(model / artifacts.LABELS)
    return {"train": rows(train_path), "test": rows(test_path), "labels": len(labels)}


def commands(dataset: str, out: Path, train_path: Path, test_path: Path,
             stage2: AffinityConfig, *, source=None, train=None, test=None, rows=None,
             test_rows=None, classes=None, seed: int = 0, threads: int | None = None,
             ) -> list[str]:
    """The command that made the report, then the step commands it runs (the recipe's
    non-default options spelled out)."""
    def opt(name, value):
        return [] if value is None else [f"--{name}", str(value)]

    thread_opt = opt("threads", threads)
    if train is not None:
        where = [*opt("train", train), *opt("test", test)]
    else:
        where = ["--dataset", str(dataset), *opt("source", source)]
    sizes = [*opt("rows", rows), *opt("test-rows", test_rows), *opt("classes", classes)]
    lines = [" ".join(["awe reproduce", *where, *sizes, "--seed", str(seed), *thread_opt,
                       "--out", str(out)])]
    if dataset in ("magnatagatune", "imagenet") and train is None:
        if dataset == "imagenet" and rows is None:
            sizes = ["--rows", str(IMAGENET_DEFAULT_ROWS), *sizes]
        lines.append(" ".join(["awe data synthetic --preset", dataset, *sizes, "--seed",
                               str(seed), "--out", str(out / "data")]))
    elif dataset in ("fashion-mnist", "movielens") and train is None:
        lines.append(" ".join(["awe data", dataset, *opt("source", source), "--out",
                               str(out / "data")]))
    model = str(out / "model")
    lines += [
        f"awe train {train_path} --model {model} --seed {seed}" + " ".join(["", *thread_opt]),
        f"awe build-g {train_path} --model {model} --neighbors {stage2.neighbors} "
        f"--space {stage2.space} --aggregate {stage2.aggregate} --seed {seed}"
        + " ".join(["", *thread_opt]),
        f"awe retrain {train_path} --model {model} --seed {seed}" + " ".join(["", *thread_opt]),
        f"awe eval {test_path} --model {model} --k {','.join(map(str, PLOT_KS))} "
        f"--train {train_path}" + " ".join(["", *thread_opt]),
    ]
    return lines


def _machine() -> str:
    import os

    threads = torch.get_num_threads()
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__} ({threads} threads)")


def table_markdown(report: Report) -> str:
    head = report.table_head()
    lines = [f"## {report.title}", "", "| " + " | ".join(head) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in report.table_rows()]
    if report.paper:
        lines += ["", f"Paper: Weston, Weiss, Yee, Affinity Weighted Embedding (arXiv 1301.4171), "
                      f"{report.paper_source}; - where no number is quoted here."]
    if report.note:
        lines += ["", report.note]
    lines += ["", "| Stage | Seconds |", "| --- | ---: |"]
    lines += [f"| {name} | {sec:.1f} |" for name, sec in report.seconds.items()]
    lines += [f"| total | {sum(report.seconds.values()):.1f} |", "",
              f"Machine: {_machine()}."]
    if report.commands:
        lines += ["", "Commands (the first runs the rest):", "", "```",
                  *report.commands, "```"]
    return "\n".join(lines) + "\n"


def table_csv(report: Report) -> str:
    """One line per row: every metric, then the paper's P@k (empty where it has none)."""
    buffer = io.StringIO()
    metric_names = list(next(iter(report.metrics.values())))
    paper_names = [f"P@{k}" for k in report.table_ks] if report.paper else []
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "algorithm", *metric_names, *(f"paper_{m}" for m in paper_names)])
    for row, values in report.metrics.items():
        paper = (report.paper or {}).get(row, {})
        writer.writerow([row, ROW_NAMES[row], *(f"{values[m]:.6f}" for m in metric_names),
                         *("" if paper.get(m) is None else f"{paper[m] / 100:.6f}"
                           for m in paper_names)])
    return buffer.getvalue()


def write_report(report: Report, model: Path, recipe: Recipe, g_stats: dict,
                 data: dict) -> list[Path]:
    out = report.out
    config = read_card(model).to_dict()
    resolved = {"dataset": report.dataset, "data": data,
                "stage1": config.get("stage1"), "stage2": config.get("stage2"),
                "stage3": config.get("stage3"), "label_bias": recipe.label_bias}
    summary = {"dataset": report.dataset, "title": report.title, "machine": _machine(),
               "table_ks": list(report.table_ks), "rows": report.metrics,
               "seconds": report.seconds, "total_seconds": round(sum(report.seconds.values()), 2),
               "g": g_stats, "commands": report.commands, "valid": report.valid}
    if report.paper:
        summary["paper"] = {"source": f"Weston, Weiss, Yee, Affinity Weighted Embedding (arXiv "
                                      f"1301.4171), {report.paper_source}",
                            "unit": "fraction", "rows": {
                                row: {m: None if v is None else round(v / 100, 6)
                                      for m, v in values.items()}
                                for row, values in report.paper.items()}}
    if report.note:
        summary["note"] = report.note
    written = []
    for name, text in (("table.md", table_markdown(report)),
                       ("table.csv", table_csv(report)),
                       ("table.json", json.dumps(summary, indent=2) + "\n"),
                       ("config.json", json.dumps(resolved, indent=2, default=str) + "\n")):
        artifacts.write_text(out / name, text)
        written.append(out / name)
    written.append(plot_precision(report, out / "precision_at_k.png"))
    written.append(plot_training(model, out / "training_curves.png"))
    return written


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> Path:
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_precision(report: Report, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row, values in report.metrics.items():
        ax.plot(PLOT_KS, [values[f"P@{k}"] for k in PLOT_KS], marker="o", label=ROW_NAMES[row])
    ax.set_xlabel("k")
    ax.set_ylabel("precision@k (test)")
    ax.set_xticks(PLOT_KS)
    ax.set_title(report.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    try:
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [row for row in csv.DictReader(fh) if not row.get("phase")]


def round_spans(rows: list[dict]) -> list[tuple[int, int, int]]:
    """(round, first, last) positions (1-based, on the plot's epoch axis) of each stage-3 round
    in history rows that run on across rounds."""
    spans: list[tuple[int, int, int]] = []
    for i, row in enumerate(rows, start=1):
        r = int(row.get("round") or 1)
        if spans and spans[-1][0] == r:
            spans[-1] = (r, spans[-1][1], i)
        else:
            spans.append((r, i, i))
    return spans


def plot_training(model: Path, path: Path) -> Path:
    """Loss and validation P@k per epoch of both stages (the selection runs, before any refit);
    stage-3 rounds one after the other, each marked, the kept one named."""
    plt = _pyplot()
    stages = [("stage 1 (Wsabie)", _read_history(model / artifacts.HISTORY)),
              ("stage 3 (AWE)", _read_history(model / artifacts.AWE_HISTORY))]
    metrics_path = model / artifacts.METRICS
    kept = (artifacts.read_json(metrics_path).get("awe", {}).get("round")
            if metrics_path.exists() else None)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex="col")
    for col, (name, rows) in enumerate(stages):
        epochs = list(range(1, len(rows) + 1))  # across rounds when --rounds > 1
        spans = round_spans(rows) if col == 1 else []
        if len(spans) > 1:
            for r, first, last in spans:
                for ax in axes[:, col]:
                    if first > 1:
                        ax.axvline(first - 0.5, color="0.5", linestyle="--", linewidth=0.8)
                label = f"round {r}" + (" (kept)" if r == kept else "")
                axes[0, col].text((first + last) / 2, 1.0, label, fontsize=7, ha="center",
                                  va="bottom", transform=axes[0, col].get_xaxis_transform())
            name += "\n"   # room for the round labels
        # one line per round: a new round starts from another G, not from the last epoch
        pieces = [(first, last) for _, first, last in spans] or [(1, len(rows))]
        loss = [float(r["loss"]) for r in rows]
        for first, last in pieces:
            axes[0, col].plot(epochs[first - 1:last], loss[first - 1:last], color="C0")
        axes[0, col].set_title(name, fontsize=10)
        axes[0, col].set_ylabel("training loss")
        keys = [k for k in (rows[0] if rows else {}) if k.startswith("valid_P@")]
        for n_key, key in enumerate(keys):
            values = [float(r[key]) if r[key] != "" else float("nan") for r in rows]
            for n_piece, (first, last) in enumerate(pieces):
                axes[1, col].plot(epochs[first - 1:last], values[first - 1:last],
                                  color=f"C{n_key}",
                                  label=key.removeprefix("valid_") if n_piece == 0 else None)
        axes[1, col].set_xlabel("epoch")
        axes[1, col].set_ylabel("validation precision")
        if rows and any(k.startswith("valid_P@") for k in rows[0]):
            axes[1, col].legend(fontsize=8)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return _save_figure(fig, path)
    finally:
        plt.close(fig)
