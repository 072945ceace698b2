"""The command line's contract on bad input: one line, exit status 2, nothing half-written.

Every case builds its bad input under tmp_path and runs it through the CLI in-process
(``awe train BAD --model DIR`` or ``awe eval BAD --model DIR --json OUT``). A failure must:

* exit with status 2 and print exactly one line (``error: ...``), no traceback, nothing on stdout;
* name what is wrong, where (file, row and column when they apply) and how to fix it;
* leave nothing half-written: no temporary files; a failed train leaves no config.json in its
  model directory (config.json is written last and marks a model complete); a failed eval leaves
  the model directory byte for byte as it was and writes no --json file.

tests/io/test_data.py holds the reader's error corpus at library level (exact rows, DataError
fields); this file is the user-facing contract, end to end.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import write_parquet

runner = CliRunner()

F32 = pa.list_(pa.float32())
I64 = pa.list_(pa.int64())
STR = pa.list_(pa.string())
DENSE = {"features": F32, "labels": STR}
SPARSE = {"feature_ids": I64, "feature_values": F32, "labels": STR}
WIDTH, N_SPARSE = 4, 6  # the trained models: dense width 4; sparse ids 0..5; labels a, b, c
LABELS = ["a", "b", "c"]


def dense_rows(n: int, width: int = WIDTH, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(n, width)).round(3).tolist()


def cycle_labels(n: int) -> list[list[str]]:
    return [[LABELS[i % 3]] for i in range(n)]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(directory: Path) -> dict[str, bytes]:
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- trained models


@dataclass
class Models:
    dense: Path  # string labels a, b, c; dense width 4
    sparse: Path  # string labels a, b, c; sparse ids 0..5
    ints: Path  # integer labels 1, 2, 3; dense width 4
    numeric_strings: Path  # string labels "1", "2", "3"; dense width 4


def _train(data: Path, model: Path) -> Path:
    r = invoke("train", data, "--model", model, "--epochs", 1, "--quiet", "--threads", 1,
               "--valid-fraction", 0, "--dim", 8)
    assert r.exit_code == 0, r.output
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("models")
    n = 30
    dense = write_parquet(root / "dense.parquet",
                          {"features": dense_rows(n), "labels": cycle_labels(n)}, DENSE)
    sparse = write_parquet(root / "sparse.parquet", {
        "feature_ids": [[i % N_SPARSE, (i + 1) % N_SPARSE] for i in range(n)],
        "feature_values": [[1.0, 0.5]] * n, "labels": cycle_labels(n)}, SPARSE)
    ints = write_parquet(root / "ints.parquet",
                         {"features": dense_rows(n), "labels": [[i % 3 + 1] for i in range(n)]},
                         {"features": F32, "labels": I64})
    numeric = write_parquet(root / "numeric.parquet",
                            {"features": dense_rows(n),
                             "labels": [[str(i % 3 + 1)] for i in range(n)]}, DENSE)
    return Models(_train(dense, root / "m-dense"), _train(sparse, root / "m-sparse"),
                  _train(ints, root / "m-ints"), _train(numeric, root / "m-numeric"))


# ----------------------------------------------------------------------------- the cases


@dataclass
class Case:
    """A bad input: ``command`` (train or eval) on ``data``; the error line must contain every
    string in ``what``, ``where`` and ``fix``."""

    command: str
    data: Path | str
    what: list[str]
    where: list[str]
    fix: list[str]
    model: Path | None = None  # eval: the trained model to use (copied); train: None
    extra: list = field(default_factory=list)
    stdout_ok: bool = False  # the failure comes after ordinary output (eval's metrics table)


def _train_case(data, what, where, fix, *extra) -> Case:
    return Case("train", data, what, where, fix, extra=list(extra))


def _eval_case(model, data, what, where, fix) -> Case:
    return Case("eval", data, what, where, fix, model=model)


def _where(file, row=None, column=None) -> list[str]:
    parts = [str(file)]
    if row is not None:
        parts.append(f"row {row}")
    if column is not None:
        parts.append(f"column '{column}'")
    return parts


# --- columns and types


def _missing_feature_column(tmp, m):
    f = write_parquet(tmp / "a.parquet", {"labels": [["a"]], "other": [[1.0]]}, {"labels": STR})
    return _train_case(f, ["no feature column"], _where(f), ["--features-col"])


def _missing_labels_column(tmp, m):
    f = write_parquet(tmp / "a.parquet", {"features": dense_rows(3)}, DENSE)
    return _train_case(f, ["missing column"], _where(f, column="labels"),
                       ["columns present: features", "--labels-col"])


def _missing_feature_column_in_second_file(tmp, m):
    write_parquet(tmp / "d" / "a.parquet", {"features": dense_rows(3), "labels": cycle_labels(3)},
                  DENSE)
    f = write_parquet(tmp / "d" / "b.parquet", {"labels": [["a"]], "other": [[1.0]]},
                      {"labels": STR})
    return _train_case(tmp / "d", ["missing column"], _where(f, column="features"),
                       ["--features-col"])


def _features_are_strings(tmp, m):
    f = write_parquet(tmp / "a.parquet", {"features": [["1", "2"]] * 3, "labels": cycle_labels(3)},
                      {"features": STR, "labels": STR})
    return _train_case(f, ["expected float values, found string"], _where(f, column="features"),
                       ["list<float32>"])


def _features_are_scalars(tmp, m):
    f = write_parquet(tmp / "a.parquet", {"features": [1.0, 2.0, 3.0], "labels": cycle_labels(3)},
                      {"features": pa.float64(), "labels": STR})
    return _train_case(f, ["expected a list of floats, found double"],
                       _where(f, column="features"), ["list<float32>"])


def _feature_ids_are_floats(tmp, m):
    f = write_parquet(tmp / "a.parquet", {"feature_ids": [[1.0], [2.0]], "labels": [["a"], ["b"]]},
                      {"feature_ids": F32, "labels": STR})
    return _train_case(f, ["expected int values, found float"], _where(f, column="feature_ids"),
                       ["list<int64>"])


def _labels_are_floats(tmp, m):
    f = write_parquet(tmp / "a.parquet", {"features": dense_rows(2), "labels": [[1.5], [2.5]]},
                      {"features": F32, "labels": pa.list_(pa.float64())})
    return _train_case(f, ["labels must be strings or integers"], _where(f, column="labels"),
                       ["convert the labels"])


def _labels_mix_ints_and_strings(tmp, m):
    write_parquet(tmp / "d" / "a.parquet", {"features": dense_rows(2), "labels": [[1], [2]]},
                  {"features": F32, "labels": I64})
    f = write_parquet(tmp / "d" / "b.parquet",
                      {"features": dense_rows(2), "labels": [["x"], ["y"]]}, DENSE)
    return _train_case(tmp / "d", ["labels are strings here but ints in earlier rows"],
                       _where(f, 0, "labels"), ["use one type"])


def _label_beyond_int64(tmp, m):
    f = write_parquet(tmp / "a.parquet", {"features": dense_rows(2), "labels": [[1], [2**63]]},
                      {"features": F32, "labels": pa.list_(pa.uint64())})
    return _train_case(f, ["does not fit a signed 64-bit integer"], _where(f, column="labels"),
                       ["smaller integer labels, or strings"])


# --- values


def _ragged_dense_first_row_is_odd(tmp, m):
    """The width is the most common one, not the first row's: the odd first row is named."""
    rows = dense_rows(6)
    rows[0] = rows[0][:-1]
    f = write_parquet(tmp / "a.parquet", {"features": rows, "labels": cycle_labels(6)}, DENSE)
    return _train_case(f, [f"has {WIDTH - 1} features but 5 of 6 rows have {WIDTH}"],
                       _where(f, 0, "features"), ["same number of features", "drop the row"])


def _ragged_dense_in_second_file(tmp, m):
    write_parquet(tmp / "d" / "a.parquet", {"features": dense_rows(5), "labels": cycle_labels(5)},
                  DENSE)
    rows = dense_rows(4)
    rows[2] = rows[2] + [1.0]
    f = write_parquet(tmp / "d" / "b.parquet", {"features": rows, "labels": cycle_labels(4)},
                      DENSE)
    return _train_case(tmp / "d", [f"has {WIDTH + 1} features"], _where(f, 2, "features"),
                       ["drop the row"])


def _nan_feature(tmp, m):
    rows = dense_rows(5)
    rows[3][1] = math.nan
    f = write_parquet(tmp / "a.parquet", {"features": rows, "labels": cycle_labels(5)}, DENSE)
    return _train_case(f, ["NaN or infinite"], _where(f, 3, "features"),
                       ["replace the value or drop the row"])


def _inf_feature_in_a_later_row_group(tmp, m):
    rows = dense_rows(9)
    rows[7][0] = -math.inf
    f = tmp / "a.parquet"
    pq.write_table(pa.table({"features": pa.array(rows, F32),
                             "labels": pa.array(cycle_labels(9), STR)}), f, row_group_size=2)
    return _train_case(f, ["NaN or infinite"], _where(f, 7, "features"), ["drop the row"],
                       "--valid-fraction", "0")


def _null_feature_row(tmp, m):
    rows = dense_rows(4)
    rows[1] = None
    f = write_parquet(tmp / "a.parquet", {"features": rows, "labels": cycle_labels(4)}, DENSE)
    return _train_case(f, ["null value"], _where(f, 1, "features"), ["fill in or drop the row"])


def _negative_feature_id(tmp, m):
    f = write_parquet(tmp / "a.parquet", {"feature_ids": [[0, 1], [2], [3, -1]],
                                          "labels": cycle_labels(3)},
                      {"feature_ids": I64, "labels": STR})
    return _train_case(f, ["negative feature id"], _where(f, 2, "feature_ids"), ["0..n-1"])


def _huge_feature_id(tmp, m):
    """A hashed or raw key used as an index would ask for an impossible U: refused early."""
    f = write_parquet(tmp / "a.parquet", {"feature_ids": [[0], [2**40], [1]],
                                          "labels": cycle_labels(3)},
                      {"feature_ids": I64, "labels": STR})
    return _train_case(f, ["feature id 1099511627776 is too large"], _where(f, 1, "feature_ids"),
                       ["remap them to 0..n-1"])


def _ids_and_values_differ_in_length(tmp, m):
    f = write_parquet(tmp / "a.parquet", {"feature_ids": [[0], [1, 2], [3]],
                                          "feature_values": [[1.0], [1.0], [2.0]],
                                          "labels": cycle_labels(3)}, SPARSE)
    return _train_case(f, ["1 values for 2 feature ids"], _where(f, 1, "feature_values"),
                       ["one value per id"])


def _nan_feature_value(tmp, m):
    f = write_parquet(tmp / "a.parquet", {"feature_ids": [[0], [1, 2], [3]],
                                          "feature_values": [[1.0], [1.0, 2.0], [math.nan]],
                                          "labels": cycle_labels(3)}, SPARSE)
    return _train_case(f, ["NaN or infinite"], _where(f, 2, "feature_values"), ["drop the row"])


def _no_feature_ids_at_all(tmp, m):
    f = write_parquet(tmp / "a.parquet", {"feature_ids": [[], []], "labels": [["a"], ["b"]]},
                      {"feature_ids": I64, "labels": STR})
    return _train_case(f, ["no feature ids in any row"], _where(f, column="feature_ids"),
                       ["check the column"])


def _row_without_labels(tmp, m):
    labels = cycle_labels(5)
    labels[2] = []
    f = write_parquet(tmp / "a.parquet", {"features": dense_rows(5), "labels": labels}, DENSE)
    return _train_case(f, ["row has no labels"], _where(f, 2, "labels"), [">= 1 label"])


def _null_scalar_label(tmp, m):
    f = write_parquet(tmp / "a.parquet", {"features": dense_rows(4),
                                          "labels": ["a", "b", "c", None]},
                      {"features": F32, "labels": pa.string()})
    return _train_case(f, ["row has no labels"], _where(f, 3, "labels"), [">= 1 label"])


def _no_labels_in_any_row(tmp, m):
    f = write_parquet(tmp / "a.parquet", {"features": dense_rows(2), "labels": [[], None]}, DENSE)
    return _train_case(f, ["no labels in any row"], _where(f, column="labels"), ["--labels-col"])


# --- files


def _empty_file(tmp, m):
    f = tmp / "a.parquet"
    f.write_bytes(b"")
    return _train_case(f, ["not a readable parquet file: Parquet file size is 0 bytes"],
                       _where(f), ["rewrite it", "or remove it"])


def _zero_rows(tmp, m):
    f = write_parquet(tmp / "a.parquet", {"features": [], "labels": []}, DENSE)
    return _train_case(f, ["no rows"], _where(f), ["point to files that hold examples"])


def _directory_of_zero_row_files(tmp, m):
    for name in ("a", "b"):
        write_parquet(tmp / "d" / f"{name}.parquet", {"features": [], "labels": []}, DENSE)
    return _train_case(tmp / "d", ["no rows"], _where(tmp / "d"), ["point to files"])


def _random_bytes(tmp, m):
    f = tmp / "a.parquet"
    f.write_bytes(np.random.default_rng(0).bytes(3000))
    return _train_case(f, ["not a parquet file"], _where(f), ["rewrite it", "to_parquet"])


def _truncated_parquet(tmp, m):
    good = write_parquet(tmp / "good.parquet",
                         {"features": dense_rows(200), "labels": cycle_labels(200)}, DENSE)
    f = tmp / "a.parquet"
    f.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return _train_case(f, ["parquet file"], _where(f), ["rewrite it"])


def _damaged_page(tmp, m, compression="none", checksum=True):
    """A damaged data page names the exact rows of its row group (not a read-ahead guess).

    Without page checksums only a compressed page can reveal damage (a damaged plain page just
    holds other numbers), hence compressible features here.
    """
    f = tmp / "a.parquet"
    features = (np.arange(500 * WIDTH).reshape(500, WIDTH) % 7).tolist()
    table = pa.table({"features": pa.array(features, F32),
                      "labels": pa.array(cycle_labels(500), STR)})
    pq.write_table(table, f, row_group_size=100, compression=compression,
                   write_page_checksum=checksum)
    chunk = pq.ParquetFile(f).metadata.row_group(3).column(0)
    data = bytearray(f.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    f.write_bytes(bytes(data))
    return _train_case(f, ["cannot read rows 300..399 (row group 3)"], _where(f, 300),
                       ["damaged", "rewrite it"])


def _damaged_compressed_page(tmp, m):
    return _damaged_page(tmp, m, compression="zstd", checksum=False)


def _directory_without_parquet(tmp, m):
    (tmp / "d").mkdir()
    (tmp / "d" / "notes.txt").write_text("not data")
    return _train_case(tmp / "d", ["holds no .parquet files"], _where(tmp / "d"),
                       ["point to the files"])


def _glob_matches_nothing(tmp, m):
    write_parquet(tmp / "a.parquet", {"features": dense_rows(2), "labels": [["a"], ["b"]]}, DENSE)
    pattern = str(tmp / "*.pq")
    return _train_case(pattern, ["matches no files"], [pattern], ["check the path"])


def _glob_with_brackets_matches_nothing(tmp, m):
    pattern = str(tmp / "part-[ab].parquet")
    return _train_case(pattern, ["matches no files"], [pattern], ["check the path"])


def _no_such_file(tmp, m):
    f = tmp / "missing.parquet"
    return _train_case(f, ["no such file or directory"], _where(f), ["check the path"])


# --- outputs


def _model_path_is_a_file(tmp, m):
    data = write_parquet(tmp / "a.parquet", {"features": dense_rows(9), "labels": cycle_labels(9)},
                         DENSE)
    (tmp / "taken").write_text("a file where the model directory should go")
    model = tmp / "taken" / "model"
    return _train_case(data, ["cannot write"], [str(model)],
                       [WRITE_FIX], "--model", model)


def _model_directory_read_only(tmp, m):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    data = write_parquet(tmp / "a.parquet", {"features": dense_rows(9), "labels": cycle_labels(9)},
                         DENSE)
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(stat.S_IRUSR | stat.S_IXUSR)
    model = tmp / "ro" / "model"
    return _train_case(data, ["cannot write", "Permission denied"], [str(model)],
                       [WRITE_FIX], "--model", model)


# --- evaluation against a trained model


def _eval_dense_width_differs(tmp, m):
    f = write_parquet(tmp / "t.parquet", {"features": dense_rows(3, WIDTH + 1),
                                          "labels": cycle_labels(3)}, DENSE)
    return _eval_case(m.dense, f, [f"has {WIDTH + 1} features, expected {WIDTH}"],
                      _where(f, 0, "features"), ["same width as the training data"])


def _eval_sparse_data_dense_model(tmp, m):
    f = write_parquet(tmp / "t.parquet", {"feature_ids": [[0], [1]], "labels": [["a"], ["b"]]},
                      {"feature_ids": I64, "labels": STR})
    return _eval_case(m.dense, f, ["trained on dense features but this file has sparse"],
                      _where(f), ["same kind of features"])


def _eval_dense_data_sparse_model(tmp, m):
    f = write_parquet(tmp / "t.parquet", {"features": dense_rows(2), "labels": [["a"], ["b"]]},
                      DENSE)
    return _eval_case(m.sparse, f, ["trained on sparse features but this file has dense"],
                      _where(f), ["same kind of features"])


def _eval_feature_id_out_of_range(tmp, m):
    f = write_parquet(tmp / "t.parquet", {"feature_ids": [[0], [1, N_SPARSE]],
                                          "labels": [["a"], ["b"]]},
                      {"feature_ids": I64, "labels": STR})
    return _eval_case(m.sparse, f, [f"feature id {N_SPARSE} is out of range"],
                      _where(f, 1, "feature_ids"), ["drop ids", "or retrain"])


def _eval_negative_feature_id(tmp, m):
    f = write_parquet(tmp / "t.parquet", {"feature_ids": [[0], [1], [-3]],
                                          "labels": cycle_labels(3)},
                      {"feature_ids": I64, "labels": STR})
    return _eval_case(m.sparse, f, ["negative feature id"], _where(f, 2, "feature_ids"),
                      ["0..n-1"])


def _eval_inf_feature(tmp, m):
    rows = dense_rows(3)
    rows[1][2] = math.inf
    f = write_parquet(tmp / "t.parquet", {"features": rows, "labels": cycle_labels(3)}, DENSE)
    return _eval_case(m.dense, f, ["NaN or infinite"], _where(f, 1, "features"),
                      ["drop the row"])


def _eval_string_labels_for_int_model(tmp, m):
    f = write_parquet(tmp / "t.parquet", {"features": dense_rows(2), "labels": [["1"], ["2"]]},
                      DENSE)
    return _eval_case(m.ints, f, ["labels are strings but the model's labels are integers"],
                      _where(f, 0, "labels"), ["write them as integers"])


def _eval_zero_rows(tmp, m):
    f = write_parquet(tmp / "t.parquet", {"features": [], "labels": []}, DENSE)
    return _eval_case(m.dense, f, ["no rows"], _where(f), ["point to files"])


def _eval_corrupt_file(tmp, m):
    f = tmp / "t.parquet"
    f.write_bytes(b"PAR1" + np.random.default_rng(2).bytes(500) + b"PAR1")
    return _eval_case(m.dense, f, ["not a readable parquet file"], _where(f), ["rewrite it"])


def _eval_json_path_unwritable(tmp, m):
    f = write_parquet(tmp / "t.parquet", {"features": dense_rows(3), "labels": cycle_labels(3)},
                      DENSE)
    (tmp / "taken").write_text("x")
    case = _eval_case(m.dense, f, ["cannot write"], [str(tmp / "taken" / "e.json")],
                      [WRITE_FIX])
    case.extra, case.stdout_ok = ["--json", tmp / "taken" / "e.json"], True
    return case


# --- damaged model directories (eval)


def _damage(name: str, how: str) -> Callable[[Path], None]:
    def apply(model_dir: Path) -> None:
        path = model_dir / name
        if how == "missing":
            path.unlink()
        elif how == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        else:  # valid JSON of the wrong shape
            path.write_text(how)
    return apply


def _retensor(name: str, change: Callable[[dict], dict]) -> Callable[[Path], None]:
    """Rewrite a safetensors file of the model with ``change`` applied to its tensors (a
    well-formed file that does not fit the model: tampered, or copied from another model)."""
    def apply(model_dir: Path) -> None:
        path = model_dir / name
        save_file(change(load_file(str(path))), str(path))
    return apply


def _newer_format(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["format_version"] = 999
    (model_dir / "config.json").write_text(json.dumps(config))


# damage -> (how, what the line must say, how it says to fix it)
DAMAGED_MODEL = {
    "config-missing": (_damage("config.json", "missing"), ["config.json", "missing"],
                       ["train the model again"]),
    "config-truncated": (_damage("config.json", "truncated"), ["config.json", "not valid JSON"],
                         ["retrain"]),
    "labels-missing": (_damage("labels.json", "missing"), ["labels.json", "missing"],
                       ["train the model again"]),
    "labels-truncated": (_damage("labels.json", "truncated"), ["labels.json", "not valid JSON"],
                         ["retrain"]),
    "weights-missing": (_damage("wsabie.safetensors", "missing"),
                        ["wsabie.safetensors", "missing"], ["train the model again"]),
    "weights-truncated": (_damage("wsabie.safetensors", "truncated"),
                          ["wsabie.safetensors", "damaged"], ["train the model again"]),
    "config-not-an-object": (_damage("config.json", "[]"), ["config.json", "damaged"],
                             ["retrain"]),
    "labels-duplicated": (_damage("labels.json", '["a", "a", "b"]'),
                          ["labels.json", "lists 'a' twice"], ["train the model again"]),
    "labels-mixed-types": (_damage("labels.json", '["a", 1, "b"]'),
                           ["labels.json", "all strings or all integers"],
                           ["train the model again"]),
    "weights-wrong-shape": (_retensor("wsabie.safetensors",
                                      lambda t: {**t, "V": torch.zeros(t["V"].shape[0] + 1,
                                                                       t["V"].shape[1])}),
                            ["wsabie.safetensors", "shapes"], ["train the model again"]),
    "weights-wrong-dtype": (_retensor("wsabie.safetensors",
                                      lambda t: {k: v.double() for k, v in t.items()}),
                            ["wsabie.safetensors", "dtype torch.float64"],
                            ["train the model again"]),
    "weights-missing-tensor": (_retensor("wsabie.safetensors",
                                         lambda t: {k: v for k, v in t.items() if k != "U"}),
                               ["wsabie.safetensors", "'U'"], ["train the model again"]),
    "newer-format": (_newer_format, ["newer awe", "format 999"], ["upgrade awe"]),
}

# Damaged models that fail today in awe/model.py (not owned here). strict: the marker must go
# once fixed.
DAMAGED_MODEL_FAILURES: dict[str, str] = {}


# ----------------------------------------------------------------------------- the runner

CASES = {name[1:]: fn for name, fn in list(globals().items())
         if name.startswith("_") and callable(fn) and fn.__code__.co_varnames[:2] == ("tmp", "m")}

# The fix that awe/artifacts.py's "cannot write" errors should name (see NO_FIX_YET).
WRITE_FIX = "choose another location"

# Messages made outside the files this suite's authors own that say what and where but not yet
# how to fix it: everything else about the case is checked, then the case is marked xfail.
NO_FIX_YET: dict[str, str] = {}

# Cases that fail today for reasons outside the files this suite's authors own; each names the
# fix. strict: when the fix lands, the case passes and the marker must go.
KNOWN_FAILURES: dict[str, str] = {}


def _params():
    for name in sorted(CASES):
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name])] \
            if name in KNOWN_FAILURES else []
        yield pytest.param(name, marks=marks, id=name)


def assert_one_line_error(result, *needles: str, stdout_ok: bool = False) -> str:
    """Exit 2, one ``error:`` line on stderr holding every needle, nothing else printed (but
    ordinary output already printed before the failure when ``stdout_ok``); returns the line."""
    assert result.exit_code == 2, (result.exit_code, result.output, repr(result.exception))
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert stdout_ok or result.stdout == "", result.stdout
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def check_fix(name: str, line: str, fix: list[str]) -> None:
    """The line says how to fix the problem (every string of ``fix``)."""
    missing = [f for f in fix if f not in line]
    if missing and name in NO_FIX_YET:
        pytest.xfail(NO_FIX_YET[name])
    assert not missing, f"{missing} not in {line!r}"
    assert name not in NO_FIX_YET, f"{name} now names its fix: drop it from NO_FIX_YET"


def run_case(tmp_path: Path, name: str, case: Case) -> None:
    if case.command == "train":
        model = tmp_path / "model"
        args = ["train", case.data, "--quiet", "--epochs", 1, "--threads", 1]
        if "--model" not in case.extra:
            args += ["--model", model]
        result = invoke(*args, *case.extra)
        line = assert_one_line_error(result, *case.what, *case.where, stdout_ok=case.stdout_ok)
        assert not list(tmp_path.rglob("config.json")), "a failed train left a model behind"
    else:
        model = _copy_model(case.model, tmp_path / "model")
        before = snapshot(model)
        out = tmp_path / "eval.json"
        extra = case.extra or ["--json", out]
        result = invoke("eval", case.data, "--model", model, *extra)
        line = assert_one_line_error(result, *case.what, *case.where, stdout_ok=case.stdout_ok)
        assert snapshot(model) == before, "a failed eval changed the model directory"
        assert not out.exists()
    assert not temp_files(tmp_path), temp_files(tmp_path)
    check_fix(name, line, case.fix)


@pytest.mark.parametrize("name", list(_params()))
def test_bad_input(tmp_path, models, name):
    run_case(tmp_path, name, CASES[name](tmp_path, models))


def test_corpus_is_large_enough():
    assert len(CASES) + len(DAMAGED_MODEL) >= 20


@pytest.mark.parametrize("damage", [
    pytest.param(name, id=name, marks=[pytest.mark.xfail(strict=True, reason=reason)]
                 if (reason := DAMAGED_MODEL_FAILURES.get(name)) else [])
    for name in sorted(DAMAGED_MODEL)])
def test_damaged_model_directory(tmp_path, models, damage):
    apply, needles, fix = DAMAGED_MODEL[damage]
    model = _copy_model(models.dense, tmp_path / "model")
    apply(model)
    before = snapshot(model)
    test = write_parquet(tmp_path / "t.parquet",
                         {"features": dense_rows(3), "labels": cycle_labels(3)}, DENSE)
    out = tmp_path / "e.json"
    line = assert_one_line_error(invoke("eval", test, "--model", model, "--json", out), *needles)
    assert str(model) in line
    assert snapshot(model) == before and not out.exists() and not temp_files(tmp_path)
    check_fix(damage, line, fix)


# ----------------------------------------------------------------------------- not errors


def _eval_json(tmp_path, model, rows, labels, label_type=STR, k="3"):
    test = write_parquet(tmp_path / "t.parquet", {"features": rows, "labels": labels},
                         {"features": F32, "labels": label_type})
    out = tmp_path / "e.json"
    r = invoke("eval", test, "--model", model, "--k", k, "--json", out)
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())["wsabie"]


def test_unknown_labels_count_as_misses(tmp_path, models):
    """Labels the model never saw are true labels that are never hit: no error, lower metrics.

    With k = 3 = the number of labels, every known label is in the top 3, so the metrics are
    exact whatever the model learnt: row 1 (a + unknown) R@3 = 1/2, row 2 (unknown only) 0.
    """
    got = _eval_json(tmp_path, models.dense, dense_rows(2), [["a", "zzz"], ["never-seen"]])
    assert got["R@3"] == pytest.approx((1 / 2 + 0) / 2)
    assert got["P@3"] == pytest.approx((1 / 3 + 0) / 2)
    assert 0 < got["NDCG@3"] < 1 and 0 < got["MAP@3"] < 1


def test_int_labels_for_a_string_model(tmp_path, models):
    """Decision: integer labels given to a model with string labels are compared by their decimal
    text (7 matches "7"): a vocabulary read from CSV often holds numbers as strings. Integers that
    match no label are unknown labels, i.e. misses, never an error. (String labels for a model
    with integer labels are an error instead: see the eval_string_labels_for_int_model case.)
    """
    ints = pa.list_(pa.int64())
    none_match = _eval_json(tmp_path, models.dense, dense_rows(3), [[1], [2], [3]], ints)
    assert none_match["R@3"] == 0.0 and none_match["P@3"] == 0.0
    all_match = _eval_json(tmp_path, models.numeric_strings, dense_rows(3), [[1], [2], [3]], ints)
    assert all_match["R@3"] == 1.0  # k = 3 = every label: each row's one label is found


def test_non_finite_scores_do_not_crash_eval(tmp_path, models):
    """A model whose weights hold NaN (damaged, or diverged elsewhere) still evaluates: NaN scores
    rank last, so those labels are never hits (awe.ranking.topk.top_k)."""
    model = _copy_model(models.dense, tmp_path / "model")
    weights = model / "wsabie.safetensors"
    tensors = load_file(str(weights))
    tensors["V"][0] = float("nan")  # label "a" scores NaN for every row
    save_file(tensors, str(weights), metadata=load_metadata(weights))
    got = _eval_json(tmp_path, model, dense_rows(3), [["a"], ["a"], ["b"]])
    # label a is never ranked: rows 1 and 2 have no hit; row 3's "b" is in the top 3
    assert got["R@3"] == pytest.approx(1 / 3)
    assert all(0 <= v <= 1 for v in got.values())


def load_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata() or {}


def test_bad_data_never_touches_an_existing_model(tmp_path, models):
    model = _copy_model(models.dense, tmp_path / "model")
    before = snapshot(model)
    rows = dense_rows(5)
    rows[4][0] = math.nan
    bad = write_parquet(tmp_path / "bad.parquet", {"features": rows, "labels": cycle_labels(5)},
                        DENSE)
    assert_one_line_error(invoke("train", bad, "--model", model, "--quiet"), "row 4")
    assert snapshot(model) == before


# ----------------------------------------------------------------------------- a full disk


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _good_training_data(tmp_path: Path) -> Path:
    return write_parquet(tmp_path / "train.parquet",
                         {"features": dense_rows(30), "labels": cycle_labels(30)}, DENSE)


def test_disk_full_while_writing_weights(tmp_path, monkeypatch):
    """The weights writer fills the disk half way: one line, and no partial file anywhere."""
    import safetensors.torch

    def half_then_enospc(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise _enospc()

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_enospc)
    data, model = _good_training_data(tmp_path), tmp_path / "model"
    # without checkpoints the model's weights are the first tensors written
    line = assert_one_line_error(invoke("train", data, "--model", model, "--quiet", "--epochs",
                                        1, "--valid-fraction", 0, "--no-checkpoint"),
                                 "wsabie.safetensors:", "No space left on device")
    assert "checkpoint" not in line
    assert not (model / "config.json").exists() and not (model / "wsabie.safetensors").exists()
    assert not temp_files(tmp_path)
    # with them, the first checkpoint meets the full disk: training stops there
    assert_one_line_error(invoke("train", data, "--model", model, "--quiet", "--epochs", 3,
                                 "--valid-fraction", 0),
                          f"{model / 'checkpoint' / 'wsabie.safetensors'}:",
                          "No space left on device")
    assert not list(model.rglob("*.safetensors")) and not (model / "config.json").exists()
    assert not temp_files(tmp_path)


def test_disk_full_at_fsync(tmp_path, monkeypatch):
    """ENOSPC often surfaces at fsync (delayed allocation): the first model file fails there."""
    real_fsync = os.fsync

    def fsync(fd):
        if "labels.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise _enospc()
        return real_fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the file being synced")
    monkeypatch.setattr(os, "fsync", fsync)
    data, model = _good_training_data(tmp_path), tmp_path / "model"
    assert_one_line_error(invoke("train", data, "--model", model, "--quiet", "--epochs", 1,
                                 "--valid-fraction", 0), "labels.json", "No space left on device")
    assert not list(model.glob("*.json")) and not temp_files(tmp_path)


def test_failed_retrain_keeps_the_old_model(tmp_path, monkeypatch, models):
    """Training into an existing model directory and failing half way keeps the old model whole.
    (Also needs the artifacts.py fix above for the one-line error.)"""
    import safetensors.torch

    model = _copy_model(models.dense, tmp_path / "model")
    before = snapshot(model)

    def enospc(*args, **kwargs):
        raise _enospc()

    monkeypatch.setattr(safetensors.torch, "save_file", enospc)
    data = write_parquet(tmp_path / "other.parquet",  # other labels: a new labels.json
                         {"features": dense_rows(30), "labels": [["x"], ["y"], ["z"]] * 10},
                         DENSE)
    result = invoke("train", data, "--model", model, "--quiet", "--epochs", 1,
                    "--valid-fraction", 0)
    assert_one_line_error(result, "No space left on device")
    assert snapshot(model) == before


# --- damaged stage-2 and stage-3 files (eval of a full AWE model)


@pytest.fixture(scope="module")
def awe_model(tmp_path_factory) -> tuple[Path, Path]:
    from tests.affinity.test_affinity import write_clusters

    root = tmp_path_factory.mktemp("awe-model")
    train = write_clusters(root / "train.parquet", 200, 0)
    test = write_clusters(root / "test.parquet", 50, 1)
    model = root / "m"
    for args in (["train", train, "--model", model, "--epochs", 2, "--dim", 4, "--quiet"],
                 ["build-g", train, "--model", model, "--neighbors", 5],
                 ["retrain", train, "--model", model, "--epochs", 2, "--quiet"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    return model, test


def _truncate(name: str) -> Callable[[Path], None]:
    return _damage(name, "truncated")


def _floats_as_double(t: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in t.items()}


# damage -> (how, what the line must say, how it says to fix it)
DAMAGED_AWE = {
    "index-missing": (_damage("index.faiss", "missing"), ["index.faiss", "missing"],
                      ["awe build-g"]),
    "index-truncated": (_truncate("index.faiss"), ["index.faiss", "damaged"], ["awe build-g"]),
    "index-not-an-index": (_damage("index.faiss", "x" * 1000), ["index.faiss", "damaged"],
                           ["awe build-g"]),
    "affinity-missing": (_damage("affinity.safetensors", "missing"),
                         ["affinity.safetensors", "missing"], ["again"]),
    "affinity-truncated": (_truncate("affinity.safetensors"), ["affinity.safetensors", "damaged"],
                           ["again"]),
    "affinity-wrong-dtype": (_retensor("affinity.safetensors", _floats_as_double),
                             ["affinity.safetensors", "dtype torch.float64"], ["awe build-g"]),
    "affinity-other-rows": (_retensor("affinity.safetensors",
                                      lambda t: {k: v[:-1] for k, v in t.items()}),
                            ["do not match"], ["awe build-g"]),
    "awe-missing": (_damage("awe.safetensors", "missing"), ["awe.safetensors", "missing"],
                    ["again"]),
    "awe-truncated": (_truncate("awe.safetensors"), ["awe.safetensors", "damaged"], ["again"]),
    "awe-from-another-run": (_retensor("awe.safetensors",
                                       lambda t: {k: v[:-1] for k, v in t.items()}),
                             ["awe.safetensors", "does not match config.json"],
                             ["awe retrain"]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_AWE))
def test_damaged_awe_model_directory(tmp_path, awe_model, damage):
    model, test = awe_model
    apply, needles, fix = DAMAGED_AWE[damage]
    copy = _copy_model(model, tmp_path / "model")
    apply(copy)
    before = snapshot(copy)
    result = invoke("eval", test, "--model", copy, "--k", 1, "--json", tmp_path / "e.json")
    line = assert_one_line_error(result, *needles)
    assert snapshot(copy) == before, "a failed eval changed the model directory"
    assert not (tmp_path / "e.json").exists()
    check_fix(damage, line, fix)
