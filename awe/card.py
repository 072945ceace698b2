"""The model card: a model directory's ``config.json`` as one typed record.

The card holds the data schema, the label vocabulary's size and kind, every stage's configuration
as the type that stage runs with (stage 1 and 3: :class:`~awe.training.config.TrainConfig` and
:class:`~awe.models.wsabie.ModelShape`; stage 2: :class:`~awe.affinity.g.AffinitySection` with
its :class:`~awe.affinity.g.AffinityConfig`), the library versions, and the fingerprints that tie
each stage to its weight files and to the stage it was built on. :func:`write_card` is the one
writer of config.json and :func:`read_card` the one reader; config.json is written last (it
marks what is complete) and its JSON layout is that of every model written before.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from awe import artifacts
from awe.affinity.g import AffinitySection
from awe.errors import AweError
from awe.io.reader import InputSchema
from awe.models.wsabie import ModelShape
from awe.training.config import TrainConfig

FORMAT_VERSION = 1


def _shape(d: dict) -> ModelShape:
    names = {f.name for f in fields(ModelShape)}
    return ModelShape(**{k: v for k, v in d.items() if k in names})


class _Fingerprinted(ABC):
    """A stage's section whose ``fingerprint`` is the digest of its other fields (the weights
    file carries the same value, which ties the two together)."""

    fingerprint: str

    def to_dict(self) -> dict:
        d = self._fields()
        return {**d, "fingerprint": self.fingerprint} if self.fingerprint else d

    def fingerprinted(self):
        return replace(self, fingerprint=artifacts.json_digest(
            replace(self, fingerprint="").to_dict()))

    @abstractmethod
    def _fields(self) -> dict:
        """The section's fields as config.json holds them, the fingerprint aside."""


@dataclass(frozen=True)
class WsabieSection(_Fingerprinted):
    """Stage 1: the model's shape, whether it learns a per-label offset, how it was trained."""

    model: ModelShape
    label_bias: bool
    train: TrainConfig
    fingerprint: str = ""  # of the fields above; also in wsabie.safetensors' metadata
    # the validation rows carved from the training rows (awe.io.holdout.Holdout.to_dict), which
    # no stage trains on; None: no validation rows
    holdout: dict | None = None

    def _fields(self) -> dict:
        d = {"model": asdict(self.model), "label_bias": self.label_bias,
             "train": self.train.to_dict()}
        if self.holdout:
            d["holdout"] = self.holdout
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WsabieSection:
        return cls(_shape(d["model"]), bool(d.get("label_bias", False)),
                   TrainConfig.from_dict(d["train"]), d.get("fingerprint", ""),
                   d.get("holdout"))


@dataclass(frozen=True)
class AweSection(_Fingerprinted):
    """Stage 3: the model's shape and b, how it was trained (and from what: ``init``, the
    round kept of ``rounds``), and the fingerprint of the G it was trained on."""

    model: ModelShape
    bias: float
    label_bias: bool
    train: TrainConfig
    stage2_fingerprint: str
    init: str | None = None
    rounds: str | None = None
    round: int | None = None
    label_bias_init: float | None = None
    fingerprint: str = ""  # of the fields above; also in awe.safetensors' metadata

    def _fields(self) -> dict:
        return {"model": asdict(self.model), "bias": self.bias, "label_bias": self.label_bias,
                "train": self.train.to_dict(), "stage2_fingerprint": self.stage2_fingerprint,
                "init": self.init, "rounds": self.rounds, "round": self.round,
                "label_bias_init": self.label_bias_init}

    @classmethod
    def from_dict(cls, d: dict) -> AweSection:
        return cls(_shape(d["model"]), float(d["bias"]), bool(d.get("label_bias", False)),
                   TrainConfig.from_dict(d["train"]), d.get("stage2_fingerprint"),
                   d.get("init"), d.get("rounds"), d.get("round"), d.get("label_bias_init"),
                   d.get("fingerprint", ""))


@dataclass(frozen=True)
class ModelCard:
    """Everything config.json says, typed; ``stage2`` and ``stage3`` once built."""

    schema: InputSchema
    n_labels: int
    label_kind: str  # "string" or "int"
    stage1: WsabieSection
    versions: dict[str, str]
    stage2: AffinitySection | None = None
    stage3: AweSection | None = None

    def to_dict(self) -> dict:
        d = {"format_version": FORMAT_VERSION, "schema": self.schema.to_dict(),
             "n_labels": self.n_labels, "label_kind": self.label_kind,
             "stage1": self.stage1.to_dict(), "versions": self.versions}
        if self.stage2 is not None:
            d["stage2"] = self.stage2.to_dict()
        if self.stage3 is not None:
            d["stage3"] = self.stage3.to_dict()
        return d

    def stage1_only(self) -> ModelCard:
        """The card without G and stage 3 (while their files are replaced)."""
        return replace(self, stage2=None, stage3=None)

    @classmethod
    def from_dict(cls, d: dict, path: Path) -> ModelCard:
        """The card of config.json ``d`` (read from ``path``); a damaged section is an
        :class:`AweError` naming the file and the command that writes it again."""
        try:
            card = cls(InputSchema.from_dict(d["schema"]), int(d["n_labels"]),
                       str(d.get("label_kind", "string")), WsabieSection.from_dict(d["stage1"]),
                       dict(d.get("versions") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise AweError(f"{path}: incomplete or damaged ({exc})") from exc
        for name, section, command in (("stage2", AffinitySection, "awe build-g"),
                                       ("stage3", AweSection, "awe retrain")):
            if d.get(name) is not None:
                try:
                    card = replace(card, **{name: section.from_dict(d[name])})
                except (KeyError, TypeError, ValueError) as exc:
                    raise AweError(f"{path}: the {name} section is damaged ({exc}); run "
                                   f"`{command}` again") from exc
        return card


def new_card(schema: InputSchema, n_labels: int, label_kind: str,
             stage1: WsabieSection) -> ModelCard:
    """The card of a freshly trained stage-1 model (fingerprinted, with this run's versions)."""
    return ModelCard(schema, n_labels, label_kind, stage1.fingerprinted(),
                     artifacts.library_versions())


def write_card(directory: str | Path, card: ModelCard) -> Path:
    """Write ``directory``/config.json (atomically); returns its path."""
    path = Path(directory) / artifacts.CONFIG
    artifacts.write_json(path, card.to_dict())
    return path


def read_card(model_dir: str | Path) -> ModelCard:
    """The card of a model directory; a missing directory, a damaged config.json or one of a
    newer format is an :class:`AweError` saying what to do."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise AweError(f"{model_dir}: no such model directory; train one with `awe train`")
    path = model_dir / artifacts.CONFIG
    d = artifacts.read_json(path)
    if not isinstance(d, dict):
        raise AweError(f"{path}: incomplete or damaged (not a JSON object); retrain")
    try:
        version = int(d.get("format_version", 0))
    except (TypeError, ValueError) as exc:
        raise AweError(f"{path}: incomplete or damaged ({exc})") from exc
    if version > FORMAT_VERSION:
        raise AweError(f"{model_dir}: written by a newer awe (format {version}); upgrade awe")
    return ModelCard.from_dict(d, path)
