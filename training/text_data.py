"""Text classification data: language identification over the chatterbot-corpus utterances, or a user's own labelled
texts, read by the same loader, deduplicated and split (seeded, stratified) so no text is in two splits.

    python -m training.text_data                               # the built-in corpus: classes, sizes, what was dropped
    python -m training.text_data --data my.csv                 # or my.jsonl, or a folder with one folder per class

The built-in corpus is chatterbot-corpus 1.3.3 (BSD-3-Clause, pinned in requirements.txt): human-written dialog
utterances in YAML files, `chatterbot_corpus/data/<language>/<topic>.yml`. It is read as package data with PyYAML
(its own loader is not needed); every utterance of a conversation is one example, labelled with its language's
folder name. Over the 28 folders there are 20,939 utterances, 13,684 of them distinct:
- the same text (after case-folding and collapsing whitespace) is kept once, so it cannot land in two splits;
- a text found in two languages (247: chinese/traditionalchinese pairs, English lines inside other languages'
  files, short words) is dropped, since it has no single right label;
- languages left with fewer than `MIN_PER_CLASS` (100) distinct texts are dropped: hindi, hinglish, oriya,
  russian, swedish, tamil, telugu, thai, urdu and yoruba (11 to 99 each), too few to learn and to score on.
That leaves 18 languages and 12,973 texts (train 9,081, val 1,946, test 1,946 at the default seed and fractions).

A user's data: a CSV with a header row holding `text` and `label` columns, a JSONL file of {"text", "label"}
objects, or a folder with one folder per class holding .txt files (each file one text). Labels are sorted names.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.resources
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlers.contract import DataSpec
from training.data import _fingerprint, _split_indices

CORPUS = "chatterbot-corpus"  # the source name of the built-in data
MIN_PER_CLASS = 100


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass
class TextSplits:
    train: list[Example]
    val: list[Example]
    test: list[Example]
    labels: list[str]
    fingerprint: str
    spec: DataSpec
    dropped: dict[str, int]  # what was left out -> how many (languages too small, duplicates, ambiguous texts)
    min_per_class: int
    per_class: int | None  # a sample of at most this many texts per class, when asked
    classes: list[str] | None  # only these classes, when asked

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def record(self) -> dict[str, Any]:
        """What a model card keeps about its data (details["dataset"]), enough to rebuild the same splits."""
        return {"source": self.spec.source, "seed": self.spec.seed, "val_fraction": self.spec.val_fraction,
                "test_fraction": self.spec.test_fraction, "min_per_class": self.min_per_class,
                "per_class": self.per_class, "classes": self.classes,
                "sizes": self.sizes, "fingerprint": self.fingerprint, "dropped": self.dropped}


def key(text: str) -> str:
    """Texts equal under this key are the same text (case and spacing aside)."""
    return " ".join(text.casefold().split())


def corpus_texts() -> list[tuple[str, str]]:
    """(text, language) for every utterance of the chatterbot corpus, files in sorted order."""
    import yaml

    data = importlib.resources.files("chatterbot_corpus").joinpath("data")
    pairs = []
    for language in sorted(data.iterdir(), key=lambda p: p.name):
        if not language.is_dir():
            continue
        for path in sorted(language.iterdir(), key=lambda p: p.name):
            if path.name.endswith(".yml"):
                doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
                pairs += [(str(u), language.name) for conversation in doc.get("conversations") or []
                          for u in conversation]
    return pairs


def read_user_data(path: Path) -> list[tuple[str, str]]:
    """(text, label) from a CSV (text,label columns), a JSONL file, or a folder of class folders of .txt files."""
    path = Path(path)
    if path.is_dir():
        return [(f.read_text(encoding="utf-8"), folder.name) for folder in sorted(path.iterdir()) if folder.is_dir()
                for f in sorted(folder.rglob("*.txt"))]
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"text", "label"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{path} needs a header row with 'text' and 'label' columns, got {reader.fieldnames}")
            return [(row["text"], row["label"]) for row in reader]
    if path.suffix in (".jsonl", ".ndjson"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not all(isinstance(r, dict) and "text" in r and "label" in r for r in rows):
            raise ValueError(f"{path}: every line must be a JSON object with 'text' and 'label'")
        return [(str(r["text"]), str(r["label"])) for r in rows]
    raise ValueError(f"{path} is neither a folder of class folders nor a .csv or .jsonl file")


def clean(pairs: list[tuple[str, str]], min_per_class: int) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """One example per distinct text, sorted by text; texts with two labels and classes under `min_per_class`
    dropped."""
    labels_of: dict[str, set[str]] = {}
    first: dict[str, tuple[str, str]] = {}
    for text, label in pairs:
        text = text.strip()
        if not text:
            continue
        k = key(text)
        labels_of.setdefault(k, set()).add(label)
        first.setdefault(k, (text, label))
    dropped = {"duplicates": len(pairs) - len(first),
               "ambiguous": sum(1 for labels in labels_of.values() if len(labels) > 1)}
    kept = [pair for k, pair in first.items() if len(labels_of[k]) == 1]
    counts = Counter(label for _, label in kept)
    small = {label: n for label, n in counts.items() if n < min_per_class}
    dropped.update({f"class {label} ({n} texts)": n for label, n in sorted(small.items())})
    # Sorted, so the same texts give the same splits in whatever order a file lists them.
    return sorted((t, label) for t, label in kept if label not in small), dropped


def load(source: str = CORPUS, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
         min_per_class: int = MIN_PER_CLASS, per_class: int | None = None, classes: list[str] | None = None
         ) -> TextSplits:
    """The splits of `source` (the built-in corpus, or a user's file or folder). `per_class` keeps a seeded sample
    of at most that many texts per class, and `classes` only those classes (a quick run); both apply before the
    split, so the same arguments always give the same splits."""
    spec = DataSpec(source, seed, val_fraction, test_fraction)
    pairs = corpus_texts() if source == CORPUS else read_user_data(Path(source))
    if classes:
        unknown = sorted(set(classes) - {label for _, label in pairs})
        if unknown:
            raise ValueError(f"classes {unknown} are not in {source}")
        pairs = [p for p in pairs if p[1] in classes]
    kept, dropped = clean(pairs, min_per_class)
    names = sorted({label for _, label in kept})
    need = max(2, math.ceil(1 / min(1 - val_fraction - test_fraction, val_fraction, test_fraction) - 1e-9))
    if len(names) < 2 or min_per_class < need:
        raise ValueError(f"{source}: {len(names)} class(es) with at least {max(min_per_class, need)} distinct texts "
                         f"each; a classifier needs two or more, each with enough texts for train, val and test")
    if per_class is not None:
        rng = np.random.default_rng(seed)
        sample = []
        for name in names:
            group = [pair for pair in kept if pair[1] == name]
            sample += [group[i] for i in sorted(rng.permutation(len(group))[:per_class])]
        kept = sample
    texts = [t for t, _ in kept]
    labels = np.array([names.index(label) for _, label in kept], dtype=np.int64)
    tr, va, te = _split_indices(labels, spec)
    h = hashlib.sha256(b"text")
    for text, label in zip(texts, labels, strict=True):
        h.update(f"{label}:{text}\0".encode())

    def examples(ix: np.ndarray) -> list[Example]:
        return [Example(texts[i], int(labels[i])) for i in ix]

    return TextSplits(examples(tr), examples(va), examples(te), names, _fingerprint(h, tr, va, te), spec, dropped,
                      min_per_class, per_class, classes)


def from_record(record: dict[str, Any]) -> TextSplits:
    """The splits a card's details["dataset"] describes, refusing data that changed since."""
    splits = load(record["source"], record["seed"], record["val_fraction"], record["test_fraction"],
                  record["min_per_class"], record.get("per_class"), record.get("classes"))
    if splits.fingerprint != record["fingerprint"]:
        raise ValueError(f"the data at {record['source']} no longer matches what the model was trained on "
                         f"(fingerprint {splits.fingerprint[:12]} != {str(record['fingerprint'])[:12]}); retrain")
    return splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=CORPUS, help=f"a .csv, .jsonl or class-folder path (default {CORPUS})")
    ap.add_argument("--min-per-class", type=int, default=MIN_PER_CLASS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        splits = load(args.data, args.seed, min_per_class=args.min_per_class)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    counts = Counter(e.label for split in (splits.train, splits.val, splits.test) for e in split)
    print(f"{args.data}: {sum(splits.sizes.values())} texts, {len(splits.labels)} classes, splits {splits.sizes}")
    print("per class:", ", ".join(f"{name} {counts[i]}" for i, name in enumerate(splits.labels)))
    print("dropped:", ", ".join(f"{k}: {v}" for k, v in splits.dropped.items()))
    print("fingerprint:", splits.fingerprint)


if __name__ == "__main__":
    main()
