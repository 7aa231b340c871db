"""Train a text classifier in the Hugging Face format from scratch (nothing downloads): a WordPiece tokenizer trained
on the training split with `tokenizers`, then a small BERT sequence classifier from its config, evaluated on the test
split and exported to TorchScript checked against it.

    python -m training.text --out artifacts/text                          # language identification, 18 languages
    python -m training.text --out artifacts/mine --data my.csv           # or my.jsonl, or a folder per class of .txt
    python -m training.text --out /tmp/t --per-class 60 --max-steps 40 --hidden 32 --layers 1 --vocab-size 600  # CI
    python -m training.text_variants artifacts/text                       # int8, timed side by side, the pick
    ./build_mar.sh artifacts/text --pick throughput                       # gate (accuracy) + archive

Writes OUT/config.json, OUT/model.safetensors and OUT/tokenizer.json (+ tokenizer_config.json): a directory
transformers' Auto* classes load. Beside them: OUT/model.pt (the TorchScript the card names: token ids in, logits
out), OUT/metadata.json (task text; test accuracy, macro-F1 and confusion matrix), OUT/eval/test/ (report.json,
confusion_matrix.png) and OUT/held_out.json (the golden set build_mar.sh packs).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from handlers.contract import (
    HELD_OUT_FILE,
    TOKENIZER_FILE,
    TORCHSCRIPT_FILE,
    InputContract,
    Metrics,
    ModelCard,
    Recipe,
    git_commit,
)
from handlers.tasks.text import Encoded, encode, pad
from training.golden import sample_indices
from training.text_data import CORPUS, MIN_PER_CLASS, TextSplits, load
from training.text_variants import TokenClassifier, encoded, export, predict, score

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] is id 0, the id the model's mask is built from


def train_tokenizer(texts: list[str], vocab_size: int, max_tokens: int) -> Tokenizer:
    """WordPiece over the training texts: lower-cased, accents kept (they tell languages apart), every CJK character
    its own word; [CLS] text [SEP], truncated at `max_tokens`, padded with [PAD] (settings saved in tokenizer.json)."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=False, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL))
    # The trainer learns the same tokens every run but numbers them in hash order; sorted ids make a run repeatable.
    ordered = SPECIAL + sorted(set(tokenizer.get_vocab()) - set(SPECIAL))
    tokenizer.model = models.WordPiece({token: i for i, token in enumerate(ordered)}, unk_token="[UNK]")
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer.enable_truncation(max_tokens)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path, max_tokens: int) -> None:
    """tokenizer.json and tokenizer_config.json, as transformers' AutoTokenizer reads them."""
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                                model_max_length=max_tokens)
    fast.save_pretrained(out)


def build_classifier(args: argparse.Namespace, vocab_size: int, labels: list[str], pad_id: int) -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                        max_position_embeddings=args.max_tokens, type_vocab_size=1, pad_token_id=pad_id,
                        num_labels=len(labels), id2label=dict(enumerate(labels)),
                        label2id={name: i for i, name in enumerate(labels)},
                        problem_type="single_label_classification")
    return transformers.BertForSequenceClassification(config)


def fit(model: torch.nn.Module, train: list[Encoded], train_labels: list[int], val: list[Encoded],
        val_labels: list[int], pad_id: int, args: argparse.Namespace) -> list[dict[str, float]]:
    """AdamW with a linear warm-up then linear decay; val accuracy after each epoch. --max-steps ends it early."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    per_epoch = math.ceil(len(train) / args.batch_size)
    steps = min(args.epochs * per_epoch, args.max_steps or args.epochs * per_epoch)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    generator = torch.Generator().manual_seed(args.seed)
    labels = torch.tensor(train_labels)
    history, step = [], 0
    for epoch in range(math.ceil(steps / per_epoch)):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        total, seen, started = 0.0, 0, time.perf_counter()
        for i in range(0, len(order), args.batch_size):
            if step == steps:
                break
            chosen = order[i:i + args.batch_size]
            ids = pad([train[j] for j in chosen], pad_id)
            loss = model(input_ids=ids, attention_mask=(ids != pad_id).long(), labels=labels[chosen]).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
            total, seen, step = total + loss.item() * len(chosen), seen + len(chosen), step + 1
        model.eval()
        logits = predict(lambda x: model(input_ids=x, attention_mask=(x != pad_id).long()).logits, val, pad_id, 64)
        accuracy = float((logits.argmax(1) == torch.tensor(val_labels)).float().mean())
        history.append({"epoch": epoch + 1, "steps": step, "loss": round(total / max(1, seen), 4),
                        "val_accuracy": round(accuracy, 4), "seconds": round(time.perf_counter() - started, 1)})
        print(f"epoch {epoch + 1}: {step}/{steps} steps, loss {history[-1]['loss']:.4f}, val accuracy "
              f"{accuracy:.4f} ({history[-1]['seconds']} s)", flush=True)
    return history


def write_held_out(out: Path, splits: TextSplits, size: int = 50) -> dict[str, Any]:
    """OUT/held_out.json: a stratified sample of the test texts with their labels, the golden set build_mar.sh packs
    (packager.golden adds what the packed model answers for each, for the canary)."""
    labels = np.array([e.label for e in splits.test])
    chosen = sample_indices(labels, size, splits.spec.seed).tolist()
    items = [{"text": splits.test[i].text, "label": splits.labels[splits.test[i].label]} for i in chosen]
    sample = {"task": "text", "source": f"test split of {splits.spec.source}, stratified sample",
              "fingerprint": splits.fingerprint, "indices": chosen, "items": items}
    (out / HELD_OUT_FILE).write_text(json.dumps(sample, ensure_ascii=False, separators=(",", ":")) + "\n")
    return sample


def train(args: argparse.Namespace) -> ModelCard:
    torch.manual_seed(args.seed)
    splits = load(str(args.data), args.seed, min_per_class=args.min_per_class, per_class=args.per_class,
                  classes=args.classes)
    print(f"data: {splits.sizes} texts, {len(splits.labels)} classes ({', '.join(splits.labels)}); dropped "
          f"{splits.dropped}", flush=True)
    tokenizer = train_tokenizer([e.text for e in splits.train], args.vocab_size, args.max_tokens)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.no_padding()  # batches pad themselves, to their longest text
    train_items, val_items = ([encode(tokenizer, e.text) for e in split] for split in (splits.train, splits.val))
    tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]")
    truncated = sum(i.truncated for i in train_items)
    print(f"tokenizer: {tokenizer.get_vocab_size()} WordPiece tokens; {truncated} training texts over "
          f"{args.max_tokens} tokens truncated", flush=True)
    model = build_classifier(args, tokenizer.get_vocab_size(), splits.labels, pad_id)
    started = time.perf_counter()
    history = fit(model, train_items, [e.label for e in splits.train], val_items, [e.label for e in splits.val],
                  pad_id, args)
    seconds = time.perf_counter() - started
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    save_tokenizer(tokenizer, out, args.max_tokens)
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if v is not None}
    card = ModelCard(
        name=args.name, version=args.version, architecture=type(model).__name__, labels=splits.labels, task="text",
        input=InputContract(shape=[args.max_tokens]), variant="fp32", runtime="torchscript",
        artifact=TORCHSCRIPT_FILE, recipe=Recipe("train", recipe),
        training={"seconds": round(seconds, 1), "torch": torch.__version__, "history": history,
                  "params": sum(p.numel() for p in model.parameters())},
        details={"dataset": splits.record(),
                 "tokenizer": {"file": TOKENIZER_FILE, "model": "WordPiece", "vocab_size": tokenizer.get_vocab_size(),
                               "pad_id": pad_id, "max_tokens": args.max_tokens},
                 "hugging_face": {"files": ["config.json", "model.safetensors", TOKENIZER_FILE],
                                  "transformers": transformers.__version__}},
        metrics=Metrics(val_top1=history[-1]["val_accuracy"]), git_commit=git_commit())
    test_items, _ = encoded(out, card, splits.test)
    card, logits = export(out, out, TokenClassifier(model, pad_id), card, test_items, pad_id)
    test = score(logits, splits.test, card, out, f"{card.architecture} fp32")
    card = card.replace(metrics=Metrics(test=test, val_top1=history[-1]["val_accuracy"]))
    card.write(out)
    write_held_out(out, splits)
    print(f"test: accuracy {test.top1:.4f}, macro-F1 {test.macro_f1:.4f} on {test.n} texts; TorchScript parity "
          f"{card.export['parity'] if card.export else None} -> {out}")
    print(f"optimize it: python -m training.text_variants {out}")
    return card


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", "--data-dir", default=CORPUS,
                    help=f"a .csv or .jsonl of text,label, or a folder per class of .txt files (default {CORPUS})")
    ap.add_argument("--classes", type=lambda s: [c for c in s.split(",") if c], default=None,
                    help="comma-separated: train on these classes only")
    ap.add_argument("--per-class", type=int, default=None, help="at most this many texts per class (a quick run)")
    ap.add_argument("--min-per-class", type=int, default=MIN_PER_CLASS, help="drop classes with fewer texts")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--max-tokens", type=int, default=64, help="texts are truncated to this many tokens")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="text")
    ap.add_argument("--version", default="1.0")
    args = ap.parse_args(argv)
    for name in ("vocab_size", "max_tokens", "hidden", "layers", "heads", "epochs", "batch_size", "lr", "max_steps",
                 "per_class", "min_per_class"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.hidden % args.heads:
        ap.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
