"""The artifact contract: the model card round-trips, and an old or malformed card fails once, naming the field."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from handlers.contract import CARD_FILE, SCHEMA_VERSION, CardError, KeyFileError, ModelCard, read_key
from tests.conftest import ROOT, build_mar


def edited(card: ModelCard, edit: Any) -> dict[str, Any]:
    data = copy.deepcopy(card.to_dict())
    edit(data)
    return data


def test_the_card_round_trips_through_json(tiny_card: ModelCard, tmp_path: Path) -> None:
    assert ModelCard.from_dict(json.loads(json.dumps(tiny_card.to_dict()))) == tiny_card
    tiny_card.replace(version="7.1").write(tmp_path)
    again = ModelCard.read(tmp_path)
    assert again.version == "7.1" and again.replace(version=tiny_card.version) == tiny_card
    assert json.loads((tmp_path / CARD_FILE).read_text())["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("schema_version"), r"field 'schema_version' is missing: the card was written before"),
    (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), rf"'schema_version' is {SCHEMA_VERSION + 1}"),
    (lambda d: d.pop("labels"), r"field 'labels' is missing"),
    (lambda d: d.update(format="torchscript"), r"field 'format' is not part of the card"),
    (lambda d: d["input"].update(mean="0.5"), r"field 'input\.mean' must be a list, got str"),
    (lambda d: d["input"].update(mean=[0.5]), r"field 'input\.mean' has 1 values for 3 channels"),
    (lambda d: d["input"].update(shape=[3, 0, 32]), r"field 'input\.shape' must be a non-empty list of positive"),
    (lambda d: d["metrics"]["test"].update(top1="high"), r"field 'metrics\.test\.top1' must be float, got 'high'"),
    (lambda d: d["metrics"]["test"].update(n=True), r"field 'metrics\.test\.n' must be int, got True"),
    (lambda d: d["data"]["spec"].update(test_fraction=0.9), r"field 'data\.spec': val_fraction .* together below 1"),
    (lambda d: d.update(runtime="tensorflow"), r"field 'runtime' is 'tensorflow'; expected one of eager, compile, "
                                               r"torchscript, export, aoti, onnxruntime, openvino, tensorrt, "
                                               r"ensemble$"),
    (lambda d: d.update(precision="int4"), r"field 'precision' is 'int4'; expected one of fp32, bf16, fp16, int8$"),
    (lambda d: d.update(cpu_only=True, cuda_only=True), r"fields 'cpu_only' and 'cuda_only' are both true"),
    (lambda d: d.update(artifact="../model.pt"), r"field 'artifact' must be a file name inside the model directory"),
    (lambda d: d.update(labels=[]), r"field 'labels' is empty"),
])
def test_a_malformed_card_names_the_field(tiny_card: ModelCard, edit: Any, message: str) -> None:
    with pytest.raises(CardError, match=message):
        ModelCard.from_dict(edited(tiny_card, edit))


def test_reading_an_old_card_from_disk_says_where_and_what_to_do(tiny_card: ModelCard, tmp_path: Path) -> None:
    old = edited(tiny_card, lambda d: d.pop("schema_version"))
    (tmp_path / CARD_FILE).write_text(json.dumps(old))
    with pytest.raises(CardError) as err:
        ModelCard.read(tmp_path)
    text = str(err.value)
    assert text.startswith(str(tmp_path / CARD_FILE))
    assert "schema_version" in text and "python -m training.train" in text
    (tmp_path / CARD_FILE).write_text("{not json")
    with pytest.raises(CardError, match="is not valid JSON"):
        ModelCard.read(tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m training.train --out"):
        ModelCard.read(tmp_path / "nowhere")


def test_build_mar_refuses_a_malformed_card_before_archiving(tiny_model: Path, tiny_card: ModelCard,
                                                             tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.pt").write_bytes((tiny_model / "model.pt").read_bytes())
    (broken / CARD_FILE).write_text(json.dumps(edited(tiny_card, lambda d: d["input"].pop("shape"))))
    result = build_mar(broken, tmp_path / "store", check=False)
    assert result.returncode == 1
    assert "field 'input.shape' is missing" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "store" / "digits.mar").exists()


def test_key_file_reader(tmp_path: Path) -> None:
    path = tmp_path / "key_file.json"
    with pytest.raises(KeyFileError, match="not found; TorchServe writes key_file.json in the directory"):
        read_key(path, "inference")
    path.write_text(json.dumps({"management": {"key": "m-key"}, "inference": {"key": "i-key"}}))
    assert (read_key(path, "inference"), read_key(path, "management")) == ("i-key", "m-key")
    path.write_text(json.dumps({"management": {"key": "m-key"}}))
    with pytest.raises(KeyFileError, match="has no readable 'inference' key"):
        read_key(path, "inference")


def test_contract_cli_checks_a_card_and_prints_a_key(tiny_model: Path, tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "handlers.contract", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)

    ok = cli("check", str(tiny_model))
    assert ok.returncode == 0 and "resnet18 fp32 (torchscript, model.pt), input [3, 32, 32]" in ok.stdout
    bad = cli("check", str(tmp_path))
    assert bad.returncode == 1 and "metadata.json not found" in bad.stderr
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "abc"}}))
    key = cli("key", "inference", "--file", str(tmp_path / "key_file.json"))
    assert (key.returncode, key.stdout.strip()) == (0, "abc")
    assert cli("key", "management", "--file", str(tmp_path / "key_file.json")).returncode == 1
