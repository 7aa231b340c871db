from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from handlers.contract import STATE_DICT_FILE, TORCHSCRIPT_FILE, ModelCard
from handlers.loading import build_model, load_state_dict
from tests.conftest import ROOT
from training import export


def test_export_records_parity_within_tolerance(tiny_card: ModelCard) -> None:
    assert tiny_card.export is not None
    parity = tiny_card.export["parity"]
    assert tiny_card.runtime == "torchscript" and tiny_card.artifact == TORCHSCRIPT_FILE
    assert tiny_card.checkpoint == STATE_DICT_FILE  # the float weights stay beside the export
    assert parity["images"] == 270 and parity["top1_agreement"] == 1.0
    assert parity["max_abs_diff"] <= parity["atol"]


def test_torchscript_loads_without_the_python_model_class(tiny_model: Path, tiny_splits) -> None:
    """A fresh interpreter that never imports torchvision or our code runs the artifact."""
    image = tiny_splits.test[0][0].float().unsqueeze(0) / 255
    torch.save(image, tiny_model.parent / "probe.pt")
    code = (
        "import sys, warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        f"m = torch.jit.load({str(tiny_model / 'model.pt')!r})\n"
        f"x = torch.load({str(tiny_model.parent / 'probe.pt')!r})\n"
        "print(tuple(m(x).shape))\n"
        "assert 'torchvision' not in sys.modules and 'training' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 10)"


def test_parity_check_fails_loudly_on_a_mismatch(tiny_model: Path, tiny_card: ModelCard, tiny_splits) -> None:
    eager = build_model(tiny_card.architecture, tiny_card.num_classes)
    eager.load_state_dict(load_state_dict(tiny_model / STATE_DICT_FILE))
    eager.eval()
    exported = export.to_torchscript(eager, tiny_card.input.image_size)
    changed = copy.deepcopy(eager)  # frozen TorchScript may share storage with `eager`: change a copy
    with torch.no_grad():
        changed.fc.bias += 0.5
    with pytest.raises(export.ParityError, match=r"does not match the model it was made from .* max \|diff\| 0\.5 "):
        export.check_parity(changed, exported, tiny_splits.test, tiny_card)


def test_parity_holds_lower_precisions_to_a_share_of_agreeing_labels(tiny_model: Path, tiny_card: ModelCard,
                                                                     tiny_splits) -> None:
    """A Tolerance bounds the logits and the share of test images whose top-1 label stays the same."""
    eager = build_model(tiny_card.architecture, tiny_card.num_classes)
    eager.load_state_dict(load_state_dict(tiny_model / STATE_DICT_FILE))
    eager.eval()
    flipped = copy.deepcopy(eager)
    with torch.no_grad():
        flipped.fc.bias[0] += 20  # logits move by 20 on one class: most labels become '0'
    loose = export.Tolerance(atol=25, rtol=0, agreement=0.0)
    report = export.check_parity(eager, flipped, tiny_splits.test, tiny_card, loose)
    assert (report["atol"], report["rtol"], report["min_agreement"]) == (25, 0, 0.0)
    assert 0 < report["top1_agreement"] < 0.5 and report["max_abs_diff"] == pytest.approx(20, abs=1e-3)
    with pytest.raises(export.ParityError, match=r"top-1 agreement \d+\.\d+% \(required 97\.00%\); see here"):
        export.check_parity(eager, flipped, tiny_splits.test, tiny_card, export.Tolerance(25, 0, 0.97), "see here")


def test_export_cli_names_the_missing_checkpoint(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "training.export", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert "metadata.json not found" in result.stderr and "python -m training.train" in result.stderr
