"""Prediction: the scores of every label for new rows, for each row of the paper's table.

One path serves ``awe eval`` and ``awe score``: stage-1 embedding -> neighbour search -> sparse
G -> stage-3 scores. The baselines reuse the pieces: ``knn-input`` (neighbour vote in input
space), ``knn-wsabie`` (labels ranked by a Wsabie-space G alone), ``wsabie`` (stage 1 alone),
``awe`` (stage 3).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from awe.affinity.g import Affinity
from awe.affinity.stage import build_affinity_streamed, validation_holdout
from awe.csr import Csr
from awe.errors import AweError, invalid
from awe.io.reader import Examples
from awe.models.affinity_wsabie import awe_ranking_scores
from awe.models.saved import load_awe, load_wsabie
from awe.models.wsabie import batch_inputs
from awe.ranking import screen as screen_lib
from awe.ranking.topk import ranked_batches

ROWS = ("knn-input", "knn-wsabie", "wsabie", "awe")


class Predictor:
    """A loaded model directory that scores batches of rows; baselines are built on demand."""

    def __init__(self, model_dir, train_path=None, device: str = "cpu",
                 screen: bool | None = None):
        """``screen``: rank the Wsabie stage (and AWE rows short of G labels) through bfloat16
        products on CPU (:mod:`awe.ranking.screen`); None: where the CPU has them natively.
        The same labels either way; :attr:`screen` is what was decided."""

        self.model_dir = Path(model_dir)
        saved = load_wsabie(self.model_dir)
        self.schema, self.vocab, self.card = saved.schema, saved.vocab, saved.card
        self.wsabie = saved.model.to(device)
        self.device = device
        self.screen = device == "cpu" and screen_lib.use_screen(screen)
        stage2 = self.card.stage2
        self.affinity = None if stage2 is None else Affinity.load(self.model_dir, stage2)
        self.awe = None
        if self.card.stage3 is not None:
            self.awe = load_awe(self.model_dir, self.card).to(device)
        self.train_path = train_path or (stage2.train_path if stage2 is not None else None)
        self._baselines: dict = {}  # knn rows built on demand: space -> Affinity
        self._g_cache: tuple | None = None
        self._screens: dict = {}  # stage -> the bfloat16 copy of its labels (awe.screen)

    @property
    def n_labels(self) -> int:
        return len(self.vocab)

    def available(self) -> list[str]:
        rows = ["wsabie"]
        if self.affinity is not None:
            rows = ["knn-input", "knn-wsabie", "wsabie"]
        if self.awe is not None:
            rows.append("awe")
        return rows

    def newest(self) -> str:
        return "awe" if self.awe is not None else "wsabie"

    def check_rows(self, rows) -> None:
        unknown = [r for r in rows if r not in ROWS]
        if unknown:
            raise AweError(f"unknown row(s) {', '.join(unknown)}: choose from {', '.join(ROWS)}")
        missing = [r for r in rows if r not in self.available()]
        if missing:
            step = "`awe build-g`" if self.affinity is None else "`awe retrain`"
            raise AweError(f"{self.model_dir}: row(s) {', '.join(missing)} need {step} first")

    # -- scores
    @torch.no_grad()
    def scores(self, examples: Examples, rows: np.ndarray, kind: str) -> torch.Tensor:
        """Scores of every label for ``rows`` of ``examples`` under ``kind``: [B, L]."""
        if kind == "wsabie":
            return self.wsabie.all_scores(self.wsabie.embed(batch_inputs(examples, rows,
                                                                         self.device)))
        if kind == "knn-input":
            g = self.input_affinity().rows_affinity(examples, rows)
            return g.to_dense(self.n_labels, self.device)
        if kind == "knn-wsabie" and self.wsabie_affinity() is not self.affinity:
            g = self.wsabie_affinity().rows_affinity(examples, rows)
            return g.to_dense(self.n_labels, self.device)
        if kind == "knn-wsabie":
            return self.affinity_rows(examples, rows).to_dense(self.n_labels, self.device)
        if kind == "awe":
            return self._awe_scores(self.affinity_rows(examples, rows),
                                    self.awe.embed(batch_inputs(examples, rows, self.device)))
        raise AweError(f"unknown row {kind!r}: choose from {', '.join(ROWS)}")

    def _awe_scores(self, g: Csr, e: torch.Tensor) -> torch.Tensor:
        return awe_ranking_scores(g.to_dense(self.n_labels, self.device) + self.awe.bias,
                                  self.awe.all_scores_plain(e))

    @torch.no_grad()
    def ranking_scores(self, examples: Examples, rows: np.ndarray, kind: str,
                       k: int | None = None):
        """What ranks ``rows`` under ``kind``: :meth:`scores`, or the
        :class:`~awe.evaluate.CandidateScores` of the same ranking from a few labels a row:
        for ``awe`` with b = 0 G's labels, for ``wsabie`` with ``k`` (on CPUs with bfloat16
        products) the labels that can be in the top k (:mod:`awe.screen`; valid for any top k'
        <= k, with ``examples``' exclusions)."""
        if kind == "wsabie" and k is not None and self.screen:
            e = self.wsabie.embed(batch_inputs(examples, rows, self.device))
            exclude = None if examples.exclude is None else examples.exclude.take(rows)
            found = screen_lib.screened_scores(e, self._screen_table(), k, exclude,
                                           lambda short: self.wsabie.all_scores(e[short]))
            return self.wsabie.all_scores(e) if found is None else found
        if kind != "awe":
            return self.scores(examples, rows, kind)
        e = self.awe.embed(batch_inputs(examples, rows, self.device))
        g = self.affinity_rows(examples, rows)
        candidates = self.awe.candidate_scores(e, torch.from_numpy(np.asarray(rows)), g)
        if candidates is None:
            return self._awe_scores(g, e)
        if k is not None and self.screen:
            # rows with fewer than k G labels: the others by stage 3's plain score, screened
            # (the table is built on the first short row: ~50 ms at L = 21,000)
            candidates.rest = lambda at, exclude, k_rest: screen_lib.screened_after_candidates(
                e.index_select(0, at), self._screen_table("awe"),
                candidates.ids.index_select(0, at),
                candidates.values.index_select(0, at), exclude, k_rest,
                lambda where: candidates.dense(at.index_select(0, where)))
        return candidates

    def _screen_table(self, stage: str = "wsabie") -> screen_lib.ScreenTable:
        """The bfloat16 copy of a stage's labels [V | beta] (:mod:`awe.screen`), once."""
        if stage not in self._screens:
            model = self.wsabie if stage == "wsabie" else self.awe
            self._screens[stage] = screen_lib.ScreenTable(model.V.weight, model.label_bias)
        return self._screens[stage]

    def affinity_rows(self, examples: Examples, rows: np.ndarray) -> Csr:
        """G of a batch (the last batch is cached: knn-wsabie and awe share it)."""
        cached = self._g_cache
        if cached is None or cached[0] is not examples or not np.array_equal(cached[1], rows):
            # holding ``examples`` keeps its identity unique while it is cached
            self._g_cache = cached = (examples, np.array(rows),
                                      self.affinity.rows_affinity(examples, rows))
        return cached[2]

    def input_affinity(self):
        """The knn-input baseline: the same kernel and aggregation over input-space neighbours."""
        return self._baseline_affinity("input")

    def wsabie_affinity(self):
        """The knn-wsabie baseline: G over stage-1 (Wsabie) embedding neighbours. It is the
        stage-2 G itself unless that was built in input space (``--space input``) or from a
        later round's U' (``awe retrain --rounds``)."""
        return self._baseline_affinity("wsabie")

    def _baseline_affinity(self, space: str):
        if self.affinity.config.space == space and (space == "input" or self._stage1_space()):
            return self.affinity
        if space not in self._baselines:
            import tempfile


            row = f"knn-{space}"
            if not self.train_path:
                raise AweError(f"the {row} row searches the training rows: pass --train TRAIN")
            # exact search, whatever the size: the paper's kNN rows are exact kNN, and the
            # queries are the evaluated rows only (an IVF build over 300k x 474 inputs cost
            # more than exact search of 10k test rows; docs/method.md)
            config = replace(self.affinity.config, space=space, label_kernel="exact",
                             lam=None, index="flat", nprobe=None, ef_search=None)
            embed_u = None
            if space == "wsabie":
                embed_u = self.wsabie.u_matrix().detach().cpu().clone()
            # streamed: memory holds the rows' vectors (memory-mapped beyond 1 GiB, in a scratch
            # directory outside the model) and the index, never the loaded training rows too
            with tempfile.TemporaryDirectory(prefix="awe-knn-") as scratch:
                try:
                    self._baselines[space], _, _ = build_affinity_streamed(
                        self.train_path, self.schema, self.vocab, config, embed_u, None,
                        Path(scratch), train_g=False, holdout=self._holdout())
                except AweError as exc:
                    raise AweError(f"the {row} row searches the training rows: {exc}; pass "
                                   f"--train TRAIN") from exc
        return self._baselines[space]

    def _holdout(self):
        """The validation rows G leaves out, which the baselines leave out too (same rows
        searched as the awe row's G), when they search the rows G was built from."""
        stage2 = self.card.stage2
        if stage2 is None or str(self.train_path) != str(stage2.train_path):
            return None
        return validation_holdout(self.card, built=True)

    def _stage1_space(self) -> bool:
        """Whether the stage-2 G searches stage 1's embedding (after a further round of
        `awe retrain` it searches U', which the knn-wsabie row must not)."""
        embed_u = self.affinity.embed_u
        return embed_u is not None and torch.equal(embed_u,
                                                   self.wsabie.u_matrix().detach().cpu())

    # -- top k
    @torch.no_grad()
    def predict_table(self, examples: Examples, k: int = 10, kind: str | None = None,
                      batch_rows: int = 2048):
        """Top-k labels of every row as a pyarrow Table: ``id`` (if present), ``labels``,
        ``scores`` (list<float32>, best first). The row's ``exclude`` labels are never ranked."""
        import pyarrow as pa


        kind = kind or self.newest()
        self.check_rows([kind])
        if k < 1:
            raise invalid("k", "must be >= 1")
        id_parts, score_parts, lengths = [], [], []
        for _, ids, values in ranked_batches(
                lambda ex, rows: self.ranking_scores(ex, rows, kind, k), examples, k,
                batch_rows):
            ids, values = ids.cpu().numpy(), values.cpu().numpy()
            found = ids >= 0
            id_parts.append(ids[found])
            score_parts.append(values[found].astype(np.float32))
            lengths.append(found.sum(1))
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
        flat_ids = np.concatenate(id_parts) if id_parts else np.zeros(0, dtype=np.int64)
        # the names are gathered in arrow, not as Python objects: millions of strings a second
        flat_labels = self.vocab.array.take(pa.array(flat_ids))
        columns = {
            "labels": pa.ListArray.from_arrays(offsets, flat_labels),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(
                np.concatenate(score_parts) if score_parts else np.zeros(0, np.float32))),
        }
        if examples.ids is not None:
            columns = {"id": examples.ids, **columns}
        return pa.table(columns)
