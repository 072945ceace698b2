#!/usr/bin/env python
"""Stage-1 (Wsabie, WARP) benchmark: quality with `awe train` defaults, and epoch speed against
LightFM's WARP in the same process.

  python scripts/bench_stage1.py [--out runs/bench] [--threads 1,2] [--epochs-timed 10]

Quality: ML100K-IMPLICIT (x = user id only) test P@10 with the epoch chosen on a validation split
carved from train (--valid-fraction 0.1, the `awe train` default), and Fashion-MNIST test P@1.
Anchor: LightFM WARP (lightfm-next, the `bench` extra) on the same split, its epoch picked on test.
Speed: ML100K at dim 64, one epoch of awe vs one epoch of LightFM, same threads and the same
negative budget (LightFM max_sampled = awe --negatives), alternating, medians of several epochs.
Writes OUT/stage1.json and OUT/stage1.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# ruff: noqa: E402  (the imports below need the path above)

from awe.io import datasets
from awe.io.reader import (
    load_examples,
    scan,
)
from awe.models.wsabie import (
    ModelShape,
    Wsabie,
)
from awe.pipeline import train_wsabie
from awe.predict.evaluation import evaluate_model
from awe.training.config import TrainConfig
from awe.training.loop import fit

SHARED = ROOT.parent / "shared" / "data"


def prepare(out: Path, ml_source: Path, fm_source: Path | None) -> dict[str, Path]:
    dirs = {}
    if (ml_source / "u.data").exists():
        d = out / "data" / "movielens"
        if not (d / "test.parquet").exists():
            datasets.make_dataset("movielens", d, source=ml_source)
        dirs["movielens"] = d
    try:
        d = out / "data" / "fashion-mnist"
        if not (d / "test.parquet").exists():
            datasets.make_dataset("fashion-mnist", d, source=fm_source)
        dirs["fashion-mnist"] = d
    except Exception as exc:  # absent data: report and go on
        print(f"fashion-mnist skipped: {exc}")
    return dirs


def quality(name: str, data: Path, out: Path, threads: int) -> dict:
    k = 10 if name == "movielens" else 1
    config = TrainConfig(valid_fraction=0.1, threads=threads)
    t0 = time.perf_counter()
    result, _ = train_wsabie(data / "train.parquet", out / f"model-{name}", config)
    seconds = time.perf_counter() - t0
    metrics = evaluate_model(out / f"model-{name}", data / "test.parquet", [1, 3, 10])["wsabie"]
    print(f"{name}: awe test P@{k} {metrics[f'P@{k}']:.4f} (best epoch {result.best_epoch}, "
          f"{seconds:.1f}s)")
    return {"metric": f"P@{k}", "awe_test": metrics[f"P@{k}"], "awe_all": metrics,
            "best_epoch": result.best_epoch, "train_seconds": seconds}


def lightfm_movielens(data: Path, dim: int, negatives: int, epochs: int, threads: int) -> dict:
    """LightFM WARP on the same split, P@10 per epoch on test (its epoch picked on test)."""
    from lightfm import LightFM
    from lightfm.evaluation import precision_at_k

    train, test = _interactions(data)
    model = LightFM(no_components=dim, loss="warp", max_sampled=negatives, random_state=0)
    curve = []
    for _ in range(epochs):
        model.fit_partial(train, epochs=1, num_threads=threads)
        curve.append(float(precision_at_k(model, test, train_interactions=train, k=10,
                                          num_threads=threads).mean()))
    best = int(np.argmax(curve))
    print(f"movielens: LightFM WARP best test P@10 {curve[best]:.4f} at epoch {best + 1}")
    return {"lightfm_best_test": curve[best], "lightfm_best_epoch": best + 1, "curve": curve}


def _interactions(data: Path):
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    def matrix(path):
        t = pq.read_table(path, columns=["id", "labels"]).to_pydict()
        users = np.repeat(t["id"], [len(x) for x in t["labels"]])
        items = np.concatenate(t["labels"])
        return sp.coo_matrix((np.ones(len(users), np.float32), (users, items)),
                             shape=(944, 1683)).tocsr()

    return matrix(data / "train.parquet"), matrix(data / "test.parquet")


def speed(data: Path, threads: int, epochs: int, dim: int = 64) -> dict:
    from lightfm import LightFM

    torch.set_num_threads(threads)
    found = scan(data / "train.parquet")
    examples = load_examples(data / "train.parquet", found.schema, found.vocab,
                             task="recommendation")
    config = replace(TrainConfig(task="recommendation", dim=dim), epochs=1)
    model = Wsabie(ModelShape(found.schema.n_features, len(found.vocab), dim, True),
                   config.init_scale, torch.Generator().manual_seed(0))
    train, _ = _interactions(data)
    anchor = LightFM(no_components=dim, loss="warp", max_sampled=config.negatives, random_state=0)
    ours, theirs = [], []
    for epoch in range(epochs + 1):  # the first epoch of each warms up and is dropped
        result = fit(model, examples, replace(config, seed=epoch))
        t0 = time.perf_counter()
        anchor.fit_partial(train, epochs=1, num_threads=threads)
        lightfm_seconds = time.perf_counter() - t0
        if epoch:
            ours.append(result.history[0]["seconds"])
            theirs.append(lightfm_seconds)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"speed, {threads} thread(s), dim {dim}, budget {config.negatives}: awe {a * 1e3:.1f} ms"
          f"/epoch, LightFM {b * 1e3:.1f} ms/epoch, ratio LightFM/awe {b / a:.2f}x")
    return {"threads": threads, "dim": dim, "negatives": config.negatives,
            "awe_epoch_ms": a * 1e3, "lightfm_epoch_ms": b * 1e3, "speedup": b / a}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--ml-source", type=Path, default=SHARED / "ml-100k")
    parser.add_argument("--fm-source", type=Path, default=None)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--epochs-timed", type=int, default=10)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    thread_counts = [int(t) for t in args.threads.split(",")]
    dirs = prepare(args.out, args.ml_source, args.fm_source)
    report = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} torch threads available",
              "torch": torch.__version__, "quality": {}, "speed": []}
    if not args.skip_quality:
        for name, data in dirs.items():
            report["quality"][name] = quality(name, data, args.out, thread_counts[0])
        if "movielens" in dirs:
            d = TrainConfig()
            report["quality"]["movielens"].update(
                lightfm_movielens(dirs["movielens"], d.dim, d.negatives, 30, thread_counts[0]))
    if "movielens" in dirs:
        for threads in thread_counts:
            report["speed"].append(speed(dirs["movielens"], threads, args.epochs_timed))
    (args.out / "stage1.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| dataset | metric | awe (Wsabie, defaults) | anchor |", "| --- | --- | --- | --- |"]
    for name, q in report["quality"].items():
        anchor = (f"LightFM WARP {q['lightfm_best_test']:.4f} (epoch picked on test)"
                  if "lightfm_best_test" in q else "")
        lines.append(f"| {name} | test {q['metric']} | {q['awe_test']:.4f} | {anchor} |")
    lines += ["", "| threads | awe ms/epoch | LightFM ms/epoch | LightFM / awe |",
              "| --- | --- | --- | --- |"]
    for s in report["speed"]:
        lines.append(f"| {s['threads']} | {s['awe_epoch_ms']:.1f} | {s['lightfm_epoch_ms']:.1f} "
                     f"| {s['speedup']:.2f}x |")
    (args.out / "stage1.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
