"""Your own data, end to end: a user's ImageFolder (nested class folders, mixed formats and sizes, one broken
JPEG) through train -> export -> optimize -> build_mar.sh -> the real TorchServe -> a canaried rollout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.client import InferenceClient
from handlers.contract import ModelCard
from handlers.runtimes import load_model
from harness.imagefolder import corrupt_jpeg, write_imagefolder
from packager import golden
from tests.conftest import ROOT, build_mar, serve_scalable, train_tiny
from tests.test_deploy import OPERATOR, deploy, ok
from training import export
from training.evaluate import predict, splits_for

pytestmark = [pytest.mark.server, pytest.mark.slow]

CLASSES = {"even": [0, 2, 4, 6, 8], "odd": [1, 3, 5, 7, 9]}
NAME = "mine"
BROKEN = "odd/batch_2/nested/broken.jpg"
# The test split (and so the golden set) holds ~30 images: one image is ~3.3 points. The int8 variant may differ
# from fp32 on one of them; the gate and the canary allow that, and no more.
BUDGET = "4"


def test_own_imagefolder_from_training_to_a_canaried_rollout(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    write_imagefolder(folder, CLASSES, per_class=100)  # the two sample photos land in "even"
    corrupt_jpeg(folder / BROKEN)
    classes = sorted(p.name for p in folder.iterdir())

    # Train: the broken file is found by the scan and listed in the card, not met by a DataLoader mid-epoch.
    model = train_tiny(tmp_path / "model", "--data-dir", str(folder), "--name", NAME)
    card = ModelCard.read(model)
    assert card.labels == classes == sorted(CLASSES)
    assert card.data is not None and list(card.data.skipped) == [BROKEN]
    assert sum(card.data.sizes.values()) == 202  # 2 x 100 digits + 2 photos; the broken file is in no split

    export.export_dir(model)
    subprocess.run([sys.executable, "-m", "training.optimize", str(model), "--variants", "int8", "--threads", "1",
                    "--rounds", "1", "--latency-calls", "5", "--throughput-calls", "2", "--no-progress"],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    int8 = model / "variants" / "int8"
    assert ModelCard.read(int8).data == card.data  # the variant carries the dataset record, skipped list and all

    store = tmp_path / "model_store"
    build_mar(model, store, "--version", "1.0", "--archive", f"{NAME}-1.0")
    gated = build_mar(int8, store, "--version", "2.0", "--archive", f"{NAME}-2.0", "--budget", BUDGET)
    assert "accuracy gate passed" in gated.stdout, gated.stdout
    gold = golden.from_archive(store / f"{NAME}-2.0.mar")
    assert gold["fingerprint"] == card.data.fingerprint and {it["label"] for it in gold["items"]} == set(classes)

    # The held-out files as they lie in the folder (PNG, JPEG, BMP, WebP, the photos), and what the fp32 model
    # predicts for them offline: served, each must get the same label.
    exported = ModelCard.read(model)  # the frozen TorchScript artifact that fp32 archive serves
    test = splits_for(exported).test
    offline = predict(load_model(model, exported), test, card.input.mean, card.input.std)[0].argmax(1)
    expected = [card.labels[int(k)] for k in offline]

    overrides = {k: OPERATOR[k] for k in ("enable_model_api", "load_models", "disable_token_authorization")}
    with serve_scalable(store, tmp_path / "ts", [], overrides) as ts:  # the rollout retires 1.0
        ok(deploy(ts, store, "register", f"{NAME}-1.0.mar"))
        with InferenceClient(ts.url("inference"), ts.api.keys["inference"], model=NAME) as client:
            served = [client.predict(path.read_bytes()) for path in test.paths]
            assert {(p.version, p.variant) for p in served} == {("1.0", "fp32")}
            assert [p.label for p in served] == expected

            out = ok(deploy(ts, store, "rollout", f"{NAME}-2.0.mar", "--budget", BUDGET, "--latency-factor", "100"))
            assert "canary passed" in out and f"promoted {NAME} 2.0 to default (was 1.0)" in out, out
            after = client.predict(test.paths[0].read_bytes())
            assert (after.version, after.variant) == ("2.0", "int8") and after.label in classes

        described = ts.api.manage("GET", f"/models/{NAME}/2.0?customized=true").json()[0]["customizedMetadata"]
        described = described if isinstance(described, dict) else json.loads(described)
        served_card = ModelCard.from_dict(described["card"])
        assert served_card.labels == classes and served_card.data.skipped == card.data.skipped
