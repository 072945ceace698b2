"""A model directory's weights: save and load stage 1 and stage 3 (safetensors, never pickle)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from safetensors import safe_open

from awe import artifacts
from awe.card import AweSection, ModelCard, WsabieSection, new_card, read_card, write_card
from awe.errors import AweError
from awe.io.reader import InputSchema, LabelVocab
from awe.models.affinity_wsabie import AffinityWsabie
from awe.models.wsabie import Wsabie
from awe.training.config import TrainConfig

# ----------------------------------------------------------------------------- persistence


@dataclass
class SavedModel:
    """A trained stage-1 model with everything needed to read data for it."""

    model: Wsabie
    schema: InputSchema
    vocab: LabelVocab
    card: ModelCard


def save_wsabie(model_dir: str | Path, model: Wsabie, schema: InputSchema, vocab: LabelVocab,
                train: TrainConfig, holdout: dict | None = None) -> list[Path]:
    """Write labels.json, wsabie.safetensors and config.json (last: it marks the model complete).
    ``holdout``: the validation rows carved from the training rows (:class:`awe.io.holdout.
    Holdout`), recorded in the stage1 section for the later stages."""
    model_dir = Path(model_dir)
    card = new_card(schema, len(vocab), vocab.kind,
                    WsabieSection(model.shape, model.label_bias is not None, train,
                                  holdout=holdout))
    with artifacts.staged(model_dir) as stage:
        artifacts.write_json(stage / artifacts.LABELS, vocab.labels)
        artifacts.write_tensors(stage / artifacts.WSABIE_WEIGHTS, model.state_tensors(),
                                {"fingerprint": card.stage1.fingerprint})
        write_card(stage, card)
    return [model_dir / artifacts.LABELS, model_dir / artifacts.WSABIE_WEIGHTS,
            model_dir / artifacts.CONFIG]


def load_wsabie(model_dir: str | Path) -> SavedModel:
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    shape = card.stage1.model
    labels = artifacts.read_json(model_dir / artifacts.LABELS)
    if not isinstance(labels, list) or len(labels) != shape.n_labels:
        raise AweError(f"{model_dir / artifacts.LABELS}: expected {shape.n_labels} labels")
    try:
        vocab = LabelVocab(labels)
    except AweError as exc:
        raise AweError(f"{model_dir / artifacts.LABELS}: {exc}; train the model again") from exc
    model = Wsabie(shape, label_bias=0.0 if card.stage1.label_bias else None)
    try:
        tensors = artifacts.read_tensors(model_dir / artifacts.WSABIE_WEIGHTS)
        if model.label_bias is not None and "label_bias" not in tensors:
            raise KeyError("label_bias")
        model.load_tensors(tensors)
    except (KeyError, ValueError) as exc:
        raise AweError(f"{model_dir / artifacts.WSABIE_WEIGHTS}: damaged or from another model "
                       f"({exc}); train the model again") from exc
    model.eval()
    return SavedModel(model, card.schema, vocab, card)


def save_awe(model_dir: str | Path, model: AffinityWsabie, train: TrainConfig, *, init: str,
             rounds: str, round_no: int, label_bias_init: float | None) -> list[Path]:
    """Write awe.safetensors, then the stage3 section of config.json (which marks it complete)."""
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    section = AweSection(model.shape, model.bias, model.label_bias is not None, train,
                         card.stage2.fingerprint, init, rounds, round_no,
                         label_bias_init).fingerprinted()
    if card.stage3 is not None:
        # the old stage 3 leaves config.json before its weights are replaced: a kill in between
        # leaves a model without stage 3, never a config.json naming weights it does not match
        card = replace(card, stage3=None)
        write_card(model_dir, card)
    artifacts.write_tensors(model_dir / artifacts.AWE_WEIGHTS, model.state_tensors(),
                            {"fingerprint": section.fingerprint})
    write_card(model_dir, replace(card, stage3=section))
    return [model_dir / artifacts.AWE_WEIGHTS, model_dir / artifacts.CONFIG]


def load_awe(model_dir: str | Path, card: ModelCard) -> AffinityWsabie:
    """The stage-3 model of a directory (G is bound later, per set of rows)."""
    model_dir = Path(model_dir)
    section = card.stage3
    if section is None:
        raise AweError(f"{model_dir}: no stage-3 (AWE) model; run `awe build-g` and "
                       f"`awe retrain` first")
    if card.stage2 is None or section.stage2_fingerprint != card.stage2.fingerprint:
        raise AweError(f"{model_dir}: the AWE model was trained on another G; run `awe retrain`")
    model = AffinityWsabie(section.model, section.bias,
                           label_bias=0.0 if section.label_bias else None)
    path = model_dir / artifacts.AWE_WEIGHTS
    tensors = artifacts.read_tensors(path)
    with safe_open(str(path), "pt") as fh:
        fingerprint = (fh.metadata() or {}).get("fingerprint")
    if fingerprint != section.fingerprint:
        raise AweError(f"{path}: does not match config.json (an interrupted run?); run "
                       f"`awe retrain` again")
    try:
        model.load_tensors(tensors)
    except (KeyError, ValueError) as exc:
        raise AweError(f"{path}: damaged or from another model ({exc}); run `awe retrain` "
                       f"again") from exc
    model.eval()
    return model
