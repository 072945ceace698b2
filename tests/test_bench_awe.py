"""The AWE benchmark's summary over seeds (the pipeline itself is tested through the library)."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "bench_awe.py"
_spec = importlib.util.spec_from_file_location("bench_awe", _PATH)
bench_awe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_awe)


def _run(awe_p1: float, wsabie_p1: float) -> dict:
    return {"metrics": {"wsabie": {"P@1": wsabie_p1, "P@3": 0.3},
                        "awe": {"P@1": awe_p1, "P@3": 0.31}}}


def test_over_seeds_gives_mean_and_sample_sd_of_every_row_and_metric():
    runs = {0: _run(0.8745, 0.848), 1: _run(0.8779, 0.8415), 2: _run(0.8723, 0.8404)}
    summary = bench_awe.over_seeds(runs)
    assert set(summary) == {"wsabie", "awe"} and set(summary["awe"]) == {"P@1", "P@3"}
    assert summary["awe"]["P@1"]["mean"] == pytest.approx((0.8745 + 0.8779 + 0.8723) / 3)
    assert summary["awe"]["P@1"]["sd"] == pytest.approx(
        statistics.stdev([0.8745, 0.8779, 0.8723]))
    assert summary["wsabie"]["P@3"] == {"mean": pytest.approx(0.3), "sd": 0.0}


def test_one_seed_has_zero_sd_and_the_table_lists_every_seed():
    assert bench_awe.over_seeds({4: _run(0.5, 0.4)})["awe"]["P@1"] == {"mean": 0.5, "sd": 0.0}
    runs = {0: _run(0.87, 0.84), 7: _run(0.88, 0.85)}
    lines = bench_awe.seeds_table("fm", {"seeds": runs, "over_seeds": bench_awe.over_seeds(runs)},
                                  [1])
    assert "| seed 0 | seed 7 | mean | sd |" in lines[2]
    assert "| awe | P@1 | 0.8700 | 0.8800 | 0.8750 | 0.0071 |" in lines
