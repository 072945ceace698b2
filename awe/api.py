"""The Python API: one object for the three stages, on parquet paths or in-memory tables.

    from awe import AWE
    model = AWE(dim=128, neighbors=20).fit("train.parquet")
    model.evaluate("test.parquet")          # {"knn-input": {...}, ..., "awe": {"P@1": ...}}
    model.predict(frame, k=10)              # pandas DataFrame: id, labels, scores
    model.score("rows/", k=10)              # the same from the streaming scorer (awe score)
    model.score_files("rows/", "scored/")   # one scored parquet per input file
    model.save("model/"); AWE.load("model/")

The CLI and this class call the same library functions (train_wsabie, build_g, retrain_awe,
evaluate_model, Predictor); a model directory written by one is read by the other.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

from awe.affinity.g import AffinityConfig
from awe.affinity.stage import build_g
from awe.dask_cluster import ClusterOptions
from awe.errors import AweError
from awe.io.reader import load_examples
from awe.pipeline import retrain_awe, train_wsabie
from awe.predict.batch import SCORE_BATCH_ROWS, ScoreOptions, score_files, score_table
from awe.predict.evaluation import evaluate_model
from awe.predict.predictor import Predictor
from awe.training.config import LABEL_BIAS_DEFAULT, STAGE3_DEFAULTS, TrainConfig, with_overrides

_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
_AFFINITY_FIELDS = {f.name for f in fields(AffinityConfig)}
# options both training stages take when given once (stage 3 inherits them)
_SHARED = {"seed", "threads", "device", "negatives", "margin", "rank_weight", "optimizer",
           "valid_fraction", "patience", "valid_k", "task", "batch_size", "refit"}


class AWE:
    """Affinity Weighted Embedding: Wsabie (stage 1) -> G (stage 2) -> reweighted (stage 3).

    Keyword options go to the stage they name: any :class:`TrainConfig` field (dim, epochs, lr,
    ...) to stage 1, any :class:`AffinityConfig` field (neighbors, kernel, aggregate, ...) to
    stage 2; ``retrain`` (a dict of TrainConfig fields) overrides stage 3, which otherwise takes
    the shared options (seed, threads, negatives, ...) and the stage-3 defaults.
    ``label_bias`` starts stage 3's beta (None: the paper's model); ``wsabie_label_bias``
    learns a per-label offset in stage 1 (False: the paper's Wsabie; "auto": for annotation).
    """

    def __init__(self, *, retrain: dict | None = None, init: str = "wsabie",
                 rounds: int | str = "auto",
                 label_bias: float | None = LABEL_BIAS_DEFAULT,
                 wsabie_label_bias: bool | str = "auto", **options):
        unknown = set(options) - _TRAIN_FIELDS - _AFFINITY_FIELDS
        if unknown:
            raise AweError(f"unknown option(s) {', '.join(sorted(unknown))}")
        self.train_config = TrainConfig(**{k: v for k, v in options.items()
                                           if k in _TRAIN_FIELDS})
        self.affinity_config = AffinityConfig(**{k: v for k, v in options.items()
                                                 if k in _AFFINITY_FIELDS})
        self.retrain_config = with_overrides(
            STAGE3_DEFAULTS, **{k: v for k, v in options.items() if k in _SHARED},
            **(retrain or {}))
        self.init, self.rounds, self.label_bias = init, rounds, label_bias
        self.wsabie_label_bias = wsabie_label_bias
        self.model_dir: Path | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._predictor = None

    # -- training
    def fit(self, train, valid=None, model_dir=None, progress: bool = False) -> AWE:
        """Run the three stages on ``train`` (a parquet path, a pandas DataFrame or a pyarrow
        Table) and write the model directory (``model_dir``, else a temporary one)."""
        self.model_dir = Path(model_dir) if model_dir else self._temporary_dir()
        self.model_dir.mkdir(parents=True, exist_ok=True)
        train_path = self._as_path(train, self.model_dir / "train.parquet")
        valid_path = None if valid is None else self._as_path(valid,
                                                              self._scratch() / "valid.parquet")
        train_wsabie(train_path, self.model_dir, self.train_config, valid_path=valid_path,
                     progress=progress, label_bias=self.wsabie_label_bias)
        build_g(train_path, self.model_dir, self.affinity_config)
        retrain_awe(train_path, self.model_dir, self.retrain_config, init=self.init,
                    rounds=self.rounds, label_bias=self.label_bias, valid_path=valid_path,
                    progress=progress)
        self._predictor = None
        return self

    # -- use
    def evaluate(self, test, ks=(1, 3, 10), rows=None) -> dict[str, dict[str, float]]:
        """P@k, R@k, NDCG@k, MAP@k of each row of the paper's table (default: all)."""

        path = self._as_path(test, self._scratch() / "test.parquet")
        return evaluate_model(self._require_dir(), path, list(ks), rows=rows)

    def predict(self, rows, k: int = 10, stage: str | None = None):
        """Top-k labels for ``rows`` (path, DataFrame or Table) as a pandas DataFrame with the
        ``id`` column (when present), ``labels`` and ``scores``; ``stage``: wsabie | awe."""

        predictor = self.predictor()
        path = self._as_path(rows, self._scratch() / "predict.parquet")
        examples = load_examples(path, predictor.schema, predictor.vocab, require_labels=False)
        return predictor.predict_table(examples, k, stage).to_pandas()

    def score(self, rows, k: int = 10, stage: str | None = None,
              id_cols: list[str] | None = None, exclude_col: str | None = None,
              batch_rows: int | None = None):
        """Top-k labels of ``rows`` (a parquet path, directory or glob, a DataFrame or a pyarrow
        Table) with the streaming scorer of ``awe score``, as a pandas DataFrame in input order:
        the id column(s) (default: ``id`` when present), ``labels``, ``scores``. Rows without
        labels are fine; ``exclude_col`` lists labels never ranked for the row. An invalid row
        raises :class:`~awe.errors.DataError` (``score_files`` can set such rows aside)."""
        import pyarrow as pa


        options = ScoreOptions(k=k, stage=stage, id_cols=tuple(id_cols) if id_cols else None,
                               exclude_col=exclude_col,
                               batch_rows=batch_rows or SCORE_BATCH_ROWS)
        if not isinstance(rows, (str, Path, pa.Table)):
            rows = pa.Table.from_pandas(rows, preserve_index=False)
        return score_table(self._require_dir(), rows, options,
                           predictor=self.predictor()).to_pandas()

    def score_files(self, input_path, out, *, k: int = 10, stage: str | None = None,
                    id_cols: list[str] | None = None, exclude_col: str | None = None,
                    skip_invalid: bool = False, overwrite: bool = False,
                    batch_rows: int | None = None, threads: int | None = None,
                    scheduler: str | None = None, workers: int | None = None):
        """``awe score``: stream ``input_path`` (file, directory, glob) into scored parquet under
        ``out`` (resumable; on Dask with ``scheduler`` or ``workers``); returns what was
        written and skipped (:class:`awe.scoring.ScoreSummary`)."""

        options = ScoreOptions(k=k, stage=stage, id_cols=tuple(id_cols) if id_cols else None,
                               exclude_col=exclude_col, skip_invalid=skip_invalid,
                               overwrite=overwrite, batch_rows=batch_rows or SCORE_BATCH_ROWS,
                               threads=threads)
        return score_files(input_path, self._require_dir(), out, options,
                           cluster=ClusterOptions.from_options(scheduler, workers))

    def predictor(self):

        if self._predictor is None:
            self._predictor = Predictor(self._require_dir())
        return self._predictor

    # -- persistence
    def save(self, model_dir) -> Path:
        """Copy the model directory to ``model_dir`` (config, weights, index, G)."""
        target = Path(model_dir)
        source = self._require_dir()
        if target.resolve() != source.resolve():
            shutil.copytree(source, target, dirs_exist_ok=True)
        return target

    @classmethod
    def load(cls, model_dir) -> AWE:
        model = cls()
        model.model_dir = Path(model_dir)
        model.predictor()  # validates the directory now, not at first use
        return model

    # -- helpers
    def _require_dir(self) -> Path:
        if self.model_dir is None:
            raise AweError("the model is not trained: call fit() or AWE.load(dir) first")
        return self.model_dir

    def _temporary_dir(self) -> Path:
        self._tmp = tempfile.TemporaryDirectory(prefix="awe-")
        return Path(self._tmp.name) / "model"

    def _scratch(self) -> Path:
        if not hasattr(self, "_scratch_dir"):
            self._scratch_dir = tempfile.TemporaryDirectory(prefix="awe-io-")
        return Path(self._scratch_dir.name)

    @staticmethod
    def _as_path(data, where: Path):
        """A path stays a path; a DataFrame or Table is written to ``where`` as parquet."""
        if isinstance(data, (str, Path)):
            return data
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(
            data, preserve_index=False)
        where.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, where)
        return where
