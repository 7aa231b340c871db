"""The artifact contract: the typed model card, the file names of a model directory, sha256, and the key file.

One `ModelCard` travels from training through export and the variants into the .mar and the handler; it is read
and written here and nowhere else. The module uses the standard library only: the handler imports it inside the
archive, and the deploy tools import it where torch is not needed.

    python -m handlers.contract check artifacts/resnet18          # validate a model directory's card
    python -m handlers.contract key inference [--file key_file.json]   # print one of TorchServe's API keys
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

SCHEMA_VERSION = 1

# The files of a model directory (training output, variant, or unpacked archive) and of a model store.
CARD_FILE = "metadata.json"
STATE_DICT_FILE = "model.pth"
TORCHSCRIPT_FILE = "model.pt"
EXPORTED_FILE = "model.pt2"
GOLDEN_FILE = "golden.json"  # in an archive: held-out images with the packed artifact's build-time predictions
HELD_OUT_FILE = "held_out.json"  # in a trained model directory: the golden set's images, sampled from the test split
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"  # a text model's Hugging Face tokenizer, packed beside its artifact
KEY_FILE = "key_file.json"  # written by TorchServe in the directory it was started from

# The runtimes an artifact can run on, and the file each one's artifact has by default: the one table of
# runtime names (handlers/runtimes.py registers a loader under each).
RUNTIMES = {"eager": STATE_DICT_FILE, "compile": STATE_DICT_FILE, "torchscript": TORCHSCRIPT_FILE,
            "export": EXPORTED_FILE, "aoti": "model.aoti.pt2", "onnxruntime": "model.onnx", "openvino": "model.xml",
            "tensorrt": "model.trt.pt2", "ensemble": "members.sha256"}
# Files a runtime reads beside its artifact: suffix -> what it holds.
COMPANIONS = {"openvino": (".bin",)}  # the IR's weights
# Files a task reads beside the artifact, whatever the runtime: task -> file names.
TASK_FILES = {"text": (TOKENIZER_FILE,)}
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
FUSIONS = ("mean", "weighted", "cascade")
MEMBERS_DIR = "members"  # an ensemble's members, each a model directory of its own, inside the ensemble's
# What a model does: each is served by the module of that name in handlers/tasks/.
TASKS = ("classification", "regression", "detection", "text")
REBUILD_HINT = ("recreate it with python -m training.train (or the command that made this variant), "
                "then rebuild the archive with build_mar.sh")


class CardError(ValueError):
    """A model card that is missing, malformed or from another schema version; the message names the field."""


class KeyFileError(ValueError):
    """TorchServe's key file is missing or has no key for the API asked for."""


@dataclass(frozen=True)
class DataSpec:
    """Everything needed to rebuild the same train/val/test splits."""

    source: str  # "digits" (scikit-learn's bundled digits) or an ImageFolder path
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def __post_init__(self) -> None:
        val, test = self.val_fraction, self.test_fraction
        if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
            raise CardError(f"field 'data.spec': val_fraction {self.val_fraction} and test_fraction "
                            f"{self.test_fraction} must each be in (0, 1) and together below 1")


@dataclass(frozen=True)
class DataRecord:
    spec: DataSpec
    fingerprint: str  # sha256 over the images, labels and split indices
    sizes: dict[str, int]
    skipped: dict[str, str] = field(default_factory=dict)  # files of the folder that could not be decoded -> why

    def __post_init__(self) -> None:
        for path, reason in self.skipped.items():
            if not path or path.startswith("/") or ".." in path.split("/") or not reason:
                raise CardError(f"field 'data.skipped' must map paths inside the data folder to reasons, got "
                                f"{path!r}: {reason!r}")


@dataclass(frozen=True)
class InputContract:
    """One model input item: its shape and, for images, the normalization applied before the model."""

    shape: list[int]  # e.g. [3, 224, 224] for an image model, [64] for a feature vector
    mean: list[float] | None = None  # per channel, in [0, 1] units
    std: list[float] | None = None

    def __post_init__(self) -> None:
        if not self.shape or any(d < 1 for d in self.shape):
            raise CardError(f"field 'input.shape' must be a non-empty list of positive sizes, got {self.shape}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) != self.shape[0]:
                raise CardError(f"field 'input.{name}' has {len(values)} values for {self.shape[0]} channels")
        if self.std is not None and min(self.std) <= 0:
            raise CardError(f"field 'input.std' must be positive, got {self.std}")

    @property
    def is_image(self) -> bool:
        """A square RGB image [3, S, S]."""
        return len(self.shape) == 3 and self.shape[0] == 3 and self.shape[1] == self.shape[2]

    @property
    def image_size(self) -> int:
        """The side of a square RGB input [3, S, S]."""
        if not self.is_image:
            raise CardError(f"field 'input.shape' is {self.shape}, not a square RGB image [3, S, S]")
        return self.shape[1]


@dataclass(frozen=True)
class EvalSummary:
    """Held-out figures of one artifact (the full report stays in eval/<split>/report.json)."""

    n: int
    top1: float | None = None  # classification
    macro_precision: float | None = None
    macro_recall: float | None = None
    macro_f1: float | None = None
    map: float | None = None  # detection: COCO mAP@[.5:.95]
    map50: float | None = None  # detection: COCO mAP@.5
    per_class_ap: dict[str, float] | None = None  # detection: AP@[.5:.95] per label
    confusion_matrix: list[list[int]] | None = None  # text: rows the true labels, columns the predicted ones

    def __post_init__(self) -> None:
        if (self.top1 is None) == (self.map is None):
            raise CardError("field 'metrics.test' needs exactly one headline figure: top1 (classification, "
                            "regression, text) or map (detection)")
        m = self.confusion_matrix
        if m is not None and (any(len(row) != len(m) for row in m) or min(map(min, m), default=0) < 0
                              or sum(map(sum, m)) != self.n):
            raise CardError(f"field 'metrics.test.confusion_matrix' must be a square matrix of counts summing to "
                            f"n={self.n}")

    @property
    def headline(self) -> tuple[str, float]:
        """The figure the accuracy gate compares, and its name."""
        return ("mAP", self.map) if self.map is not None else ("top-1", self.top1)  # type: ignore[return-value]


@dataclass(frozen=True)
class Metrics:
    test: EvalSummary | None = None
    val_top1: float | None = None
    speed: dict[str, Any] | None = None  # in-process timing from training.optimize, with the CPU it ran on


@dataclass(frozen=True)
class Recipe:
    technique: str  # "train", "export", or the technique that made a variant
    args: dict[str, Any]


@dataclass(frozen=True)
class ParentRecord:
    """The fp32 checkpoint a variant was made from, and the figures the accuracy gate compares with."""

    dir: str
    checkpoint: str
    sha256: str
    variant: str
    test: EvalSummary


@dataclass(frozen=True)
class Profile:
    params: int
    macs: int  # multiply-accumulates per item, counted on the float model


@dataclass(frozen=True)
class Explainer:
    """The float model explanations run on (packed by build_mar.sh --explain): the fp32 parent's weights, even
    when an int8 or other runtime variant serves the predictions."""

    checkpoint: str  # state_dict file name in the archive
    architecture: str
    variant: str  # the variant those weights are

    def __post_init__(self) -> None:
        if not self.checkpoint or Path(self.checkpoint).name != self.checkpoint:
            raise CardError(f"field 'explainer.checkpoint' must be a file name, got {self.checkpoint!r}")


@dataclass(frozen=True)
class Member:
    """One model of an ensemble: its directory under members/, the variant it was copied from, its share."""

    dir: str
    variant: str
    weight: float
    files: list[str]  # what its runtime reads, beside its own metadata.json
    test_top1: float


@dataclass(frozen=True)
class Fusion:
    """How an ensemble combines its members' probabilities.

    mean/weighted: sum of weight x softmax over all members. cascade: the first member answers when its top
    probability reaches `threshold`; otherwise the second member answers.
    """

    kind: str
    members: list[Member]
    threshold: float | None = None
    chosen_on: str = "val"  # the split the weights or the threshold were fitted on

    def __post_init__(self) -> None:
        if self.kind not in FUSIONS:
            raise CardError(f"field 'fusion.kind' is {self.kind!r}; expected one of {', '.join(FUSIONS)}")
        if len(self.members) < 2:
            raise CardError(f"field 'fusion.members' has {len(self.members)} member(s); an ensemble needs two or more")
        if self.kind == "cascade" and (len(self.members) != 2 or self.threshold is None
                                       or not 0 < self.threshold <= 1):
            raise CardError("a cascade has exactly two members (cheap, then big) and a 'fusion.threshold' in (0, 1]")
        if self.kind != "cascade" and abs(sum(m.weight for m in self.members) - 1) > 1e-6:
            raise CardError(f"field 'fusion.members' weights sum to {sum(m.weight for m in self.members)}, not 1")
        for m in self.members:
            if not m.dir or Path(m.dir).name != m.dir:
                raise CardError(f"field 'fusion.members.dir' must be a directory name, got {m.dir!r}")


@dataclass(frozen=True)
class ModelCard:
    name: str  # the model name it is served under
    version: str
    architecture: str  # a torchvision model name, or a free name for a model whose artifact carries its graph
    labels: list[str]  # class names (classification) or output names (regression)
    input: InputContract
    variant: str  # fp32, int8, pruned, ...
    runtime: str  # one of RUNTIMES: how `artifact` is loaded and run
    artifact: str  # file name in the model directory
    recipe: Recipe
    task: str = "classification"
    checkpoint: str | None = None  # float state_dict beside the artifact, when build_model(architecture) loads it
    precision: str = "fp32"  # what the runtime computes in: fp32, bf16, fp16 or int8
    cpu_only: bool = False  # int8 kernels, ONNX Runtime and OpenVINO here run on CPU only: deviceType cpu
    cuda_only: bool = False  # TensorRT engines and CUDA AOTInductor packages: deviceType gpu
    parent: ParentRecord | None = None  # None for a trained parent
    metrics: Metrics = Metrics()
    data: DataRecord | None = None  # None for models trained elsewhere
    training: dict[str, Any] | None = None  # history, seconds, autocast of the run that made the weights
    export: dict[str, Any] | None = None  # method and parity report of the export
    profile: Profile | None = None
    fusion: Fusion | None = None  # runtime "ensemble" only: its members and how their outputs are combined
    explainer: Explainer | None = None  # set in an archive built with --explain
    details: dict[str, Any] = field(default_factory=dict)  # technique-specific facts (sparsity, pruning, notes)
    git_commit: str = "unknown"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise CardError(f"field 'schema_version' is {self.schema_version}; this code reads version "
                            f"{SCHEMA_VERSION}")
        if self.runtime not in RUNTIMES:
            raise CardError(f"field 'runtime' is {self.runtime!r}; expected one of {', '.join(RUNTIMES)}")
        if self.precision not in PRECISIONS:
            raise CardError(f"field 'precision' is {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if self.cpu_only and self.cuda_only:
            raise CardError("fields 'cpu_only' and 'cuda_only' are both true; a variant runs on one or the other")
        if self.task not in TASKS:
            raise CardError(f"field 'task' is {self.task!r}; expected one of {', '.join(TASKS)}")
        if not self.labels:
            raise CardError("field 'labels' is empty; a model needs at least one output name")
        test = self.metrics.test
        if test is not None and test.confusion_matrix is not None and len(test.confusion_matrix) != len(self.labels):
            raise CardError(f"field 'metrics.test.confusion_matrix' has {len(test.confusion_matrix)} rows for "
                            f"{len(self.labels)} labels")
        if self.task == "text" and len(self.input.shape) != 1:
            raise CardError(f"field 'input.shape' of a text model is [most tokens per text], got {self.input.shape}")
        if (self.runtime == "ensemble") != (self.fusion is not None):
            raise CardError("field 'fusion' is required with runtime 'ensemble' and allowed with no other runtime")
        for name in ("artifact", "checkpoint"):
            value = getattr(self, name)
            if value is not None and (not value or Path(value).name != value):
                raise CardError(f"field '{name}' must be a file name inside the model directory, got {value!r}")

    @property
    def files(self) -> list[str]:
        """The artifact and the files its runtime and its task read beside it, all in the model directory."""
        stem = Path(self.artifact).stem
        members = [f"{MEMBERS_DIR}/{m.dir}/{name}" for m in (self.fusion.members if self.fusion else [])
                   for name in (CARD_FILE, *m.files)]
        return [self.artifact, *(stem + suffix for suffix in COMPANIONS.get(self.runtime, ())),
                *TASK_FILES.get(self.task, ()), *members]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def test(self) -> EvalSummary:
        """The held-out test figures, which every variant must have before it can be gated or served."""
        if self.metrics.test is None:
            raise CardError("field 'metrics.test' is missing; evaluate the model with: python -m training.evaluate DIR")
        return self.metrics.test

    def replace(self, **changes: Any) -> ModelCard:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {"schema_version": out.pop("schema_version"), **out}

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """Validate and build; a CardError names the first field that is missing or of the wrong type."""
        if not isinstance(data, dict):
            raise CardError(f"a model card is a JSON object, got {type(data).__name__}")
        if "schema_version" not in data:
            raise CardError("field 'schema_version' is missing: the card was written before cards were versioned")
        return _build(cls, data, "")

    @classmethod
    def read(cls, model_dir: Path | str) -> ModelCard:
        path = Path(model_dir) / CARD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; create it with: python -m training.train --out {model_dir}")
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise CardError(f"{path} is not valid JSON ({e}); {REBUILD_HINT}") from e
        try:
            return cls.from_dict(data)
        except CardError as e:
            raise CardError(f"{path}: {e}; {REBUILD_HINT}") from e

    def write(self, model_dir: Path | str) -> Path:
        path = Path(model_dir) / CARD_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path


def _build(tp: Any, value: Any, path: str) -> Any:
    """`value` (parsed JSON) as type `tp`: dataclasses, Optional, list, dict, str, int, float, bool and Any."""
    where = f"field '{path}'" if path else "the card"
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, value, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise CardError(f"{where} must be an object, got {type(value).__name__}")
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise CardError(f"field '{_join(path, unknown[0])}' is not part of the card (schema version "
                            f"{SCHEMA_VERSION})")
        hints = get_type_hints(tp)
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = _build(hints[name], value[name], _join(path, name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CardError(f"field '{_join(path, name)}' is missing")
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            raise CardError(f"{where} must be a list, got {type(value).__name__}")
        return [_build(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise CardError(f"{where} must be an object, got {type(value).__name__}")
        return {k: _build(args[1], v, _join(path, k)) for k, v in value.items()}
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
        return value
    raise CardError(f"{where} must be {getattr(tp, '__name__', tp)}, got {value!r:.60}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit() -> str:
    """The commit this code runs from, with -dirty for uncommitted changes to tracked files."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_key(path: Path | str, api: str) -> str:
    """One API key ("inference", "management" or "API") from TorchServe's key_file.json."""
    try:
        # TorchServe rewrites the file in place when it renews a key: wait out a half-written one.
        keys: Any = None
        for _ in range(20):
            try:
                keys = json.loads(Path(path).read_text())
                break
            except ValueError:
                time.sleep(0.025)
        key = keys[api]["key"]
    except FileNotFoundError:
        raise KeyFileError(f"{path} not found; TorchServe writes {KEY_FILE} in the directory it was started from "
                           "(token auth is on)") from None
    except (KeyError, TypeError):
        raise KeyFileError(f"{path} has no readable '{api}' key; is it TorchServe's {KEY_FILE}?") from None
    if not isinstance(key, str) or not key:
        raise KeyFileError(f"{path} has an empty '{api}' key; restart TorchServe to write a new {KEY_FILE}")
    return key


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m handlers.contract", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate the model card of a model directory and summarise it")
    c.add_argument("model_dir", type=Path)
    k = sub.add_parser("key", help="print an API key from TorchServe's key file")
    k.add_argument("api", choices=("inference", "management"))
    k.add_argument("--file", type=Path, default=Path(KEY_FILE))
    args = ap.parse_args(argv)
    try:
        if args.cmd == "key":
            print(read_key(args.file, args.api))
            return
        card = ModelCard.read(args.model_dir)
    except (CardError, KeyFileError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    test = f", test top-1 {100 * card.metrics.test.top1:.2f}%" if card.metrics.test else ""
    print(f"{args.model_dir}: {card.name} {card.version}, {card.architecture} {card.variant} ({card.runtime}, "
          f"{card.artifact}), input {card.input.shape}, {card.num_classes} outputs{test}")


if __name__ == "__main__":
    main()
