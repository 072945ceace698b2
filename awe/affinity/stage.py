"""Stage 2 (`awe build-g`): embed the training rows, search, write G and the index."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from awe import artifacts, dask_cluster
from awe.affinity.g import (
    AFFINITY_FILE,
    INDEX_FILE,
    Affinity,
    AffinityConfig,
    affinity_from_vectors,
    check_build,
    query_vectors,
)
from awe.affinity.search import ValidationRows, neighbour_candidates
from awe.card import ModelCard, read_card, write_card
from awe.csr import Csr
from awe.errors import AweError
from awe.io.holdout import Holdout, kept_rows, training_labels
from awe.io.reader import (
    check_input_kind,
    concat_examples,
    iter_batches,
    resolve_files,
    training_block,
    wanted_columns,
)
from awe.io.stream import list_shards
from awe.models.saved import load_wsabie
from awe.neighbors.sharded import sharded_search

# embeddings of the training rows beyond this many bytes go to a memory-mapped file
EMBED_MEMORY_BUDGET = 1 << 30


def stream_vectors(path, schema, vocab, embed_u: torch.Tensor | None, batch_rows: int,
                   scratch_dir: Path, budget: int | None = None, metric: str = "l2",
                   ) -> tuple[np.ndarray | Csr, Csr, Path | None]:
    """The vector of every training row (x U, or x itself without ``embed_u``) and its labels,
    reading the files a record batch at a time: memory holds the vectors, not the features.

    Rows are embedded in chunks of ``batch_rows`` rows counted from the first row, as
    :func:`build_affinity` does on loaded rows, so the vectors are the same bits. Vectors of more
    than ``budget`` bytes are written to a memory-mapped float32 file in ``scratch_dir`` (returned,
    for the caller to delete). Sparse inputs in their own space (no ``embed_u``) stay sparse: a
    :class:`Csr` of the rows (scaled to unit length for ``metric="cosine"``), no memory map.
    """
    import pyarrow as pa


    files = resolve_files(path)
    check_input_kind(files, schema)
    n_rows = sum(s.n_rows for s in list_shards(files))
    width = schema.n_features if embed_u is None else embed_u.shape[1]
    sparse = embed_u is None and schema.kind == "sparse"
    mapped, sparse_parts = None, []
    if sparse:
        vectors = None
    elif n_rows * width * 4 > (EMBED_MEMORY_BUDGET if budget is None else budget):
        import tempfile

        scratch_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".embeddings-", suffix=".tmp", dir=scratch_dir)
        os.close(fd)
        mapped = Path(name)
        vectors = np.lib.format.open_memmap(mapped, mode="w+", dtype=np.float32,
                                            shape=(n_rows, width))
    else:
        vectors = np.empty((n_rows, width), dtype=np.float32)
    labels, pending, done = [], [], 0

    def flush(final: bool):
        nonlocal pending, done
        block = concat_examples(pending) if pending else None
        pending = []
        while block is not None and (len(block) >= batch_rows or (final and len(block))):
            take = min(batch_rows, len(block))
            found = query_vectors(block, np.arange(take), embed_u, metric)
            if sparse:
                sparse_parts.append(found)
            else:
                vectors[done:done + take] = found
            labels.append(block.labels.take(np.arange(take)))
            done += take
            block = block.take(np.arange(take, len(block))) if take < len(block) else None
        if block is not None:
            pending = [block]

    try:
        for file, offset, batch in iter_batches(files, wanted_columns(schema.columns, schema.kind),
                                                batch_rows):
            pending.append(training_block(batch, schema, vocab, file, offset, None))
            if sum(len(b) for b in pending) >= batch_rows:
                flush(False)
                pa.default_memory_pool().release_unused()
        flush(True)
    except BaseException:
        if mapped is not None:
            del vectors
            mapped.unlink(missing_ok=True)
        raise
    if done != n_rows:
        raise AweError(f"{path}: read {done} rows, the files' metadata says {n_rows}")
    # arrow's allocator keeps the freed record batches mapped: 186 MB after reading 100k x 474
    # features, held through the search that follows
    pa.default_memory_pool().release_unused()
    if sparse:
        vectors = Csr.concat(sparse_parts) if sparse_parts else Csr.empty(0, with_values=True)
    return vectors, Csr.concat(labels), mapped


# ----------------------------------------------------------------------------- stage-2 driver


def build_g(train_path, model_dir, config: AffinityConfig = AffinityConfig(), *,
            embed_u: torch.Tensor | None = None, source: str = "wsabie", cluster=None,
            ) -> tuple[dict, list[Path]]:
    """``awe build-g``: G over the training rows of a stage-1 model directory.

    ``embed_u`` (default: stage-1 U) embeds the rows; later rounds pass the newest U'. The rows
    are read a record batch at a time and only their vectors are kept (a memory-mapped file beyond
    :data:`EMBED_MEMORY_BUDGET`). Writes the index and affinity.safetensors, then config.json
    (stage2; a stage-3 model built on an older G is dropped, since its scores assume that G) and
    metrics.json.

    ``cluster`` (:class:`awe.cluster.ClusterOptions`) searches the neighbours on Dask,
    sharded by query rows, every worker reading the index saved to a scratch directory in
    ``model_dir`` (the same G, bit for bit).
    """

    model_dir = Path(model_dir)
    saved = load_wsabie(model_dir)
    if embed_u is None:
        embed_u = saved.model.u_matrix().detach().clone()
    label_vectors = saved.model.v_matrix().detach().clone()
    holdout = validation_holdout(saved.card)
    choose = {"task": saved.card.stage1.train.task, "valid_k": saved.card.stage1.train.selection_k}
    if cluster is None:
        affinity, g_train, stats = build_affinity_streamed(
            train_path, saved.schema, saved.vocab, config, embed_u, label_vectors, model_dir,
            holdout=holdout, **choose)
    else:
        import shutil
        import tempfile


        with dask_cluster.dask_client(cluster) as client:
            scratch = Path(tempfile.mkdtemp(prefix=".build-g-", suffix=".tmp", dir=model_dir))
            try:
                affinity, g_train, stats = build_affinity_streamed(
                    train_path, saved.schema, saved.vocab, config, embed_u, label_vectors,
                    model_dir, search_all=sharded_search(client, scratch, config.threads),
                    holdout=holdout, **choose)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    written = write_stage2(model_dir, affinity, g_train, stats, str(train_path), source)
    return stats, written


def validation_holdout(card: ModelCard, built: bool = False) -> Holdout | None:
    """The validation rows stage 1 carved and never trained on (None: there are none); G is
    built over the other rows, so a validation row's G is found as a new row's. ``built``: only
    if the model's G was built so (not over rows other than stage 1's)."""
    holdout = Holdout.from_dict(card.stage1.holdout)
    if holdout is None or not holdout.unseen:
        return None
    if built and (card.stage2 is None or card.stage2.holdout != holdout.digest):
        return None
    return holdout


def build_affinity_streamed(train_path, schema, vocab, config: AffinityConfig,
                            embed_u: torch.Tensor | None, label_vectors: torch.Tensor | None,
                            scratch_dir: Path, search_all=None, train_g: bool = True,
                            holdout: Holdout | None = None, task: str | None = None,
                            valid_k: int | None = None,
                            ) -> tuple[Affinity, Csr | None, dict]:
    """:func:`build_affinity` reading ``train_path`` a record batch at a time (same result).

    ``holdout``: its validation rows (annotation) or held-out labels (recommendation) are left
    out of the index and the label store; with ``valid_k``, ``neighbors auto`` is chosen on them
    by G's P@k at that k (:func:`~awe.affinity.g.choose_neighbours`), else it is ``task``'s
    default."""
    config = config.with_input_kind(schema.kind)
    if config.space == "input":
        embed_u = None

    n_rows = sum(s.n_rows for s in list_shards(resolve_files(train_path)))
    check_build(schema, n_rows - (holdout.held if holdout and holdout.task == "annotation"
                                  else 0), config, embed_u, label_vectors)
    t0 = time.perf_counter()
    vectors, labels, mapped = stream_vectors(train_path, schema, vocab, embed_u,
                                             config.batch_rows, scratch_dir, metric=config.metric)
    try:
        held, valid = None, None
        if holdout is not None:
            try:
                held = holdout.again(labels, train_path)
            except AweError:  # other rows than stage 1's: none of them was held out
                holdout = None
        if (config.neighbors == "auto" and holdout is not None and valid_k is not None
                and len(neighbour_candidates(holdout.task)) > 1):
            valid = ValidationRows.held_out(vectors, labels, held, valid_k)
        elif config.neighbors == "auto":
            config = config.resolved(task)
        if holdout is not None:
            keep = kept_rows(labels.n_rows, held, holdout.task)
            labels = training_labels(labels, held, holdout.task)
            if isinstance(vectors, Csr):
                vectors = vectors.take(keep)
            elif len(keep) < len(vectors):  # in place: keep is sorted, so no row is overwritten
                for s in range(0, len(keep), config.batch_rows):  # before it is read
                    chunk = keep[s:s + config.batch_rows]
                    vectors[s:s + len(chunk)] = vectors[chunk]
                vectors = vectors[:len(keep)]
        if mapped is not None:
            vectors.flush()  # workers of the Dask path read the file
        affinity, g_train, stats = affinity_from_vectors(
            vectors, labels, len(vocab), config, embed_u, label_vectors, train_g, t0, search_all,
            valid)
        if holdout is not None:  # the rows G is built over: all but these
            stats["holdout"] = holdout.digest
        return affinity, g_train, stats
    finally:
        del vectors
        if mapped is not None:
            mapped.unlink(missing_ok=True)


def write_stage2(model_dir: Path, affinity: Affinity, g_train: Csr, stats: dict,
                 train_path: str, source: str) -> list[Path]:
    """Write the stage-2 files and the stage2 section of config.json; drop a stage 3 built on an
    older G.

    A kill at any instant leaves the old G or the new one whole, or (for the instant the new
    files are renamed in) a stage-1 model without G, never an index of one build with the label
    store of another: the new files are written in a staging directory first (the old G stays
    valid meanwhile), config.json then loses its stage2 (and stage3) section, the files are
    renamed in, and config.json gets the new section last.
    """
    card = read_card(model_dir)
    stale = card.stage3 is not None
    with artifacts.staged(model_dir) as stage:
        section = replace(affinity.save(stage, g_train), train_path=train_path, source=source,
                          holdout=stats.get("holdout"))
        if stale or card.stage2 is not None:
            write_card(model_dir, card.stage1_only())
        if stale:
            (model_dir / artifacts.AWE_WEIGHTS).unlink(missing_ok=True)
        write_card(stage, replace(card.stage1_only(), stage2=section))  # renamed in last
    metrics_path = model_dir / artifacts.METRICS
    metrics = artifacts.read_json(metrics_path) if metrics_path.exists() else {}
    metrics["g"] = stats
    metrics.pop("awe", None)
    artifacts.write_json(metrics_path, metrics)
    return [model_dir / INDEX_FILE, model_dir / AFFINITY_FILE, model_dir / artifacts.CONFIG,
            metrics_path]
