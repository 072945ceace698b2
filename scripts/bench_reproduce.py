#!/usr/bin/env python
"""The reproduced tables of docs/benchmarks.md: `awe reproduce` on every dataset, in one process.

  python scripts/bench_reproduce.py [--datasets magnatagatune,imagenet,fashion-mnist,movielens]
                                    [--threads 2] [--out runs/reproduce] [--update-docs]

Each dataset's report lands in OUT/DATASET (as `awe reproduce --dataset DATASET --out ...`
writes it); OUT/tables.md gathers the four tables with the anchors' published numbers, and
`--update-docs` puts that text into docs/benchmarks.md between its reproduce markers, so the
numbers there are always this script's output.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from awe.reproduce import ALGORITHMS, reproduce  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
BEGIN, END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
# Published numbers for the real datasets, as anchors (not from this script).
ANCHORS = {
    "fashion-mnist": "Anchors (P@1): kNN 0.858, LightFM WARP 0.847, logistic regression 0.844, "
                     "SVC-rbf 0.897 (Fashion-MNIST paper's benchmark).",
    "movielens": "Anchors (P@10, same split): EASE 0.2265, LightFM WARP 0.2115-0.2236, user-kNN "
                 "0.2074.",
    "magnatagatune": "Synthetic stand-in for Magnatagatune (the paper's Table 1: AWE above kNN, "
                     "kNN in Wsabie space and Wsabie at P@1 and P@3); the real audio features "
                     "are not redistributable.",
    "imagenet": "Synthetic stand-in for ImageNet (the paper's Table 2, `max` aggregation); the "
                "paper's run had 10M examples and 21k classes (see scripts/bench_scale.py for "
                "the scale runs).",
}


def machine() -> str:
    """The CPU model, cores and memory, from /proc (Linux), else what platform says."""
    model, memory = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f", {int(line.split()[1]) / 2**20:.0f} GiB"
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores{memory})"


def section(report, threads: int) -> str:
    ks = report.table_ks
    lines = [f"**{report.title}** — `awe reproduce --dataset {report.dataset}`", "",
             "| Algorithm | " + " | ".join(f"Prec@{k}" for k in ks) + " |",
             "| --- | " + " | ".join("---:" for _ in ks) + " |"]
    best = {k: max(report.metrics[r][f"P@{k}"] for r in report.metrics) for k in ks}
    for row, name in ALGORITHMS.items():
        cells = []
        for k in ks:
            v = report.metrics[row][f"P@{k}"]
            cells.append(f"**{v * 100:.2f}%**" if v == best[k] else f"{v * 100:.2f}%")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    times = ", ".join(f"{name} {sec:.1f}" for name, sec in report.seconds.items())
    lines += ["", f"Seconds: {times}; total {sum(report.seconds.values()):.1f} "
                  f"({threads} threads).", "", ANCHORS.get(report.dataset, ""), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="magnatagatune,imagenet,fashion-mnist,movielens")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce")
    parser.add_argument("--ml-source", type=Path, default=SHARED / "ml-100k")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--update-docs", action="store_true",
                        help="rewrite the reproduce section of docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = [f"Measured with `python scripts/bench_reproduce.py --threads {args.threads}` on "
             f"{machine()}, torch {torch.__version__}, {args.threads} threads. Best of each "
             f"column in bold.", ""]
    for name in args.datasets.split(","):
        source = args.ml_source if name == "movielens" else None
        report = reproduce(name, args.out / name, source=source, threads=args.threads)
        text = section(report, args.threads)
        print(text, flush=True)
        parts.append(text)
    tables = "\n".join(parts).rstrip() + "\n"
    (args.out / "tables.md").write_text(tables)
    if args.update_docs:
        doc = ROOT / "docs" / "benchmarks.md"
        text = doc.read_text()
        if BEGIN not in text or END not in text:
            sys.exit(f"docs/benchmarks.md has no {BEGIN} ... {END} markers")
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END),
                      lambda _: f"{BEGIN}\n{tables}{END}", text, flags=re.S)
        doc.write_text(text)
        print("updated docs/benchmarks.md")


if __name__ == "__main__":
    main()
