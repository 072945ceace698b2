"""Batch scoring of parquet files (``awe score``): top-k labels per row, streamed, resumable.

Input is a parquet file, a directory or a glob; every input file gets one output file (the output
path itself for a single input file) with the id column(s), ``labels`` (the top-k label names,
best first) and ``scores`` (list<float32>), in input order. The unit of work is a row group: it
is read a record batch at a time, scored by :class:`~awe.score.Predictor` (the prediction path of
``awe eval``) and written as one row group of the output, so memory holds a row group, a batch
and the model, never the input. The same row-group function runs in this process or on Dask
workers (:mod:`awe.cluster`), which is why a local run and a Dask run write the same bytes.

Outputs are written to a temporary name and renamed; the output's parquet metadata records the
model's fingerprint, the options and the input file's size and mtime, so a second run skips the
inputs whose output is complete and current (``overwrite`` forces; the files' side is
:mod:`awe.predict.jobs`; this module scores the row groups and drives the run). Invalid rows
fail the file with one line naming the file, row and column, or (``skip_invalid``) go to a
rejects file next to the output (``<output stem>.rejects.parquet``: file, row, column, reason,
the ids).
"""

from __future__ import annotations

import contextlib
import functools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from awe import artifacts, dask_cluster
from awe.affinity.g import AFFINITY_FILE, INDEX_FILE
from awe.card import read_card
from awe.csr import Csr
from awe.dask_cluster import worker_cached
from awe.errors import DataError
from awe.io.reader import (
    Examples,
    check_input_kind,
    dense_block,
    file_schema,
    invalid_rows,
    iter_row_group,
    label_block,
    resolve_files,
    row_group_sizes,
    sparse_block,
)
from awe.predict.jobs import (
    METADATA_KEY,
    SCORE_BATCH_ROWS,
    Job,
    JobWriter,
    ScoreOptions,
    ScoreSummary,
    check_columns,
    is_current,
    output_metadata,
    output_schema,
    plan_jobs,
)
from awe.predict.predictor import Predictor
from awe.ranking.topk import SCORES_PER_BATCH

__all__ = ["METADATA_KEY", "SCORE_BATCH_ROWS", "RowGroupScorer", "ScoreOptions", "ScoreSummary",
           "load_predictor", "model_fingerprint", "score_files", "score_table"]

DEFAULT_OPTIONS = ScoreOptions()

# ----------------------------------------------------------------------------- the tasks


def score_task(model_dir: str, fingerprint: str, options, file: str, number: int, offset: int):
    """Score one row group on a worker (the model loaded once per worker process)."""

    def load():
        predictor, stage = load_predictor(model_dir, options.stage, options.screen)
        return RowGroupScorer(predictor, stage, options)

    scorer = worker_cached("score", (model_dir, fingerprint, options), load)
    return scorer.row_group(file, number, offset)


REJECT_COLUMNS = ("file", "row", "column", "reason")

# ----------------------------------------------------------------------------- the model


def model_fingerprint(model_dir, stage: str) -> str:
    """sha256 (16 hex digits) of what scoring with ``stage`` reads: the schema, labels and stage
    sections of config.json and the bytes of the weight files (and, for awe, of G's files).
    Retraining or rebuilding G changes it; copying the model directory does not."""

    model_dir = Path(model_dir)
    config = read_card(model_dir).to_dict()
    sections = ["schema", "n_labels", "label_kind", "stage1"]
    files = [artifacts.LABELS, artifacts.WSABIE_WEIGHTS]
    if stage == "awe":
        sections += ["stage2", "stage3"]
        files += [INDEX_FILE, AFFINITY_FILE, artifacts.AWE_WEIGHTS]
    digest = artifacts.Digest().json({s: config.get(s) for s in sections}).text(stage)
    for name in files:
        digest.file(model_dir / name)
    return digest.hex()


def load_predictor(model_dir, stage: str | None, screen: bool | None = None):
    """The model directory's :class:`Predictor` and the stage it scores with."""

    predictor = Predictor(model_dir, screen=screen)
    stage = stage or predictor.newest()
    predictor.check_rows([stage])
    return predictor, stage


# ----------------------------------------------------------------------------- one row group


class RowGroupScorer:
    """Scores record batches (or whole row groups of a file) with a loaded model; the one
    function a local run and every Dask worker call.

    ``options.threads`` (default: torch's thread count) batches are scored at once, each in
    its own Python thread with single-threaded torch and FAISS (their kernels release the GIL).
    Whole batches per thread rather than torch's threads inside each operation: on a busy
    machine the latter wait for each other at every operation (measured 3x slower with one of
    the 2 cores taken), and a batch's result does not depend on which thread scores it.
    """

    def __init__(self, predictor, stage: str, options: ScoreOptions):
        import torch

        self.predictor, self.stage, self.options = predictor, stage, options
        self.schema = predictor.schema
        self.threads = options.threads or torch.get_num_threads()
        # per thread: 4096 rows x 21k labels (344 MB a block) went to the OS and back every batch
        self.block_rows = max(1, min(options.batch_rows, SCORES_PER_BATCH // predictor.n_labels))
        self._pool = None

    def columns_of(self, file_names: list[str]) -> tuple[list[str], list[str], str | None]:
        """(columns to read, id columns, exclude column) for a file with columns ``names``."""
        cols = self.schema.columns
        names = set(file_names)
        features = ([cols.features] if self.schema.kind == "dense"
                    else [cols.feature_ids, cols.feature_values])
        ids = list(self.options.id_cols) if self.options.id_cols is not None else (
            [cols.id] if cols.id in names else [])
        exclude = self.options.exclude_col
        if exclude is None and cols.exclude in names:
            exclude = cols.exclude
        wanted = [*features, *ids, *([exclude] if exclude else [])]
        return list(dict.fromkeys(wanted)), ids, exclude

    def row_group(self, file: str, number: int, offset: int) -> tuple[pa.Table, pa.Table | None]:
        """Scores of row group ``number`` of ``file`` (rows from ``offset``), and its rejects."""
        with contextlib.closing(self.row_groups([(file, number, offset)])) as groups:
            return next(groups)

    def row_groups(self, tasks) -> Iterator[tuple[pa.Table, pa.Table | None]]:
        """:meth:`row_group` of every (file, number, offset) task, in order. The batches of the
        next row groups are scored while the last ones of a row group finish: the threads do
        not wait at every row group's end (4 batches a row group of 16,384 rows). An error
        (bad column, damaged page, invalid row) is raised where its batch comes in order, after
        the row groups before it."""
        end_of_group = object()

        def failing(exc: BaseException):
            def fail():
                raise exc
            return fail

        def work():
            for file, number, offset in tasks:
                path = Path(file)
                try:
                    names = file_schema(path).names
                    wanted, ids, exclude = self.columns_of(names)
                    check_columns(path, names, ids, exclude, self.options)
                    for _, start, batch in iter_row_group(path, number, offset, wanted,
                                                          self.options.batch_rows):
                        yield functools.partial(self.batch, batch, path, start, ids, exclude)
                except Exception as exc:  # noqa: BLE001 - raised by the consumer, in order
                    yield failing(exc)
                    return
                yield functools.partial(lambda *where: (end_of_group, where), path, ids)

        parts, rejects = [], []
        with single_threaded_kernels():
            for table, extra in self._map(lambda step: step(), work()):
                if table is end_of_group:
                    yield (pa.concat_tables(parts) if parts else self.empty(*extra),
                           pa.concat_tables(rejects) if rejects else None)
                    parts, rejects = [], []
                    continue
                parts.append(table)
                if extra is not None:
                    rejects.append(extra)

    def _map(self, fn, items) -> Iterator:
        """``fn`` of every item, in order, ``threads`` at a time (at most twice that ahead)."""
        if self.threads == 1:
            yield from map(fn, items)
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="awe-score")
        pending: deque = deque()
        try:
            for item in items:
                pending.append(self._pool.submit(fn, item))
                if len(pending) >= 2 * self.threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def batch(self, batch: pa.RecordBatch, file: Path, offset: int, ids: list[str],
              exclude: str | None) -> tuple[pa.Table, pa.Table | None]:
        rejected = None
        if self.options.skip_invalid:
            bad_rows, columns, reasons = invalid_rows(batch, self.schema)
            if len(bad_rows):
                rejected = pa.table({
                    "file": pa.array([str(file)] * len(bad_rows), pa.string()),
                    "row": pa.array(offset + bad_rows, pa.int64()),
                    "column": pa.array(columns, pa.string()),
                    "reason": pa.array(reasons, pa.string()),
                    **{name: batch.column(name).take(pa.array(bad_rows)) for name in ids
                       if name not in REJECT_COLUMNS}})
                keep = np.ones(batch.num_rows, dtype=bool)
                keep[bad_rows] = False
                batch = batch.filter(pa.array(keep))
        try:
            examples = scoring_examples(batch, self.schema, self.predictor.vocab, file, offset,
                                        exclude)
        except DataError as exc:
            raise DataError(f"{exc}; or pass --skip-invalid to write such rows to a rejects "
                            f"file") from exc
        scored = self.predictor.predict_table(examples, self.options.k, self.stage,
                                              batch_rows=self.block_rows)
        columns = {name: batch.column(name) for name in ids}
        columns.update({"labels": scored.column("labels"), "scores": scored.column("scores")})
        return pa.table(columns), rejected

    def empty(self, file: Path, ids: list[str]) -> pa.Table:
        return output_schema(file_schema(file), ids, self.predictor.vocab).empty_table()


@contextlib.contextmanager
def single_threaded_kernels():
    """torch and FAISS on one thread each while batches are scored in parallel threads."""
    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def scoring_examples(batch: pa.RecordBatch, schema, vocab, file: Path, offset: int,
                     exclude: str | None) -> Examples:
    """A record batch as :class:`Examples` for scoring: validated features (the checks and
    messages of ``awe eval``), no labels, the exclusions."""
    n = batch.num_rows
    dense = sparse = None
    if schema.kind == "dense":
        dense = dense_block(batch, schema, file, offset)
    else:
        sparse = sparse_block(batch, schema, file, offset)
    excluded = None
    if exclude is not None:
        excluded = label_block(batch, exclude, vocab, file, offset, required=False)[0]
    return Examples(schema, dense, sparse, Csr.empty(n), np.zeros(n, dtype=np.int64), excluded)


# ----------------------------------------------------------------------------- driver

RowGroupResults = Callable[[list[tuple[str, int, int]]], Iterator[tuple[pa.Table,
                                                                        pa.Table | None]]]


def score_files(input_path, model_dir, out, options: ScoreOptions = DEFAULT_OPTIONS, *,
                cluster=None, report: Callable[[str], None] | None = None) -> ScoreSummary:
    """``awe score``: score every input file into its output file (see the module docstring).

    ``cluster`` (:class:`awe.cluster.ClusterOptions`) runs the row groups on Dask; the
    output is the same bytes.
    """

    predictor, stage = load_predictor(model_dir, options.stage, options.screen)
    options = replace(options, stage=stage, screen=predictor.screen)
    fingerprint = model_fingerprint(model_dir, stage)
    jobs = plan_jobs(input_path, out)
    check_input_kind([jobs[0].source], predictor.schema)
    summary = ScoreSummary()
    scorer = RowGroupScorer(predictor, stage, options)
    todo = []
    for job in jobs:
        _, ids, exclude = scorer.columns_of(file_schema(job.source).names)
        if not options.overwrite and is_current(job, fingerprint, stage, options, ids, exclude):
            summary.skipped.append(job.target)
        else:
            todo.append(job)
    if not todo:
        return summary
    if cluster is None:
        def results(tasks):
            groups = scorer.row_groups(tasks)
            return _ahead(groups) if scorer.threads > 1 else groups
        _run_jobs(todo, scorer, results, fingerprint, stage, options, summary, report)
    else:
        with dask_cluster.dask_client(cluster) as client:
            threads = options.threads or dask_cluster.threads_per_worker(client)
            task_options = replace(options, threads=threads)

            def results(tasks):
                return dask_cluster.map_ordered(
                    client, score_task,
                    [(str(model_dir), fingerprint, task_options, *t) for t in tasks])
            _run_jobs(todo, scorer, results, fingerprint, stage, options, summary, report)
    return summary


def _ahead(items: Iterator) -> Iterator:
    """``items``, produced one ahead of the consumer by a thread of their own: the next row
    group is scored while the last one is written (else the scoring threads wait for every
    write: 1.5 of 2 cores busy). Errors reach the consumer in order; closing the iterator
    stops the producer."""
    import queue
    import threading

    ready: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    end = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((end, exc))

    producer = threading.Thread(target=produce, name="awe-score-ahead", daemon=True)
    producer.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        producer.join()


def _run_jobs(jobs: list[Job], scorer: RowGroupScorer, results: RowGroupResults,
              fingerprint: str, stage: str, options: ScoreOptions, summary: ScoreSummary,
              report) -> None:
    """Write the jobs' outputs in order from the row groups' results (in task order)."""
    tasks = [task for job in jobs for task in job.tasks()]
    stream = iter(results(tasks))
    for job in jobs:
        source_schema = file_schema(job.source)
        _, ids, exclude = scorer.columns_of(source_schema.names)
        check_columns(job.source, source_schema.names, ids, exclude, options)
        writer = JobWriter(job, output_schema(source_schema, ids, scorer.predictor.vocab))
        try:
            for _ in job.row_groups:
                writer.write(*next(stream))
            written = writer.finish(output_metadata(job, fingerprint, stage, options,
                                                    writer.rejected, ids, exclude))
        except BaseException:
            writer.abort()
            if hasattr(stream, "close"):
                stream.close()
            raise
        summary.written.append(written[0])
        summary.rejects.extend(written[1:])
        summary.rows += writer.rows
        summary.rejected += writer.rejected
        if report is not None:
            extra = f", {writer.rejected} rejected rows in {job.rejects}" if writer.rejected else ""
            report(f"wrote {job.target} ({writer.rows} rows{extra})")


def score_table(model_dir, data, options: ScoreOptions = DEFAULT_OPTIONS, predictor=None):
    """Scores of in-memory rows (a pyarrow Table) or of parquet files (path, directory, glob),
    as one pyarrow Table in input order (the rows of all files, for a path)."""
    if predictor is None:
        predictor, stage = load_predictor(model_dir, options.stage, options.screen)
    else:
        stage = options.stage or predictor.newest()
        predictor.check_rows([stage])
    scorer = RowGroupScorer(predictor, stage,
                            replace(options, stage=stage, screen=predictor.screen))
    if isinstance(data, pa.Table):
        where = Path("<rows>")
        _, ids, exclude = scorer.columns_of(data.schema.names)
        check_columns(where, data.schema.names, ids, exclude, options)
        parts, offset = [], 0
        for batch in data.to_batches(max_chunksize=options.batch_rows):
            parts.append(scorer.batch(batch, where, offset, ids, exclude)[0])
            offset += batch.num_rows
        if not parts:
            return output_schema(data.schema, ids, predictor.vocab).empty_table()
        return pa.concat_tables(parts)
    tables = []
    for file in resolve_files(data):
        job = Job(file, file, row_group_sizes(file))
        tables.extend(table for table, _ in scorer.row_groups(job.tasks()))
    return pa.concat_tables(tables)
