"""Served text classifiers: the Hugging Face model as TorchScript that takes token ids and returns logits, in fp32
and with int8 linear layers, each checked against the eager model it came from, scored and gated on the test split,
then timed side by side; the pick is what `build_mar.sh --pick` packages.

    python -m training.text_variants artifacts/text                  # fp32 TorchScript and int8, report, pick
    ./build_mar.sh artifacts/text --pick throughput

- torchscript: `forward(input_ids) -> logits`, traced and frozen. The wrapper builds the attention mask from the
  tokenizer's pad id, so the runtimes' one tensor in, one tensor out holds, and a batch padded to its longest text
  gives each text the logits it gets alone.
- int8: every nn.Linear with int8 weights, activations quantized per call (torch.ao dynamic quantization; CPU only).
Parity (each export against its eager model, on the test texts in served batches): the same label for every text,
logits within PARITY_ATOL. The card also records how each text's logits in a served batch differ from its logits
alone ("batched_vs_alone"): within float noise for fp32, but int8 quantizes activations with one scale over the
whole batch, padding included, so an int8 answer can move with what shares its batch. The gate compares each
variant's test accuracy (in served batches) with the fp32 parent's, in points.

Writes PARENT/variants/<name>/ (model.pt, tokenizer.json, metadata.json, eval/test/) and
PARENT/optimization/{report.json,report.md,report.png,pick.json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from handlers.contract import (
    TOKENIZER_FILE,
    TORCHSCRIPT_FILE,
    EvalSummary,
    Metrics,
    ModelCard,
    ParentRecord,
    Recipe,
    sha256,
)
from handlers.deprecations import known_deprecations
from handlers.runtimes import load_model
from handlers.tasks.text import Encoded, encode, load_tokenizer, pad
from packager.pick import variant_dir
from training.evaluate import classification_metrics, summary
from training.evaluate import write_report as write_eval
from training.export import ParityError
from training.text_data import Example, from_record, read_user_data
from training.variant_report import BASELINE, SERVED_BATCH, arguments, parent_card, parse, publish, row, run, timed
from training.variants.int8 import dynamic_int8, quantization_warnings

HF_WEIGHTS = "model.safetensors"  # beside config.json and tokenizer.json: the Hugging Face directory
PARITY_ATOL = 1e-4  # logits, TorchScript against its eager model
VARIANTS = {BASELINE: False, "int8": True}  # name -> int8


class TokenClassifier(torch.nn.Module):
    """A Hugging Face sequence classifier as the runtimes call a model: token ids [n, t] in, logits [n, C] out, the
    attention mask built from the pad id."""

    def __init__(self, model: torch.nn.Module, pad_id: int) -> None:
        super().__init__()
        self.model, self.pad_id = model, pad_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=(input_ids != self.pad_id).long()).logits


def hf_classifier(model_dir: Path, pad_id: int) -> TokenClassifier:
    """The Hugging Face model saved in `model_dir` (config.json + model.safetensors; nothing downloads), wrapped."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    return TokenClassifier(model, pad_id).eval()


def examples_in(path: Path, labels: list[str]) -> list[Example]:
    """Held-out texts a user brings (a CSV or JSONL of text,label, or a folder per class), as the model's labels."""
    pairs = read_user_data(path)
    unknown = sorted({label for _, label in pairs} - set(labels))
    if unknown:
        raise ValueError(f"{path} has labels {unknown[:5]} the model does not have ({', '.join(labels[:10])})")
    return [Example(text, labels.index(label)) for text, label in pairs]


def test_examples(card: ModelCard) -> list[Example]:
    """The test split a model trained here was scored on, or the held-out texts an imported model was scored on."""
    details = card.details or {}
    if "dataset" in details:
        return from_record(details["dataset"]).test
    if "held_out" in details:
        return examples_in(Path(details["held_out"]), card.labels)
    raise ValueError("this model has no held-out texts to check and gate variants on; bring it again with "
                     "python -m training.bring --hf-dir DIR --eval-dir HELD_OUT (a .csv or .jsonl of text,label)")


def encoded(model_dir: Path, card: ModelCard, examples: list[Example]) -> tuple[list[Encoded], int]:
    """The texts tokenized as the handler tokenizes them (truncated to the card's token limit), and the pad id."""
    tokenizer, pad_id = load_tokenizer(model_dir / TOKENIZER_FILE, card.input.shape[0])
    return [encode(tokenizer, e.text) for e in examples], pad_id


@torch.inference_mode()
def predict(model: Callable[[torch.Tensor], torch.Tensor], items: list[Encoded], pad_id: int,
            batch: int = SERVED_BATCH) -> torch.Tensor:
    """Logits [n, C] (float32, CPU) in batches as the server makes them, each padded to its longest text."""
    return torch.cat([model(pad(items[i:i + batch], pad_id)).float() for i in range(0, len(items), batch)])


def score(logits: torch.Tensor, examples: list[Example], card: ModelCard, out: Path, title: str) -> EvalSummary:
    """Accuracy, macro-F1 and the confusion matrix on `examples`; the full report and its PNG under out/eval/test."""
    result = classification_metrics(logits, torch.tensor([e.label for e in examples]), card.labels)
    write_eval(out / "eval" / "test", result, card.labels, f"{title} - test accuracy {100 * result['top1']:.2f}%")
    return dataclasses.replace(summary(result), confusion_matrix=result["confusion_matrix"])


def parity(reference: torch.Tensor, exported: torch.Tensor) -> dict[str, Any]:
    diff = (exported - reference).abs()
    same = (exported.argmax(1) == reference.argmax(1)).float().mean().item()
    return {"texts": len(reference), "label_agreement": round(same, 6), "max_abs_diff": round(diff.max().item(), 8),
            "atol": PARITY_ATOL, "ok": same == 1.0 and diff.max().item() <= PARITY_ATOL}


def export(model_dir: Path, out: Path, model: torch.nn.Module, card: ModelCard, items: list[Encoded],
           pad_id: int) -> tuple[ModelCard, torch.Tensor]:
    """`model` (a TokenClassifier, or its int8 copy) traced and frozen to out/model.pt beside the tokenizer, then
    loaded as the handler loads it and checked against `model`; the card names it, and the logits it gave."""
    int8 = card.precision == "int8"
    model.eval()
    reference = predict(model, items, pad_id)
    example = pad(items[:2], pad_id)
    # Freezing's numerics-changing passes are kept off for int8, as for the int8 detectors (they move its output).
    with known_deprecations(), quantization_warnings(), warnings.catch_warnings():
        # transformers 5 deprecates an attribute the tracer reads on every module; nothing of ours calls it.
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        frozen = torch.jit.freeze(torch.jit.trace(model, example, strict=False), optimize_numerics=not int8)
        out.mkdir(parents=True, exist_ok=True)
        torch.jit.save(frozen, str(out / TORCHSCRIPT_FILE))
    if model_dir != out:
        shutil.copy2(model_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    loaded = load_model(out, card, repeatable=True)
    logits = predict(loaded, items, pad_id)
    checked = parity(reference, logits)
    if not checked["ok"]:
        raise ParityError(f"the TorchScript {card.variant} does not match its eager model on the test texts: {checked}")
    alone = parity(predict(loaded, items, pad_id, batch=1), logits)
    checked["batched_vs_alone"] = {k: alone[k] for k in ("label_agreement", "max_abs_diff")}
    card = card.replace(export={"method": "torch.jit.trace+freeze", "optimize_numerics": not int8, "parity": checked})
    return card, logits


def make(parent_dir: Path, name: str, examples: list[Example]) -> ModelCard:
    """PARENT/variants/NAME from the parent's Hugging Face weights: exported, checked, scored."""
    parent = ModelCard.read(parent_dir)
    int8 = VARIANTS[name]
    out = variant_dir(parent_dir, name)
    if out.exists():
        shutil.rmtree(out)
    items, pad_id = encoded(parent_dir, parent, examples)
    model = hf_classifier(parent_dir, pad_id)
    technique: dict[str, Any] = {"method": "trace+freeze"}
    if int8:
        model = dynamic_int8(model)
        technique = {"api": "torch.ao.quantization.quantize_dynamic", "layers": "nn.Linear", "weights": "int8",
                     "engine": torch.backends.quantized.engine}
    record = ParentRecord(dir=str(parent_dir), checkpoint=HF_WEIGHTS, sha256=sha256(parent_dir / HF_WEIGHTS),
                          variant=parent.variant, test=parent.test)
    card = parent.replace(variant=name, runtime="torchscript", artifact=TORCHSCRIPT_FILE, checkpoint=None,
                          precision="int8" if int8 else "fp32", cpu_only=int8, parent=record,
                          recipe=Recipe("export" if name == BASELINE else name, technique))
    card, logits = export(parent_dir, out, model, card, items, pad_id)
    card = card.replace(metrics=Metrics(test=score(logits, examples, card, out, f"{card.architecture} {name}")))
    card.write(out)
    return card


def optimize(parent_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    card = parent_card(parent_dir, "text", "train one with python -m training.text, or bring one with python -m "
                       "training.bring --hf-dir")
    examples = test_examples(card)
    made = {}
    for name in (BASELINE, *args.variants):
        started = time.perf_counter()
        made[name] = make(parent_dir, name, examples)
        print(f"{name}: accuracy {made[name].test.top1:.4f}, macro-F1 {made[name].test.macro_f1:.4f}, parity "
              f"{made[name].export['parity']} ({time.perf_counter() - started:.0f} s)", flush=True)
    rows = {name: row(name, c, args.budget, {"accuracy": c.test.top1, "macro_f1": c.test.macro_f1})
            for name, c in made.items()}
    items, pad_id = encoded(parent_dir, card, examples[:args.timing_texts])
    print(f"timing {len(made)} models side by side ({args.rounds} rounds, {len(items)} texts) ...", flush=True)
    models = {name: load_model(variant_dir(parent_dir, name), c) for name, c in made.items()}
    batches = [pad(items[i:i + SERVED_BATCH], pad_id) for i in range(0, len(items), SERVED_BATCH)]
    timing = timed(models, [pad([i], pad_id) for i in items], batches, len(items), args.rounds)
    return publish(parent_dir, card, rows, timing, BASELINE, args, title="Text classifier variants", unit="text",
                   items=len(examples), columns={"accuracy": "accuracy", "macro_f1": "macro-F1"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = arguments(__doc__, "a text classifier directory from python -m training.text or training.bring --hf-dir",
                   "accuracy", "text", 64, "int8")
    args = parse(ap, argv, "training.text_variants", ("rounds", "timing_texts"))
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    run(optimize, parse_args(argv))


if __name__ == "__main__":
    main()
