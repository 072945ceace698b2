#!/usr/bin/env python
"""AWE benchmark: the whole pipeline with default options, all four rows of the paper's table,
and the time of every stage.

  python scripts/bench_awe.py [--datasets fashion-mnist,movielens,magnatagatune] [--threads 2]
                              [--seeds 0] [--out runs/bench-awe]

For each dataset: `awe train` (stage 1, --valid-fraction 0.1) -> `awe build-g` -> `awe retrain`
-> `awe eval` on test, all with defaults, through the same library calls as the CLI.
Rows: knn-input, knn-wsabie, wsabie, awe. Metric: P@1 and P@3 (P@10 for movielens).
With several --seeds (both stages' seed: initial weights, held-out rows, sampling) each
dataset runs once per seed, and every row's metrics get their mean and sample standard
deviation over the seeds, the spread a single run's number sits in.
Writes OUT/awe.json and OUT/awe.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# ruff: noqa: E402  (the imports below need the path above)

from awe.affinity.g import AffinityConfig
from awe.affinity.stage import build_g
from awe.io import datasets
from awe.pipeline import (
    retrain_awe,
    train_wsabie,
)
from awe.predict.evaluation import evaluate_model
from awe.training.config import STAGE3_DEFAULTS, TrainConfig

SHARED = ROOT.parent / "shared" / "data"
KS = {"movielens": [1, 3, 10]}


def prepare(name: str, out: Path, ml_source: Path) -> Path:
    d = out / "data" / name
    if not (d / "test.parquet").exists():
        if name == "movielens":
            datasets.make_dataset("movielens", d, source=ml_source)
        elif name == "magnatagatune":
            datasets.make_dataset("synthetic", d, preset="magnatagatune")
        else:
            datasets.make_dataset(name, d)
    return d


def run(name: str, data: Path, out: Path, threads: int, seed: int = 0) -> dict:
    model = out / (f"model-{name}" if seed == 0 else f"model-{name}-seed{seed}")
    train = data / "train.parquet"
    times = {}
    t0 = time.perf_counter()
    train_wsabie(train, model, TrainConfig(valid_fraction=0.1, threads=threads, seed=seed))
    times["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats, _ = build_g(train, model, AffinityConfig(threads=threads))
    times["build-g"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    retrain_awe(train, model, TrainConfig(**{**STAGE3_DEFAULTS.to_dict(), "threads": threads,
                                             "valid_fraction": 0.1, "seed": seed}))
    times["retrain"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = evaluate_model(model, data / "test.parquet", KS.get(name, [1, 3, 10]))
    times["eval (4 rows)"] = time.perf_counter() - t0
    config = json.loads((model / "config.json").read_text())
    stage_metrics = json.loads((model / "metrics.json").read_text())
    print(f"{name} (seed {seed}): "
          + ", ".join(f"{row} P@1 {m['P@1']:.4f}" for row, m in metrics.items()) + " | "
          + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    return {"metrics": metrics, "seconds": times, "g": stats,
            "stage1_best_epoch": stage_metrics["wsabie"]["best_epoch"],
            "stage3_best_epoch": stage_metrics["awe"]["best_epoch"],
            "stage2": config["stage2"]["config"]}


def over_seeds(runs: dict[int, dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {metric: {"mean", "sd"}}} over the runs of several seeds ({seed: run(...)}); sd is
    the sample standard deviation (0 with one seed)."""
    first = next(iter(runs.values()))["metrics"]
    summary = {}
    for row, metrics in first.items():
        summary[row] = {}
        for metric in metrics:
            values = [r["metrics"][row][metric] for r in runs.values()]
            summary[row][metric] = {
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    return summary


def seeds_table(name: str, result: dict, ks: list[int]) -> list[str]:
    """Markdown: every seed's value of each row and the mean +- sd."""
    seeds = list(result["seeds"])
    lines = [f"**{name}** over seeds {', '.join(map(str, seeds))}", "",
             "| row | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd |",
             "| --- | --- | " + " | ".join("---" for _ in seeds) + " | --- | --- |"]
    for row, metrics in result["over_seeds"].items():
        for k in ks:
            m = f"P@{k}"
            values = " | ".join(f"{result['seeds'][s]['metrics'][row][m]:.4f}" for s in seeds)
            lines.append(f"| {row} | {m} | {values} | {metrics[m]['mean']:.4f} | "
                         f"{metrics[m]['sd']:.4f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-awe")
    parser.add_argument("--datasets", default="fashion-mnist,movielens,magnatagatune")
    parser.add_argument("--ml-source", type=Path, default=SHARED / "ml-100k")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds; with several, mean and sd over them")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    report = {"machine": f"{platform.machine()}, {args.threads} threads",
              "torch": torch.__version__, "datasets": {}}
    for name in args.datasets.split(","):
        try:
            data = prepare(name, args.out, args.ml_source)
        except Exception as exc:  # absent raw data: report and go on
            print(f"{name} skipped: {exc}")
            continue
        runs = {seed: run(name, data, args.out, args.threads, seed) for seed in seeds}
        # the first seed's run keeps the single-seed layout; the others are added beside it
        report["datasets"][name] = {**runs[seeds[0]], "seed": seeds[0]}
        if len(seeds) > 1:
            report["datasets"][name]["seeds"] = runs
            report["datasets"][name]["over_seeds"] = over_seeds(runs)
    (args.out / "awe.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = []
    for name, r in report["datasets"].items():
        ks = [10] if name == "movielens" else [1, 3]
        lines += [f"**{name}** (seed {r['seed']}; stage times: " + ", ".join(
            f"{k} {v:.1f}s" for k, v in r["seconds"].items()) + ")", "",
            "| row | " + " | ".join(f"P@{k}" for k in ks) + " |",
            "| --- | " + " | ".join("---" for _ in ks) + " |"]
        for row, m in r["metrics"].items():
            lines.append(f"| {row} | " + " | ".join(f"{m[f'P@{k}']:.4f}" for k in ks) + " |")
        lines.append("")
        if "seeds" in r:
            lines += seeds_table(name, r, ks)
    (args.out / "awe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
