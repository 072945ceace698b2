#!/usr/bin/env python
"""Conversion speed of awe.svmlight: a generated LIBSVM multi-label file into parquet.

  python scripts/bench_svmlight.py [--rows 100000] [--features 5000] [--labels 400]
                                   [--one-based] [--repeats 3] [--dir /tmp/awe-svmlight]

The file has an `N D L` header, 5-59 features a line (values with 6 decimals) and 1-4 labels.
Prints rows/s and features/s of wall time and of CPU time (all threads) for every repeat.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from awe.io.svmlight import convert_svmlight  # noqa: E402


def generate(path: Path, rows: int, features: int, labels: int, first_id: int, seed: int = 0,
             ) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        fh.write(f"{rows} {features} {labels}\n")
        for _ in range(rows):
            k = int(rng.integers(5, 60))
            ids = np.sort(rng.choice(features, k, replace=False)) + first_id
            tags = rng.choice(labels, int(rng.integers(1, 5)), replace=False)
            pairs = " ".join(f"{i}:{v:.6f}" for i, v in zip(ids, rng.random(k), strict=True))
            fh.write(",".join(map(str, tags)) + " " + pairs + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=5000)
    parser.add_argument("--labels", type=int, default=400)
    parser.add_argument("--one-based", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/awe-svmlight"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "train.txt"
    generate(path, args.rows, args.features, args.labels, int(args.one_based))
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, {args.rows} lines")
    for _ in range(args.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        summary = convert_svmlight(path, args.dir / "out")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"wall {wall:.2f} s: {summary.rows / wall:,.0f} rows/s, "
              f"{summary.nnz / wall:,.0f} features/s; cpu {cpu:.2f} s: "
              f"{summary.rows / cpu:,.0f} rows/s")


if __name__ == "__main__":
    main()
