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

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from . import artifacts
from .csr import Csr
from .data import Examples
from .errors import AweError
from .neighbours import DEFAULT_TARGET_RECALL

KERNELS = ("gaussian", "embedded-gaussian", "cosine", "dot", "uniform")
AGGREGATES = ("sum", "max")
SPACES = ("wsabie", "input")
LABEL_KERNELS = ("exact", "embedding")
NORMALIZE = ("none", "max")

INDEX_FILE = "index.faiss"
AFFINITY_FILE = "affinity.safetensors"
# the input space is searched densely; wider sparse inputs must use the Wsabie space
MAX_DENSE_INPUT_WIDTH = 4096
LAMBDA_SAMPLE = 2000  # rows searched to set lambda when no training G is needed


@dataclass(frozen=True)
class AffinityConfig:
    """Every option of stage 2; saved in config.json (with the resolved lambdas)."""

    # "auto": 20 (the paper's) for annotation; 100 for recommendation, where x is a user id and
    # 20 neighbours carry too few of a user's items (docs/decisions.md)
    neighbors: int | str = "auto"
    kernel: str = "gaussian"
    lam: float | None = None  # gaussian scale; None: 1 / median squared neighbour distance
    aggregate: str = "sum"
    bias: float = 0.0  # b in f = (G + b) * s: the weight of labels no neighbour carries
    space: str = "wsabie"
    label_kernel: str = "exact"
    label_lambda: float | None = None  # None: 1 / median squared distance between label vectors
    label_top: int = 64  # labels kept per row with the soft label kernel (G is dense otherwise)
    # "max": divide each row of G by its largest weight, so stage 3 sees every row's G on one
    # scale (docs/decisions.md: better on all three benchmark datasets); "none": the raw sums
    normalize: str = "max"
    index: str = "auto"
    nprobe: int | None = None
    ef_search: int | None = None
    rerank: int | None = None  # bf16 index: candidates beyond n re-ranked; None: calibrated
    # IVF / HNSW / bf16 calibration: the recall@n (2-SE lower bound on a sample) nprobe or efSearch
    # must reach; lower trades neighbours for speed at scale (docs/decisions.md)
    target_recall: float = DEFAULT_TARGET_RECALL
    batch_rows: int = 4096
    seed: int = 0
    threads: int | None = None

    def __post_init__(self):
        checks = [
            (self.neighbors == "auto" or (not isinstance(self.neighbors, (bool, str))
                                          and int(self.neighbors) == self.neighbors
                                          and self.neighbors >= 1),
             "--neighbors must be an integer >= 1 or auto"),
            (self.kernel in KERNELS, f"--kernel must be one of {', '.join(KERNELS)}"),
            (self.lam is None or (self.lam > 0 and math.isfinite(self.lam)),
             "--lambda must be a positive number"),
            (self.aggregate in AGGREGATES, "--aggregate must be sum or max"),
            (math.isfinite(self.bias) and self.bias >= 0, "--bias must be a number >= 0"),
            (self.space in SPACES, "--space must be wsabie or input"),
            (self.label_kernel in LABEL_KERNELS, "--label-kernel must be exact or embedding"),
            (self.label_lambda is None or self.label_lambda > 0,
             "--label-lambda must be a positive number"),
            (self.label_top >= 1, "--label-top must be >= 1"),
            (self.normalize in NORMALIZE, "--normalize must be none or max"),
            (self.batch_rows >= 1, "--batch-rows must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise AweError(message)
        self.index_config()  # the index options (--index, --rerank, --target-recall, ...)

    def resolved(self, task: str | None) -> AffinityConfig:
        """Fill the task-dependent default (``auto``) of the neighbour count."""
        neighbors = self.neighbors
        if neighbors == "auto":
            neighbors = 100 if task == "recommendation" else 20
        return replace(self, neighbors=int(neighbors))

    def index_config(self):
        from .neighbours import IndexConfig

        return IndexConfig(kind=self.index, nprobe=self.nprobe, ef_search=self.ef_search,
                           rerank=self.rerank, target_recall=self.target_recall, seed=self.seed)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AffinityConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------- pure pieces


def kernel_weights(kernel: str, sq_dists: np.ndarray, query_sq_norms: np.ndarray,
                   neighbour_sq_norms: np.ndarray, lam: float) -> np.ndarray:
    """k(e, e_i) for every query (rows) and neighbour slot (columns), float32 [B, n].

    Only squared distances and squared norms are needed: e . e_i = (|e|^2 + |e_i|^2 - d^2) / 2.
    Slots with an infinite distance (no neighbour) get weight 0.
    """
    d2 = np.asarray(sq_dists, dtype=np.float64)
    valid = np.isfinite(d2)
    d2 = np.where(valid, d2, 0.0)
    if kernel == "gaussian":
        w = np.exp(-lam * d2)
    elif kernel == "uniform":
        w = np.ones_like(d2)
    else:
        qn = np.asarray(query_sq_norms, dtype=np.float64)[:, None]
        nn = np.where(valid, np.asarray(neighbour_sq_norms, dtype=np.float64), 0.0)
        dot = (qn + nn - d2) / 2
        if kernel == "dot":
            w = np.maximum(dot, 0.0)
        elif kernel == "cosine":
            norm = np.sqrt(qn * nn)
            w = np.exp(np.divide(dot, norm, out=np.zeros_like(dot), where=norm > 0))
        elif kernel == "embedded-gaussian":
            if np.any(dot[valid] > 80):
                raise AweError("--kernel embedded-gaussian: e . e_i exceeds 80 and exp overflows; "
                               "use --kernel cosine or gaussian, or set --max-norm in stage 1")
            w = np.exp(dot)
        else:
            raise AweError(f"unknown kernel {kernel!r}")
    return np.where(valid, w, 0.0).astype(np.float32)


def normalize_rows(g: Csr) -> Csr:
    """Each row of G divided by its largest weight (rows of zeros stay zero)."""
    if g.nnz == 0:
        return g
    starts = g.indptr[:-1][g.lengths > 0]
    row_max = np.zeros(g.n_rows, dtype=np.float32)
    row_max[g.lengths > 0] = np.maximum.reduceat(g.values, starts)
    scale = np.repeat(row_max, g.lengths)
    values = np.divide(g.values, scale, out=np.zeros_like(g.values), where=scale > 0)
    return Csr(g.indptr, g.indices, values.astype(np.float32))


def default_lambda(sq_dists: np.ndarray) -> float:
    """1 / the median squared neighbour distance (ignoring exact duplicates and padding)."""
    d2 = np.asarray(sq_dists, dtype=np.float64).ravel()
    d2 = d2[np.isfinite(d2) & (d2 > 0)]
    if len(d2) == 0:
        return 1.0
    return float(1.0 / np.median(d2))


def aggregate_labels(weights: np.ndarray, neighbour_ids: np.ndarray, train_labels: Csr,
                     n_labels: int, aggregate: str) -> Csr:
    """G rows: for each query, AGG over neighbours of weight * [y in labels(neighbour)].

    ``neighbour_ids`` [B, n] index ``train_labels`` rows (-1: no neighbour). Returns a Csr with
    label ids sorted within each row and float32 weights; labels no neighbour carries are absent.
    """
    n_queries, n_slots = neighbour_ids.shape
    ids = neighbour_ids.ravel()
    valid = ids >= 0
    query_of_slot = np.repeat(np.arange(n_queries, dtype=np.int64), n_slots)[valid]
    slot_weight = weights.ravel()[valid]
    ids = ids[valid]
    lengths = train_labels.indptr[ids + 1] - train_labels.indptr[ids]
    labels = train_labels.indices[train_labels.entry_positions(ids)]
    queries = np.repeat(query_of_slot, lengths)
    values = np.repeat(slot_weight, lengths).astype(np.float64)
    return _reduce_by_key(queries, labels, values, n_queries, n_labels, aggregate)


def _reduce_by_key(queries: np.ndarray, labels: np.ndarray, values: np.ndarray, n_queries: int,
                   n_labels: int, aggregate: str) -> Csr:
    keys = queries * n_labels + labels
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    if len(keys) == 0:
        return Csr.empty(n_queries, with_values=True)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    reduce = np.add if aggregate == "sum" else np.maximum
    reduced = reduce.reduceat(values, starts)
    unique = keys[starts]
    lengths = np.bincount(unique // n_labels, minlength=n_queries)
    return Csr.from_lengths(lengths, unique % n_labels, reduced.astype(np.float32))


def soft_label_affinity(weights: np.ndarray, neighbour_ids: np.ndarray, train_labels: Csr,
                        label_vectors: torch.Tensor, label_lambda: float, aggregate: str,
                        top: int) -> Csr:
    """G with the footnote's label kernel, truncated to the ``top`` largest labels per row.

    G(x, y) = AGG_i k_i * max_{y_i in labels(x_i)} exp(-lambda_y ||V_y - V_{y_i}||^2).
    """
    n_queries, n_slots = neighbour_ids.shape
    n_labels = label_vectors.shape[0]
    ids = neighbour_ids.ravel()
    valid = ids >= 0
    slot = np.flatnonzero(valid)  # flat (query, slot) position of each real neighbour
    ids = ids[valid]
    lengths = train_labels.indptr[ids + 1] - train_labels.indptr[ids]
    their_labels = train_labels.indices[train_labels.entry_positions(ids)]
    slot_of_label = torch.from_numpy(np.repeat(slot, lengths))
    v = label_vectors.float()
    sq = (v * v).sum(1)
    uniq, inverse = np.unique(their_labels, return_inverse=True)
    u = torch.from_numpy(uniq)
    # similarity of each distinct neighbour label to every label: [U, L]
    d2 = (sq[u, None] + sq[None, :] - 2 * v[u] @ v.T).clamp(min=0)
    sim = torch.exp(-label_lambda * d2)
    match = torch.zeros(n_queries * n_slots, n_labels)
    index = slot_of_label[:, None].expand(-1, n_labels)
    match.scatter_reduce_(0, index, sim[torch.from_numpy(inverse)], reduce="amax",
                          include_self=True)
    weighted = match.view(n_queries, n_slots, n_labels) * torch.from_numpy(
        weights.astype(np.float32)).unsqueeze(-1)
    g = weighted.sum(1) if aggregate == "sum" else weighted.amax(1)
    top = min(top, n_labels)
    values, labels = torch.topk(g, top, dim=1)
    keep = values > 0
    order = torch.argsort(torch.where(keep, labels, n_labels), dim=1)  # ids ascending, dropped last
    labels, values, keep = (t.gather(1, order) for t in (labels, values, keep))
    return Csr.from_lengths(keep.sum(1).numpy(), labels[keep].numpy().astype(np.int64),
                            values[keep].numpy().astype(np.float32))


def default_label_lambda(label_vectors: torch.Tensor, sample: int = 2000, seed: int = 0) -> float:
    """1 / the median squared distance between (a sample of) label vectors."""
    v = label_vectors.float()
    if len(v) > sample:
        v = v[torch.randperm(len(v), generator=torch.Generator().manual_seed(seed))[:sample]]
    d2 = torch.cdist(v, v).pow(2)
    off = d2[~torch.eye(len(v), dtype=torch.bool)]
    off = off[off > 0]
    return 1.0 if off.numel() == 0 else float(1.0 / off.median())


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

    # -- query vectors
    def query_vectors(self, examples: Examples, rows: np.ndarray) -> np.ndarray:
        return query_vectors(examples, rows, self.embed_u)

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
        w = kernel_weights(c.kernel, sq_dists, (queries.astype(np.float64) ** 2).sum(1),
                           neighbour_norms, c.lam)
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
        text = json.dumps(config, sort_keys=True) + str(self.index.n_rows)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def save(self, model_dir: Path, g_train: Csr) -> dict:
        """Write the index, the label store and G of the training rows; return the config
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
        return {"config": self.config.to_dict(), "index": {"kind": self.index.kind,
                                                           **self.index.params},
                "n_rows": self.index.n_rows, "n_labels": self.n_labels,
                "train_digest": labels_digest(self.train_labels), "fingerprint": fingerprint}

    @classmethod
    def load(cls, model_dir: Path, section: dict, with_train_g: bool = False,
             ) -> Affinity | tuple[Affinity, Csr]:
        from .neighbours import NeighbourIndex

        try:
            config = AffinityConfig.from_dict(section["config"])
            index_params = dict(section["index"])
            n_labels = int(section["n_labels"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AweError(f"{model_dir / artifacts.CONFIG}: the stage2 section is damaged "
                           f"({exc}); run `awe build-g` again") from exc
        tensors = artifacts.read_tensors(model_dir / AFFINITY_FILE)
        _check_dtypes(model_dir / AFFINITY_FILE, tensors)
        index = NeighbourIndex.load(model_dir / INDEX_FILE, index_params)
        try:
            labels = Csr(tensors["train_label_indptr"].numpy(),
                         tensors["train_label_ids"].numpy().astype(np.int64))
            norms = tensors["train_sq_norms"].numpy()
        except KeyError as exc:
            raise AweError(f"{model_dir / AFFINITY_FILE}: missing {exc}; run `awe build-g` "
                           f"again") from exc
        affinity = cls(config, index, labels, norms, tensors.get("embed_U"),
                       tensors.get("label_V"), n_labels)
        if (labels.n_rows != index.n_rows or len(norms) != index.n_rows
                or affinity.fingerprint() != section.get("fingerprint")):
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
    h = hashlib.sha256(np.ascontiguousarray(labels.indptr, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(labels.indices, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def query_vectors(examples: Examples, rows: np.ndarray, embed_u: torch.Tensor | None,
                  ) -> np.ndarray:
    """The vectors searched for ``rows``: x U (Wsabie space) or x itself (input space)."""
    from .model import batch_inputs

    rows = np.asarray(rows, dtype=np.int64)
    if embed_u is None:
        if examples.dense is not None:
            return np.ascontiguousarray(examples.dense[rows], dtype=np.float32)
        part = examples.sparse.take(rows)
        out = np.zeros((len(rows), examples.schema.n_features), dtype=np.float32)
        np.add.at(out, (part.row_of_entry(), part.indices), part.values)
        return out
    x = batch_inputs(examples, rows)
    with torch.no_grad():
        if x.dense is not None:
            e = x.dense @ embed_u
        else:
            e = torch.nn.functional.embedding_bag(x.ids, embed_u, x.offsets, mode="sum",
                                                  per_sample_weights=x.weights)
    return np.ascontiguousarray(e.numpy(), dtype=np.float32)


def _check_build(schema, n_rows: int, config: AffinityConfig, embed_u, label_vectors):
    if config.space == "input":
        if schema.kind == "sparse" and schema.n_features > MAX_DENSE_INPUT_WIDTH:
            raise AweError(f"--space input: the sparse input has {schema.n_features} "
                           f"features, more than {MAX_DENSE_INPUT_WIDTH} to search densely; use "
                           f"--space wsabie")
    elif embed_u is None:
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
    config = config.resolved(train.task)
    if config.space == "input":
        embed_u = None
    _check_build(train.schema, len(train), config, embed_u, label_vectors)
    t0 = time.perf_counter()
    vectors = np.concatenate([
        query_vectors(train, np.arange(s, min(s + config.batch_rows, len(train))), embed_u)
        for s in range(0, len(train), config.batch_rows)])
    return affinity_from_vectors(vectors, train.labels, n_labels, config, embed_u, label_vectors,
                                 train_g, t0)


def affinity_from_vectors(vectors: np.ndarray, labels: Csr, n_labels: int,
                          config: AffinityConfig, embed_u: torch.Tensor | None,
                          label_vectors: torch.Tensor | None = None, train_g: bool = True,
                          t0: float | None = None, search_all=None,
                          ) -> tuple[Affinity, Csr | None, dict]:
    """:func:`build_affinity` from the training rows' vectors (x U, or x) and labels; callers
    resolve ``auto`` options from the task first (annotation's values otherwise).

    ``search_all(index, vectors, n)``, when given, finds every row's leave-one-out neighbours
    in its place (the Dask path: :func:`awe.cluster.sharded_search`, the same result)."""
    from .neighbours import NeighbourIndex, set_threads

    config = config.resolved(None)
    set_threads(config.threads)
    t0 = time.perf_counter() if t0 is None else t0
    n = len(vectors)
    if not train_g and config.index == "flat":
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
        sq_dists, ids = index.search(vectors[searched], config.neighbors, searched)
    t_search = time.perf_counter() - t0 - t_index
    resolved = config
    if config.lam is None:
        resolved = replace(resolved, lam=default_lambda(sq_dists))
    if config.label_kernel == "embedding" and config.label_lambda is None:
        resolved = replace(resolved, label_lambda=default_label_lambda(label_vectors))
    sq_norms = np.concatenate([  # in chunks: a float64 copy of all vectors would double them
        (vectors[s:s + config.batch_rows].astype(np.float64) ** 2).sum(1).astype(np.float32)
        for s in range(0, n, config.batch_rows)])
    affinity = Affinity(resolved, index, labels, sq_norms, embed_u,
                        label_vectors if config.label_kernel == "embedding" else None, n_labels)
    g_train = None
    if train_g:
        g_train = Csr.concat([
            affinity.from_neighbours(vectors[s:s + config.batch_rows],
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
    return affinity, g_train, stats


# embeddings of the training rows beyond this many bytes go to a memory-mapped file
EMBED_MEMORY_BUDGET = 1 << 30


def stream_vectors(path, schema, vocab, embed_u: torch.Tensor | None, batch_rows: int,
                   scratch_dir: Path, budget: int | None = None,
                   ) -> tuple[np.ndarray, Csr, Path | None]:
    """The vector of every training row (x U, or x itself without ``embed_u``) and its labels,
    reading the files a record batch at a time: memory holds the vectors, not the features.

    Rows are embedded in chunks of ``batch_rows`` rows counted from the first row, as
    :func:`build_affinity` does on loaded rows, so the vectors are the same bits. Vectors of more
    than ``budget`` bytes are written to a memory-mapped float32 file in ``scratch_dir`` (returned,
    for the caller to delete).
    """
    import pyarrow as pa

    from .data import (
        DataError,
        _input_kind,
        _wanted,
        concat_examples,
        iter_batches,
        resolve_files,
        training_block,
    )
    from .stream import list_shards

    files = resolve_files(path)
    kind_here = _input_kind(files[0], schema.columns)
    if kind_here != schema.kind:
        raise DataError(f"the model was trained on {schema.kind} features but this file has "
                        f"{kind_here} ones", file=str(files[0]),
                        hint="use a model trained on the same kind of features")
    n_rows = sum(s.n_rows for s in list_shards(files))
    width = schema.n_features if embed_u is None else embed_u.shape[1]
    mapped = None
    if n_rows * width * 4 > (EMBED_MEMORY_BUDGET if budget is None else budget):
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
            vectors[done:done + take] = query_vectors(block, np.arange(take), embed_u)
            labels.append(block.labels.take(np.arange(take)))
            done += take
            block = block.take(np.arange(take, len(block))) if take < len(block) else None
        if block is not None:
            pending = [block]

    try:
        for file, offset, batch in iter_batches(files, _wanted(schema.columns, schema.kind),
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
    from .model import load_wsabie

    model_dir = Path(model_dir)
    saved = load_wsabie(model_dir)
    if embed_u is None:
        embed_u = saved.model.u_matrix().detach().clone()
    label_vectors = saved.model.v_matrix().detach().clone()
    config = config.resolved(saved.config["stage1"]["train"].get("task"))
    if cluster is None:
        affinity, g_train, stats = build_affinity_streamed(
            train_path, saved.schema, saved.vocab, config, embed_u, label_vectors, model_dir)
    else:
        import shutil
        import tempfile

        from . import cluster as dask_cluster

        with dask_cluster.dask_client(cluster) as client:
            scratch = Path(tempfile.mkdtemp(prefix=".build-g-", suffix=".tmp", dir=model_dir))
            try:
                affinity, g_train, stats = build_affinity_streamed(
                    train_path, saved.schema, saved.vocab, config, embed_u, label_vectors,
                    model_dir, search_all=dask_cluster.sharded_search(client, scratch,
                                                                      config.threads))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    written = write_stage2(model_dir, affinity, g_train, stats, str(train_path), source)
    return stats, written


def build_affinity_streamed(train_path, schema, vocab, config: AffinityConfig,
                            embed_u: torch.Tensor | None, label_vectors: torch.Tensor | None,
                            scratch_dir: Path, search_all=None, train_g: bool = True,
                            ) -> tuple[Affinity, Csr | None, dict]:
    """:func:`build_affinity` reading ``train_path`` a record batch at a time (same result)."""
    if config.space == "input":
        embed_u = None
    from .data import resolve_files
    from .stream import list_shards

    n_rows = sum(s.n_rows for s in list_shards(resolve_files(train_path)))
    _check_build(schema, n_rows, config, embed_u, label_vectors)
    t0 = time.perf_counter()
    vectors, labels, mapped = stream_vectors(train_path, schema, vocab, embed_u,
                                             config.batch_rows, scratch_dir)
    try:
        if mapped is not None:
            vectors.flush()  # workers of the Dask path read the file
        return affinity_from_vectors(vectors, labels, len(vocab), config, embed_u, label_vectors,
                                     train_g, t0, search_all)
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
    config = artifacts.read_json(model_dir / artifacts.CONFIG)
    stale = config.pop("stage3", None) is not None
    with artifacts.staged(model_dir) as stage:
        section = affinity.save(stage, g_train)
        section.update({"train_path": train_path, "source": source})
        if stale or "stage2" in config:
            artifacts.write_json(model_dir / artifacts.CONFIG,
                                 {k: v for k, v in config.items() if k != "stage2"})
        if stale:
            (model_dir / artifacts.AWE_WEIGHTS).unlink(missing_ok=True)
        config["stage2"] = section
        artifacts.write_json(stage / artifacts.CONFIG, config)  # renamed in last
    metrics_path = model_dir / artifacts.METRICS
    metrics = artifacts.read_json(metrics_path) if metrics_path.exists() else {}
    metrics["g"] = stats
    metrics.pop("awe", None)
    artifacts.write_json(metrics_path, metrics)
    return [model_dir / INDEX_FILE, model_dir / AFFINITY_FILE, model_dir / artifacts.CONFIG,
            metrics_path]
