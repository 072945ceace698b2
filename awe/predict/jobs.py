"""The output files of ``awe score``: the options that decide their bytes, which input goes to
which output, the metadata that says an output is complete and current, and the writer that
makes one a row group at a time (to a temporary name, renamed when complete).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from awe import artifacts
from awe.errors import AweError, DataError, invalid
from awe.io.reader import resolve_files, row_group_sizes

METADATA_KEY = b"awe.score"
REJECTS_SUFFIX = ".rejects.parquet"
STAGES = ("wsabie", "awe")
SCORE_BATCH_ROWS = 4096  # rows scored at a time (one record batch of the input)


@dataclass(frozen=True)
class ScoreOptions:
    """Everything that decides the bytes of an output (recorded in its metadata), and how."""

    k: int = 10
    stage: str | None = None  # wsabie | awe; None: the newest the model has
    id_cols: tuple[str, ...] | None = None  # None: the model's id column, when the file has it
    exclude_col: str | None = None  # None: the model's exclude column, when the file has it
    batch_rows: int = SCORE_BATCH_ROWS
    skip_invalid: bool = False
    # rank through bfloat16 products (awe.ranking.screen; the same labels, scores to float32
    # rounding); None: where the CPU has them natively. Recorded as decided.
    screen: bool | None = None
    overwrite: bool = False  # not recorded: how to run, not what is written
    threads: int | None = None  # not recorded: the bytes do not depend on it

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise invalid("k", f"must be an integer >= 1, got {self.k!r}")
        if self.stage is not None and self.stage not in STAGES:
            raise invalid("stage", f"must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.batch_rows < 1:
            raise invalid("batch_rows", f"must be >= 1, got {self.batch_rows!r}")
        if self.threads is not None and self.threads < 1:
            raise invalid("threads", f"must be >= 1, got {self.threads!r}")

    def recorded(self) -> dict:
        d = asdict(self)
        d.pop("overwrite")
        d.pop("threads")
        d["id_cols"] = list(d["id_cols"] or [])
        return d


@dataclass
class Job:
    """One input file and the output file it gets."""

    source: Path
    target: Path
    row_groups: list[int] = field(default_factory=list)  # rows of every row group

    @property
    def rejects(self) -> Path:
        return rejects_path(self.target)

    @property
    def n_rows(self) -> int:
        return sum(self.row_groups)

    def tasks(self) -> list[tuple[str, int, int]]:
        """(file, row group number, first row of the group) of every row group."""
        offsets = np.r_[0, np.cumsum(self.row_groups)[:-1]] if self.row_groups else []
        return [(str(self.source), n, int(o)) for n, o in enumerate(offsets)]


@dataclass
class ScoreSummary:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # complete and current already
    rejects: list[Path] = field(default_factory=list)
    rows: int = 0
    rejected: int = 0


def rejects_path(target: Path) -> Path:
    name = target.name[:-len(".parquet")] if target.name.endswith(".parquet") else target.name
    return target.with_name(name + REJECTS_SUFFIX)


def check_columns(file: Path, names: list[str], ids: list[str], exclude: str | None,
                  options: ScoreOptions) -> None:
    for name, option in [*((i, "--id-col") for i in ids), (exclude, "--exclude-col")]:
        if name is not None and name not in names:
            raise DataError("missing column", file=str(file), column=name,
                            hint=f"columns present: {', '.join(names)}; name it with {option}")
    clash = [i for i in ids if i in ("labels", "scores")]
    if clash:
        raise DataError(f"--id-col {clash[0]} would collide with an output column",
                        file=str(file), column=clash[0], hint="rename the id column")


def output_schema(source: pa.Schema, ids: list[str], vocab) -> pa.Schema:
    fields = [source.field(name).remove_metadata() for name in ids]
    return pa.schema([*fields, pa.field("labels", pa.list_(vocab.array.type)),
                      pa.field("scores", pa.list_(pa.float32()))])


def plan_jobs(input_path, out) -> list[Job]:
    """Input files and their outputs: OUT itself for a single input file; otherwise every file's
    path relative to the input directory (or the glob's fixed part) under OUT."""
    text = str(input_path)
    files = resolve_files(input_path)
    out = Path(out)
    magic = any(ch in text for ch in "*?[")
    single = not magic and Path(text).is_file()
    if single:
        target = out / files[0].name if out.is_dir() or str(out).endswith(os.sep) else out
        jobs = [Job(files[0], target)]
    else:
        base = Path(text) if not magic else _glob_base(text)
        # OUT inside the input directory: its outputs (and rejects) are no input of a re-run
        files = [f for f in files if not f.resolve().is_relative_to(out.resolve())]
        if not files:
            raise AweError(f"{text}: no input files outside --out {out}")
        if out.exists() and not out.is_dir():
            raise AweError(f"--out {out}: a file, but the input {text} has many files; give a "
                           f"directory")
        jobs = [Job(f, out / _relative(f, base)) for f in files]
    targets = [job.target.resolve() for job in jobs]
    if len(set(targets)) < len(targets):
        raise AweError(f"{text}: two input files would get the same output under {out}; "
                       f"score them separately")
    for job in jobs:
        if job.target.resolve() == job.source.resolve():
            raise AweError(f"--out {out}: would overwrite the input {job.source}; choose "
                           f"another location")
        if job.target.name.endswith(REJECTS_SUFFIX) or job.source.name.endswith(REJECTS_SUFFIX):
            raise AweError(f"{job.source}: the name ends in {REJECTS_SUFFIX}, which awe score "
                           f"keeps for rejected rows; rename the file")
        job.row_groups = row_group_sizes(job.source)
    return jobs


def _glob_base(pattern: str) -> Path:
    fixed = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _relative(file: Path, base: Path) -> Path:
    try:
        return file.resolve().relative_to(base.resolve())
    except ValueError:
        return Path(file.name)


def output_metadata(job: Job, fingerprint: str, stage: str, options: ScoreOptions,
                    rejected: int, ids: list[str], exclude: str | None) -> dict:
    """What the output's ``awe.score`` metadata records: the model, the options with the id and
    exclude columns as resolved for this file, the input file (absolute path, size, mtime)."""
    stat = job.source.stat()
    recorded = {**options.recorded(), "id_cols": list(ids), "exclude_col": exclude}
    return {"model_fingerprint": fingerprint, "stage": stage, "options": recorded,
            "input": {"path": str(job.source.resolve()), "size": stat.st_size,
                      "mtime_ns": stat.st_mtime_ns, "rows": job.n_rows},
            "rows": job.n_rows - rejected, "rejected": rejected}


def is_current(job: Job, fingerprint: str, stage: str, options: ScoreOptions,
               ids: list[str], exclude: str | None) -> bool:
    """The output exists, is complete (a readable footer with all the rows) and was written by
    the same model with the same options from the same input file."""
    if not job.target.is_file():
        return False
    try:
        meta = pq.read_metadata(job.target)
        recorded = json.loads((meta.metadata or {}).get(METADATA_KEY, b"null"))
    except (pa.ArrowException, OSError, ValueError):
        return False
    if not isinstance(recorded, dict):
        return False
    rejected = recorded.get("rejected", -1)
    expected = output_metadata(job, fingerprint, stage, options, rejected, ids, exclude)
    if recorded != expected or meta.num_rows != expected["rows"]:
        return False
    if rejected:
        try:
            return pq.read_metadata(job.rejects).num_rows == rejected
        except (pa.ArrowException, OSError):
            return False
    return True


def remove_stale_temporaries(target: Path) -> None:
    """Temporary files a killed run left for ``target`` (atomic_path's names)."""
    for name in (target.name, rejects_path(target).name):
        for stale in target.parent.glob(f".{glob.escape(name)}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()


class JobWriter:
    """Writes one output file a row group at a time to a temporary name; :meth:`finish` renames
    the rejects file (if any) and then the output, which marks it complete."""

    def __init__(self, job: Job, schema: pa.Schema):
        self.job, self.schema, self.rejected, self.rows = job, schema, 0, 0
        remove_stale_temporaries(job.target)
        self._out = artifacts.AtomicFile(job.target)
        # a dictionary for the label names only (they repeat; ids and float scores do not, and
        # trying one for them cost more than the rest of the write), the scores split by byte
        # (they compress): 200k rows x top-10 written in 0.15 s instead of 0.37, 40% smaller
        self._writer = pq.ParquetWriter(
            self._out.tmp, schema, write_page_checksum=True,
            use_dictionary=["labels.list.element"],
            column_encoding={"scores.list.element": "BYTE_STREAM_SPLIT"})
        self._rejects: artifacts.AtomicFile | None = None
        self._rejects_writer = None

    def write(self, table: pa.Table, rejects: pa.Table | None) -> None:
        if table.num_rows:
            self._writer.write_table(table.cast(self.schema), row_group_size=table.num_rows)
            self.rows += table.num_rows
        if rejects is not None and rejects.num_rows:
            if self._rejects_writer is None:
                self._rejects = artifacts.AtomicFile(self.job.rejects)
                self._rejects_writer = pq.ParquetWriter(self._rejects.tmp, rejects.schema)
            self._rejects_writer.write_table(rejects.cast(self._rejects_writer.schema))
            self.rejected += rejects.num_rows

    def finish(self, metadata: dict) -> list[Path]:
        self._writer.add_key_value_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        self._writer.close()
        written = []
        if self._rejects_writer is not None:
            self._rejects_writer.close()
            self._rejects.commit()
            written.append(self.job.rejects)
        else:  # no rejects now: one from an earlier run would describe another output
            self.job.rejects.unlink(missing_ok=True)
        self._out.commit()
        return [self.job.target, *written]

    def abort(self) -> None:
        for writer in (self._writer, self._rejects_writer):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()
        for file in (self._out, self._rejects):
            if file is not None:
                file.discard()
