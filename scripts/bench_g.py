#!/usr/bin/env python
"""G at scale: the neighbour index for the affinity weights on N random-but-clustered embeddings.

  python scripts/bench_g.py --sizes 100000,1000000 --kinds ivf,hnsw --threads 2 [--out runs/g.json]

Data: N float32 rows of dimension D (128), seeded, generated in chunks: Gaussian clusters (about
--rows-per-cluster rows each, sizes varied) whose centres are N(0, I); each cluster lies near its
own random --intrinsic-dim subspace with a decaying spectrum, a per-cluster spread drawn
log-normally, plus isotropic noise. --intrinsic-dim 0 gives isotropic Gaussian clusters (harder).

Each row of the table is one index kind at one N: build time (including the recall calibration of
nprobe / efSearch that `NeighbourIndex.build` does), the time to search all N rows for their top-n
(n=20) leave-one-out, and recall@n against exact search on a 1000-query sample (a different sample
from the calibration's). Flat runs in full up to --flat-full-max rows; beyond it its all-vs-all
time is extrapolated from --flat-probe queries (marked "~"). "= auto" marks the kind that
IndexConfig's default `kind="auto"` picks at that N (same defaults, so the same numbers).
Next to flat, the anchor `faiss-flat`: faiss's own exhaustive search (IndexFlatL2.search), which
the flat kind's torch search replaced, timed on --flat-probe queries in the same process.
A build still adding rows after --budget seconds is aborted and reported as such; a search still
running then is stopped and its all-N time extrapolated ("~"). The JSON is rewritten after each row.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# ruff: noqa: E402  (the imports below need the path above)

from awe.artifacts import write_json
from awe.cpu import set_threads
from awe.neighbors.index import IndexConfig, NeighbourIndex


def clustered(n_rows: int, dim: int, seed: int, rows_per_cluster: int = 300,
              intrinsic_dim: int = 16, noise: float = 0.1, spread_sigma: float = 0.75,
              chunk: int = 4096) -> np.ndarray:
    """Seeded clustered float32 embeddings [n_rows, dim], built ``chunk`` rows at a time."""
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n_rows // rows_per_cluster)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    weights = rng.lognormal(0.0, 0.5, n_clusters)
    weights /= weights.sum()
    spread = rng.lognormal(math.log(2.0), spread_sigma, n_clusters).astype(np.float32)
    r = intrinsic_dim
    if r:
        spectrum = (np.arange(1, r + 1, dtype=np.float32) ** -0.5)
        bases = (rng.standard_normal((n_clusters, r, dim)) / math.sqrt(dim)).astype(np.float32)
        bases *= spectrum[None, :, None]
    out = np.empty((n_rows, dim), dtype=np.float32)
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        c_rng = np.random.default_rng([seed, start])
        a = c_rng.choice(n_clusters, size=stop - start, p=weights)
        s = spread[a, None]
        iso = noise if r else 1.0
        x = centres[a] + s * iso * c_rng.standard_normal((stop - start, dim), dtype=np.float32)
        if r:
            z = c_rng.standard_normal((stop - start, r), dtype=np.float32)
            x += s * np.einsum("nr,nrd->nd", z, bases[a])
        out[start:stop] = x
    return out


class OverBudget(Exception):
    pass


def run_kind(kind: str, x: np.ndarray, n: int, args) -> dict:
    """Build, search all rows leave-one-out (in chunks, extrapolated past --budget), recall."""
    config = IndexConfig(kind=kind, seed=args.seed)
    t0 = time.perf_counter()
    shown = [0.0, 0.0]  # last progress line: build, search

    def progress(done: int, total: int) -> None:
        elapsed = time.perf_counter() - t0
        if elapsed - shown[0] >= 30:
            shown[0] = elapsed
            print(f"    {kind}: {done:,}/{total:,} rows added, {elapsed:.0f} s", flush=True)
        if elapsed > args.budget and done < total:
            raise OverBudget(f"build aborted: {done:,} of {total:,} rows added in "
                             f"{elapsed:.0f} s > --budget {args.budget:.0f}")

    index = NeighbourIndex.build(x, config, progress=progress)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    searched = 0
    chunk = 4096        # grows to --search-chunk: a slow index is caught early
    while searched < len(x):
        rows = np.arange(searched, min(searched + chunk, len(x)), dtype=np.int64)
        chunk = min(2 * chunk, args.search_chunk)
        _, ids = index.search(x[rows], n, exclude_ids=rows)
        assert not (ids == rows[:, None]).any(), "a row returned as its own neighbour"
        searched = int(rows[-1]) + 1
        elapsed = time.perf_counter() - t0
        if searched < len(x) and elapsed - shown[1] >= 30:
            shown[1] = elapsed
            print(f"    {kind}: {searched:,}/{len(x):,} rows searched, {elapsed:.0f} s", flush=True)
        if build_s + elapsed > args.budget:
            break
    search_s = (time.perf_counter() - t0) * len(x) / searched
    t0 = time.perf_counter()
    recall = index.measure_recall(x, n, sample=args.recall_sample, seed=0)
    recall_s = time.perf_counter() - t0
    params = {k: v for k, v in index.params.items() if k not in ("n_rows", "dim", "metric")}
    return {"kind": kind, "resolved": index.kind, "build_s": build_s, "search_s": search_s,
            "total_s": build_s + search_s, "recall": recall, "recall_s": recall_s,
            "params": params, "timings": index.timings, "searched_rows": int(searched),
            "estimated": bool(searched < len(x))}


def _probe_exhaustive(kind: str, build, search, x: np.ndarray, probe: int, seed: int) -> dict:
    """An exhaustive search's all-vs-all time, extrapolated from ``probe`` seeded queries
    (exact, so recall 1): ``build()`` makes the index, ``search(index, rows)`` searches them."""
    t0 = time.perf_counter()
    index = build()
    build_s = time.perf_counter() - t0
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=probe, replace=False))
    t0 = time.perf_counter()
    search(index, rows)
    probe_s = time.perf_counter() - t0
    search_s = probe_s * len(x) / probe
    return {"kind": kind, "resolved": kind, "build_s": build_s, "search_s": search_s,
            "total_s": build_s + search_s, "recall": 1.0, "recall_s": 0.0,
            "params": {"probe_queries": probe, "probe_s": probe_s}, "estimated": True}


def run_flat_probe(x: np.ndarray, n: int, probe: int, seed: int) -> dict:
    """awe's flat kind (exact_knn), leave-one-out like build-g."""
    return _probe_exhaustive(
        "flat", lambda: NeighbourIndex.build(x, IndexConfig(kind="flat")),
        lambda index, rows: index.search(x[rows], n, exclude_ids=rows), x, probe, seed)


def run_faiss_flat_probe(x: np.ndarray, n: int, probe: int, seed: int) -> dict:
    """The anchor: faiss's own exhaustive search (IndexFlatL2.search, which awe's flat kind
    replaced by exact_knn), n + 1 neighbours as leave-one-out searches."""
    import faiss

    def build():
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        return index
    return _probe_exhaustive("faiss-flat", build,
                             lambda index, rows: index.search(x[rows], n + 1), x, probe, seed)


def breadth(row: dict) -> str:
    p = row["params"]
    if row["resolved"] == "ivf":
        return f"nlist={p['nlist']} nprobe={p['nprobe']}"
    if row["resolved"] == "hnsw":
        return f"M={p['hnsw_m']} efC={p['ef_construction']} ef={p['ef_search']}"
    return "exact"


def auto_kind(n_rows: int) -> str:
    return "flat" if n_rows <= IndexConfig().flat_max_rows else "ivf"


def table(rows: list[dict]) -> str:
    lines = ["| N | kind | params | build s | search all N s | build+search s | recall@20 |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['n_rows']:,} | {r['kind']} | {r['skipped']} | | | | |")
            continue
        est = "~" if r["estimated"] else ""
        kind = r["kind"] if r["kind"] == r["resolved"] else f"{r['kind']} ({r['resolved']})"
        if r["kind"] == auto_kind(r["n_rows"]):
            kind += " = auto"
        lines.append(f"| {r['n_rows']:,} | {kind} | {breadth(r)} | {r['build_s']:.1f} | "
                     f"{est}{r['search_s']:.1f} | {est}{r['total_s']:.1f} | {r['recall']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated row counts")
    ap.add_argument("--kinds", default="ivf,hnsw",
                    help="comma-separated: auto, flat, ivf, hnsw (flat is always measured too)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--n", type=int, default=20, help="neighbours per row")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows-per-cluster", type=int, default=300)
    ap.add_argument("--intrinsic-dim", type=int, default=16)
    ap.add_argument("--recall-sample", type=int, default=1000)
    ap.add_argument("--flat-full-max", type=int, default=200_000,
                    help="run flat in full up to this N, else extrapolate from --flat-probe")
    ap.add_argument("--flat-probe", type=int, default=5_000)
    ap.add_argument("--no-flat", action="store_true", help="skip the flat rows")
    ap.add_argument("--no-faiss-anchor", dest="faiss_anchor", action="store_false",
                    help="skip the faiss IndexFlatL2.search anchor next to the flat row")
    ap.add_argument("--budget", type=float, default=600.0,
                    help="seconds per index for build+search; past it a build is aborted and "
                         "the search time extrapolated from the rows searched so far")
    ap.add_argument("--search-chunk", type=int, default=65536)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    set_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    kinds = [k for k in args.kinds.split(",") if k]
    rows: list[dict] = []
    for n_rows in sizes:
        t0 = time.perf_counter()
        x = clustered(n_rows, args.dim, args.seed, args.rows_per_cluster, args.intrinsic_dim)
        gen_s = time.perf_counter() - t0
        print(f"N={n_rows:,}: generated {x.shape} in {gen_s:.1f} s", flush=True)
        todo = list(kinds)
        if not args.no_flat and "flat" not in todo:
            todo.insert(0, "flat")
        for kind in todo:
            base = {"n_rows": n_rows, "dim": args.dim, "generate_s": gen_s}
            try:
                if kind == "flat" and n_rows > args.flat_full_max:
                    row = run_flat_probe(x, args.n, min(args.flat_probe, n_rows), args.seed)
                else:
                    row = run_kind(kind, x, args.n, args)
            except OverBudget as exc:
                rows.append(dict(base, kind=kind, skipped=str(exc)))
                print(f"  {kind}: {exc}", flush=True)
                save(args, rows)
                continue
            extra = [run_faiss_flat_probe(x, args.n, min(args.flat_probe, n_rows), args.seed)
                     ] if kind == "flat" and args.faiss_anchor else []
            for r in [row, *extra]:
                rows.append(dict(base, **r))
                save(args, rows)
                print(f"  {r['kind']}: build {r['build_s']:.1f} s, search {r['search_s']:.1f} s"
                      f"{' (extrapolated)' if r['estimated'] else ''}, recall "
                      f"{r['recall']:.4f} [{breadth(r)}]", flush=True)
            if extra:
                print(f"  faiss-flat / flat search time: "
                      f"{extra[0]['search_s'] / row['search_s']:.2f}x", flush=True)
        del x
    md = table(rows)
    print()
    print(md)
    save(args, rows)
    if args.out:
        print(f"wrote {args.out}")
    return 0


def save(args, rows: list[dict]) -> None:
    if not args.out:
        return
    import faiss

    write_json(args.out, {"command": " ".join(sys.argv), "rows": rows, "markdown": table(rows),
                          "machine": {"cpus": os.cpu_count(), "threads": args.threads,
                                      "load_average": os.getloadavg(),
                                      "platform": platform.platform(),
                                      "faiss": faiss.__version__, "numpy": np.__version__}})


if __name__ == "__main__":
    raise SystemExit(main())
