#!/usr/bin/env python
"""Batch scoring (`awe score`): throughput and peak RSS.

  python scripts/bench_score.py [--labels 1000,21000] [--dim 128] [--threads 2] [--workers 2]
                                [--rows 200000] [--rss-rows 1000000,10000000] [--repeats 3]
                                [--root runs/bench-score] [--out runs/bench-score.json]

Models are genuine model directories made by the library: for every L, synthetic dense rows
(--features wide, clustered, every label present) train stage 1 for one epoch (D = --dim),
`build_g` (20 neighbours, --index: IVF by default, as at scale) and stage 3 for one epoch.
Inputs are dense parquet files of random rows of the same distribution with an int64 id
(row groups of 16,384 rows for throughput, 65,536 for RSS), made once under --root and reused.

Throughput: `score_files` in a fresh child process (`awe score` without the interpreter start),
top-10, --threads threads, timed from the call to the rename of the output (model load and
fingerprint included) after a first, untimed call on 8 row groups of --batch-size rows (imports,
kernel set-up for that shape, reported as cold_first_call_s); rows/s is the median of
--repeats runs. Dask: the child starts a local cluster of --workers processes first (not timed;
reported) and scores through it, each
worker with --threads / --workers threads. The Wsabie stage's local runs alternate with
runs of the anchor, the float32 product for every label (ScoreOptions(screen=False), the code before
awe.screen), and report the ratio. Peak RSS: the child's ru_maxrss while scoring
--rss-rows rows (Wsabie stage, the smallest L). The load average is recorded with every run:
on a shared machine times are upper bounds. So is the share of CPU time the
hypervisor took during each run (steal, from /proc/stat): up to 43% of it in one run on a
2-core machine, nearly one of the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUP_ROWS = 65_536


def make_rows(path: Path, n_rows: int, n_features: int, n_labels: int, seed: int,
              with_labels: bool, group_rows: int = GROUP_ROWS) -> Path:
    """Clustered dense rows written a row group at a time (memory: one group)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    centres = np.random.default_rng(7).normal(size=(min(n_labels, 512), n_features))
    rng = np.random.default_rng(seed)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = None
    for start in range(0, n_rows, group_rows):
        n = min(group_rows, n_rows - start)
        labels = rng.integers(0, n_labels, n)
        if with_labels and start == 0:  # every label appears: the vocabulary has L labels
            labels[:min(n, n_labels)] = np.arange(min(n, n_labels))
        x = (centres[labels % len(centres)] + rng.normal(size=(n, n_features))).astype(
            np.float32)
        columns = {"id": pa.array(np.arange(start, start + n, dtype=np.int64)),
                   "features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()),
                                                                 n_features)}
        if with_labels:
            columns["labels"] = pa.array([[f"label-{y}"] for y in labels.tolist()])
        table = pa.table(columns)
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table, row_group_size=group_rows)
    writer.close()
    os.replace(tmp, path)
    return path


def make_model(root: Path, n_labels: int, args) -> Path:
    from awe.affinity.g import AffinityConfig
    from awe.pipeline import fit_pipeline
    from awe.training.config import STAGE3_DEFAULTS, TrainConfig, with_overrides

    model = root / f"model-L{n_labels}"
    config = model / "config.json"
    if config.exists() and "stage3" in json.loads(config.read_text()):
        return model
    train_rows = max(args.train_rows, 2 * n_labels)
    train = make_rows(root / f"train-L{n_labels}.parquet", train_rows, args.features, n_labels,
                      seed=1, with_labels=True)
    common = {"epochs": 1, "valid_fraction": 0.0, "threads": args.threads, "seed": 0}
    t0 = time.perf_counter()
    fit_pipeline(train, model, TrainConfig(dim=args.dim, **common),
                 AffinityConfig(neighbors=20, index=args.index, threads=args.threads),
                 with_overrides(STAGE3_DEFAULTS, **common))
    print(f"model L={n_labels}: {train_rows} training rows, {time.perf_counter() - t0:.0f}s",
          flush=True)
    return model


def cpu_times() -> list[int]:
    """The machine's CPU time counters (/proc/stat, jiffies: user nice system idle iowait irq
    softirq steal), or [] where there is none."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    except (OSError, ValueError):
        return []


def steal_share(before: list[int], after: list[int]) -> float | None:
    """The share of the machine's CPU time a hypervisor took (steal) between two readings."""
    if not before or not after:
        return None
    spent = [b - a for a, b in zip(before, after, strict=True)]
    return spent[7] / max(1, sum(spent))


def child(argv: list[str]) -> None:
    """Score once in this process and print JSON: seconds, rows, peak RSS."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--input")
    parser.add_argument("--out")
    parser.add_argument("--stage")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--warmup", help="a small input scored first, untimed")
    parser.add_argument("--screen", action=argparse.BooleanOptionalAction, default=True,
                        help="rank through bfloat16 products (ScoreOptions.screen)")
    a = parser.parse_args(argv)
    from awe.dask_cluster import ClusterOptions
    from awe.predict.batch import ScoreOptions, score_files

    options = ScoreOptions(k=10, stage=a.stage, threads=a.threads, overwrite=True,
                           batch_rows=a.batch_size, screen=a.screen)
    cluster, cluster_seconds, stack = None, 0.0, None
    if a.workers:
        import contextlib
        import logging

        import distributed

        t0 = time.perf_counter()
        stack = contextlib.ExitStack()
        local = stack.enter_context(distributed.LocalCluster(
            n_workers=a.workers, threads_per_worker=1, processes=True,
            dashboard_address=":0", silence_logs=logging.ERROR, memory_limit=0))
        stack.enter_context(distributed.Client(local)).wait_for_workers(a.workers)
        cluster = ClusterOptions(scheduler=local.scheduler_address)
        options = ScoreOptions(k=10, stage=a.stage, overwrite=True, batch_rows=a.batch_size,
                               threads=max(1, a.threads // a.workers), screen=a.screen)
        cluster_seconds = time.perf_counter() - t0
    # the first call in a process imports and initialises (torch kernels, FAISS, arrow): ~3 s
    # here, once per process, not per row; timed apart and reported as cold_seconds
    t0 = time.perf_counter()
    score_files(a.warmup, a.model, a.out + ".warmup.parquet", options, cluster=cluster)
    cold_seconds = time.perf_counter() - t0
    load = os.getloadavg()[0]
    before = cpu_times()
    t0 = time.perf_counter()
    summary = score_files(a.input, a.model, a.out, options, cluster=cluster)
    seconds = time.perf_counter() - t0
    steal = steal_share(before, cpu_times())
    if stack is not None:
        stack.close()
    print(json.dumps({"seconds": seconds, "rows": summary.rows, "load_before": load,
                      "load_after": os.getloadavg()[0], "cluster_seconds": cluster_seconds,
                      "cold_seconds": cold_seconds, "steal": steal,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _percent(share: float | None) -> str:
    return "?" if share is None else f"{100 * share:.0f}%"


def run_child(args, model: Path, source: Path, stage: str, workers: int = 0,
              screen: bool = True) -> dict:
    out = Path(args.root) / "scored" / (f"{model.name}-{stage}-{source.stem}-w{workers}"
                                        f"{'' if screen else '-dense'}.parquet")
    cmd = [sys.executable, __file__, "child", "--model", str(model), "--input", str(source),
           "--out", str(out), "--stage", stage, "--threads", str(args.threads),
           "--workers", str(workers), "--batch-size", str(args.batch_size),
           "--warmup", str(Path(args.root) / f"warmup-{args.batch_size}.parquet")]
    cmd.append("--screen" if screen else "--no-screen")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"child failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", default="1000,21000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--train-rows", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=200_000, help="rows per throughput run")
    parser.add_argument("--large-rows", type=int, default=50_000,
                        help="rows per throughput run at L > 5000")
    parser.add_argument("--index", default="ivf", help="the models' neighbour index")
    parser.add_argument("--rss-rows", default="1000000,10000000")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="0: no Dask runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-anchor", dest="anchor", action="store_false",
                        help="skip the Wsabie stage's float32-product runs (screen off)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--root", default="runs/bench-score")
    parser.add_argument("--out", default="runs/bench-score.json")
    args = parser.parse_args()
    root = Path(args.root)
    import torch

    report = {"command": " ".join(["python", "scripts/bench_score.py", *sys.argv[1:]]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch "
                         f"{torch.__version__}", "throughput": [], "rss": []}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    labels = [int(x) for x in args.labels.split(",")]
    # 8 row groups, every Dask worker takes a warm-up task; of --batch-size rows each, the
    # timed runs' batch shape (a first product of a new shape set up oneDNN kernels and page
    # buffers in: the first 200k-row call after a 512-row warm-up ran ~20% slower than later)
    make_rows(root / f"warmup-{args.batch_size}.parquet", 8 * args.batch_size, args.features,
              labels[0], seed=4, with_labels=False, group_rows=args.batch_size)
    for n_labels in labels:
        n_rows = args.rows if n_labels <= 5000 else args.large_rows
        # 16,384-row groups: the Dask runs have a dozen tasks to share out
        source = make_rows(root / f"input-{n_rows}.parquet", n_rows, args.features, labels[0],
                           seed=2, with_labels=False, group_rows=16_384)
        model = make_model(root, n_labels, args)
        for stage in ("wsabie", "awe"):
            for workers in (0, args.workers) if args.workers else (0,):
                # the anchor: the float32 product for every label (screen off), its
                # runs alternating with the screened ones
                anchor = stage == "wsabie" and not workers and args.anchor
                runs, dense = [], []
                for _ in range(args.repeats):
                    runs.append(run_child(args, model, source, stage, workers))
                    if anchor:
                        dense.append(run_child(args, model, source, stage, workers,
                                               screen=False))
                rates = [r["rows"] / r["seconds"] for r in runs]
                row = {"labels": n_labels, "stage": stage, "workers": workers,
                       "rows": runs[0]["rows"], "rows_per_s_median": statistics.median(rates),
                       "rows_per_s": rates, "load": [r["load_before"] for r in runs],
                       "steal": [r["steal"] for r in runs],
                       "cluster_start_s": [r["cluster_seconds"] for r in runs],
                       "cold_first_call_s": [r["cold_seconds"] for r in runs]}
                if dense:
                    dense_rates = [r["rows"] / r["seconds"] for r in dense]
                    row["dense_rows_per_s"] = dense_rates
                    row["dense_steal"] = [r["steal"] for r in dense]
                    row["dense_rows_per_s_median"] = statistics.median(dense_rates)
                    row["ratio_to_dense"] = (row["rows_per_s_median"]
                                             / row["dense_rows_per_s_median"])
                report["throughput"].append(row)
                where = f"dask {workers} workers" if workers else f"{args.threads} threads"
                print(f"L={n_labels} {stage:6s} {where}, {row['rows']:,} rows: "
                      f"{row['rows_per_s_median']:,.0f} rows/s "
                      f"(runs {', '.join(f'{r:,.0f}' for r in rates)}; load "
                      f"{', '.join(f'{x:.1f}' for x in row['load'])}; steal "
                      f"{', '.join(_percent(x) for x in row['steal'])})", flush=True)
                if dense:
                    print(f"    float32 product for every label: "
                          f"{row['dense_rows_per_s_median']:,.0f} rows/s (runs "
                          f"{', '.join(f'{r:,.0f}' for r in row['dense_rows_per_s'])}; steal "
                          f"{', '.join(_percent(x) for x in row['dense_steal'])}); "
                          f"screened / dense {row['ratio_to_dense']:.2f}x", flush=True)
                save()
    rss_model = make_model(root, labels[0], args)
    for n_rows in (int(x) for x in args.rss_rows.split(",") if x):
        big = make_rows(root / f"input-{n_rows}.parquet", n_rows, args.features, labels[0],
                        seed=3, with_labels=False)
        run = run_child(args, rss_model, big, "wsabie")
        report["rss"].append({"rows": n_rows, "peak_rss_mib": run["peak_rss_mib"],
                              "seconds": run["seconds"], "load": run["load_before"],
                              "input_mib": big.stat().st_size / 2**20})
        print(f"peak RSS scoring {n_rows:,} rows (L={labels[0]}, wsabie): "
              f"{run['peak_rss_mib']:.0f} MiB in {run['seconds']:.0f}s "
              f"({run['rows'] / run['seconds']:,.0f} rows/s; input "
              f"{big.stat().st_size / 2**20:,.0f} MiB; load {run['load_before']:.1f})", flush=True)
        save()


if __name__ == "__main__":
    main()
