#!/usr/bin/env python
"""AWE benchmark: the whole pipeline with default options, all four rows of the paper's table,
and the time of every stage.

  python scripts/bench_awe.py [--datasets fashion-mnist,movielens,magnatagatune] [--threads 2]
                              [--out runs/bench-awe]

For each dataset: `awe train` (stage 1, --valid-fraction 0.1) -> `awe build-g` -> `awe retrain`
-> `awe eval` on test, all with defaults, through the same library calls as the CLI.
Rows: knn-input, knn-wsabie, wsabie, awe. Metric: P@1 and P@3 (P@10 for movielens).
Writes OUT/awe.json and OUT/awe.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from awe import datasets  # noqa: E402
from awe.affinity import AffinityConfig, build_g  # noqa: E402
from awe.evaluate import evaluate_model  # noqa: E402
from awe.train import STAGE3_DEFAULTS, TrainConfig, retrain_awe, train_wsabie  # noqa: E402

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


def run(name: str, data: Path, out: Path, threads: int) -> dict:
    model = out / f"model-{name}"
    train = data / "train.parquet"
    times = {}
    t0 = time.perf_counter()
    train_wsabie(train, model, TrainConfig(valid_fraction=0.1, threads=threads))
    times["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats, _ = build_g(train, model, AffinityConfig(threads=threads))
    times["build-g"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    retrain_awe(train, model, TrainConfig(**{**STAGE3_DEFAULTS.to_dict(), "threads": threads,
                                             "valid_fraction": 0.1}))
    times["retrain"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = evaluate_model(model, data / "test.parquet", KS.get(name, [1, 3, 10]))
    times["eval (4 rows)"] = time.perf_counter() - t0
    config = json.loads((model / "config.json").read_text())
    print(f"{name}: " + ", ".join(f"{row} P@1 {m['P@1']:.4f}" for row, m in metrics.items())
          + " | " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    return {"metrics": metrics, "seconds": times, "g": stats,
            "stage1_best_epoch": json.loads((model / "metrics.json").read_text())[
                "wsabie"]["best_epoch"],
            "stage3_best_epoch": json.loads((model / "metrics.json").read_text())[
                "awe"]["best_epoch"],
            "stage2": config["stage2"]["config"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-awe")
    parser.add_argument("--datasets", default="fashion-mnist,movielens,magnatagatune")
    parser.add_argument("--ml-source", type=Path, default=SHARED / "ml-100k")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
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
        report["datasets"][name] = run(name, data, args.out, args.threads)
    (args.out / "awe.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = []
    for name, r in report["datasets"].items():
        ks = [10] if name == "movielens" else [1, 3]
        lines += [f"**{name}** (stage times: " + ", ".join(
            f"{k} {v:.1f}s" for k, v in r["seconds"].items()) + ")", "",
            "| row | " + " | ".join(f"P@{k}" for k in ks) + " |",
            "| --- | " + " | ".join("---" for _ in ks) + " |"]
        for row, m in r["metrics"].items():
            lines.append(f"| {row} | " + " | ".join(f"{m[f'P@{k}']:.4f}" for k in ks) + " |")
        lines.append("")
    (args.out / "awe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
