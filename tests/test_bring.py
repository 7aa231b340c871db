"""A model trained elsewhere: a plain PyTorch script (none of this project's training code) trains a torchvision
resnet18 on the digits and saves its state_dict and a TorchScript copy; python -m training.bring takes each, with
labels named "zero".."nine" and a held-out folder; build_mar.sh packs it, and the real TorchServe answers with
the right label names. The same for a text classifier a plain transformers script trains and saves in the Hugging
Face format."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from handlers.contract import ModelCard
from harness.torchserve import TorchServe
from tests.conftest import ROOT, build_mar, serve

pytestmark = [pytest.mark.server, pytest.mark.slow]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# What a user's own script looks like: torchvision, scikit-learn's digits, a loop; PNGs of the held-out digits.
ELSEWHERE = textwrap.dedent("""
    import sys
    from pathlib import Path

    import numpy as np
    import torch
    import torch.nn.functional as F
    import torchvision
    from PIL import Image
    from sklearn.datasets import load_digits

    out, names = Path(sys.argv[1]), sys.argv[2].split(",")
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    x = F.interpolate(x, size=(32, 32), mode="bilinear").repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target)
    mean, std = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    train = torch.arange(0, 1500)
    for step in range(120):
        idx = train[torch.randint(len(train), (64,))]
        loss = F.cross_entropy(model((x[idx] - mean) / std), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.save(model.state_dict(), out / "theirs.pth")
    torch.jit.save(torch.jit.script(model), str(out / "theirs.pt"))
    (out / "labels.txt").write_text("\\n".join(names) + "\\n")
    for i in range(1500, 1797):
        folder = out / "held_out" / names[int(y[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
""")


# A user's text classifier: chatterbot-corpus's YAML read directly, a tokenizers WordPiece, a transformers BERT
# trained by a plain loop, saved with save_pretrained; its own predictions on the held-out texts for comparison.
ELSEWHERE_TEXT = textwrap.dedent("""
    import json
    import sys
    from pathlib import Path

    import chatterbot_corpus
    import torch
    import yaml
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    out, names = Path(sys.argv[1]), ["english", "spanish", "japanese"]
    torch.manual_seed(0)
    root = Path(chatterbot_corpus.__file__).parent / "data"
    train, held_out = [], []
    for label, language in enumerate(names):
        texts = sorted({t.strip() for f in sorted((root / language).glob("*.yml"))
                        for conversation in yaml.safe_load(f.read_text(encoding="utf-8"))["conversations"]
                        for t in conversation if isinstance(t, str) and t.strip()})
        train += [(t, label) for t in texts[:150]]
        held_out += [(t, label) for t in texts[150:180]]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator([t for t, _ in train], trainers.WordPieceTrainer(
        vocab_size=800, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    config = BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=48, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=96, max_position_embeddings=48, pad_token_id=0,
                        num_labels=3, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model = BertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(80):
        batch = [train[int(i)] for i in torch.randint(len(train), (16,))]
        inputs = tokenizer([t for t, _ in batch], padding=True, truncation=True, max_length=48, return_tensors="pt")
        loss = model(**inputs, labels=torch.tensor([y for _, y in batch])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out / "hf")
    tokenizer.save_pretrained(out / "hf")
    with (out / "held_out.jsonl").open("w", encoding="utf-8") as f:
        for t, y in held_out:
            f.write(json.dumps({"text": t, "label": names[y]}, ensure_ascii=False) + "\\n")
    with torch.inference_mode():
        inputs = tokenizer([t for t, _ in held_out], padding=True, truncation=True, max_length=48, return_tensors="pt")
        answers = [names[int(i)] for i in model(**inputs).logits.argmax(1)]
    (out / "expected.json").write_text(json.dumps(answers))
""")

@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("elsewhere")
    (out / "train_theirs.py").write_text(ELSEWHERE)
    subprocess.run([sys.executable, str(out / "train_theirs.py"), str(out), ",".join(NAMES)], check=True)
    return out


def bring(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "training.bring", "--out", str(out), "--input-size", "32",
                           "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25", *args],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def brought(elsewhere: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for kind, source in (("weights", ["--weights", str(elsewhere / "theirs.pth"), "--arch", "resnet18"]),
                         ("torchscript", ["--torchscript", str(elsewhere / "theirs.pt")])):
        out = tmp_path_factory.mktemp(kind) / "theirs"
        result = bring(out, *source, "--labels", str(elsewhere / "labels.txt"), "--eval-dir",
                       str(elsewhere / "held_out"), "--name", f"theirs_{kind}")
        assert result.returncode == 0, result.stderr
        dirs[kind] = out
    return dirs


@pytest.fixture(scope="module")
def elsewhere_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("elsewhere_text")
    (out / "train_theirs.py").write_text(ELSEWHERE_TEXT)
    subprocess.run([sys.executable, str(out / "train_theirs.py"), str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def brought_text(elsewhere_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("text") / "theirs"
    result = subprocess.run([sys.executable, "-m", "training.bring", "--hf-dir", str(elsewhere_text / "hf"),
                             "--eval-dir", str(elsewhere_text / "held_out.jsonl"), "--out", str(out), "--name",
                             "theirs_text"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def server(brought: dict[str, Path], brought_text: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[TorchServe]:
    store = tmp_path_factory.mktemp("store")
    for kind, model_dir in brought.items():
        build_mar(model_dir, store, "--name", f"theirs_{kind}")
    build_mar(brought_text, store, "--name", "theirs_text")
    with serve(store, tmp_path_factory.mktemp("ts"), [*(f"theirs_{k}" for k in brought), "theirs_text"]) as ts:
        yield ts


def test_the_card_carries_their_labels_and_held_out_figures(brought: dict[str, Path]) -> None:
    weights, scripted = (ModelCard.read(brought[k]) for k in ("weights", "torchscript"))
    assert weights.labels == scripted.labels == NAMES and weights.recipe.technique == "import"
    assert weights.runtime == "eager" and scripted.runtime == "torchscript"
    assert weights.test.n == scripted.test.n == 297
    assert weights.test.top1 == pytest.approx(scripted.test.top1, abs=0.01) and weights.test.top1 > 0.5


def test_served_answers_use_their_label_names(server: TorchServe, elsewhere: Path) -> None:
    images = sorted((elsewhere / "held_out").rglob("*.png"))[::10]
    hits = 0
    for path in images:
        answers = [server.api.predict(f"theirs_{k}", path.read_bytes()).json() for k in ("weights", "torchscript")]
        assert answers[0]["label"] == answers[1]["label"] and answers[0]["label"] in NAMES, answers
        hits += answers[0]["label"] == path.parent.name
    assert hits / len(images) > 0.5


def test_a_mismatch_is_refused_with_what_to_fix(elsewhere: Path, tmp_path: Path) -> None:
    labels = tmp_path / "five.txt"
    labels.write_text("\n".join(NAMES[:5]))
    result = bring(tmp_path / "a", "--weights", str(elsewhere / "theirs.pth"), "--arch", "resnet18",
                   "--labels", str(labels))
    assert result.returncode != 0 and "lists 5 labels; it must answer [batch, 5] logits" in result.stderr
    result = bring(tmp_path / "b", "--torchscript", str(elsewhere / "theirs.pt"), "--labels", str(labels))
    assert result.returncode != 0 and "lists 5 labels" in result.stderr
    result = bring(tmp_path / "c", "--weights", str(elsewhere / "theirs.pth"), "--labels", str(labels))
    assert result.returncode != 0 and "--weights needs --arch" in result.stderr
    unevaluated = bring(tmp_path / "d", "--torchscript", str(elsewhere / "theirs.pt"), "--labels",
                        str(elsewhere / "labels.txt"))
    assert unevaluated.returncode == 0 and "--eval-dir" in unevaluated.stdout


def test_a_hugging_face_text_classifier_comes_in_and_answers_as_it_did(brought_text: Path, elsewhere_text: Path,
                                                                       server: TorchServe) -> None:
    card = ModelCard.read(brought_text)
    assert card.task == "text" and card.labels == ["english", "spanish", "japanese"] and card.input.shape == [48]
    assert card.recipe.technique == "import" and card.export["parity"]["ok"] and card.test.n == 90
    held_out = [json.loads(line) for line in (elsewhere_text / "held_out.jsonl").read_text().splitlines()]
    expected = json.loads((elsewhere_text / "expected.json").read_text())
    served = []
    for item in held_out:
        r = server.api.predict("theirs_text", item["text"].encode(), content_type="text/plain; charset=utf-8")
        assert r.status_code == 200, r.text
        served.append(r.json()["label"])
    assert served == expected
    right = sum(a == b["label"] for a, b in zip(expected, held_out, strict=True))
    assert card.test.top1 == pytest.approx(right / 90, abs=1e-6)
    missing = subprocess.run([sys.executable, "-m", "training.bring", "--hf-dir", str(elsewhere_text),
                              "--out", str(brought_text.parent / "missing")], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 1 and "save_pretrained" in missing.stderr
