"""The scale benchmark's cost curve: stage times merged across results files, power-law fits."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "bench_scale.py"
_spec = importlib.util.spec_from_file_location("bench_scale", _PATH)
bench_scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_scale)


def _run(n: int, **seconds) -> dict:
    return {"rows": n, "stages": {k.replace("_", "-"): {"seconds": v, "status": 0}
                                  for k, v in seconds.items()}}


def test_power_law_fit_recovers_exponents():
    curve = {"build-g": {n: 3e-9 * n ** 2 for n in (10_000, 100_000, 1_000_000)},
             "train": {n: 2e-4 * n for n in (10_000, 100_000)},
             "eval": {100_000: 5.0}}                        # one size: no fit
    fit = bench_scale.project(curve, 10_000_000)
    assert set(fit) == {"build-g", "train"}
    assert fit["build-g"]["exponent"] == 2.0
    assert fit["build-g"]["seconds"] == pytest.approx(3e-9 * 1e14, rel=1e-6)
    assert fit["train"] == {"exponent": 1.0, "seconds": pytest.approx(2000.0)}


def test_merged_stages_later_files_win_and_failures_are_skipped(tmp_path):
    older, newer = tmp_path / "a.json", tmp_path / "b.json"
    older.write_text(json.dumps({"runs": [_run(100, train=10.0, build_g=4.0)]}))
    failed = _run(100, retrain=1.0)
    failed["stages"]["retrain"]["status"] = 1
    newer.write_text(json.dumps({"runs": [_run(100, build_g=5.0), failed]}))
    curve = bench_scale.merged_stages([older, newer], [_run(300, train=31.0, data=2.0)])
    assert curve == {"train": {100: 10.0, 300: 31.0}, "build-g": {100: 5.0}}
