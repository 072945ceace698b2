#!/usr/bin/env python
"""Every default of the three stages measured on validation rows, never on a test set.

  python scripts/derive_defaults.py [--datasets magnatagatune,fashion-mnist,movielens,debtags]
                                    [--threads 1] [--seed 0] [--out runs/derive]
                                    [--from-json OUT/derive.json] [--update-docs]

Per dataset (the training files of ``scripts/bench_awe.py``; the test files are never opened),
the library pipeline carves its validation rows from the training file (``--valid-fraction 0.1``,
whole rows for annotation, a tenth of each user's items for MovieLens) and every number below is
read on them: stage 1's validation P@k (``wsabie.valid``), G's own ranking of the same rows (the
knn-wsabie row, G found for them as for new rows) and stage 3's (``awe.valid``), P@1 (P@10 for
MovieLens). Each option is moved alone from its default:

* stage-1 options (dim, lr, batch size, max-norm, label bias, negatives): the whole pipeline again;
* stage-2 and stage-3 options (neighbours, lambda, aggregate, normalisation, stage 3's label-bias
  start, learning rate and max-norm): G and stage 3 again on the default stage 1.

The ``auto`` options are pinned to their fixed values (20 or 100 neighbours, beta' from 3, one
round) so that every row moves one thing; the rows ``neighbors auto``, ``label-bias-start
auto`` and ``rounds auto`` then measure each search on the default stage 1. One seed: the
seed-to-seed spread of each dataset is in docs/benchmarks.md. Writes OUT/derive.json and
OUT/derive.md; --update-docs writes docs/defaults.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_awe import DATASETS, SHARED, TITLES, machine, main_k, prepare  # noqa: E402

from awe import artifacts  # noqa: E402
from awe.affinity.g import AffinityConfig  # noqa: E402
from awe.affinity.search import default_neighbours  # noqa: E402
from awe.affinity.stage import build_g  # noqa: E402
from awe.card import read_card  # noqa: E402
from awe.io.holdout import Holdout, split_held  # noqa: E402
from awe.io.reader import load_examples  # noqa: E402
from awe.pipeline import retrain_awe, stage3_config, train_wsabie  # noqa: E402
from awe.predict.predictor import Predictor  # noqa: E402
from awe.ranking.metrics import evaluate  # noqa: E402
from awe.training.config import LABEL_BIAS_START, TrainConfig  # noqa: E402

DOCS = ROOT / "docs" / "defaults.md"
STAGE1_FILES = (artifacts.CONFIG, artifacts.LABELS, artifacts.WSABIE_WEIGHTS, artifacts.HISTORY,
                artifacts.METRICS)


def variants(task: str) -> list[tuple[str, str, dict]]:
    """(option, value shown, what changes) of every run; the first is the defaults."""
    rec = task == "recommendation"
    n = 100 if rec else 20
    return [
        ("defaults", "", {}),
        ("dim", "32", {"stage1": {"dim": 32}}),
        ("dim", "128", {"stage1": {"dim": 128}}),
        ("lr", "0.02", {"stage1": {"lr": 0.02}}),
        ("lr", "0.1", {"stage1": {"lr": 0.1}}),
        ("batch-size", "1024" if rec else "2048",
         {"stage1": {"batch_size": 1024 if rec else 2048}}),
        ("max-norm", "none" if rec else "1.5", {"stage1": {"max_norm": None if rec else 1.5}}),
        ("negatives", "30", {"stage1": {"negatives": 30}}),
        ("label-bias", "on" if rec else "off", {"label_bias": rec}),
        ("neighbors", "auto", {"g": {"neighbors": "auto"}}),
        ("neighbors", str(n // 2), {"g": {"neighbors": n // 2}}),
        ("neighbors", str(n * 2), {"g": {"neighbors": n * 2}}),
        ("lambda", "x 0.5", {"lambda_factor": 0.5}),
        ("lambda", "x 2", {"lambda_factor": 2.0}),
        ("aggregate", "max", {"g": {"aggregate": "max"}}),
        ("normalize", "none", {"g": {"normalize": "none"}}),
        ("label-bias-start", "auto", {"label_bias_start": "auto"}),
        ("label-bias-start", "none", {"label_bias_start": None}),
        ("label-bias-start", "1", {"label_bias_start": 1.0}),
        ("stage3-lr", "0.02", {"stage3": {"lr": 0.02}}),
        ("stage3-max-norm", "none" if rec else "3", {"stage3": {"max_norm": None if rec else 3.0}}),
        ("rounds", "auto", {"rounds": "auto"}),
    ]


def defaults_of(task: str) -> dict[str, str]:
    rec = task == "recommendation"
    return {"dim": "64", "lr": "0.05", "batch-size": "2048" if rec else "1024",
            "max-norm": "1.5" if rec else "none", "negatives": "100",
            "label-bias": "off" if rec else "on", "neighbors": "100" if rec else "20",
            "lambda": "1 / median d^2", "aggregate": "sum", "normalize": "max",
            "label-bias-start": "3", "stage3-lr": "0.01",
            "stage3-max-norm": "3" if rec else "none", "rounds": "1"}


def g_valid(model: Path, train: Path, k: int) -> float:
    """G's own P@k (the knn-wsabie ranking) on stage 1's validation rows."""
    card = read_card(model)
    holdout = Holdout.from_dict(card.stage1.holdout)
    predictor = Predictor(model)
    rows = load_examples(train, predictor.schema, predictor.vocab, task=holdout.task)
    _, valid = split_held(rows, holdout.again(rows.labels, train), holdout.task)
    return evaluate(lambda ex, b: predictor.ranking_scores(ex, b, "knn-wsabie"), valid,
                    [k])[f"P@{k}"]


def round1_valid(model: Path, k: int) -> float:
    """The best validation P@k of stage 3's first round (awe_history.csv)."""
    import csv

    with open(model / artifacts.AWE_HISTORY) as f:
        rows = [r for r in csv.DictReader(f) if r.get("round", "1") == "1"
                and r.get(f"valid_P@{k}") not in (None, "")]
    return max(float(r[f"valid_P@{k}"]) for r in rows)


def run(name: str, data: Path, out: Path, threads: int, seed: int) -> list[dict]:
    task = "recommendation" if name == "movielens" else "annotation"
    k = main_k(name)
    train = data / "train.parquet"
    base1 = out / "models" / f"{name}-stage1"
    results = []
    for option, value, change in variants(task):
        model = out / "models" / f"{name}-{option}-{value}".replace(" ", "")
        if model.exists():
            shutil.rmtree(model)
        t0 = time.perf_counter()
        stage1 = replace(TrainConfig(threads=threads, seed=seed), **change.get("stage1", {}))
        try:
            if "stage1" in change or "label_bias" in change or not base1.exists():
                train_wsabie(train, model, stage1, label_bias=change.get("label_bias", "auto"))
                if not change:
                    shutil.copytree(model, base1, dirs_exist_ok=True)
            else:
                model.mkdir(parents=True)
                for f in STAGE1_FILES:
                    if (base1 / f).exists():
                        shutil.copy2(base1 / f, model / f)
            affinity = replace(AffinityConfig(threads=threads, seed=seed,
                                              neighbors=default_neighbours(task)),
                               **change.get("g", {}))
            stats, _ = build_g(train, model, affinity)
            if "lambda_factor" in change:
                build_g(train, model, replace(affinity, lam=stats["lambda"] *
                                              change["lambda_factor"]))
            stage3 = replace(stage3_config(stage1), **change.get("stage3", {}))
            retrain_awe(train, model, stage3, rounds=change.get("rounds", 1),
                        label_bias=change.get("label_bias_start", LABEL_BIAS_START))
            metrics = artifacts.read_json(model / artifacts.METRICS)
            chosen = {"neighbors": metrics["g"]["neighbors"],
                      "label-bias-start": read_card(model).stage3.label_bias_init}
            row = {"option": option, "value": value, "chosen": chosen.get(option),
                   "stage1": metrics["wsabie"]["valid"][f"P@{k}"],
                   "g": g_valid(model, train, k),
                   "awe": (metrics["awe"]["valid"][f"P@{k}"] if option == "rounds"
                           else round1_valid(model, k)),
                   "rounds_kept": metrics["awe"].get("round"),
                   "seconds": round(time.perf_counter() - t0, 1)}
        except Exception as exc:  # noqa: BLE001  (recorded in the report)
            row = {"option": option, "value": value, "error": f"{type(exc).__name__}: {exc}",
                   "seconds": round(time.perf_counter() - t0, 1)}
        if option != "defaults" and "error" not in row:
            shutil.rmtree(model, ignore_errors=True)  # keep the disk small
        print(f"  {name} {option} {value}: " + (row.get("error") or
              f"stage1 {row['stage1']:.4f} G {row['g']:.4f} awe {row['awe']:.4f}") +
              f" ({row['seconds']}s)", flush=True)
        results.append(row)
    return results


def report(result: dict) -> str:
    lines = [
        "# Defaults, measured on validation rows",
        "",
        "Generated by `scripts/derive_defaults.py`; do not edit by hand. How to read it, and "
        "what each default is for: [method.md](method.md).",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
        f"{result['machine']['torch']}, {result['threads']} thread(s), seed {result['seed']}; "
        f"{result['seconds'] / 60:.1f} min.",
        "",
        "Every number is a P@k on validation rows that the pipeline carved from the training "
        "file and that no stage trained on (P@1; P@10 for MovieLens-100K): **stage 1** is "
        "`wsabie.valid`, **G** is G's own ranking (the knn-wsabie row) of the same rows, "
        "**AWE** is stage 3's `awe.valid` (round 1). The test files are never read. Each option "
        "is moved alone from its default; stage-2 and stage-3 options reuse the default stage 1. "
        "The `auto` options are pinned in every row (20 or 100 neighbours, beta' from 3, one "
        "round; the *default* column) except their own `auto` rows, which measure the search "
        "on the default stage 1. One standard error of a P@1 is about sqrt(p(1-p)/rows): 0.004 "
        "on Fashion-MNIST's 6,000 validation rows, 0.005 on DEBTAGS' 1,898, 0.012 on "
        "Magnatagatune's 1,600; about 0.003 for MovieLens' P@10 over 842 users.",
        "",
    ]
    for name, rows in result["datasets"].items():
        task = "recommendation" if name == "movielens" else "annotation"
        defaults = defaults_of(task)
        base = next((r for r in rows if r["option"] == "defaults" and "error" not in r), None)
        lines += [f"## {TITLES.get(name, name)} (P@{main_k(name)})", "",
                  "| option | default | value | stage 1 | G | AWE | AWE - default |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['option']} | {defaults.get(r['option'], '')} | "
                             f"{r['value']} | error: {r['error'][:80]} | | | |")
                continue
            delta = "" if base is None or r is base else f"{r['awe'] - base['awe']:+.4f}"
            extra = (f" (kept round {r['rounds_kept']})" if r["option"] == "rounds" else "")
            if r["value"] == "auto" and r["option"] != "rounds":
                extra = f" (chose {'none' if r['chosen'] is None else format(r['chosen'], 'g')})"
            lines.append(f"| {r['option']} | {defaults.get(r['option'], '')} | "
                         f"{r['value'] or '(all defaults)'}{extra} | {r['stage1']:.4f} | "
                         f"{r['g']:.4f} | {r['awe']:.4f} | {delta} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "derive")
    parser.add_argument("--from-json", type=Path)
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        names = [n for n in args.datasets.split(",") if n]
        command = "python scripts/derive_defaults.py " + shlex.join(sys.argv[1:])
        t0 = time.perf_counter()
        result = {"command": command.strip(), "machine": machine(), "threads": args.threads,
                  "seed": args.seed, "datasets": {}}
        for name in names:
            data = prepare(name, args.out, SHARED / "ml-100k", SHARED / "debtags" /
                           "train.parquet")
            result["datasets"][name] = run(name, data, args.out, args.threads, args.seed)
            result["seconds"] = time.perf_counter() - t0
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "derive.json").write_text(json.dumps(result, indent=1))
    text = report(result)
    (args.out / "derive.md").write_text(text + "\n")
    print(text)
    if args.update_docs:
        DOCS.write_text(text + "\n")


if __name__ == "__main__":
    main()
