"""Stage 2: the affinity weights G(x, y) from the labels of x's nearest training neighbours.

    G(x, y) = AGG_{i in knn(x)} k(e, e_i) * [y in labels(x_i)]        (DESIGN.md §2)

e = x U (stage-1 embedding, ``space="wsabie"``) or e = x (``space="input"``, the paper's G_orig);
AGG is ``sum`` or ``max``; k is one of :data:`KERNELS`. A training row is never its own neighbour.
With ``label_kernel="embedding"`` the exact match [y in labels(x_i)] becomes the soft match
max_{y_i in labels(x_i)} exp(-lambda_y ||V_y - V_{y_i}||^2) (the paper's footnote).

G is sparse: per row, the label ids some neighbour carries, with their weights (a :class:`Csr`).
Everything is vectorised over a batch of query rows; no loop over examples.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from awe import artifacts
from awe.affinity.kernels import (
    AGGREGATES,
    KERNELS,
    LABEL_KERNELS,
    NORMALIZE,
    SPACES,
    aggregate_labels,
    default_label_lambda,
    default_lambda,
    kernel_weights,
    normalize_rows,
    soft_label_affinity,
)
from awe.affinity.search import (
    ValidationRows,
    default_neighbours,
    g_precision,
    neighbour_candidates,
    pick,
)
from awe.cpu import set_threads
from awe.csr import Csr
from awe.errors import AweError, invalid
from awe.io.reader import Examples
from awe.models.wsabie import batch_inputs
from awe.neighbors.index import DEFAULT_TARGET_RECALL, INDEX_KINDS, IndexConfig, NeighbourIndex
from awe.neighbors.sparse import SparseIndex
from awe.options import DictFields, option

INDEX_FILE = "index.faiss"
AFFINITY_FILE = "affinity.safetensors"
# distances in the input space (G_orig, knn-input): "auto" is cosine for sparse inputs (text: a
# row's length is its word count, not what it is about), l2 for dense ones
METRICS = ("auto", "cosine", "l2")
LAMBDA_SAMPLE = 2000  # rows searched to set lambda when no training G is needed


@dataclass(frozen=True)
class AffinityConfig(DictFields):
    """Every option of stage 2; saved in config.json (with the resolved lambdas)."""

    neighbors: int | str = option(
        "auto", "Neighbours per row (n). auto: for annotation the best of 10, 20 (the "
                "paper's) and 40 by G's P@k on stage 1's validation rows (20 without them); "
                "100 for recommendation.")
    kernel: str = option("gaussian", "Affinity kernel k(e, e_i).", KERNELS)
    lam: float | None = option(None, "Gaussian scale lambda (default: 1 / median squared "
                                     "neighbour distance).", flag="--lambda")
    aggregate: str = option("sum", "Aggregate of the neighbours' weights per label.",
                            AGGREGATES)
    bias: float = option(0.0, "b in f = (G + b) (x U').V'_y: the weight of labels no "
                              "neighbour carries.")
    space: str = option("wsabie", "Where neighbours are searched: wsabie (x U) or input (x "
                                  "itself, the paper's G_orig).", SPACES)
    metric: str = option("auto", "Distance in the input space (--space input, the knn-input "
                                 "row): auto is cosine for sparse input, l2 for dense; the "
                                 "Wsabie space is searched by l2.", METRICS)
    label_kernel: str = option("exact", "exact (the label match) or embedding (exp(-lambda_y "
                                        "|V y - V y_i|^2), the paper's footnote).",
                               LABEL_KERNELS)
    label_lambda: float | None = option(None, "lambda_y of --label-kernel embedding (default: 1 "
                                              "/ median squared label-vector distance).")
    label_top: int = option(64, "Labels kept per row with --label-kernel embedding.")
    normalize: str = option("max", "max divides each row of G by its largest weight, so stage "
                                   "3 sees every row on one scale; none keeps the raw sums.",
                            NORMALIZE)
    index: str = option("auto", "Neighbour index. bf16 scores every row from bfloat16 copies "
                                "(fast with AMX or AVX512-BF16) and re-ranks in float32.",
                        INDEX_KINDS)
    nprobe: int | None = option(None, "IVF lists searched (default: calibrated).")
    ef_search: int | None = option(None, "HNSW search breadth (default: calibrated).")
    rerank: int | None = option(None, "bf16 index: candidates beyond n re-ranked in float32 "
                                      "(default: calibrated).")
    target_recall: float = option(
        DEFAULT_TARGET_RECALL, "Recall@n the IVF / HNSW / bf16 search breadth is calibrated to "
                               "reach on a sample; lower is faster at scale.")
    batch_rows: int = option(4096, "Rows embedded and searched at a time.")
    seed: int = option(0, "Random seed (IVF clustering).")
    threads: int | None = option(None, "CPU threads for FAISS and torch (default: all cores).")

    def __post_init__(self):
        checks = [
            (self.neighbors == "auto" or (not isinstance(self.neighbors, (bool, str))
                                          and int(self.neighbors) == self.neighbors
                                          and self.neighbors >= 1),
             "neighbors", "must be an integer >= 1 or auto"),
            (self.kernel in KERNELS, "kernel", f"must be one of {', '.join(KERNELS)}"),
            (self.lam is None or (self.lam > 0 and math.isfinite(self.lam)), "lam",
             "must be a positive number"),
            (self.aggregate in AGGREGATES, "aggregate", "must be sum or max"),
            (math.isfinite(self.bias) and self.bias >= 0, "bias", "must be a number >= 0"),
            (self.space in SPACES, "space", "must be wsabie or input"),
            (self.metric in METRICS, "metric", f"must be one of {', '.join(METRICS)}"),
            (self.label_kernel in LABEL_KERNELS, "label_kernel", "must be exact or embedding"),
            (self.label_lambda is None or self.label_lambda > 0, "label_lambda",
             "must be a positive number"),
            (self.label_top >= 1, "label_top", "must be >= 1"),
            (self.normalize in NORMALIZE, "normalize", "must be none or max"),
            (self.batch_rows >= 1, "batch_rows", "must be >= 1"),
        ]
        for ok, name, problem in checks:
            if not ok:
                raise invalid(name, f"{problem}, got {getattr(self, name)!r}")
        self.index_config()  # the index options (--index, --rerank, --target-recall, ...)

    def resolved(self, task: str | None) -> AffinityConfig:
        """Fill the task's default for ``neighbors auto`` (no validation rows to choose on)."""
        neighbors = self.neighbors
        if neighbors == "auto":
            neighbors = default_neighbours(task)
        return replace(self, neighbors=int(neighbors))

    def with_input_kind(self, kind: str) -> AffinityConfig:
        """Fill ``metric auto`` of an input-space G from the input's kind (sparse or dense)."""
        if self.space != "input" or self.metric != "auto":
            return self
        return replace(self, metric="cosine" if kind == "sparse" else "l2")

    def index_config(self):

        # calibrated for recall@n at G's own n (before ``resolved``: the paper's 20)
        n = self.neighbors if isinstance(self.neighbors, int) else IndexConfig.calibrate_n
        return IndexConfig(kind=self.index, nprobe=self.nprobe, ef_search=self.ef_search,
                           rerank=self.rerank, target_recall=self.target_recall,
                           calibrate_n=n, seed=self.seed)



@dataclass(frozen=True)
class AffinitySection:
    """Stage 2 in the model card: the resolved options, the index's parameters, the label
    store's size and digest, the fingerprint of the files, where the training rows came from."""

    config: AffinityConfig
    index: dict  # the index kind and NeighbourIndex.params
    n_rows: int
    n_labels: int
    train_digest: str
    fingerprint: str
    train_path: str | None = None
    source: str | None = None  # "wsabie" or "awe round N": the embedding G was built from
    # the options estimated from this G's own neighbours (lam, label_lambda): a later round
    # estimates them again for its embedding instead of reusing these values
    estimated: tuple[str, ...] = ()
    # the digest of stage 1's validation rows when G is built over all the other rows
    holdout: str | None = None

    def to_dict(self) -> dict:
        d = {"config": self.config.to_dict(), "index": dict(self.index), "n_rows": self.n_rows,
             "n_labels": self.n_labels, "train_digest": self.train_digest,
             "fingerprint": self.fingerprint, "estimated": list(self.estimated)}
        if self.holdout is not None:
            d["holdout"] = self.holdout
        if self.train_path is not None:
            d["train_path"] = self.train_path
        if self.source is not None:
            d["source"] = self.source
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AffinitySection:
        return cls(AffinityConfig.from_dict(d["config"]), dict(d["index"]),
                   int(d.get("n_rows", 0)), int(d["n_labels"]), d.get("train_digest"),
                   d.get("fingerprint"), d.get("train_path"), d.get("source"),
                   tuple(d.get("estimated", ())), d.get("holdout"))


# ----------------------------------------------------------------------------- the stage-2 model


@dataclass
class Affinity:
    """Everything prediction needs to form G for new rows (the stage-2 part of a model)."""

    config: AffinityConfig  # resolved: lam (and label_lambda) set
    index: object  # awe.neighbours.NeighbourIndex
    train_labels: Csr  # the label store: labels of every indexed training row
    train_sq_norms: np.ndarray  # |e_i|^2 of every indexed row
    embed_u: torch.Tensor | None  # n_features x D (Wsabie space); None in input space
    label_vectors: torch.Tensor | None  # V for the soft label kernel
    n_labels: int
    # the options set from the data (lam, label_lambda): a G built from another embedding
    # estimates them again (:meth:`rebuild_config`)
    estimated: tuple[str, ...] = ()

    def rebuild_config(self) -> AffinityConfig:
        """The options of a G over another embedding of the same rows (a further round): these,
        with every value that was estimated from this embedding's distances left to estimate."""
        return replace(self.config, **{name: None for name in self.estimated})

    # -- query vectors
    def query_vectors(self, examples: Examples, rows: np.ndarray) -> np.ndarray | Csr:
        return query_vectors(examples, rows, self.embed_u, self.config.metric,
                             sparse=isinstance(self.index, SparseIndex))

    def rows_affinity(self, examples: Examples, rows: np.ndarray,
                      exclude_ids: np.ndarray | None = None) -> Csr:
        """G of ``rows`` of ``examples`` (one batch); ``exclude_ids``: leave-one-out ids."""
        q = self.query_vectors(examples, rows)
        sq_dists, ids = self.index.search(q, self.config.neighbors, exclude_ids)
        return self.from_neighbours(q, sq_dists, ids)

    def from_neighbours(self, queries: np.ndarray, sq_dists: np.ndarray,
                        ids: np.ndarray) -> Csr:
        c = self.config
        neighbour_norms = self.train_sq_norms[np.maximum(ids, 0)]
        w = kernel_weights(c.kernel, sq_dists, squared_row_norms(queries), neighbour_norms, c.lam)
        if c.label_kernel == "embedding":
            g = soft_label_affinity(w, ids, self.train_labels, self.label_vectors,
                                    c.label_lambda, c.aggregate, c.label_top)
        else:
            g = aggregate_labels(w, ids, self.train_labels, self.n_labels, c.aggregate)
        return normalize_rows(g) if c.normalize == "max" else g

    def examples_affinity(self, examples: Examples, leave_one_out: bool = False) -> Csr:
        """G of every row of ``examples`` (row i excluded from its own neighbours when asked)."""
        parts = []
        for start in range(0, len(examples), self.config.batch_rows):
            rows = np.arange(start, min(start + self.config.batch_rows, len(examples)))
            parts.append(self.rows_affinity(examples, rows, rows if leave_one_out else None))
        return Csr.concat(parts) if parts else Csr.empty(0, with_values=True)

    # -- persistence
    def fingerprint(self) -> str:
        config = self.config.to_dict()
        if config["target_recall"] == DEFAULT_TARGET_RECALL:
            del config["target_recall"]  # G built before the option keeps its fingerprint
        if config["rerank"] is None:
            del config["rerank"]  # likewise
        if config["metric"] == "auto":
            del config["metric"]  # likewise
        return artifacts.Digest().text(json.dumps(config, sort_keys=True),
                                       str(self.index.n_rows)).hex()

    def save(self, model_dir: Path, g_train: Csr) -> AffinitySection:
        """Write the index, the label store and G of the training rows; return the model card's
        section (config.json itself is the caller's: it is written last)."""
        self.index.save(model_dir / INDEX_FILE)
        tensors = {"train_label_indptr": torch.from_numpy(self.train_labels.indptr),
                   "train_label_ids": torch.from_numpy(self.train_labels.indices.astype(np.int32)),
                   "train_sq_norms": torch.from_numpy(self.train_sq_norms.astype(np.float32)),
                   "g_indptr": torch.from_numpy(g_train.indptr),
                   "g_label_ids": torch.from_numpy(g_train.indices.astype(np.int32)),
                   "g_weights": torch.from_numpy(g_train.values.astype(np.float32))}
        if self.embed_u is not None:
            tensors["embed_U"] = self.embed_u
        if self.label_vectors is not None:
            tensors["label_V"] = self.label_vectors
        fingerprint = self.fingerprint()
        artifacts.write_tensors(model_dir / AFFINITY_FILE, tensors,
                                {"fingerprint": fingerprint})
        return AffinitySection(self.config, {"kind": self.index.kind, **self.index.params},
                               self.index.n_rows, self.n_labels,
                               labels_digest(self.train_labels), fingerprint,
                               estimated=tuple(self.estimated))

    @classmethod
    def load(cls, model_dir: Path, section: AffinitySection, with_train_g: bool = False,
             ) -> Affinity | tuple[Affinity, Csr]:
        """The stage-2 model of a directory whose model card has ``section``."""
        tensors = artifacts.read_tensors(model_dir / AFFINITY_FILE)
        _check_dtypes(model_dir / AFFINITY_FILE, tensors)
        index = (SparseIndex if section.index.get("kind") == "sparse" else NeighbourIndex).load(
            model_dir / INDEX_FILE, section.index)
        try:
            labels = Csr(tensors["train_label_indptr"].numpy(),
                         tensors["train_label_ids"].numpy().astype(np.int64))
            norms = tensors["train_sq_norms"].numpy()
        except KeyError as exc:
            raise AweError(f"{model_dir / AFFINITY_FILE}: missing {exc}; run `awe build-g` "
                           f"again") from exc
        estimated = tuple(name for name in section.estimated if name in ("lam", "label_lambda"))
        affinity = cls(section.config, index, labels, norms, tensors.get("embed_U"),
                       tensors.get("label_V"), section.n_labels, estimated)
        if (labels.n_rows != index.n_rows or len(norms) != index.n_rows
                or affinity.fingerprint() != section.fingerprint):
            raise AweError(f"{model_dir}: the neighbour index and the stage-2 files do not match "
                           f"(an interrupted or mixed build); run `awe build-g` again")
        if not with_train_g:
            return affinity
        try:
            g_train = Csr(tensors["g_indptr"].numpy(),
                          tensors["g_label_ids"].numpy().astype(np.int64),
                          tensors["g_weights"].numpy())
        except KeyError as exc:
            raise AweError(f"{model_dir / AFFINITY_FILE}: missing {exc}; run `awe build-g` "
                           f"again") from exc
        return affinity, g_train


# what Affinity.save writes: the label ids int32 (compact at scale), offsets int64, weights float32
STORED_DTYPES = {"train_label_indptr": torch.int64, "train_label_ids": torch.int32,
                 "train_sq_norms": torch.float32, "g_indptr": torch.int64,
                 "g_label_ids": torch.int32, "g_weights": torch.float32,
                 "embed_U": torch.float32, "label_V": torch.float32}


def _check_dtypes(path: Path, tensors: dict) -> None:
    """A tampered or foreign file is refused with one line, never cast or crashed on later."""
    for name, tensor in tensors.items():
        expected = STORED_DTYPES.get(name)
        if expected is not None and tensor.dtype != expected:
            raise AweError(f"{path}: tensor {name} has dtype {tensor.dtype}, expected {expected} "
                           f"(damaged or from another build); run `awe build-g` again")


def labels_digest(labels: Csr) -> str:
    """A short hash of a label store: tells whether stage 3 trains on the rows G was built on."""
    return artifacts.Digest().bytes(
        np.ascontiguousarray(labels.indptr, dtype=np.int64).tobytes(),
        np.ascontiguousarray(labels.indices, dtype=np.int64).tobytes()).hex()


def query_vectors(examples: Examples, rows: np.ndarray, embed_u: torch.Tensor | None,
                  metric: str = "l2", sparse: bool = True) -> np.ndarray | Csr:
    """The vectors searched for ``rows``: x U (Wsabie space) or x itself (input space; a
    :class:`Csr` of sparse inputs, dense only for an index of densified rows, ``sparse=False``),
    rows scaled to unit length for ``metric="cosine"``."""

    rows = np.asarray(rows, dtype=np.int64)
    if embed_u is None:
        if examples.dense is not None:
            x = np.ascontiguousarray(examples.dense[rows], dtype=np.float32)
            if metric == "cosine":
                norms = np.sqrt(squared_row_norms(x))
                x = (x / np.where(norms > 0, norms, 1.0)[:, None]).astype(np.float32)
            return x
        part = examples.sparse.take(rows)
        values = (part.values if part.values is not None
                  else np.ones(len(part.indices), dtype=np.float32)).astype(np.float32)
        if metric == "cosine":
            norms = np.sqrt(squared_row_norms(Csr(part.indptr, part.indices, values)))
            values = (values / np.where(norms > 0, norms, 1.0)[part.row_of_entry()]).astype(
                np.float32)
        if sparse:
            return Csr(part.indptr, part.indices, values)
        out = np.zeros((len(rows), examples.schema.n_features), dtype=np.float32)
        np.add.at(out, (part.row_of_entry(), part.indices), values)
        return out
    x = batch_inputs(examples, rows)
    with torch.no_grad():
        if x.dense is not None:
            e = x.dense @ embed_u
        else:
            e = torch.nn.functional.embedding_bag(x.ids, embed_u, x.offsets, mode="sum",
                                                  per_sample_weights=x.weights)
    return np.ascontiguousarray(e.numpy(), dtype=np.float32)


def squared_row_norms(x: np.ndarray | Csr) -> np.ndarray:
    """|x_i|^2 of every row (float64), of dense rows or a :class:`Csr`."""
    if isinstance(x, Csr):
        values = x.values if x.values is not None else np.ones(len(x.indices))
        return np.bincount(x.row_of_entry(), weights=np.square(values, dtype=np.float64),
                           minlength=x.n_rows)
    return (np.asarray(x, dtype=np.float64) ** 2).sum(1)


def check_build(schema, n_rows: int, config: AffinityConfig, embed_u, label_vectors):
    if config.space != "input" and embed_u is None:
        raise AweError("--space wsabie needs a stage-1 model: run `awe train` first")
    if config.label_kernel == "embedding" and label_vectors is None:
        raise AweError("--label-kernel embedding needs the stage-1 label vectors")
    if n_rows < 2:
        raise AweError("G needs at least 2 training rows")


def build_affinity(train: Examples, n_labels: int, config: AffinityConfig,
                   embed_u: torch.Tensor | None, label_vectors: torch.Tensor | None = None,
                   train_g: bool = True) -> tuple[Affinity, Csr | None, dict]:
    """Index the training rows, find every row's neighbours (leave-one-out) and form G.

    Returns the stage-2 model, G of the training rows, and measurements (times, lambda, recall).
    With ``train_g=False`` (a baseline that only predicts) only a sample of rows is searched,
    to set lambda, and no training G is formed.
    """
    config = config.resolved(train.task).with_input_kind(train.schema.kind)
    if config.space == "input":
        embed_u = None
    check_build(train.schema, len(train), config, embed_u, label_vectors)
    t0 = time.perf_counter()
    parts = [query_vectors(train, np.arange(s, min(s + config.batch_rows, len(train))), embed_u,
                           config.metric)
             for s in range(0, len(train), config.batch_rows)]
    vectors = Csr.concat(parts) if isinstance(parts[0], Csr) else np.concatenate(parts)
    return affinity_from_vectors(vectors, train.labels, n_labels, config, embed_u, label_vectors,
                                 train_g, t0)


def affinity_from_vectors(vectors: np.ndarray, labels: Csr, n_labels: int,
                          config: AffinityConfig, embed_u: torch.Tensor | None,
                          label_vectors: torch.Tensor | None = None, train_g: bool = True,
                          t0: float | None = None, search_all=None,
                          valid: ValidationRows | None = None,
                          ) -> tuple[Affinity, Csr | None, dict]:
    """:func:`build_affinity` from the training rows' vectors (x U, or x) and labels; callers
    resolve ``auto`` options from the task first (annotation's values otherwise).

    ``search_all(index, vectors, n)``, when given, finds every row's leave-one-out neighbours
    in its place (the Dask path: :func:`awe.cluster.sharded_search`, the same result).
    ``valid``: with ``neighbors auto``, n is chosen on these rows (:mod:`awe.affinity.search`)."""

    candidates = None
    if config.neighbors == "auto" and valid is not None and train_g and len(valid):
        n_rows = vectors.n_rows if isinstance(vectors, Csr) else len(vectors)
        # a row has n_rows - 1 others: larger counts are that one
        candidates = tuple(dict.fromkeys(min(c, max(n_rows - 1, 1))
                                         for c in neighbour_candidates(valid.task)))
        config = replace(config, neighbors=max(candidates))  # the others: the first columns
    config = config.resolved(None)
    set_threads(config.threads)
    t0 = time.perf_counter() if t0 is None else t0
    sparse = isinstance(vectors, Csr)  # sparse inputs in their own space: exact sparse search
    n = vectors.n_rows if sparse else len(vectors)
    if sparse:
        index = SparseIndex(vectors)
        search_all = None
    elif not train_g and config.index == "flat":
        # a baseline that is searched, never saved: exact search over the vectors themselves,
        # without FAISS's copy of them (knn-input at 1M x 474 features: 1.9 GB less)
        index = NeighbourIndex.exact_over(vectors, config.index_config())
    else:
        index = NeighbourIndex.build(vectors, config.index_config())
    t_index = time.perf_counter() - t0
    searched = np.arange(n, dtype=np.int64)
    if not train_g and n > LAMBDA_SAMPLE:
        rng = np.random.default_rng(config.seed)
        searched = np.sort(rng.choice(n, LAMBDA_SAMPLE, replace=False))
    if search_all is not None and len(searched) == n:
        sq_dists, ids = search_all(index, vectors, config.neighbors)
    elif len(searched) == n:  # the vectors themselves, not a copy (1M x 128 floats is 512 MB)
        sq_dists, ids = index.leave_one_out(vectors, config.neighbors)
    else:
        sq_dists, ids = index.search(vectors.take(searched) if sparse else vectors[searched],
                                     config.neighbors, searched)
    t_search = time.perf_counter() - t0 - t_index
    sq_norms = _sq_norms(vectors, config.batch_rows)
    search = None
    if candidates is not None:
        affinity = Affinity(config, index, labels, sq_norms, embed_u, label_vectors, n_labels)
        chosen, search = choose_neighbours(affinity, sq_dists, ids, valid, candidates)
        config = replace(config, neighbors=chosen)
        sq_dists, ids = sq_dists[:, :chosen], ids[:, :chosen]
    resolved, estimated = config, []
    if config.lam is None:
        resolved = replace(resolved, lam=default_lambda(sq_dists))
        estimated.append("lam")
    if config.label_kernel == "embedding" and config.label_lambda is None:
        resolved = replace(resolved, label_lambda=default_label_lambda(label_vectors))
        estimated.append("label_lambda")
    affinity = Affinity(resolved, index, labels, sq_norms, embed_u,
                        label_vectors if config.label_kernel == "embedding" else None, n_labels,
                        tuple(estimated))
    g_train = None
    if train_g:
        g_train = Csr.concat([
            affinity.from_neighbours(_row_slice(vectors, s, s + config.batch_rows),
                                     sq_dists[s:s + config.batch_rows],
                                     ids[s:s + config.batch_rows])
            for s in range(0, n, config.batch_rows)])
    t_g = time.perf_counter() - t0 - t_index - t_search
    recall = index.measure_recall(vectors, config.neighbors, seed=config.seed)
    stats = {"rows": n, "neighbors": config.neighbors, "index": index.kind,
             "index_seconds": round(t_index, 3),
             "search_seconds": round(t_search, 3), "g_seconds": round(t_g, 3),
             "recall@n": round(float(recall), 4), "lambda": resolved.lam}
    if g_train is not None:
        stats["labels_per_row"] = round(g_train.nnz / max(n, 1), 2)
    if resolved.label_lambda is not None:
        stats["label_lambda"] = resolved.label_lambda
    if search is not None:
        stats["neighbors_search"] = search
    return affinity, g_train, stats


def choose_neighbours(affinity: Affinity, sq_dists: np.ndarray, ids: np.ndarray,
                      valid: ValidationRows, candidates: tuple[int, ...]) -> tuple[int, dict]:
    """``--neighbors auto``: (the chosen n, the record of the search). ``sq_dists`` / ``ids``
    are the training rows' leave-one-out lists at the largest candidate; each candidate's G
    takes their first columns (and its own lambda from them, as a G built with that n would)."""
    t0 = time.perf_counter()
    c = affinity.config
    n_max = max(candidates)
    v_dists, v_ids = affinity.index.search(valid.vectors, n_max)
    label_lambda = c.label_lambda  # of the label vectors: the same for every count
    if c.label_kernel == "embedding" and label_lambda is None:
        label_lambda = default_label_lambda(affinity.label_vectors)
    scores = {}
    for n in candidates:
        lam = c.lam if c.lam is not None else default_lambda(sq_dists[:, :n])
        candidate = replace(affinity, config=replace(c, neighbors=n, lam=lam,
                                                     label_lambda=label_lambda))
        g = candidate.from_neighbours(valid.vectors, v_dists[:, :n], v_ids[:, :n])
        scores[n] = round(g_precision(g, valid, affinity.n_labels), 6)
    chosen = pick(scores)
    return chosen, {"chosen": chosen, f"valid_P@{valid.k}": {str(n): s for n, s in
                                                              sorted(scores.items())},
                    "valid_rows": len(valid), "seconds": round(time.perf_counter() - t0, 3)}


def _sq_norms(vectors: np.ndarray | Csr, batch_rows: int) -> np.ndarray:
    n = vectors.n_rows if isinstance(vectors, Csr) else len(vectors)
    return np.concatenate([  # in chunks: a float64 copy of all vectors would double them
        squared_row_norms(_row_slice(vectors, s, s + batch_rows)).astype(np.float32)
        for s in range(0, n, batch_rows)])


def _row_slice(vectors: np.ndarray | Csr, start: int, stop: int) -> np.ndarray | Csr:
    if isinstance(vectors, Csr):
        return vectors.take(np.arange(start, min(stop, vectors.n_rows)))
    return vectors[start:stop]
