"""A model directory's weights: save and load stage 1 and stage 3 (safetensors, never pickle)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from awe import artifacts
from awe.errors import AweError
from awe.io.reader import InputSchema, LabelVocab
from awe.models.affinity_wsabie import AffinityWsabie
from awe.models.wsabie import ModelShape, Wsabie

# ----------------------------------------------------------------------------- persistence


@dataclass
class SavedModel:
    """A trained stage-1 model with everything needed to read data for it."""

    model: Wsabie
    schema: InputSchema
    vocab: LabelVocab
    config: dict


def save_wsabie(model_dir: str | Path, model: Wsabie, schema: InputSchema, vocab: LabelVocab,
                train_config: dict, extra: dict | None = None, holdout: dict | None = None,
                ) -> list[Path]:
    """Write labels.json, wsabie.safetensors and config.json (last: it marks the model complete).
    ``holdout``: the validation rows carved from the training rows (:class:`awe.io.holdout.
    Holdout`), recorded in the stage1 section for the later stages."""
    model_dir = Path(model_dir)
    config = {
        "format_version": artifacts.FORMAT_VERSION,
        "schema": schema.to_dict(),
        "n_labels": len(vocab),
        "label_kind": vocab.kind,
        "stage1": {"model": asdict(model.shape), "label_bias": model.label_bias is not None,
                   "train": train_config, **({"holdout": holdout} if holdout else {})},
        "versions": artifacts.library_versions(),
        **(extra or {}),
    }
    fingerprint = config_fingerprint(config["stage1"])
    config["stage1"]["fingerprint"] = fingerprint
    with artifacts.staged(model_dir) as stage:
        artifacts.write_json(stage / artifacts.LABELS, vocab.labels)
        artifacts.write_tensors(stage / artifacts.WSABIE_WEIGHTS, model.state_tensors(),
                                {"fingerprint": fingerprint})
        artifacts.write_json(stage / artifacts.CONFIG, config)
    return [model_dir / artifacts.LABELS, model_dir / artifacts.WSABIE_WEIGHTS,
            model_dir / artifacts.CONFIG]


def config_fingerprint(stage_config: dict) -> str:
    text = json.dumps(stage_config, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_wsabie(model_dir: str | Path) -> SavedModel:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise AweError(f"{model_dir}: no such model directory; train one with `awe train`")
    config = artifacts.read_json(model_dir / artifacts.CONFIG)
    if not isinstance(config, dict):
        raise AweError(f"{model_dir / artifacts.CONFIG}: incomplete or damaged (not a JSON "
                       f"object); retrain")
    try:
        version = int(config.get("format_version", 0))
        if version > artifacts.FORMAT_VERSION:
            raise AweError(f"{model_dir}: written by a newer awe (format {version}); upgrade awe")
        schema = InputSchema.from_dict(config["schema"])
        shape = ModelShape(**config["stage1"]["model"])
        labels = artifacts.read_json(model_dir / artifacts.LABELS)
        if not isinstance(labels, list) or len(labels) != shape.n_labels:
            raise AweError(f"{model_dir / artifacts.LABELS}: expected {shape.n_labels} labels")
        try:
            vocab = LabelVocab(labels)
        except AweError as exc:
            raise AweError(f"{model_dir / artifacts.LABELS}: {exc}; train the model again") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise AweError(f"{model_dir / artifacts.CONFIG}: incomplete or damaged ({exc})") from exc
    model = Wsabie(shape, label_bias=0.0 if config["stage1"].get("label_bias") else None)
    try:
        tensors = artifacts.read_tensors(model_dir / artifacts.WSABIE_WEIGHTS)
        if model.label_bias is not None and "label_bias" not in tensors:
            raise KeyError("label_bias")
        model.load_tensors(tensors)
    except (KeyError, ValueError) as exc:
        raise AweError(f"{model_dir / artifacts.WSABIE_WEIGHTS}: damaged or from another model "
                       f"({exc}); train the model again") from exc
    model.eval()
    return SavedModel(model, schema, vocab, config)


def save_awe(model_dir: str | Path, model: AffinityWsabie, train_config: dict, extra: dict,
             ) -> list[Path]:
    """Write awe.safetensors, then the stage3 section of config.json (which marks it complete)."""
    model_dir = Path(model_dir)
    config = artifacts.read_json(model_dir / artifacts.CONFIG)
    section = {"model": asdict(model.shape), "bias": model.bias,
               "label_bias": model.label_bias is not None, "train": train_config,
               "stage2_fingerprint": config["stage2"]["fingerprint"], **extra}
    section["fingerprint"] = config_fingerprint(section)
    if config.pop("stage3", None) is not None:
        # the old stage 3 leaves config.json before its weights are replaced: a kill in between
        # leaves a model without stage 3, never a config.json naming weights it does not match
        artifacts.write_json(model_dir / artifacts.CONFIG, config)
    artifacts.write_tensors(model_dir / artifacts.AWE_WEIGHTS, model.state_tensors(),
                            {"fingerprint": section["fingerprint"]})
    config["stage3"] = section
    artifacts.write_json(model_dir / artifacts.CONFIG, config)
    return [model_dir / artifacts.AWE_WEIGHTS, model_dir / artifacts.CONFIG]


def load_awe(model_dir: str | Path, config: dict) -> AffinityWsabie:
    """The stage-3 model of a directory (G is bound later, per set of rows)."""
    model_dir = Path(model_dir)
    section = config.get("stage3")
    if section is None:
        raise AweError(f"{model_dir}: no stage-3 (AWE) model; run `awe build-g` and "
                       f"`awe retrain` first")
    if section.get("stage2_fingerprint") != config.get("stage2", {}).get("fingerprint"):
        raise AweError(f"{model_dir}: the AWE model was trained on another G; run `awe retrain`")
    try:
        model = AffinityWsabie(ModelShape(**section["model"]), float(section["bias"]),
                               label_bias=0.0 if section.get("label_bias") else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise AweError(f"{model_dir / artifacts.CONFIG}: the stage3 section is damaged ({exc}); "
                       f"run `awe retrain` again") from exc
    path = model_dir / artifacts.AWE_WEIGHTS
    from safetensors import safe_open

    tensors = artifacts.read_tensors(path)
    with safe_open(str(path), "pt") as fh:
        fingerprint = (fh.metadata() or {}).get("fingerprint")
    if fingerprint != section.get("fingerprint"):
        raise AweError(f"{path}: does not match config.json (an interrupted run?); run "
                       f"`awe retrain` again")
    try:
        model.load_tensors(tensors)
    except (KeyError, ValueError) as exc:
        raise AweError(f"{path}: damaged or from another model ({exc}); run `awe retrain` "
                       f"again") from exc
    model.eval()
    return model
