"""The technique interface, and the one function that turns what a technique makes into a variant.

A technique declares its name, its options and its transform. `build` does the rest, the same way for every
variant: TorchScript export, parity with the transformed eager model, artifact and model card, held-out evaluation
of the saved file, and the profile (params, MACs). Each technique's module runs it alone from the command line
(`run_cli`); training.optimize runs many, with the same flags.

    <parent>/variants/<variant>/model.pt        frozen TorchScript (the served artifact)
    <parent>/variants/<variant>/metadata.json   the parent's card, with variant, recipe, parent, metrics, profile
    <parent>/variants/<variant>/eval/test/      report.json + confusion_matrix.png
    <parent>/variants/<variant>/model.pth       float weights, when they load into build_model(architecture)
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from handlers.contract import (
    STATE_DICT_FILE,
    TORCHSCRIPT_FILE,
    CardError,
    Fusion,
    Metrics,
    ModelCard,
    ParentRecord,
    Profile,
    Recipe,
    git_commit,
    sha256,
)
from handlers.deprecations import known_deprecations
from handlers.loading import load_state_dict, model_from_state_dict
from handlers.runtimes import Predictor, load_model
from packager.pick import variant_dir
from training import support
from training.data import Splits
from training.evaluate import evaluate_artifact, splits_for, summary
from training.export import ParityError, Tolerance, check_parity, to_torchscript
from training.speed import profile


@dataclass(frozen=True)
class Option:
    """One command-line flag of a technique; its name is the same in every command that offers it."""

    flag: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        if isinstance(self.default, bool):
            parser.add_argument(self.flag, action="store_true", help=self.help)
        else:
            parser.add_argument(self.flag, type=type(self.default), default=self.default, choices=self.choices,
                                help=f"{self.help} (default {self.default})")


# Flags every technique may read: seeded fine-tunes, calibration samples and students.
COMMON = (Option("--seed", 0, "random seed"),)


@dataclass
class Source:
    """What a technique starts from: the fp32 parent, or the float variant it stacks on."""

    parent_dir: Path
    parent: ModelCard  # the fp32 parent's card (labels, input contract, data)
    card: ModelCard  # the card of `model`: the parent's, or the stacked-on variant's
    model: torch.nn.Module  # eager float model, eval mode, channels_last; techniques work on a copy
    splits: Splits


@dataclass
class Transformed:
    """A technique's result, before export."""

    model: torch.nn.Module  # what is exported, and what the export must match
    args: dict[str, Any]  # recorded in the recipe
    float_model: torch.nn.Module | None  # params and MACs are counted on it (None: `profile` says them)
    keep_checkpoint: bool = False  # save float_model's state_dict (it must load into build_model(architecture))
    architecture: str | None = None  # default: the source's
    export_method: str = "script"
    precision: str = "fp32"  # what the artifact computes in
    tolerance: Tolerance = Tolerance()  # parity of the saved artifact against `model`
    training: dict[str, Any] | None = None  # a fine-tune or a student's training run
    details: dict[str, Any] = field(default_factory=dict)
    cpu_only: bool = False  # beyond the technique's own: e.g. an ensemble with a CPU-only member
    fusion: Fusion | None = None  # an ensemble's members and fusion
    profile: Profile | None = None  # when there is no single float model to count


@dataclass
class Exported:
    """The artifact a technique wrote, and how."""

    artifact: str  # file name in the variant directory
    runtime: str  # one of handlers.contract.RUNTIMES
    method: str  # recorded in the card's export record
    details: dict[str, Any] = field(default_factory=dict)


class Technique:
    """Subclasses set the class attributes and implement transform (and export, for another runtime)."""

    name: str  # the variant it makes: <parent>/variants/<name>
    recipe: str  # recorded as recipe.technique
    options: tuple[Option, ...] = ()
    stacks_on: str | None = None  # a float variant it starts from instead of the parent
    cpu_only: bool = False
    cuda_only: bool = False
    parity_hint = "try --method trace, or report the architecture as unsupported for TorchScript"

    def requires(self, args: argparse.Namespace) -> list[str]:
        """Variants of the same parent this one is made from, which must be built before it."""
        return [self.stacks_on] if self.stacks_on else []

    def transform(self, source: Source, args: argparse.Namespace) -> Transformed:
        """The source model -> the transformed eager model, and what to record about it."""
        raise NotImplementedError

    def export(self, t: Transformed, source: Source, out: Path, args: argparse.Namespace) -> Exported:
        """Write the artifact of t.model into `out`: frozen TorchScript unless the technique targets a runtime."""
        scripted = to_torchscript(t.model, source.parent.input.image_size, t.export_method)
        with known_deprecations():
            torch.jit.save(scripted, str(out / TORCHSCRIPT_FILE))
        return Exported(TORCHSCRIPT_FILE, "torchscript", f"torch.jit.{t.export_method}+freeze")

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Held around transform, export and evaluation (e.g. warning filters of the technique's APIs)."""
        yield


class NotSupportedHere(ValueError):
    """The technique cannot run on this machine (no CUDA, no bf16 units, a GPU-only package missing)."""


# Parity of a runtime's artifact against the float model it was made from, by the precision it computes in.
# Lower precisions move logits, so they are held to a logit bound and a share of agreeing top-1 labels; what
# that costs in accuracy is the gate's to judge, against the fp32 parent.
RUNTIME_TOLERANCE = {"fp32": Tolerance(1e-3, 1e-3), "fp16": Tolerance(0.1, 0.02, 0.99),
                     "bf16": Tolerance(0.5, 0.05, 0.99), "int8": Tolerance(1.5, 0.2, 0.97)}


class RuntimeTechnique(Technique):
    """The float source (the parent, or the float variant it stacks on) run by another runtime, in `precision`.

    transform passes the source through unchanged; export writes the runtime's artifact (quantizing it there
    for int8), and build checks it against the source within RUNTIME_TOLERANCE[precision].
    """

    runtime: str
    recipes: dict[str, str]  # precision -> recipe.technique
    parity_hint = "the runtime computes this model differently; report the architecture as unsupported by it"

    def __init__(self, name: str, stacks_on: str | None = None, precision: str = "fp32") -> None:
        self.name = name
        self.stacks_on = stacks_on
        self.precision = precision
        self.recipe = self.recipes[precision]

    def recipe_args(self, source: Source, args: argparse.Namespace) -> dict[str, Any]:
        """What the recipe records beyond the runtime and precision (e.g. calibration)."""
        return {}

    def transform(self, source: Source, args: argparse.Namespace) -> Transformed:
        recipe = {"runtime": self.runtime, "precision": self.precision, **self.recipe_args(source, args)}
        return Transformed(source.model, recipe, source.model, precision=self.precision,
                           tolerance=RUNTIME_TOLERANCE[self.precision])


def stacked(technique: type[RuntimeTechnique], precisions: Sequence[str],
            sources: Sequence[str | None] = (None, "pruned", "distilled")) -> list[RuntimeTechnique]:
    """One technique per (float source, precision): onnxruntime, pruned_onnxruntime_int8, ..."""
    out = []
    for source in sources:
        for precision in precisions:
            name = "_".join(p for p in (source, technique.runtime, None if precision == "fp32" else precision) if p)
            out.append(technique(name, source, precision))
    return out


# Tasks whose variants training.<task>_variants makes, not these techniques: task -> what they are.
OWN_VARIANTS = {"detection": "its techniques are fewer proposals, a factorised box head and int8",
                "text": "its variants are fp32 TorchScript and int8"}


def load_parent(parent_dir: Path) -> tuple[ModelCard, torch.nn.Module]:
    """The fp32 parent's card and its eager model (eval mode, channels_last) from its state_dict."""
    card = ModelCard.read(parent_dir)
    if card.parent is not None:
        raise ValueError(f"{parent_dir} is itself a variant ({card.variant}); optimize its fp32 parent "
                         f"{card.parent.dir} instead")
    if card.task in OWN_VARIANTS:
        raise ValueError(f"{parent_dir} is a {card.task} model; {OWN_VARIANTS[card.task]}: python -m "
                         f"training.{card.task}_variants {parent_dir}")
    return card, load_float(parent_dir, card)


def load_float(model_dir: Path, card: ModelCard) -> torch.nn.Module:
    if card.checkpoint is None:
        raise ValueError(f"{model_dir} ({card.variant}) keeps no float checkpoint (model.pth), so nothing can be "
                         "made from it")
    path = Path(model_dir) / card.checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"{path} (the float state_dict) not found; train it with: "
                                f"python -m training.train --out {model_dir}")
    return model_from_state_dict(card.architecture, card.num_classes, load_state_dict(path))


def load_source(parent_dir: Path, stacks_on: str | None) -> Source:
    parent_card, parent = load_parent(parent_dir)
    card, model = parent_card, parent
    if stacks_on:
        vdir = variant_dir(parent_dir, stacks_on)
        try:
            card = ModelCard.read(vdir)
        except FileNotFoundError:
            raise FileNotFoundError(f"variant {vdir} not found; build it first, e.g. "
                                    f"python -m training.optimize {parent_dir} --variants {stacks_on}") from None
        model = load_float(vdir, card)
    return Source(Path(parent_dir), parent_card, card, model, splits_for(parent_card))


def parent_record(parent_dir: Path, card: ModelCard) -> ParentRecord:
    """What a variant says about where it came from: the parent's dir, checkpoint hash and test metrics."""
    assert card.checkpoint is not None  # load_parent refuses a parent without one
    return ParentRecord(dir=str(parent_dir), checkpoint=card.checkpoint,
                        sha256=sha256(Path(parent_dir) / card.checkpoint), variant=card.variant, test=card.test)


def build(parent_dir: Path, technique: Technique, args: argparse.Namespace, name: str | None = None) -> ModelCard:
    """Make the technique's variant of the parent in <parent>/variants/<name> and return its card.

    The variant is written to a hidden staging directory, loaded back through its runtime as the handler will
    load it, checked for parity and evaluated there, and only then moved into place: a failed step leaves the
    previous variant (if any) untouched.
    """
    parent_dir = Path(parent_dir)
    name = name or technique.name
    source = load_source(parent_dir, technique.stacks_on)
    parent = source.parent
    out = variant_dir(parent_dir, name)
    staging = out.with_name(f".{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with technique.scope():
            t = technique.transform(source, args)
            exported = technique.export(t, source, staging, args)
            stacked = ({"source": {"variant": source.card.variant, "top1": source.card.test.top1,
                                   "recipe": {"technique": source.card.recipe.technique,
                                              "args": source.card.recipe.args}}} if technique.stacks_on else {})
            card = parent.replace(
                variant=name,
                recipe=Recipe(technique.recipe, {**t.args, **stacked}),
                parent=parent_record(parent_dir, parent),
                runtime=exported.runtime,
                artifact=exported.artifact,
                precision=t.precision,
                checkpoint=None,
                cpu_only=technique.cpu_only or t.cpu_only,
                cuda_only=technique.cuda_only,
                architecture=t.architecture or source.card.architecture,
                training=t.training if t.training is not None else source.card.training,
                details=t.details,
                profile=t.profile or profile(t.float_model, parent.input.image_size),
                fusion=t.fusion,
                metrics=Metrics(),
                git_commit=git_commit(),
            )
            if t.keep_checkpoint:
                assert t.float_model is not None
                state = {k: v.detach().cpu() for k, v in t.float_model.state_dict().items()}
                model_from_state_dict(card.architecture, card.num_classes, state)  # raises if it would not load back
                torch.save(state, staging / STATE_DICT_FILE)
                card = card.replace(checkpoint=STATE_DICT_FILE)
            # Parity and evaluation run the artifact as it will be served: loaded back from disk by its runtime.
            with known_deprecations():
                device = torch.device("cuda" if card.cuda_only else "cpu")
                served = on_cpu(load_model(staging, card, device, repeatable=True), device)
                parity = check_parity(t.model, served, source.splits.test, parent, t.tolerance, technique.parity_hint)
                card = card.replace(export={"method": exported.method, "parity": parity, **exported.details})
                result = evaluate_artifact(staging, card, source.splits.test, model=served)
            card = card.replace(metrics=Metrics(test=summary(result)))
            card.write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)  # a variant is always replaced whole, never half-updated
    staging.rename(out)
    return card


def on_cpu(model: Predictor, device: torch.device) -> Predictor:
    """CPU batches in and logits out, wherever the model runs (a CUDA-only artifact gets its batches moved)."""
    if device.type == "cpu":
        return model
    return lambda x: model(x.to(device)).float().cpu()


def describe(card: ModelCard) -> str:
    """One line for the console after a variant is written."""
    top1 = 100 * card.test.top1
    assert card.parent is not None
    parent = 100 * card.parent.test.top1
    return (f"{card.variant}: test top-1 {top1:.2f}% (parent {parent:.2f}%, {top1 - parent:+.2f} pt)"
            f"{', CPU-only' if card.cpu_only else ''}")


def add_options(parser: argparse.ArgumentParser, techniques: Sequence[Technique]) -> None:
    """The techniques' flags (each once), the common ones, and --no-progress."""
    seen: set[str] = set()
    for technique in techniques:
        group = parser.add_argument_group(technique.name)
        for option in technique.options:
            if option.flag not in seen:
                option.add_to(group)
                seen.add(option.flag)
    for option in COMMON:
        option.add_to(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run_cli(techniques: Sequence[Technique], doc: str | None, argv: list[str] | None = None) -> None:
    """A technique module's command line: make one variant of a parent, or exit 1 with the reason (missing
    checkpoint, bad argument, failed export parity)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent_dir", type=Path, help="trained fp32 model directory (python -m training.train --out)")
    names = [t.name for t in techniques]
    if len(techniques) > 1:
        ap.add_argument("--variant", choices=names, default=names[0], help=f"which variant (default {names[0]})")
    ap.add_argument("--name", default=None, help="directory name under variants/ (default: the variant's name)")
    add_options(ap, techniques)
    args = ap.parse_args(argv)
    technique = techniques[names.index(getattr(args, "variant", names[0]))]
    try:
        support.check_technique(ModelCard.read(args.parent_dir).architecture, technique, args)
        card = build(args.parent_dir, technique, args, args.name)
    except (FileNotFoundError, ValueError, CardError, ParityError) as e:
        sys.exit(f"error: {e}")
    print(describe(card))
    print(f"written: {variant_dir(args.parent_dir, card.variant)}")
