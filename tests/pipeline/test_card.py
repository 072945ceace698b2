"""The model card (config.json): one writer, one reader, typed sections, old layouts readable."""

import json

import pytest
from typer.testing import CliRunner

from awe.affinity.g import AffinityConfig, AffinitySection
from awe.card import FORMAT_VERSION, AweSection, ModelCard, WsabieSection, read_card
from awe.errors import AweError
from awe.io.reader import InputSchema
from awe.models.saved import load_wsabie
from awe.models.wsabie import ModelShape
from awe.predict.predictor import Predictor
from awe.training.config import TrainConfig
from cli.main import app
from tests.affinity.test_affinity import write_clusters

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    train = write_clusters(root / "train.parquet", 300, 0)
    model = root / "m"
    invoke("train", train, "--model", model, "--epochs", 2, "--dim", 8, "--quiet")
    invoke("build-g", train, "--model", model, "--neighbors", 5, "--index", "flat")
    invoke("retrain", train, "--model", model, "--epochs", 2, "--quiet", "--rounds", 1)
    return model


def test_the_card_reads_back_into_the_stage_types(model):
    card = read_card(model)
    assert isinstance(card, ModelCard) and isinstance(card.schema, InputSchema)
    assert isinstance(card.stage1, WsabieSection) and isinstance(card.stage1.train, TrainConfig)
    assert isinstance(card.stage1.model, ModelShape) and card.stage1.train.epochs == 2
    assert isinstance(card.stage2, AffinitySection)
    assert isinstance(card.stage2.config, AffinityConfig) and card.stage2.config.neighbors == 5
    assert isinstance(card.stage3, AweSection) and card.stage3.round == 1
    assert card.stage3.stage2_fingerprint == card.stage2.fingerprint
    assert card.stage1.fingerprint and card.stage1.fingerprinted() == card.stage1
    assert card.stage3.fingerprinted() == card.stage3
    # the JSON on disk is the card, key for key (the layout of earlier models)
    on_disk = json.loads((model / "config.json").read_text())
    assert card.to_dict() == on_disk
    assert list(on_disk) == ["format_version", "schema", "n_labels", "label_kind", "stage1",
                             "versions", "stage2", "stage3"]
    assert on_disk["format_version"] == FORMAT_VERSION


def test_a_config_json_in_an_older_layout_still_loads(model, tmp_path):
    """Before format_version, label_kind and versions, with ModelShape without input_norm and
    a train section with a key this version does not know."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(model, old)
    config = json.loads((old / "config.json").read_text())
    for key in ("format_version", "label_kind", "versions"):
        del config[key]
    del config["stage1"]["model"]["input_norm"]
    config["stage1"]["train"]["retired_option"] = 3
    (old / "config.json").write_text(json.dumps(config))
    card = read_card(old)
    assert card.stage1.model.input_norm == 1.0 and card.stage1.train.dim == 8
    assert card.stage1.fingerprint == config["stage1"]["fingerprint"]
    saved = load_wsabie(old)
    assert saved.card.stage1.label_bias == config["stage1"]["label_bias"]
    assert Predictor(old).available() == ["knn-input", "knn-wsabie", "wsabie", "awe"]


def test_damaged_sections_name_the_command_that_rewrites_them(model, tmp_path):
    import shutil

    for section, command in (("stage2", "awe build-g"), ("stage3", "awe retrain")):
        copy = tmp_path / section
        shutil.copytree(model, copy)
        config = json.loads((copy / "config.json").read_text())
        del config[section]["config" if section == "stage2" else "model"]
        (copy / "config.json").write_text(json.dumps(config))
        with pytest.raises(AweError, match=f"{section} section is damaged.*{command}"):
            read_card(copy)
