"""Out-of-core training data: sharded parquet through a bounded shuffle buffer.

Training (``--shuffle-buffer ROWS``) reads the training files an epoch at a time instead of loading
them: the shards (every row group of every file) are visited in a seeded random order, their rows
pass through a buffer of at most ``buffer_rows`` rows, and each block of rows read pushes out as
many rows drawn uniformly from the buffer. Memory is bounded by the buffer, one block and the
model, not by the data. Everything is a function of (seed, epoch): the same seed gives the same
stream, which is what makes a mid-epoch resume exact (the stream is replayed up to the position).

The order is not the in-memory path's: a row can only meet rows that shared the buffer with it.
With a buffer of a few blocks and shards shuffled each epoch, quality matches the in-memory run
on our tests (tests/io/test_stream.py); docs/method.md has the measurements.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from awe.artifacts import tensor_digest
from awe.csr import Csr
from awe.errors import AweError, invalid
from awe.io.holdout import held_part
from awe.io.reader import (
    Examples,
    InputSchema,
    LabelVocab,
    concat_examples,
    iter_row_group,
    label_block,
    read_task,
    resolve_files,
    row_group_sizes,
    training_block,
    wanted_columns,
)

# rows read at a time: a block; the buffer holds at most buffer_rows more
BLOCK_ROWS_MAX = 16_384
# --valid-fraction holds out at most this many rows when streaming: they are kept in memory and
# scored every epoch, and 10k rows pick an epoch as well as 100k
STREAM_VALID_MAX = 10_000


@dataclass(frozen=True)
class Shard:
    """One row group of one file: the unit the epoch's order shuffles."""

    file: Path
    row_group: int
    offset: int  # the row group's first row within its file
    first: int  # its first row in the whole training set
    n_rows: int


def list_shards(files: list[Path]) -> list[Shard]:
    shards, first = [], 0
    for file in files:
        offset = 0
        for number, n_rows in enumerate(row_group_sizes(file)):
            if n_rows:
                shards.append(Shard(file, number, offset, first, n_rows))
            offset += n_rows
            first += n_rows
    return shards


@dataclass
class ShuffleStream:
    """The training rows of ``path`` for a model with ``schema`` and ``vocab``, streamed.

    ``exclude``: sorted global row numbers left out (a held-out validation part); ``affinity``:
    G of every row (stage 3), attached to each block.
    """

    files: list[Path]
    shards: list[Shard]
    schema: InputSchema
    vocab: LabelVocab
    buffer_rows: int
    seed: int = 0
    task: str | None = None
    exclude: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    affinity: Csr | None = None
    block_rows: int = BLOCK_ROWS_MAX
    # multi-process training: this stream reads the shards of rank ``rank`` of ``ranks``
    rank: int = 0
    ranks: int = 1

    @classmethod
    def open(cls, path, schema: InputSchema, vocab: LabelVocab, buffer_rows: int, seed: int = 0,
             task: str | None = None, batch_size: int = 1024) -> ShuffleStream:
        if buffer_rows < 1:
            raise invalid("shuffle_buffer", "must be >= 1 row")
        files = resolve_files(path)
        shards = list_shards(files)
        if not shards:
            raise AweError(f"{path}: no rows to train on")
        # a block is an eighth of the buffer, so that each block leaving it is drawn from a pool
        # mostly made of earlier reads; but at least 4 batches of rows, since a block's last batch
        # is short (its pairs are not carried into the next block)
        block = int(min(BLOCK_ROWS_MAX, max(4 * batch_size, buffer_rows // 8)))
        return cls(files, shards, schema, vocab, int(buffer_rows), seed,
                   task if task is not None else read_task(files), block_rows=block)

    @property
    def n_total(self) -> int:
        return sum(s.n_rows for s in self.shards)

    def __len__(self) -> int:
        return self.n_total - len(self.exclude)

    def identity(self) -> dict:
        """What a checkpoint compares: the files (name, size, rows), the buffer, the rows left
        out."""
        files = [(f.name, f.stat().st_size) for f in self.files]
        return {"rows": self.n_total, "files": files, "buffer": self.buffer_rows,
                "exclude": tensor_digest(self.exclude)}

    # -- derived streams
    def for_rank(self, rank: int, ranks: int) -> ShuffleStream:
        """The part of every epoch that rank ``rank`` of ``ranks`` trains on: every ``ranks``-th
        shard of the epoch's shuffled order (the order is the same on every rank, so the parts
        are disjoint and cover the epoch), through a buffer and draws of the rank's own."""
        if len(self.shards) < ranks:
            raise AweError(f"--shuffle-buffer with {ranks} processes: the training files have "
                           f"{len(self.shards)} row group(s), fewer than the processes, so a "
                           f"process would have no rows; write more row groups (`awe data "
                           f"synthetic --shards`, pyarrow's row_group_size) or use fewer "
                           f"processes")
        return dataclasses.replace(self, rank=rank, ranks=ranks)

    def with_affinity(self, affinity: Csr) -> ShuffleStream:
        if affinity.n_rows != self.n_total:
            raise AweError(f"G has {affinity.n_rows} rows, the training data {self.n_total}")
        return dataclasses.replace(self, affinity=affinity)

    def split(self, fraction: float, task: str, seed: int) -> tuple[ShuffleStream, Examples]:
        """Hold out ``fraction`` of the rows (at most :data:`STREAM_VALID_MAX`) for validation:
        the held-out rows in memory, and the stream without them."""
        if task != "annotation":
            raise AweError("--shuffle-buffer with --valid-fraction holds out whole rows, which "
                           "suits annotation only; for recommendation pass --valid FILE, or "
                           "train in memory (no --shuffle-buffer)")
        return self.split_held(held_part(self.n_total, fraction, task, seed, STREAM_VALID_MAX))

    def split_held(self, held: np.ndarray) -> tuple[ShuffleStream, Examples]:
        """The stream without the rows ``held`` (sorted global numbers), and those rows in
        memory."""
        return dataclasses.replace(self, exclude=held), self.rows(held)

    # -- reading
    def rows(self, wanted: np.ndarray) -> Examples:
        """The rows ``wanted`` (sorted global numbers) in memory, in that order."""
        parts = []
        for shard in self.shards:
            lo, hi = np.searchsorted(wanted, [shard.first, shard.first + shard.n_rows])
            if lo == hi:
                continue
            for block, rows in self._read(shard, exclude=False):
                keep = np.searchsorted(wanted[lo:hi], rows)
                hit = np.flatnonzero(wanted[lo:hi][np.minimum(keep, hi - lo - 1)] == rows)
                if len(hit):
                    parts.append(self._attach(block.take(hit), rows[hit]))
        return concat_examples(parts)

    def labels(self) -> Csr:
        """Every row's labels (known ones, sorted), reading the labels column only."""
        parts = []
        name = self.schema.columns.labels
        for shard in self.shards:
            for file, offset, batch in iter_row_group(shard.file, shard.row_group, shard.offset,
                                                      [name], self.block_rows):
                parts.append(label_block(batch, name, self.vocab, file, offset, True)[0])
        return Csr.concat(parts)

    def _read(self, shard: Shard, exclude: bool = True,
              ) -> Iterator[tuple[Examples, np.ndarray]]:
        """Blocks of a shard as (validated examples, their global row numbers)."""
        columns = wanted_columns(self.schema.columns, self.schema.kind)
        for file, offset, batch in iter_row_group(shard.file, shard.row_group, shard.offset,
                                                  columns, self.block_rows):
            block = training_block(batch, self.schema, self.vocab, file, offset, self.task)
            rows = shard.first + (offset - shard.offset) + np.arange(len(block), dtype=np.int64)
            if exclude and len(self.exclude):
                pos = np.searchsorted(self.exclude, rows)
                held = self.exclude[np.minimum(pos, len(self.exclude) - 1)] == rows
                if held.any():
                    keep = np.flatnonzero(~held)
                    block, rows = block.take(keep), rows[keep]
            if len(block):
                yield block, rows

    def blocks(self, epoch: int) -> Iterator[Examples]:
        """The epoch's rows, in blocks of about ``block_rows``, through the shuffle buffer.

        Shards come in a random order; every block read joins the buffer, and once the buffer
        holds more than ``buffer_rows`` rows the excess leaves it, drawn uniformly at random (one
        vectorised draw per block, no loop over rows). At the end the buffer is emptied in random
        order. A pure function of (seed, epoch).

        Dense features live in one array of buffer + block rows, updated in place: the rows
        drawn out are copied out, and the rows read last move into their slots, so memory is
        the buffer and two blocks (labels, and sparse features, are rebuilt: they are small).
        """
        rng = np.random.default_rng([self.seed, epoch])
        shard_order = rng.permutation(len(self.shards))
        if self.ranks > 1:  # the rank's shards; its buffer draws its own numbers
            shard_order = shard_order[self.rank::self.ranks]
            rng = np.random.default_rng([self.seed, epoch, self.ranks, self.rank])
        dense = self.schema.kind == "dense"
        cap = self.buffer_rows
        store = (np.empty((cap + self.block_rows, self.schema.n_features), np.float32)
                 if dense else None)
        pool: Examples | None = None  # all but the dense features of the rows held
        pool_rows = np.zeros(0, dtype=np.int64)
        for shard_no in shard_order:
            for block, rows in self._read(self.shards[shard_no]):
                held = 0 if pool is None else len(pool)
                if dense:
                    store[held:held + len(block)] = block.dense
                    block = dataclasses.replace(block, dense=None)
                pool = block if pool is None else concat_examples([pool, block])
                pool_rows = np.concatenate([pool_rows, rows])
                total = len(pool)
                if total <= cap:
                    continue
                out = rng.permutation(total)[:total - cap]
                yield self._emit(pool, store, pool_rows, out)
                # the rows past the buffer that stay move into the slots of those that left
                gone = np.zeros(total, dtype=bool)
                gone[out] = True
                holes = np.flatnonzero(gone[:cap])
                movers = cap + np.flatnonzero(~gone[cap:])
                index = np.arange(cap)
                index[holes] = movers
                if dense:
                    store[holes] = store[movers]
                pool, pool_rows = pool.take(index), pool_rows[index]
        if pool is not None and len(pool):
            order = rng.permutation(len(pool))
            for s in range(0, len(order), self.block_rows):
                yield self._emit(pool, store, pool_rows, order[s:s + self.block_rows])

    def _emit(self, pool: Examples, store: np.ndarray | None, pool_rows: np.ndarray,
              out: np.ndarray) -> Examples:
        block = pool.take(out)
        if store is not None:
            block = dataclasses.replace(block, dense=store[out])  # a copy: the store moves on
        return self._attach(block, pool_rows[out])

    def _attach(self, block: Examples, rows: np.ndarray) -> Examples:
        if self.affinity is not None:
            block = block.with_affinity(self.affinity.take(rows))
        return block

    def pair_order(self, epoch: int, block_no: int, n_pairs: int) -> np.ndarray:
        """The order of a block's positive pairs: its own seeded permutation, so that a resumed
        epoch finds it without replaying the draws of the blocks before."""
        key = [self.seed, epoch, block_no, 1]
        if self.ranks > 1:  # block_no counts the rank's own blocks
            key += [self.ranks, self.rank]
        return np.random.default_rng(key).permutation(n_pairs)
