#!/usr/bin/env python
"""Scale: the whole pipeline on ImageNet-shaped synthetic data, stage by stage, out of core.

  python scripts/bench_scale.py --sizes 100000,300000,1000000 [--classes 21000] [--threads 2]
                                [--shuffle-buffer 65536] [--epochs 10] [--out runs/scale.json]
                                [--stages train,build-g,retrain,eval] [--valid-fraction 0.1]
                                [--rounds 1] [--no-refit] [--merge EARLIER.json,...]

For every N: `awe data synthetic --preset imagenet --rows N --classes C --shards S` (474 dense
features; S = N / 100k shards, at least 2; kept and reused under --root), then `awe train` (stage
1, D = --dim, streamed through --shuffle-buffer rows; 0 loads the data instead), `awe build-g` (max
aggregation, the paper's ImageNet choice; the index kind `auto` picks), `awe retrain` (stage 3,
streamed; --rounds 1 unless given), and `awe eval` of the paper's four rows on --test-rows rows:
knn-input in its own eval process (it indexes the raw training features), the other three together.
Every stage runs as its own process: its wall time and peak RSS (the process's ru_maxrss) are
recorded, with P@1 of every row. The JSON is rewritten after each stage. With several sizes
(this run's and those of earlier results JSONs given to --merge), a power law t = c N^e per
stage (least squares on logs) gives the stage's growth exponent and a projection to 10M rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_stage(args: list[str], env: dict, log: Path) -> dict:
    """Run `awe ARGS` as a child process; its wall time, peak RSS (MiB) and exit status."""
    start = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"$ awe {' '.join(args)}\n".encode())
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
            "status": proc.returncode}


COST_STAGES = ("train", "build-g", "retrain", "eval", "eval-knn-input")


def merged_stages(files: list[Path], runs: list[dict]) -> dict[str, dict[int, float]]:
    """Seconds of every stage at every N: from ``files`` (earlier results JSONs, in order, a
    later one replacing an earlier one's stage at the same N), then from this run's ``runs``."""
    curve: dict[str, dict[int, float]] = {stage: {} for stage in COST_STAGES}
    for run in [r for f in files for r in json.loads(f.read_text())["runs"]] + runs:
        for stage, measured in run.get("stages", {}).items():
            if stage in curve and measured.get("status") == 0:
                curve[stage][int(run["rows"])] = measured["seconds"]
    return {stage: points for stage, points in curve.items() if points}


def project(curve: dict[str, dict[int, float]], n: int) -> dict[str, dict]:
    """A power law t = c N^e per stage with >= 2 sizes (least squares on logs), at ``n`` rows:
    the exponent says how the stage grows (1: linear, 2: quadratic)."""
    out = {}
    for stage, points in curve.items():
        if len(points) < 2:
            continue
        xs = [math.log(k) for k in points]
        ys = [math.log(t) for t in points.values()]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        e = (sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
             / sum((x - mx) ** 2 for x in xs))
        out[stage] = {"exponent": round(e, 2),
                      "seconds": round(math.exp(my + e * (math.log(n) - mx)), 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000", help="comma-separated N (training rows)")
    parser.add_argument("--classes", type=int, default=21_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--test-rows", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--shuffle-buffer", type=int, default=65_536,
                        help="rows in the shuffle buffer; 0: load the training data instead")
    parser.add_argument("--valid-fraction", type=float, default=0.1)
    parser.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-refit: both stages keep their best epoch's weights instead "
                             "of training again on every row for that many epochs")
    parser.add_argument("--stages", default="train,build-g,retrain,eval",
                        help="which stages to run (eval includes knn-input's)")
    parser.add_argument("--index", default="auto", help="build-g --index")
    parser.add_argument("--target-recall", type=float, default=0.95,
                        help="build-g --target-recall (IVF/HNSW calibration)")
    parser.add_argument("--neighbors", type=int, default=20)
    parser.add_argument("--rounds", default="1",
                        help="retrain --rounds (1: one G per run, so the stages' costs add up; "
                             "auto would add a second build-g and retrain)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", default="",
                        help="comma-separated earlier results JSONs whose stage times join this "
                             "run's in the cost curve and the 10M projection (later ones win)")
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "scale",
                        help="datasets and models go here")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: ROOT/"
                                                               "results.json)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    args.root.mkdir(parents=True, exist_ok=True)
    out = args.out or args.root / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "options": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    threads = ["--threads", str(args.threads)]
    stream = ["--shuffle-buffer", str(args.shuffle_buffer)] if args.shuffle_buffer else []
    fit = ["--epochs", str(args.epochs), "--valid-fraction", str(args.valid_fraction),
           "--quiet", *threads, *stream, "--refit" if args.refit else "--no-refit"]
    wanted = set(args.stages.split(","))
    for n in sizes:
        data = args.root / f"imagenet-{n}-{args.classes}-{args.seed}"
        model = args.root / f"model-{n}"
        log = args.root / f"log-{n}.txt"
        shards = max(2, math.ceil(n / 100_000))
        run = {"rows": n, "classes": args.classes, "shards": shards, "stages": {}}
        results["runs"].append(run)
        stages = []
        if not (data / "train").is_dir() or not (data / "test").is_dir():
            stages.append(("data", ["data", "synthetic", "--preset", "imagenet", "--rows", str(n),
                                    "--test-rows", str(args.test_rows), "--classes",
                                    str(args.classes), "--shards", str(shards), "--seed",
                                    str(args.seed), "--out", str(data)]))
        train, test = str(data / "train"), str(data / "test")
        eval_json = {row: args.root / f"eval-{n}-{row}.json" for row in ("knn-input", "rest")}
        stages += [
            ("train", ["train", train, "--model", str(model), "--dim", str(args.dim),
                       "--seed", str(args.seed), *fit]),
            ("build-g", ["build-g", train, "--model", str(model), "--neighbors",
                         str(args.neighbors), "--aggregate", "max", "--index", args.index,
                         "--target-recall", str(args.target_recall), *threads]),
            ("retrain", ["retrain", train, "--model", str(model), "--rounds", args.rounds,
                         *fit]),
            ("eval", ["eval", test, "--model", str(model), "--k", "1,5", "--rows",
                      "knn-wsabie,wsabie,awe", "--json", str(eval_json["rest"]), *threads]),
            ("eval-knn-input", ["eval", test, "--model", str(model), "--k", "1,5", "--rows",
                                "knn-input", "--json", str(eval_json["knn-input"]), *threads]),
        ]
        stages = [(name, a) for name, a in stages
                  if name in ("data", *wanted) or (name == "eval-knn-input" and "eval" in wanted)]
        for path in eval_json.values():  # never report an earlier run's metrics
            path.unlink(missing_ok=True)
        for name, stage_args in stages:
            print(f"N={n}: {name} ...", flush=True)
            run["stages"][name] = measured = run_stage(stage_args, env, log)
            print(f"N={n}: {name} {measured}", flush=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
            if measured["status"] != 0:
                print(f"N={n}: {name} failed; see {log}", flush=True)
                break
        metrics = {}
        for path in eval_json.values():
            if "eval" in wanted and path.exists():
                metrics.update(json.loads(path.read_text()))
        run["P@1"] = {row: round(m["P@1"], 4) for row, m in metrics.items()}
        g = json.loads((model / "metrics.json").read_text()).get("g", {}) if (
            model / "metrics.json").exists() else {}
        run["g"] = {k: g.get(k) for k in ("index", "recall@n", "labels_per_row")}
        run["end_to_end_seconds"] = round(sum(s["seconds"] for k, s in run["stages"].items()
                                              if k != "data"), 1)
        run["peak_rss_mib"] = max((s["peak_rss_mib"] for k, s in run["stages"].items()
                                   if k != "data"), default=None)
        out.write_text(json.dumps(results, indent=2) + "\n")
    curve = merged_stages([Path(f) for f in args.merge.split(",") if f], results["runs"])
    if len({n for stages in curve.values() for n in stages}) >= 2:
        results["cost_curve"] = {stage: {str(n): t for n, t in sorted(points.items())}
                                 for stage, points in curve.items()}
        results["projection_10M"] = project(curve, 10_000_000)
        out.write_text(json.dumps(results, indent=2) + "\n")
        for stage, fit in results["projection_10M"].items():
            print(f"{stage}: time ~ N^{fit['exponent']:.2f}, 10M rows ~{fit['seconds']:,.0f} s",
                  flush=True)
    print(json.dumps(results["runs"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
