"""The Python API: one estimator for the three stages, in scikit-learn / implicit conventions.

    from awe import AWE
    model = AWE(dim=128, neighbors=20).fit("train.parquet")
    model.evaluate("test.parquet")            # {"knn-input": {...}, ..., "awe": {"P@1": ...}}
    model.predict(rows, k=10)                 # pandas DataFrame: id, labels, scores
    model.score_files("rows/", "scored/")     # one scored parquet per input file
    model.save("model/"); AWE.load("model/")

Inputs (``fit``, ``evaluate``, ``predict``, ``recommend``, ``embed``): a parquet path (file,
directory or glob), a pandas DataFrame or pyarrow Table in the data contract, or a numpy matrix
(dense features) or scipy.sparse matrix (sparse features) with ``y``, one list of labels a row.

Every hyper-parameter is a keyword argument named as the CLI flag (``dim`` is ``--dim``): the
fields of :class:`~awe.training.config.TrainConfig` set stage 1, those of
:class:`~awe.affinity.g.AffinityConfig` stage 2; stage 3 inherits stage 1's sampling and
validation options and takes its own from ``retrain`` (a dict of TrainConfig fields).
"""

from __future__ import annotations

import difflib
import inspect
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from awe.affinity.g import AffinityConfig
from awe.dask_cluster import ClusterOptions
from awe.errors import AweError
from awe.io.reader import load_examples, resolve_files
from awe.models.wsabie import batch_inputs
from awe.options import config_fields, field_help
from awe.pipeline import fit_pipeline, stage3_config
from awe.predict.batch import SCORE_BATCH_ROWS, ScoreOptions, score_files, score_table
from awe.predict.evaluation import evaluate_model
from awe.predict.predictor import Predictor
from awe.training.config import (
    INITS,
    LABEL_BIAS_DEFAULT,
    LABEL_BIAS_START_HELP,
    SEARCH_BUDGET,
    SEARCH_BUDGET_HELP,
    STAGE3_ONLY,
    TrainConfig,
)

_STAGE1 = [f.name for f in config_fields(TrainConfig) if f.name not in STAGE3_ONLY]
# seed and threads are stage 1's and serve every stage
_STAGE2 = [f.name for f in config_fields(AffinityConfig) if f.name not in ("seed", "threads")]
# the options of the three-stage run that no config holds: name -> (default, help)
_RUN = {
    "label_bias": ("auto", "Stage 1's per-label offset beta_y: 'auto' (on for annotation), "
                           "True, or False (the paper's Wsabie)."),
    "label_bias_start": (LABEL_BIAS_DEFAULT, LABEL_BIAS_START_HELP),
    "budget": (SEARCH_BUDGET, SEARCH_BUDGET_HELP),
    "init": ("wsabie", f"Stage 3 starts from stage 1 or at random ({' | '.join(INITS)})."),
    "rounds": ("auto", "build-g -> retrain rounds: an integer, or 'auto' (chosen on "
                       "validation)."),
    "retrain": (None, "Stage 3's own options: a dict of TrainConfig fields (e.g. lr, epochs)."),
}


def _parameters() -> list[inspect.Parameter]:
    stage1, stage2 = TrainConfig(), AffinityConfig()
    params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=getattr(stage1, n))
              for n in _STAGE1]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=getattr(stage2, n))
               for n in _STAGE2]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
               for n, (d, _) in _RUN.items()]
    return params


def _parameter_docs() -> str:
    helps = {f.name: field_help(f) for f in [*config_fields(TrainConfig),
                                             *config_fields(AffinityConfig)]}
    helps.update({n: h for n, (_, h) in _RUN.items()})
    return "\n".join(f"    {p.name} (default {p.default!r}): {helps[p.name]}"
                     for p in _parameters())


class AWE:
    """Affinity Weighted Embedding: Wsabie (stage 1) -> G (stage 2) -> reweighted (stage 3).

    Parameters (keyword only; each is also a CLI flag of `awe fit`):
    """

    def __init__(self, **params):
        names = {p.name for p in _parameters()}
        unknown = sorted(set(params) - names)
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise AweError(f"AWE: unknown parameter(s) {', '.join(unknown)}{hint}; "
                           f"help(awe.AWE) lists the parameters")
        for p in _parameters():
            setattr(self, p.name, params.get(p.name, p.default))
        self._configs()  # a bad value fails here, naming the parameter
        self.model_dir: Path | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._scratch_dir: tempfile.TemporaryDirectory | None = None
        self._predictor: Predictor | None = None

    # -- scikit-learn conventions
    def get_params(self, deep: bool = True) -> dict:
        return {p.name: getattr(self, p.name) for p in _parameters()}

    def set_params(self, **params) -> AWE:
        merged = {**self.get_params(), **params}
        fresh = type(self)(**merged)  # validates
        for name in merged:
            setattr(self, name, getattr(fresh, name))
        return self

    def __repr__(self) -> str:
        changed = [f"{p.name}={getattr(self, p.name)!r}" for p in _parameters()
                   if getattr(self, p.name) != p.default]
        return f"AWE({', '.join(changed)})"

    def _configs(self) -> tuple[TrainConfig, AffinityConfig, TrainConfig]:
        try:
            stage1 = TrainConfig(**{n: getattr(self, n) for n in _STAGE1})
            stage2 = AffinityConfig(**{n: getattr(self, n) for n in _STAGE2},
                                    seed=stage1.seed, threads=stage1.threads)
            retrain = dict(self.retrain or {})
            unknown = sorted(set(retrain) - set(_STAGE1) - set(STAGE3_ONLY))
            if unknown:
                raise AweError(f"retrain: unknown option(s) {', '.join(unknown)}")
            stage3 = stage3_config(stage1, **retrain)
        except TypeError as exc:
            raise AweError(f"AWE: {exc}") from None
        return stage1, stage2, stage3

    # -- training
    def fit(self, X, y=None, *, valid=None, model_dir=None, progress: bool = False) -> AWE:
        """Run the three stages on ``X`` (see the module's inputs; ``y``: label lists when ``X``
        is a matrix) and write the model directory (``model_dir``, else a temporary one)."""
        stage1, stage2, stage3 = self._configs()
        self.model_dir = Path(model_dir) if model_dir else self._temporary_dir()
        self.model_dir.mkdir(parents=True, exist_ok=True)
        train_path = self._as_path(X, y, self.model_dir / "train.parquet", "X")
        valid_path = None if valid is None else self._as_path(valid, None,
                                                              self._scratch() / "valid.parquet",
                                                              "valid")
        fit_pipeline(train_path, self.model_dir, stage1, stage2, stage3,
                     label_bias=self.label_bias, label_bias_start=self.label_bias_start,
                     budget=self.budget, init=self.init, rounds=self.rounds, valid_path=valid_path,
                     progress=progress)
        self._predictor = None
        return self

    # -- use
    def evaluate(self, X, y=None, ks=(1, 3, 10), methods=None) -> dict[str, dict[str, float]]:
        """P@k, R@k, NDCG@k, MAP@k of each method (the paper's table: knn-input, knn-wsabie,
        wsabie, awe; default: all the model has)."""
        path = self._as_path(X, y, self._scratch() / "test.parquet", "X")
        return evaluate_model(self._require_dir(), path, list(ks), rows=methods)

    def predict(self, X, k: int = 10, stage: str | None = None,
                id_cols: list[str] | None = None, exclude_col: str | None = None,
                batch_rows: int = SCORE_BATCH_ROWS) -> pd.DataFrame:
        """Top-k labels of in-memory or on-disk rows, as a pandas DataFrame in input order: the
        id column(s) (default: ``id`` when present), ``labels``, ``scores`` (best first).
        ``exclude_col`` lists labels never ranked for the row; ``stage``: wsabie | awe (default:
        the newest). Files to files: :meth:`score_files`."""
        options = ScoreOptions(k=k, stage=stage, id_cols=tuple(id_cols) if id_cols else None,
                               exclude_col=exclude_col, batch_rows=batch_rows)
        rows = X if isinstance(X, (str, Path)) else self._as_table(X, None, "X")
        return score_table(self._require_dir(), rows, options,
                           predictor=self.predictor()).to_pandas()

    def recommend(self, X, N: int = 10, filter_already_liked: bool = True,
                  stage: str | None = None) -> pd.DataFrame:
        """The N best labels (items) for each row (user), as :meth:`predict`; with
        ``filter_already_liked`` the row's own labels (its known items) are never recommended."""
        table = (pa.concat_tables([pq.read_table(f) for f in resolve_files(X)])
                 if isinstance(X, (str, Path)) else self._as_table(X, None, "X"))
        exclude = None
        if filter_already_liked and "labels" in table.column_names:
            table = table.append_column("_awe_liked", table.column("labels"))
            exclude = "_awe_liked"
        return self.predict(table.drop_columns(["labels"]) if "labels" in table.column_names
                            else table, k=N, stage=stage, exclude_col=exclude)

    def similar_labels(self, label, N: int = 10, stage: str | None = None) -> pd.DataFrame:
        """The N labels whose vectors V_y are nearest ``label``'s by cosine (the newest stage's
        V unless ``stage`` says), as a DataFrame of ``label`` and ``similarity``."""
        predictor = self.predictor()
        ids = predictor.vocab.lookup(pa.array([label]))
        if ids[0] < 0:
            raise AweError(f"similar_labels: label {label!r} is not in the model's vocabulary "
                           f"({len(predictor.vocab)} labels)")
        predictor.check_rows([stage or predictor.newest()])
        model = predictor.awe if (stage or predictor.newest()) == "awe" else predictor.wsabie
        v = model.v_matrix().detach()
        v = torch.nn.functional.normalize(v, dim=1)
        similarity = v @ v[int(ids[0])]
        similarity[int(ids[0])] = -float("inf")
        top = torch.topk(similarity, min(N, len(similarity) - 1))
        return pd.DataFrame({"label": predictor.vocab.names(top.indices.numpy()),
                             "similarity": top.values.numpy()})

    def embed(self, X, y=None) -> np.ndarray:
        """Stage 1's embedding x U of every row: float32 [rows, dim]."""
        predictor = self.predictor()
        path = self._as_path(X, y, self._scratch() / "embed.parquet", "X")
        examples = load_examples(path, predictor.schema, predictor.vocab, require_labels=False)
        with torch.no_grad():
            e = predictor.wsabie.embed(batch_inputs(examples, np.arange(len(examples))))
        return e.numpy().astype(np.float32)

    def score_files(self, input_path, out, *, k: int = 10, stage: str | None = None,
                    id_cols: list[str] | None = None, exclude_col: str | None = None,
                    skip_invalid: bool = False, overwrite: bool = False,
                    batch_rows: int = SCORE_BATCH_ROWS, threads: int | None = None,
                    scheduler: str | None = None, workers: int | None = None):
        """``awe score``: stream ``input_path`` (file, directory, glob) into scored parquet under
        ``out`` (resumable; on Dask with ``scheduler`` or ``workers``); returns what was
        written and skipped (:class:`awe.predict.batch.ScoreSummary`)."""
        options = ScoreOptions(k=k, stage=stage, id_cols=tuple(id_cols) if id_cols else None,
                               exclude_col=exclude_col, skip_invalid=skip_invalid,
                               overwrite=overwrite, batch_rows=batch_rows, threads=threads)
        return score_files(input_path, self._require_dir(), out, options,
                           cluster=ClusterOptions.from_options(scheduler, workers))

    def predictor(self) -> Predictor:
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
        if self._scratch_dir is None:
            self._scratch_dir = tempfile.TemporaryDirectory(prefix="awe-io-")
        return Path(self._scratch_dir.name)

    @staticmethod
    def _as_table(X, y, argument: str) -> pa.Table:
        """A DataFrame, Table, numpy or scipy.sparse matrix (+ label lists ``y``) as a Table in
        the data contract."""
        if isinstance(X, pa.Table):
            table = X
        elif isinstance(X, pd.DataFrame):
            table = pa.Table.from_pandas(X, preserve_index=False)
        elif isinstance(X, np.ndarray) and X.ndim == 2:
            dense = np.ascontiguousarray(X, dtype=np.float32)
            table = pa.table({"features": pa.FixedSizeListArray.from_arrays(
                pa.array(dense.ravel()), dense.shape[1])})
        elif hasattr(X, "tocsr") and hasattr(X, "shape"):  # scipy.sparse, without importing it
            csr = X.tocsr()
            csr.sort_indices()
            offsets = pa.array(csr.indptr.astype(np.int64))
            table = pa.table({
                "feature_ids": pa.LargeListArray.from_arrays(
                    offsets, pa.array(csr.indices.astype(np.int64))),
                "feature_values": pa.LargeListArray.from_arrays(
                    offsets, pa.array(csr.data.astype(np.float32)))})
        else:
            raise TypeError(f"{argument}: expected a parquet path, a pandas DataFrame, a pyarrow "
                            f"Table, a 2-D numpy array or a scipy.sparse matrix, got "
                            f"{type(X).__name__}")
        if y is not None:
            labels = [list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v] for v in y]
            if len(labels) != table.num_rows:
                raise AweError(f"y: {len(labels)} label lists for {table.num_rows} rows of "
                               f"{argument}")
            table = table.append_column("labels", pa.array(labels))
        return table

    def _as_path(self, X, y, where: Path, argument: str):
        """A path stays a path; anything else is written to ``where`` as parquet."""
        if isinstance(X, (str, Path)):
            if y is not None:
                raise AweError(f"y: labels come from the parquet file {X}'s labels column")
            return X
        table = self._as_table(X, y, argument)
        where.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, where)
        return where


AWE.__signature__ = inspect.Signature(_parameters())
AWE.__init__.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *_parameters()])
AWE.__doc__ += "\n" + _parameter_docs() + "\n"
